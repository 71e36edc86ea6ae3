"""LoRA adapters on a frozen (quantised) base.

    y = base(x) + scale * B(A(dropout(x)))        A: r x in,  B: out x r,  B starts at zero

so a fresh adapter changes nothing. `scale` is alpha / r, or alpha / sqrt(r) for rsLoRA. The same
`lora_delta` (scale * B @ A) is used by forward-equivalent merges and by the streaming exporter.

Adapter parameters are fp32 master weights, used in `LoraConfig.dtype` (bf16 by default) in the
forward pass: the matmuls run at bf16 speed while small optimiser updates are not rounded away,
whatever optimiser the caller uses. Module and key names follow PEFT (`base_layer`, `lora_A`,
`lora_B`), so adapter files load in either library.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QLoraKitError, closest
from .dtypes import as_dtype, dtype_name
from .quant import QuantLinear

INITS = ("default", "orthogonal", "svd", "loftq")
CHANGES_BASE = ("svd", "loftq")  # inits whose adapter starts non-zero, so the frozen base is changed to match


def check_init(name: str) -> str:
    if name not in INITS:
        raise QLoraKitError(f"unknown LoRA init {name!r}{closest(str(name), INITS)}: use one of {', '.join(INITS)}")
    return name


@dataclass
class LoraConfig:
    """r: rank. alpha: scale numerator. dropout: on the adapter's input.
    targets: "all-linear" (every linear layer of the decoder, never lm_head), a list of module-name
    suffixes (["q_proj", "v_proj"]), or a regular expression matched against full module names.
    rslora: scale by alpha / sqrt(r) instead of alpha / r.
    dtype: dtype of the adapter matmuls (master weights stay fp32); "auto" = the model's compute dtype.
    seed: makes the initialisation reproducible.
    init: how A and B start (see qlora_kit.inits): "default" (Kaiming-uniform A, zero B), "orthogonal"
        (orthonormal rows in A, zero B), "svd" (PiSSA: top-r singular triplets of W; the base becomes
        the residual) or "loftq" (fit the quantisation error; needs a quantised base).
    init_iters: LoftQ's alternating rounds T (quantise, then SVD of what quantisation lost).
    target_experts: also adapt the expert weights of mixture-of-experts models (Mixtral, Qwen MoE), one
        low-rank pair per expert in PEFT's layout for expert parameters (`target_parameters`). PEFT
        cannot apply dropout there, so it needs dropout 0. The router is never adapted.
    shared_dropout: adapters that read the same input (q/k/v; gate/up) share one dropout mask, so a
        block draws 4 masks instead of 7. Each adapter still sees its input dropped with probability
        `dropout`; what changes is that the noise is the same for the three (two) of them, where
        PEFT draws one mask per adapter. False gives PEFT's independent masks (slower: the masks
        cost about as much as the adapters' matmuls on CPU).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    dtype: torch.dtype | str = "auto"
    seed: int | None = 0
    init: str = "default"
    init_iters: int = 1
    shared_dropout: bool = True
    target_experts: bool = False

    def __post_init__(self) -> None:
        check_init(self.init)
        if not isinstance(self.target_experts, bool):
            raise QLoraKitError(f"target_experts={self.target_experts!r} must be true or false")
        if self.target_experts and self.dropout:
            raise QLoraKitError(f"target_experts=True needs dropout 0 (it is {self.dropout}): PEFT's adapters on expert "
                                "parameters cannot drop their input, so an adapter trained with dropout there would "
                                "not load in PEFT; set lora.dropout: 0")
        if self.target_experts and self.init != "default":
            raise QLoraKitError(f"init {self.init!r} is not available with target_experts=True: expert adapters start "
                                "as PEFT's do (init 'default')")
        if not isinstance(self.shared_dropout, bool):
            raise QLoraKitError(f"shared_dropout={self.shared_dropout!r} must be true or false")
        if not isinstance(self.init_iters, int) or self.init_iters < 1:
            raise QLoraKitError(f"init_iters={self.init_iters!r} must be a positive integer (LoftQ rounds, 1-5)")
        if not isinstance(self.r, int) or self.r <= 0:
            raise QLoraKitError(f"LoRA rank r={self.r!r} must be a positive integer (8-64 is usual)")
        if not self.alpha or self.alpha <= 0:
            raise QLoraKitError(f"LoRA alpha={self.alpha!r} must be positive (often 2 * r)")
        if not 0.0 <= self.dropout < 1.0:
            raise QLoraKitError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets:
                raise QLoraKitError("LoRA targets is an empty list: name module suffixes or use 'all-linear'")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str):
            raise QLoraKitError(f"LoRA targets={self.targets!r}: use 'all-linear', a list of suffixes, or a regex")
        elif self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as e:
                raise QLoraKitError(f"LoRA targets {self.targets!r} is not a valid regular expression ({e}): use "
                                    "'all-linear', a list of module-name suffixes such as [q_proj, v_proj], or a "
                                    "regex over full module names such as '.*(q|v)_proj'") from None
        if self.dtype != "auto":
            self.dtype = as_dtype(self.dtype, "LoRA dtype")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        return d


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A in fp32: the change an adapter makes to its layer's weight."""
    return (lora_b.float() @ lora_a.float()) * scale


Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B)


@dataclass
class ChangedBase:
    """How an svd/loftq init changed a layer's frozen base: base = quant(W - scale * B_off @ A_off).

    offset: (A_off, B_off). initial: (A0, B0), where the adapter started, when that differs from the
    offset (loftq); PiSSA's adapter starts at its offset. Export and `to_plain_lora` use `start` to
    take out of the merge exactly what the init put in."""

    offset: Factors
    initial: Factors | None = None

    @property
    def start(self) -> Factors:
        return self.offset if self.initial is None else self.initial


class LoraLinear(nn.Module):
    """A frozen base layer (QuantLinear or nn.Linear) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.bfloat16,
                 generator: torch.Generator | None = None, shared_dropout: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = lora_scale(alpha, r, rslora)
        self.dtype = dtype
        self.dropout_p = float(dropout)
        self.shared_dropout = shared_dropout
        in_f, out_f = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)
        # PEFT's default init: Kaiming-uniform A (a=sqrt(5)), zero B.
        bound = 1.0 / math.sqrt(in_f)
        with torch.no_grad():
            a = torch.empty(r, in_f).uniform_(-bound, bound, generator=generator)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        # Set by inits that change the base: the factors it takes to rebuild it (see qlora_kit.inits).
        self.changed_base: ChangedBase | None = None
        self.enabled = True  # False: the layer computes its base alone (see adapt.adapters_disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the base layer runs on rows (a 2-D output that is no view), so the adapter can add in place
        y = self.base_layer(x.reshape(-1, x.shape[-1]))
        out_shape = (*x.shape[:-1], y.shape[-1])
        if not self.enabled:  # the frozen base alone: a preference loss's reference model
            return y.view(out_shape)
        h, keep_scale = self._dropped_input(x)
        a = F.linear(h, self.lora_A.weight.to(self.dtype))
        # scale (and dropout's 1 / (1 - p)) go into B, an out x r matrix, not into the activations
        b = (self.lora_B.weight * (self.scale * keep_scale)).to(self.dtype)
        if a.dtype == y.dtype and y._base is None and y.is_contiguous():
            # y += a @ b.T in one GEMM, in place: nothing saves the frozen base layer's output (a
            # linear layer keeps its input), and an out-of-place addmm would copy y first
            return y.addmm_(a.reshape(-1, self.r), b.t()).view(out_shape)
        return (y + F.linear(a, b).reshape(y.shape).to(y.dtype)).view(out_shape)

    def _dropped_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The adapter's input after dropout (zeros only: the rescaling is returned, for B)."""
        if not self.training or self.dropout_p == 0.0:
            return x.to(self.dtype), 1.0
        if self.shared_dropout:
            hit = _SHARED_DROPOUT.get(x, self.dropout_p, self.dtype)
            if hit is not None:
                return hit
        out = dropout_zeros(x.to(self.dtype), self.dropout_p)
        if self.shared_dropout:
            _SHARED_DROPOUT.put(x, self.dropout_p, self.dtype, out)
        return out

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scale)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in fp32, exactly as the forward pass sees it."""
        if isinstance(self.base_layer, QuantLinear):
            return self.base_layer.dequantize(torch.float32)
        return self.base_layer.weight.float()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dtype={dtype_name(self.dtype)}"


_MASK_LEVELS = 65536  # masks are drawn as 16-bit integers: p is rounded to a multiple of 1/65536


def dropout_zeros(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(x with each element zeroed with probability p, 1 / (1 - p)).

    The caller applies the 1 / (1 - p) rescaling (LoraLinear folds it into B). The mask comes from
    16-bit random integers, four per 64-bit draw of the device's generator: on CPU this is several
    times faster than `bernoulli_`, which draws one random number per element, and it follows the
    generator's state, so activation checkpointing recomputes the same mask."""
    cut = round(p * _MASK_LEVELS)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    noise = draws.view(torch.int16)[:x.numel()].view(x.shape)
    dropped = x.masked_fill(noise < cut - _MASK_LEVELS // 2, 0.0)
    return dropped, _MASK_LEVELS / (_MASK_LEVELS - cut)


class _SharedDropoutSlot:
    """The last dropped input, so that adapters reading the same tensor (q/k/v, gate/up) reuse it.

    Keyed by the input tensor's identity (a weak reference: a freed input never matches), the
    dropout probability and the dtype. One slot is enough because a block's sibling projections
    run one after another on the same input; a checkpointed block's recomputation meets new input
    tensors and, with the generator restored, draws the same masks again."""

    def __init__(self):
        self.key: tuple | None = None
        self.value: tuple[torch.Tensor, float] | None = None

    def get(self, x: torch.Tensor, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, float] | None:
        if self.key is None:
            return None
        ref, kp, kd, grad = self.key
        if ref() is x and kp == p and kd == dtype and grad == torch.is_grad_enabled():
            return self.value
        return None

    def put(self, x: torch.Tensor, p: float, dtype: torch.dtype, value: tuple[torch.Tensor, float]) -> None:
        self.key = (weakref.ref(x), p, dtype, torch.is_grad_enabled())
        self.value = value


_SHARED_DROPOUT = _SharedDropoutSlot()


class ExpertLora(nn.Module):
    """A low-rank update per expert of one fused expert weight [experts, out, in], in PEFT's layout.

    PEFT (`target_parameters`, its ParamWrapper) keeps all experts' factors in two matrices:
    A: (r * experts) x in, expert e's rows e*r .. e*r + r - 1;
    B: out x (r * experts), expert e's columns e, e + experts, e + 2 * experts, ... (r of them).
    Expert e's delta is scale * B_e @ A_e, the same formula as a linear layer's. Keeping PEFT's
    layout in memory makes the saved tensors PEFT's tensors, with no reshuffle on save or load.

    peft_path: where PEFT puts this adapter relative to the experts module. PEFT wraps a module's
    targeted parameters one inside the other in registration order, so the first (gate_up_proj) sits
    under 'base_layer' and the last (down_proj) on the module itself."""

    def __init__(self, experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 rslora: bool = False, dtype: torch.dtype = torch.bfloat16, peft_path: str = "",
                 generator: torch.Generator | None = None, device: torch.device | None = None):
        super().__init__()
        self.experts, self.r, self.alpha, self.rslora = experts, r, alpha, rslora
        self.scale = lora_scale(alpha, r, rslora)
        self.dtype, self.peft_path = dtype, peft_path
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Linear(in_features, r * experts, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False, device=device, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_features)  # PEFT's Kaiming-uniform A, zero B, as for LoraLinear
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.empty(r * experts, in_features).uniform_(-bound, bound, generator=generator))
            self.lora_B.weight.zero_()
        self.enabled = True

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e, B_e) of one expert: r x in and out x r."""
        return expert_factors(self.lora_A.weight, self.lora_B.weight, expert, self.experts)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """scale * B_e(A_e(x)) in the adapter dtype."""
        a, b = self.factors(expert)
        return F.linear(F.linear(x.to(self.dtype), a.to(self.dtype)), (b * self.scale).to(self.dtype))

    def delta_weight(self, expert: int) -> torch.Tensor:
        return lora_delta(*self.factors(expert), self.scale)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, r={self.r}, alpha={self.alpha}, dtype={dtype_name(self.dtype)}"


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int, experts: int) -> Factors:
    """One expert's (A_e, B_e) out of PEFT's expert layout (see ExpertLora): A's rows e*r .. e*r + r - 1,
    B's columns e, e + experts, ..."""
    r = lora_a.shape[0] // experts
    return lora_a[expert * r:(expert + 1) * r], lora_b[:, expert::experts]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def expert_loras(model: nn.Module) -> dict[str, ExpertLora]:
    """{PEFT module path: ExpertLora}, e.g. 'model.layers.0.mlp.experts.base_layer' (gate_up_proj)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ExpertLora):
            owner = name.rpartition(".")[0]
            out[f"{owner}.{m.peft_path}" if m.peft_path else owner] = m
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed by module path ('model.layers.0.self_attn.q_proj.lora_A.weight';
    expert adapters by PEFT's path, 'model.layers.0.mlp.experts.base_layer.lora_A.weight')."""
    out = {}
    for name, layer in {**lora_layers(model), **expert_loras(model)}.items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight
    return out

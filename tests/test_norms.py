"""The fused RMSNorm against transformers' own norm classes: the same outputs and gradients (input
and weight) in fp32, bf16 and fp16, for both formulas; what it saves for the backward pass; and
fuse_norms on whole models of every family the tiny models cover. Each test names its dtype."""

import pytest
import torch

from qlora_kit import QuantConfig, load_model
from qlora_kit.norms import CAST_THEN_SCALE, SCALE_THEN_CAST, RMSNorm, fuse_norms

from tiny import ARCHS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# fp32: outputs are transformers' to the bit, gradients summed in another order; 16-bit: the row norm
# is summed in another order, so an output may round to the neighbouring value
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _reference(kind: str, hidden: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    cls = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "olmo2": Olmo2RMSNorm}[kind]
    norm = cls(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden) * 0.3 + (0.0 if kind == "gemma" else 1.0))
    return norm


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["llama", "gemma", "olmo2"])
def test_outputs_and_gradients_match_transformers(kind, dtype):
    torch.manual_seed(0)
    hidden = 256
    reference = _reference(kind, hidden, dtype)
    fused = RMSNorm(torch.nn.Parameter(reference.weight.detach().clone()), 1e-6,
                    SCALE_THEN_CAST.get(type(reference).__name__))
    x = (torch.randn(3, 50, hidden) * 3).to(dtype)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = reference(x_ref), fused(x_fused)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fused.backward(grad)
    assert torch.equal(x_fused.detach(), x)   # the saved input is read, never written (fp32: no copy of it)
    assert out_fused.dtype == out_ref.dtype and x_fused.grad.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out_fused, out_ref, **tol)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, **tol)
    torch.testing.assert_close(fused.weight.grad, reference.weight.grad, **{k: 4 * v for k, v in tol.items()})
    if dtype == torch.float32:
        assert torch.equal(out_fused, out_ref)
    else:   # nearly every element is the very same number (a rare one rounds the other way)
        assert (out_fused != out_ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saves_its_input_in_the_compute_dtype_and_one_number_per_row(dtype):
    """transformers' chain saves an fp32 copy of the input (4 bytes per element) besides; the fused
    norm saves the input itself, 1/rms per row and the weight."""
    torch.manual_seed(0)
    rows, hidden = 64, 128
    reference = _reference("llama", hidden, dtype).requires_grad_(False)
    fused = RMSNorm(reference.weight, 1e-6)
    x = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)

    def saved_bytes(norm) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x)
        return sum(seen.values())

    weight = reference.weight.nbytes
    assert saved_bytes(fused) == x.nbytes + 4 * rows + weight
    if dtype != torch.float32:
        assert saved_bytes(reference) >= x.nbytes * 2 + weight   # the fp32 copy


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama-tied"])
def test_every_family_gets_fused_norms_and_the_same_logits(tiny_dirs, arch):
    """load_model replaces every RMSNorm of a known formula; the state dict keeps its names; the
    logits are those of transformers' own norms (fp32, to the bit; MoE within 1e-5).
    (MoE experts are laid out anew by the loader: only the norms' keys are compared.)"""
    from transformers import AutoModelForCausalLM

    path = tiny_dirs(arch)
    model, _ = load_model(path, quant=None, dtype=torch.float32, load_tokenizer=False, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    originals = [type(m).__name__ for m in reference.modules() if type(m).__name__.endswith("RMSNorm")]
    fused = [m for m in model.modules() if isinstance(m, RMSNorm)]
    known = [n for n in originals if n in CAST_THEN_SCALE or n in SCALE_THEN_CAST]
    assert len(fused) == len(known) and known == originals, "a norm class of this family is not fused"
    def norm_keys(m):
        return sorted(k for k in m.state_dict() if "norm" in k)

    assert norm_keys(model) == norm_keys(reference)
    ids = torch.randint(4, 320, (2, 24))
    with torch.no_grad():
        moe = "num_experts_per_tok" in ARCHS[arch]   # the loader's own expert layout sums in another order
        torch.testing.assert_close(model(ids).logits, reference(ids).logits,
                                   rtol=1e-5 if moe else 0, atol=1e-5 if moe else 0)


def test_a_norm_of_unknown_formula_is_left_alone():
    class OtherRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    model = torch.nn.Sequential(OtherRMSNorm(), torch.nn.LayerNorm(8))
    assert fuse_norms(model) == 0
    assert type(model[0]).__name__ == "OtherRMSNorm"


def test_training_through_fused_norms_updates_the_adapters_alike(tiny_dirs):
    """One bf16 training step's adapter gradients with fused norms against transformers' norms:
    the same within bf16's rounding."""
    from qlora_kit import LoraConfig, add_lora
    from qlora_kit.losses import causal_lm_loss

    path = tiny_dirs("llama")
    quant = QuantConfig(compute_dtype=torch.bfloat16)
    grads = []
    for fused in (True, False):
        model, _ = load_model(path, quant=quant, load_tokenizer=False, progress=False)
        if not fused:   # put transformers' norms back, with the same weights
            from transformers.models.llama.modeling_llama import LlamaRMSNorm
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, RMSNorm):
                        original = LlamaRMSNorm(child.weight.shape[0], eps=child.eps)
                        original.weight = child.weight
                        setattr(parent, name, original)
        torch.manual_seed(0)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        model.train()
        ids = torch.randint(4, 320, (2, 32))
        causal_lm_loss(model, ids, ids)[0].backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0.05, atol=0.05 * grads[1].abs().max().item())

"""RMSNorm in one autograd node that keeps its input in the compute dtype.

transformers writes each model's RMSNorm as a chain of eager ops in fp32: cast the input up,
square, mean, rsqrt, multiply, cast down, scale. In a 16-bit step autograd then keeps the fp32
copy of every norm's input (4 bytes per hidden unit and token, twice per block) and runs about
ten full passes over the hidden states per norm, forward and backward, most of them in fp32
(on a 12-layer, 1024-wide Llama in bf16: 5% of the step in casts, 96 MiB of saved copies).

`RMSNorm` computes the same function in three passes forward (the row norms accumulated in fp32
from the 16-bit input, the normalised rows rounded once, the scale) and saves the 16-bit input and
one fp32 number per row. Its backward pass runs in fp32, as transformers' does. `fuse_norms`
replaces the model's norms with it, module for module, keeping their weights (and so the state
dict's names).

Two formulas are in use, told apart by the class that transformers defines:
  cast, then scale (Llama, Mistral, Qwen 2/3, Phi-3, Granite, Mixtral, the Qwen MoEs):
      weight * (x * rstd).to(dtype)
  scale in fp32, then cast (OLMo 2; Gemma 1/2/3, whose weight is stored as an offset from one):
      ((x * rstd) * (offset + weight)).to(dtype)
Any other norm class is left as it is.
"""

import torch
from torch import nn

CAST_THEN_SCALE = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                   "GraniteRMSNorm", "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm"}
SCALE_THEN_CAST = {"Olmo2RMSNorm": 0.0, "GemmaRMSNorm": 1.0, "Gemma2RMSNorm": 1.0, "Gemma3RMSNorm": 1.0}  # the offset


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) per row, in fp32. A 16-bit x is read once, its squares summed in
    fp32 (no fp32 copy of it: the sum's order differs from transformers', which can move a rounding
    of the 16-bit output); fp32 the way transformers computes it, so that fp32 outputs are its own
    to the bit."""
    if x.dtype == torch.float32:
        return x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float | None) -> torch.Tensor:
        rstd = _rstd(x, eps)
        if offset is not None:
            scaled = torch.mul(x, rstd)          # fp32: x is promoted exactly
            out = torch.empty_like(x)
            torch.mul(scaled, weight.float() + offset, out=out)   # computed in fp32, rounded once
        else:
            normed = torch.empty_like(x)
            torch.mul(x, rstd, out=normed)        # computed in fp32, rounded once to x's dtype
            out = normed.mul_(weight) if weight.dtype == x.dtype else weight * normed
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset = offset
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        # The gradient reaching the fp32 normalised rows, as transformers' chain computes it: through
        # the 16-bit product with the weight (rounded), or the fp32 product with 1 + weight.
        if ctx.offset is not None:
            upstream = grad * (weight.float() + ctx.offset)
        elif grad.dtype == weight.dtype == x.dtype:
            upstream = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
            torch.mul(grad, weight, out=upstream)    # computed in the compute dtype, then widened
        else:
            upstream = (grad * weight).to(x.dtype).float()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            if ctx.offset is not None:
                grad_weight = (grad.float() * (x * rstd)).sum_to_size(weight.shape).to(weight.dtype)
            else:
                normed = torch.empty_like(x)
                torch.mul(x, rstd, out=normed)
                grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
            scratch = upstream * x                                   # fp32
            coeff = scratch.sum(-1, keepdim=True).mul_(rstd.pow(3)).div_(x.shape[-1])
            upstream.mul_(rstd)
            torch.mul(x, coeff, out=scratch)
            grad_x = torch.empty_like(x)
            torch.sub(upstream, scratch, out=grad_x)                 # computed in fp32, rounded once
        return grad_x, grad_weight, None, None


class RMSNorm(nn.Module):
    """A transformers RMSNorm's function and weight, computed as one autograd node. offset: None to
    cast, then scale; a number to scale by offset + weight in fp32, then cast."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float | None = None):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


def fuse_norms(model: nn.Module) -> int:
    """Replace every RMSNorm of a known formula with `RMSNorm`; return how many were replaced."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            kind = type(child).__name__
            if kind in CAST_THEN_SCALE or kind in SCALE_THEN_CAST:
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", None))
                swaps.append((parent, name, RMSNorm(child.weight, float(eps), SCALE_THEN_CAST.get(kind))))
    for parent, name, norm in swaps:
        setattr(parent, name, norm)
    return len(swaps)

"""RMSNorm in one autograd node that keeps its input in the compute dtype.

transformers writes each model's RMSNorm as a chain of eager ops in fp32: cast the input up,
square, mean, rsqrt, multiply, cast down, scale. In a 16-bit step autograd then keeps the fp32
copy of every norm's input (4 bytes per hidden unit and token, twice per block, where the 16-bit
input takes 2) and the backward pass makes about five hidden-sized fp32 temporaries per norm.

`RMSNorm` computes the same function, op for op, a block of rows at a time, and saves the 16-bit
input and one fp32 number per row; its backward pass runs in fp32, as transformers' does, block by
block. Outputs and gradients are transformers' to the bit in every dtype. On the CPU a block's fp32
copy (256 KiB) stays in cache and no hidden-sized fp32 temporary is made. On the 12-layer,
1024-wide Llama of benchmarks/vs_recipe.py (bf16, batch 4 x 256, no block checkpointed) the peak
RSS drops by 49 MiB (1370 -> 1321); the step time is unchanged (the norms are ~1% of it).
`fuse_norms` replaces the model's norms with it, module for module, keeping their weights (and so
the state dict's names).

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


# Rows per block: on the CPU about 256 KiB of fp32 at a time, so that every pass over a block reads
# it from cache and no hidden-sized fp32 temporary is ever allocated (a fresh 4 MiB tensor costs
# its page faults each time); an accelerator takes all rows at once.
BLOCK_BYTES_CPU = 256 << 10


def _rows_per_block(rows: int, hidden: int, device: torch.device) -> int:
    return max(1, BLOCK_BYTES_CPU // (4 * hidden)) if device.type == "cpu" else max(rows, 1)


class _RMSNormFunction(torch.autograd.Function):
    """offset None: weight * (x * rstd).to(dtype); a number: ((x * rstd) * (offset + weight)).to(dtype).
    The forward pass is transformers' arithmetic, op for op, a block of rows at a time: the same
    numbers to the bit in every dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float | None) -> torch.Tensor:
        rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
        flat = x.reshape(rows, hidden)
        out = torch.empty(rows, hidden, dtype=torch.result_type(flat, weight) if offset is None else x.dtype,
                          device=x.device)
        rstd = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
        scale = weight.float() + offset if offset is not None else weight
        step = _rows_per_block(rows, hidden, x.device)
        for i in range(0, rows, step):
            xf = flat[i:i + step].float()
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            rstd[i:i + step] = r
            normed = xf * r
            if offset is None:
                out[i:i + step] = scale * normed.to(x.dtype)
            else:
                out[i:i + step] = normed * scale
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset = offset
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
        flat, grad = x.reshape(rows, hidden), grad.reshape(rows, hidden)
        want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(flat) if want_x else None
        grad_weight = torch.zeros(hidden, dtype=torch.float32, device=x.device) if want_weight else None
        scale = weight.float() + ctx.offset if ctx.offset is not None else weight
        step = _rows_per_block(rows, hidden, x.device)
        for i in range(0, rows, step):
            g, r = grad[i:i + step], rstd[i:i + step]
            xf = flat[i:i + step].float()
            # the gradient reaching the fp32 normalised rows, through the product with the weight (in
            # the compute dtype, then widened) or with offset + weight (in fp32)
            if ctx.offset is None:
                upstream = (g * scale).to(x.dtype).float()
            else:
                upstream = g.float() * scale
            if want_weight:
                normed = xf * r
                if ctx.offset is None:
                    grad_weight += (g * normed.to(x.dtype)).sum(0, dtype=torch.float32)
                else:
                    grad_weight += (g.float() * normed).sum(0)
            if want_x:
                # d/dx of x * rstd(x) = rstd * g - x * rstd^3 * mean(g * x); (xf is x itself in fp32)
                coeff = (upstream * xf).sum(-1, keepdim=True).mul_(r.pow(3)).div_(hidden)
                grad_x[i:i + step] = upstream.mul_(r).sub_(xf * coeff)
        if want_x:
            grad_x = grad_x.view(x.shape)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
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

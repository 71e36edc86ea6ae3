"""How much of its rank an adapter uses: the spectrum of scale * B @ A per module, and an r to try next.

The LoRA paper found weight updates to be rank-deficient: a few directions hold most of the change.
This measures that on a trained adapter. The product is never formed: with B = Qb Rb and
A^T = Qa Ra (thin QR, Q with orthonormal columns),

    scale * B @ A = Qb (scale * Rb @ Ra^T) Qa^T

so its singular values are those of the r x r core; the cost is O((d + k) r^2), not O(d k).

Energy is the sum of squared singular values. For each module the report gives the rank that holds
90% and 99% of it; the suggested r for the next run is the smallest power of two that holds 99% in
every module, or 2r when some module already needs all of r (the run may have been rank-limited).
For svd/loftq adapters `change=True` measures what training changed, scale * (B @ A - B0 @ A0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .adapters import Adapter
from .errors import QLoraKitError

LEVELS = (0.90, 0.99)


def product_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale * B @ A (B: d x r, A: r x k), largest first, via two thin QRs."""
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(scale * rb @ ra.T).float()


def energy_rank(values: torch.Tensor, level: float) -> int:
    """Smallest k with sum(s[:k]^2) >= level * sum(s^2) (0 for an all-zero update)."""
    energy = values.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(level - 1e-12, dtype=torch.float64))) + 1


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def rank_report(adapter: str | Path, change: bool = False) -> dict:
    """Per-module spectra and energy ranks of an adapter folder, and the suggested r (see module docstring)."""
    record = Adapter.read(adapter)
    config, tensors = record.lora, record.tensors
    if change and not record.changed:
        raise QLoraKitError(f"adapter {adapter} starts from zero (init 'default' or 'orthogonal'): its change is "
                            "B @ A itself; drop --change")
    modules = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        a, b = tensors[key], tensors.get(f"{name}.lora_B.weight")
        if b is None:
            raise QLoraKitError(f"adapter {adapter} has lora_A but no lora_B for {name}")
        if change:
            a0, b0 = record.changed[name].start
            a, b = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)  # B@A - B0@A0 as one product of rank <= 2r
        values = product_singular_values(a, b, config.scale)
        # rounding noise of an (almost) cancelled product is not rank: zero what fp32 cannot resolve
        noise = 1e-6 * config.scale * float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
        values = torch.where(values > noise, values, torch.zeros_like(values))
        modules[name] = {"singular_values": [round(float(v), 6) for v in values],
                         **{f"rank_{round(level * 100)}": energy_rank(values, level) for level in LEVELS}}
    if not modules:
        raise QLoraKitError(f"adapter {adapter} has no LoRA A/B pairs to measure")
    need = max(m["rank_99"] for m in modules.values())
    saturated = [n for n, m in modules.items() if m["rank_99"] >= config.r]
    suggested = 2 * config.r if saturated and not change else min(config.r, _power_of_two_at_least(need))
    return {"adapter": str(adapter), "r": config.r, "scale": config.scale, "measured": "change" if change else "B@A",
            "modules": modules, "max_rank_90": max(m["rank_90"] for m in modules.values()),
            "max_rank_99": need, "saturated_modules": len(saturated), "suggested_r": suggested}


def format_rank_report(report: dict, limit: int = 40) -> str:
    lines = [f"rank report: {report['adapter']} (r={report['r']}, scale={report['scale']:.4g}, "
             f"measured: scale * {report['measured']})",
             f"{'module':60s} {'r90':>4s} {'r99':>4s}  top singular values"]
    for name, m in list(report["modules"].items())[:limit]:
        top = " ".join(f"{v:.3g}" for v in m["singular_values"][:4])
        lines.append(f"{name:60s} {m['rank_90']:4d} {m['rank_99']:4d}  {top}")
    if len(report["modules"]) > limit:
        lines.append(f"... {len(report['modules']) - limit} more modules (--json lists all)")
    lines.append(f"largest rank holding 90% / 99% of the energy: {report['max_rank_90']} / {report['max_rank_99']}; "
                 f"{report['saturated_modules']} module(s) need all r={report['r']} for 99%")
    lines.append(f"suggested r for the next run: {report['suggested_r']}")
    return "\n".join(lines) + "\n"


def plot_spectra(report: dict, out: str | Path) -> Path:
    """PNG: normalised singular values per module (log scale), one line each, with the 90/99% ranks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in report["modules"].items():
        s = torch.tensor(m["singular_values"])
        if float(s[0]) == 0.0:
            continue
        left.semilogy(range(1, len(s) + 1), (s / s[0]).clamp(min=1e-8).tolist(), lw=0.8, alpha=0.6)
        energy = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
        right.plot(range(1, len(s) + 1), energy.tolist(), lw=0.8, alpha=0.6)
    for level in LEVELS:
        right.axhline(level, color="k", ls="--", lw=0.7)
    left.set(xlabel="index", ylabel="singular value / largest", title="spectra of scale * " + report["measured"])
    right.set(xlabel="rank k", ylabel="energy held by top k", title=f"suggested r = {report['suggested_r']}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out


def write_json(report: dict, out: str | Path | None = None) -> str:
    text = json.dumps(report, indent=2)
    if out is not None:
        Path(out).write_text(text)
    return text

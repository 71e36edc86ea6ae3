"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

svd and loftq inits change the frozen base; their folders add `qlora_kit_init.safetensors` (the
factors that rebuild it, see qlora_kit.inits), and `load_adapter` rebuilds the base from the model's
own folder. PEFT reads such a folder too but would apply it to the unchanged base: convert it first
with `to_plain_lora` (PEFT's own PiSSA-to-LoRA conversion, rank 2r).

Keys are PEFT's ('base_model.model.<module path>.lora_A.weight'), so `PeftModel.from_pretrained`
reads what we write and we read what PEFT writes. Config fields PEFT does not know live under
'qlora_kit' in the same JSON (PEFT ignores unknown keys only at top level in some versions, so we
keep ours nested under one key).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .errors import QLoraKitError, first_few
from .io import atomic_dir, check_replace, disk_full_as_error, refuse_overlap, unknown_entries
from .inits import INIT_FILE, SourceWeights, init_tensors, quant_matches, rebuild_base, split_init_tensors
from .lora import LoraConfig, add_lora, lora_layers, lora_state_dict
from .quant import as_dtype

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def peft_config_dict(config: LoraConfig, module_names: list[str], base_model: str | None = None,
                     extra: dict | None = None) -> dict:
    """adapter_config.json contents. 'all-linear' is written as the list of suffixes it matched."""
    targets = config.targets
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": targets, "use_rslora": config.rslora, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
        "qlora_kit": {"lora": config.to_dict(), "modules": module_names, **(extra or {})},
    }


def save_adapter(model: nn.Module, out: str | Path, dtype: torch.dtype | str | None = None,
                 overwrite: bool = True, extra: dict | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters to `out` atomically, in PEFT's layout.

    dtype: tensor dtype in the file; default fp32 (the master weights, so reloading is exact).
    overwrite: replace an adapter folder qlora_kit wrote there before (never a file, another kind of
        folder, or the model's own folder), once the new one is complete.
    tensors: the adapter tensors, if not the model's own (a sharded model passes gathered ones)."""
    from safetensors.torch import save_file

    config: LoraConfig | None = getattr(model, "lora_config", None)
    layers = lora_layers(model)
    if config is None or not layers:
        raise QLoraKitError("this model has no LoRA adapters to save: call add_lora(model, ...) first")
    out = Path(out)
    refuse_overlap(out, {"model folder": getattr(model, "source_path", None)}, "adapter folder")
    check_replace(out, overwrite, is_adapter_folder, OUR_ADAPTER, flag="overwrite=True")
    dtype = as_dtype(dtype) if dtype is not None else torch.float32
    tensors = tensors if tensors is not None else lora_state_dict(model)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    base = getattr(model.config, "_name_or_path", None) or None
    quant = getattr(model, "quant_config", None)
    init = init_tensors(layers)
    info = {"quant": quant.to_dict() if quant is not None else None, **(extra or {})}
    if init:
        info["init"] = {"name": config.init, "seed": config.seed, "iters": config.init_iters, "file": INIT_FILE,
                        "base": "quant(W - scale * offset.B @ offset.A) per module; W from the base model folder"}
    cfg = peft_config_dict(config, list(layers), base, info)
    needed = sum(t.numel() * t.element_size() for t in [*tensors.values(), *init.values()])
    with disk_full_as_error(out.parent, needed, f"the adapter {out}", "free some space or choose another folder"), \
            atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if init:
            save_file({k: v.contiguous() for k, v in init.items()}, str(tmp / INIT_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return Path(out)


OUR_ADAPTER = "an adapter folder qlora_kit wrote (adapter_config.json with a 'qlora_kit' entry, and nothing else)"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, INIT_FILE)


def is_adapter_folder(folder: Path) -> bool:
    """An adapter folder `save_adapter` wrote: only those are replaced."""
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "qlora_kit" in raw and not unknown_entries(folder, ADAPTER_FILES.__contains__)


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """(LoraConfig, tensors keyed by module path, raw config dict) from a PEFT-layout folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise QLoraKitError(f"{path} is not an adapter folder: it has no {CONFIG_NAME}")
    if not (path / WEIGHTS_NAME).is_file():
        pickled = path / "adapter_model.bin"
        hint = " (it has adapter_model.bin: re-save it with safe_serialization=True)" if pickled.exists() else ""
        raise QLoraKitError(f"{path} has no {WEIGHTS_NAME}{hint}")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise QLoraKitError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise QLoraKitError(f"{path} holds a {raw.get('peft_type')} adapter; qlora_kit reads LoRA adapters only")
    for key in ("use_dora",):
        if raw.get(key):
            raise QLoraKitError(f"{path} is a DoRA adapter ({key}=true), which qlora_kit does not support")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise QLoraKitError(f"{path} uses per-module rank/alpha patterns, which qlora_kit does not support")
    ours = (raw.get("qlora_kit") or {}).get("lora") or {}
    config = LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                        targets=raw.get("target_modules") or "all-linear",
                        rslora=bool(raw.get("use_rslora", False)), dtype="auto",  # computes in the loading model's dtype
                        seed=ours.get("seed", 0), init=ours.get("init", "default"), init_iters=ours.get("init_iters", 1))
    try:
        flat = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise QLoraKitError(f"{path / WEIGHTS_NAME} is not a readable safetensors file ({e})") from None
    tensors = {}
    for key, t in flat.items():
        key = key.removeprefix(PEFT_PREFIX)
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        tensors[key] = t
    return config, tensors, raw


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT-layout adapter into `model` (adding the adapter layers if it has none yet)."""
    config, tensors, raw = read_adapter(path)
    if not lora_layers(model):
        wanted = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
        known = {name for name, _ in model.named_modules()}
        absent = [w for w in wanted if w not in known]
        if absent:
            raise QLoraKitError(f"adapter {path} does not fit this model: it adapts modules the model "
                                f"does not have: {first_few(absent)}")
        config.targets = "|".join(map(re.escape, wanted))
        add_lora(model, replace(config, init="default"))  # the tensors and init file say where it starts
        model.lora_config.init, model.lora_config.init_iters = config.init, config.init_iters
        model.lora_config.targets = sorted({n.rsplit(".", 1)[-1] for n in wanted})
    check_adapter_fits(model, tensors, path)
    current = lora_state_dict(model)
    with torch.no_grad():
        for key, t in tensors.items():
            current[key].copy_(t.to(current[key].dtype))
    restore_base(model, path, raw)
    return model


def read_init(path: str | Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{module: {"offset": (A, B), "initial": (A, B)}} for adapters whose init changed the base, else {}."""
    from safetensors.torch import load_file

    f = Path(path) / INIT_FILE
    return split_init_tensors(load_file(str(f))) if f.is_file() else {}


def restore_base(model: nn.Module, path: str | Path, raw: dict) -> None:
    """Give every adapted layer the frozen base the adapter was trained on.

    For svd/loftq adapters that is quant(W - scale * B_off @ A_off), rebuilt from the model's folder;
    for the others plain quant(W), which matters only when the model held a changed base before."""
    layers = lora_layers(model)
    states = read_init(path)
    info = (raw.get("qlora_kit") or {}).get("init") or {}
    if info and not states:
        raise QLoraKitError(f"adapter {path} was initialised with {info.get('name')!r}, which changes the base, "
                            f"but its {INIT_FILE} is missing: copy the whole adapter folder")
    changed = [n for n, layer in layers.items() if layer.init_state]
    if not states and not changed:
        return
    recorded = (raw.get("qlora_kit") or {}).get("quant", "unknown")
    quant = getattr(model, "quant_config", None)
    if states and recorded != "unknown" and not quant_matches(quant, recorded):
        raise QLoraKitError(f"adapter {path} was trained on a base quantised as {recorded} and its init "
                            f"({info.get('name')!r}) built that base from the quantisation; this model is "
                            f"quantised as {quant.to_dict() if quant else None}: load the base with the "
                            "adapter's quantisation")
    if getattr(model, "source_path", None) is None:
        raise QLoraKitError(f"adapter {path} changes the base weights ({info.get('name')!r} init), so the base must "
                            "be re-read from its folder: load the model with qlora_kit.load_model(path)")
    source = SourceWeights(model.source_path)
    missing = [n for n in states if n not in layers]
    if missing:
        raise QLoraKitError(f"adapter {path}: {INIT_FILE} names modules the model has not adapted: {first_few(missing)}")
    for name, layer in layers.items():
        if name not in states and not layer.init_state:
            continue
        state = states.get(name)
        weight = source.get(name + ".weight").to(layer.lora_A.weight.device)
        if state is None:
            zero_a, zero_b = torch.zeros_like(layer.lora_A.weight), torch.zeros_like(layer.lora_B.weight)
            rebuild_base(layer, weight, zero_a.cpu(), zero_b.cpu())
            layer.init_state = None
        else:
            rebuild_base(layer, weight, *state["offset"])
            layer.init_state = {"offset": state["offset"]}
            if state["initial"] is not state["offset"]:
                layer.init_state["initial"] = state["initial"]


def check_adapter_fits(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise a clear error naming the first mismatches between an adapter file and the model."""
    current = lora_state_dict(model)
    extra = [k for k in tensors if k not in current]
    absent = [k for k in current if k not in tensors]
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(current[k].shape)}"
              for k in tensors if k in current and tensors[k].shape != current[k].shape]
    problems = []
    if extra:
        problems.append(f"tensors for modules the model lacks: {first_few(extra, 3)}")
    if absent:
        problems.append(f"no tensors for adapted modules: {first_few(absent, 3)}")
    if shapes:
        problems.append(f"shape mismatches: {first_few(shapes, 3)}")
    if problems:
        raise QLoraKitError(f"adapter {path} does not fit this model ({'; '.join(problems)}); "
                            "was it trained on another base model or with another rank?")


def to_plain_lora(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert an svd/loftq adapter into a plain rank-2r LoRA for the ORIGINAL base weights (PEFT's
    PiSSA-to-LoRA conversion): B' = [B, -B0], A' = [A; A0], alpha doubled (sqrt 2 for rsLoRA) so the
    scale is unchanged. W + scale * B' @ A' = W + scale * (B @ A - B0 @ A0): exactly what training
    changed, added to W. Any LoRA loader (PEFT included) can apply it to the unmodified model."""
    from safetensors.torch import save_file

    out = Path(out)
    refuse_overlap(out, {"adapter folder": path}, "out")
    check_replace(out, overwrite, is_adapter_folder, OUR_ADAPTER, flag="overwrite=True")
    config, tensors, raw = read_adapter(path)
    states = read_init(path)
    if not states:
        raise QLoraKitError(f"adapter {path} did not change the base (init {config.init!r}): it is a plain LoRA "
                            "already and loads in PEFT as it is")
    merged = {}
    for name, state in states.items():
        a0, b0 = state["initial"]
        merged[f"{name}.lora_A.weight"] = torch.cat([tensors[f"{name}.lora_A.weight"], a0]).contiguous()
        merged[f"{name}.lora_B.weight"] = torch.cat([tensors[f"{name}.lora_B.weight"], -b0], dim=1).contiguous()
    plain = replace(config, r=2 * config.r, alpha=config.alpha * (2 ** 0.5 if config.rslora else 2), init="default")
    ours = raw.get("qlora_kit") or {}
    extra = {k: v for k, v in ours.items() if k not in ("lora", "modules", "init")}
    extra["converted_from"] = {"adapter": str(path), "init": config.init}
    cfg = peft_config_dict(plain, ours.get("modules") or sorted(states), raw.get("base_model_name_or_path"), extra)
    cfg["target_modules"] = raw.get("target_modules")
    needed = sum(t.numel() * t.element_size() for t in merged.values())
    with disk_full_as_error(out.parent, needed, f"the adapter {out}", "free some space or choose another folder"), \
            atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({PEFT_PREFIX + k: v for k, v in merged.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return Path(out)

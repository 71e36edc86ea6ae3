"""The adapter folder, in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

One typed record, `Adapter`, is what a folder holds (LoRA config, A/B tensors, the quantisation the
base had, the bases svd/loftq inits changed, the run facts), with its read, its write and the one
check of whether it fits a model or a base checkpoint. Saving, loading, the trainer's checkpoints,
the exporter, the rank report and the PiSSA-to-LoRA conversion all go through it.

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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapt import add_lora
from .dtypes import as_dtype
from .errors import QLoraKitError, first_few
from .inits import rebuild_base
from .io import atomic_dir, check_replace, disk_full_as_error, refuse_overlap, unknown_entries
from .lora import ChangedBase, LoraConfig, expert_loras, lora_layers, lora_state_dict
from .modeltree import linear_layer_names
from .moe import moe_experts, peft_paths
from .quant import QuantConfig
from .record import record_of
from .tensorfiles import SourceWeights, read_tensors

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INIT_FILE = "qlora_kit_init.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, INIT_FILE)
OUR_ADAPTER = "an adapter folder qlora_kit wrote (adapter_config.json with a 'qlora_kit' entry, and nothing else)"


@dataclass
class Adapter:
    """What an adapter folder holds.

    tensors: '<module path>.lora_A.weight' / '.lora_B.weight' -> tensor.
    quant: how the base was stored while the adapter trained (None: unquantised); `quant_recorded`
        is False for folders without qlora_kit's metadata (PEFT's), where nobody said.
    changed: the modules whose frozen base an svd/loftq init changed, and how.
    target_modules: the folder's PEFT `target_modules` as written (suffixes, or a regex).
    extra: facts about the run that wrote it (steps, converted_from, ...), kept under 'qlora_kit'."""

    lora: LoraConfig
    tensors: dict[str, torch.Tensor]
    quant: QuantConfig | None = None
    quant_recorded: bool = True
    changed: dict[str, ChangedBase] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None  # PEFT's, for expert adapters: ['mlp.experts.gate_up_proj', ...]
    base_model: str | None = None
    extra: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "adapter"

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})

    # ------------------------------------------------------------ from a model, to a folder

    @classmethod
    def of_model(cls, model: nn.Module, tensors: dict[str, torch.Tensor] | None = None,
                 extra: dict | None = None) -> "Adapter":
        """The model's adapters (or `tensors`, gathered from a sharded model) as a record."""
        record = record_of(model)
        layers = lora_layers(model)
        if record.lora is None or not layers:
            raise QLoraKitError("this model has no LoRA adapters to save: call add_lora(model, ...) first")
        targets = record.lora.targets
        if targets == "all-linear":
            targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
        changed = {n: layer.changed_base for n, layer in layers.items() if layer.changed_base is not None}
        # PEFT matches a target parameter by suffix: '<block>.<experts>.<param>' names it in every layer
        parameters = sorted({".".join(f"{n}.{p}".split(".")[-3:]) for n, m in moe_experts(model).items()
                             for p in m.params if m.lora(p) is not None}) or None
        return cls(record.lora, tensors if tensors is not None else lora_state_dict(model), record.quant, True,
                   changed, targets, parameters, getattr(model.config, "_name_or_path", None) or None,
                   dict(extra or {}))

    def config_dict(self) -> dict:
        """adapter_config.json's contents."""
        ours: dict = {"lora": self.lora.to_dict(), "modules": self.modules}
        ours["quant"] = self.quant.to_dict() if self.quant is not None else None
        ours.update(self.extra)
        if self.changed:
            ours["init"] = {"name": self.lora.init, "seed": self.lora.seed, "iters": self.lora.init_iters,
                            "file": INIT_FILE,
                            "base": "quant(W - scale * offset.B @ offset.A) per module; W from the base model folder"}
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
            "r": self.lora.r, "lora_alpha": self.lora.alpha, "lora_dropout": self.lora.dropout,
            "target_modules": self.target_modules, "use_rslora": self.lora.rslora, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
            **({"target_parameters": self.target_parameters} if self.target_parameters else {}), "qlora_kit": ours,
        }

    def init_tensors(self) -> dict[str, torch.Tensor]:
        """The init file's tensors: 'offset.<module>.lora_A.weight', ... (and 'initial.' ones for loftq)."""
        out = {}
        for module, changed in self.changed.items():
            kinds = {"offset": changed.offset, **({"initial": changed.initial} if changed.initial is not None else {})}
            for kind, (a, b) in kinds.items():
                out[f"{kind}.{module}.lora_A.weight"] = a.contiguous()
                out[f"{kind}.{module}.lora_B.weight"] = b.contiguous()
        return out

    def write(self, out: str | Path, overwrite: bool = True, dtype: torch.dtype | str | None = None) -> Path:
        """Write the folder atomically: nothing at `out` changes until the new folder is complete.

        dtype: tensor dtype in the file; default fp32 (the master weights, so reloading is exact).
        overwrite: replace an adapter folder qlora_kit wrote there before (never a file or another kind
            of folder), once the new one is complete."""
        out = Path(out)
        check_replace(out, overwrite, is_adapter_folder, OUR_ADAPTER, flag="overwrite=True")
        dtype = as_dtype(dtype) if dtype is not None else torch.float32
        tensors = {PEFT_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in self.tensors.items()}
        init = self.init_tensors()
        needed = sum(t.numel() * t.element_size() for t in [*tensors.values(), *init.values()])
        with disk_full_as_error(out.parent, needed, f"the adapter {out}", "free some space or choose another folder"), \
                atomic_dir(out, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if init:
                save_file(init, str(tmp / INIT_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        return out

    # ------------------------------------------------------------ from a folder

    @classmethod
    def read(cls, path: str | Path) -> "Adapter":
        """The record of a PEFT-layout folder (ours or PEFT's); a clear error for anything else."""
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
        if raw.get("use_dora"):
            raise QLoraKitError(f"{path} is a DoRA adapter (use_dora=true), which qlora_kit does not support")
        if raw.get("rank_pattern") or raw.get("alpha_pattern"):
            raise QLoraKitError(f"{path} uses per-module rank/alpha patterns, which qlora_kit does not support")
        ours = raw.get("qlora_kit") or {}
        saved = ours.get("lora") or {}
        lora = LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                          targets=raw.get("target_modules") or "all-linear",
                          rslora=bool(raw.get("use_rslora", False)), dtype="auto",  # the loading model's dtype
                          seed=saved.get("seed", 0), init=saved.get("init", "default"),
                          init_iters=saved.get("init_iters", 1), target_experts=bool(raw.get("target_parameters")))
        tensors = {}
        for key, t in read_tensors(path / WEIGHTS_NAME).items():
            key = key.removeprefix(PEFT_PREFIX)
            tensors[key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = t
        quant_recorded = "quant" in ours
        quant = QuantConfig(**ours["quant"]) if ours.get("quant") else None
        changed = read_changed(path / INIT_FILE)
        if ours.get("init") and not changed:
            raise QLoraKitError(f"adapter {path} was initialised with {ours['init'].get('name')!r}, which changes the "
                                f"base, but its {INIT_FILE} is missing: copy the whole adapter folder")
        extra = {k: v for k, v in ours.items() if k not in ("lora", "modules", "quant", "init")}
        return cls(lora, tensors, quant, quant_recorded, changed, raw.get("target_modules"),
                   raw.get("target_parameters") or None, raw.get("base_model_name_or_path"), extra, path)

    # ------------------------------------------------------------ does it fit

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A, B)}; tensors that are not LoRA A/B matrices, or half a pair, are errors."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        strange = []
        for key, t in self.tensors.items():
            for part in ("lora_A", "lora_B"):
                if key.endswith(f".{part}.weight"):
                    parts.setdefault(key.removesuffix(f".{part}.weight"), {})[part] = t
                    break
            else:
                strange.append(key)
        if strange:
            raise QLoraKitError(f"adapter {self.name} holds tensors that are not LoRA A/B matrices of linear layers "
                                f"(embedding adapters, trained biases or modules_to_save): {first_few(strange, 3)}; "
                                "qlora_kit reads lora_A/lora_B pairs only")
        half = [f"{m}: only {'lora_A' if 'lora_B' not in p else 'lora_B'} present"
                for m, p in sorted(parts.items()) if len(p) != 2]
        if half:
            raise QLoraKitError(f"adapter {self.name} is incomplete ({first_few(half, 3)}): copy the whole folder")
        if not parts:
            raise QLoraKitError(f"adapter {self.name} has no LoRA tensors")
        return {m: (p["lora_A"], p["lora_B"]) for m, p in sorted(parts.items())}

    def check_fits(self, layers: dict[str, tuple[int, ...]], what: str, rank: int | None = None,
                   every: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (A, B) pairs, after checking each fits its layer's weight shape in `layers` ({module:
        (out, in)}, or (experts, out, in) for a fused expert parameter, whose A is (r * experts) x in and
        B out x (r * experts), PEFT's layout) and, given `rank`, has that rank; `every`: each layer in
        `layers` has a pair.

        The one fit check: loading into a model, resuming a checkpoint and exporting against a base
        checkpoint's headers all use it, so a mismatch reads the same everywhere."""
        pairs = self.pairs()
        problems = []
        for module, (a, b) in pairs.items():
            shape = layers.get(module)
            experts = shape[0] if shape is not None and len(shape) == 3 else 1
            if shape is None:
                problems.append(f"{module}: the base has no {module}.weight")
            elif (len(shape) not in (2, 3) or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]
                  or a.shape[0] % experts or (b.shape[0], a.shape[1]) != tuple(shape[-2:])):
                problems.append(f"{module}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit the base weight "
                                f"{tuple(shape)}")
            elif rank is not None and a.shape[0] != rank * experts:
                problems.append(f"{module}: rank {a.shape[0]}, where {what}'s adapters have r={rank}")
        if every:
            problems += [f"{m}: no tensors for this adapted layer" for m in layers if m not in pairs]
        if problems:
            raise QLoraKitError(f"adapter {self.name} does not fit {what} ({len(problems)} problems: "
                                f"{first_few(problems, 3)}); was it trained on another base model, or with another "
                                "rank or other targets (adapters of another shape)?")
        return pairs


def read_changed(f: Path) -> dict[str, ChangedBase]:
    """{module: ChangedBase} from an init file (none when the file is absent)."""
    if not f.is_file():
        return {}
    kinds: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in read_tensors(f).items():
        kind, _, rest = key.partition(".")
        module, part = rest.removesuffix(".weight").rsplit(".", 1)
        kinds.setdefault(module, {}).setdefault(kind, {})[part] = t
    changed = {}
    for module, k in kinds.items():
        initial = k.get("initial")
        changed[module] = ChangedBase((k["offset"]["lora_A"], k["offset"]["lora_B"]),
                                      (initial["lora_A"], initial["lora_B"]) if initial else None)
    return changed


def is_adapter_folder(folder: Path) -> bool:
    """An adapter folder qlora_kit wrote: only those are replaced."""
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "qlora_kit" in raw and not unknown_entries(folder, ADAPTER_FILES.__contains__)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{module: (out, in)} of the model's linear layers, and {PEFT path: (experts, out, in)} of its fused
    expert parameters, or of its adapted ones once it has adapters."""
    layers, experts = lora_layers(model), expert_loras(model)
    if layers or experts:
        return {**{n: (m.out_features, m.in_features) for n, m in layers.items()},
                **{n: (m.experts, m.out_features, m.in_features) for n, m in experts.items()}}
    shapes: dict[str, tuple[int, ...]] = expert_shapes(model)
    for name in linear_layer_names(model):
        layer = model.get_submodule(name)
        shapes[name] = (layer.out_features, layer.in_features)
    return shapes


def expert_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{PEFT adapter path: (experts, out, in)} for every fused expert parameter of a loaded model."""
    shapes = {}
    for name, m in moe_experts(model).items():
        paths = peft_paths(name, m.params)
        shapes.update({paths[f"{name}.{p}"]: m.shapes[p] for p in m.params})
    return shapes


# ---------------------------------------------------------------- the public verbs

def save_adapter(model: nn.Module, out: str | Path, dtype: torch.dtype | str | None = None,
                 overwrite: bool = True, extra: dict | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters to `out` atomically, in PEFT's layout.

    dtype: tensor dtype in the file; default fp32 (the master weights, so reloading is exact).
    overwrite: replace an adapter folder qlora_kit wrote there before (never a file, another kind of
        folder, or the model's own folder), once the new one is complete.
    tensors: the adapter tensors, if not the model's own (a sharded model passes gathered ones)."""
    adapter = Adapter.of_model(model, tensors, extra)
    refuse_overlap(out, {"model folder": record_of(model).source}, "adapter folder")
    return adapter.write(out, overwrite, dtype)


def read_adapter(path: str | Path) -> Adapter:
    """The `Adapter` record of a PEFT-layout folder (ours or PEFT's)."""
    return Adapter.read(path)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT-layout adapter into `model` (adding the adapter layers if it has none yet)."""
    adapter = Adapter.read(path)
    fresh = not lora_layers(model) and not expert_loras(model)
    adapter.check_fits(layer_shapes(model), "this model", rank=None if fresh else record_of(model).lora.r,
                       every=not fresh)
    if fresh:
        in_experts = set(expert_shapes(model))
        wanted = [m for m in adapter.modules if m not in in_experts]
        add_lora(model, replace(adapter.lora, targets="|".join(map(re.escape, wanted)), init="default",
                                target_experts=len(wanted) < len(adapter.modules)))
        # the tensors and the init file say where it starts; the record says how it began
        record = record_of(model)
        record.lora = replace(record.lora, init=adapter.lora.init, init_iters=adapter.lora.init_iters,
                              targets=sorted({n.rsplit(".", 1)[-1] for n in wanted}))
    current = lora_state_dict(model)
    with torch.no_grad():
        for key, t in adapter.tensors.items():
            current[key].copy_(t.to(current[key].dtype))
    restore_base(model, adapter)
    return model


def restore_base(model: nn.Module, adapter: Adapter) -> None:
    """Give every adapted layer the frozen base the adapter was trained on.

    For svd/loftq adapters that is quant(W - scale * B_off @ A_off), rebuilt from the model's folder;
    for the others plain quant(W), which matters only when the model held a changed base before."""
    layers = lora_layers(model)
    record = record_of(model)
    previously = [n for n, layer in layers.items() if layer.changed_base is not None]
    if not adapter.changed and not previously:
        return
    if adapter.changed and adapter.quant_recorded and not _same_storage(record.quant, adapter.quant):
        raise QLoraKitError(f"adapter {adapter.name} was trained on a base quantised as "
                            f"{adapter.quant.to_dict() if adapter.quant else None} and its init "
                            f"({adapter.lora.init!r}) built that base from the quantisation; this model is quantised "
                            f"as {record.quant.to_dict() if record.quant else None}: load the base with the "
                            "adapter's quantisation")
    if record.source is None:
        raise QLoraKitError(f"adapter {adapter.name} changes the base weights ({adapter.lora.init!r} init), so the "
                            "base must be re-read from its folder: load the model with qlora_kit.load_model(path)")
    missing = [n for n in adapter.changed if n not in layers]
    if missing:
        raise QLoraKitError(f"adapter {adapter.name}: {INIT_FILE} names modules the model has not adapted: "
                            f"{first_few(missing)}")
    source = SourceWeights(record.source)
    for name, layer in layers.items():
        changed = adapter.changed.get(name)
        if changed is None and layer.changed_base is None:
            continue
        weight = source.get(name + ".weight").to(layer.lora_A.weight.device)
        if changed is None:
            zero_a, zero_b = torch.zeros_like(layer.lora_A.weight), torch.zeros_like(layer.lora_B.weight)
            rebuild_base(layer, weight, zero_a.cpu(), zero_b.cpu())
        else:
            rebuild_base(layer, weight, *changed.offset)
        layer.changed_base = changed


def _same_storage(a: QuantConfig | None, b: QuantConfig | None) -> bool:
    return a is None and b is None if a is None or b is None else a.same_storage(b)


def to_plain_lora(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert an svd/loftq adapter into a plain rank-2r LoRA for the ORIGINAL base weights (PEFT's
    PiSSA-to-LoRA conversion): B' = [B, -B0], A' = [A; A0], alpha doubled (sqrt 2 for rsLoRA) so the
    scale is unchanged. W + scale * B' @ A' = W + scale * (B @ A - B0 @ A0): exactly what training
    changed, added to W. Any LoRA loader (PEFT included) can apply it to the unmodified model."""
    out = Path(out)
    refuse_overlap(out, {"adapter folder": path}, "out")
    check_replace(out, overwrite, is_adapter_folder, OUR_ADAPTER, flag="overwrite=True")
    adapter = Adapter.read(path)
    if not adapter.changed:
        raise QLoraKitError(f"adapter {path} did not change the base (init {adapter.lora.init!r}): it is a plain "
                            "LoRA already and loads in PEFT as it is")
    merged = {}
    for name, changed in adapter.changed.items():
        a0, b0 = changed.start
        merged[f"{name}.lora_A.weight"] = torch.cat([adapter.tensors[f"{name}.lora_A.weight"], a0]).contiguous()
        merged[f"{name}.lora_B.weight"] = torch.cat([adapter.tensors[f"{name}.lora_B.weight"], -b0], dim=1).contiguous()
    plain = replace(adapter.lora, r=2 * adapter.lora.r, init="default",
                    alpha=adapter.lora.alpha * (2 ** 0.5 if adapter.lora.rslora else 2))
    extra = {**adapter.extra, "converted_from": {"adapter": str(path), "init": adapter.lora.init}}
    converted = replace(adapter, lora=plain, tensors=merged, changed={}, extra=extra, path=None)
    return converted.write(out, overwrite)

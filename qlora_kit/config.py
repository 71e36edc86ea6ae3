"""The run configuration: one YAML file, one dataclass per section, every field with a default.

    model:  {path: smollm2}
    data:   {train: data/train.jsonl, max_seq_len: 512}
    train:  {epochs: 3, lr: 2.0e-4}
    output: {dir: runs/my-run}

Unknown keys are errors that name the nearest valid key; values are checked for type, range and
finiteness before anything is loaded, so a typo costs a second, not a model load. Relative paths in a
YAML file (data files, output.dir, a model folder) are relative to that file. The quant and lora
sections take their keys and defaults from QuantConfig and LoraConfig: a field added there is a key here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import QLoraKitError, closest
from .fit import parse_budget
from .lora import CHANGES_BASE, LoraConfig
from .optim import DEFAULT_OPTIMIZER, OPTIMIZERS, SCHEDULES
from .preference import DPO_LOSSES, METHODS
from .quant import QuantConfig


@dataclass
class ModelSection:
    path: str = "smollm2"            # local HF folder, or 'smollm2' for the packaged demo model
    trust_remote_code: bool = False


YAML_TYPES = (bool, int, float, str, list, type(None))  # the types of value a config field takes from YAML


def _yaml_types(hint) -> tuple[type, ...]:
    """The types YAML can write of a field's type: `str | list[str]` is (str, list), `torch.dtype | str` is str."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(k for k in (typing.get_origin(k) or k for k in kinds) if k in YAML_TYPES)


def _fields_of(target: type, omit: tuple[str, ...] = (), nullable: tuple[str, ...] = ()) -> type:
    """A dataclass with the fields and defaults of `target` (less `omit`, whose values come from elsewhere),
    typed as YAML writes them; `nullable` fields may also be null. One list of fields, the target's."""
    hints = typing.get_type_hints(target)
    fields = []
    for f in dataclasses.fields(target):
        if f.name in omit:
            continue
        kinds = _yaml_types(hints[f.name]) + ((type(None),) if f.name in nullable else ())
        default = field(default_factory=f.default_factory) if f.default is dataclasses.MISSING else f.default
        fields.append((f.name, typing.Union[kinds], default))
    return dataclasses.make_dataclass(f"{target.__name__}Fields", fields, namespace={"__module__": __name__})


def _values(section) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


@dataclass
class QuantSection(_fields_of(QuantConfig, nullable=("bits",))):
    """QuantConfig's fields; `bits: null` (or `quant: null`) loads the base unquantised."""

    def build(self) -> QuantConfig | None:
        return None if self.bits is None else QuantConfig(**_values(self))


@dataclass
class LoraSection(_fields_of(LoraConfig, omit=("seed",))):
    """LoraConfig's fields; the seed that initialises the adapters is the run's train.seed."""

    def build(self, seed: int) -> LoraConfig:
        return LoraConfig(**_values(self), seed=seed)


@dataclass
class DataSection:
    train: str = ""                  # JSONL: {"text"}, {"instruction","input","output"} or {"messages"}
    eval: str | None = None          # held-out JSONL; if absent, eval_fraction of train is held out
    eval_fraction: float = 0.1
    max_seq_len: int = 512
    packing: bool | str = "auto"     # SFT: several examples a row, each attending only to itself (auto: on)
    on_bad_line: str = "error"       # or "skip" (skipped lines are counted and reported)
    max_examples: int | None = None


@dataclass
class TrainSection:
    epochs: float = 1.0
    max_steps: int | None = None     # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    optimizer: str = DEFAULT_OPTIMIZER   # one of qlora_kit.optim.OPTIMIZERS
    weight_decay: float = 0.0
    schedule: str = "cosine"         # one of qlora_kit.optim.SCHEDULES
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool | int | str = "auto"   # auto: the fewest blocks that fit memory_budget; true, false, or N
    memory_budget: int | float | str | None = None     # "12GiB", "16GB", bytes; null: a GPU's free memory, half the RAM on CPU
    fsdp: bool = False               # with several processes: shard the 4-bit weights (FSDP2), not replicate
    loss_chunk_tokens: int = 1024
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    method: str = "sft"              # sft | dpo | orpo (dpo and orpo read preference pairs, see qlora_kit.preference)
    beta: float = 0.1                # DPO's and ORPO's strength
    loss_type: str = "sigmoid"       # DPO's variant: sigmoid | ipo | hinge
    precompute_ref: bool = False     # DPO: reference log-probabilities once, before training, cached in the run


@dataclass
class OutputSection:
    dir: str = "runs/run"
    export: bool = False             # write a merged model after training (needs the exporter)
    export_dtype: str = "bfloat16"


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        t, d = self.train, self.data
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                _check(not isinstance(value, float) or math.isfinite(value), f"{section.name}.{f.name}", value,
                       "is not a finite number: write an ordinary number")
        _check(t.lr > 0, "train.lr", t.lr, "must be positive (2e-4 is usual for LoRA)")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be at least 1")
        _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be at least 1")
        _check(t.epochs > 0, "train.epochs", t.epochs, "must be positive")
        _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be at least 1")
        _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
        _check(t.eval_every >= 1 and t.save_every >= 1, "train.eval_every/save_every",
               (t.eval_every, t.save_every), "must be at least 1")
        _check(t.keep_last >= 1, "train.keep_last", t.keep_last, "must be at least 1")
        _check(t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens", t.loss_chunk_tokens, "must be at least 1")
        _check(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm,
               "must be positive or null")
        _check(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"use one of {OPTIMIZERS}")
        _check(not t.fsdp or t.optimizer == "adamw", "train.optimizer", t.optimizer,
               "cannot step sharded (FSDP) parameters: use optimizer: adamw with fsdp: true")
        _check(t.schedule in SCHEDULES, "train.schedule", t.schedule,
               f"use {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}")
        _check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device", t.device,
               "use auto, cpu or cuda")
        _check(t.gradient_checkpointing in (True, False, "auto") or type(t.gradient_checkpointing) is int
               and t.gradient_checkpointing >= 0, "train.gradient_checkpointing", t.gradient_checkpointing,
               "use auto (the fewest blocks that fit train.memory_budget), true (every block), false, or a number "
               "of blocks")
        if t.memory_budget is not None:
            try:
                budget = parse_budget(t.memory_budget)
            except QLoraKitError:
                budget = None
            _check(budget is not None, "train.memory_budget", t.memory_budget,
                   "should be a positive size such as 12GiB, 16GB or 800MiB, or a number of bytes")
        _check(t.method in METHODS, "train.method", t.method, f"use one of {', '.join(METHODS)}")
        _check(t.beta > 0, "train.beta", t.beta, "must be positive (0.1 is usual for DPO and ORPO)")
        _check(t.loss_type in DPO_LOSSES, "train.loss_type", t.loss_type, f"use one of {', '.join(DPO_LOSSES)}")
        _check(not t.precompute_ref or t.method == "dpo", "train.precompute_ref", t.precompute_ref,
               "is for method: dpo (ORPO has no reference model)")
        _check(t.method != "dpo" or t.precompute_ref or self.lora.init not in CHANGES_BASE, "train.precompute_ref",
               t.precompute_ref, f"must be true with lora.init: {self.lora.init} (its adapters start non-zero, so the "
               "reference model is the model as it starts, not the base with adapters off)")
        _check(d.packing in (True, False, "auto"), "data.packing", d.packing, "use auto, true or false")
        _check(not (t.method != "sft" and d.packing is True), "data.packing", d.packing,
               "is for method: sft (preference pairs are scored one response per sequence)")
        _check(d.max_seq_len >= 8, "data.max_seq_len", d.max_seq_len, "must be at least 8")
        _check(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
        _check(d.on_bad_line in ("error", "skip"), "data.on_bad_line", d.on_bad_line, "use error or skip")
        _check(bool(d.train), "data.train", d.train, "is required: the path of a JSONL training file")
        _check(bool(self.output.dir), "output.dir", self.output.dir, "is required: the folder to write the run to")
        self.quant.build()
        self.lora.build(t.seed)
        return self


def _check(ok: bool, key: str, value, advice: str) -> None:
    if not ok:
        raise QLoraKitError(f"config {key} = {value!r} {advice}")


def _coerce(section: str, name: str, value, cls: type):
    """Check one YAML value against its field's type; ints are accepted where floats are."""
    hint = typing.get_type_hints(cls)[name]
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise QLoraKitError(f"config {section}.{name} may not be null")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)  # YAML reads '2e-4' as a string
            except ValueError:
                pass
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool, list) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise QLoraKitError(f"config {section}.{name} = {value!r} should be {names}")


def config_from_dict(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise QLoraKitError("the config file should be a YAML mapping with sections model, quant, lora, data, "
                            "train, output")
    run = RunConfig()
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for sec_name, values in raw.items():
        if sec_name not in sections:
            raise QLoraKitError(f"unknown config section {sec_name!r}{closest(sec_name, sections)}; "
                                f"sections are {', '.join(sections)}")
        section = getattr(run, sec_name)
        if sec_name == "quant" and values is None:
            section.bits = None
            continue
        if values is None:  # 'train:' with nothing under it: every key keeps its default
            continue
        if not isinstance(values, dict):
            raise QLoraKitError(f"config section {sec_name!r} should be a mapping of keys to values")
        fields = {f.name for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in fields:
                raise QLoraKitError(f"unknown config key {sec_name}.{key}{closest(key, fields)}; "
                                    f"valid keys: {', '.join(sorted(fields))}")
            setattr(section, key, _coerce(sec_name, key, value, type(section)))
    return run.validate()


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run config. `overrides` ({"train.lr": 1e-4}) are applied as if written in the file.

    Relative paths are taken relative to the config file: output.dir always, data files and
    model.path where they exist there (else as given, relative to the current folder)."""
    path = Path(path)
    if not path.is_file():
        raise QLoraKitError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise QLoraKitError(f"{path} is not UTF-8 text (byte {path.read_bytes()[e.start]:#04x} on line {line}): "
                            "save the config as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise QLoraKitError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise QLoraKitError(f"{path} holds a YAML {type(raw).__name__}, not a mapping: write sections such as "
                            "'model:', 'data:', 'train:' at the top level")
    for dotted, value in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        current = raw.get(sec)
        if current is None and sec == "quant" and sec in raw and key != "bits":
            raise QLoraKitError(f"--set {dotted}: {path} has 'quant: null' (an unquantised base); set quant.bits "
                                "too, or remove 'quant: null'")
        if current is None:
            current = raw[sec] = {}
        if not isinstance(current, dict):
            raise QLoraKitError(f"--set {dotted}: section {sec!r} of {path} is a {type(current).__name__}, not a "
                                "mapping of keys to values")
        current[key] = value
    run = config_from_dict(raw)
    base = path.parent
    for attr in ("train", "eval"):
        value = getattr(run.data, attr)
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(run.data, attr, str(base / value))
    model = run.model.path
    if not Path(model).is_absolute() and (base / model).is_dir():
        run.model.path = str(base / model)
    out = Path(run.output.dir).expanduser()
    run.output.dir = str(out if out.is_absolute() else base / out)
    return run

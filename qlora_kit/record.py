"""What qlora_kit knows about a model it loaded or adapted, kept on the model as one typed record.

`load_model` records where the weights came from (svd/loftq inits and `load_adapter` re-read full
precision weights from there) and how the base is quantised; `add_lora` records the adapters'
config. A transformers model qlora_kit did not load has an empty record: no folder, no quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .lora import LoraConfig
from .quant import QuantConfig

ATTRIBUTE = "qlora_kit"


@dataclass
class ModelRecord:
    source: Path | None = None          # the model folder the weights were read from
    quant: QuantConfig | None = None    # how the frozen linear weights are stored (None: unquantised)
    lora: LoraConfig | None = None      # the adapters added to it, once there are some


def record_of(model: nn.Module) -> ModelRecord:
    """The model's record, attached (empty) on first use."""
    record = model.__dict__.get(ATTRIBUTE)
    if record is None:
        record = ModelRecord()
        model.__dict__[ATTRIBUTE] = record
    return record

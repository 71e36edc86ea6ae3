"""qlora_kit: QLoRA fine-tuning on one consumer GPU or a CPU.

    model, tok = qlora_kit.load_model("path/to/hf-model", quant=qlora_kit.QuantConfig(bits=4))
    qlora_kit.add_lora(model, qlora_kit.LoraConfig(r=16, alpha=32))
    ...train...
    qlora_kit.save_adapter(model, "out/adapter")
    merged = qlora_kit.merge_lora(model)          # small models, in memory
    qlora_kit.export_merged("path/to/hf-model", "out/adapter", "out/merged")   # any size, streamed

The flow is one way: load (quantise) -> add adapters -> train -> save adapter -> merge/export.
"""

from .adapters import load_adapter, read_adapter, save_adapter  # noqa: E402
from .errors import QLoraKitError  # noqa: E402
from .export import export_merged  # noqa: E402
from .loading import load_model, set_gradient_checkpointing  # noqa: E402
from .lora import (LoraConfig, LoraLinear, add_lora, lora_delta, lora_layers, lora_state_dict,  # noqa: E402
                   merge_lora, merged_state_dict, trainable_parameters)
from .models import smollm2_path  # noqa: E402
from .quant import QuantConfig, QuantLinear  # noqa: E402

__all__ = [
    "QuantConfig", "LoraConfig", "QLoraKitError",
    "load_model", "add_lora", "set_gradient_checkpointing",
    "save_adapter", "load_adapter", "read_adapter", "export_merged",
    "merge_lora", "merged_state_dict", "lora_delta", "lora_layers", "lora_state_dict",
    "trainable_parameters", "smollm2_path", "QuantLinear", "LoraLinear",
]
__version__ = "0.1.0"

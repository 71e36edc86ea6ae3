"""Tokenizers in the GGUF file: SentencePiece (Llama 2 / Mistral / Gemma style tokenizer.model) and the
errors for tokenizers the export cannot carry; byte-level BPE is covered by test_gguf.py and
test_gguf_archs.py. Where llama_cpp is installed, llama.cpp tokenizes as the original tokenizer does."""

import json
import shutil

import pytest
from gguf import GGUFReader, TokenType

from qlora_kit import QLoraKitError, export_gguf
from test_gguf_archs import fields, peft_adapter
from tiny import make_sentencepiece_tokenizer

QUIET = dict(progress=False)
TEXTS = ["hello world, the quick brown fox 123", "  two spaces\tand\nlines", "ünïcödé and emoji 🙂"]


def with_tokenizer(tiny_dirs, tmp_path, arch, kind):
    """A copy of the tiny `arch` model whose tokenizer is a SentencePiece one of `kind`."""
    base = tmp_path / f"{arch}-{kind}"
    shutil.copytree(tiny_dirs(arch), base)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / f).unlink(missing_ok=True)
    make_sentencepiece_tokenizer(base, kind)
    return base


@pytest.fixture(scope="module")
def spm_exports(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-spm")
    made = {}

    def get(arch, kind):
        if (arch, kind) not in made:
            base = with_tokenizer(tiny_dirs, root, arch, kind)
            out = root / f"{arch}-{kind}-out" / "exported.gguf"
            out.parent.mkdir()
            report = export_gguf(base, peft_adapter(base, root / f"{arch}-{kind}-adapter"), out, verify=False, **QUIET)
            made[arch, kind] = base, out, report
        return made[arch, kind]

    return get


@pytest.mark.parametrize("arch,kind", [("llama", "llama"), ("gemma", "gemma")])
def test_sentencepiece_vocabulary(spm_exports, arch, kind):
    import sentencepiece as spm

    base, path, report = spm_exports(arch, kind)
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    meta = fields(path)
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in meta
    assert report["tokenizer"] == {"model": "llama", "pre": None, "tokens": 320}
    tokens, scores, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    assert tokens == [sp.IdToPiece(i) for i in range(320)]
    assert scores == pytest.approx([sp.GetScore(i) for i in range(320)])
    assert types[0] == TokenType.UNKNOWN and types[1] == types[2] == TokenType.CONTROL
    assert types[tokens.index("<0x41>")] == TokenType.BYTE
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 3)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    # SentencePiece's dummy prefix: Llama 2 adds one ("hi" -> "▁hi"), Gemma does not
    assert meta["tokenizer.ggml.add_space_prefix"] is (kind == "llama")
    if kind == "gemma":  # the turn markers, whole tokens for llama.cpp, and the end of a turn stops generation
        assert types[tokens.index("<end_of_turn>")] == TokenType.CONTROL
        assert meta["tokenizer.ggml.eot_token_id"] == tokens.index("<end_of_turn>")
        assert "<start_of_turn>" in meta["tokenizer.chat_template"]
    else:
        assert "[INST]" in meta["tokenizer.chat_template"]


@pytest.mark.parametrize("arch,kind", [("llama", "llama"), ("gemma", "gemma")])
def test_llama_cpp_tokenizes_as_sentencepiece(spm_exports, arch, kind):
    llama_cpp = pytest.importorskip("llama_cpp")
    import sentencepiece as spm

    base, path, _ = spm_exports(arch, kind)
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert model.tokenize(text.encode(), add_bos=True) == [1] + sp.encode(text)
    if kind == "gemma":
        assert model.tokenize(b"<end_of_turn>", add_bos=False, special=True) == [sp.PieceToId("<end_of_turn>")]


def test_qwen2_with_a_sentencepiece_tokenizer(tiny_dirs, tmp_path):
    """Once a KeyError: the vocabulary kind does not depend on the architecture. transformers rebuilds a
    Qwen2 GGUF's vocabulary as BPE, so verify checks the logits and leaves the tokenizer to llama.cpp."""
    from qlora_kit.export import format_gguf_report

    base = with_tokenizer(tiny_dirs, tmp_path, "qwen2", "llama")
    (tmp_path / "out").mkdir()
    report = export_gguf(base, peft_adapter(base, tmp_path / "a"), tmp_path / "out" / "m.gguf", **QUIET)
    assert report["tokenizer"]["model"] == "llama" and report["verify"]["logit_rel_error"] < 2e-3
    assert "SentencePiece vocabulary copied from tokenizer.model" in format_gguf_report(report)
    llama_cpp = pytest.importorskip("llama_cpp")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    model = llama_cpp.Llama(model_path=report["out"], vocab_only=True, verbose=False)
    for text in TEXTS:
        assert model.tokenize(text.encode(), add_bos=True) == [1] + sp.encode(text)


def test_byte_level_bpe_names_its_pre_tokenizer_for_llama_cpp(tiny_dirs, tmp_path):
    """Our tiny tokenizer splits as GPT-2 does; llama.cpp knows that split as "gpt-2"."""
    base = tiny_dirs("qwen2")
    export_gguf(base, peft_adapter(base, tmp_path / "a"), tmp_path / "m.gguf", verify=False, **QUIET)
    meta = fields(tmp_path / "m.gguf")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert len(meta["tokenizer.ggml.merges"]) > 0 and meta["tokenizer.ggml.eot_token_id"] == 2


@pytest.mark.parametrize("split", ["llama-bpe", "qwen2", "smollm"])
def test_byte_level_splits_llama_cpp_knows_by_name(tiny_dirs, tmp_path, split):
    """Llama 3's and Qwen2's regex splits and SmolLM's digit split, recognised from tokenizer.json's
    structure whatever the vocabulary, and llama.cpp then tokenizes as transformers does."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    base = tmp_path / "base"
    shutil.copytree(tiny_dirs("llama"), base)
    spec = json.loads((base / "tokenizer.json").read_text())
    if split == "smollm":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    else:
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS[split]}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (base / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "out" / "exported.gguf"
    out.parent.mkdir()
    report = export_gguf(base, peft_adapter(base, tmp_path / "a"), out, verify=False, **QUIET)
    assert report["tokenizer"]["pre"] == split == fields(out)["tokenizer.ggml.pre"]
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = AutoTokenizer.from_pretrained(str(base))
    model = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in TEXTS + ["In 1984, 12345 apples cost $6.78.", "it's   what's\n\n  done"]:
        assert model.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("damage,message", [
    ("no tokenizer", "has neither tokenizer.json nor tokenizer.model"),
    ("sentencepiece json only", "no tokenizer.model; copy the original model's tokenizer.model"),
    ("wordpiece", "tokenizer is WordPiece without a byte-level pre-tokenizer"),
    ("unknown split", "is not one the GGUF export can name for llama.cpp"),
    ("too many tokens", "the tokenizer has 320 tokens but the model embeds only 300"),
])
def test_tokenizers_it_cannot_carry_are_clear_errors(tiny_dirs, tmp_path, damage, message):
    base = tmp_path / "base"
    shutil.copytree(tiny_dirs("llama"), base)
    adapter = peft_adapter(base, tmp_path / "a")
    spec = json.loads((base / "tokenizer.json").read_text())
    if damage == "no tokenizer":
        (base / "tokenizer.json").unlink()
    elif damage == "sentencepiece json only":
        (base / "tokenizer.json").unlink()
        make_sentencepiece_tokenizer(base, "llama")
        (base / "tokenizer.model").unlink()
    elif damage == "wordpiece":
        spec["model"] = {"type": "WordPiece", "vocab": spec["model"]["vocab"], "unk_token": "<|endoftext|>"}
        spec["pre_tokenizer"] = {"type": "Whitespace"}
        (base / "tokenizer.json").write_text(json.dumps(spec))
    elif damage == "unknown split":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        (base / "tokenizer.json").write_text(json.dumps(spec))
    else:
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps(config | {"vocab_size": 300}))
    with pytest.raises(QLoraKitError, match=message):
        export_gguf(base, adapter, tmp_path / "m.gguf", **QUIET)

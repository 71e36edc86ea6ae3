"""GGUF export: transformers reads the file back with the merged model's logits and the same tokenizer."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import qlora_kit.export.gguf as gguf_export
from qlora_kit import QLoraKitError, QuantConfig, export_gguf, export_merged
from qlora_kit.cli import main as cli_main
from test_export import trained_adapter

QUIET = dict(progress=False)
TEXTS = ["the quick brown fox, 42 times!", "  spaces\tand\nlines ", "<|im_start|>user\nhello<|im_end|>\n", "ünïcödé 🙂"]
# Relative Frobenius error of the logits against the fp32 merge. f16 keeps 11 significant bits and
# bf16 8 (measured on the tiny models: 7e-4 and 6e-3); q8_0 rounds each weight to 1/127 of its
# block's largest (measured 2.3e-2 on tiny random weights of std 0.1, 2.1e-2 on SmolLM2).
TOLERANCE = {"f16": 2e-3, "bf16": 1.5e-2, "q8_0": 5e-2}


def logits_of(model, vocab=320):
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def load_folder(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(tiny_dirs, tmp_path_factory):
    """One trained-looking adapter (non-zero B) per architecture, with its fp32 safetensors export."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(arch):
        if arch not in made:
            base = tiny_dirs(arch)
            trained_adapter(base, root / f"{arch}-adapter")
            export_merged(base, root / f"{arch}-adapter", root / f"{arch}-merged", dtype="fp32", verify=False, **QUIET)
            made[arch] = base, root / f"{arch}-adapter", root / f"{arch}-merged"
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "llama-tied"])
def test_f16_gguf_reads_back_as_the_merged_model(adapters, tmp_path, arch):
    base, adapter, merged = adapters(arch)
    report = export_gguf(base, adapter, tmp_path / "m.gguf", **QUIET)
    assert report["verify"]["logit_rel_error"] < TOLERANCE["f16"]
    assert rel(logits_of(load_gguf(tmp_path / "m.gguf")), logits_of(load_folder(merged))) < TOLERANCE["f16"]

    names = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) == (arch != "llama-tied")  # llama.cpp ties by leaving it out
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert names["blk.1.ffn_down.weight"].tensor_type == Q.F16 and names["output_norm.weight"].tensor_type == Q.F32
    assert report["architecture"] == ("qwen2" if arch == "qwen2" else "llama")


@pytest.mark.parametrize("bits", [4, 8])
def test_gguf_of_an_adapter_trained_in_each_dtype(tiny_dir, tmp_path, bits, any_dtype):
    dtype = any_dtype
    """The base the adapter trained on (quantised from the compute dtype) is the one written to the GGUF."""
    trained_adapter(tiny_dir, tmp_path / "a", quant=QuantConfig(bits=bits, compute_dtype=dtype))
    export_merged(tiny_dir, tmp_path / "a", tmp_path / "merged", dtype="fp32", verify=False, **QUIET)
    report = export_gguf(tiny_dir, tmp_path / "a", tmp_path / "m.gguf", **QUIET)
    assert report["verify"]["logit_rel_error"] < TOLERANCE["f16"]
    assert rel(logits_of(load_gguf(tmp_path / "m.gguf")), logits_of(load_folder(tmp_path / "merged"))) < TOLERANCE["f16"]


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_bf16_and_q8_0_within_their_rounding(adapters, tmp_path, gguf_type):
    base, adapter, merged = adapters("llama")
    report = export_gguf(base, adapter, tmp_path / "m.gguf", gguf_type=gguf_type, **QUIET)
    error = rel(logits_of(load_gguf(tmp_path / "m.gguf")), logits_of(load_folder(merged)))
    assert error < TOLERANCE[gguf_type] and report["verify"]["logit_rel_error"] < TOLERANCE[gguf_type]

    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "m.gguf").tensors}
    want = Q.BF16 if gguf_type == "bf16" else Q.Q8_0
    assert types["token_embd.weight"] == want and types["blk.0.attn_q.weight"] == want
    assert types["blk.0.attn_norm.weight"] == Q.F32
    # the tiny model's intermediate size 88 is not a multiple of q8_0's 32-weight blocks
    assert types["blk.0.ffn_down.weight"] == (Q.F16 if gguf_type == "q8_0" else Q.BF16)
    assert report["f16_fallbacks"] == (["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"] if gguf_type == "q8_0" else [])
    if gguf_type == "q8_0":  # half the bytes of f16 for the quantised matrices
        assert report["out_bytes"] < 0.7 * export_gguf(base, adapter, tmp_path / "f16.gguf", verify=False,
                                                       **QUIET)["out_bytes"]


def test_llama_q_and_k_are_permuted_for_llama_cpp(adapters, tmp_path, monkeypatch):
    """Without the rotary reordering the file loads but computes another model: the check must see it."""
    base, adapter, _ = adapters("llama")
    monkeypatch.setattr(gguf_export, "to_llama_cpp", lambda tensor, w, config: w)
    report = export_gguf(base, adapter, tmp_path / "m.gguf", **QUIET)
    assert report["verify"]["logit_rel_error"] > 50 * TOLERANCE["f16"]


def test_tokenizer_and_chat_template_round_trip(adapters, tmp_path):
    from transformers import AutoTokenizer

    base, adapter, _ = adapters("llama-tied")
    export_gguf(base, adapter, tmp_path / "m.gguf", verify=False, **QUIET)
    ours = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    theirs = AutoTokenizer.from_pretrained(str(base))
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|pad|>")
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)

    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 320
    assert fields["llama.attention.head_count_kv"].contents() == 2 and fields["llama.block_count"].contents() == 2


def test_tensors_are_streamed_one_at_a_time(adapters, tmp_path, monkeypatch):
    """GGUFWriter.add_tensor would keep every array until the end; only infos, then data one by one."""
    import gguf

    base, adapter, _ = adapters("llama")
    written = []
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda *a, **k: pytest.fail("add_tensor buffers the model"))
    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                        lambda self, t, **k: (written.append(t.nbytes), original(self, t, **k))[1])
    report = export_gguf(base, adapter, tmp_path / "m.gguf", verify=False, **QUIET)
    assert len(written) == report["tensors"] == 21


def test_failed_export_leaves_nothing_and_existing_file_is_kept(adapters, tmp_path, monkeypatch):
    base, adapter, _ = adapters("llama")
    out = tmp_path / "m.gguf"
    out.write_text("previous")
    with pytest.raises(QLoraKitError, match="already exists"):
        export_gguf(base, adapter, out, **QUIET)
    with pytest.raises(QLoraKitError, match="is not a GGUF file qlora_kit wrote"):  # not ours: never replaced
        export_gguf(base, adapter, out, overwrite=True, **QUIET)
    assert out.read_text() == "previous"
    out.unlink()
    export_gguf(base, adapter, out, verify=False, **QUIET)
    previous = out.read_bytes()
    calls = []

    def failing(w, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk gone")
        return original(w, qtype)

    original = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing)
    with pytest.raises(OSError, match="disk gone"):
        export_gguf(base, adapter, out, overwrite=True, verify=False, **QUIET)
    assert out.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(gguf_type="q4_k"), "use one of f16, bf16, q8_0"),
    (dict(gguf_type="q8"), "did you mean 'q8_0'"),
    (dict(merge_into="merged"), "'dequantized' or 'original'"),
])
def test_bad_arguments(adapters, tmp_path, kwargs, message):
    base, adapter, _ = adapters("llama")
    with pytest.raises(QLoraKitError, match=message):
        export_gguf(base, adapter, tmp_path / "m.gguf", **kwargs, **QUIET)
    with pytest.raises(QLoraKitError, match="ending in .gguf"):
        export_gguf(base, adapter, tmp_path / "folder", **QUIET)


def test_unsupported_architecture_names_the_supported_ones(adapters, tmp_path):
    base, adapter, _ = adapters("llama")
    other = tmp_path / "phi"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "falcon_h1"}))
    with pytest.raises(QLoraKitError, match=r"cannot write 'falcon_h1' models to GGUF: .*supports llama, mistral, "
                                            r"mixtral, .*olmo2; export to safetensors"):
        export_gguf(other, adapter, tmp_path / "m.gguf", **QUIET)


def test_cli_gguf_export_and_its_errors(adapters, tmp_path, capsys):
    base, adapter, _ = adapters("llama")
    args = ["export", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m.gguf"),
            "--format", "gguf"]
    assert cli_main(args + ["--gguf-type", "q4_0"]) == 2
    assert "use one of f16, bf16, q8_0" in capsys.readouterr().err
    assert cli_main(args + ["--dtype", "fp16"]) == 2
    assert "--gguf-type" in capsys.readouterr().err
    assert cli_main(args + ["--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "qlora_kit GGUF export" in out and "tokenizer ids identical" in out
    assert (tmp_path / "m.gguf").is_file()


@pytest.mark.slow
def test_smollm2_gguf_reads_back_with_matching_logits(smollm2_dir, tmp_path):
    """The real model: tied embeddings, 30 layers, 9/3 heads, a 49152-token BPE vocabulary, ChatML."""
    from transformers import AutoTokenizer

    # recorded as trained on the unquantised base, so the check's reference is a plain fp32 load (the
    # NF4 merge base is shared with the safetensors export and tested there)
    trained_adapter(smollm2_dir, tmp_path / "a", quant=None, r=16, alpha=32, extra={"quant": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_gguf(smollm2_dir, tmp_path / "a", tmp_path / "smollm2.gguf", **QUIET)
    assert report["adapted_modules"] == 210 and report["tensors"] == 272 and report["merge_into"] == "original"
    assert report["verify"]["logit_rel_error"] < TOLERANCE["f16"]
    ours = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smollm2.gguf")
    theirs = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_smollm2_gguf_answers_chat_in_llama_cpp(smollm2_dir, tmp_path, gguf_type):
    """The real model in the real client: the chat template, EOS/EOT and the merged weights together
    give the same greedy answer in llama.cpp as the merged model gives in transformers."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from test_gguf_archs import merged_logits, peft_adapter

    # a small trained-looking delta: the answer must survive it, and the merge must be in the file
    adapter = peft_adapter(smollm2_dir, tmp_path / "a", modules=("q_proj", "v_proj"), r=8, b_std=2e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_merged(smollm2_dir, adapter, tmp_path / "merged", dtype="fp32", verify=False, **QUIET)
        report = export_gguf(smollm2_dir, adapter, tmp_path / f"smollm2-{gguf_type}.gguf", gguf_type=gguf_type,
                             verify=False, **QUIET)
    # the cached folder's tokenizer (transformers' conversion of the packaged GGUF) is a plain GPT-2
    # ByteLevel split, digits in runs: llama.cpp must split as that tokenizer does, not as upstream SmolLM2's
    assert report["tokenizer"]["pre"] == "gpt-2"
    llm = llama_cpp.Llama(model_path=report["out"], n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    answer = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=24, temperature=0.0)["choices"][0]
    print(f"SmolLM2 {gguf_type} in llama.cpp: {answer['message']['content']!r}")
    assert "Paris" in answer["message"]["content"] and answer["finish_reason"] == "stop"

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour of the sky."}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    for text in TEXTS + ["In 1984, 12345 apples cost $6.78."]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    llm.reset()
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    reference = merged_logits(tmp_path / "merged", ids)
    error = rel(ours, reference)
    print(f"SmolLM2 {gguf_type}: llama.cpp vs merged model, relative logit error {error:.2e}")
    # measured 1.6e-3 (f16) and 5.7e-2 (q8_0: llama.cpp also rounds the activations to 8 bits in its q8_0 matmuls)
    assert error < (3e-2 if gguf_type == "f16" else 1e-1)
    assert int(ours[-1].argmax()) == int(reference[-1].argmax())

"""K-quant GGUF from llama.cpp's own quantiser, checked in llama.cpp; held-out perplexity in the reports.

Compute dtype: the adapters are trained on an NF4 base quantised from fp32 (test_export's Q4), and every
reference runs in fp32."""

import json
import re
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from qlora_kit import QLoraKitError, export_gguf, export_merged
from qlora_kit.cli import main as cli_main
from qlora_kit.export import format_gguf_report, llamacpp
from qlora_kit.export.heldout import load_heldout, run_eval_file
from test_export import trained_adapter

QUIET = dict(progress=False)
# K-quants fill 256-weight super-blocks along each row: the tiny model is widened so every matrix has
# whole ones (hidden 256, intermediate 512; vocab 320 rows of 256).
WIDE = dict(hidden=256, intermediate=512, heads=4, kv_heads=2)
# (type of most matrices, type of the output matrix) as llama.cpp chooses them: the _M mixes keep the
# output matrix (and some attn_v / ffn_down) at Q6_K.
EXPECTED = {"q4_k_m": (Q.Q4_K, Q.Q6_K), "q5_k_m": (Q.Q5_K, Q.Q6_K), "q6_k": (Q.Q6_K, Q.Q6_K)}
# Relative error of llama.cpp's logits against the fp32 merged model in transformers on 48 tokens.
# Measured on the wide tiny model: f16 1.9e-3, q8_0 4.6e-2, q6_k 0.14, q5_k_m 0.24, q4_k_m 0.47. Its
# random weights (std 0.1) amplify weight error about tenfold into the logits (q8_0's is about 4e-3);
# SmolLM2's trained weights do not (README). Logits unrelated to the reference would be about 1.4.
TOLERANCE = {"q4_k_m": 0.65, "q5_k_m": 0.35, "q6_k": 0.2, "f16": 3e-3}
RECORDS = [{"messages": [{"role": "user", "content": "what is the capital of france?"},
                         {"role": "assistant", "content": "paris is the capital of france."}]},
           {"text": "the quick brown fox jumps over the lazy dog"},
           {"instruction": "say hello", "output": "hello, how are you today?"}] * 4


@pytest.fixture(scope="module")
def wide(tiny_dirs, tmp_path_factory):
    """The wide tiny Llama, an adapter trained-looking on its NF4 (fp32) base, and the fp32 merged folder."""
    root = tmp_path_factory.mktemp("kquant")
    base = tiny_dirs("llama", **WIDE)
    trained_adapter(base, root / "adapter")
    export_merged(base, root / "adapter", root / "merged", dtype="fp32", verify=False, eval_file=False, **QUIET)
    return base, root / "adapter", root / "merged"


def merged_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


IDS = torch.randint(0, 320, (48,), generator=torch.Generator().manual_seed(7)).tolist()


# ---------------------------------------------------------------- without llama.cpp

def test_k_quant_without_the_extra_names_it(wide, tmp_path, monkeypatch):
    base, adapter, _ = wide
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    assert not llamacpp.available()
    with pytest.raises(QLoraKitError, match=r"needs llama.cpp.*pip install 'qlora_kit\[gguf\]'.*13 minutes"):
        export_gguf(base, adapter, tmp_path / "m.gguf", gguf_type="q4_k_m", **QUIET)
    assert list(tmp_path.iterdir()) == []  # refused before any merging


def test_unknown_type_lists_the_valid_ones(wide, tmp_path):
    base, adapter, _ = wide
    with pytest.raises(QLoraKitError, match=r"'q4_k_x' \(did you mean 'q4_k_.'\?\): use one of f16, bf16, q8_0, "
                                            r"q2_k, q3_k_m, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k"):
        export_gguf(base, adapter, tmp_path / "m.gguf", gguf_type="Q4_K_X", **QUIET)


def test_heldout_perplexity_in_the_reports(wide, tmp_path, monkeypatch):
    """Adapter on its NF4 base and the merged model score the same tokens alike; the GGUF is measured in
    llama.cpp where it is installed and the report says why not where it is not."""
    base, adapter, _ = wide
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    heldout = load_heldout(data, base, max_tokens=100)
    assert heldout.tokens == 100 and heldout.records == len(RECORDS) and len(heldout.examples) < len(RECORDS)

    report = export_merged(base, adapter, tmp_path / "merged", dtype="fp32", verify=False, eval_file=data, **QUIET)
    h = report["heldout"]
    assert h["data"]["max_tokens"] == 4096 and h["data"]["examples"] == len(RECORDS)
    # the merge is exact up to fp32 rounding; a random tiny model is far from its data (vocab 320)
    assert abs(h["merged"] / h["adapter"] - 1) < 1e-4 and 10 < h["adapter"] < 10_000
    assert "perplexity on" in (tmp_path / "merged" / "report.txt").read_text()

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    report = export_gguf(base, adapter, tmp_path / "m.gguf", verify=False, eval_file=data, **QUIET)
    assert report["heldout"]["gguf"] is None and "qlora_kit[gguf]" in report["heldout"]["gguf_skipped"]
    assert "not measured" in format_gguf_report(report)


def test_a_bad_eval_file_fails_before_merging(wide, tmp_path):
    base, adapter, _ = wide
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"prompt": "a preference pair?"}\n')
    for bad, message in ((tmp_path / "missing.jsonl", "does not exist"), (tmp_path / "bad.jsonl", "line 2")):
        with pytest.raises(QLoraKitError, match=message):
            export_gguf(base, adapter, tmp_path / "m.gguf", eval_file=bad, **QUIET)
    assert not (tmp_path / "m.gguf").exists()


def test_the_runs_eval_file_is_found(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "eval.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (run / "run.json").write_text(json.dumps({"config": {"data": {"eval": "eval.jsonl"}}, "fingerprint": {}}))
    assert run_eval_file(run / "adapter") == run / "eval.jsonl"
    dpo = {"data": {"eval": "eval.jsonl"}, "train": {"method": "dpo"}}  # its eval file holds preference pairs
    (run / "run.json").write_text(json.dumps({"config": dpo, "fingerprint": {}}))
    assert run_eval_file(run / "adapter") is None
    (run / "run.json").write_text(json.dumps({"config": {"data": {"eval": None}}, "fingerprint": {}}))
    assert run_eval_file(run / "adapter") is None and run_eval_file(tmp_path) is None


# ---------------------------------------------------------------- in llama.cpp

@pytest.mark.parametrize("gguf_type", list(EXPECTED))
def test_k_quant_from_llama_cpp_runs_close_to_the_merged_model(wide, tmp_path, gguf_type):
    pytest.importorskip("llama_cpp")
    base, adapter, merged = wide
    out = tmp_path / "m.gguf"
    report = export_gguf(base, adapter, out, gguf_type=gguf_type, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the f16 source is gone

    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    main, kept = EXPECTED[gguf_type]
    assert types["blk.0.attn_q.weight"] == main and types["blk.1.ffn_up.weight"] == main
    assert types["output.weight"] == kept and types["blk.0.attn_norm.weight"] == Q.F32
    f16_bytes = report["quantised_from"]["bytes"]
    assert report["gguf_type"] == gguf_type and report["out_bytes"] == out.stat().st_size < 0.5 * f16_bytes

    with llamacpp.LlamaCpp(out, n_ctx=64) as model:
        error = rel(torch.from_numpy(model.logits(IDS)), merged_logits(merged, IDS))
    assert error < TOLERANCE[gguf_type], error
    assert report["verify"]["llama_cpp"]["logit_rel_error"] < TOLERANCE[gguf_type]
    assert report["verify"]["logit_rel_error"] < TOLERANCE["f16"]  # the f16 source, read by transformers
    assert f"{gguf_type} in llama.cpp vs the merged f16 file" in format_gguf_report(report)


def test_f16_in_llama_cpp_and_heldout_perplexity_of_the_gguf(wide, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    base, adapter, merged = wide
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    report = export_gguf(base, adapter, tmp_path / "m.gguf", verify=False, eval_file=data, **QUIET)
    with llamacpp.LlamaCpp(tmp_path / "m.gguf", n_ctx=64) as model:
        assert rel(torch.from_numpy(model.logits(IDS)), merged_logits(merged, IDS)) < TOLERANCE["f16"]
    h = report["heldout"]
    assert abs(h["gguf"] / h["merged"] - 1) < 1e-2  # f16 storage moves perplexity by well under 1%

    # the same through the CLI, as a K-quant (spelt as llama.cpp does)
    assert cli_main(["export", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "q.gguf"),
                     "--format", "gguf", "--gguf-type", "Q4_K_M", "--eval-file", str(data)]) == 0
    out = capsys.readouterr().out
    assert "q4_k_m in llama.cpp vs the merged f16 file" in out and "quantised by llama.cpp from a" in out
    ppl = {name: float(value) for name, value in
           re.findall(r"^ +(adapter on the quantised base|merged model|the GGUF file in llama.cpp)\b.* ([\d.]+)$",
                      out, re.M)}
    assert ppl["merged model"] == pytest.approx(h["merged"], rel=1e-4)
    assert abs(ppl["the GGUF file in llama.cpp"] / h["merged"] - 1) < 0.2  # K-quant loss, not a broken file


def test_rows_not_filling_super_blocks_fall_back_and_the_report_says_so(tiny_dirs, tmp_path):
    """The usual tiny model (hidden 64, intermediate 88): llama.cpp stores what it cannot K-quantise as
    Q5_0 / Q8_0 (rows of 64) or F16 (rows of 88, not even whole 32-weight blocks), and the file still runs."""
    pytest.importorskip("llama_cpp")
    base = tiny_dirs("llama")
    trained_adapter(base, tmp_path / "a")
    report = export_gguf(base, tmp_path / "a", tmp_path / "m.gguf", gguf_type="q4_k_m", eval_file=False, **QUIET)
    fallbacks = report["k_fallbacks"]
    assert fallbacks["blk.0.attn_q.weight"] == "Q5_0" and fallbacks["blk.0.ffn_down.weight"] == "F16"
    assert len(fallbacks) == 16  # every matrix: 7 per layer, the embedding and the output
    assert "fallback:   16 matrices" in format_gguf_report(report)
    assert report["verify"]["llama_cpp"]["logit_rel_error"] < 0.3  # measured 0.17 (Q5_0 and better)


def test_failed_quantisation_leaves_nothing(wide, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    base, adapter, _ = wide

    def failing(src, dst, gguf_type, threads=None):
        assert src.is_file()  # the f16 source lies beside the target while llama.cpp reads it
        raise QLoraKitError("llama.cpp could not quantise")

    monkeypatch.setattr(llamacpp, "quantize", failing)
    with pytest.raises(QLoraKitError, match="could not quantise"):
        export_gguf(base, adapter, tmp_path / "m.gguf", gguf_type="q6_k", verify=False, **QUIET)
    assert list(tmp_path.iterdir()) == []

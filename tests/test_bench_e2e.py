"""The benchmarks' smoke tests. benchmarks/e2e_7b.py on a tiny checkpoint: its tokenizer feeds the trainer
exactly the planned token ids, the load prediction adds up, and the report (table, figure) handles finished
and stopped phases. benchmarks/vs_trl.py and vs_recipe.py's real-data preset, a few steps on the real
SmolLM2 (slow): both sides present, losses finite, TRL's gradient check reported, real tokens counted."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import e2e_7b  # noqa: E402
from qlora_kit.data import build_dataset, prepare_tokenizer, read_jsonl  # noqa: E402
from qlora_kit.loading import load_tokenizer_from  # noqa: E402

SHAPE = dict(hidden=64, layers=1, heads=4, intermediate=128, vocab=300)


def test_text_becomes_the_planned_token_ids(tmp_path):
    folder = e2e_7b.with_tokenizer(e2e_7b.write_checkpoint(tmp_path / "ckpt", **SHAPE), SHAPE["vocab"])
    rows = e2e_7b.token_rows(SHAPE["vocab"], seq=16, rows=3)
    data = e2e_7b.write_data(tmp_path / "train.jsonl", rows)
    tokenizer = prepare_tokenizer(load_tokenizer_from(folder))
    dataset = build_dataset(read_jsonl(data), tokenizer, max_seq_len=16)
    assert [ids for ids, _ in dataset.examples] == rows
    assert [labels for _, labels in dataset.examples] == rows          # every token is trained
    assert dataset.stats.truncated == 0
    assert tokenizer.pad_token_id != tokenizer.eos_token_id

    plan = e2e_7b.plan({"model": str(folder), "seq": 16, "compute_dtype": "float32"})
    load = e2e_7b.predict_load(plan, folder)
    c = plan.components
    assert load["parts"]["static"] == c["quantized_weights"] + c["quant_constants"] + c["unquantized_weights"]
    assert load["total"] == sum(load["parts"].values())


def results(phases: dict) -> dict:
    return {"preset": "small", "machine": {"cpus": 2, "memory_gib": 23.5, "fast_dtype": "float32"},
            "settings": {"seq": 128, "steps": 3, "rss_cap_gib": 21.0, "ref_compute_dtype": "float32"},
            "phases": phases}


def test_table_and_figure_show_finished_and_stopped_phases(tmp_path):
    gib = e2e_7b.GIB
    phases = {
        "ours-load": {"status": "ok", "peak_rss": 5 * gib, "wall_s": 300.0, "predicted": 5.5 * gib, "error": 0.1,
                      "compute_dtype": "torch.float32"},
        "ours-train": {"status": "ok", "peak_rss": 6 * gib, "wall_s": 1200.0, "predicted": 6.15 * gib,
                       "error": 0.025, "s_per_step": 300.0, "floor_ratio": 1.7, "compute_dtype": "torch.float32"},
        "ref-merge": {"status": "rss_cap", "peak_rss": 21.2 * gib, "wall_s": 400.0},
        "ref-train": {"status": "failed", "peak_rss": 2 * gib, "wall_s": 10.0, "log_tail": "Traceback"},
    }
    text = e2e_7b.table(results(phases))
    lines = text.splitlines()
    assert len(lines) == 1 + len(phases)
    assert "+10.0%" in lines[1] and "1.70" in lines[2] and "float32" in lines[2]
    assert "~21.20" in lines[3] and "killed at RSS cap" in lines[3]
    assert "failed" in lines[4]
    assert "killed at 21.20 GiB RSS after 400 s" in e2e_7b.describe("ref-merge", phases["ref-merge"])
    e2e_7b.plot(results(phases), tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the peers, on the real model

BENCH = Path(__file__).parents[1] / "benchmarks"


def _run_bench(script: str, out: Path, *args: str) -> tuple[dict, str]:
    """Run a benchmark as a user would (its own children included): its results.json and its printout."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow
def test_vs_trl_scores_both_sides_and_checks_trl_gradients(tmp_path):
    import math

    # 3 steps: transformers' warm-up gives step 1 a learning rate of 0, so lora_B first moves at step 2
    # and lora_A's gradient is checked at step 3
    results, printed = _run_bench("vs_trl.py", tmp_path, "--max-steps", "3", "--heldout", "2", "--answer-tokens", "4",
                                  "--dtype", "fp32")
    assert set(results["sides"]) == {"qlora_kit", "trl"} and "AVX" in results["cpu"]
    for side, figures in results["sides"].items():
        assert figures["steps"] == 3 and figures["real_tokens"] > 0 and figures["tokens_per_s"] > 0, side
        assert figures["peak_rss_mib"] > 100 and math.isfinite(figures["heldout_loss_after"]), side
        assert len(results["raw"][side]["losses"]) == 3 and all(map(math.isfinite, results["raw"][side]["losses"]))
    assert math.isfinite(results["heldout"]["base"]["heldout_loss"]) and 0 <= results["heldout"]["base"]["format"] <= 1
    gradients = results["raw"]["trl"]["gradients"]
    assert gradients["lora_B_step1"]["layers"] == 30 * 7                 # SmolLM2: 30 blocks x 7 projections
    assert gradients["lora_A_after_B_moved"]["at_steps"] == [3]
    assert isinstance(gradients["broken"], bool) and isinstance(results["raw"]["trl"]["gemv_4bit_warned"], bool)
    # a broken peer gets no ratios, and says so
    assert (results["ratios"] is None) == results["trl_broken"]
    assert ("peer not training correctly" in printed) == results["trl_broken"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_vs_recipe_real_data_packs_ours_and_counts_real_tokens(tmp_path):
    import math

    results, _ = _run_bench("vs_recipe.py", tmp_path, "--preset", "smollm2-trivia", "--steps", "2", "--warmup", "1",
                            "--batch", "4", "--dtype", "fp32", "--ref-dtype", "fp32", "--loss-rtol", "0.05")
    ours, ref = results["raw"]["qlora_kit"], results["raw"]["reference"]
    assert ours["tokens"] == ref["tokens"] and all(n > 0 for n in ours["tokens"])  # the same real tokens
    assert all(n < 4 * 128 for n in ours["tokens"])                                   # padding is not counted
    for side in results["summary"].values():
        assert side["tokens_per_s"] > 0 and math.isfinite(side["loss_first"])
    assert abs(results["summary"]["qlora_kit"]["loss_first"] - results["summary"]["reference"]["loss_first"]) < 0.05 * \
        results["summary"]["reference"]["loss_first"]
    # ours checkpoints as the trainer's 'auto' decides; the recipe every block, as it is written
    assert results["summary"]["reference"]["checkpointed_blocks"] == "30/30"
    assert results["summary"]["qlora_kit"]["checkpointed_blocks"].endswith("/30")

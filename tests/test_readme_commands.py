"""The README's commands, run as a user would (the slow ones against the packaged SmolLM2)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_lists_the_two_commands_and_ci_calls_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_plan_command_from_readme():
    out = run("qlora_kit.cli", "plan", "llama-3.1-8b", "--batch", "2", "--seq-len", "2048", "--gpu-gb", "16")
    assert out.returncode == 0, out.stderr
    assert re.search(r"RTX 3090/4090 24GB .* fits", out.stdout) and "your GPU 16GB" in out.stdout


def test_generate_with_tiny_model(tiny_dir):
    out = run("qlora_kit.cli", "generate", "--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert ">>> hello" in out.stdout


def test_generate_reports_missing_model_cleanly(tmp_path):
    out = run("qlora_kit.cli", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_quick_trains_and_exports(tmp_path):
    """The main job's code path, shortened to a few steps: before/after table, phase times, adapter, export."""
    out = run("qlora_kit.demo", "--quick", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    loss = re.search(r"\| loss on the reference answers \| ([\d.]+) \| ([\d.]+) \|", out.stdout)
    assert loss and float(loss.group(2)) < float(loss.group(1))
    assert re.search(r"\| format: reply is exactly .* \| \d+% \| \d+% \|", out.stdout)
    assert re.search(r"Wall time: ask before \d+ s, train \d+ s, ask after \d+ s, export \d+ s, total", out.stdout)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert len(summary["answers"]) == 4 and summary["before"]["n"] == 4 and summary["peak_memory"]["rss_mib"] > 0
    assert (tmp_path / "demo" / "summary.md").read_text().strip() in out.stdout
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "merged" / "report.json").is_file()


@pytest.mark.slow
def test_demo_quick_dpo_learns_from_the_base_models_own_replies(tmp_path):
    """The preference path of the main job, shortened: held-out reward margin and accuracy in the summary."""
    out = run("qlora_kit.demo", "--quick", "--method", "dpo", "--no-export", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| DPO loss on the held-out pairs |" in out.stdout and "| reward margin, chosen - rejected |" in out.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["reward"]["before"]["margin"] == pytest.approx(0.0, abs=1e-6)
    pairs = (tmp_path / "demo" / "data" / "train.jsonl").read_text().splitlines()
    assert 0 < len(pairs) <= 16 and all(json.loads(p)["rejected"][0]["role"] == "assistant" for p in pairs)


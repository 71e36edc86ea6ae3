"""The training loop end to end on a tiny model: learning, files, refusals, kill-and-resume, NaN, 2 processes."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_kit import QLoraKitError
from qlora_kit.config import config_from_dict
from qlora_kit.dtypes import dtype_name
from qlora_kit.trainer import MAX_SKIPPED_IN_A_ROW, train

ROOT = Path(__file__).resolve().parents[1]


def write_data(path: Path, n: int = 48) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                             {"role": "assistant", "content": f"it is {i + 1}"}]}) + "\n")
    return path


def make_config(tmp_path, model_dir, compute_dtype="fp32", **train_overrides):
    raw = {
        "model": {"path": str(model_dir)},
        "quant": {"compute_dtype": compute_dtype},
        "lora": {"r": 4, "dropout": 0.1},
        "data": {"train": str(write_data(tmp_path / "data.jsonl")), "max_seq_len": 48, "eval_fraction": 0.125},
        "train": {"max_steps": 8, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "eval_every": 4,
                  "save_every": 2, "keep_last": 2, "seed": 0, **train_overrides},
        "output": {"dir": str(tmp_path / "run")},
    }
    return raw


def write_yaml(tmp_path, raw, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


@pytest.mark.parametrize("bits", [4, 8])
def test_run_learns_and_writes_everything(tmp_path, tiny_dir, bits, any_dtype):
    raw = make_config(tmp_path, tiny_dir, dtype_name(any_dtype), max_steps=10, eval_every=5)
    raw["quant"]["bits"] = bits
    result = train(config_from_dict(raw), progress=False)
    run = result.run_dir
    assert result.eval_after < result.eval_before - 0.5
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert {"loss", "lr", "tokens_per_s", "mem_mb"} <= rows[0].keys() and "eval_ppl" in rows[4]
    # fp16 alone scales the loss, and says so in every row
    assert ("loss_scale" in rows[0]) == (any_dtype == torch.float16)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["qlora_kit"]["quant"]["compute_dtype"] \
        == dtype_name(any_dtype)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008", "step-0000010"]
    assert not any(p.name.startswith(".tmp") for p in run.rglob("*"))


def test_output_folder_refusals(tmp_path, tiny_dir):
    raw = make_config(tmp_path, tiny_dir, max_steps=2)
    train(config_from_dict(raw), progress=False)
    with pytest.raises(QLoraKitError, match="already holds a run"):
        train(config_from_dict(raw), progress=False)
    other = dict(raw, lora={"r": 8})
    with pytest.raises(QLoraKitError, match="cannot resume"):
        train(config_from_dict(other), resume=True, progress=False)
    train(config_from_dict(other), overwrite=True, progress=False)  # explicit overwrite is allowed
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(QLoraKitError, match="holds no qlora_kit run"):
        train(config_from_dict(dict(raw, output={"dir": str(stranger)})), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_dir, monkeypatch):
    import qlora_kit.trainer as tr

    real = tr.causal_lm_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, n = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), n) if calls["n"] > 5 else (loss, n)

    monkeypatch.setattr(tr, "causal_lm_loss", flaky)
    raw = make_config(tmp_path, tiny_dir, max_steps=8, eval_every=100, save_every=2)
    raw["data"]["eval_fraction"] = 0.0
    with pytest.raises(QLoraKitError, match=r"loss became nan at step 6.*step-0000004"):
        train(config_from_dict(raw), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-0000004" / "adapter").is_dir()
    assert not (tmp_path / "run" / "checkpoints" / "step-0000006").exists()


def kill_after(config: Path, checkpoint: Path) -> None:
    """Train `config` in a child process, steps slowed down, and SIGKILL it a step or two after
    `checkpoint` appears: mid-run, between checkpoints."""
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.cli", "train", str(config), "--no-progress"],
                            cwd=ROOT, env={**os.environ, "QLORA_KIT_STEP_DELAY": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_dir):
    """A run killed with SIGKILL mid-training and resumed ends with the same adapter, bit for bit."""
    raw = make_config(tmp_path, tiny_dir, max_steps=12, save_every=3, eval_every=6)
    raw["output"]["dir"] = str(tmp_path / "straight")
    straight = write_yaml(tmp_path, raw, "straight.yaml")
    raw["output"]["dir"] = str(tmp_path / "killed")
    killed = write_yaml(tmp_path, raw, "killed.yaml")

    done = cli("train", str(straight), "--no-progress", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    target = tmp_path / "killed" / "checkpoints" / "step-0000006"
    kill_after(killed, target)  # into step 7 or 8
    assert target.exists() and not (tmp_path / "killed" / "adapter").exists()
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 6

    resumed = cli("train", str(killed), "--resume", "--no-progress", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stdout
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(r)["step"] for r in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_cli_reports_bad_config_cleanly(tmp_path, tiny_dir):
    raw = make_config(tmp_path, tiny_dir)
    raw["train"]["lr"] = -1
    out = cli("train", str(write_yaml(tmp_path, raw)))
    assert out.returncode == 2 and "train.lr" in out.stderr and "Traceback" not in out.stderr
    raw["train"]["lr"] = 1e-3
    (tmp_path / "empty.jsonl").write_text("")
    raw["data"]["train"] = str(tmp_path / "empty.jsonl")
    out = cli("train", str(write_yaml(tmp_path, raw)))
    assert out.returncode == 2 and "no examples" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_match_one_with_double_accumulation(tmp_path, tiny_dir):
    """Data-parallel with 2 CPU processes (gloo) = 1 process with twice the gradient accumulation."""
    raw = make_config(tmp_path, tiny_dir, max_steps=4, grad_accum=1, eval_every=100, save_every=100,
                      optimizer="adamw", batch_size=2)
    raw["lora"]["dropout"] = 0.0  # per-process dropout streams differ by design
    raw["output"]["dir"] = str(tmp_path / "two")
    two = write_yaml(tmp_path, raw, "two.yaml")
    raw["train"]["grad_accum"] = 2
    raw["output"]["dir"] = str(tmp_path / "one")
    one = write_yaml(tmp_path, raw, "one.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    dist = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "qlora_kit.cli",
                           "train", str(two), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert dist.returncode == 0, dist.stderr[-3000:]
    single = cli("train", str(one), "--no-progress", timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    loss = lambda d: [json.loads(r)["loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    l1, l2 = loss("one"), loss("two")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a - b) / a < 1e-3, (l1, l2)  # fp32 sums in another order; bf16 matmuls per process
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_plan_is_printed_and_a_run_that_cannot_fit_warns(tmp_path, tiny_dir, monkeypatch, capsys):
    import qlora_kit.fit as fit

    monkeypatch.setattr(fit, "free_memory", lambda device: 1024)  # 1 KiB free
    raw = make_config(tmp_path, tiny_dir, max_steps=1)
    with pytest.warns(UserWarning, match="planned to need"):
        train(config_from_dict(raw), progress=False)
    assert "memory plan:" in capsys.readouterr().out


def _torchrun(config: Path, *extra, port: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "qlora_kit.cli",
                           "train", str(config), "--no-progress", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_fsdp_shards_the_4bit_weights_trains_like_one_process_and_resumes(tmp_path, tiny_dir):
    """FSDP2 over 2 CPU processes: each holds half the packed weights, the losses match one process
    with twice the accumulation, and a run stopped at step 2 and resumed ends where a straight run ends."""
    raw = make_config(tmp_path, tiny_dir, max_steps=4, eval_every=100, save_every=2, optimizer="adamw",
                      batch_size=2, schedule="constant", fsdp=True)
    raw["lora"]["dropout"] = 0.0
    raw["output"]["dir"] = str(tmp_path / "fsdp")
    fsdp = write_yaml(tmp_path, raw, "fsdp.yaml")
    raw["output"]["dir"] = str(tmp_path / "fsdp-resumed")
    resumed_cfg = write_yaml(tmp_path, raw, "fsdp-resumed.yaml")
    raw["train"].update(grad_accum=2, fsdp=False)
    raw["output"]["dir"] = str(tmp_path / "one")
    one = write_yaml(tmp_path, raw, "one.yaml")

    out = _torchrun(fsdp, port=29531)
    assert out.returncode == 0, out.stderr[-3000:]
    held = re.search(r"holds ([\d,]+) of ([\d,]+) bytes of packed", out.stdout)
    local, full = (int(g.replace(",", "")) for g in held.groups())
    assert full > 0 and abs(local - full / 2) <= 0.01 * full
    single = cli("train", str(one), "--no-progress", timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    loss = lambda d: [json.loads(r)["loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(loss("one"), loss("fsdp")):
        assert abs(a - b) / a < 1e-3, (loss("one"), loss("fsdp"))

    first = _torchrun(resumed_cfg, "--set", "train.max_steps=2", port=29532)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _torchrun(resumed_cfg, "--resume", port=29533)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 2" in again.stdout
    a = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fsdp-resumed" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_train_takes_a_dict_with_the_yaml_sections(tmp_path, tiny_dir):
    raw = make_config(tmp_path, tiny_dir, max_steps=2, eval_every=2, save_every=2)
    result = train(raw, progress=False)
    assert result.steps == 2 and (result.adapter_dir / "adapter_config.json").is_file()
    with pytest.raises(QLoraKitError, match="did you mean"):
        train({**raw, "trian": {}}, progress=False)


# ---------------------------------------------------------------- fp16: dynamic loss scaling

def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def scaled_loss_at(monkeypatch, factor: float, steps: set[int]):
    """Multiply the training loss by `factor` at the given (1-based) optimiser steps: 1e30 makes every
    fp16 activation gradient overflow in the backward pass, inf makes the loss itself overflow."""
    import qlora_kit.trainer as tr
    from qlora_kit.losses import causal_lm_loss as real

    calls = {"n": 0}

    def loss(model, *a, **k):
        value, n = real(model, *a, **k)
        if model.training:
            calls["n"] += 1
            if calls["n"] in steps:
                return value * factor, n
        return value, n

    monkeypatch.setattr(tr, "causal_lm_loss", loss)


def test_fp16_training_tracks_fp32(tmp_path, tiny_dir):
    """Same data, seed and initial adapter: fp16 compute with loss scaling follows the fp32 run. fp16 keeps
    11 significant bits (eps 2^-10), so every forward pass differs by ~1e-3 relative; over 12 steps of
    lr 5e-3 the losses stay within 2%."""
    losses = {}
    for dtype in ("fp32", "fp16"):
        raw = make_config(tmp_path, tiny_dir, dtype, max_steps=12, eval_every=100, save_every=100, schedule="constant")
        raw["lora"]["dropout"] = 0.0
        raw["data"]["eval_fraction"] = 0.0
        raw["output"]["dir"] = str(tmp_path / dtype)
        train(raw, progress=False)
        losses[dtype] = [r["loss"] for r in rows_of(tmp_path / dtype)]
    skipped = [r["step"] for r in rows_of(tmp_path / "fp16") if r["skipped"]]
    assert skipped == [], skipped  # the initial scale 2^16 does not overflow on this model
    for a, b in zip(losses["fp32"], losses["fp16"]):
        assert abs(a - b) / a < 2e-2, (losses["fp32"], losses["fp16"])
    assert losses["fp16"][-1] < losses["fp16"][0] - 0.5  # and it learns


@pytest.mark.parametrize("factor", [1e30, float("inf")], ids=["gradient-overflow", "loss-overflow"])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, tiny_dir, monkeypatch, capsys, factor):
    scaled_loss_at(monkeypatch, factor, {3})
    raw = make_config(tmp_path, tiny_dir, "fp16", max_steps=6, eval_every=100, save_every=2)
    raw["data"]["eval_fraction"] = 0.0
    result = train(raw, progress=False)
    rows = rows_of(result.run_dir)
    assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]
    assert rows[2]["loss_scale"] == rows[1]["loss_scale"] / 2 and rows[-1]["skipped_steps"] == 1
    assert all(math.isfinite(t.abs().max()) for t in load_file(result.adapter_dir / "adapter_model.safetensors").values())
    assert "skipped 1 of 6 steps" in capsys.readouterr().out


def test_fp16_resume_restores_the_loss_scale_exactly(tmp_path, tiny_dir, monkeypatch):
    """An overflow before the checkpoint lowers the scale; the resumed run must carry that scale on."""
    scaled_loss_at(monkeypatch, 1e30, {2})
    raw = make_config(tmp_path, tiny_dir, "fp16", max_steps=6, eval_every=100, save_every=3, schedule="constant")
    raw["data"]["eval_fraction"] = 0.0
    raw["output"]["dir"] = str(tmp_path / "straight")
    train(raw, progress=False)
    scaled_loss_at(monkeypatch, 1e30, {2})
    raw["output"]["dir"] = str(tmp_path / "resumed")
    train({**raw, "train": {**raw["train"], "max_steps": 3}}, progress=False)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == 2.0 ** 15 and state["loss_scale"]["skipped"] == 1
    train(raw, resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss_scale"] for r in rows_of(tmp_path / "resumed")] == [r["loss_scale"] for r in rows_of(tmp_path / "straight")]


def test_stopped_and_resumed_run_equals_a_straight_run(tmp_path, tiny_dir, monkeypatch, any_dtype):
    """Resume in every compute dtype (in-process; the SIGKILL test above covers a hard kill in fp32)."""
    fp16 = any_dtype == torch.float16
    raw = make_config(tmp_path, tiny_dir, dtype_name(any_dtype), max_steps=6, eval_every=100, save_every=3,
                      schedule="constant")
    raw["data"]["eval_fraction"] = 0.0
    for out, steps in (("straight", 6), ("resumed", 3)):
        if fp16:
            scaled_loss_at(monkeypatch, 1e30, {2})  # an overflow before the checkpoint: the scale must carry on
        raw["output"]["dir"] = str(tmp_path / out)
        train({**raw, "train": {**raw["train"], "max_steps": steps}}, progress=False)
    train(raw, resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows_of(tmp_path / "resumed")] == [r["loss"] for r in rows_of(tmp_path / "straight")]


def test_fp16_stops_after_many_overflows_in_a_row(tmp_path, tiny_dir, monkeypatch):
    scaled_loss_at(monkeypatch, float("inf"), set(range(4, 100)))
    raw = make_config(tmp_path, tiny_dir, "fp16", max_steps=60, eval_every=100, save_every=2)
    raw["data"]["eval_fraction"] = 0.0
    with pytest.raises(QLoraKitError, match=rf"{MAX_SKIPPED_IN_A_ROW} fp16 steps in a row overflowed .*step-0000026"):
        train(raw, progress=False)


def test_bf16_nan_loss_still_stops(tmp_path, tiny_dir, monkeypatch):
    scaled_loss_at(monkeypatch, float("nan"), {3})
    raw = make_config(tmp_path, tiny_dir, "bf16", max_steps=6, eval_every=100, save_every=2)
    raw["data"]["eval_fraction"] = 0.0
    with pytest.raises(QLoraKitError, match=r"loss became nan at step 3.*step-0000002"):
        train(raw, progress=False)


def test_auto_checkpointing_takes_the_fewest_blocks_that_fit_the_budget(tmp_path, tiny_dir, monkeypatch, capsys):
    """gradient_checkpointing: auto (the default) with a budget between the plans of one and of no
    checkpointed block: the trainer checkpoints one block of two, says so in its plan line, and
    trains; with room to spare it checkpoints none."""
    import qlora_kit.trainer as trainer
    from qlora_kit.plan import plan_memory
    from qlora_kit.quant import QuantConfig

    chosen = []
    real = trainer.set_gradient_checkpointing
    monkeypatch.setattr(trainer, "set_gradient_checkpointing", lambda model, on: (chosen.append(on), real(model, on)))
    raw = make_config(tmp_path, tiny_dir, max_steps=2)
    quant = QuantConfig(compute_dtype=torch.float32)
    from qlora_kit.config import config_from_dict as parse
    lora = parse(raw).lora.build(0)
    plans = [plan_memory(tiny_dir, quant, lora, batch=4, seq_len=48, gradient_checkpointing=k, device="cpu").total
             for k in range(3)]
    assert plans[0] > plans[1] > plans[2]
    raw["train"]["memory_budget"] = (plans[0] + plans[1]) // 2
    result = train(config_from_dict(raw), progress=False)
    out = capsys.readouterr().out
    assert "ckpt 1/2" in out and "checkpointing 1 of 2 blocks, the fewest that fit" in out, out
    assert chosen == [1] and result.history and all(math.isfinite(row["loss"]) for row in result.history if "loss" in row)
    raw["train"]["memory_budget"] = "1TiB"
    train(config_from_dict(raw), overwrite=True, progress=False)
    assert "checkpointing 0 of 2 blocks" in capsys.readouterr().out and chosen == [1, 0]

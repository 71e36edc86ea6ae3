"""train.method: dpo and orpo through the same trainer on a tiny model: metrics under TRL's names,
held-out margins, the loss plot, exact resume with precomputed references, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import QLoraKitError, QuantConfig, load_adapter, load_model
from qlora_kit.config import config_from_dict
from qlora_kit.trainer import train

PAIRS = 40


def write_pairs(path: Path, n: int = PAIRS, same_at: int | None = None) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            rejected = f"it is {i + 1}" if i == same_at else f"maybe {i + 7}, or so"
            f.write(json.dumps({"prompt": f"what is {i} plus one?", "chosen": f"it is {i + 1}",
                                "rejected": rejected}) + "\n")
    return path


def make_config(tmp_path, model_dir, method="dpo", **train_overrides) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "quant": {"compute_dtype": "fp32"},
        "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl")), "max_seq_len": 48, "eval_fraction": 0.2},
        "train": {"method": method, "beta": 0.1, "max_steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 3,
                  "save_every": 3, "schedule": "constant", "seed": 0, **train_overrides},
        "output": {"dir": str(tmp_path / "run")},
    }


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


TRL_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"]


@pytest.mark.parametrize("method, loss_type", [("dpo", "sigmoid"), ("dpo", "ipo"), ("orpo", "sigmoid")])
def test_preference_run_logs_trl_metrics_and_held_out_margins(tmp_path, tiny_dir, method, loss_type):
    result = train(make_config(tmp_path, tiny_dir, method, loss_type=loss_type), progress=False)
    rows = result.history  # metrics.jsonl's rows, and the held-out row before the first step
    assert rows[1:] == rows_of(result.run_dir)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6 and all(all(k in r for k in TRL_NAMES) for r in steps)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all(f"eval_{k}" in r for r in evals for k in TRL_NAMES)
    if method == "dpo":
        # before any step the policy is the reference: every reward is zero
        assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert all("nll_loss" not in r for r in steps)
    else:
        assert all("nll_loss" in r and "log_odds_ratio" in r for r in steps)
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]  # it learns the preference
    assert (result.run_dir / "loss.png").stat().st_size > 0
    model, _ = load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), progress=False)
    load_adapter(model, result.adapter_dir)  # an ordinary adapter folder


def test_dpo_with_precomputed_references_resumes_exactly(tmp_path, tiny_dir):
    raw = make_config(tmp_path, tiny_dir, "dpo", precompute_ref=True, eval_every=100)
    for out, steps in (("straight", 6), ("resumed", 3)):
        raw["output"]["dir"] = str(tmp_path / out)
        train({**raw, "train": {**raw["train"], "max_steps": steps}}, progress=False)
    cached = load_file(tmp_path / "resumed" / "ref_logps.safetensors")
    assert cached["train"].shape == (32, 2) and cached["eval"].shape == (8, 2)
    train(raw, resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows_of(tmp_path / "resumed")] == [r["loss"] for r in rows_of(tmp_path / "straight")]

    (tmp_path / "resumed" / "ref_logps.safetensors").unlink()
    with pytest.raises(QLoraKitError, match="ref_logps.safetensors is missing"):
        train({**raw, "train": {**raw["train"], "max_steps": 9}}, resume=True, progress=False)


def test_precomputed_and_in_step_references_agree(tmp_path, tiny_dir):
    """The reference of a default-init adapter is the base either way: the same run, the same adapter."""
    raw = make_config(tmp_path, tiny_dir, "dpo", eval_every=100, max_steps=3)
    adapters = []
    for precompute in (False, True):
        raw["output"]["dir"] = str(tmp_path / f"pre-{precompute}")
        result = train({**raw, "train": {**raw["train"], "precompute_ref": precompute}}, progress=False)
        adapters.append(load_file(result.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])


def test_bad_preference_data_names_file_and_line(tmp_path, tiny_dir):
    raw = make_config(tmp_path, tiny_dir)
    write_pairs(tmp_path / "pairs.jsonl", same_at=5)
    with pytest.raises(QLoraKitError, match=r"pairs.jsonl, line 6: 'chosen' and 'rejected' are the same"):
        train(raw, progress=False)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(QLoraKitError, match=r"sft.jsonl, line 1: a preference pair needs 'prompt', 'chosen' and"):
        train({**raw, "data": {**raw["data"], "train": str(sft)}}, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes, needle", [
    ({"train": {"method": "ppo"}}, "train.method = 'ppo' use one of sft, dpo, orpo"),
    ({"train": {"method": "dpo", "beta": 0}}, "train.beta = 0.0 must be positive"),
    ({"train": {"method": "dpo", "loss_type": "kto"}}, "train.loss_type = 'kto' use one of sigmoid, ipo, hinge"),
    ({"train": {"method": "orpo", "precompute_ref": True}}, "is for method: dpo"),
    ({"train": {"method": "dpo"}, "lora": {"init": "svd"}}, "must be true with lora.init: svd"),
    ({"train": {"method": "orpo"}, "data": {"packing": True}}, "is for method: sft"),
])
def test_preference_config_errors(tmp_path, changes, needle):
    raw = {"model": {"path": "m"}, "data": {"train": "pairs.jsonl"}}
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(QLoraKitError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(raw).validate()


@pytest.mark.parametrize("fsdp, precompute, port", [(False, False, 29541), (True, True, 29542)])
def test_preference_over_two_processes_matches_one(tmp_path, tiny_dir, fsdp, precompute, port):
    """DDP and FSDP2 over 2 CPU processes: the same DPO losses and held-out margins as one process
    with twice the accumulation (the reference pass and the cache included)."""
    import yaml
    from test_train import _torchrun, cli

    raw = make_config(tmp_path, tiny_dir, "dpo", max_steps=3, eval_every=3, save_every=3, optimizer="adamw",
                      batch_size=2, fsdp=fsdp, precompute_ref=precompute)
    raw["output"]["dir"] = str(tmp_path / "two")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    raw["train"].update(grad_accum=2, fsdp=False)
    raw["output"]["dir"] = str(tmp_path / "one")
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(raw))
    two = _torchrun(tmp_path / "two.yaml", port=port)
    assert two.returncode == 0, two.stderr[-3000:]
    one = cli("train", str(tmp_path / "one.yaml"), "--no-progress", timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    for a, b in zip(rows_of(tmp_path / "one"), rows_of(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-3, abs=1e-5)
    assert rows_of(tmp_path / "one")[-1]["eval_rewards/margins"] == pytest.approx(
        rows_of(tmp_path / "two")[-1]["eval_rewards/margins"], rel=1e-3, abs=1e-5)


def test_dpo_killed_with_sigkill_and_resumed_is_bit_identical(tmp_path, tiny_dir):
    """Precomputed references, LoRA dropout on: a DPO run killed mid-training ends, once resumed, with the
    same adapter as a straight run, bit for bit."""
    import yaml
    from test_train import cli, kill_after

    raw = make_config(tmp_path, tiny_dir, "dpo", precompute_ref=True, max_steps=8, save_every=4, eval_every=4)
    raw["lora"]["dropout"] = 0.1
    for name in ("straight", "killed"):
        raw["output"]["dir"] = str(tmp_path / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    done = cli("train", str(tmp_path / "straight.yaml"), "--no-progress", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    target = tmp_path / "killed" / "checkpoints" / "step-0000004"
    kill_after(tmp_path / "killed.yaml", target)  # into step 5 or 6
    assert target.exists() and not (tmp_path / "killed" / "adapter").exists()
    resumed = cli("train", str(tmp_path / "killed.yaml"), "--resume", "--no-progress", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows_of(tmp_path / "killed")] == list(range(1, 9))

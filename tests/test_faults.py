"""A user's work is never lost: every mistake and fault ends in one line of ours, with nothing deleted.

Each test names the folder or file a user cares about, snapshots it, provokes the fault, and checks
that it is byte-identical afterwards, that the message is a single QLoraKitError line (for the CLI:
one 'qlora-kit CMD: error:' line on stderr, exit 2), and that no traceback was printed.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import qlora_kit.checkpoints as checkpoints
from qlora_kit import LoraConfig, QLoraKitError, QuantConfig, add_lora, export_gguf, export_merged, load_model
from qlora_kit import save_adapter
from qlora_kit.cli import main as cli_main
from qlora_kit.config import config_from_dict, load_config
from qlora_kit.data import DataStats, read_jsonl
from qlora_kit.generation import generate
from qlora_kit.io import sweep_stale, tmp_path as tmp_name
from qlora_kit.trainer import train
from test_export import KILL_SCRIPT, trained_adapter

ROOT = Path(__file__).resolve().parents[1]
FP32 = QuantConfig(compute_dtype=torch.float32)
QUIET = dict(progress=False)


# ---------------------------------------------------------------- helpers

def snapshot(path: Path) -> dict:
    """Every file under `path` (or `path` itself) with its bytes: equal snapshots are identical trees."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    return message


def api_error(fn, *args, **kwargs) -> str:
    with pytest.raises(QLoraKitError) as e:
        fn(*args, **kwargs)
    return one_line(str(e.value))


def cli_error(capsys, *argv) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one error line of ours on stderr."""
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("qlora-kit ")]
    assert len(ours) == 1 and ": error: " in ours[0], err
    return ours[0]


def cli_process(*args, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, **kw)


def write_data(path: Path, n: int = 24) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                             {"role": "assistant", "content": f"it is {i + 1}"}]}) + "\n")
    return path


def run_config(folder: Path, model_dir: Path, out: Path, **train_keys) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "quant": {"compute_dtype": "fp32"},
        "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": str(write_data(folder / "data.jsonl")), "max_seq_len": 48, "eval_fraction": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-3, "save_every": 1, "keep_last": 2, "seed": 0,
                  **train_keys},
        "output": {"dir": str(out)},
    }


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def nan_loss_from(monkeypatch, step: int):
    """The training loss becomes NaN from optimiser step `step` on (1-based, one micro-batch per step)."""
    import qlora_kit.trainer as tr
    from qlora_kit.losses import causal_lm_loss

    calls = {"n": 0}

    def loss(model, *a, **k):
        value, n = causal_lm_loss(model, *a, **k)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= step:
                return value * float("nan"), n
        return value, n

    monkeypatch.setattr(tr, "causal_lm_loss", loss)


@pytest.fixture(scope="module")
def finished(tiny_dirs, tmp_path_factory):
    """One finished 2-step run (checkpoints step-1 and step-2, adapter, metrics), copied by each test."""
    root = tmp_path_factory.mktemp("finished")
    raw = run_config(root, tiny_dirs("llama"), root / "run")
    train(raw, **QUIET)
    return root / "run"


@pytest.fixture
def run_copy(finished, tiny_dir, tmp_path):
    """(run folder, its YAML config) in this test's own folder."""
    shutil.copytree(finished, tmp_path / "run")
    raw = run_config(tmp_path, tiny_dir, tmp_path / "run")
    return tmp_path / "run", write_yaml(tmp_path / "run.yaml", raw), raw


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A model folder of the user's own, that no test may change."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "my-model"))


# ---------------------------------------------------------------- train --overwrite destroys nothing

def test_overwrite_with_a_typo_in_the_data_path_keeps_the_previous_run(run_copy, capsys):
    run, config, raw = run_copy
    before = snapshot(run)
    raw["data"]["train"] = str(config.parent / "dta.jsonl")
    line = cli_error(capsys, "train", str(write_yaml(config, raw)), "--overwrite", "--no-progress")
    assert line == f"qlora-kit train: error: data file {config.parent / 'dta.jsonl'} does not exist"
    assert snapshot(run) == before and [p.name for p in config.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["is", "inside"])
def test_overwrite_never_touches_the_model_folder(model_copy, tmp_path, capsys, where):
    before = snapshot(model_copy)
    out = model_copy if where == "is" else model_copy / "runs" / "x"
    raw = run_config(tmp_path, model_copy, out)
    line = cli_error(capsys, "train", str(write_yaml(tmp_path / "run.yaml", raw)), "--overwrite")
    relation = "is" if where == "is" else "lies inside"
    assert line == (f"qlora-kit train: error: output.dir {out} {relation} the model folder {model_copy}, which is "
                    "being read: write to a place outside it")
    assert snapshot(model_copy) == before


def test_overwrite_never_replaces_a_folder_of_the_users(tiny_dir, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    before = snapshot(mine)
    raw = run_config(tmp_path, tiny_dir, mine)
    line = cli_error(capsys, "train", str(write_yaml(tmp_path / "run.yaml", raw)), "--overwrite")
    assert line == (f"qlora-kit train: error: output folder {mine} is not empty and holds no qlora_kit run: choose "
                    "another output.dir (--overwrite replaces only a run folder qlora_kit wrote)")
    assert snapshot(mine) == before


def test_overwrite_refuses_a_run_folder_holding_the_users_files(run_copy, capsys):
    run, config, raw = run_copy
    (run / "notes.txt").write_text("lr 5e-3 was too high")
    shutil.copy(raw["data"]["train"], run / "data.jsonl")
    before = snapshot(run)
    line = cli_error(capsys, "train", str(config), "--overwrite")
    assert line == (f"qlora-kit train: error: output folder {run} holds files qlora_kit did not write (data.jsonl, "
                    "notes.txt), which --overwrite would delete: move them out of the run folder, or choose "
                    "another output.dir")
    assert snapshot(run) == before


def test_resume_with_overwrite_is_refused(run_copy, capsys):
    run, config, _ = run_copy
    before = snapshot(run)
    line = cli_error(capsys, "train", str(config), "--resume", "--overwrite")
    assert line == (f"qlora-kit train: error: --resume continues the run in {run} and --overwrite replaces it: "
                    "pass only one")
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_only_when_the_new_one_finishes(run_copy, monkeypatch, capsys):
    run, config, raw = run_copy
    before = snapshot(run)
    nan_loss_from(monkeypatch, 2)
    message = api_error(train, raw, overwrite=True, **QUIET)
    assert message == (f"the loss became nan at step 2; training stopped before the optimiser step. Nothing was "
                       f"replaced: the previous run in {run} is as it was. Lower train.lr or check the data, then "
                       "run again")
    assert snapshot(run) == before
    assert [p.name for p in run.parent.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    raw["lora"]["r"] = 8
    result = train(raw, overwrite=True, **QUIET)
    assert result.run_dir == run and json.loads((run / "run.json").read_text())["fingerprint"]["r"] == 8
    assert "the new run replaced the previous one" in capsys.readouterr().out
    assert [p.name for p in run.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- export and save_adapter destroy nothing

@pytest.fixture
def adapter(model_copy, tmp_path):
    trained_adapter(model_copy, tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("target", ["base", "adapter", "inside-base", "holds-adapter"])
def test_export_never_writes_over_what_it_reads(model_copy, adapter, tmp_path, capsys, target):
    before = {p: snapshot(p) for p in (model_copy, adapter)}
    out, relation, label, read = {
        "base": (model_copy, "is", "base model folder", model_copy),
        "adapter": (adapter, "is", "adapter folder", adapter),
        "inside-base": (model_copy / "merged", "lies inside", "base model folder", model_copy),
        "holds-adapter": (tmp_path, "contains", "base model folder", model_copy),
    }[target]
    line = cli_error(capsys, "export", "--base", str(model_copy), "--adapter", str(adapter), "--out", str(out),
                     "--overwrite", "--no-verify")
    assert line == (f"qlora-kit export: error: --out {out} {relation} the {label} {read}, which is being read: "
                    "write to a place outside it")
    message = api_error(export_merged, model_copy, adapter, out, overwrite=True, verify=False, **QUIET)
    assert message == line.removeprefix("qlora-kit export: error: ")
    assert {p: snapshot(p) for p in (model_copy, adapter)} == before


def test_export_overwrite_replaces_only_an_export(tiny_dir, adapter, tmp_path, capsys):
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    before = snapshot(mine)
    line = cli_error(capsys, "export", "--base", str(tiny_dir), "--adapter", str(adapter), "--out", str(mine),
                     "--overwrite", "--no-verify")
    assert line == (f"qlora-kit export: error: {mine} is not a qlora_kit export (a folder with the exporter's "
                    "report.json and nothing else), so overwrite will not replace it: choose another folder, or "
                    "move it away yourself")
    assert snapshot(mine) == before
    # an export the user has put a file of their own into is no longer only ours
    export_merged(tiny_dir, adapter, tmp_path / "merged", verify=False, **QUIET)
    (tmp_path / "merged" / "eval-notes.md").write_text("good")
    before = snapshot(tmp_path / "merged")
    assert "is not a qlora_kit export" in api_error(export_merged, tiny_dir, adapter, tmp_path / "merged",
                                                    overwrite=True, verify=False, **QUIET)
    assert snapshot(tmp_path / "merged") == before
    # a GGUF path holding some other file
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF but not ours")
    message = api_error(export_gguf, tiny_dir, adapter, other, overwrite=True, verify=False, **QUIET)
    assert message == (f"{other} is not a GGUF file qlora_kit wrote (it carries a qlora_kit.export key), so overwrite "
                       "will not replace it: choose another file, or move it away yourself")
    assert other.read_bytes() == b"GGUF but not ours"


def test_save_adapter_never_replaces_a_file_a_foreign_folder_or_the_model(model_copy, tmp_path):
    model, _ = load_model(model_copy, quant=FP32, load_tokenizer=False, **QUIET)
    add_lora(model, LoraConfig(r=4))
    afile = tmp_path / "adapter"
    afile.write_text("my notes")
    assert api_error(save_adapter, model, afile) == f"{afile} is a file, not a folder: choose another path"
    assert afile.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "my-model"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    assert api_error(save_adapter, model, folder) == (
        f"{folder} is not an adapter folder qlora_kit wrote (adapter_config.json with a 'qlora_kit' entry, and "
        "nothing else), so overwrite=True will not replace it: choose another folder, or move it away yourself")
    before = snapshot(model_copy)
    assert api_error(save_adapter, model, model_copy) == (
        f"adapter folder {model_copy} is the model folder {model_copy}, which is being read: write to a place "
        "outside it")
    assert snapshot(model_copy) == before
    save_adapter(model, tmp_path / "ours")
    save_adapter(model, tmp_path / "ours")  # its own folder it replaces
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------- failed starts block nothing

def test_a_failed_start_writes_nothing_and_resume_needs_a_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    raw = run_config(tmp_path, tiny_dir, out, save_every=2)
    bad = {**raw, "model": {"path": str(tmp_path / "no-such-model")}}
    assert "does not exist" in api_error(train, bad, **QUIET)
    assert not out.exists()
    # a run that fails before its first checkpoint leaves run.json, which blocks neither the fix nor the rerun
    nan_loss_from(monkeypatch, 1)
    assert "Last good checkpoint: none yet" in api_error(train, raw, **QUIET)
    assert (out / "run.json").is_file() and not (out / "checkpoints").exists()
    line = cli_error(capsys, "train", str(write_yaml(tmp_path / "run.yaml", raw)), "--resume")
    assert line == (f"qlora-kit train: error: nothing to resume: {out} has no checkpoint: the run stopped before its "
                    "first save (every train.save_every = 2 steps); start the run without --resume")
    monkeypatch.undo()
    train(raw, **QUIET)
    assert "holds a run that stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_resume_of_an_empty_place_says_there_is_nothing(tiny_dir, tmp_path, capsys):
    raw = run_config(tmp_path, tiny_dir, tmp_path / "run")
    line = cli_error(capsys, "train", str(write_yaml(tmp_path / "run.yaml", raw)), "--resume")
    assert line == (f"qlora-kit train: error: nothing to resume: {tmp_path / 'run'} holds no run; start the run "
                    "without --resume")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- values that are not finite

@pytest.mark.parametrize("section, key, text", [("train", "lr", ".inf"), ("train", "epochs", ".nan"),
                                                ("lora", "alpha", "-.inf"), ("train", "max_grad_norm", ".nan")])
def test_config_values_must_be_finite(tmp_path, section, key, text):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "c.yaml").write_text(f"data: {{train: d.jsonl}}\n{section}: {{{key}: {text}}}\n")
    value = float(text.replace(".", ""))
    assert api_error(load_config, tmp_path / "c.yaml") == (
        f"config {section}.{key} = {value!r} is not a finite number: write an ordinary number")


def test_a_checkpoint_with_non_finite_tensors_is_never_written(tmp_path):
    model = None  # refused before the model is asked for anything
    adapter = {"model.layers.0.self_attn.q_proj.lora_B.weight": torch.tensor([[0.0, float("nan")]])}
    with pytest.raises(checkpoints.NonFiniteCheckpoint) as e:
        checkpoints.save_checkpoint(tmp_path, 3, model, adapter, {"state": {}}, {"scheduler": {}}, 2, [{}])
    assert one_line(str(e.value)) == ("checkpoint step-0000003 was not written: the adapter "
                                      "(model.layers.0.self_attn.q_proj.lora_B.weight) holds non-finite values")
    optim = {"state": {0: {"exp_avg_sq": torch.tensor([float("inf")])}}}
    with pytest.raises(checkpoints.NonFiniteCheckpoint, match=r"the optimiser state \(state.0.exp_avg_sq\)"):
        checkpoints.save_checkpoint(tmp_path, 3, model, {}, optim, {"scheduler": {}}, 2, [{}])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- damaged checkpoints

DAMAGES = {  # kind: (file, how it is damaged, what the message then says after 'checkpoint DIR is ')
    "optimizer truncated": ("optimizer.safetensors", lambda b: b[: len(b) // 2],
                            "incomplete or corrupt (optimizer: Error while deserializing header: "),
    "optimizer skeleton": ("optimizer.json", lambda b: b'{"__dict__": [["state", {"__tensor__": "t999"}]]}',
                           "incomplete or corrupt (optimizer: 't999')"),
    "trainer state": ("trainer_state.json", lambda b: b[:10], "damaged (trainer_state.json: "),
    "adapter truncated": ("adapter/adapter_model.safetensors", lambda b: b[:100],
                          "damaged ({ckpt}/adapter/adapter_model.safetensors is not a readable safetensors file ("),
    "rng missing": ("rng-0.safetensors", None, "incomplete or corrupt (rng-0: No such file or directory"),
    "adapter not finite": ("adapter/adapter_model.safetensors", "nan", "damaged (the adapter "
                           "(model.layers.0.mlp.down_proj.lora_A.weight) holds non-finite values)"),
}


def damage(ckpt: Path, kind: str) -> None:
    name, how, _ = DAMAGES[kind]
    f = ckpt / name
    if how is None:
        f.unlink()
    elif how == "nan":
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(f).items()}, f)
    else:
        f.write_bytes(how(f.read_bytes()))


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_every_damaged_checkpoint_file_is_named_in_one_line(finished, tmp_path, kind):
    ckpt = Path(shutil.copytree(finished / "checkpoints" / "step-0000002", tmp_path / "step-0000002"))
    damage(ckpt, kind)
    with pytest.raises(checkpoints.DamagedCheckpoint) as e:
        checkpoints.read_checkpoint(ckpt, world=1)
    message = one_line(str(e.value))
    assert message.startswith(f"checkpoint {ckpt} is " + DAMAGES[kind][2].format(ckpt=ckpt)), message


def test_resume_falls_back_from_a_damaged_newest_checkpoint(run_copy, capsys):
    run, config, raw = run_copy
    damage(run / "checkpoints" / "step-0000002", "optimizer truncated")
    stale = tmp_name(run / "checkpoints" / "step-0000003", pid=dead_pid())
    stale.mkdir()
    (stale / "optimizer.safetensors").write_bytes(b"\0" * 1000)
    raw["train"]["max_steps"] = 3
    result = train(raw, resume=True, **QUIET)
    out = capsys.readouterr().out
    assert (f"qlora-kit: checkpoint {run / 'checkpoints' / 'step-0000002'} is incomplete or corrupt (optimizer: "
            in out and "; trying the checkpoint before it" in out)
    assert "resuming from step-0000001, the newest checkpoint that reads back whole" in out
    assert "resuming at step 1" in out and result.steps == 3
    assert f"removed 1 temporary leftover(s) of an interrupted write in {run / 'checkpoints'}: {stale.name}" in out
    assert not stale.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_with_every_checkpoint_damaged_says_so(run_copy, capsys):
    run, config, _ = run_copy
    for ckpt in (run / "checkpoints").iterdir():
        damage(ckpt, "rng missing")
    before = snapshot(run)
    line = cli_error(capsys, "train", str(config), "--resume", "--no-progress")
    assert line.startswith(f"qlora-kit train: error: no checkpoint in {run / 'checkpoints'} can be read back "
                           f"(checkpoint {run / 'checkpoints' / 'step-0000002'} is incomplete or corrupt (rng-0: ")
    assert line.endswith("): the run cannot be resumed; start it again with --overwrite")
    assert snapshot(run) == before


# ---------------------------------------------------------------- a full disk

def enospc(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_dir, tmp_path, monkeypatch):
    real, calls = checkpoints.save_tree, {"n": 0}

    def save_tree(tree, folder, name):
        if name == "optimizer":
            calls["n"] += 1
            if calls["n"] == 2:
                enospc()
        return real(tree, folder, name)

    monkeypatch.setattr(checkpoints, "save_tree", save_tree)
    out = tmp_path / "run"
    message = api_error(train, run_config(tmp_path, tiny_dir, out), **QUIET)
    assert message.startswith("not enough disk space for checkpoint step-0000002: it needs 1.")
    assert f" MiB in {out / 'checkpoints'} but only " in message
    assert message.endswith("is free; free some space, then continue from step-0000001 with --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]


def test_disk_full_during_export_keeps_the_previous_export(tiny_dir, adapter, tmp_path, monkeypatch, capsys):
    import qlora_kit.export.gguf as gguf_export
    import qlora_kit.export.shards as shards

    out = tmp_path / "merged"
    export_merged(tiny_dir, adapter, out, verify=False, **QUIET)
    export_gguf(tiny_dir, adapter, tmp_path / "m.gguf", verify=False, **QUIET)
    before = snapshot(out), snapshot(tmp_path / "m.gguf")
    monkeypatch.setattr(shards.ShardWriter, "write", enospc)
    monkeypatch.setattr(gguf_export, "_encode", enospc)
    line = cli_error(capsys, "export", "--base", str(tiny_dir), "--adapter", str(adapter), "--out", str(out),
                     "--overwrite", "--no-verify")
    assert line.startswith("qlora-kit export: error: not enough disk space for the export: it needs ")
    assert line.endswith("is free; free some space, choose another --out, or export in bf16/fp16 instead of fp32")
    message = api_error(export_gguf, tiny_dir, adapter, tmp_path / "m.gguf", overwrite=True, verify=False, **QUIET)
    assert message.startswith("not enough disk space for the GGUF export: it needs ")
    assert (snapshot(out), snapshot(tmp_path / "m.gguf")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _small_disk_available(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {probe}"],
                          capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk_is_one_line_from_the_cli(tiny_dir, tmp_path):
    """A real 256 KiB file system (a tmpfs in a private mount namespace): the run's first checkpoint
    does not fit, and the CLI says so with the needed and free bytes."""
    if not _small_disk_available(tmp_path):
        pytest.skip("needs unshare and permission to mount a tmpfs in a user namespace")
    disk = tmp_path / "disk"
    disk.mkdir()
    raw = run_config(tmp_path, tiny_dir, disk / "run")
    config = write_yaml(tmp_path / "run.yaml", raw)
    script = (f"mount -t tmpfs -o size=256k none {disk} && exec {sys.executable} -m qlora_kit.cli train {config} "
              "--no-progress")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = [x for x in done.stderr.splitlines() if x.startswith("qlora-kit ")]
    assert len(line) == 1 and line[0].startswith("qlora-kit train: error: not enough disk space for checkpoint "
                                                 "step-0000001: it needs 1."), line
    assert f"MiB in {disk / 'run'} but only " in line[0]  # checkpoints/ does not exist yet
    assert line[0].endswith("KiB is free; free some space, then start the run again (no checkpoint was written yet)")


# ---------------------------------------------------------------- messages instead of tracebacks

def test_invalid_target_regex(tmp_path, capsys):
    message = api_error(config_from_dict, {"data": {"train": "x.jsonl"}, "lora": {"targets": "q_proj["}})
    assert message == ("LoRA targets 'q_proj[' is not a valid regular expression (unterminated character set at "
                       "position 6): use 'all-linear', a list of module-name suffixes such as [q_proj, v_proj], or a "
                       "regex over full module names such as '.*(q|v)_proj'")
    assert cli_error(capsys, "plan", "llama-2-7b", "--targets", "q_proj[") == f"qlora-kit plan: error: {message}"


@pytest.mark.parametrize("on_bad_line", ["error", "skip"])
def test_data_that_is_not_utf8(tmp_path, on_bad_line):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n')
    if on_bad_line == "error":
        assert api_error(read_jsonl, f) == (f"{f}, line 2: not UTF-8 text (byte 0xe9 at column 14); save the file as "
                                            "UTF-8 (set data.on_bad_line: skip to skip bad lines)")
    else:
        stats = DataStats()
        assert read_jsonl(f, "skip", stats) == [{"text": "fine"}]
        assert stats.skipped == [f"{f}:2: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8"]


def test_yaml_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"data:\n  train: caf\xe9.jsonl\n")
    assert cli_error(capsys, "train", str(config)) == (f"qlora-kit train: error: {config} is not UTF-8 text (byte "
                                                       "0xe9 on line 2): save the config as UTF-8")


def test_max_shard_size_inf(tiny_dir, adapter, tmp_path, capsys):
    line = cli_error(capsys, "export", "--base", str(tiny_dir), "--adapter", str(adapter), "--out",
                     str(tmp_path / "out"), "--max-shard-size", "inf")
    assert line == ("qlora-kit export: error: max shard size 'inf' is not a size: write it like '2GB', '500MB' or "
                    "'4GiB'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_plan_gpu_gb_not_finite(capsys, value):
    assert cli_error(capsys, "plan", "llama-2-7b", "--gpu-gb", value) == (
        f"qlora-kit plan: error: --gpu-gb {value}: give the card's memory in GB, e.g. --gpu-gb 24")


def test_empty_prompt(capsys):
    assert cli_error(capsys, "generate", "--model", "nowhere", "--prompt", "", "--no-chat") == (
        "qlora-kit generate: error: prompt 1 is empty (''): give the text the model should answer or continue")
    assert api_error(generate, None, None, ["hello", "  "]) == (
        "prompt 2 is empty ('  '): give the text the model should answer or continue")


def test_set_on_a_yaml_list_or_an_empty_section(tiny_dir, tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model: smollm2\n- data: {train: d.jsonl}\n")
    assert cli_error(capsys, "train", str(listed), "--set", "train.max_steps=2") == (
        f"qlora-kit train: error: {listed} holds a YAML list, not a mapping: write sections such as 'model:', "
        "'data:', 'train:' at the top level")
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    empty = tmp_path / "empty.yaml"
    empty.write_text("data: {train: d.jsonl}\ntrain:\nquant:\n  compute_dtype: fp32\n")
    assert load_config(empty, {"train.max_steps": 2}).train.max_steps == 2
    assert load_config(empty).train.max_steps is None
    null_quant = tmp_path / "null.yaml"
    null_quant.write_text("data: {train: d.jsonl}\nquant: null\n")
    assert api_error(load_config, null_quant, {"quant.compute_dtype": "fp32"}) == (
        f"--set quant.compute_dtype: {null_quant} has 'quant: null' (an unquantised base); set quant.bits too, or "
        "remove 'quant: null'")


# ---------------------------------------------------------------- chats, prompts, Ctrl-C

def test_unknown_chat_role(tmp_path):
    f = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    wizard = {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"},
                           {"role": "assistant", "content": "hello"}]}
    f.write_text(json.dumps(good) + "\n" + json.dumps(wizard) + "\n")
    assert api_error(read_jsonl, f) == (f"{f}, line 2: message 2 has role 'wizard'; chat roles are system, user, "
                                        "assistant, tool (set data.on_bad_line: skip to skip bad lines)")
    stats = DataStats()
    assert read_jsonl(f, "skip", stats) == [good] and len(stats.skipped) == 1
    assert "1 bad lines skipped (first: " in stats.summary()
    f.write_text(json.dumps({"messages": [{"role": "asistant", "content": "x"}]}) + "\n")
    assert "role 'asistant' (did you mean 'assistant'?)" in api_error(read_jsonl, f)


def test_ctrl_c_prints_the_exact_resume_command(tiny_dir, tmp_path):
    raw = run_config(tmp_path, tiny_dir, tmp_path / "run", max_steps=40, save_every=2)
    config = write_yaml(tmp_path / "run.yaml", raw)
    argv = [sys.executable, "-m", "qlora_kit.cli", "train", str(config), "--no-progress", "--set", "train.lr=4e-3"]
    # Ctrl-C's default action in the child, whatever this process inherited or set: an ignored SIGINT is
    # inherited across exec, and Python then never raises KeyboardInterrupt (the run finishes, exit 0)
    child = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "QLORA_KIT_STEP_DELAY": "0.3"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # any finished checkpoint will do: with keep_last a given one lives only a few steps, and a busy
    # machine may not look in that window
    checkpoints_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while not any(checkpoints_dir.glob("step-*")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert child.poll() is None, f"the run ended (exit {child.returncode}) before it could be interrupted"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "Traceback" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("qlora-kit ")]
    newest = checkpoints.latest_checkpoint(tmp_path / "run")
    command = f"qlora-kit train {config} --set train.lr=4e-3 --resume"
    assert ours == [f"qlora-kit train: interrupted; the newest checkpoint is {newest}; to continue from it: {command}"]
    resumed = cli_process(*command.split()[1:], "--set", "train.max_steps=6", "--no-progress", timeout=600)
    assert resumed.returncode == 0 and f"resuming at step {int(newest.name[5:])}" in resumed.stdout, resumed.stderr


# ---------------------------------------------------------------- leftovers of killed writers

def test_a_killed_export_leaves_a_temporary_that_the_next_export_removes(tiny_dir, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_dir), str(adapter), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert child.stdout.readline().startswith("shard 0")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-merged-")]
    export_merged(tiny_dir, adapter, out, verify=False, **QUIET)
    printed = capsys.readouterr().out
    assert f"removed 1 temporary leftover(s) of an interrupted write in {tmp_path}: {leftover.name} (" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gguf_and_run_leftovers_are_removed_by_the_next_write_into_the_same_place(tiny_dir, adapter, run_copy,
                                                                                   tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    left = tmp_name(gguf, pid=dead_pid())
    left.write_bytes(b"\0" * 4096)
    export_gguf(tiny_dir, adapter, gguf, verify=False, **QUIET)
    assert f"in {tmp_path}: {left.name} (4.0 KiB)" in capsys.readouterr().out and not left.exists()
    # a killed --overwrite run leaves its new run beside the old one; a killed save, its temporary inside
    run, config, raw = run_copy
    beside, inside = tmp_name(run, pid=dead_pid()), tmp_name(run / "adapter", pid=dead_pid())
    beside.mkdir()
    inside.mkdir()
    raw["train"]["max_steps"] = 3
    train(raw, resume=True, **QUIET)
    printed = capsys.readouterr().out
    assert beside.name in printed and inside.name in printed and not beside.exists() and not inside.exists()


def test_only_leftovers_of_dead_writers_are_removed(tmp_path):
    live = tmp_name(tmp_path / "out")  # this process's: still being written
    dead = tmp_name(tmp_path / "out", pid=dead_pid())
    legacy_old, legacy_new = tmp_path / ".tmp-out-1a2b3c4d", tmp_path / ".tmp-out-5e6f7a8b"
    for p in (live, dead, legacy_old, legacy_new):
        p.mkdir()
    os.utime(legacy_old, (time.time() - 3600, time.time() - 3600))
    other = tmp_name(tmp_path / "other", pid=dead_pid())
    other.mkdir()
    lines = []
    removed = sweep_stale(tmp_path, "out", say=lines.append)
    assert sorted(r.split(" (")[0] for r in removed) == sorted([dead.name, legacy_old.name])
    assert live.exists() and legacy_new.exists() and other.exists() and len(lines) == 1
    # an interrupted two-rename swap: the old copy was moved aside and nothing took its place yet
    aside = tmp_name(tmp_path / "merged", "old", pid=dead_pid())
    aside.mkdir()
    (aside / "report.json").write_text("{}")
    sweep_stale(tmp_path, "merged", say=lines.append)
    assert (tmp_path / "merged" / "report.json").is_file() and lines[-1].startswith("qlora-kit: restored ")


# ---------------------------------------------------------------- paths in the YAML

def test_output_dir_is_relative_to_the_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "configs" / "run.yaml").write_text("data: {train: d.jsonl}\noutput: {dir: runs/x}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("configs/run.yaml"))
    assert cfg.output.dir == str(Path("configs") / "runs" / "x") and cfg.data.train == str(Path("configs/d.jsonl"))
    assert load_config(Path("configs/run.yaml"), {"output.dir": "/abs/run"}).output.dir == "/abs/run"


def test_replacing_without_an_atomic_exchange_keeps_the_old_copy_until_the_new_one_is_in(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, the swap is two renames; nothing is left behind."""
    import qlora_kit.io as kio

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(kio, "_exchange", lambda a, b: False)
    with kio.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new.txt"]


def test_a_full_disk_is_recognised_in_safetensors_words_too():
    from qlora_kit.io import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_full_while_saving_an_adapter(tiny_dir, tmp_path, monkeypatch):
    import qlora_kit.adapters

    model, _ = load_model(tiny_dir, quant=FP32, load_tokenizer=False, **QUIET)
    add_lora(model, LoraConfig(r=4))
    save_adapter(model, tmp_path / "a")
    before = snapshot(tmp_path / "a")

    def full(*_, **__):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(qlora_kit.adapters, "save_file", full)
    message = api_error(save_adapter, model, tmp_path / "a")
    assert message.startswith(f"not enough disk space for the adapter {tmp_path / 'a'}: it needs 28.2 KiB in ")
    assert message.endswith("is free; free some space or choose another folder")
    assert snapshot(tmp_path / "a") == before and [p.name for p in tmp_path.iterdir()] == ["a"]


def test_ctrl_c_hint_before_any_checkpoint_and_while_replacing(run_copy, tmp_path):
    from argparse import Namespace

    from qlora_kit.commands.train import interrupted_hint

    run, config, _ = run_copy
    args = Namespace(config=str(config), set=["train.lr=1e-3", "output.dir=my run"])
    assert interrupted_hint(args, tmp_path / "fresh", replacing=False) == (
        f"no checkpoint was written yet; to start again: qlora-kit train {config} --set train.lr=1e-3 "
        "--set 'output.dir=my run'")
    assert interrupted_hint(args, run, replacing=True) == (
        f"nothing was replaced: the previous run in {run} is as it was; to start the new run again: qlora-kit train "
        f"{config} --set train.lr=1e-3 --set 'output.dir=my run' --overwrite")

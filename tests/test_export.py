"""Streaming merged export: same tensors as the in-memory merge, loads cleanly, survives a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit import (LoraConfig, QLoraKitError, QuantConfig, add_lora, export_merged, load_model, lora_layers,
                       merged_state_dict, save_adapter)
from qlora_kit.cli import main as cli_main
from qlora_kit.lora import lora_delta
from tiny import make_model_dir
from transformers import AutoModelForCausalLM

Q4 = QuantConfig(compute_dtype=torch.float32)
FAST = dict(progress=False, verify=False)


def trained_adapter(base, out, quant=Q4, r=4, seed=1, extra=None, **lora):
    """Save an adapter with random non-zero B (as after training); return the model that holds it."""
    dtype = quant.compute_dtype if quant is not None else torch.float32
    model, _ = load_model(base, quant=quant, dtype=dtype, load_tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=r, dropout=0.0, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    save_adapter(model, out, extra=extra)
    return model


def exported(folder) -> dict:
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def ids(vocab=320):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
def test_dequantized_fp32_matches_quantised_model_with_adapter(tiny_dirs, tmp_path, arch, bits, any_dtype):
    dtype = any_dtype
    base = tiny_dirs(arch)
    trained_adapter(base, tmp_path / "a", quant=QuantConfig(bits=bits, compute_dtype=dtype))
    report = export_merged(base, tmp_path / "a", tmp_path / "out", dtype="fp32", progress=False)
    assert report["quant"]["compute_dtype"] == str(dtype).removeprefix("torch.") and report["quant_source"] == "adapter"
    v = report["verify"]
    # the reference computes the trained weights in fp32: only fp32 rounding separates it from the export
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert v["logit_rel_error"]["dequantized"] < 1e-4
    # the original weights miss the quantisation error the adapter was trained around: side by side
    assert v["logit_rel_error"]["original"] > 100 * v["logit_rel_error"]["dequantized"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["verify"]["logit_rel_error"] == v["logit_rel_error"]
    assert "dequantized" in (tmp_path / "out" / "report.txt").read_text()


def test_bf16_export_within_bf16_rounding(tiny_dir, tmp_path):
    trained_adapter(tiny_dir, tmp_path / "a")
    report = export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", progress=False)
    assert report["dtype"] == "bfloat16"
    # bf16 keeps 8 significant bits: each merged weight moves by up to 2^-9 of itself
    assert report["verify"]["logit_rel_error"]["dequantized"] < 1e-2
    assert all(t.dtype == torch.bfloat16 for t in exported(tmp_path / "out").values())


@pytest.mark.parametrize("quant,dtype", [
    (Q4, torch.float32), (QuantConfig(compute_dtype="bf16"), torch.float32), (Q4, torch.bfloat16),
    (QuantConfig(compute_dtype="bf16"), torch.bfloat16), (QuantConfig(bits=8, compute_dtype="fp32"), torch.float32),
    (QuantConfig(bits=8, compute_dtype="bf16"), torch.bfloat16),
    (QuantConfig(quant_type="fp4", double_quant=False, compute_dtype="fp16"), torch.float16)],
    ids=["nf4/fp32-to-fp32", "nf4/bf16-to-fp32", "nf4/fp32-to-bf16", "nf4/bf16-to-bf16", "int8/fp32-to-fp32",
         "int8/bf16-to-bf16", "fp4/fp16-to-fp16"])
@pytest.mark.parametrize("arch", ["qwen2", "llama-tied"])
def test_streaming_export_equals_in_memory_merge(tiny_dirs, tmp_path, arch, quant, dtype):
    base = tiny_dirs(arch)
    model = trained_adapter(base, tmp_path / "a", quant=quant)
    export_merged(base, tmp_path / "a", tmp_path / "out", dtype=dtype, max_shard_size="40KB", **FAST)
    expected = merged_state_dict(model, dtype)
    got = exported(tmp_path / "out")
    assert set(got) == set(expected) - {"lm_head.weight" if arch == "llama-tied" else ""}
    for key, t in got.items():
        assert torch.equal(t, expected[key]), key


def test_original_merge_base_is_file_weights_plus_delta(tiny_dirs, tmp_path):
    base = tiny_dirs("qwen2")
    model = trained_adapter(base, tmp_path / "a", rslora=True, alpha=8)
    report = export_merged(base, tmp_path / "a", tmp_path / "out", dtype="fp32", merge_into="original", progress=False)
    assert report["merge_into"] == "original" and report["lora"]["scale"] == 8 / 2  # rsLoRA: alpha / sqrt(r)
    errors = report["verify"]["logit_rel_error"]
    assert errors["original"] > 100 * errors["dequantized"]
    source, got = exported(base), exported(tmp_path / "out")
    layer = lora_layers(model)["model.layers.1.mlp.gate_proj"]
    key = "model.layers.1.mlp.gate_proj.weight"
    want = source[key].float() + lora_delta(layer.lora_A.weight, layer.lora_B.weight, 4.0)
    assert torch.equal(got[key], want)
    assert torch.equal(got["model.layers.0.self_attn.q_proj.bias"], source["model.layers.0.self_attn.q_proj.bias"].float())
    assert torch.equal(got["model.norm.weight"], source["model.norm.weight"].float())


def test_peft_trained_adapter_exports_the_same_way(tiny_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, use_rslora=True,
                                                     target_modules=["q_proj", "gate_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # real steps, so B is non-zero
        x = ids()
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    report = export_merged(tiny_dir, tmp_path / "peft", tmp_path / "out", dtype="fp32", merge_into="original",
                           progress=False)
    assert report["quant_source"].startswith("assumed") and report["adapted_modules"] == 6
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, peft_model(ids()).logits, rtol=1e-5, atol=1e-5)
        theirs = peft_model.merge_and_unload().state_dict()
    for key, t in exported(tmp_path / "out").items():
        torch.testing.assert_close(t, theirs[key], rtol=1e-6, atol=1e-6)


def peft_on_transformers_4bit(folder, out, compute_dtype):
    """Train a PEFT adapter on transformers' own 4-bit model (BitsAndBytesConfig, default dtype: the
    checkpoint's) and save it; returns that model. bitsandbytes' CPU repack (FACTS: an eval-mode forward
    on AVX512-BF16 rewrites the weight) is switched off so the model means the same on every CPU."""
    import bitsandbytes as bnb
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return model


def fp32_logits_of(peft_model) -> torch.Tensor:
    """The trained 4-bit model's logits with every op in fp32: the same packed weights, dequantised by
    bitsandbytes and multiplied in fp32 (its fused CPU kernel rounds about 1e-3 per layer for weights
    quantised from bf16), so a comparison with an fp32 export measures the export alone."""
    import bitsandbytes as bnb

    peft_model.float()  # embeddings, norms: their stored values, in fp32; the packed 4-bit data is untouched
    for name, m in list(peft_model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.weight.data = w
            if m.bias is not None:
                plain.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(peft_model.get_submodule(parent), child, plain)
    with torch.no_grad():
        return peft_model(ids()).logits.float()


@pytest.mark.parametrize("peft_dtype", ["fp32", "bf16"])
def test_peft_adapter_from_a_transformers_4bit_model_exports_that_model(tiny_dirs, tmp_path, peft_dtype):
    """A PEFT adapter carries no record of its base's dtype: the export quantises from the checkpoint's
    stored dtype, as transformers did, and never asks this machine (the suite refuses 'auto' here)."""
    from conftest import DTYPES

    compute = DTYPES[peft_dtype]
    folder = make_model_dir(tmp_path / "base", dtype=compute)  # a checkpoint stored in the run's dtype
    peft_model = peft_on_transformers_4bit(folder, tmp_path / "peft", compute)
    report = export_merged(folder, tmp_path / "peft", tmp_path / "out", dtype="fp32", progress=False)
    assert report["quant"]["compute_dtype"] == str(compute).removeprefix("torch.")
    assert "stored dtype" in report["quant_source"] and "stored dtype" in (tmp_path / "out" / "report.txt").read_text()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = merged(ids()).logits
    reference = fp32_logits_of(peft_model)
    error = float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))
    assert error < 2e-3, error


def test_peft_export_is_the_same_bytes_on_every_machine(tiny_dir, tmp_path, fake_cpu):
    import hashlib

    peft_on_transformers_4bit(tiny_dir, tmp_path / "peft", torch.bfloat16)

    def digest(out, **kwargs):
        export_merged(tiny_dir, tmp_path / "peft", tmp_path / out, dtype="fp32", **FAST, **kwargs)
        return hashlib.sha256((tmp_path / out / "model.safetensors").read_bytes()).hexdigest()

    fake_cpu(True)
    on_bf16_cpu = digest("bf16-cpu")
    fake_cpu(False)
    assert digest("fp32-cpu") == on_bf16_cpu
    # the dtype the base was quantised from is the argument's when given, the same on every machine too
    forced = digest("forced-fp32", compute_dtype="fp32")
    fake_cpu(True)
    assert digest("forced-fp32-again", compute_dtype="fp32") == forced != on_bf16_cpu


def test_folder_layout_config_and_side_files(tiny_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    trained_adapter(tiny_dir, tmp_path / "a")
    export_merged(base, tmp_path / "a", tmp_path / "one", dtype="fp16", **FAST)
    report = export_merged(base, tmp_path / "a", tmp_path / "many", max_shard_size="30KB", **FAST)
    written = json.loads((tmp_path / "one" / "config.json").read_text())
    assert "quantization_config" not in written and written["dtype"] == "float16"
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (tmp_path / "one" / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) == report["shards"] > 3 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == report["out_bytes"]
    assert set(index["weight_map"]) == set(exported(tmp_path / "many"))


KILL_SCRIPT = """
import sys, time
from qlora_kit import export_merged

def stall(index, count, path):
    print("shard", index, count, flush=True)
    time.sleep(600)

export_merged(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="20KB", overwrite=True, verify=False,
              progress=False, on_shard=stall)
"""


@pytest.mark.parametrize("previous", [False, True], ids=["fresh-out", "overwrite"])
def test_killed_export_leaves_no_complete_looking_out(tiny_dir, tmp_path, previous):
    trained_adapter(tiny_dir, tmp_path / "a")
    out = tmp_path / "out"
    if previous:
        export_merged(tiny_dir, tmp_path / "a", out, **FAST)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_dir), str(tmp_path / "a"), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.startswith("shard 0"), line
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-out-")]
    assert len(leftovers) == 1 and not (leftovers[0] / "config.json").exists()
    if previous:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()


def test_existing_out_refused_without_overwrite(tiny_dir, tmp_path):
    """overwrite replaces an earlier export only; a folder of the user's is refused even with it."""
    trained_adapter(tiny_dir, tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(QLoraKitError, match="already exists.*overwrite"):
        export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", **FAST)
    with pytest.raises(QLoraKitError, match="is not a qlora_kit export .* will not replace it"):
        export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", overwrite=True, **FAST)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "out" / "keep.txt").unlink()  # an empty folder holds nothing to lose
    export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", **FAST)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    trained_adapter(tiny_dir, tmp_path / "a", seed=2)
    export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", overwrite=True, **FAST)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_with_wrong_shapes_lists_mismatches(tiny_dirs, tmp_path):
    trained_adapter(tiny_dirs("llama", hidden=96), tmp_path / "a")
    with pytest.raises(QLoraKitError, match=r"does not fit base model .*problems: model.layers.0.mlp.down_proj: "
                                            r"B \(96, 4\) @ A \(4, 88\) does not fit the base weight \(64, 88\)"):
        export_merged(tiny_dirs("llama"), tmp_path / "a", tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_adapter_for_modules_the_base_lacks(tiny_dirs, tmp_path):
    trained_adapter(tiny_dirs("llama", layers=3), tmp_path / "a", targets=["q_proj"])
    with pytest.raises(QLoraKitError, match="model.layers.2.self_attn.q_proj: the base has no "
                                            "model.layers.2.self_attn.q_proj.weight"):
        export_merged(tiny_dirs("llama"), tmp_path / "a", tmp_path / "out", **FAST)


def test_adapter_with_non_lora_tensors(tiny_dir, tmp_path):
    trained_adapter(tiny_dir, tmp_path / "a", targets=["q_proj"])
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 320)
    save_file(tensors, f)
    with pytest.raises(QLoraKitError, match="not LoRA A/B matrices.*lora_embedding_A"):
        export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", **FAST)


def test_base_folder_without_safetensors(tiny_dir, tmp_path):
    trained_adapter(tiny_dir, tmp_path / "a")
    (tmp_path / "base").mkdir()
    shutil.copy(tiny_dir / "config.json", tmp_path / "base")
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(QLoraKitError, match="no \\*.safetensors weights.*never unpickles"):
        export_merged(tmp_path / "base", tmp_path / "a", tmp_path / "out", **FAST)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="int8"), "unknown export dtype 'int8': use one of bf16, fp16, fp32"),
    (dict(dtype=torch.float64), "export dtype float64 is not supported"),
    (dict(merge_into="quantized"), "merge_into='quantized': use 'dequantized'"),
    (dict(max_shard_size="2 gigs"), "max shard size '2 gigs' is not a size"),
    (dict(max_shard_size="0MB"), "is not a size"),
])
def test_bad_arguments(tiny_dir, tmp_path, kwargs, message):
    trained_adapter(tiny_dir, tmp_path / "a", targets=["q_proj"])
    with pytest.raises(QLoraKitError, match=message.replace("(", r"\(").replace("*", r"\*")):
        export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", **FAST, **kwargs)


def test_not_enough_disk(tiny_dir, tmp_path, monkeypatch):
    trained_adapter(tiny_dir, tmp_path / "a", targets=["q_proj"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(QLoraKitError, match=r"not enough disk space .* only 1000 B is free"):
        export_merged(tiny_dir, tmp_path / "a", tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_export_and_its_errors(tiny_dir, tmp_path, capsys):
    trained_adapter(tiny_dir, tmp_path / "a")
    args = ["export", "--base", str(tiny_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "out")]
    assert cli_main(args + ["--dtype", "fp32", "--merge-into", "original", "--max-shard-size", "50KB", "--no-verify"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["merge_into"] == "original" and report["dtype"] == "float32" and report["verify"] is None
    assert report["shards"] > 1
    assert "merge base: original" in capsys.readouterr().out
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verify"]["logit_rel_error"]["dequantized"] < 1e-2


@pytest.mark.slow
def test_smollm2_export_loads_and_matches(smollm2_dir, tmp_path):
    """The real model: tied embeddings, 30 layers, an all-linear rank-16 adapter with non-zero B."""
    # the adapter's tensors do not depend on the base's storage: skip quantising here, record NF4 as trained
    trained_adapter(smollm2_dir, tmp_path / "a", quant=None, r=16, alpha=32, extra={"quant": Q4.to_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_merged(smollm2_dir, tmp_path / "a", tmp_path / "out", progress=False)
    v = report["verify"]
    assert report["quant_source"] == "adapter" and report["merge_into"] == "dequantized"
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [] and report["adapted_modules"] == 210
    assert v["logit_rel_error"]["dequantized"] < 2e-2 < v["logit_rel_error"]["original"]
    assert (tmp_path / "out" / "tokenizer.json").is_file()

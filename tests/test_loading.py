"""load_model: streaming quantised loading, frozen base, clear errors."""

import gc
import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_kit import QLoraKitError, QuantConfig, QuantLinear, load_model, tensorfiles
from qlora_kit.dtypes import fast_dtype
from qlora_kit.quant import roundtrip
from qlora_kit.record import record_of


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "llama-tied"])
def test_loads_quantised_and_frozen_with_the_rest_in_the_compute_dtype(tiny_dirs, arch, any_dtype):
    path = tiny_dirs(arch)
    model, tok = load_model(path, quant=QuantConfig(compute_dtype=any_dtype), progress=False)
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantised) == 2 * 7
    assert not any("lm_head" in n for n in quantised)
    assert all(not p.requires_grad for p in model.parameters())
    packed = {id(m.weight) for m in model.modules() if isinstance(m, QuantLinear)}
    assert all(p.dtype == any_dtype for p in model.parameters() if id(p) not in packed)  # never upcast
    assert {m.compute_dtype for m in model.modules() if isinstance(m, QuantLinear)} == {any_dtype}
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "llama-tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok is not None and tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("fast_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_loads_in_the_probed_dtype(tiny_dir, fake_cpu, fast_bf16, expected):
    fake_cpu(fast_bf16)
    auto, _ = load_model(tiny_dir, progress=False)  # "auto": bf16 where the hardware is fast at it, else fp32
    assert auto.get_input_embeddings().weight.dtype == expected == fast_dtype("cpu")
    assert record_of(auto).quant.compute_dtype == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_model_equals_its_dequantised_twin(tiny_dirs, arch, bits, any_dtype):
    """The loaded model computes what transformers computes with W replaced by dequant(quant(W)), in the
    same dtype: identical up to fp32 sums (1e-5) in fp32, within a few eps of the dtype in 16 bits."""
    path = tiny_dirs(arch)
    cfg = QuantConfig(bits=bits, compute_dtype=any_dtype)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=any_dtype).eval()
    plain_logits_model = AutoModelForCausalLM.from_pretrained(path, dtype=any_dtype).eval()
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.copy_(roundtrip(m.weight, cfg))
    model, _ = load_model(path, quant=cfg, progress=False)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        a, b, plain = (m(ids).logits.float() for m in (ref, model, plain_logits_model))
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    assert rel(b, a) < (1e-5 if any_dtype == torch.float32 else 2 * torch.finfo(any_dtype).eps), rel(b, a)
    assert rel(b, plain) > 10 * rel(b, a)  # really quantised


def test_unquantised_load_matches_transformers(tiny_dir):
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model, _ = load_model(tiny_dir, quant=None, dtype=torch.float32, progress=False)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_missing_path(tmp_path):
    with pytest.raises(QLoraKitError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(QLoraKitError, match="no config.json"):
        load_model(tmp_path)


def test_pickle_only_folder_refused(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(QLoraKitError, match="never unpickles"):
        load_model(tmp_path)


def test_truncated_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QLoraKitError, match="truncated or corrupt"):
        load_model(bad, quant=QuantConfig(compute_dtype=torch.float32), progress=False)


def test_garbage_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(QLoraKitError, match="safetensors"):
        load_model(bad, quant=QuantConfig(compute_dtype=torch.float32), progress=False)


def test_config_and_weights_disagree(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QLoraKitError, match="shape"):
        load_model(bad, quant=QuantConfig(compute_dtype=torch.float32), progress=False)


def test_remote_code_off_by_default(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "my_custom_model"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(QLoraKitError):
        load_model(bad, quant=QuantConfig(compute_dtype=torch.float32), progress=False)


# ---------------------------------------------------------------- nothing kept maps the checkpoint

SHARD = 4 * 10**6  # bytes; every shard a few MB, so one shard's pages stand out from RSS noise


@pytest.fixture(scope="module")
def sharded_dirs(tmp_path_factory):
    """A qwen2-shaped model (q/k/v biases, norms, embeddings, untied head) of about 13M weights, saved
    in shards of at most SHARD bytes, once in bf16 and once in fp32."""
    from tiny import make_config

    root = tmp_path_factory.mktemp("sharded")
    config = make_config("qwen2", hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        folder = root / str(dtype).removeprefix("torch.")
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD)
        out[dtype] = folder.resolve()
    return out


def mapped_files(folder) -> set[str]:
    """The files of `folder` that this process has memory-mapped now."""
    prefix = str(folder) + "/"
    with open("/proc/self/maps") as f:
        fields = [line.split(maxsplit=5) for line in f]
    return {x[5].strip() for x in fields if len(x) == 6 and x[5].startswith(prefix)}


def rss_file() -> int:
    """Bytes of file-backed pages mapped into this process (not the page cache: a page read through a
    mapping counts here only while the mapping lives)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and /proc/self/status")
@pytest.mark.parametrize("checkpoint", [torch.bfloat16, torch.float32], ids=["bf16-ckpt", "fp32-ckpt"])
@pytest.mark.parametrize("quant, dtype", [
    (QuantConfig(compute_dtype=torch.bfloat16), None),
    (QuantConfig(compute_dtype=torch.float32), None),
    (QuantConfig(bits=8, compute_dtype=torch.bfloat16), None),
    (None, torch.bfloat16),
], ids=["nf4-bf16", "nf4-fp32", "int8-bf16", "unquantised-bf16"])
def test_loaded_model_keeps_no_view_of_the_checkpoint(sharded_dirs, monkeypatch, checkpoint, quant, dtype):
    """safetensors maps a whole shard, and one tensor viewing it keeps all of it mapped, with every page
    read from it resident. After a load no checkpoint file may be mapped and RssFile must not have grown
    by a shard, whatever the dtypes (a cast to the dtype a tensor already has is no copy: a bf16 norm
    under bf16 compute); while loading, no shard may be opened with another still mapped."""
    folder = sharded_dirs[checkpoint]
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 4 and max(f.stat().st_size for f in shards) <= SHARD
    kwargs = dict(quant=quant, dtype=dtype, load_tokenizer=False, progress=True)  # the bar too holds no tensor

    warm, _ = load_model(folder, **kwargs)  # first use pages in library code, which would count as RssFile
    del warm
    gc.collect()
    before = rss_file()

    mapped_at_open = []
    real_open = tensorfiles.safe_open  # the loader opens every shard through it, one after another

    def watched_open(*args, **kw):
        mapped_at_open.append(mapped_files(folder))
        return real_open(*args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(tensorfiles, "safe_open", watched_open)
        model, _ = load_model(folder, **kwargs)

    assert len(mapped_at_open) >= 2 * len(shards)  # headers counted, then tensors read
    assert all(m == set() for m in mapped_at_open), "a shard was opened while another was still mapped"
    assert mapped_files(folder) == set()  # no reference cycle to wait for either: no gc.collect() here
    grown = rss_file() - before
    assert grown < max(f.stat().st_size for f in shards), f"RssFile grew by {grown / 2**20:.1f} MiB"
    want = dtype or quant.compute_dtype
    assert all(p.dtype == want for p in model.parameters() if p.is_floating_point())
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

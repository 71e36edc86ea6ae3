"""fetch_model: the notebooks' one way to name a model (demo name, folder or Hub id)."""

import fnmatch

import pytest

from qlora_kit import QLoraKitError, fetch_model
from qlora_kit.models import HUB_PATTERNS


def test_local_folder_comes_back_unchanged(tiny_dir):
    assert fetch_model(tiny_dir) == tiny_dir
    assert fetch_model(str(tiny_dir)) == tiny_dir


def test_hub_id_downloads_safetensors_and_tokenizer_only(monkeypatch, tmp_path):
    import huggingface_hub

    asked = {}

    def fake_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert fetch_model("Qwen/Qwen2.5-7B-Instruct") == tmp_path
    assert asked["repo_id"] == "Qwen/Qwen2.5-7B-Instruct"
    wanted = ["model-00001-of-00004.safetensors", "model.safetensors.index.json", "config.json",
              "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    unwanted = ["pytorch_model.bin", "consolidated.pt", "original/consolidated.00.pth"]
    assert all(any(fnmatch.fnmatch(f, p) for p in asked["patterns"]) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in HUB_PATTERNS)


def test_offline_or_unknown_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(QLoraKitError, match="could not download no-such-owner/no-such-model"):
        fetch_model("no-such-owner/no-such-model")
    with pytest.raises(QLoraKitError, match="neither a local folder nor a Hugging Face Hub id"):
        fetch_model(str(tmp_path / "missing" / "folder"))

"""The notebooks run top to bottom on CPU (their CI mode) under nbclient: a failing cell fails the test.

The kernel is a separate process: it gets QLORA_KIT_NOTEBOOK_MODE=cpu and a PYTHONPATH that puts this
checkout first, and the test checks that it runs in this interpreter's environment. Values can be
injected after the cell tagged "parameters", as papermill does.
"""

import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def execute(name: str, cwd: Path, monkeypatch, **parameters):
    """Run notebooks/NAME in `cwd`; returns the executed notebook."""
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    at = parameters_index(nb)
    injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    same_env = f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix"
    nb.cells[at + 1:at + 1] = [nbformat.v4.new_code_cell(injected + "\n" + same_env)]
    monkeypatch.setenv("QLORA_KIT_NOTEBOOK_MODE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, kind: str = "text") -> str:
    """All stream text (kind="text") or all output MIME types (kind="mime") of an executed notebook."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "mime":
                found.extend(out.get("data", {}))
            else:
                found.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebooks_are_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: clear outputs first"
    source = nb.cells[parameters_index(nb)].source
    assert "QLORA_KIT_NOTEBOOK_MODE" in source and 'MODEL = "smollm2"' in source
    assert {"quickstart.ipynb", "export_merged.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.slow
def test_quickstart_runs_on_cpu(tmp_path, monkeypatch):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
    run = tmp_path / "runs" / "quickstart"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "run" / "metrics.jsonl").read_text().count("\n") == 4     # MAX_STEPS in CPU mode
    text = outputs(nb)
    assert "memory plan: SmolLM2-135M-Instruct" in text and "T4 16GB (free)" in text
    assert "held-out loss" in text and text.count("after:") == 2
    assert "image/png" in outputs(nb, "mime")           # the loss plot, inline


@pytest.mark.slow
def test_export_merged_runs_on_cpu(tmp_path, monkeypatch):
    nb = execute("export_merged.ipynb", tmp_path, monkeypatch)
    merged = tmp_path / "runs" / "export" / "merged"
    import json

    report = json.loads((merged / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["merge_into"] == "dequantized"
    assert report["verify"]["missing_keys"] == [] and report["verify"]["unexpected_keys"] == []
    text = outputs(nb)
    assert "the export matches the fine-tuned model" in text and text.count("A: ") == 2

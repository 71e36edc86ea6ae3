"""Real data that installs from PyPI, as JSONL records the trainer reads.

chatterbot-corpus: about 2,000 English question/answer conversations (YAML) -> chat records,
located through the installed package, never downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import QLoraKitError


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise QLoraKitError(f"the {pip_name} package is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_records(categories: list[str] | None = None, exclude: tuple[str, ...] = ("tech_support",)) -> list[dict]:
    """Chat records from chatterbot-corpus' English YAML files (turns alternate user/assistant)."""
    import yaml

    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    available = [f.stem for f in files]
    if categories:
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise QLoraKitError(f"unknown chatterbot categories {unknown}; available: {', '.join(available)}")
        files = [f for f in files if f.stem in categories]
    else:
        files = [f for f in files if f.stem not in exclude]
    records = []
    for f in files:
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            if messages[-1]["role"] == "user":
                messages = messages[:-1]
            records.append({"messages": messages, "category": f.stem})
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path

"""Where an export may be written: never over or inside what it reads, over an earlier export only
with overwrite, and only when it fits on the disk. Both writers check here before they start."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Callable

from ..io import check_free, check_replace, refuse_overlap, unknown_entries
from ..models import model_location
from .shards import INDEX_NAME, SIDE_FILES

REPORT_KEYS = ("base", "adapter", "merge_into")
DISK_MARGIN = 64 * 2**20
DISK_ADVICE = "free some space, choose another --out, or export in bf16/fp16 instead of fp32"


def check_export_target(out: Path, base: str | Path, adapter: str | Path, overwrite: bool,
                        ours: Callable[[Path], bool] | None = None, what: str = "") -> bool:
    """Refuse an `out` that would destroy anything: the inputs, or something qlora_kit did not write.
    True when `out` holds an earlier export that the new one will replace."""
    refuse_overlap(out, {"base model folder": model_location(base), "adapter folder": adapter}, "--out")
    return check_replace(out, overwrite, ours or is_export_folder,
                         what or "a qlora_kit export (a folder with the exporter's report.json and nothing else)",
                         folder=ours is None)


def is_export_folder(folder: Path) -> bool:
    """A folder `export_merged` wrote: its report.json, and only the files an export holds."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict) or not all(k in report for k in REPORT_KEYS):
        return False
    patterns = ("model*.safetensors", INDEX_NAME, "config.json", "report.json", "report.txt", *SIDE_FILES)
    return not unknown_entries(folder, lambda name: any(fnmatch.fnmatch(name, pat) for pat in patterns))


def check_disk(out: Path, needed: int) -> None:
    """Fail before writing anything when the export cannot fit on the target disk."""
    check_free(out.parent, needed, "the export", DISK_ADVICE, margin=DISK_MARGIN)

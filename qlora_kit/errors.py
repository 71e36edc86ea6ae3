"""One exception type for every mistake a user can make, so callers can catch it in one place."""

from __future__ import annotations

import difflib
from typing import Iterable


class QLoraKitError(ValueError):
    """Bad input: the message says what is wrong and what to do next."""


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def first_few(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")

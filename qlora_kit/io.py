"""Writing without losing anything.

- A folder or file appears complete under its final name, or not at all (`atomic_dir`, `atomic_file`,
  `atomic_write_text`): it is written under a temporary name beside its place, then renamed.
- Nothing is replaced before its replacement is complete; the swap is one atomic rename exchange
  (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, the old copy kept under `.old-` until
  the new one is in place).
- What a command may replace is decided before it starts (`check_replace`): nothing, an empty
  folder, or, with overwrite, only something qlora_kit wrote; never anything it reads (`refuse_overlap`).
- Temporary names carry their writer: `.tmp-NAME-PID-HOSTTOKEN`. A hard kill leaves one behind; the
  next writer into the same place removes those whose process is gone (`sweep_stale`) and says so.
- A full disk is an error that says how much was needed and how much is free (`disk_full_as_error`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import QLoraKitError

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_TMP = re.compile(r"^\.(?P<kind>tmp|old)-(?P<name>.+)-(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]{6}$")
_LEGACY_TMP = re.compile(r"^\.tmp-(?P<name>.+)-[0-9a-f]{8}$")  # written before names carried their pid
LEGACY_AGE_S = 600          # a legacy temporary untouched this long belongs to no live writer
OTHER_HOST_AGE_S = 86400    # another machine's (shared disk): its pid cannot be checked here


def tmp_path(final: str | Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """A fresh temporary name beside `final`, carrying its writer's process id (this process's)."""
    final = Path(final)
    return final.with_name(f".{kind}-{final.name}-{pid or os.getpid()}-{_HOST}{uuid.uuid4().hex[:6]}")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it takes `out`'s place in one step.

    `overwrite` says the caller has checked that what is at `out` may be replaced (`check_replace`);
    without it an existing non-empty `out` is refused. An exception leaves `out` as it was and removes
    the temporary folder; a hard kill leaves it under its '.tmp-' name, which no reader mistakes for
    `out` and the next writer removes."""
    out = Path(out)
    if out.is_file():
        raise QLoraKitError(f"{out} is a file, not a folder: choose another path")
    if _holds_something(out) and not overwrite:
        raise QLoraKitError(f"{out} already exists: choose another folder or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent, out.name)
    tmp = tmp_path(out)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(new: Path, out: Path) -> None:
    """Put the complete folder `new` at `out`, replacing what is there in one step, then delete the old."""
    if not os.path.lexists(out):
        os.replace(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old contents
    else:
        old = tmp_path(out, "old")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file at; on success it takes `path`'s place.

    The caller has decided that `path` may be replaced (`check_replace`). The file is fsynced before
    the rename; an exception removes it and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    tmp = tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- what may be written where

def check_replace(out: str | Path, overwrite: bool, ours: Callable[[Path], bool], what: str,
                  flag: str = "overwrite (--overwrite)", folder: bool = True) -> bool:
    """May a new result be written at `out`? Returns True when it will replace something.

    Nothing there, or an empty folder: yes. Anything else only with `flag`, and only if `ours(out)`
    says qlora_kit wrote it (`what` names that kind of thing in the message)."""
    out = Path(out)
    if not os.path.lexists(out):
        return False
    kind = "folder" if folder else "file"
    if folder and out.is_file():
        raise QLoraKitError(f"{out} is a file, not a folder: choose another path")
    if not folder and out.is_dir():
        raise QLoraKitError(f"{out} is a folder: give the path of a file")
    if folder and out.is_dir() and not out.is_symlink() and not _holds_something(out):
        return False
    if not overwrite:
        raise QLoraKitError(f"{out} already exists: choose another {kind} or pass {flag} to replace it")
    if not ours(out):
        raise QLoraKitError(f"{out} is not {what}, so {flag.split(' (')[0]} will not replace it: choose another "
                            f"{kind}, or move it away yourself")
    return True


def refuse_overlap(out: str | Path, inputs: dict[str, str | Path | None], name: str = "output") -> None:
    """An output must not be, contain, or lie inside anything the command reads (`inputs`: label -> path)."""
    target = Path(os.path.realpath(out))
    for label, path in inputs.items():
        if path is None or not os.path.exists(path):
            continue
        source = Path(os.path.realpath(path))
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise QLoraKitError(f"{name} {out} {relation} the {label} {path}, which is being read: write to a place "
                            f"outside it")


def unknown_entries(folder: Path, known: Callable[[str], bool]) -> list[str]:
    """Names in `folder` that its writer would not have put there (temporary leftovers aside)."""
    return sorted(p.name for p in folder.iterdir() if not known(p.name) and not _is_leftover_name(p.name))


def _holds_something(folder: Path) -> bool:
    """A folder holds something worth keeping unless it is empty or holds only our temporary leftovers."""
    return folder.is_dir() and any(not _is_leftover_name(p.name) for p in folder.iterdir())


def _is_leftover_name(name: str) -> bool:
    return bool(_TMP.match(name) or _LEGACY_TMP.match(name))


# ---------------------------------------------------------------- leftovers of killed writers

def sweep_stale(folder: str | Path, name: str | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Remove the temporary folders and files that killed writers left in `folder` (only those for
    `name` when given), and say so. A temporary whose writer is still running is left alone.

    An '.old-' copy is what a two-rename swap moved aside: if its place is empty (the kill fell
    between the renames), it is put back instead of removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, restored = [], []
    for p in sorted(folder.iterdir()):
        m = _TMP.match(p.name)
        legacy = None if m else _LEGACY_TMP.match(p.name)
        target = (m or legacy)["name"] if (m or legacy) else None
        if target is None or (name is not None and target != name) or not _is_stale(p, m):
            continue
        if m and m["kind"] == "old" and not os.path.lexists(folder / target):
            os.replace(p, folder / target)
            restored.append(target)
            continue
        size = _tree_bytes(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(f"{p.name} ({human_bytes(size)})")
    if removed:
        say(f"qlora-kit: removed {len(removed)} temporary leftover(s) of an interrupted write in {folder}: "
            f"{', '.join(removed)}")
    for target in restored:
        say(f"qlora-kit: restored {folder / target}, which an interrupted replacement had moved aside")
    return removed


def _is_stale(p: Path, m: re.Match | None) -> bool:
    if m is None:  # legacy name: stale once nothing in it has changed for a while
        return time.time() - _newest_mtime(p) > LEGACY_AGE_S
    if m["host"] != _HOST:
        return time.time() - _newest_mtime(p) > OTHER_HOST_AGE_S
    return not _alive(int(m["pid"]))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(p: Path) -> float:
    times = [p.lstat().st_mtime]
    if p.is_dir():
        times += [q.lstat().st_mtime for q in p.rglob("*")]
    return max(times)


def _tree_bytes(p: Path) -> int:
    if p.is_dir() and not p.is_symlink():
        return sum(q.lstat().st_size for q in p.rglob("*") if q.is_file())
    return p.lstat().st_size


# ---------------------------------------------------------------- disk space

def free_bytes(where: str | Path) -> tuple[int, Path]:
    """(free bytes, the existing folder they were measured in) for a path that may not exist yet."""
    probe = Path(os.path.abspath(where))
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)  # safetensors (Rust) reports the OS error in its message
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def disk_full_error(where: str | Path, needed: int, what: str, advice: str, margin: int = 0) -> QLoraKitError:
    free, probe = free_bytes(where)
    return QLoraKitError(f"not enough disk space for {what}: it needs {human_bytes(needed + margin)} in {probe} but "
                         f"only {human_bytes(free)} is free; {advice}")


def check_free(where: str | Path, needed: int, what: str, advice: str, margin: int = 0) -> None:
    """Fail before writing anything when `needed` bytes (plus `margin`) will not fit at `where`."""
    free, _ = free_bytes(where)
    if free < needed + margin:
        raise disk_full_error(where, needed, what, advice, margin)


@contextlib.contextmanager
def disk_full_as_error(where: str | Path, needed: int, what: str, advice: str | Callable[[], str]):
    """Turn a disk that fills up while writing into a QLoraKitError with the needed and free bytes."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(where, needed, what, advice() if callable(advice) else advice) from None


def human_bytes(n: int | float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


# ---------------------------------------------------------------- the file system's guarantees

def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

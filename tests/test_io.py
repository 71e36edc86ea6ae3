"""Atomic writes: a file appears complete under its name, or the old one stays."""

import pytest

from qlora_kit.io import atomic_file, tmp_path as tmp_name


def test_atomic_file_replaces_only_on_success(tmp_path):
    out = tmp_path / "sub" / "m.bin"
    with atomic_file(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".tmp-m.bin-") and not out.exists()
        tmp.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(OSError, match="disk gone"):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk gone")
    assert out.read_bytes() == b"first" and sorted(p.name for p in out.parent.iterdir()) == ["m.bin"]


def test_atomic_file_removes_a_dead_writers_leftover(tmp_path, capsys):
    leftover = tmp_name(tmp_path / "m.bin", pid=2**22 + 1)  # above Linux's pid limit: no such process
    leftover.write_bytes(b"killed mid-write")
    with atomic_file(tmp_path / "m.bin") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    assert "removed 1 temporary leftover" in capsys.readouterr().out

"""engine.io.atomic: every writer's temp-then-rename; a failed write leaves the old file and no temp."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbip_engine.engine.io.atomic import atomic_path, atomic_save, atomic_write_bytes, atomic_write_text


def test_atomic_path_renames_on_success(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "a.parquet"
    with atomic_path(final, keep_suffix=True) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".a.parquet.")
        assert tmp.name.endswith(".tmp.parquet")
        tmp.write_text("new")
        assert not final.exists()
    assert final.read_text() == "new"
    assert [p.name for p in final.parent.iterdir()] == ["a.parquet"]


def test_atomic_path_keeps_old_file_on_error(tmp_path: Path) -> None:
    final = tmp_path / "a.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final, sync_dir=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_bytes_text_and_save(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "t.txt", "µm\n").read_bytes() == "µm\n".encode()
    atomic_save(tmp_path / "s.txt", lambda tmp: Path(tmp).write_text("saved"))
    assert (tmp_path / "s.txt").read_text() == "saved"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

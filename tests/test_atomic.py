"""engine.io.atomic: every writer's temp-then-rename; a failed write leaves the old file and no temp."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbip_engine.engine.io.atomic import atomic_path, atomic_save, atomic_write_bytes, atomic_write_text


def test_atomic_path_renames_on_success(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "a.parquet"
    with atomic_path(final, keep_suffix=True) as tmp:
        assert tmp.parent == final.parent / ".pbip-tmp" and tmp.name.startswith(".a.parquet.")
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


def test_outputs_respect_the_umask_not_mkstemps_0600(tmp_path: Path) -> None:
    """Issue 20 item 12: files written through mkstemp were 0600, unreadable by others on shared storage."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "manifest.json", "{}")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o007)
        with atomic_path(tmp_path / "m.tif") as tmp:
            tmp.write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "m.tif").stat().st_mode) == 0o660
    finally:
        os.umask(old)
    assert not (tmp_path / ".pbip-tmp").exists()  # the temp folder goes once empty

"""The one atomic single-file writer: old file or new file, never half of one, no leftovers."""

from __future__ import annotations

import os

import pytest

from fsar.atomic import FILE_MODE, atomic_file, clean_partial, make_parents, write_atomic


def test_a_write_replaces_the_file_with_an_ordinary_mode_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "deep" / "report.md"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert os.stat(target).st_mode & 0o777 == FILE_MODE  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "last.pt"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(target) as file:
        file.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_leftovers_of_a_killed_write_are_cleaned_by_name(tmp_path):
    (tmp_path / "last.pt.k3j2.partial").write_bytes(b"torn")
    (tmp_path / "metrics.jsonl.x9.partial").write_bytes(b"torn")
    (tmp_path / "keep.partial.txt").write_bytes(b"not ours")
    removed = clean_partial(tmp_path, "*.pt")
    assert [p.name for p in removed] == ["last.pt.k3j2.partial"]
    clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.partial.txt"]


def test_a_file_where_a_folder_must_be_is_not_a_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError) as error:
        make_parents(tmp_path / "afile" / "store.zarr" / "zarr.json")
    assert error.value.filename == str(tmp_path / "afile")

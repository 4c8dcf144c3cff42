"""A run's report files land as one set: all of them or, when the run fails while writing, none."""
from __future__ import annotations

import pytest

from tpusim.report.files import atomic_write_text, file_set


def test_a_set_lands_whole_and_leaves_other_files_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "summary.json").write_text("old")
    with file_set(tmp_path) as staging:
        atomic_write_text(staging / "summary.json", "new")
        atomic_write_text(staging / "layers.csv", "a,b\n")
        assert (tmp_path / "summary.json").read_text() == "old"  # nothing visible until the set is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.csv", "notes.txt", "summary.json"]
    assert (tmp_path / "summary.json").read_text() == "new" and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_set_interrupted_while_writing_leaves_the_previous_one(tmp_path):
    (tmp_path / "summary.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with file_set(tmp_path) as staging:
            atomic_write_text(staging / "layers.csv", "a,b\n")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert (tmp_path / "summary.json").read_text() == "old"

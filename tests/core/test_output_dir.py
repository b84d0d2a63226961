"""atomic_output_dir: the target appears only whole and marked as qtool's, is replaced only with force, only if
qtool wrote it and only on success."""

import json

import pytest

from qtool.core.errors import QtoolError
from qtool.core.output_dir import atomic_output_dir
from qtool.core.output_marker import MARKER_FILE


def test_creates_missing_parents_and_only_at_the_end(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(target) as staging:
        (staging / "x.txt").write_text("1")
        assert not target.exists() and staging.parent == target.parent
    assert (target / "x.txt").read_text() == "1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]
    assert json.loads((target / MARKER_FILE).read_text())["written_by"] == "qtool"


def test_existing_output_needs_force(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(QtoolError, match="already exists") as excinfo:
        with atomic_output_dir(target):
            pass
    assert "--force" in excinfo.value.hint
    with atomic_output_dir(target, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_only_what_qtool_wrote(tmp_path):
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("mine")
    as_file = tmp_path / "file_out"
    as_file.write_text("not a dir")
    for target, what in [(unrelated, "a folder qtool did not write"), (as_file, "a file")]:
        with pytest.raises(QtoolError, match=what) as excinfo:
            with atomic_output_dir(target, force=True):
                pass
        assert str(target) in excinfo.value.message
    assert (unrelated / "todo.txt").read_text() == "mine" and as_file.read_text() == "not a dir"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty, force=True) as staging:  # nothing in it to lose
        (staging / "x").write_text("1")
    assert (empty / "x").exists()


def test_failure_keeps_previous_output_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target, force=True) as staging:
            (staging / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE, "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_a_symlink_without_touching_its_target(tmp_path):
    real = tmp_path / "real"
    with atomic_output_dir(real) as staging:
        (staging / "keep.txt").write_text("keep")
    link = tmp_path / "link_out"
    link.symlink_to(real)
    with atomic_output_dir(link, force=True) as staging:
        (staging / "y").write_text("2")
    assert not link.is_symlink() and (link / "y").exists()
    assert (real / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_outputs_are_refused_without_litter(tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(QtoolError, match="current directory"):
        with atomic_output_dir(name, force=True):
            pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["work"]

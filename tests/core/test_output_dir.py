"""atomic_output_dir: the target appears only whole, is replaced only with force and only on success."""

import pytest

from qtool.core.errors import QtoolError
from qtool.core.output_dir import atomic_output_dir


def test_creates_missing_parents_and_only_at_the_end(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(target) as staging:
        (staging / "x.txt").write_text("1")
        assert not target.exists() and staging.parent == target.parent
    assert (target / "x.txt").read_text() == "1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_existing_output_needs_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(QtoolError, match="already exists") as excinfo:
        with atomic_output_dir(target):
            pass
    assert "--force" in excinfo.value.hint
    with atomic_output_dir(target, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_keeps_previous_output_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(target, force=True) as staging:
            (staging / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_a_file_and_a_symlink_without_touching_its_target(tmp_path):
    as_file = tmp_path / "file_out"
    as_file.write_text("not a dir")
    with atomic_output_dir(as_file, force=True) as staging:
        (staging / "x").write_text("1")
    assert (as_file / "x").exists()

    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    link = tmp_path / "link_out"
    link.symlink_to(real)
    with atomic_output_dir(link, force=True) as staging:
        (staging / "y").write_text("2")
    assert not link.is_symlink() and (link / "y").exists()
    assert (real / "keep.txt").read_text() == "keep"

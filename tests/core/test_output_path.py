"""check_output_path: the folders no output may replace, inputs kept apart from the output (folders and files),
and a parent that can't be written, each refused in one line."""

import os

import pytest

from qtool.core.errors import QtoolError
from qtool.core.output_path import check_output_path


@pytest.fixture
def in_work_dir(tmp_path, monkeypatch):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("output,says", [
    (".", "the current directory"),
    ("./", "the current directory"),
    ("sub/..", "the current directory"),
    ("..", "your home directory"),
    ("../..", "a folder that holds the current directory"),
    ("/", "a filesystem root"),
])
def test_folders_in_use_are_refused(in_work_dir, output, says):
    with pytest.raises(QtoolError, match=says):
        check_output_path(output)


def test_a_folder_holding_the_current_directory_is_refused(in_work_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(QtoolError, match="a folder that holds the current directory"):
        check_output_path(in_work_dir.parent)


def test_a_mount_point_is_refused():
    mount = next((m for m in ("/dev/shm", "/proc", "/sys", "/dev") if os.path.ismount(m)), None)
    if mount is None:
        pytest.skip("no mount point to try")
    with pytest.raises(QtoolError, match="a mount point"):
        check_output_path(mount)


def test_a_new_folder_is_returned_absolute(in_work_dir):
    assert check_output_path("out") == in_work_dir / "out"
    assert check_output_path("a/b/../c") == in_work_dir / "a" / "c"


def test_inputs_stay_apart_from_the_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    for output, inputs, says in [
        (model, [model], "is the input"),
        (model / "q", [model], "inside the input"),
        (tmp_path, [model], "is inside the output"),
        (gguf, [gguf], "is the input"),
        (tmp_path / "models", [gguf], "is inside the output"),
    ]:
        with pytest.raises(QtoolError, match=says):
            check_output_path(output, inputs)
    check_output_path(tmp_path / "models" / "m-gptq", [gguf])  # beside the input file is fine


def test_a_symlinked_output_onto_the_input_is_the_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(QtoolError, match="is the input"):
        check_output_path(tmp_path / "link", [model])


def test_a_parent_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(QtoolError, match=f"cannot write the output under {tmp_path / 'file'}: it is a file"):
        check_output_path(tmp_path / "file" / "out")
    if os.geteuid() == 0:
        pytest.skip("root writes any folder whatever its permissions")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(QtoolError, match=f"cannot write to the folder {locked}"):
        check_output_path(locked / "a" / "out")

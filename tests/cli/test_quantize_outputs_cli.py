"""`qtool quantize --output` where it must not write: the current, parent or home directory, a root, a mount point,
a folder that can't be written. Each is one line and exit 2, with nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app

runner = CliRunner()


def quantize(model: Path, calibration: Path, output: str, *extra: str):
    return runner.invoke(app, ["quantize", str(model), "--calibration", str(calibration), "--samples", "4", "--seqlen", "32",
                               "--output", output, *extra])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    # the progress bar has started (the library checks the output) and shows its empty first frame
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("quantize ")]
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize("output,says", [(".", "current directory"), ("..", "holds the current directory"), ("/", "root")])
def test_output_that_names_a_folder_in_use_is_refused(tmp_path, tiny_model_dir, calibration_text, monkeypatch, output, says):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    line = one_error_line(quantize(tiny_model_dir, calibration_text, output, "--force"))
    assert says in line
    assert sorted(tmp_path.rglob("*")) == before  # no ..qtool-partial, no ..previous-*


def test_home_and_a_mount_point_are_refused(tmp_path, tiny_model_dir, calibration_text, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert "home directory" in one_error_line(quantize(tiny_model_dir, calibration_text, str(home), "--force"))
    assert list(home.iterdir()) == []
    mount = next((m for m in ("/dev/shm", "/proc", "/sys") if os.path.ismount(m)), None)
    if mount is None:
        pytest.skip("no mount point to try")
    assert "mount point" in one_error_line(quantize(tiny_model_dir, calibration_text, mount, "--force"))


def test_output_that_cannot_be_written_is_one_line(tmp_path, tiny_model_dir, calibration_text):
    # /proc takes no new folders, even from root (a folder without write permission would not stop root)
    line = one_error_line(quantize(tiny_model_dir, calibration_text, "/proc/qtool-test/out"))
    assert "/proc" in line and "write" in line
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        line = one_error_line(quantize(tiny_model_dir, calibration_text, str(locked / "out")))
        assert str(locked) in line and not any(locked.iterdir())


def test_discard_resume_is_an_option(tiny_model_dir, calibration_text, tmp_path):
    result = quantize(tiny_model_dir, calibration_text, str(tmp_path / "out"), "--discard-resume", "--json")
    assert result.exit_code == 0, result.output

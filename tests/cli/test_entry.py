"""The console script's guard (qtool.cli.entry.main): a bug is one line and exit 3 (its traceback with --debug),
a QtoolError or a usage error exit 2, Ctrl-C one line and exit 130 at any moment, start-up imports included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qtool.cli import entry
from qtool.cli import main as cli_main
from qtool.core.errors import QtoolError
from qtool.validate import dispatch

REPO = Path(__file__).resolve().parents[2]
INTERNAL = "internal error: RuntimeError: boom on two lines; rerun with --debug and report it"


def run_entry(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ended:
        entry.main(list(args))
    captured = capsys.readouterr()
    return ended.value.code, captured.out, captured.err


@pytest.fixture
def validate_raises(monkeypatch):
    """`qtool validate` (which imports validate_path when it runs) raises the given exception."""

    def arrange(exc: BaseException) -> None:
        def validate_path(*args, **kwargs):
            raise exc

        monkeypatch.setattr(dispatch, "validate_path", validate_path)

    return arrange


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("QTOOL_DEBUG", raising=False)


def test_an_unexpected_exception_is_one_line_and_exit_3(capsys, validate_raises):
    validate_raises(RuntimeError("boom on\ntwo lines"))
    code, out, err = run_entry(capsys, "validate", "gptq-4bit-g128")
    assert code == 3
    assert err == INTERNAL + "\n" and out == ""


def test_debug_shows_the_exception_itself(capsys, validate_raises):
    validate_raises(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):  # the interpreter prints its traceback
        entry.main(["--debug", "validate", "gptq-4bit-g128"])


def test_qtool_debug_env_shows_it_too(capsys, validate_raises, monkeypatch):
    validate_raises(RuntimeError("boom"))
    monkeypatch.setenv("QTOOL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        entry.main(["validate", "gptq-4bit-g128"])


def test_debug_shows_a_qtool_error_traceback(capsys, validate_raises):
    validate_raises(QtoolError("bad thing", "fix it"))
    with pytest.raises(QtoolError, match="bad thing"):
        entry.main(["--debug", "validate", "gptq-4bit-g128"])


def test_a_qtool_error_stays_one_red_line_and_exit_2(capsys, tmp_path):
    code, out, err = run_entry(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert err.startswith("error: config file") and "(pass a .yaml" in err and len(err.strip().splitlines()) == 1


def test_a_usage_error_stays_exit_2(capsys):
    code, _, err = run_entry(capsys, "tune")
    assert code == 2 and "Missing argument" in err and "internal error" not in err


def test_success_and_version_exit_0(capsys):
    code, out, _ = run_entry(capsys, "validate", "gptq-4bit-g128")
    assert code == 0 and "ok" in out
    code, out, _ = run_entry(capsys, "--version")
    assert code == 0 and out.startswith("qtool ")


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys, validate_raises):
    validate_raises(KeyboardInterrupt())
    code, out, err = run_entry(capsys, "validate", "gptq-4bit-g128")
    assert code == 130 and err == "interrupted: nothing was written to the output\n"


def test_ctrl_c_outside_any_command_is_one_line_too(capsys, monkeypatch):
    # the root callback runs where Typer turns KeyboardInterrupt into a silent exit 130
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "quiet_transformers_progress", interrupted)
    code, _, err = run_entry(capsys, "validate", "gptq-4bit-g128")
    assert code == 130 and err == "interrupted\n"


def test_debug_is_read_from_the_root_options_only():
    assert entry._root_flag(["--debug", "run", "m"], "--debug")
    assert entry._root_flag(["-v", "--debug", "run"], "--debug")
    assert not entry._root_flag(["run", "m", "--prompt", "--debug"], "--debug")


# A real process and a real SIGINT: the script blocks (in a test-only import hook, so the moment is known) while
# importing MODULE, then the test interrupts it.
BLOCKING_RUN = """
import sys, time

class BlockOn:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            print("blocked", flush=True)
            time.sleep(60)
        return None

sys.meta_path.insert(0, BlockOn())
from qtool.cli.entry import main
main({args!r})
"""


def interrupt_while_importing(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = textwrap.dedent(BLOCKING_RUN).format(module=module, args=list(args))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert process.stdout.readline() == "blocked\n", process.stderr.read()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130():
    result = interrupt_while_importing("qtool.cli.main", "--help")
    assert result.returncode == 130, result.stderr
    assert result.stderr == "interrupted\n" and result.stdout == ""


def test_ctrl_c_while_a_command_imports_the_library_is_one_line_and_exit_130():
    # qtool validate imports the validators when it runs
    result = interrupt_while_importing("qtool.validate.dispatch", "validate", "gptq-4bit-g128")
    assert result.returncode == 130, result.stderr
    assert result.stderr == "interrupted: nothing was written to the output\n" and result.stdout == ""


def test_python_dash_m_qtool_is_the_console_script():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "qtool", "validate", str(REPO / "no-such.yaml")], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("error: config file"), result.stderr


def test_the_console_script_is_the_guarded_entry():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'qtool = "qtool.cli.entry:main"' in pyproject

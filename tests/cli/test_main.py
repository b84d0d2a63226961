"""The Typer app itself: version, help listing only built commands, --debug."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.core.errors import QtoolError

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"qtool {version('qtool')}"


def test_help_lists_registered_commands_only():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {c.name for c in app.registered_commands}
    for name in listed:
        assert name in result.output
    assert "finetune" in {group.name for group in app.registered_groups} and "finetune" in result.output


def test_debug_lets_the_error_through_with_its_traceback(tmp_path):
    quiet = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert quiet.exit_code == 2 and quiet.stderr.startswith("error: config file")
    loud = runner.invoke(app, ["--debug", "validate", str(tmp_path / "missing.yaml")])
    assert isinstance(loud.exception, QtoolError) and "does not exist" in str(loud.exception)


def test_debug_is_forgotten_by_the_next_run(tmp_path):
    runner.invoke(app, ["--debug", "validate", str(tmp_path / "missing.yaml")])
    assert runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")]).exit_code == 2

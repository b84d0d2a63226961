"""The Typer app itself: version, help listing only built commands, --debug."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from qtool.cli.main import app

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
    for absent in ("finetune",):
        assert absent not in listed

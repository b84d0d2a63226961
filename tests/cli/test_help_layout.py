"""--help in Typer's idiom and readable: flags show no `<bool>`, quantize shows the defaults its preset gives,
and every command's help fits 80 columns without cutting an option's name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.config.schema import QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, read_config_file

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("quantize", "convert", "validate", "eval", "run", "tune")
WIDE = {"COLUMNS": "240", "TERMINAL_WIDTH": "240"}


def help_text(*command: str, env: dict[str, str]) -> str:
    result = runner.invoke(app, [*command, "--help"], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def option_names(*command: str) -> list[str]:
    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    return [opt for param in click_command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")]


def row_of(text: str, option: str) -> str:
    """The help of `option`: its row and the lines under it up to the next option's row, as one line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(rf"│\s*\*?\s*{re.escape(option)}(?![\w-])", line)]
    assert starts, f"{option} is not in the help"
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if re.match(r"│\s*\*?\s*-", line) or not line.startswith("│"):
            break
        block.append(line)
    return " ".join(" ".join(line.strip("│ ").split()) for line in block)


@pytest.mark.parametrize("command", [(), *[(name,) for name in COMMANDS]], ids=lambda c: " ".join(c) or "qtool")
def test_flags_show_no_type(command):
    text = help_text(*command, env=WIDE)
    assert "<bool>" not in text
    assert re.search(r"--help +Show this message", text)


def help_at_80_columns(*command: str) -> str:
    """As a terminal 80 columns wide shows it: in a process of its own, since Typer reads TERMINAL_WIDTH once per
    process (other tests render at 240)."""
    env = {key: value for key, value in os.environ.items() if key != "TERMINAL_WIDTH"}
    env.update(COLUMNS="80", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "qtool", *command, "--help"], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("command", [(), *[(name,) for name in COMMANDS]], ids=lambda c: " ".join(c) or "qtool")
def test_help_fits_80_columns_without_cutting_names(command):
    text = help_at_80_columns(*command)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text
    for option in option_names(*command):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{option} is cut or missing"


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize(
    "option, preset, value",
    [
        ("--bits", QUANTIZE_DEFAULT_PRESET, lambda config: config.bits),
        ("--group-size", QUANTIZE_DEFAULT_PRESET, lambda config: config.group_size),
        ("--sym", QUANTIZE_DEFAULT_PRESET, lambda config: "sym" if config.sym else "no-sym"),
        ("--desc-act", QUANTIZE_DEFAULT_PRESET, lambda config: "desc-act" if config.desc_act else "no-desc-act"),
        ("--samples", QUANTIZE_DEFAULT_PRESET, lambda config: config.calibration.samples),
        ("--damp", QUANTIZE_DEFAULT_PRESET, lambda config: config.damp_percent),
        ("--bpw", QUANTIZE_EXL2_PRESET, lambda config: config.bpw),
        ("--head-bits", QUANTIZE_EXL2_PRESET, lambda config: config.head_bits),
    ],
)
def test_quantize_shows_the_defaults_of_its_preset(option, preset, value):
    expected = f"[default: ({shown(value(read_config_file(preset)))}, preset {preset})"
    assert expected in row_of(help_text("quantize", env=WIDE), option)


def test_a_default_that_differs_between_the_presets_names_both(monkeypatch):
    """An option both formats read shows the GPTQ preset's value, and the EXL2 preset's too where that differs
    (today's presets agree on every such option: the EXL2 preset is stood in for with a different damp)."""
    from qtool.cli import preset_defaults

    real = preset_defaults.preset_values
    assert real(QUANTIZE_EXL2_PRESET)["compute_dtype"] == real(QUANTIZE_DEFAULT_PRESET)["compute_dtype"]
    assert preset_defaults.shared_default("compute_dtype") == f"{real(QUANTIZE_DEFAULT_PRESET)['compute_dtype']}, preset {QUANTIZE_DEFAULT_PRESET}"
    gptq_damp = real(QUANTIZE_DEFAULT_PRESET)["damp"]
    monkeypatch.setattr(preset_defaults, "preset_values", lambda preset: (
        {**real(preset), "damp": gptq_damp * 2} if preset == QUANTIZE_EXL2_PRESET else real(preset)))
    assert preset_defaults.shared_default("damp") == (f"{gptq_damp:g}, preset {QUANTIZE_DEFAULT_PRESET}; "
                                                      f"{gptq_damp * 2:g} with --format exl2")


def test_options_without_a_preset_default_show_none():
    text = help_text("quantize", env=WIDE)
    for option in ("--measurement", "--target-vram", "--config", "--force"):
        assert "[default:" not in row_of(text, option), option

"""Bad numbers are refused before any model loads: counts by Typer (min=...), exit 2 naming the option; sampling
settings that are not finite or out of range by one red line, exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.core.errors import QtoolError

from cli_checks import one_line_error, refused_by_typer, stop_model_loads

runner = CliRunner()


@pytest.fixture(autouse=True)
def loads(monkeypatch) -> list[str]:
    """Models the commands load; loading stops with an error."""
    return stop_model_loads(monkeypatch, QtoolError("the test stops at the model load"))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    return path


def test_the_fixture_sees_a_load(text, loads):
    result = runner.invoke(app, ["eval", "some-model", "--perplexity", str(text), "--device", "cpu", "--windows", "1"])
    assert "the test stops at the model load" in one_line_error(result) and loads == ["some-model"]


@pytest.mark.parametrize("option, value", [("--windows", "0"), ("--seqlen", "0"), ("--windows", "-3")])
def test_eval_counts_are_refused_before_the_model_loads(text, loads, option, value):
    result = runner.invoke(app, ["eval", "some-model", "--perplexity", str(text), "--device", "cpu", option, value])
    assert "greater than or equal to 1" in refused_by_typer(result, option)
    assert loads == []


@pytest.mark.parametrize("option, value, least", [("--max-new-tokens", "0", 1), ("--top-k", "-1", 0)])
def test_run_counts_are_refused_before_the_model_loads(loads, option, value, least):
    result = runner.invoke(app, ["run", "some-model", "--prompt", "hi", "--device", "cpu", option, value])
    assert f"greater than or equal to {least}" in refused_by_typer(result, option)
    assert loads == []


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--temperature", "nan", "--temperature nan must be a finite number"),
        ("--temperature", "inf", "--temperature inf must be a finite number"),
        ("--temperature", "-inf", "--temperature -inf must be a finite number"),
        ("--temperature", "-0.5", "--temperature -0.5 must not be negative"),
        ("--top-p", "nan", "--top-p nan must be in (0, 1]"),
        ("--top-p", "inf", "--top-p inf must be in (0, 1]"),
        ("--top-p", "0", "--top-p 0.0 must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p 1.5 must be in (0, 1]"),
    ],
)
def test_run_sampling_settings_are_one_line_before_the_model_loads(loads, option, value, message):
    result = runner.invoke(app, ["run", "some-model", "--prompt", "hi", "--device", "cpu", option, value])
    assert message in one_line_error(result)
    assert loads == []


@pytest.mark.parametrize("option", ["--samples", "--seqlen"])
def test_quantize_calibration_counts_are_refused_by_typer(tmp_path, option):
    result = runner.invoke(app, ["quantize", str(tmp_path / "model"), "--output", str(tmp_path / "out"), option, "0"])
    assert "greater than or equal to 1" in refused_by_typer(result, option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--samples", "0"), ("--seqlen", "0"), ("--context-length", "-1")])
def test_convert_counts_are_refused_by_typer(tmp_path, option, value):
    result = runner.invoke(app, ["convert", "gptq", "exl2", str(tmp_path / "src"), str(tmp_path / "out"), option, value])
    refused_by_typer(result, option)

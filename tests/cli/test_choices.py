"""Options with a fixed set of values are Typer choices: --help lists them, the shell completes them, and Typer
refuses any other value with exit code 2 and an error naming the option, before the command runs. The expected
choices are the library's own lists, which the library validates against."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from qtool.checkpoints.sources import DTYPES
from qtool.cli.main import app
from qtool.convert.convert import SOURCE_FORMATS, TARGET_FORMATS
from qtool.config.schema import BITS, CHECKPOINT_FORMATS, COMPUTE_DTYPES, EXL2_HEAD_BITS, METHODS, OUTPUT_FORMATS
from qtool.convert.exl2_gptq import GPTQ_BITS
from qtool.kernels.registry import BACKEND_CHOICES
from qtool.runtime.kv_cache_names import KV_CACHE_KINDS
from qtool.runtime.engine.llm_engine import SPECULATIVE_METHODS

from cli_checks import refused_choice

runner = CliRunner()
BACKENDS = ("auto", *BACKEND_CHOICES)

# (command, option or argument metavar, the library's choices)
CHOICES = [
    ("quantize", "--method", METHODS),
    ("quantize", "--bits", BITS),
    ("quantize", "--format", OUTPUT_FORMATS),
    ("quantize", "--checkpoint-format", CHECKPOINT_FORMATS),
    ("quantize", "--compute-dtype", COMPUTE_DTYPES),
    ("quantize", "--head-bits", EXL2_HEAD_BITS),
    ("convert", "SRC_FORMAT", SOURCE_FORMATS),
    ("convert", "DST_FORMAT", TARGET_FORMATS),
    ("convert", "--bits", GPTQ_BITS),
    ("convert", "--head-bits", EXL2_HEAD_BITS),
    ("eval", "--dtype", tuple(DTYPES)),
    ("eval", "--backend", BACKENDS),
    ("eval", "--kv-cache", KV_CACHE_KINDS),
    ("run", "--dtype", tuple(DTYPES)),
    ("run", "--backend", BACKENDS),
    ("run", "--kv-cache", KV_CACHE_KINDS),
    ("run", "--speculate", SPECULATIVE_METHODS),
]


def help_line(command: str, name: str) -> str:
    """The line of `qtool COMMAND --help` that shows option (or argument) `name`; wide enough for one line each."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]  # the panels, not the usage line
    lines = [line for line in rows if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line)]
    assert lines, f"{name} is not in qtool {command} --help"
    return lines[0]


@pytest.mark.parametrize("command, name, choices", CHOICES)
def test_help_lists_the_choices(command, name, choices):
    assert "|".join(map(str, choices)) in help_line(command, name)


# the valid arguments of each command, and where its options go; the paths do not exist, so a command that ran
# would fail with its own error instead
INVOCATIONS = {
    "quantize": lambda tmp, *option: ["quantize", str(tmp / "no-model"), "--output", str(tmp / "out"), *option],
    "convert": lambda tmp, *option: ["convert", "gptq", "exl2", str(tmp / "src"), str(tmp / "out"), *option],
    "eval": lambda tmp, *option: ["eval", str(tmp / "no-model"), "--perplexity", str(tmp / "text.txt"), *option],
    "run": lambda tmp, *option: ["run", str(tmp / "no-model"), "--prompt", "hi", *option],
}


@pytest.mark.parametrize(
    "command, name, value, choices",
    [
        ("quantize", "--method", "gtpq", METHODS),
        ("quantize", "--bits", "5", BITS),
        ("quantize", "--format", "exl3", OUTPUT_FORMATS),
        ("quantize", "--checkpoint-format", "v3", CHECKPOINT_FORMATS),
        ("quantize", "--compute-dtype", "float64", COMPUTE_DTYPES),
        ("quantize", "--head-bits", "4", EXL2_HEAD_BITS),
        ("convert", "--bits", "5", GPTQ_BITS),
        ("convert", "--head-bits", "5", EXL2_HEAD_BITS),
        ("eval", "--dtype", "int3", tuple(DTYPES)),
        ("eval", "--backend", "marlin", BACKENDS),
        ("run", "--dtype", "int4", tuple(DTYPES)),
        ("run", "--backend", "marlin", BACKENDS),
        ("eval", "--kv-cache", "int8", KV_CACHE_KINDS),
        ("run", "--kv-cache", "q2", KV_CACHE_KINDS),
    ],
)
def test_an_invalid_option_value_is_refused_by_typer(tmp_path, command, name, value, choices):
    result = runner.invoke(app, INVOCATIONS[command](tmp_path, name, value))
    refused_choice(result, name, value, choices)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "formats, name, value, choices",
    [(["gptx", "exl2"], "SRC_FORMAT", "gptx", SOURCE_FORMATS), (["gptq", "gguf"], "DST_FORMAT", "gguf", TARGET_FORMATS)],
)
def test_an_invalid_convert_format_is_refused_by_typer(tmp_path, formats, name, value, choices):
    result = runner.invoke(app, ["convert", *formats, str(tmp_path / "src"), str(tmp_path / "out")])
    refused_choice(result, name, value, choices)


def test_convert_formats_are_case_insensitive_as_before(tmp_path):
    # the conversion lower-cases the names itself; Typer must let GPTQ through for it to do so
    result = runner.invoke(app, ["convert", "GPTQ", "Float", str(tmp_path / "src"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "is not a checkpoint directory" in result.stderr, result.output


@pytest.mark.parametrize("command", ["quantize", "eval", "run"])
def test_device_takes_cuda_n(tmp_path, command):
    """--device stays text, so cuda:N reaches the library (which accepts it, or says no CUDA device is there)."""
    result = runner.invoke(app, INVOCATIONS[command](tmp_path, "--device", "cuda:1"))
    assert result.exit_code == 2 and "Invalid value" not in result.stderr, result.output


def complete(words: str) -> list[str]:
    """What bash completion offers for the last word of `words` (the protocol --install-completion sets up)."""
    env = {"_QTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    result = runner.invoke(app, [], prog_name="qtool", env=env)
    assert result.exit_code == 0, result.output
    return result.stdout.split()


@pytest.mark.parametrize(
    "words, expected",
    [
        ("qtool quantize --method ", METHODS),
        ("qtool quantize --bits ", BITS),
        ("qtool quantize --checkpoint-format ", CHECKPOINT_FORMATS),
        ("qtool quantize --compute-dtype ", COMPUTE_DTYPES),
        ("qtool quantize --format e", ("exl2",)),
        ("qtool convert ", SOURCE_FORMATS),
        ("qtool convert gptq ", TARGET_FORMATS),
        ("qtool eval model --dtype ", tuple(DTYPES)),
        ("qtool run model --backend ", BACKENDS),
        ("qtool run model --device ", ("auto", "cpu", "cuda")),
        ("qtool validate path --device c", ("cpu", "cuda")),
    ],
)
def test_the_shell_completes_the_choices(words, expected):
    assert complete(words) == [str(choice) for choice in expected]


def test_completion_can_be_installed():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0 and "--install-completion" in result.stdout and "--show-completion" in result.stdout

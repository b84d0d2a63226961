"""Which qtool commands read each kind of input, with the arguments that make a run cheapest on the tiny model,
and one invocation through Typer's CliRunner in a workspace (what it printed, its exit code, what it wrote)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from qtool.cli.main import app

CPU = ["--device", "cpu"]


def validate(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    return ["validate", str(model), "--json"]


def eval_perplexity(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    return ["eval", str(model), "--perplexity", str(text), "--windows", "1", "--seqlen", "8", *CPU, "--json"]


def run_one_token(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    return ["run", str(model), "--prompt", "the fox", "--max-new-tokens", "1", "--temperature", "0", "--raw", *CPU, "--json"]


def quantize_rtn(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    return ["quantize", str(model), "--output", str(out), "--method", "rtn", "--bits", "4", "--group-size", "32", "--no-desc-act",
            "--no-static-groups", "--calibration", str(text), "--samples", "1", "--seqlen", "8", *CPU, "--json"]


def quantize_with_config(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    """The mutated input is the --config file; the model is the intact float one."""
    return ["quantize", str(float_dir), "--output", str(out), "--config", str(model), *CPU, "--json"]


def convert_gptq_float(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    return ["convert", "gptq", "float", str(model), str(out), "--json"]


def convert_exl2_float(model: Path, out: Path, text: Path, float_dir: Path) -> list[str]:
    return ["convert", "exl2", "float", str(model), str(out), "--json"]


COMMANDS = {f.__name__: f for f in (validate, eval_perplexity, run_one_token, quantize_rtn, quantize_with_config, convert_gptq_float, convert_exl2_float)}
# The commands that take each kind of input. validate refuses a .gguf file (one error line) and is kept there for that.
COMMANDS_OF_KIND = {
    "float-safetensors": ("validate", "eval_perplexity", "run_one_token", "quantize_rtn"),
    "float-config-json": ("validate", "eval_perplexity", "run_one_token", "quantize_rtn"),
    "gptq-safetensors": ("validate", "eval_perplexity", "run_one_token", "convert_gptq_float"),
    "gptq-config-json": ("validate", "eval_perplexity", "run_one_token", "convert_gptq_float"),
    "gptq-quantize-config-json": ("validate", "eval_perplexity", "run_one_token", "convert_gptq_float"),
    "exl2-safetensors": ("validate", "eval_perplexity", "run_one_token", "convert_exl2_float"),
    "exl2-config-json": ("validate", "eval_perplexity", "run_one_token", "convert_exl2_float"),
    "gguf": ("validate", "eval_perplexity", "run_one_token", "quantize_rtn"),
    "config-yaml": ("validate", "quantize_with_config"),
    "config-json": ("validate", "quantize_with_config"),
    "config-toml": ("validate", "quantize_with_config"),
}
WRITES_OUTPUT = {"quantize_rtn", "quantize_with_config", "convert_gptq_float", "convert_exl2_float"}


@dataclass
class Invocation:
    command: str
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    output: Path
    before: dict[str, int]  # workspace files (relative path -> size) before the run
    after: dict[str, int]


def tree(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file() or p.is_dir()}


def invoke(command: str, workspace: Path, model: Path, text: Path, float_dir: Path) -> Invocation:
    out = workspace / "out"
    args = COMMANDS[command](model, out, text, float_dir)
    before = tree(workspace)
    # QTOOL_DEBUG would turn every error into a traceback: the property is about what users see without it
    env = {"QTOOL_DEBUG": "0", "COLUMNS": "200"}
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=True)
    return Invocation(command, args, result.exit_code, result.stdout, result.stderr, result.exception if not isinstance(result.exception, SystemExit) else None,
                      out, before, tree(workspace))

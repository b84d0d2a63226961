"""The table of `qtool quantize` flags -> QuantConfig fields: it covers every config field that has a flag and
every flag of the command that sets one, names each flag as the command spells it, and each flag given on the
command line reaches the config the library receives (with the library's plain types, not the CLI's Enums)."""

from __future__ import annotations

import dataclasses
from functools import reduce

import pytest
import typer.main
from typer.testing import CliRunner

from qtool.cli.config_flags import QUANT_CONFIG_FLAGS, flag_of
from qtool.cli.main import app
from qtool.config.schema import GPTQ_ONLY_FIELDS, QuantConfig
from qtool.core.errors import QtoolError
from qtool.quant import exl2_pipeline
from qtool.quant import pipeline as quantize_pipeline

runner = CliRunner()

# set only in a config file: no flag on purpose
FLAGLESS_FIELDS = {"schema_version", "damp_auto_increment"}
# options of `qtool quantize` that are not config fields
NOT_CONFIG_PARAMETERS = {"model", "output", "measurement", "config_file", "device", "force", "discard_resume", "verbose", "as_json", "help",
                         "nproc", "jobs", "max_shard_size", "gpu_memory"}


def config_fields() -> set[str]:
    """Every QuantConfig field, those of the calibration block as calibration.x."""
    top = {f.name for f in dataclasses.fields(QuantConfig)} - {"calibration"}
    return top | {f"calibration.{f.name}" for f in dataclasses.fields(QuantConfig().calibration)}


def quantize_parameters() -> dict:
    return {param.name: param for param in typer.main.get_command(app).commands["quantize"].params}


def test_the_table_covers_every_config_field_that_has_a_flag():
    fields = [entry.field for entry in QUANT_CONFIG_FLAGS]
    assert len(fields) == len(set(fields))
    assert set(fields) == config_fields() - FLAGLESS_FIELDS


def test_the_table_covers_every_flag_that_sets_the_config_as_the_command_spells_it():
    parameters = quantize_parameters()
    assert {entry.parameter for entry in QUANT_CONFIG_FLAGS} == set(parameters) - NOT_CONFIG_PARAMETERS
    for entry in QUANT_CONFIG_FLAGS:
        assert entry.flag in parameters[entry.parameter].opts, entry


@pytest.fixture
def received(monkeypatch):
    """The QuantConfig the quantize pipelines receive; the pipeline stops there with an error (exit 2)."""
    configs: list[QuantConfig] = []

    def pipeline(model, config, output, **kwargs):
        configs.append(config)
        raise QtoolError("stopped by the test")

    # the command imports the pipelines when it runs (start-up stays torch-free), so they are replaced where they live
    monkeypatch.setattr(quantize_pipeline, "quantize_model", pipeline)
    monkeypatch.setattr(exl2_pipeline, "quantize_model_exl2", pipeline)

    def run(tmp_path, *flags: str) -> QuantConfig:
        result = runner.invoke(app, ["quantize", str(tmp_path / "model"), "--output", str(tmp_path / "out"), *flags])
        assert result.exit_code == 2 and "stopped by the test" in result.stderr, result.output
        return configs.pop()

    return run


EXL2 = ["--format", "exl2"]
# (flags the baseline has too, the flag under test, the config field, the value the library must receive)
OVERRIDES = [
    ([], ["--method", "rtn"], "method", "rtn"),
    ([], ["--bits", "3"], "bits", 3),
    ([], ["--group-size", "64"], "group_size", 64),
    ([], ["--sym"], "sym", True),
    ([], ["--no-desc-act"], "desc_act", False),
    ([], ["--no-static-groups"], "static_groups", False),
    ([], ["--no-true-sequential"], "true_sequential", False),
    ([], ["--damp", "0.05"], "damp_percent", 0.05),
    ([], ["--mse"], "mse", True),
    ([], ["--no-refine-scales"], "refine_scales", False),
    ([], ["--compute-dtype", "float16"], "compute_dtype", "float16"),
    ([], ["--checkpoint-format", "gptq_v2"], "checkpoint_format", "gptq_v2"),
    ([], ["--format", "exl2"], "output_format", "exl2"),
    (EXL2, ["--bpw", "5.5"], "bpw", 5.5),
    (EXL2, ["--head-bits", "6"], "head_bits", 6),
    (EXL2, ["--target-vram", "12"], "target_vram_gb", 12.0),
    (EXL2 + ["--target-vram", "12"], ["--context-length", "4096"], "context_length", 4096),
    ([], ["--calibration", "{text}"], "calibration.source", "{text}"),
    ([], ["--samples", "16"], "calibration.samples", 16),
    ([], ["--seqlen", "64"], "calibration.seqlen", 64),
    ([], ["--seed", "7"], "calibration.seed", 7),
    ([], ["--batch-tokens", "8192"], "calibration.batch_tokens", 8192),
]


def test_every_field_of_the_table_is_tried():
    assert {field for _, _, field, _ in OVERRIDES} == {entry.field for entry in QUANT_CONFIG_FLAGS}


@pytest.mark.parametrize("base, flag, field, expected", OVERRIDES, ids=[field for _, _, field, _ in OVERRIDES])
def test_each_flag_reaches_the_config_the_library_receives(tmp_path, received, base, flag, field, expected):
    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox")
    flag = [part.format(text=text) for part in flag]
    expected = expected.format(text=text) if isinstance(expected, str) else expected
    value_of = lambda config: reduce(getattr, field.split("."), config)  # noqa: E731
    assert value_of(received(tmp_path, *base)) != expected, "the flag must change the config to show it arrives"
    value = value_of(received(tmp_path, *base, *flag))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "flag, named",
    [(["--bits", "4"], "--bits"), (["--group-size", "64"], "--group-size"), (["--no-sym"], "--sym"),
     (["--static-groups"], "--static-groups"), (["--mse"], "--mse"), (["--checkpoint-format", "gptq_v2"], "--checkpoint-format")],
)
def test_a_gptq_only_flag_with_exl2_is_named_as_spelled(tmp_path, flag, named):
    result = runner.invoke(app, ["quantize", str(tmp_path / "model"), "--output", str(tmp_path / "out"), *EXL2, *flag])
    assert result.exit_code == 2 and f"error: {named} does not apply to --format exl2" in result.stderr, result.output


def test_flag_of_names_every_gptq_only_field():
    assert [flag_of(field) for field in GPTQ_ONLY_FIELDS] == ["--bits", "--group-size", "--sym", "--static-groups", "--mse", "--checkpoint-format"]

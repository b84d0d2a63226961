"""configs/schema.py: reading (YAML/JSON/TOML/presets), exact round trips, overrides, and every validation rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from qtool.core.errors import QtoolError
from qtool.core.findings import Level
from qtool.config.schema import (
    BITS,
    CHECKPOINT_FORMATS,
    SCHEMA_VERSION,
    CalibrationConfig,
    QuantConfig,
    apply_overrides,
    check_config,
    config_from_dict,
    preset_names,
    read_config_file,
    resolve_config,
    validate_config,
)


def only(findings, level: Level) -> list[str]:
    return [f"{f.where}: {f.message}" for f in findings if f.level is level]


def with_calibration(**changes) -> QuantConfig:
    return dataclasses.replace(QuantConfig(), calibration=dataclasses.replace(CalibrationConfig(), **changes))


# ---------------------------------------------------------------- reading and round trips


def test_defaults_are_valid_and_silent():
    assert validate_config(QuantConfig()) == []


def test_json_round_trip_is_exact(tmp_path):
    config = QuantConfig(bits=3, group_size=64, sym=False, desc_act=True, static_groups=True, damp_percent=0.05,
                         checkpoint_format="gptq_v2", calibration=CalibrationConfig(source="wikitext", samples=7, seqlen=99, seed=3))
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    again = read_config_file(path)
    assert again == config
    assert again.to_json() == config.to_json()
    assert json.loads(config.to_json()) == dataclasses.asdict(config)


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".yaml", "bits: 8\ngroup_size: -1\ncalibration:\n  samples: 4\n"),
        (".yml", "bits: 8\ngroup_size: -1\ncalibration: {samples: 4}\n"),
        (".json", '{"bits": 8, "group_size": -1, "calibration": {"samples": 4}}'),
        (".toml", "bits = 8\ngroup_size = -1\n[calibration]\nsamples = 4\n"),
    ],
)
def test_every_format_reads_the_same(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert read_config_file(path) == QuantConfig(bits=8, group_size=-1, calibration=CalibrationConfig(samples=4))


def test_empty_yaml_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert read_config_file(path) == QuantConfig()


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_reads_and_validates_clean(name):
    config = read_config_file(name)
    assert config.bits in BITS
    assert [f for f in validate_config(config) if f.level is not Level.INFO] == []


def test_presets_say_what_their_names_say():
    assert read_config_file("gptq-4bit-g128") == QuantConfig(
        method="gptq", bits=4, group_size=128, sym=False, desc_act=True, static_groups=True, refine_scales=True, compute_dtype="auto"
    )
    assert read_config_file("gptq-8bit-channel").group_size == -1
    assert read_config_file("rtn-4bit-g128").method == "rtn"


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(QtoolError) as raised:
        read_config_file("gptq-4bit-g12")
    assert raised.value.message == "config file gptq-4bit-g12 does not exist"
    assert raised.value.hint.startswith("did you mean the preset 'gptq-4bit-g128'?")
    assert raised.value.exit_code == 2


def test_unknown_suffix_refused(tmp_path):
    path = tmp_path / "c.ini"
    path.write_text("bits=4")
    with pytest.raises(QtoolError, match=r"has an unknown type '\.ini'"):
        read_config_file(path)


@pytest.mark.parametrize(
    ("data", "message", "hint_part"),
    [
        ({"bitz": 4}, "config: unknown key 'bitz'", "did you mean 'bits'?"),
        ({"calibration": {"seqln": 4}}, "config.calibration: unknown key 'seqln'", "did you mean 'seqlen'?"),
        ({"bits": "4"}, "config.bits must be an integer, got '4'", "whole number"),
        ({"bits": True}, "config.bits must be an integer, got True", "whole number"),
        ({"bits": 4.5}, "config.bits must be an integer, got 4.5", "whole number"),
        ({"sym": 1}, "config.sym must be true or false, got 1", "true or false"),
        ({"damp_percent": "0.1"}, "config.damp_percent must be a number, got '0.1'", "decimal"),
        ({"damp_percent": False}, "config.damp_percent must be a number, got False", "decimal"),
        ({"method": 3}, "config.method must be a string, got 3", "quote"),
        ({"calibration": 5}, "config.calibration must be a mapping of keys to values, got int", None),
        ({"schema_version": 2}, "config: schema_version 2 is not supported", f"schema_version {SCHEMA_VERSION}"),
    ],
)
def test_type_errors_name_the_key(data, message, hint_part):
    with pytest.raises(QtoolError) as raised:
        config_from_dict(data)
    assert raised.value.message == message
    if hint_part:
        assert hint_part in raised.value.hint


def test_whole_floats_become_ints_and_ints_become_floats():
    config = config_from_dict({"bits": 4.0, "damp_percent": 1, "calibration": {"samples": 16.0}})
    assert config.bits == 4 and isinstance(config.bits, int)
    assert config.damp_percent == 1.0 and isinstance(config.damp_percent, float)
    assert config.calibration.samples == 16 and isinstance(config.calibration.samples, int)


# ---------------------------------------------------------------- overrides and resolution


def test_overrides_replace_only_given_fields():
    base = QuantConfig(bits=3, calibration=CalibrationConfig(samples=9))
    changed = apply_overrides(base, {"bits": 8, "group_size": None, "samples": 4, "calibration_source": "x.txt", "seed": None})
    assert changed.bits == 8 and changed.group_size == base.group_size
    assert changed.calibration == CalibrationConfig(source="x.txt", samples=4, seqlen=base.calibration.seqlen, seed=0)
    assert base.bits == 3 and base.calibration.samples == 9  # the input is not modified


def test_override_unknown_key_and_type():
    with pytest.raises(QtoolError) as raised:
        apply_overrides(QuantConfig(), {"bitz": 4})
    assert raised.value.message == "override: unknown key 'bitz'" and "did you mean 'bits'?" in raised.value.hint
    with pytest.raises(QtoolError) as raised:
        apply_overrides(QuantConfig(), {"desc_act": "yes"})
    assert raised.value.message == "--desc-act must be true or false, got 'yes'"
    with pytest.raises(QtoolError) as raised:
        apply_overrides(QuantConfig(), {"samples": "many"})
    assert raised.value.message == "--samples must be an integer, got 'many'"


def test_resolve_layers_defaults_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bits: 3\ngroup_size: 64\n")
    config, findings = resolve_config(path, {"group_size": 32, "samples": 8})
    assert (config.bits, config.group_size, config.calibration.samples) == (3, 32, 8)
    assert config.calibration.seqlen == CalibrationConfig().seqlen
    assert findings == []
    config, _ = resolve_config(None, {})
    assert config == QuantConfig()
    config, _ = resolve_config("gptq-8bit-channel", {"bits": 4})
    assert (config.bits, config.group_size) == (4, -1)


def test_resolve_raises_the_first_error_and_returns_warnings(tmp_path):
    with pytest.raises(QtoolError) as raised:
        resolve_config(None, {"bits": 5})
    assert raised.value.message == "bits: 5 is not valid" and "valid: 2, 3, 4, 8" in raised.value.hint
    _, findings = resolve_config(None, {"static_groups": True})
    assert only(findings, Level.WARNING) == ["static_groups: has no effect without desc_act"]


def test_check_config_passes_warnings_through():
    findings = check_config(QuantConfig(group_size=48))
    assert only(findings, Level.WARNING) == ["group_size: 48 is not a multiple of 32"]


# ---------------------------------------------------------------- every rule


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (QuantConfig(method="awq"), "method: 'awq' is not valid"),
        (QuantConfig(bits=5), "bits: 5 is not valid"),
        (QuantConfig(bits=1), "bits: 1 is not valid"),
        (QuantConfig(output_format="exl3"), "output_format: 'exl3' is not valid"),
        (QuantConfig(checkpoint_format="gptq_v3"), "checkpoint_format: 'gptq_v3' is not valid"),
        (QuantConfig(group_size=0), "group_size: 0 is not valid"),
        (QuantConfig(group_size=-2), "group_size: -2 is not valid"),
        (QuantConfig(group_size=8), "group_size: 8 is not valid"),
        (QuantConfig(damp_percent=0.0), "damp_percent: 0.0 is out of range"),
        (QuantConfig(damp_percent=1.0), "damp_percent: 1.0 is out of range"),
        (QuantConfig(damp_auto_increment=-0.1), "damp_auto_increment: -0.1 is out of range"),
        (QuantConfig(damp_auto_increment=1.0), "damp_auto_increment: 1.0 is out of range"),
        (with_calibration(samples=0), "calibration.samples: 0 is out of range"),
        (with_calibration(seqlen=7), "calibration.seqlen: 7 is out of range"),
        (with_calibration(seed=-1), "calibration.seed: -1 is negative"),
        (with_calibration(source="/no/such/file.txt"), "calibration.source: file /no/such/file.txt does not exist"),
    ],
)
def test_error_rules(config, expected):
    findings = validate_config(config)
    assert only(findings, Level.ERROR) == [expected]
    assert all(f.fix for f in findings if f.level is Level.ERROR)


@pytest.mark.parametrize("value", [-1, 16, 32, 64, 128, 4096])
def test_valid_group_sizes(value):
    assert only(validate_config(QuantConfig(group_size=value)), Level.ERROR) == []


@pytest.mark.parametrize("value", BITS)
def test_valid_bits(value):
    assert validate_config(QuantConfig(bits=value)) == []


@pytest.mark.parametrize("value", CHECKPOINT_FORMATS)
def test_valid_checkpoint_formats(value):
    assert only(validate_config(QuantConfig(checkpoint_format=value)), Level.ERROR) == []


def test_choice_errors_suggest_the_closest():
    (finding,) = validate_config(QuantConfig(checkpoint_format="gptqv2"))
    assert finding.fix.startswith("did you mean 'gptq_v2'?")
    (finding,) = validate_config(QuantConfig(method="gtpq"))
    assert finding.fix.startswith("did you mean 'gptq'?")


def test_existing_calibration_file_is_accepted(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some text")
    assert validate_config(with_calibration(source=str(text))) == []


@pytest.mark.parametrize(
    ("config", "level", "expected"),
    [
        (QuantConfig(group_size=48), Level.WARNING, "group_size: 48 is not a multiple of 32"),
        (QuantConfig(static_groups=True), Level.WARNING, "static_groups: has no effect without desc_act"),
        (QuantConfig(method="rtn", desc_act=True), Level.WARNING, "desc_act: act order has no effect with method rtn"),
        (QuantConfig(method="rtn", true_sequential=False), Level.INFO, "true_sequential: has no effect with method rtn"),
        (QuantConfig(sym=False), Level.INFO, "checkpoint_format: the v1 format cannot store an asym zero point of 0, so such zeros are clamped to 1"),
    ],
)
def test_warning_and_info_rules(config, level, expected):
    findings = validate_config(config)
    assert [f"{f.where}: {f.message}" for f in findings] == [expected]
    assert findings[0].level is level


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (dict(bpw=1.5), ["bpw: 1.5 is out of range"]),
        (dict(bpw=8.5, head_bits=4), ["bpw: 8.5 is out of range", "head_bits: 4 is not valid"]),
        (dict(method="rtn"), ["method: 'rtn' cannot write EXL2"]),
        (dict(target_vram_gb=-1.0), ["target_vram_gb: -1.0 is negative"]),
        (dict(context_length=-5), ["context_length: -5 is negative"]),
        # GPTQ-only fields are not judged for EXL2 output: the optimizer picks widths and groups
        (dict(bits=7, group_size=4, static_groups=True), []),
    ],
)
def test_exl2_rules(changes, expected):
    config = dataclasses.replace(QuantConfig(output_format="exl2", desc_act=True), **changes)
    assert [f"{f.where}: {f.message}" for f in validate_config(config) if f.level is Level.ERROR] == expected


def test_exl2_fields_do_not_apply_to_gptq():
    found = validate_config(QuantConfig(target_vram_gb=24.0))
    assert [f"{f.where}: {f.message}" for f in found] == ["target_vram_gb: applies to EXL2 output only (GPTQ widths are uniform)"]
    assert read_config_file("exl2-4bpw") == QuantConfig(output_format="exl2", bpw=4.0, head_bits=0, desc_act=True, refine_scales=True,
                                                     compute_dtype="auto")


def test_rules_that_stay_silent():
    assert validate_config(QuantConfig(static_groups=True, desc_act=True)) == []
    assert validate_config(QuantConfig(sym=False, checkpoint_format="gptq_v2")) == []
    assert validate_config(QuantConfig(method="rtn")) == []


def test_several_errors_are_all_reported():
    config = dataclasses.replace(QuantConfig(bits=7, group_size=4, damp_percent=2.0), calibration=CalibrationConfig(samples=0))
    wheres = [f.where for f in validate_config(config) if f.level is Level.ERROR]
    assert wheres == ["bits", "group_size", "damp_percent", "calibration.samples"]


def test_read_config_file_path_in_messages(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("calibration:\n  samples: lots\n")
    with pytest.raises(QtoolError) as raised:
        read_config_file(path)
    assert raised.value.message == f"{path}.calibration.samples must be an integer, got 'lots'"


def test_the_validator_applies_the_format_layers_values():
    from qtool.config.schema import BITS, CHECKPOINT_FORMATS, OUTPUT_FORMATS
    from qtool.formats.gptq import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS
    from qtool.formats.registry import QUANT_FORMATS

    assert BITS is GPTQ_BITS and CHECKPOINT_FORMATS is GPTQ_CHECKPOINT_FORMATS
    assert OUTPUT_FORMATS == tuple(QUANT_FORMATS)

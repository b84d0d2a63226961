"""What `qtool quantize` takes from its presets when a flag is not given, as --help shows it ("[default: (4,
preset gptq-4bit-g128)]"): read from the preset files (YAML, no torch) when the command's options are built."""

from __future__ import annotations

import functools
from functools import reduce
from typing import Any

from qtool.cli.config_flags import QUANT_CONFIG_FLAGS
from qtool.config.schema import QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, read_config_file
from qtool.core.errors import QtoolError


@functools.cache
def preset_values(preset: str) -> dict[str, Any]:
    """The value each config flag (by parameter name) takes in `preset`; {} when the preset cannot be read (the
    command reports that when it runs; --help just shows no default)."""
    try:
        config = read_config_file(preset)
    except QtoolError:
        return {}
    return {entry.parameter: reduce(getattr, entry.field.split("."), config) for entry in QUANT_CONFIG_FLAGS}


def shown(parameter: str, value: Any) -> str:
    """A value as the command line spells it: a --x/--no-x flag by the flag it is (as Typer shows bool defaults)."""
    if isinstance(value, bool):
        flag = next(entry.flag for entry in QUANT_CONFIG_FLAGS if entry.parameter == parameter).removeprefix("--")
        return flag if value else f"no-{flag}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def gptq_default(parameter: str) -> str | bool:
    """show_default of an option that GPTQ output reads: the value of the preset quantize starts from."""
    values = preset_values(QUANTIZE_DEFAULT_PRESET)
    return f"{shown(parameter, values[parameter])}, preset {QUANTIZE_DEFAULT_PRESET}" if parameter in values else False


def exl2_default(parameter: str) -> str | bool:
    """show_default of an option that only --format exl2 reads: the value of the EXL2 preset."""
    values = preset_values(QUANTIZE_EXL2_PRESET)
    return f"{shown(parameter, values[parameter])}, preset {QUANTIZE_EXL2_PRESET}" if parameter in values else False


def shared_default(parameter: str) -> str | bool:
    """show_default of an option both formats read: the GPTQ preset's value, and the EXL2 preset's where it differs."""
    gptq = gptq_default(parameter)
    exl2_values = preset_values(QUANTIZE_EXL2_PRESET)
    if not gptq or parameter not in exl2_values or exl2_values[parameter] == preset_values(QUANTIZE_DEFAULT_PRESET)[parameter]:
        return gptq
    return f"{gptq}; {shown(parameter, exl2_values[parameter])} with --format exl2"

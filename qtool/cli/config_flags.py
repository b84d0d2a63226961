"""Which command-line flag sets which QuantConfig field: one table, read to build the overrides the config
resolver takes and to name a flag in an error about its field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from qtool.cli.choices import plain


@dataclass(frozen=True)
class ConfigFlag:
    parameter: str  # the command function's parameter that holds the parsed value
    flag: str  # how the flag is spelled on the command line
    field: str  # the QuantConfig field it sets; "calibration.x" is field x of the calibration block

    @property
    def override_key(self) -> str:
        # apply_overrides takes the calibration block's fields flat, prefixed with calibration_
        return self.field.replace(".", "_")


QUANT_CONFIG_FLAGS: tuple[ConfigFlag, ...] = (
    ConfigFlag("method", "--method", "method"),
    ConfigFlag("bits", "--bits", "bits"),
    ConfigFlag("group_size", "--group-size", "group_size"),
    ConfigFlag("sym", "--sym", "sym"),
    ConfigFlag("desc_act", "--desc-act", "desc_act"),
    ConfigFlag("static_groups", "--static-groups", "static_groups"),
    ConfigFlag("true_sequential", "--true-sequential", "true_sequential"),
    ConfigFlag("damp", "--damp", "damp_percent"),
    ConfigFlag("mse", "--mse", "mse"),
    ConfigFlag("refine_scales", "--refine-scales", "refine_scales"),
    ConfigFlag("compute_dtype", "--compute-dtype", "compute_dtype"),
    ConfigFlag("checkpoint_format", "--checkpoint-format", "checkpoint_format"),
    ConfigFlag("output_format", "--format", "output_format"),
    ConfigFlag("bpw", "--bpw", "bpw"),
    ConfigFlag("head_bits", "--head-bits", "head_bits"),
    ConfigFlag("target_vram", "--target-vram", "target_vram_gb"),
    ConfigFlag("context_length", "--context-length", "context_length"),
    ConfigFlag("calibration", "--calibration", "calibration.source"),
    ConfigFlag("samples", "--samples", "calibration.samples"),
    ConfigFlag("seqlen", "--seqlen", "calibration.seqlen"),
    ConfigFlag("seed", "--seed", "calibration.seed"),
    ConfigFlag("batch_tokens", "--batch-tokens", "calibration.batch_tokens"),
)


def config_overrides(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides resolve_config takes, from a command's parsed arguments by parameter name; None stays None
    (the flag was not given, so the config file or preset decides)."""
    return {entry.override_key: plain(arguments[entry.parameter]) for entry in QUANT_CONFIG_FLAGS}


def flag_of(field: str) -> str:
    """The flag that sets a QuantConfig field ("bits" -> "--bits", "target_vram_gb" -> "--target-vram")."""
    for entry in QUANT_CONFIG_FLAGS:
        if entry.field == field:
            return entry.flag
    raise KeyError(f"no flag sets the config field {field!r}")

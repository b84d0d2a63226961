"""A jobs file for `qtool quantize --jobs FILE` (YAML, JSON or TOML by suffix, parsed as every config file): a
`jobs:` list whose entries name a `model`, an `output` and any config field by its config-file name, checked by
the one config validator before any work.

    jobs:
      - {model: ./llama, output: ./llama-4b, bits: 4, group_size: 128}
      - {model: ./llama, output: ./llama-3b, bits: 3, calibration: wiki.txt, samples: 64}
      - {model: ./llama, output: ./llama-exl2, format: exl2, bpw: 4.0}
    defaults: {samples: 128, seqlen: 512}   # optional: fields every job starts from
    compare: {text: wikitext, windows: 40}  # optional: the closing `eval --compare` (false: none)

A job starts from its `config` (a file or preset) if it names one, else from the preset `qtool quantize` starts
from for its format; `defaults`, then the job's own fields, override it. Besides the config's fields (nested
`calibration:` included) a job may write `format` (output_format), `calibration: FILE` (calibration.source),
`samples`, `seqlen` and `seed`, as the command's flags are spelled. Paths are relative to the working directory,
as on the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.config.schema import (QUANTIZE_DEFAULT_PRESET, QUANTIZE_EXL2_PRESET, QuantConfig, config_from_dict, parse_config_file,
                                 read_config_file, validate_config)
from qtool.core.errors import QtoolError
from qtool.core.findings import Finding, raise_first_error

JOB_KEYS = ("model", "output", "config")
TOP_KEYS = ("jobs", "defaults", "compare")
# the flag spellings a job may use for nested or renamed fields
SHORTHANDS = {"format": ("output_format",), "samples": ("calibration", "samples"), "seqlen": ("calibration", "seqlen"),
              "seed": ("calibration", "seed"), "batch_tokens": ("calibration", "batch_tokens")}
COMPARE_KEYS = {"text": str, "windows": int, "seqlen": int}


@dataclass
class QuantJob:
    index: int  # position in the file's list, from 0
    model: str
    output: str
    config: QuantConfig
    findings: list[Finding] = field(default_factory=list)  # the validator's warnings and notes

    @property
    def where(self) -> str:
        return f"jobs[{self.index}]"


@dataclass
class CompareSettings:
    text: str = "wikitext"  # `wikitext` (its test split) or a text file
    windows: int | None = None
    seqlen: int | None = None


@dataclass
class JobsFile:
    path: str
    jobs: list[QuantJob]
    compare: CompareSettings | None  # None: the file turned the comparison off


def _expanded(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """The job's fields as a config file nests them: shorthands moved into place, `calibration: FILE` as its
    source."""
    nested: dict[str, Any] = {}
    calibration: dict[str, Any] = {}
    for key, value in fields.items():
        key = str(key)
        if key == "calibration":
            if isinstance(value, str):
                calibration["source"] = value
            elif isinstance(value, dict):
                calibration.update(value)
            else:
                raise QtoolError(f"{where}.calibration must be a file name, `wikitext` or a mapping, got {value!r}", "e.g. calibration: wiki.txt")
        elif key in SHORTHANDS:
            target = SHORTHANDS[key]
            if len(target) == 2:
                calibration[target[1]] = value
            else:
                nested[target[0]] = value
        else:
            nested[key] = value
    if calibration:
        nested["calibration"] = calibration
    return nested


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _job(index: int, entry: Any, defaults: dict[str, Any], path: Path) -> QuantJob:
    where = f"{path}: jobs[{index}]"
    if not isinstance(entry, dict):
        raise QtoolError(f"{where} must be a mapping with model and output, got {type(entry).__name__}", "e.g. - {model: ./llama, output: ./llama-4b, bits: 4}")
    for key in ("model", "output"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise QtoolError(f"{where} has no {key}", f"give each job a `{key}:` path")
    fields = _merge(_expanded(defaults, f"{path}: defaults"), _expanded({k: v for k, v in entry.items() if k not in JOB_KEYS}, where))
    base_name = entry.get("config")
    if base_name is not None and not isinstance(base_name, str):
        raise QtoolError(f"{where}.config must be a config file or preset name, got {base_name!r}")
    base = read_config_file(base_name or (QUANTIZE_EXL2_PRESET if fields.get("output_format") == "exl2" else QUANTIZE_DEFAULT_PRESET))
    config = config_from_dict(_merge(base.to_dict(), fields), where=where)
    findings = [dataclasses.replace(f, where=f"{where}.{f.where}") for f in validate_config(config)]
    return QuantJob(index, entry["model"], entry["output"], config, raise_first_error(findings))


def _compare(value: Any, path: Path) -> CompareSettings | None:
    if value is False:
        return None
    if value is None or value is True:
        return CompareSettings()
    if not isinstance(value, dict):
        raise QtoolError(f"{path}: compare must be a mapping or false, got {value!r}", "e.g. compare: {text: wikitext, windows: 40}")
    settings = CompareSettings()
    for key, item in value.items():
        if key not in COMPARE_KEYS:
            raise QtoolError(f"{path}: compare: unknown key '{key}'", "valid keys: " + ", ".join(COMPARE_KEYS))
        if not isinstance(item, COMPARE_KEYS[key]) or isinstance(item, bool) or (isinstance(item, int) and item < 1):
            raise QtoolError(f"{path}: compare.{key} is {item!r}", "text is `wikitext` or a file; windows and seqlen are positive integers")
        setattr(settings, key, item)
    return settings


def read_jobs_file(path: str | Path) -> JobsFile:
    """Every job of the file, validated (the first error raised as one line naming the job and field)."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"jobs file {path} does not exist", "pass a .yaml, .json or .toml file with a `jobs:` list")
    data = parse_config_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise QtoolError(f"jobs file {path} has no `jobs:` list", "write jobs: followed by one `- model: ..., output: ...` entry per job")
    for key in data:
        if key not in TOP_KEYS:
            raise QtoolError(f"jobs file {path}: unknown key '{key}'", "valid keys: " + ", ".join(TOP_KEYS))
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise QtoolError(f"{path}: defaults must be a mapping of config fields, got {defaults!r}")
    jobs = [_job(index, entry, defaults, path) for index, entry in enumerate(data["jobs"])]
    outputs: dict[str, int] = {}
    for job in jobs:
        key = str(Path(job.output).resolve())
        if key in outputs:
            raise QtoolError(f"{path}: jobs[{outputs[key]}] and jobs[{job.index}] write the same output {job.output}", "give each job its own output")
        outputs[key] = job.index
    return JobsFile(str(path), jobs, _compare(data.get("compare"), path))

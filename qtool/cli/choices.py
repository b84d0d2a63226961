"""The fixed sets of values CLI options take, as Enums so that --help lists them, the shell completes them and
Typer refuses anything else (exit 2, naming the option). Each Enum is built from the library constant that the
library itself validates against, so a value added there is a CLI choice without an edit here."""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterable

# Each from a torch-free module: the Enums are built when the app is, and --help must not import torch.
from qtool.checkpoints.dtype_names import DTYPE_NAMES
from qtool.config.schema import BITS, CHECKPOINT_FORMATS, COMPUTE_DTYPES, EXL2_HEAD_BITS, METHODS, OUTPUT_FORMATS
from qtool.convert.format_names import SOURCE_FORMATS, TARGET_FORMATS
from qtool.formats.gptq_settings import GPTQ_BITS
from qtool.kernels.backend_names import BACKEND_CHOICES
from qtool.runtime.kv_cache_names import KV_CACHE_KINDS
from qtool.runtime.speculative_names import SPECULATIVE_METHODS


def choice_enum(name: str, values: Iterable[Any]) -> type[Enum]:
    """An Enum whose members are `values`, named by their text (Bits['4'].value == 4). The members are also
    instances of the values' type, so a member compares equal to the plain value the library uses."""
    values = tuple(values)
    return Enum(name, [(str(value), value) for value in values], type=type(values[0]))


def plain(value: Any) -> Any:
    """The library's value of a parsed option: an Enum member's value, anything else (None included) as is."""
    return value.value if isinstance(value, Enum) else value


# qtool quantize: the config schema's choices (qtool.config.schema validates the same lists)
Method = choice_enum("Method", METHODS)
Bits = choice_enum("Bits", BITS)
OutputFormat = choice_enum("OutputFormat", OUTPUT_FORMATS)
CheckpointFormat = choice_enum("CheckpointFormat", CHECKPOINT_FORMATS)
ComputeDtype = choice_enum("ComputeDtype", COMPUTE_DTYPES)
HeadBits = choice_enum("HeadBits", EXL2_HEAD_BITS)

# qtool convert: the conversions' formats, and the GPTQ widths exl2 -> gptq writes
SourceFormat = choice_enum("SourceFormat", SOURCE_FORMATS)
TargetFormat = choice_enum("TargetFormat", TARGET_FORMATS)
GptqBits = choice_enum("GptqBits", GPTQ_BITS)

# qtool eval / run: what a model is loaded in and which kernels serve its quantized linears
ModelDtype = choice_enum("ModelDtype", DTYPE_NAMES)
Backend = choice_enum("Backend", ("auto", *BACKEND_CHOICES))
KvCache = choice_enum("KvCache", KV_CACHE_KINDS)  # the engine's KV cache storage (qtool run, qtool eval --engine)
Speculate = choice_enum("Speculate", SPECULATIVE_METHODS)  # qtool run --speculate

# --device stays text: cuda:N names any GPU. The shell still completes the kinds.
DEVICE_KINDS = ("auto", "cpu", "cuda")


def complete_device(incomplete: str) -> list[str]:
    return [kind for kind in DEVICE_KINDS if kind.startswith(incomplete)]

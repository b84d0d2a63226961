"""The quantized formats qtool reads and writes, by name ("gptq", "exl2" as quant_method spells them): what code
that branches on a format needs to know about it, from the module that owns each fact."""

from __future__ import annotations

from dataclasses import dataclass

# the torch-free halves of exl2.py and gptq.py: the config schema and the CLI read this registry at start-up
from qtool.formats.exl2_settings import EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES
from qtool.formats.gptq_settings import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_TENSOR_SUFFIXES


@dataclass(frozen=True)
class QuantFormat:
    name: str  # quantization_config.quant_method, and the format's name on the command line
    bits: tuple[int, ...]  # the code widths it stores (EXL2: per group, widest first)
    tensor_suffixes: tuple[str, ...]  # the tensors every quantized linear holds, as <module>.<suffix>
    optional_suffixes: tuple[str, ...]  # tensors a linear may hold besides those
    checkpoint_formats: tuple[str, ...]  # spellings of quantization_config.checkpoint_format; () if it has none


GPTQ = QuantFormat("gptq", GPTQ_BITS, GPTQ_TENSOR_SUFFIXES, (), GPTQ_CHECKPOINT_FORMATS)
EXL2 = QuantFormat("exl2", EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, ())
QUANT_FORMATS = {fmt.name: fmt for fmt in (GPTQ, EXL2)}


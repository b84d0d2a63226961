"""The format registry: one entry per format the config can name, each fact the one its format module owns."""

from qtool.formats.exl2 import EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES
from qtool.formats.gptq import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_TENSOR_SUFFIXES
from qtool.formats.registry import EXL2, GPTQ, QUANT_FORMATS


def test_the_registry_names_each_format_once():
    assert QUANT_FORMATS == {"gptq": GPTQ, "exl2": EXL2}


def test_entries_carry_the_format_modules_facts():
    assert (GPTQ.bits, GPTQ.tensor_suffixes, GPTQ.optional_suffixes, GPTQ.checkpoint_formats) == (
        GPTQ_BITS, GPTQ_TENSOR_SUFFIXES, (), GPTQ_CHECKPOINT_FORMATS,
    )
    assert (EXL2.bits, EXL2.tensor_suffixes, EXL2.optional_suffixes, EXL2.checkpoint_formats) == (
        EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, (),
    )

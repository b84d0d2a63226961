"""The format registry: one entry per format the config can name, each fact the one its format module owns."""

from qtool.core.config import BITS, CHECKPOINT_FORMATS, OUTPUT_FORMATS
from qtool.formats.exl2 import EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES
from qtool.formats.gptq import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_TENSOR_SUFFIXES
from qtool.formats.registry import EXL2, GPTQ, QUANT_FORMATS


def test_the_registry_holds_the_formats_the_config_names():
    # core lists the output formats itself (it cannot import formats): the two lists must stay in step
    assert tuple(QUANT_FORMATS) == OUTPUT_FORMATS
    assert QUANT_FORMATS == {"gptq": GPTQ, "exl2": EXL2}


def test_entries_carry_the_format_modules_facts():
    assert (GPTQ.bits, GPTQ.tensor_suffixes, GPTQ.optional_suffixes, GPTQ.checkpoint_formats) == (
        GPTQ_BITS, GPTQ_TENSOR_SUFFIXES, (), GPTQ_CHECKPOINT_FORMATS,
    )
    assert (EXL2.bits, EXL2.tensor_suffixes, EXL2.optional_suffixes, EXL2.checkpoint_formats) == (
        EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES, (),
    )


def test_the_config_validator_checks_the_gptq_formats_values():
    assert BITS is GPTQ_BITS and CHECKPOINT_FORMATS is GPTQ_CHECKPOINT_FORMATS

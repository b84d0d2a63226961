"""validate/quantization_config.py: a GPTQ quantization_config becomes the QuantConfig it declares or a finding for
each problem; an EXL2 one alone takes ExLlamaV2's ranges."""

from __future__ import annotations

from qtool.config.schema import QuantConfig
from qtool.validate.quantization_config import check_quantization_config


def test_check_quantization_config_builds_the_quant_config():
    config, findings = check_quantization_config(
        {"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": False, "desc_act": True, "format": "gptq_v2",
         "model_name_or_path": "ignored", "pack_dtype": "int32"},
        "q",
    )
    assert findings == []
    assert config == QuantConfig(bits=3, group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2")


def test_check_quantization_config_collects_every_problem():
    config, findings = check_quantization_config({"bits": "x", "group_size": 3, "desc_act": None}, "q")
    assert config is None
    assert [f"{f.where}: {f.message}" for f in findings] == [
        "q.quant_method: is missing",
        "q.bits: must be an integer, got 'x'",
        "q.desc_act: must be true or false, got None",
        "q.group_size: 3 is not valid",
    ]


def test_quantization_config_alone_takes_exllamav2s_ranges():
    """Without tensors to hold it against, bits must lie in 2.0..8.0 and head_bits be 0, 6 or 8."""
    good = {"quant_method": "exl2", "bits": 4.0, "head_bits": 6, "version": "0.2.8+cu121"}
    assert check_quantization_config(good, "q") == (None, [])
    config, findings = check_quantization_config({**good, "bits": 8.13, "head_bits": 4}, "q")
    assert config is None
    assert [(f.level.value, f.where) for f in findings] == [("error", "q.bits"), ("error", "q.head_bits")]

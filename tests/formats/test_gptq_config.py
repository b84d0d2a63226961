"""Reading the quantization config spellings of AutoGPTQ, GPTQModel and transformers, and GPTQModel's per-module
`dynamic` overrides."""

import pytest

from qtool.core.errors import QtoolError
from qtool.formats.gptq_config import parse_gptq_config


def test_gptqmodel_spelling():
    config = parse_gptq_config({"bits": "3", "group_size": 64, "method": "gptq", "format": "gptq_v2", "sym": False, "desc_act": True}, "q.json")
    assert (config.bits, config.group_size, config.checkpoint_format, config.sym, config.desc_act) == (3, 64, "gptq_v2", False, True)


def test_autogptq_defaults():
    config = parse_gptq_config({"bits": 4, "group_size": 128}, "quantize_config.json")
    assert (config.checkpoint_format, config.sym, config.desc_act) == ("gptq", True, False)


def test_other_method_is_not_gptq():
    assert parse_gptq_config({"quant_method": "awq", "bits": 4}, "config.json") is None


@pytest.mark.parametrize(
    "data,message",
    [
        ({"bits": 4}, "no 'group_size'"),
        ({"bits": 5, "group_size": 32}, "5-bit"),
        ({"bits": 4, "group_size": 0}, "group_size 0"),
        ({"bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "'marlin' is not supported"),
        ({"bits": 4, "group_size": 32, "is_marlin_format": True}, "Marlin"),
        ({"bits": 4, "group_size": 32, "pack_dtype": "int64"}, "pack_dtype int64"),
        ({"bits": "four", "group_size": 32}, "must be integers"),
    ],
)
def test_invalid_configs_name_the_file(data, message):
    with pytest.raises(QtoolError, match=message) as excinfo:
        parse_gptq_config(data, "my/quantize_config.json")
    assert "my/quantize_config.json" in str(excinfo.value)


def test_dynamic_overrides_first_match_wins():
    config = parse_gptq_config(
        {
            "bits": 4,
            "group_size": 128,
            "dynamic": {
                r"-:.*\.layers\.0\..*": {},
                r"+:.*mlp\.down_proj": {"bits": 8},
                r".*mlp\..*": {"bits": 2, "group_size": 32},
            },
        },
        "config.json",
    )
    assert config.settings_for("model.layers.0.mlp.down_proj") is None
    assert config.settings_for("model.layers.3.mlp.down_proj") == (8, 128)
    assert config.settings_for("model.layers.3.mlp.up_proj") == (2, 32)
    assert config.settings_for("model.layers.3.self_attn.q_proj") == (4, 128)

"""The scale checks of the formats (check_gptq_scales, check_exl2_scale_max): finite and positive, or one error
naming the tensor, the file and the first bad value; loaders and validate both call them."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.formats.exl2 import check_exl2_scale_max
from qtool.formats.gptq import check_gptq_scales

NAME = "model.layers.0.self_attn.q_proj.scales"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_positive_finite_scales_pass(dtype):
    check_gptq_scales(torch.rand(3, 64, dtype=dtype) + 0.01, NAME, "model.safetensors")
    check_exl2_scale_max(torch.rand(4, dtype=dtype) + 0.01, "x.q_scale_max", "model.safetensors")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (float("nan"), "2 of 192 scales in model.safetensors are NaN or infinite (first at [1, 5])"),
        (float("-inf"), "2 of 192 scales in model.safetensors are NaN or infinite (first at [1, 5])"),
        (-0.5, "2 of 192 scales in model.safetensors are zero or negative (first at [1, 5], value -0.5)"),
        (0.0, "2 of 192 scales in model.safetensors are zero or negative (first at [1, 5], value 0)"),
    ],
    ids=["nan", "-inf", "negative", "zero"],
)
def test_bad_gptq_scales(value, words):
    scales = torch.full((3, 64), 0.02, dtype=torch.float16)
    scales[1, 5] = scales[2, 0] = value
    with pytest.raises(QtoolError) as caught:
        check_gptq_scales(scales, NAME, "model.safetensors")
    assert caught.value.message == f"{NAME}: {words}"
    assert caught.value.hint == "the checkpoint is corrupt: re-export it"


def test_non_finite_is_named_before_negative():
    scales = torch.full((2, 32), 0.02)
    scales[0, 1], scales[1, 3] = -1.0, float("nan")
    with pytest.raises(QtoolError, match=r"1 of 64 scales are NaN or infinite \(first at \[1, 3\]\)"):
        check_gptq_scales(scales, NAME)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.05, 0.0], ids=["nan", "inf", "negative", "zero"])
def test_bad_exl2_scale_max(value):
    scale_max = torch.tensor([0.05, 0.05, value, value]).half()
    with pytest.raises(QtoolError) as caught:
        check_exl2_scale_max(scale_max, "x.q_scale_max", "model.safetensors")
    shown = f"{float(torch.tensor(value).half()):g}"
    assert caught.value.message == f"x.q_scale_max: 2 of 4 values in model.safetensors are zero, negative or not finite (first: group 2, {shown})"

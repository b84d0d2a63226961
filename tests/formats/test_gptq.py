"""GPTQ tensors of one linear: read back bit by bit by a dequantizer written here from the format description
alone, and compared with QuantizedWeight.dequantize() on random weights of every bit width and layout."""

import itertools
import math

import numpy as np
import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.formats.gptq import (
    GPTQ_TENSOR_SUFFIXES,
    check_gptq_layout,
    check_group_size,
    expected_gptq_shapes,
    gptq_tensors_from_quantized,
    quantized_from_gptq_tensors,
    unpack_qzeros,
)
from qtool.formats.gptq_config import parse_gptq_config
from qtool.formats.quantized_weight import QuantizedWeight


def random_quantized(out_features, in_features, bits, group_size, sym, act_order, seed, zero_min=None):
    """Random codes/scales/zeros; scales are float16 values so the fp16 checkpoint stores them exactly."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.1 + 1e-3).half().float()
    if sym:
        zeros = torch.full((groups, out_features), 1 << (bits - 1), dtype=torch.int32)
    else:
        low = 0 if zero_min is None else zero_min
        zeros = torch.randint(low, 1 << bits, (groups, out_features), generator=gen, dtype=torch.int32)
    g_idx = torch.zeros(in_features, dtype=torch.int32) if group_size == -1 else torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


def read_field(words: np.ndarray, index: int, bits: int) -> int:
    """Value `index` of a little-endian bit stream over `words` (uint32), read one bit at a time."""
    value = 0
    for t in range(bits):
        position = index * bits + t
        value |= ((int(words[position // 32]) >> (position % 32)) & 1) << t
    return value


def independent_dequantize(tensors, bits, checkpoint_format):
    """weight[n, k] = scale[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k]; v1 files store zero - 1."""
    qweight = tensors["qweight"].numpy().astype(np.uint32)
    qzeros = tensors["qzeros"].numpy().astype(np.uint32)
    scales = tensors["scales"].numpy().astype(np.float64)
    g_idx = tensors["g_idx"].numpy()
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    weight = np.zeros((out_features, in_features))
    for n in range(out_features):
        column = qweight[:, n]
        for k in range(in_features):
            g = int(g_idx[k])
            zero = read_field(qzeros[g], n, bits) + (1 if checkpoint_format == "gptq" else 0)
            weight[n, k] = scales[g, n] * (read_field(column, k, bits) - zero)
    return torch.from_numpy(weight)


CASES = list(itertools.product((2, 3, 4, 8), (32, 64, -1), (True, False), ("gptq", "gptq_v2")))


@pytest.mark.parametrize("bits,group_size,sym,checkpoint_format", CASES)
def test_independent_dequantizer_agrees(bits, group_size, sym, checkpoint_format):
    # K = 160 leaves a partial last group at group size 64; act order on every other case
    act_order = (bits + group_size) % 2 == 0 or group_size == 64
    qw = random_quantized(64, 160, bits, group_size, sym, act_order, seed=bits * 100 + group_size, zero_min=1 if checkpoint_format == "gptq" else 0)
    tensors = gptq_tensors_from_quantized(qw, checkpoint_format)
    expected = qw.dequantize(torch.float64)
    assert torch.equal(independent_dequantize(tensors, bits, checkpoint_format), expected)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size", (32, 64, -1))
def test_tensor_shapes_and_dtypes_match_expected(bits, group_size):
    qw = random_quantized(96, 160, bits, group_size, sym=False, act_order=True, seed=bits, zero_min=1)
    tensors = gptq_tensors_from_quantized(qw)
    expected = expected_gptq_shapes(160, 96, bits, group_size)
    assert set(tensors) == set(GPTQ_TENSOR_SUFFIXES) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype, name
    groups = {32: 5, 64: 3, -1: 1}[group_size]  # ceil(160 / group size), the last group of 64 partial
    assert expected["qweight"][0] == (160 * bits // 32, 96)
    assert expected["qzeros"][0] == (groups, 96 * bits // 32) and expected["scales"][0] == (groups, 96)


@pytest.mark.parametrize("bits,checkpoint_format", list(itertools.product((2, 3, 4, 8), ("gptq", "gptq_v2"))))
def test_round_trip_is_exact(bits, checkpoint_format):
    qw = random_quantized(96, 160, bits, 64, sym=False, act_order=True, seed=7 + bits, zero_min=1 if checkpoint_format == "gptq" else 0)
    back = quantized_from_gptq_tensors(gptq_tensors_from_quantized(qw, checkpoint_format), bits, 64, checkpoint_format)
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field
    assert (back.bits, back.group_size) == (bits, 64)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_v1_refuses_zero_point_zero_and_v2_stores_it(bits):
    qw = random_quantized(32, 64, bits, 32, sym=False, act_order=False, seed=bits, zero_min=1)
    qw.zeros[1, 5] = 0
    with pytest.raises(QtoolError) as excinfo:
        gptq_tensors_from_quantized(qw, "gptq", name="model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj.qzeros" in str(excinfo.value) and "gptq_v2" in excinfo.value.hint
    tensors = gptq_tensors_from_quantized(qw, "gptq_v2")
    assert read_field(tensors["qzeros"][1].numpy().astype(np.uint32), 5, bits) == 0
    back = quantized_from_gptq_tensors(tensors, bits, 32, "gptq_v2")
    assert torch.equal(back.zeros, qw.zeros)


def pack_fields(values, bits):
    """Pack one row of values into uint32 words bit by bit (test-side packer)."""
    words = [0] * (len(values) * bits // 32)
    for i, value in enumerate(values):
        for t in range(bits):
            position = i * bits + t
            words[position // 32] |= ((int(value) >> t) & 1) << (position % 32)
    return words


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_v1_read_undoes_gptqmodel_word_wise_subtract(bits):
    """GPTQModel writes v1 by subtracting 0x..0101 from each packed word, so a zero of 0 borrows from the next
    field; reading must give back the true zeros."""
    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 1 << bits, (3, 64), generator=gen, dtype=torch.int32)
    zeros[:, ::3] = 0
    one_per_field = sum(1 << (bits * j) for j in range(32 // bits))
    rows = [[(w - one_per_field) % (1 << 32) for w in pack_fields(row.tolist(), bits)] for row in zeros]
    qzeros = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in rows], dtype=torch.int32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 64, "gptq"), zeros)


def test_v1_three_bit_wraps_per_field():
    """For 3 bits GPTQModel shifts each field modulo 8, so a stored 7 means zero 0."""
    zeros = torch.randint(0, 8, (2, 64), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    zeros[:, :5] = 0
    stored = [pack_fields(((row - 1) % 8).tolist(), 3) for row in zeros]
    qzeros = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in stored], dtype=torch.int32)
    assert torch.equal(unpack_qzeros(qzeros, 3, 64, "gptq"), zeros)


@pytest.mark.parametrize("out_features,in_features", [(48, 64), (64, 80)])
def test_widths_not_multiple_of_32_are_refused(out_features, in_features):
    qw = random_quantized(out_features, in_features, 4, 16, sym=True, act_order=False, seed=0)
    with pytest.raises(QtoolError, match="not a multiple of 32") as excinfo:
        gptq_tensors_from_quantized(qw, name="model.layers.1.mlp.down_proj")
    assert "model.layers.1.mlp.down_proj" in str(excinfo.value)


def test_wrong_shapes_name_the_tensor():
    qw = random_quantized(64, 128, 4, 32, sym=True, act_order=False, seed=1)
    tensors = gptq_tensors_from_quantized(qw)
    with pytest.raises(QtoolError, match=r"lm\.qzeros has shape \(4, 8\), expected \(2, 8\)"):
        quantized_from_gptq_tensors(tensors, 4, 64, "gptq", name="lm")
    with pytest.raises(QtoolError, match=r"lm\.qweight has shape \(16, 64\), expected \(32, 64\)"):
        quantized_from_gptq_tensors(tensors, 8, 32, "gptq", name="lm")
    del tensors["scales"]
    with pytest.raises(QtoolError, match=r"lm\.scales"):
        quantized_from_gptq_tensors(tensors, 4, 32, "gptq", name="lm")


def test_unknown_checkpoint_format_is_refused():
    qw = random_quantized(32, 32, 4, 32, sym=True, act_order=False, seed=2)
    with pytest.raises(QtoolError, match="marlin"):
        gptq_tensors_from_quantized(qw, "marlin")


@pytest.mark.parametrize("group_size", [-1, 1, 8, 32, 48, 4096])
def test_group_sizes_gptq_stores_pass_every_check(group_size):
    check_group_size(group_size, "q")
    check_gptq_layout(64, 32, 4, group_size, "q")
    assert parse_gptq_config({"bits": 4, "group_size": group_size}, "q.json").group_size == group_size


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_group_sizes_gptq_cannot_store_fail_every_check(group_size):
    for check in (
        lambda: check_group_size(group_size, "q"),
        lambda: check_gptq_layout(64, 32, 4, group_size, "q"),
        lambda: parse_gptq_config({"bits": 4, "group_size": group_size}, "q"),
    ):
        with pytest.raises(QtoolError, match=f"q: group_size {group_size} is not valid") as excinfo:
            check()
        assert "-1 (one group per output channel) or a positive integer" in excinfo.value.hint

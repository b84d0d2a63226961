"""The CPU int4 backend against the float64 GPTQ reference: every layout a 4-bit GPTQ layer can have (act order,
partial and irregular groups, per-channel, both checkpoint formats, out_features not a multiple of 16)."""

from __future__ import annotations

import pytest
import torch
from gptq_reference import random_gptq_codes, reference, relative_error

from qtool.kernels.cpu_int4_backend import (GptqCpuInt4Backend, cpu_int4_available, padded_columns, tile_size_for,
                                            tile_size_for_groups)
from qtool.kernels.linear_tensors import GptqLinearTensors
from qtool.kernels.registry import BackendRegistry

pytestmark = pytest.mark.skipif(not cpu_int4_available(), reason="this torch has no CPU int4 kernel")


def tensors_of(layer, group_size: int, checkpoint_format: str) -> GptqLinearTensors:
    return GptqLinearTensors(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, 4, group_size,
                             checkpoint_format)


@pytest.mark.parametrize("n, k, group_size, act_order, asym, checkpoint_format, irregular", [
    (48, 64, 32, False, True, "gptq_v2", False),
    (40, 96, 64, True, True, "gptq", False),        # a partial last group, rows not a multiple of 16
    (72, 576, 128, True, False, "gptq_v2", False),  # SmolLM2's width at g128: 4.5 groups
    (56, 160, 96, False, True, "gptq", False),      # groups of 96 in tiles of 32
    (16, 224, -1, False, True, "gptq_v2", False),   # per channel
    (24, 128, 32, True, True, "gptq_v2", True),     # groups of unequal size in any order
])
def test_the_kernel_matches_the_float64_reference(n, k, group_size, act_order, asym, checkpoint_format, irregular):
    seed = int(torch.randint(0, 1 << 30, ()).item())
    layer = random_gptq_codes(n, k, 4, group_size, act_order, asym, checkpoint_format, seed, irregular)
    backend = GptqCpuInt4Backend()
    packed = backend.prepare(tensors_of(layer, group_size, checkpoint_format))
    for rows, dtype in ((1, torch.float32), (5, torch.bfloat16), (3, torch.float16)):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        y = backend.matmul(x, packed)
        ref = reference(x.to(torch.bfloat16), layer.codes, layer.scales, layer.zeros, layer.g_idx, layer.bias)
        assert y.dtype == dtype and y.shape == (rows, n)
        # bfloat16 scales, offsets and sums: about 2^-8 relative, never the error of a misplaced column or group
        assert relative_error(y, ref) < 1.5e-2, (seed, rows, dtype)


def test_leading_dimensions_are_kept():
    layer = random_gptq_codes(32, 64, 4, 32, False, True, "gptq_v2", 0)
    backend = GptqCpuInt4Backend()
    packed = backend.prepare(tensors_of(layer, 32, "gptq_v2"))
    x = torch.randn(2, 3, 64)
    assert torch.equal(backend.matmul(x, packed), backend.matmul(x.reshape(6, 64), packed).reshape(2, 3, 32))


def test_columns_are_placed_by_group_in_whole_tiles():
    g_idx = torch.tensor([1, 0, 1, 0, 0, 2])
    destination, tile_groups, width = padded_columns(g_idx, 2)
    # group 0 (3 columns) takes tiles 0-1, group 1 (2) tile 2, group 2 (1) tile 3
    assert tile_groups.tolist() == [0, 0, 1, 2] and width == 8
    assert destination.tolist() == [4, 0, 5, 1, 2, 6]


def test_a_partial_last_group_takes_smaller_tiles_instead_of_padding():
    """576 columns at g128 (SmolLM2): tiles of 64 cover every group whole, so the input goes to the kernel as is."""
    layer = random_gptq_codes(32, 576, 4, 128, False, True, "gptq_v2", 1)
    packed = GptqCpuInt4Backend().prepare(tensors_of(layer, 128, "gptq_v2"))
    assert packed.tile == 64 and packed.in_padded == 576 and packed.columns is None
    g_idx = torch.arange(576) // 128
    assert tile_size_for_groups(g_idx, 128) == 64 and tile_size_for_groups(torch.arange(512) // 128, 128) == 128
    # groups of 3, 2 and 1 columns: no tile covers them whole, the group size's tile and padding as before
    assert tile_size_for_groups(torch.tensor([1, 0, 1, 0, 0, 2]), 32) == tile_size_for(32)


@pytest.mark.parametrize("device, bits, group_size, why", [
    ("cpu", 3, 128, "4-bit"), ("cpu", 4, 16, "multiple of 32"), ("cpu", 8, 32, "4-bit"),
])
def test_what_it_cannot_serve_falls_back_with_a_reason(device, bits, group_size, why):
    assert why in GptqCpuInt4Backend().supports(device, bits, group_size)
    assert GptqCpuInt4Backend().supports("cpu", 4, 128) is None
    assert tile_size_for(96) == 32 and tile_size_for(-1) == 128 and tile_size_for(256) == 256
    registry = BackendRegistry(auto_order={"cpu": ("cpu-int4", "torch")})
    backend, reason = registry.select("cpu", bits, group_size)
    assert backend.name == "torch" and why in reason


def test_generation_on_the_cpu_moves_the_layers_the_kernel_serves():
    """run/serve load with for_generation: 4-bit layers go through cpu-int4, others keep the exact reference."""
    from torch import nn

    from qtool.kernels.quant_linear import QuantLinear, prefer_cpu_int4

    model = nn.Sequential(QuantLinear(64, 32, 4, 32), QuantLinear(64, 32, 3, 32), QuantLinear(64, 32, 4, 16),
                          QuantLinear(64, 32, 4, 32, backend="torch"))
    x = torch.randn(1, 64)
    assert [layer.route(x).name for layer in model] == ["torch"] * 4  # auto on the CPU: the reference
    assert prefer_cpu_int4(model) == 1  # not 3-bit, not groups of 16, not a layer the user routed to torch
    assert [layer.route(x).name for layer in model] == ["cpu-int4", "torch", "torch", "torch"]

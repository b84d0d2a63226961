"""GPTQ 4-bit on the CPU through torch's own int4 kernel (aten._weight_int4pack_mm_for_cpu, registry name
"cpu-int4"): the weight stays 4-bit in memory and is never dequantized whole, where the torch reference dequantizes
every layer on every call (0.4 tok/s for SmolLM2 at batch 1).

torch's kernel wants uniform groups of 32/64/128/256 input columns, out_features a multiple of 16, and computes
w = (q - 8) * scale + offset in bfloat16. A GPTQ layer maps onto that by layout, not by approximation: input columns
are ordered by group (act order's g_idx), each group is cut into tiles of one allowed size that share its scale, a
partial tile is filled with columns whose input is zero, output rows are padded to 16, and offset = (8 - zero) * scale.
Inputs are rounded to bfloat16 (the kernel's only fast dtype) and the result returned in the input's dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.formats.bitpack import unpack_rows
from qtool.formats.gptq import unpack_qzeros
from qtool.kernels.linear_tensors import GptqLinearTensors, check_input_features

TILE_SIZES = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes, largest first
OUT_MULTIPLE = 16  # torch's packing wants out_features in multiples of this
CODE_OFFSET = 8  # the kernel subtracts this from every 4-bit code


def cpu_int4_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def tile_size_for(group_size: int) -> int | None:
    """The kernel's group size that tiles GPTQ groups of `group_size` columns (-1: one group per row, any size
    tiles it), or None when none does (a group smaller than 32 columns, or one not a multiple of 32)."""
    if group_size == -1:
        return TILE_SIZES[1]
    return next((size for size in TILE_SIZES if group_size % size == 0), None)


def tile_size_for_groups(g_idx: torch.Tensor, group_size: int) -> int | None:
    """The largest tile that the column count of every group is a multiple of, so that no tile is padded (a
    partial last group, e.g. SmolLM2's 576 columns at g128, takes tiles of 64 rather than a padded tile of 128:
    the padded input costs a scatter per call and the kernel reads the padding); tile_size_for's otherwise."""
    counts = torch.bincount(g_idx.long())
    counts = counts[counts > 0]
    whole = next((size for size in TILE_SIZES if bool((counts % size == 0).all())), None) if counts.numel() else None
    return whole or tile_size_for(group_size)


@dataclass
class CpuInt4Layer:
    """One GPTQ linear in torch's CPU int4 layout."""

    packed: torch.Tensor  # torch's int4 pack of codes [out_padded, in_padded]
    scales_and_offsets: torch.Tensor  # [in_padded // tile, out_padded, 2] bfloat16
    tile: int
    in_features: int
    out_features: int
    columns: torch.Tensor | None  # where each input column goes in the padded input; None: nowhere else
    in_padded: int
    bias: torch.Tensor | None


def padded_columns(g_idx: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(destination column of each input column, group of each tile, padded width): columns ordered by group, each
    group's columns in tiles of `tile`, its last tile completed by unused columns."""
    groups = g_idx.long()
    counts = torch.bincount(groups, minlength=int(groups.max()) + 1 if groups.numel() else 1)
    tiles_per_group = (counts + tile - 1) // tile
    group_start = (torch.cumsum(tiles_per_group, 0) - tiles_per_group) * tile  # first padded column of each group
    order = torch.argsort(groups, stable=True)
    rank_in_group = torch.empty_like(order)
    sorted_groups = groups[order]
    first_of_group = torch.cumsum(counts, 0) - counts
    rank_in_group[order] = torch.arange(groups.numel()) - first_of_group[sorted_groups]
    destination = group_start[groups] + rank_in_group
    tile_groups = torch.repeat_interleave(torch.arange(counts.numel()), tiles_per_group)
    return destination, tile_groups, int(tiles_per_group.sum()) * tile


def to_cpu_int4(tensors: GptqLinearTensors) -> CpuInt4Layer:
    """Repack one 4-bit GPTQ layer (any checkpoint format, act order or not) into torch's CPU int4 layout."""
    t = tensors
    tile = tile_size_for_groups(t.g_idx, t.group_size)
    k, n = t.in_features, t.out_features
    codes = unpack_rows(t.qweight, t.bits, k).to(torch.int32)  # [K, N]
    zeros = unpack_qzeros(t.qzeros, t.bits, n, t.checkpoint_format).to(torch.float32)  # [G, N]
    scales = t.scales.to(torch.float32)
    destination, tile_groups, k_padded = padded_columns(t.g_idx, tile)
    n_padded = -(-n // OUT_MULTIPLE) * OUT_MULTIPLE
    weight = torch.full((n_padded, k_padded), CODE_OFFSET, dtype=torch.int32)  # unused columns: code 8, offset 0
    weight[:n, destination] = codes.T
    tile_scales = torch.zeros(tile_groups.numel(), n_padded)
    tile_offsets = torch.zeros(tile_groups.numel(), n_padded)
    tile_scales[:, :n] = scales.index_select(0, tile_groups)
    tile_offsets[:, :n] = ((CODE_OFFSET - zeros) * scales).index_select(0, tile_groups)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.contiguous(), 1)
    scales_and_offsets = torch.stack((tile_scales, tile_offsets), dim=-1).to(torch.bfloat16).contiguous()
    identity = k_padded == k and bool(torch.equal(destination, torch.arange(k)))
    return CpuInt4Layer(packed, scales_and_offsets, tile, k, n, None if identity else destination, k_padded,
                        None if t.bias is None else t.bias.detach().clone())


def cpu_int4_matmul(x: torch.Tensor, layer: CpuInt4Layer) -> torch.Tensor:
    """y[..., out_features] = x @ W^T + bias, computed in bfloat16 by torch's CPU int4 kernel, returned in x's dtype."""
    check_input_features(x, layer.in_features, "GPTQ linear")
    rows = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    if layer.columns is not None:
        padded = rows.new_zeros(rows.shape[0], layer.in_padded)
        padded[:, layer.columns] = rows
        rows = padded
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), layer.packed, layer.tile,
                                                     layer.scales_and_offsets)
    out = out[:, : layer.out_features].to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


class GptqCpuInt4Backend:
    """4-bit GPTQ layers on the CPU through torch's int4 kernel (see the module docstring)."""

    name = "cpu-int4"

    def supports(self, device: torch.device | str, bits: int, group_size: int, m: int = 1) -> str | None:
        device = torch.device(device)
        if device.type != "cpu":
            return f"it runs on the CPU only, not {device.type}"
        if bits != 4:
            return f"torch's CPU int4 kernel takes 4-bit weights, not {bits}-bit"
        if tile_size_for(group_size) is None:
            return f"group size {group_size} is not a multiple of 32 (torch's CPU int4 kernel groups 32-256 columns)"
        if not cpu_int4_available():
            return f"torch {torch.__version__} has no CPU int4 kernel"
        return None

    def prepare(self, tensors: GptqLinearTensors) -> CpuInt4Layer:
        return to_cpu_int4(tensors)

    def matmul(self, x: torch.Tensor, packed_layer: CpuInt4Layer) -> torch.Tensor:
        return cpu_int4_matmul(x, packed_layer)


__all__ = ["GptqCpuInt4Backend", "CpuInt4Layer", "cpu_int4_available", "cpu_int4_matmul", "padded_columns",
           "tile_size_for", "tile_size_for_groups", "to_cpu_int4"]

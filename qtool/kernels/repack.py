"""One-time repack of a GPTQ linear (qweight, qzeros, scales, g_idx) into the layout the Triton kernels read:
input rows sorted so that every group is one contiguous run of rows, zero points unpacked (or one constant), and
4-bit codes packed in the order of wgmma's A fragments (fragment_rows). The checkpoint on disk keeps the GPTQ
layout; this one lives only in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
from qtool.formats.gptq import GPTQ_BITS, unpack_qzeros
from qtool.formats.bitpack import pack_rows, unpack_rows

# Rows of a group in the compute layout are a multiple of this, so a kernel tile of 32 rows (one 3-bit block,
# the smallest tl.dot K after unpacking) never straddles two groups.
GROUP_ROW_ALIGN = 32
REPACK_COLUMNS = 4096
# Stand-in rows per group for a layer with one group: a power of two above any K, so every tile is "inside".
ONE_GROUP_ROWS = 1 << 30
# 4-bit codes are stored in fragment order (see fragment_rows) when the compute rows come in whole blocks of 32
FRAGMENT_BITS = 4
FRAGMENT_BLOCK = 32


def fragment_rows(positions: torch.Tensor) -> torch.Tensor:
    """The compute row stored at each packed position in fragment order. Inside every block of 32 rows, code j of
    word c (position 8c + j) holds row 8(j % 4) + 2c + j // 4: word c holds rows {2c, 2c + 1} + 8i (i = 0..3), the
    rows one lane of a wgmma A fragment holds, so the weight-left kernel unpacks straight into that layout with no
    shared-memory round trip; and codes j and j + 4, the two 16-bit halves of the word shifted right by 4j, are
    rows 2c + 8j and 2c + 8j + 1, the adjacent pair one 32-bit register of that fragment holds, so one and-or per
    pair of codes builds the register (LEFT_PACKED). In bits of the position within the block: (c, j // 4, j % 4)
    become (j % 4, c, j // 4). The kernels compute the same map (gptq_triton_common.compute_rows)."""
    return (positions & ~31) | ((positions & 3) << 3) | (((positions >> 3) & 3) << 1) | ((positions >> 2) & 1)


@dataclass
class GptqComputeWeight:
    """A GPTQ linear in compute layout. Compute row r reads input column perm[r] (perm None: column r; -1: a
    padding row whose input is taken as 0) and belongs to group r // group_rows."""

    qweight: torch.Tensor  # int32 [k_rows*bits/32, N]: the GPTQ bit packing along K of the compute rows
    scales: torch.Tensor  # [groups, N], dtype as stored (float16 in GPTQ files)
    zeros: torch.Tensor | None  # uint8 [groups, N] true zero points; None when every zero equals zero_const
    zero_const: float
    perm: torch.Tensor | None  # int32 [k_rows]
    bias: torch.Tensor | None  # [N]
    bits: int
    in_features: int
    out_features: int
    k_rows: int
    group_rows: int
    fragment_order: bool = False  # packed position q holds compute row fragment_rows(q) (4-bit only)

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight (packed codes, scales, zeros, permutation)."""
        parts = [self.qweight, self.scales, self.zeros, self.perm]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _group_layout(g_idx: torch.Tensor, num_groups: int) -> tuple[torch.Tensor | None, int, int]:
    """(perm or None, group_rows, k_rows) for g_idx: the compute rows sorted by group, each group padded to
    group_rows rows when the groups are not all the same (aligned) size."""
    in_features = g_idx.numel()
    g = g_idx.long()
    if num_groups == 1:
        return None, ONE_GROUP_ROWS, in_features
    counts = torch.bincount(g, minlength=num_groups).tolist()
    widest = max(counts)
    uniform = all(c == widest for c in counts[:-1]) and 0 < counts[-1] <= widest
    order = torch.argsort(g, stable=True)
    if uniform and widest % GROUP_ROW_ALIGN == 0:
        identity = torch.equal(order, torch.arange(in_features, device=g.device))
        return (None if identity else order.to(torch.int32)), widest, in_features
    # Irregular groups (or a group size that is not a multiple of 32): give every group the same padded span.
    group_rows = math.ceil(widest / GROUP_ROW_ALIGN) * GROUP_ROW_ALIGN
    k_rows = group_rows * num_groups
    sorted_groups = g[order]
    starts = torch.zeros(num_groups, dtype=torch.long, device=g.device)
    starts[1:] = torch.cumsum(torch.tensor(counts, device=g.device), 0)[:-1]
    rank_in_group = torch.arange(in_features, device=g.device) - starts[sorted_groups]
    perm = torch.full((k_rows,), -1, dtype=torch.int32, device=g.device)
    perm[sorted_groups * group_rows + rank_in_group] = order.to(torch.int32)
    return perm, group_rows, k_rows


def repack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    bias: torch.Tensor | None = None,
    fragment_order: bool = True,
) -> GptqComputeWeight:
    """The compute layout of one GPTQ linear, on the device of qweight. Runs once at load time. fragment_order: store
    4-bit codes in fragment order where the compute rows come in whole blocks of 32."""
    if bits not in GPTQ_BITS:
        raise QtoolError(f"the Triton GPTQ kernels do not support {bits}-bit weights", f"bits must be one of {GPTQ_BITS}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise QtoolError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    in_features, out_features = g_idx.numel(), qweight.shape[1]
    if qweight.shape[0] * 32 != in_features * bits:
        raise QtoolError(
            f"qweight has {qweight.shape[0]} packed rows but g_idx names {in_features} inputs",
            f"{bits}-bit packing needs {in_features * bits // 32} rows",
        )
    num_groups = scales.shape[0]
    if scales.shape != (num_groups, out_features):
        raise QtoolError(f"scales has shape {tuple(scales.shape)}, expected [groups, {out_features}]")
    device = qweight.device
    g_idx = g_idx.to(device)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups):
        raise QtoolError(f"g_idx holds a group outside 0..{num_groups - 1}", "the checkpoint is corrupt: re-export it")

    perm, group_rows, k_rows = _group_layout(g_idx, num_groups)
    fragment = fragment_order and bits == FRAGMENT_BITS and k_rows % FRAGMENT_BLOCK == 0
    if perm is None and not fragment:
        packed = qweight.contiguous()
    else:
        packed = torch.empty((k_rows * bits // 32, out_features), dtype=torch.int32, device=device)
        # the input column whose code each packed position holds (-1: a padding row)
        sources = perm.long() if perm is not None else torch.arange(k_rows, device=device)
        if fragment:
            sources = sources[fragment_rows(torch.arange(k_rows, device=device))]
        padding = sources < 0
        rows = sources.clamp(min=0)
        # column chunks bound the int64 temporaries of pack_rows on the largest layers
        for start in range(0, out_features, REPACK_COLUMNS):
            stop = min(start + REPACK_COLUMNS, out_features)
            codes = unpack_rows(qweight[:, start:stop], bits, in_features)[rows]
            codes[padding] = 0  # padding rows: any code works, their input is 0
            packed[:, start:stop] = pack_rows(codes, bits)

    zeros = unpack_qzeros(qzeros.to(device), bits, out_features, checkpoint_format)
    if zeros.shape != (num_groups, out_features):
        raise QtoolError(f"qzeros unpacks to {tuple(zeros.shape)}, expected ({num_groups}, {out_features})")
    lo, hi = int(zeros.min()), int(zeros.max())
    zero_tensor = None if lo == hi else zeros.to(torch.uint8).contiguous()
    return GptqComputeWeight(
        qweight=packed,
        scales=scales.contiguous(),
        zeros=zero_tensor,
        zero_const=float(lo),
        perm=None if perm is None else perm.contiguous(),
        bias=None if bias is None else bias.reshape(-1).contiguous(),
        bits=bits,
        in_features=in_features,
        out_features=out_features,
        k_rows=k_rows,
        group_rows=group_rows,
        fragment_order=fragment,
    )

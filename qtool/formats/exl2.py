"""The EXL2 (ExLlamaV2) tensors of one linear: q_weight (rows of mixed bit widths), q_invperm/q_perm, q_scale
(4-bit scales), q_scale_max, q_groups; packed from and unpacked to an Exl2Weight, with every reader check.

Facts of the layout, as ExLlamaV2 0.3.2 writes and reads it (conversion/adaptivegptq.py pack(), cuda/pack_tensor.cu,
cuda/q_matrix.cu, ext.py make_q_matrix):
- Rows are input features in storage order: stored row k is input feature q_perm[k]; q_invperm = argsort(q_perm).
  The file holds q_invperm (int32); ExLlamaV2 recomputes q_perm from it.
- Storage rows form groups; group g has bits b_g and is packed on its own as a little-endian bit stream along
  the rows (32/b values per int32 word; 3-, 5- and 6-bit values cross word boundaries), so a group of r rows
  takes r*b/32 rows of q_weight. q_groups (int16 [2G]) = (b_0, first q_weight row of group 0, b_1, ...).
  The kernels walk the groups as regions of 8-, 6-, 5-, 4-, 3- then 2-bit rows: widths never increase.
- Code q of b bits stands for (q - 2**(b-1)) * scale (symmetric, no zero point stored).
- scale[g, n] = fp16((qs + 1)**2 * fp16(q_scale_max[g] / 256)) with qs the 4-bit field of q_scale (int32 [G, N/8],
  8 fields per word along the columns, little-endian); q_scale_max is float16 [G].
- Columns (output features) are padded to a multiple of 32 in q_weight and q_scale (padding codes 2**(b-1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
# q_weight's groups and q_scale's fields are the same little-endian int32 bit streams as GPTQ's qweight and qzeros.
from qtool.formats.bitpack import WORD_BITS, pack_bitstream_rows, unpack_bitstream_rows, values_per_block
from qtool.formats.exl2_settings import EXL2_BITS, EXL2_TENSOR_SUFFIXES, OPTIONAL_SUFFIXES

ROW_ALIGNMENT = 32  # in_features and every group's row count (3- and 5-bit groups pack 32 rows)
COLUMN_ALIGNMENT = 32  # ExLlamaV2 pads output features to this
SCALE_BITS = 4
SCALE_LEVELS = 1 << SCALE_BITS  # qs + 1 runs 1..16
MAX_IN_FEATURES = 1 << 16  # q_perm is uint16 in the kernels


# ---- 4-bit scales ----


def pack_qscale(qscale: torch.Tensor) -> torch.Tensor:
    """qs+1 values int [G, C] in 1..16 (C a multiple of 8) -> int32 [G, C/8]: field i of a word holds column
    8w+i minus 1 at bit 4i (a 4-bit stream along the columns)."""
    if qscale.dim() != 2 or qscale.shape[1] % 8:
        raise QtoolError(f"q_scale needs a 2-D tensor with a multiple of 8 columns, got {tuple(qscale.shape)}")
    q = qscale.to(torch.int64)
    if q.numel() and (int(q.min()) < 1 or int(q.max()) > SCALE_LEVELS):
        raise QtoolError(f"EXL2 scale levels must lie in 1..{SCALE_LEVELS}, got {int(q.min())}..{int(q.max())}")
    return pack_bitstream_rows((q - 1).T, SCALE_BITS).T.contiguous()


def unpack_qscale(packed: torch.Tensor) -> torch.Tensor:
    """int32 [G, C/8] -> int32 [G, C] levels qs+1 in 1..16."""
    columns = packed.shape[1] * WORD_BITS // SCALE_BITS
    return (unpack_bitstream_rows(packed.T, SCALE_BITS, columns).T + 1).contiguous()


def exl2_scale_unit(scale_max: torch.Tensor) -> torch.Tensor:
    """fp16(q_scale_max / 256) as float32, any shape: the scale of level 1 (level L scales by L**2 times it).
    ExLlamaV2 rounds q_scale_max / 256 to float16 at load (it can be subnormal)."""
    return (scale_max.to(torch.float32) / 256).to(torch.float16).to(torch.float32)


def check_exl2_scale_max(scale_max: torch.Tensor, name: str, file: str | None = None) -> None:
    """Raise QtoolError unless every q_scale_max is finite and positive: it scales every level of its group, so a
    NaN or inf spreads to every output, a negative one flips the group's weights and a zero one erases them.
    `name` is the tensor, `file` the file it came from; validate turns the same error into its finding."""
    values = scale_max.detach().reshape(-1)
    good = (values > 0) & (values < float("inf"))  # one pass: NaN fails both comparisons
    if bool(good.all()):
        return
    bad = ~good
    first = int(bad.nonzero()[0])
    where = f" in {file}" if file else ""
    raise QtoolError(
        f"{name}: {int(bad.sum())} of {values.numel()} values{where} are zero, negative or not finite (first: group {first}, {float(values[first]):g})",
        "the checkpoint is corrupt: re-export it",
    )


def exl2_scales(qscale: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """The float16 scales [G, C] the kernels use: fp16(level**2 * fp16(q_scale_max / 256)).

    Both roundings are those of ExLlamaV2: the unit is rounded to float16 at load and __hmul rounds the product
    once; float32 holds both products exactly, so rounding them here is identical."""
    return (qscale.to(torch.float32).square() * exl2_scale_unit(scale_max)[:, None]).to(torch.float16)


# ---- one linear ----


@dataclass
class Exl2Weight:
    """An EXL2-quantized weight, unpacked: weight[n, perm[k]] = (codes[k, n] - 2**(b-1)) * scales()[g, n] where
    row k lies in group g of `group_bits[g]` bits; groups are consecutive runs of `group_sizes[g]` rows."""

    codes: torch.Tensor  # int32 [in_features, out_features], rows in storage order
    qscale: torch.Tensor  # int32 [groups, out_features], levels 1..16
    scale_max: torch.Tensor  # float16 [groups]
    group_bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    perm: torch.Tensor  # int64 [in_features]: storage row k holds input feature perm[k]

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return len(self.group_bits)

    def row_group(self) -> torch.Tensor:
        """int64 [in_features]: the group of each storage row."""
        sizes = torch.tensor(self.group_sizes, dtype=torch.int64, device=self.codes.device)
        return torch.repeat_interleave(torch.arange(self.num_groups, device=self.codes.device), sizes)

    def row_bits(self) -> torch.Tensor:
        bits = torch.tensor(self.group_bits, dtype=torch.int64, device=self.codes.device)
        return bits[self.row_group()]

    def row_zero(self) -> torch.Tensor:
        """int64 [in_features]: the code of 0.0 of each storage row, 2**(bits-1)."""
        return torch.pow(2, self.row_bits() - 1)

    def scales(self) -> torch.Tensor:
        return exl2_scales(self.qscale, self.scale_max)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out_features, in_features] in input-feature order. The product is exact in float32 and
        rounded once for float16 (as ExLlamaV2's kernels do)."""
        group = self.row_group()
        centered = self.codes.to(torch.float32) - self.row_zero().to(torch.float32)[:, None]
        stored = (centered * self.scales().to(torch.float32)[group]).to(dtype)  # [K, N] storage order
        out = torch.empty_like(stored)
        out[self.perm] = stored
        return out.T

    def code_bits(self) -> int:
        """Bits of all codes (q_weight without padding)."""
        return sum(b * r for b, r in zip(self.group_bits, self.group_sizes)) * self.out_features

    def storage_bits(self) -> int:
        """Bits of every tensor of the linear as ExLlamaV2 counts them (qparams.py total_bits): codes, 4-bit
        scales, 16-bit q_scale_max, 32 bits of q_groups per group, 32-bit q_invperm per row."""
        groups = self.num_groups
        return self.code_bits() + groups * self.out_features * SCALE_BITS + groups * 16 + groups * 32 + self.in_features * 32

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.in_features * self.out_features)


def padded_columns(out_features: int) -> int:
    return -(-out_features // COLUMN_ALIGNMENT) * COLUMN_ALIGNMENT


def check_exl2_layout(in_features: int, out_features: int, group_bits, group_sizes, name: str = "linear") -> None:
    """Raise QtoolError unless ExLlamaV2 can load a linear with these groups (widths, order, sizes)."""
    if in_features % ROW_ALIGNMENT or in_features <= 0:
        raise QtoolError(f"{name}: in_features {in_features} is not a positive multiple of {ROW_ALIGNMENT}", "leave this linear unquantized (EXL2 packs rows in runs of 32)")
    if in_features > MAX_IN_FEATURES:
        raise QtoolError(f"{name}: in_features {in_features} exceeds {MAX_IN_FEATURES}", "ExLlamaV2 stores row permutations as 16-bit values")
    if out_features <= 0:
        raise QtoolError(f"{name}: out_features {out_features} must be positive")
    if len(group_bits) != len(group_sizes) or not group_bits:
        raise QtoolError(f"{name}: {len(group_bits)} group widths for {len(group_sizes)} group sizes", "give one width and one size per group")
    for g, (bits, size) in enumerate(zip(group_bits, group_sizes)):
        if bits not in EXL2_BITS:
            raise QtoolError(f"{name}: group {g} has {bits} bits", f"EXL2 widths are {', '.join(map(str, sorted(EXL2_BITS)))} (ExLlamaV2 has no {bits}-bit kernel)")
        if size <= 0 or size % ROW_ALIGNMENT:
            raise QtoolError(f"{name}: group {g} has {size} rows", f"EXL2 groups hold a positive multiple of {ROW_ALIGNMENT} rows")
    if any(later > earlier for earlier, later in zip(group_bits, group_bits[1:])):
        raise QtoolError(f"{name}: group widths {list(group_bits)} increase somewhere", "ExLlamaV2 reads groups from the widest to the narrowest: sort them by bits, descending")
    if sum(group_sizes) != in_features:
        raise QtoolError(f"{name}: groups cover {sum(group_sizes)} rows but the linear has {in_features} inputs", "the group sizes must add up to in_features")


def check_exl2_weight(w: Exl2Weight, name: str = "linear") -> None:
    check_exl2_layout(w.in_features, w.out_features, w.group_bits, w.group_sizes, name)
    groups = w.num_groups
    if tuple(w.qscale.shape) != (groups, w.out_features) or tuple(w.scale_max.shape) != (groups,):
        raise QtoolError(f"{name}: qscale {tuple(w.qscale.shape)} / scale_max {tuple(w.scale_max.shape)} do not match {groups} groups x {w.out_features} outputs")
    if w.qscale.numel() and (int(w.qscale.min()) < 1 or int(w.qscale.max()) > SCALE_LEVELS):
        raise QtoolError(f"{name}: scale levels must lie in 1..{SCALE_LEVELS}")
    check_exl2_scale_max(w.scale_max.to(torch.float16), f"{name}.q_scale_max")  # what readers would refuse
    _check_permutation(w.perm, w.in_features, f"{name}.perm")
    bits = w.row_bits()[:, None]
    if w.codes.numel() and (bool((w.codes < 0).any()) or bool((w.codes >= torch.pow(2, bits)).any())):
        raise QtoolError(f"{name}: a code exceeds its group's bit width")


def _check_permutation(perm: torch.Tensor, size: int, name: str) -> None:
    if perm.dim() != 1 or perm.shape[0] != size or perm.is_floating_point():
        raise QtoolError(f"{name} must be an integer vector of {size} entries, got {perm.dtype} {tuple(perm.shape)}", "the checkpoint is corrupt: re-export it")
    seen = torch.zeros(size, dtype=torch.bool, device=perm.device)
    p = perm.to(torch.int64)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= size):
        raise QtoolError(f"{name} holds a row outside 0..{size - 1}", "the checkpoint is corrupt: re-export it")
    seen[p] = True
    if not bool(seen.all()):
        raise QtoolError(f"{name} is not a permutation of 0..{size - 1} (a row repeats)", "the checkpoint is corrupt: re-export it")


def exl2_tensors_from_weight(w: Exl2Weight, name: str = "linear") -> dict[str, torch.Tensor]:
    """The q_weight, q_invperm, q_perm, q_scale, q_scale_max and q_groups tensors of one linear."""
    check_exl2_weight(w, name)
    columns = padded_columns(w.out_features)
    pad = columns - w.out_features
    codes, qscale = w.codes, w.qscale
    if pad:
        # Padded columns hold the code of 0.0 and the smallest scale level; readers drop them.
        codes = torch.cat([codes, w.row_zero().to(codes.dtype)[:, None].expand(-1, pad)], dim=1)
        qscale = torch.cat([qscale, torch.ones(w.num_groups, pad, dtype=qscale.dtype, device=qscale.device)], dim=1)
    packed, groups, row, q_row = [], [], 0, 0
    for bits, size in zip(w.group_bits, w.group_sizes):
        packed.append(pack_bitstream_rows(codes[row : row + size], bits))
        groups += [bits, q_row]
        row += size
        q_row += size * bits // WORD_BITS
    if q_row >= 1 << 15:
        raise QtoolError(f"{name}: {q_row} packed rows exceed the int16 row offsets of q_groups", "split the linear or use fewer bits")
    perm = w.perm.to(torch.int64)
    return {
        "q_weight": torch.cat(packed).contiguous(),
        "q_invperm": torch.argsort(perm).to(torch.int32),
        "q_perm": perm.to(torch.int32),
        "q_scale": pack_qscale(qscale).contiguous(),
        "q_scale_max": w.scale_max.to(torch.float16).contiguous(),
        "q_groups": torch.tensor(groups, dtype=torch.int16, device=codes.device),
    }


def group_layout_from_tensors(q_groups: torch.Tensor, q_weight_rows: int, name: str = "linear") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bits, rows) of each group as q_groups and the q_weight height describe them."""
    if q_groups.dim() != 1 or q_groups.numel() < 2 or q_groups.numel() % 2 or q_groups.is_floating_point():
        raise QtoolError(f"{name}.q_groups must be an integer vector of (bits, row) pairs, got {q_groups.dtype} {tuple(q_groups.shape)}", "the checkpoint is corrupt: re-export it")
    pairs = q_groups.to(torch.int64).reshape(-1, 2).tolist()
    bits = tuple(b for b, _ in pairs)
    starts = [r for _, r in pairs] + [q_weight_rows]
    if starts[0] != 0:
        raise QtoolError(f"{name}.q_groups: the first group starts at packed row {starts[0]}, not 0", "the checkpoint is corrupt: re-export it")
    sizes = []
    for g, b in enumerate(bits):
        if b not in EXL2_BITS:
            raise QtoolError(f"{name}.q_groups: group {g} has {b} bits", f"EXL2 widths are {', '.join(map(str, sorted(EXL2_BITS)))}")
        q_rows = starts[g + 1] - starts[g]
        if q_rows <= 0 or (q_rows * WORD_BITS) % b or (q_rows * WORD_BITS // b) % values_per_block(b):
            raise QtoolError(f"{name}.q_groups: group {g} spans {q_rows} packed rows, which is no whole number of {b}-bit rows", "the checkpoint is corrupt: re-export it")
        sizes.append(q_rows * WORD_BITS // b)
    if any(later > earlier for earlier, later in zip(bits, bits[1:])):
        raise QtoolError(f"{name}.q_groups: widths {list(bits)} increase somewhere", "ExLlamaV2 needs groups sorted from the widest to the narrowest")
    return bits, tuple(sizes)


def weight_from_exl2_tensors(tensors: dict[str, torch.Tensor], out_features: int | None = None, name: str = "linear") -> Exl2Weight:
    """The Exl2Weight stored in one linear's EXL2 tensors; out_features (the linear's width) drops the padded
    columns, default: all columns of q_weight. Every shape, dtype and index is checked first."""
    missing = [suffix for suffix in EXL2_TENSOR_SUFFIXES if suffix not in tensors]
    if missing:
        raise QtoolError(f"{name}: missing EXL2 tensor(s) {', '.join(f'{name}.{m}' for m in missing)}", "the checkpoint is incomplete: re-export it")
    q_weight, q_scale = tensors["q_weight"], tensors["q_scale"]
    for suffix in ("q_weight", "q_scale"):
        tensor = tensors[suffix]
        if tensor.dim() != 2 or tensor.dtype != torch.int32:
            raise QtoolError(f"{name}.{suffix} must be a 2-D int32 tensor, got {tensor.dtype} {tuple(tensor.shape)}", "the checkpoint is corrupt: re-export it")
    columns = q_weight.shape[1]
    out_features = columns if out_features is None else out_features
    if not out_features <= columns <= padded_columns(out_features) or columns % 8:
        raise QtoolError(f"{name}.q_weight has {columns} columns for a linear of {out_features} outputs", f"expected {padded_columns(out_features)} (outputs padded to a multiple of {COLUMN_ALIGNMENT})")
    bits, sizes = group_layout_from_tensors(tensors["q_groups"], q_weight.shape[0], name)
    groups = len(bits)
    if tuple(q_scale.shape) != (groups, columns // 8):
        raise QtoolError(f"{name}.q_scale has shape {tuple(q_scale.shape)}, expected {(groups, columns // 8)}", "q_groups, q_weight and q_scale disagree: the checkpoint is corrupt")
    scale_max = tensors["q_scale_max"]
    if tuple(scale_max.shape) != (groups,) or not scale_max.is_floating_point():
        raise QtoolError(f"{name}.q_scale_max has {scale_max.dtype} {tuple(scale_max.shape)}, expected float16 ({groups},)", "the checkpoint is corrupt: re-export it")
    check_exl2_scale_max(scale_max, f"{name}.q_scale_max")
    in_features = sum(sizes)
    invperm = tensors["q_invperm"]
    _check_permutation(invperm, in_features, f"{name}.q_invperm")
    perm = torch.argsort(invperm.to(torch.int64))
    if "q_perm" in tensors and not torch.equal(tensors["q_perm"].to(torch.int64).reshape(-1), perm):
        raise QtoolError(f"{name}.q_perm is not the inverse of {name}.q_invperm", "the checkpoint is corrupt: re-export it")
    codes, row, q_row = [], 0, 0
    for b, size in zip(bits, sizes):
        q_rows = size * b // WORD_BITS
        codes.append(unpack_bitstream_rows(q_weight[q_row : q_row + q_rows], b, size))
        row += size
        q_row += q_rows
    return Exl2Weight(
        codes=torch.cat(codes)[:, :out_features].contiguous(),
        qscale=unpack_qscale(q_scale)[:, :out_features].contiguous(),
        scale_max=scale_max.to(torch.float16),
        group_bits=bits,
        group_sizes=sizes,
        perm=perm,
    )


def expected_exl2_shapes(in_features: int, out_features: int, group_bits, group_sizes) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor suffix -> (shape, dtype) of a linear with this group layout (q_perm included)."""
    columns = padded_columns(out_features)
    q_rows = sum(b * r for b, r in zip(group_bits, group_sizes)) // WORD_BITS
    groups = len(group_bits)
    return {
        "q_weight": ((q_rows, columns), torch.int32),
        "q_invperm": ((in_features,), torch.int32),
        "q_perm": ((in_features,), torch.int32),
        "q_scale": ((groups, columns // 8), torch.int32),
        "q_scale_max": ((groups,), torch.float16),
        "q_groups": ((2 * groups,), torch.int16),
    }

"""The GPTQ format: the settings it allows (bit widths, group sizes, checkpoint formats) and the on-disk tensors of
one linear (qweight, qzeros, scales, g_idx) as AutoGPTQ/GPTQModel write them, to and from a QuantizedWeight."""

from __future__ import annotations

import math

import torch

from qtool.core.errors import QtoolError
# The plain GPTQ settings sit in gptq_settings.py so that bitpack.py can read them; this module is their public home.
from qtool.formats.gptq_settings import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_TENSOR_SUFFIXES, GROUP_SIZE_RULE, PER_CHANNEL_GROUP_SIZE, is_valid_group_size
from qtool.formats.bitpack import WORD_BITS, pack_columns, pack_rows, unpack_columns, unpack_rows, words_to_int32
from qtool.formats.quantized_weight import QuantizedWeight

CORRUPT_CHECKPOINT = "the checkpoint is corrupt: re-export it"
PACK_ALIGNMENT = 32  # in and out features must be multiples of this for the int32 layout (3-bit packs 32 rows)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == PER_CHANNEL_GROUP_SIZE else math.ceil(in_features / group_size)


def check_gptq_bits(bits: int, where: str) -> None:
    """Raise QtoolError unless GPTQ stores codes of this width; `where` (a module, a file) labels the error."""
    if bits not in GPTQ_BITS:
        raise QtoolError(f"{where}: {bits}-bit GPTQ is not supported", f"bits must be one of {', '.join(map(str, GPTQ_BITS))}")


def check_group_size(group_size: int, where: str) -> None:
    """Raise QtoolError unless GPTQ can store groups of this size: the one group-size rule of every reader,
    writer and quantizer (the config validator applies is_valid_group_size, the same rule)."""
    if not is_valid_group_size(group_size):
        raise QtoolError(f"{where}: group_size {group_size} is not valid", f"use {GROUP_SIZE_RULE}, e.g. 128")


def check_gptq_layout(in_features: int, out_features: int, bits: int, group_size: int, name: str = "linear") -> None:
    """Raise QtoolError unless a linear of this shape can be stored in the GPTQ layout with these settings."""
    check_gptq_bits(bits, name)
    check_group_size(group_size, name)
    for what, width in (("in_features", in_features), ("out_features", out_features)):
        if width % PACK_ALIGNMENT:
            raise QtoolError(
                f"{name}: {what} {width} is not a multiple of {PACK_ALIGNMENT}, so it cannot be packed in the GPTQ layout",
                "leave this linear unquantized (GPTQModel does the same)",
            )


def check_checkpoint_format(checkpoint_format: str) -> None:
    """v1 ("gptq") stores zero-1 in qzeros, v2 ("gptq_v2") the true zero."""
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise QtoolError(f"checkpoint_format {checkpoint_format!r} is not supported", f"use one of {', '.join(GPTQ_CHECKPOINT_FORMATS)}")


def check_gptq_scales(scales: torch.Tensor, name: str, file: str | None = None) -> None:
    """Raise QtoolError unless every scale is finite and positive: GPTQ multiplies each code by its group's scale,
    so a NaN spreads to every output and a negative one flips weights without any error. `name` is the tensor,
    `file` the file it came from; validate turns the same error into its finding."""
    values = scales.detach()
    good = (values > 0) & (values < float("inf"))  # one pass: NaN fails both comparisons
    if bool(good.all()):
        return
    where = f" in {file}" if file else ""
    not_finite = ~torch.isfinite(values)
    if bool(not_finite.any()):
        first = [int(i) for i in not_finite.nonzero()[0]]
        raise QtoolError(f"{name}: {int(not_finite.sum())} of {values.numel()} scales{where} are NaN or infinite (first at {first})", CORRUPT_CHECKPOINT)
    bad = ~good
    first = [int(i) for i in bad.nonzero()[0]]
    value = float(values[tuple(first)])
    raise QtoolError(f"{name}: {int(bad.sum())} of {values.numel()} scales{where} are zero or negative (first at {first}, value {value:g})", CORRUPT_CHECKPOINT)


def expected_gptq_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor suffix -> (shape, dtype) that a GPTQ linear of this size must have."""
    groups = num_groups(in_features, group_size)
    return {
        "qweight": ((in_features * bits // WORD_BITS, out_features), torch.int32),
        "qzeros": ((groups, out_features * bits // WORD_BITS), torch.int32),
        "scales": ((groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def _v1_offset_word(bits: int) -> int:
    """The int32 word with a 1 in every bit field: adding it adds 1 to each packed 2/4/8-bit zero."""
    return sum(1 << (bits * j) for j in range(WORD_BITS // bits))


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str, name: str = "qzeros") -> torch.Tensor:
    """True zero points int [G, N] -> the qzeros tensor of the given checkpoint format."""
    check_checkpoint_format(checkpoint_format)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise QtoolError(
                f"{name}: a zero point of 0 cannot be stored in checkpoint_format gptq (v1 stores zero-1)",
                "save with checkpoint_format gptq_v2, or clamp zero points to at least 1 when quantizing",
            )
        zeros = zeros - 1
    return pack_columns(zeros, bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, num_columns: int, checkpoint_format: str) -> torch.Tensor:
    """The qzeros tensor of a checkpoint -> true zero points int32 [G, num_columns].

    v1 adds 1 the way GPTQModel does when it reads a v1 file: for 2/4/8 bits one add per int32 word (a carry
    crosses fields), which exactly undoes GPTQModel's word-wise subtract when a zero of 0 was wrapped; for 3 bits
    per field, modulo 8. Both equal the plain per-field +1 whenever no stored field wrapped.
    """
    check_checkpoint_format(checkpoint_format)
    if checkpoint_format == "gptq" and bits != 3:
        words = (qzeros.to(torch.int64) + _v1_offset_word(bits)) & ((1 << WORD_BITS) - 1)
        return unpack_columns(words_to_int32(words), bits, num_columns)
    zeros = unpack_columns(qzeros, bits, num_columns)
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    return zeros


def gptq_tensors_from_quantized(qw: QuantizedWeight, checkpoint_format: str = "gptq", name: str = "linear") -> dict[str, torch.Tensor]:
    """The qweight, qzeros, scales (float16) and g_idx tensors of one quantized linear; `name` (the module's
    name) only labels errors."""
    check_checkpoint_format(checkpoint_format)
    check_gptq_layout(qw.in_features, qw.out_features, qw.bits, qw.group_size, name)
    groups = num_groups(qw.in_features, qw.group_size)
    if tuple(qw.scales.shape) != (groups, qw.out_features) or tuple(qw.zeros.shape) != (groups, qw.out_features):
        raise QtoolError(
            f"{name}: scales {tuple(qw.scales.shape)} / zeros {tuple(qw.zeros.shape)} do not match {groups} groups x {qw.out_features} outputs",
            f"group_size {qw.group_size} on {qw.in_features} inputs needs {groups} groups",
        )
    if tuple(qw.g_idx.shape) != (qw.in_features,) or (qw.g_idx.numel() and (int(qw.g_idx.min()) < 0 or int(qw.g_idx.max()) >= groups)):
        raise QtoolError(f"{name}: g_idx must hold one group index in 0..{groups - 1} per input row")
    scales = qw.scales.to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise QtoolError(f"{name}.scales: a scale is not finite in float16", "check the quantizer output (scales above 65504 overflow float16)")
    return {
        "qweight": pack_rows(qw.codes.T, qw.bits),
        "qzeros": pack_qzeros(qw.zeros, qw.bits, checkpoint_format, f"{name}.qzeros"),
        "scales": scales.contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def quantized_from_gptq_tensors(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq", name: str = "linear"
) -> QuantizedWeight:
    """The QuantizedWeight stored in one linear's GPTQ tensors (keys as GPTQ_TENSOR_SUFFIXES; scales kept as
    float32 of the stored values)."""
    check_checkpoint_format(checkpoint_format)
    missing = [suffix for suffix in GPTQ_TENSOR_SUFFIXES if suffix not in tensors]
    if missing:
        raise QtoolError(f"{name}: missing GPTQ tensor(s) {', '.join(f'{name}.{m}' for m in missing)}", "the checkpoint is incomplete: re-export it")
    if tensors["g_idx"].dim() != 1 or tensors["qweight"].dim() != 2:
        raise QtoolError(f"{name}: g_idx must be 1-D and qweight 2-D, got {tuple(tensors['g_idx'].shape)} and {tuple(tensors['qweight'].shape)}", "the checkpoint is corrupt: re-export it")
    in_features = tensors["g_idx"].shape[0]
    out_features = tensors["qweight"].shape[1]
    check_gptq_layout(in_features, out_features, bits, group_size, name)
    check_gptq_shapes(tensors, in_features, out_features, bits, group_size, name)
    check_gptq_scales(tensors["scales"], f"{name}.scales")
    g_idx = tensors["g_idx"].to(torch.int32)
    groups = num_groups(in_features, group_size)
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise QtoolError(f"{name}.g_idx: group index out of range 0..{groups - 1}", "the checkpoint is corrupt: re-export it")
    return QuantizedWeight(
        codes=unpack_rows(tensors["qweight"], bits, in_features).T.contiguous(),
        scales=tensors["scales"].to(torch.float32),
        zeros=unpack_qzeros(tensors["qzeros"], bits, out_features, checkpoint_format),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
    )


def check_gptq_shapes(
    tensors: dict[str, torch.Tensor], in_features: int, out_features: int, bits: int, group_size: int, name: str = "linear"
) -> None:
    """Raise QtoolError naming the first tensor whose shape is not what bits and group size imply. Integer
    tensors must be int32 (g_idx may be int64 in old files); scales any float type."""
    for suffix, (shape, dtype) in expected_gptq_shapes(in_features, out_features, bits, group_size).items():
        if suffix not in tensors:
            continue
        tensor = tensors[suffix]
        if tuple(tensor.shape) != shape:
            raise QtoolError(
                f"{name}.{suffix} has shape {tuple(tensor.shape)}, expected {shape}",
                f"bits {bits} and group_size {group_size} on a {in_features}->{out_features} linear imply that shape; check the quantization config",
            )
        allowed = (torch.int32, torch.int64) if suffix == "g_idx" else (dtype,)
        if dtype == torch.float16:
            ok = tensor.is_floating_point()
        else:
            ok = tensor.dtype in allowed
        if not ok:
            raise QtoolError(f"{name}.{suffix} has dtype {tensor.dtype}, expected {dtype}", "the checkpoint is corrupt: re-export it")

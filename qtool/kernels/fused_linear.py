"""Several linears of one input as one linear whose output is theirs side by side (q/k/v, gate/up): one matmul
launch instead of several small ones, which is what a batch-1 decode token is bound by. Float nn.Linear, GPTQ
QuantLinear and EXL2 Exl2Linear parts fuse into a module of their own kind, so the fused layer runs through the
same backends (kernels/registry.py) as the parts did; parts whose tensors cannot be laid side by side exactly are
refused with the reason.

Fusing leaves one copy of the weights: the parts' tensors become views of the fused module's (model.forward
still runs through them, reading the same memory), and their backend forms (a Triton repack, a cpu-int4 pack)
are dropped. Parts that are already adjacent views of one tensor (fused before) fuse without a copy and are left
untouched. So the first fusion of a model's parts frees their old tensors: a CUDA graph captured over the parts
before it (an unfused engine's) must not be replayed after it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from qtool.formats.bitpack import WORD_BITS
from qtool.formats.exl2 import COLUMN_ALIGNMENT
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear
from qtool.kernels.routed_linear import RoutedLinear


@dataclass(frozen=True)
class FusedLinear:
    """One module computing several linears of one input: calling it gives each part's output, in order, as
    views of the one output [..., sum(sizes)]."""

    module: nn.Module
    sizes: tuple[int, ...]  # each part's out_features

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(x).split(self.sizes, dim=-1)


def fuse_linears(parts: Sequence[nn.Module], labels: Sequence[str]) -> tuple[FusedLinear | None, str | None]:
    """(FusedLinear, None) computing `parts` (linears of one input, all float nn.Linear, all QuantLinear or all
    Exl2Linear) as one module; the parts' tensors become views of its tensors. (None, why not) when they cannot be
    fused exactly; the parts are then left as they were. `labels` name the parts in the reason."""
    if len(parts) < 2:
        return None, "fewer than two linears"
    why = _common_problem(parts, labels)
    if why:
        return None, why
    # normal tensors even when called under inference_mode: the model's parts become views of them, and the
    # model may be trained or run with autograd later
    with torch.inference_mode(False), torch.no_grad():
        if type(parts[0]) is nn.Linear:
            return _fuse_float(parts), None
        if isinstance(parts[0], QuantLinear):
            why = _gptq_problem(parts, labels)
            return (None, why) if why else (_fuse_gptq(parts), None)
        why = _exl2_problem(parts, labels)
        return (None, why) if why else (_fuse_exl2(parts), None)


# ---- what every kind needs ----


def _common_problem(parts: Sequence[nn.Module], labels: Sequence[str]) -> str | None:
    first, name = parts[0], labels[0]
    for part, label in zip(parts, labels):
        if type(part) not in (nn.Linear, QuantLinear, Exl2Linear):
            return f"{label} is a {type(part).__name__} (fusable: nn.Linear, QuantLinear, Exl2Linear)"
        if type(part) is not type(first):
            return f"{label} is a {type(part).__name__} and {name} a {type(first).__name__}"
        if part.in_features != first.in_features:
            return f"{label} takes {part.in_features} inputs and {name} {first.in_features}"
        if (part.bias is None) != (first.bias is None):
            return f"{label if part.bias is not None else name} has a bias and the other does not"
        if _device(part).type == "meta":
            return f"{label}'s weights are not loaded (on the meta device)"
        if _device(part) != _device(first):
            return f"{label} is on {_device(part)} and {name} on {_device(first)}"
        if type(part) is nn.Linear and part.weight.dtype != first.weight.dtype:
            return f"{label} is {part.weight.dtype} and {name} {first.weight.dtype}"
        if isinstance(part, RoutedLinear) and part.backend != first.backend:
            return f"{label} is routed to backend {part.backend} and {name} to {first.backend}"
        if isinstance(part, RoutedLinear) and part.registry is not first.registry:
            return f"{label} and {name} take their backends from different registries"
    return None


def _device(part: nn.Module) -> torch.device:
    return getattr(part, part.weight_buffer if isinstance(part, RoutedLinear) else "weight").device


def _joined(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The tensors concatenated along dim: a view when they already lie side by side in one storage (parts fused
    before), else a new tensor."""
    first = tensors[0]
    offset = first.storage_offset()
    adjacent = all(t.dtype == first.dtype and t.device == first.device and t.stride() == first.stride()
                   and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and t.shape[:dim] + t.shape[dim + 1:] == first.shape[:dim] + first.shape[dim + 1:]
                   for t in tensors)
    for tensor in tensors:
        adjacent = adjacent and tensor.storage_offset() == offset
        offset += tensor.shape[dim] * first.stride(dim)
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    if adjacent and _without_overlap(shape, first.stride()):
        return first.as_strided(shape, first.stride(), first.storage_offset())
    return torch.cat(list(tensors), dim=dim)


def _without_overlap(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when no two elements of a tensor of this shape and these strides share memory (each stride, smallest
    first, steps past everything the smaller ones reach). Parts of distinct modules never share memory, so a view
    over adjacent ones never does either; parts that overlap (one tensor's rows read as another's) get a copy."""
    reach = 0
    for stride, size in sorted((stride, size) for stride, size in zip(strides, shape) if size > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _slices(joined: torch.Tensor, widths: Sequence[int], dim: int) -> list[torch.Tensor]:
    """Views of `joined` along dim, one per width, in order."""
    views, start = [], 0
    for width in widths:
        views.append(joined.narrow(dim, start, width))
        start += width
    return views


def _joined_bias(parts: Sequence[nn.Module]) -> torch.Tensor | None:
    if parts[0].bias is None:
        return None
    return _joined([part.bias.reshape(-1) for part in parts], 0)


def _point_parts_at(parts: Sequence[nn.Module], name: str, joined: torch.Tensor | None, widths: Sequence[int],
                    dim: int) -> bool:
    """Make each part's tensor `name` its slice of `joined` (a parameter stays a parameter); False when there is
    nothing to do: no such tensor, or the parts read `joined`'s memory already (fused before). Parts that already
    read it are left as they are, so their backend forms (and a CUDA graph captured over them) stay valid."""
    first = getattr(parts[0], name)
    if joined is None or joined.untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        return False
    for part, view in zip(parts, _slices(joined, widths, dim)):
        old = getattr(part, name)
        setattr(part, name, nn.Parameter(view, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
                else view)
    return True


# ---- float ----


def _fuse_float(parts: Sequence[nn.Module]) -> FusedLinear:
    sizes = tuple(part.out_features for part in parts)
    weight = _joined([part.weight for part in parts], 0)
    bias = _joined_bias(parts)
    fused = nn.Linear(parts[0].in_features, sum(sizes), bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    _point_parts_at(parts, "weight", weight, sizes, 0)
    _point_parts_at(parts, "bias", bias, sizes, 0)
    return FusedLinear(fused.eval(), sizes)


# ---- GPTQ ----


def _gptq_problem(parts: Sequence[QuantLinear], labels: Sequence[str]) -> str | None:
    first, name = parts[0], labels[0]
    for part, label in zip(parts, labels):
        for what, mine, theirs in (("bits", part.bits, first.bits), ("group size", part.group_size, first.group_size),
                                   ("checkpoint format", part.checkpoint_format, first.checkpoint_format)):
            if mine != theirs:
                return f"{label} has {what} {mine} and {name} {theirs}"
        if part.scales.dtype != first.scales.dtype:
            return f"{label} has {part.scales.dtype} scales and {name} {first.scales.dtype}"
        if not torch.equal(part.g_idx, first.g_idx):
            return f"{label} and {name} order their input rows differently (g_idx, act order)"
    return None


def _fuse_gptq(parts: Sequence[QuantLinear]) -> FusedLinear:
    """The packed tensors side by side along the output columns: qweight and scales per column, qzeros `bits`
    words per 32 columns (GPTQ widths are multiples of 32, so every part starts on a word)."""
    first = parts[0]
    sizes = tuple(part.out_features for part in parts)
    zero_words = [size * first.bits // WORD_BITS for size in sizes]
    qweight = _joined([part.qweight for part in parts], 1)
    qzeros = _joined([part.qzeros for part in parts], 1)
    scales = _joined([part.scales for part in parts], 1)
    bias = _joined_bias(parts)
    fused = QuantLinear(first.in_features, sum(sizes), first.bits, first.group_size, bias=bias is not None,
                        checkpoint_format=first.checkpoint_format, device="meta", backend=first.backend)
    fused.qweight, fused.qzeros, fused.scales, fused.g_idx = qweight, qzeros, scales, first.g_idx
    fused.bias = bias
    moved = [_point_parts_at(parts, name, tensor, widths, dim) for name, tensor, widths, dim in (
        ("qweight", qweight, sizes, 1), ("qzeros", qzeros, zero_words, 1), ("scales", scales, sizes, 1),
        ("bias", bias, sizes, 0))]
    if any(moved):  # the parts' forms were built from their old tensors
        for part in parts:
            part.release_forms()
    fused.set_backend(first.backend, first.registry)
    return FusedLinear(fused, sizes)


# ---- EXL2 ----


def _exl2_problem(parts: Sequence[Exl2Linear], labels: Sequence[str]) -> str | None:
    first, name = parts[0], labels[0]
    for part, label in zip(parts, labels):
        if part.out_features % COLUMN_ALIGNMENT:
            return (f"{label} has {part.out_features} outputs, not a multiple of {COLUMN_ALIGNMENT} (EXL2 pads each "
                    "linear's columns: its padding would sit inside the fused layer)")
        if (part.group_bits, part.group_sizes) != (first.group_bits, first.group_sizes):
            return f"{label} and {name} have different EXL2 bit plans (groups of bits and rows)"
        if not torch.equal(part.q_invperm, first.q_invperm):
            return f"{label} and {name} permute their input rows differently (q_invperm)"
        if not torch.equal(part.q_scale_max, first.q_scale_max):
            return (f"{label} and {name} have different per-group scale maxima (q_scale_max): the fused layer holds "
                    "one per group")
    return None


def _fuse_exl2(parts: Sequence[Exl2Linear]) -> FusedLinear:
    """q_weight and q_scale side by side along the columns (q_scale packs 8 columns a word, every part starts on a
    word: widths are multiples of 32); the row permutation, groups and scale maxima are the parts' common ones."""
    first = parts[0]
    sizes = tuple(part.out_features for part in parts)
    q_weight = _joined([part.q_weight for part in parts], 1)
    q_scale = _joined([part.q_scale for part in parts], 1)
    bias = _joined_bias(parts)
    fused = Exl2Linear(first.in_features, sum(sizes), first.group_bits, first.group_sizes, bias=bias is not None,
                       device="meta", backend=first.backend)
    fused.q_weight, fused.q_scale, fused.bias = q_weight, q_scale, bias
    for shared in ("q_invperm", "q_perm", "q_scale_max", "q_groups"):
        setattr(fused, shared, getattr(first, shared))
    scale_words = [size // 8 for size in sizes]
    moved = [_point_parts_at(parts, name, tensor, widths, 1 if name != "bias" else 0) for name, tensor, widths in (
        ("q_weight", q_weight, sizes), ("q_scale", q_scale, scale_words), ("bias", bias, sizes))]
    if any(moved):  # the parts' forms were built from their old tensors
        for part in parts:
            part.release_forms()
    fused.set_backend(first.backend, first.registry)
    return FusedLinear(fused, sizes)

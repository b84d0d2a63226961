"""The EXL2 facts a config or a file listing needs, as plain values: the widths ExLlamaV2 unpacks and the tensor
names of a linear. Without torch, so that the format registry and the CLI start without it; exl2.py re-exports them."""

from __future__ import annotations

EXL2_BITS = (8, 6, 5, 4, 3, 2)  # the widths ExLlamaV2's kernels unpack (no 7-bit), in the order they must appear
EXL2_TENSOR_SUFFIXES = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
OPTIONAL_SUFFIXES = ("q_perm",)  # qtool writes it; ExLlamaV2 recomputes it from q_invperm

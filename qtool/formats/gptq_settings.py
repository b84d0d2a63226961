"""The GPTQ settings a quantization config names and a GPTQ checkpoint stores: the bit widths, the group-size
rule, the checkpoint formats and the tensor names, as plain values (no tensors, no file layout)."""

# A module of its own, without torch, so that bitpack.py (which gptq.py imports) can read the widths too and so
# that the config schema and the CLI (--bits, --checkpoint-format) start without importing torch; gptq.py, the
# GPTQ format's public face, re-exports every name.

from __future__ import annotations

GPTQ_BITS = (2, 3, 4, 8)  # the widths GPTQ's int32 packing and kernels (AutoGPTQ, GPTQModel, qtool's) handle
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 stores zero - 1 in qzeros, v2 the zero itself
GPTQ_TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # the tensors of every GPTQ linear
PER_CHANNEL_GROUP_SIZE = -1  # one group spanning all input columns: one scale and zero per output channel
GROUP_SIZE_RULE = "-1 (one group per output channel) or a positive integer"


def is_valid_group_size(group_size: int) -> bool:
    """Whether GPTQ can store groups of this many input columns (the last group may be partial)."""
    return group_size == PER_CHANNEL_GROUP_SIZE or group_size >= 1

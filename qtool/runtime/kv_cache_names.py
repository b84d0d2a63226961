"""The KV cache kinds the engine stores (torch-free, so the CLI's --kv-cache choices are built without importing
torch): auto (the model's dtype), fp16, bf16, and the quantized q8 and q4."""

from __future__ import annotations

from qtool.core.errors import QtoolError

FLOAT_KV_CACHES = ("fp16", "bf16")
QUANTIZED_KV_CACHES = ("q8", "q4")
KV_CACHE_KINDS = ("auto", *FLOAT_KV_CACHES, *QUANTIZED_KV_CACHES)


def check_kv_cache(kind: object, option: str = "kv_cache") -> str:
    """`kind` when it is one of KV_CACHE_KINDS, else a one-line QtoolError naming `option` and the valid values."""
    if kind not in KV_CACHE_KINDS:
        raise QtoolError(f"{option} {kind!r} is not a KV cache kind", hint=f"use one of {', '.join(KV_CACHE_KINDS)}")
    return str(kind)


# tokens per KV cache block unless one is given: a q4 cache quantizes each block's keys per channel over the block,
# and a float16 scale and minimum per channel cost 4 bytes a channel, spread over 64 tokens (16 would take a
# quarter of q4's bytes); the others keep 16-token blocks (finer prefix caching)
Q4_BLOCK_SIZE = 64
DEFAULT_BLOCK_SIZE = 16


def default_block_size(kind: str) -> int:
    return Q4_BLOCK_SIZE if check_kv_cache(kind) == "q4" else DEFAULT_BLOCK_SIZE

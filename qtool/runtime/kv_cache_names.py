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

"""The engine's per-token operations, each routed to its Triton kernel on a CUDA tensor and to its torch
reference (engine_ops_ref.py) elsewhere. Signatures and semantics are the references'."""

from __future__ import annotations

from qtool.kernels.engine_ops_ref import (
    add_rms_norm_ref as add_rms_norm,
    paged_decode_attention_ref as paged_decode_attention,
    rope_and_cache_ref as rope_and_cache,
    silu_mul_ref as silu_mul,
)

__all__ = ["add_rms_norm", "paged_decode_attention", "rope_and_cache", "silu_mul"]

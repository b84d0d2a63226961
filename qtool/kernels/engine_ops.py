"""The engine's per-token operations, each routed to its Triton kernel (engine_ops_triton.py) on a CUDA tensor of
a GPU the kernels run on, and to its torch reference (engine_ops_ref.py) elsewhere: CPU tensors, and kernels
built by the Triton interpreter (TRITON_INTERPRET=1 is for CPU tests, never a user's path). Signatures and
semantics are the references'. The choice depends only on devices, dtypes and shapes, so a captured CUDA graph
keeps it."""

from __future__ import annotations

import torch

from qtool.kernels.engine_ops_ref import (add_rms_norm_ref, paged_decode_attention_q4_ref,
                                         paged_decode_attention_q8_ref, paged_decode_attention_ref,
                                         rope_and_cache_q4_ref, rope_and_cache_q8_ref, rope_and_cache_ref, silu_mul_ref)
from qtool.kernels.registry import triton_device_problem


def triton_problem(tensor: torch.Tensor) -> str | None:
    """Why the engine's Triton kernels do not serve this tensor's device, or None when they do."""
    if not tensor.is_cuda:
        return f"the tensor is on {tensor.device.type} (the Triton kernels serve CUDA tensors)"
    from qtool.kernels import engine_ops_triton

    return triton_device_problem(tensor.device, engine_ops_triton.triton_interpreted())


def paged_decode_attention_problem(query: torch.Tensor, key_cache: torch.Tensor) -> str | None:
    """Why paged_decode_attention runs its torch reference for these tensors, or None (the Triton kernel): a
    caller logs it once when it builds its step."""
    problem = triton_problem(query)
    if problem:
        return problem
    from qtool.kernels.engine_ops_triton import paged_decode_attention_problem as kernel_problem

    return kernel_problem(query, key_cache)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    if paged_decode_attention_problem(query, key_cache) is None:
        from qtool.kernels.engine_ops_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(query, key_cache, value_cache, block_tables, context_lens, scale,
                                             sliding_window)
    return paged_decode_attention_ref(query, key_cache, value_cache, block_tables, context_lens, scale,
                                      sliding_window)


def paged_decode_attention_q4(query: torch.Tensor, key_codes: torch.Tensor, key_parameters: torch.Tensor,
                              value_codes: torch.Tensor, value_parameters: torch.Tensor, key_staging: torch.Tensor,
                              value_staging: torch.Tensor, rotation: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                              own_slots: torch.Tensor, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Decode attention over the q4 cache's tensors (engine_ops_ref.paged_decode_attention_q4_ref): the decode
    step's attention with a q4 cache."""
    args = (query, key_codes, key_parameters, value_codes, value_parameters, key_staging, value_staging, rotation,
            cos, sin, block_tables, context_lens, own_slots, scale, sliding_window)
    if q4_kernels_problem(query) is None:
        from qtool.kernels.engine_ops_triton import paged_decode_attention_q4_triton

        return paged_decode_attention_q4_triton(*args)
    return paged_decode_attention_q4_ref(*args)


def q4_kernels_problem(query: torch.Tensor) -> str | None:
    """Why the q4 cache's Triton kernels (its write and its decode attention) do not serve this query [T, heads, d],
    or None: their torch references then run (not capturable as a CUDA graph on a GPU: they index by masks)."""
    problem = triton_problem(query)
    if problem:
        return problem
    from qtool.kernels.engine_ops_triton import Q4_MAX_HEAD_DIM

    if query.shape[-1] > Q4_MAX_HEAD_DIM:
        return f"head_dim {query.shape[-1]} is over the q4 kernels' {Q4_MAX_HEAD_DIM}"
    return None


def rope_and_cache_q4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor, rotation: torch.Tensor,
                      key_staging: torch.Tensor, value_staging: torch.Tensor, value_codes: torch.Tensor,
                      value_parameters: torch.Tensor, staging_rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    args = (query, key, value, cos, sin, key_cos, key_sin, rotation, key_staging, value_staging, value_codes,
            value_parameters, staging_rows, slots)
    if q4_kernels_problem(query) is None:
        from qtool.kernels.engine_ops_triton import rope_and_cache_q4_triton

        return rope_and_cache_q4_triton(*args)
    return rope_and_cache_q4_ref(*args)


def q8_kernels_problem(query: torch.Tensor) -> str | None:
    """Why the q8 cache's Triton kernels (its write and its decode attention) do not serve this query [T, heads,
    d], or None: their torch references then run (not capturable as a CUDA graph on a GPU: they index by masks)."""
    problem = triton_problem(query)
    if problem:
        return problem
    from qtool.kernels.engine_ops_triton import KERNEL_DTYPES, MAX_HEAD_DIM

    if query.dtype not in KERNEL_DTYPES:
        return f"the q8 kernels take float16, bfloat16 and float32 queries, not {query.dtype}"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {query.shape[-1]} is over the q8 kernels' {MAX_HEAD_DIM}"
    return None


def rope_and_cache_q8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, rotation: torch.Tensor, key_codes: torch.Tensor, key_scales: torch.Tensor,
                      value_codes: torch.Tensor, value_scales: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    args = (query, key, value, cos, sin, rotation, key_codes, key_scales, value_codes, value_scales, slots)
    if q8_kernels_problem(query) is None:
        from qtool.kernels.engine_ops_triton import rope_and_cache_q8_triton

        return rope_and_cache_q8_triton(*args)
    return rope_and_cache_q8_ref(*args)


def paged_decode_attention_q8(query: torch.Tensor, key_codes: torch.Tensor, key_scales: torch.Tensor,
                              value_codes: torch.Tensor, value_scales: torch.Tensor, rotation: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                              sliding_window: int | None = None) -> torch.Tensor:
    args = (query, key_codes, key_scales, value_codes, value_scales, rotation, block_tables, context_lens, scale,
            sliding_window)
    if q8_kernels_problem(query) is None:
        from qtool.kernels.engine_ops_triton import paged_decode_attention_q8_triton

        return paged_decode_attention_q8_triton(*args)
    return paged_decode_attention_q8_ref(*args)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    if triton_problem(x) is None:
        from qtool.kernels.engine_ops_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps, weight_offset)
    return add_rms_norm_ref(x, residual, weight, eps, weight_offset)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if triton_problem(gate) is None:
        from qtool.kernels.engine_ops_triton import silu_mul_triton

        return silu_mul_triton(gate, up)
    return silu_mul_ref(gate, up)


def rope_and_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    if triton_problem(query) is None:
        from qtool.kernels.engine_ops_triton import rope_and_cache_triton

        return rope_and_cache_triton(query, key, value, cos, sin, key_cache, value_cache, slots)
    return rope_and_cache_ref(query, key, value, cos, sin, key_cache, value_cache, slots)


for _op, _ref in ((paged_decode_attention, paged_decode_attention_ref), (add_rms_norm, add_rms_norm_ref),
                  (silu_mul, silu_mul_ref), (rope_and_cache, rope_and_cache_ref),
                  (rope_and_cache_q4, rope_and_cache_q4_ref), (paged_decode_attention_q4, paged_decode_attention_q4_ref),
                  (rope_and_cache_q8, rope_and_cache_q8_ref), (paged_decode_attention_q8, paged_decode_attention_q8_ref)):
    _op.__doc__ = _ref.__doc__  # one statement of each contract: the reference's
del _op, _ref

__all__ = ["add_rms_norm", "paged_decode_attention", "paged_decode_attention_problem", "paged_decode_attention_q4",
           "paged_decode_attention_q8", "q4_kernels_problem", "q8_kernels_problem", "rope_and_cache",
           "rope_and_cache_q4", "rope_and_cache_q8", "silu_mul", "triton_problem"]

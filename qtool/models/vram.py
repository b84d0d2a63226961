"""--target-vram: the EXL2 bits per weight at which a model's weights, its KV cache for a context length and the
inference scratch fit a GPU memory budget, with the arithmetic shown so the user can check the choice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qtool.core.errors import QtoolError

GB = 10**9  # budgets are given as the GPU's marketed size: decimal gigabytes
FLOAT16_BYTES = 2
FLOAT32_BYTES = 4
# Prompts are processed in chunks of at most this many tokens (ExLlamaV2's max_input_len default): the scratch of
# one chunk (its float32 logits and the float16 MLP activations) is reserved beside weights and cache.
PREFILL_CHUNK = 2048
MLP_ACTIVATION_COPIES = 3  # gate, up and their product


@dataclass(frozen=True)
class ModelShape:
    """What the budget needs to know about a model, read from its config."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int

    @classmethod
    def from_config(cls, hf_config: Any) -> "ModelShape":
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        return cls(
            layers=int(text.num_hidden_layers),
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
            hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
            vocab=int(text.vocab_size),
            max_positions=int(getattr(text, "max_position_embeddings", None) or 4096),
        )

    def kv_cache_bytes(self, tokens: int) -> int:
        """Keys and values of every layer for `tokens` positions, in float16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * FLOAT16_BYTES

    def scratch_bytes(self, tokens: int) -> int:
        chunk = min(tokens, PREFILL_CHUNK)
        return chunk * self.vocab * FLOAT32_BYTES + chunk * self.intermediate * MLP_ACTIVATION_COPIES * FLOAT16_BYTES


def _decimal_size(n: float) -> str:
    for unit, size in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class VramPlan:
    budget_bytes: int
    context_length: int
    kv_cache_bytes: int
    scratch_bytes: int
    fixed_bytes: int  # tensors that stay float16, and a quantized head
    quantized_weights: int  # weights of the linears whose widths the optimizer chooses
    bpw: float
    capped: bool  # True when even the widest setting fits: bpw is the maximum

    @property
    def weights_bytes(self) -> int:
        return math.ceil(self.quantized_weights * self.bpw / 8)

    def describe(self) -> str:
        gb = _decimal_size
        used = self.fixed_bytes + self.kv_cache_bytes + self.scratch_bytes + self.weights_bytes
        head = f"{self.bpw:.2f} bpw" + (" (the maximum; the budget allows more)" if self.capped else "")
        return (f"{head}: quantized linears {gb(self.weights_bytes)} + float tensors {gb(self.fixed_bytes)} + KV cache for "
                f"{self.context_length} tokens {gb(self.kv_cache_bytes)} + scratch {gb(self.scratch_bytes)} = {gb(used)} "
                f"of {gb(self.budget_bytes)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights_bytes": self.weights_bytes, "summary": self.describe()}


def plan_bpw_for_vram(shape: ModelShape, quantized_weights: int, fixed_bytes: int, budget_gb: float, context_length: int = 0,
                      bpw_range: tuple[float, float] = (2.0, 8.0)) -> VramPlan:
    """The largest bpw (to 0.01) at which everything fits `budget_gb`; context_length 0 means the model's maximum.
    Raises a QtoolError naming what would fit when even the smallest bpw does not."""
    if quantized_weights <= 0:
        raise QtoolError("the model has no linear that EXL2 can quantize", "--target-vram needs quantizable linears")
    tokens = context_length or shape.max_positions
    budget = int(budget_gb * GB)
    kv, scratch = shape.kv_cache_bytes(tokens), shape.scratch_bytes(tokens)
    spare_bits = (budget - fixed_bytes - kv - scratch) * 8
    low, high = bpw_range
    bpw = math.floor(spare_bits / quantized_weights * 100) / 100
    if bpw < low:
        needed = fixed_bytes + kv + scratch + math.ceil(quantized_weights * low / 8)
        per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * FLOAT16_BYTES
        spare_for_cache = budget - fixed_bytes - scratch - math.ceil(quantized_weights * low / 8)
        shorter = f"--context-length {spare_for_cache // per_token}" if spare_for_cache >= per_token else "a larger GPU"
        raise QtoolError(
            f"--target-vram {budget_gb:g} GB is too small: at {low} bpw the model with a KV cache of {tokens} tokens needs {needed / GB:.2f} GB",
            f"use --target-vram {math.ceil(needed / GB * 100) / 100:g} or more, or {shorter}",
        )
    return VramPlan(budget, tokens, kv, scratch, fixed_bytes, quantized_weights, min(bpw, high), bpw > high)

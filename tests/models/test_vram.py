"""--target-vram arithmetic: the chosen bpw is the largest (to 0.01) at which weights, KV cache and scratch fit,
the context defaults to the model's maximum, a budget above 8 bpw is capped, and a budget too small for 2 bpw
names what would fit."""

import math

import pytest

from qtool.core.errors import QtoolError
from qtool.models.vram import GB, ModelShape, plan_bpw_for_vram

# Llama-2-7B's dimensions, written out here from its published config
LLAMA_7B = ModelShape(layers=32, kv_heads=32, head_dim=128, hidden=4096, intermediate=11008, vocab=32000, max_positions=4096)
LINEAR_WEIGHTS_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
FLOAT_BYTES_7B = 2 * (2 * 32000 * 4096 + 65 * 4096)  # embeddings, head, norms in float16


def test_plan_fills_the_budget_to_the_hundredth():
    plan = plan_bpw_for_vram(LLAMA_7B, LINEAR_WEIGHTS_7B, FLOAT_BYTES_7B, budget_gb=8.0, context_length=2048)
    kv = 2 * 32 * 32 * 128 * 2048 * 2  # 1 GiB of keys and values in float16
    scratch = 2048 * 32000 * 4 + 2048 * 11008 * 3 * 2
    spare_bits = (8 * GB - FLOAT_BYTES_7B - kv - scratch) * 8
    assert plan.kv_cache_bytes == kv and plan.scratch_bytes == scratch
    assert plan.bpw == math.floor(spare_bits / LINEAR_WEIGHTS_7B * 100) / 100
    assert 2.0 <= plan.bpw < 8.0 and not plan.capped
    used = FLOAT_BYTES_7B + kv + scratch + plan.weights_bytes
    assert used <= 8 * GB < used + math.ceil(0.01 * LINEAR_WEIGHTS_7B / 8) + 1
    assert "KV cache for 2048 tokens" in plan.describe() and "of 8.00 GB" in plan.describe()


def test_context_defaults_to_the_model_maximum_and_shrinks_the_bpw():
    full = plan_bpw_for_vram(LLAMA_7B, LINEAR_WEIGHTS_7B, FLOAT_BYTES_7B, budget_gb=8.0)
    short = plan_bpw_for_vram(LLAMA_7B, LINEAR_WEIGHTS_7B, FLOAT_BYTES_7B, budget_gb=8.0, context_length=512)
    assert full.context_length == 4096 and full.bpw < short.bpw


def test_a_large_budget_is_capped_at_the_widest_setting():
    plan = plan_bpw_for_vram(LLAMA_7B, LINEAR_WEIGHTS_7B, FLOAT_BYTES_7B, budget_gb=80.0, context_length=4096)
    assert plan.bpw == 8.0 and plan.capped and "the maximum" in plan.describe()


def test_a_budget_too_small_names_what_would_fit():
    with pytest.raises(QtoolError) as raised:
        plan_bpw_for_vram(LLAMA_7B, LINEAR_WEIGHTS_7B, FLOAT_BYTES_7B, budget_gb=3.0, context_length=4096)
    assert "--target-vram 3 GB is too small" in raised.value.message
    needed = FLOAT_BYTES_7B + 2 * 32 * 32 * 128 * 4096 * 2 + 2048 * 32000 * 4 + 2048 * 11008 * 3 * 2 + LINEAR_WEIGHTS_7B * 2 // 8
    assert f"needs {needed / GB:.2f} GB" in raised.value.message
    assert "--context-length" in raised.value.hint or "larger GPU" in raised.value.hint

"""Fixtures of the engine tests: every test on one torch thread, and transformers' greedy generate as reference (the
tiny families come from tests/runtime/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def engine_tests_on_one_thread(one_torch_thread):
    yield


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' greedy generate on one prompt: the new ids, the stop token included when one ended it."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def reference_greedy():
    """hf_greedy(model, prompt ids, max_new_tokens, eos ids) -> new ids."""
    return hf_greedy

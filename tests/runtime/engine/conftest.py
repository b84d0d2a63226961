"""Fixtures of the engine tests: one torch thread (the CI box is shared; tiny matmuls only lose to thread hand-offs),
tiny random models of every family (tests/models/conftest.py's table) and transformers' greedy generate as reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

FAMILY_TABLE = Path(__file__).resolve().parents[2] / "models" / "conftest.py"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _family_table():
    # the models tests' table, loaded by path: --import-mode=importlib gives conftest files no importable name
    spec = importlib.util.spec_from_file_location("qtool_tests_tiny_families", FAMILY_TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _family_table()
TINY_FAMILIES = TINY.TINY_FAMILIES
build_tiny_family = TINY.build_tiny_family


def pytest_generate_tests(metafunc):
    if "tiny_family" in metafunc.fixturenames:
        metafunc.parametrize("tiny_family", list(TINY_FAMILIES))


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


@pytest.fixture(scope="session")
def tiny_families():
    return TINY_FAMILIES


@pytest.fixture(scope="session")
def build_family():
    """build_tiny_family(family, seed=0, **overrides) -> a tiny random model of that family (eval mode)."""
    return build_tiny_family

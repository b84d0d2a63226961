"""Fixtures of the runtime tests: one torch thread (the CI box is shared; tiny matmuls only lose to thread hand-offs),
tiny random models of every family (tests/models/conftest.py's table), and the chat tokenizer with a tiny llama over
its vocabulary that the batch tests share (a test file may define its own `tokenizer` or `model`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

FAMILY_TABLE = Path(__file__).resolve().parents[1] / "models" / "conftest.py"


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="session")
def tiny_families():
    return TINY_FAMILIES


@pytest.fixture(scope="session")
def build_family():
    """build_tiny_family(family, seed=0, **overrides) -> a tiny random model of that family (eval mode)."""
    return build_tiny_family


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer, tiny_chat_template):
    """The tiny tokenizer with the ChatML template: requests given as messages are rendered through it."""
    return make_tiny_tokenizer(chat_template=tiny_chat_template)


@pytest.fixture
def model(make_tiny_llama, tokenizer):
    """A tiny random llama over `tokenizer`'s vocabulary, built for each test (a test may change its weights)."""
    return make_tiny_llama(seed=6, vocab_size=len(tokenizer))

"""The float copy of a GGUF model: where it goes, that it is switched off on request, and (SmolLM2) that the
second load reads the copy and gives the same weights and tokenizer as the first."""

from __future__ import annotations


import pytest
import torch

from qtool.checkpoints import gguf_cache
from qtool.checkpoints.sources import load_model


def test_key_changes_with_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path / "c"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"x" * 10)
    first = gguf_cache.cached_float_dir(file)
    file.write_bytes(b"x" * 11)
    assert gguf_cache.cached_float_dir(file) != first
    assert not gguf_cache.is_complete(first) and not gguf_cache.is_complete(None)


@pytest.mark.slow
def test_second_load_reads_the_float_copy(monkeypatch, tmp_path, smollm2_path):
    """The copy is made for files qtool's own reader declines (here: its family table emptied)."""
    from qtool.checkpoints import gguf_loader

    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path / "cache"))
    direct = load_model("smollm2-135m", device="cpu", dtype="float32")
    cached = gguf_cache.cached_float_dir(smollm2_path)
    assert not cached.exists()  # the direct reader needs no copy
    monkeypatch.setattr(gguf_loader, "FAMILIES", {})
    first = load_model("smollm2-135m", device="cpu", dtype="float32")
    assert gguf_cache.is_complete(cached)
    second = load_model("smollm2-135m", device="cpu", dtype="float32")
    a, b, c = first.model.state_dict(), second.model.state_dict(), direct.model.state_dict()
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    text = "What is the capital of France?"
    assert first.tokenizer(text)["input_ids"] == second.tokenizer(text)["input_ids"] == direct.tokenizer(text)["input_ids"]
    assert first.tokenizer.chat_template == second.tokenizer.chat_template

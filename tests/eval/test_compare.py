"""Comparing models: the same windows for each, per-model figures against an independent reference, size and
bits from the files, and the recommendation."""

from __future__ import annotations

import random

import pytest

from qtool.core.errors import QtoolError
from qtool.eval.compare import ModelReport, compare_models, recommend

from perplexity_reference import reference_perplexity


def report(model: str, ppl: float, size: int) -> ModelReport:
    return ModelReport(model, ppl, 4, 64, 252, 1.0, 252.0, size, None, "float16")


def test_recommends_best_when_it_is_also_smallest():
    line = recommend([report("a", 10.0, 100), report("b", 10.1, 200)])
    assert line.startswith("a: lowest perplexity (10.000)")


def test_recommends_smaller_model_within_tolerance_and_names_the_worse_smaller_one():
    line = recommend([report("float", 10.0, 1000), report("q4", 10.15, 300), report("q2", 11.0, 150)], tolerance=0.02)
    assert line.startswith("q4: perplexity 10.150 is 1.5% above the best (float, 10.000), within 2%")
    assert "30% of its size" in line
    assert "q2 is smaller (150 B) but 10.0% worse" in line


def test_tolerance_decides_what_counts_as_close():
    reports = [report("float", 10.0, 1000), report("q4", 10.3, 300)]
    assert recommend(reports, tolerance=0.02).startswith("float:")
    assert recommend(reports, tolerance=0.05).startswith("q4:")


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer()


@pytest.fixture
def text(tiny_words):
    rng = random.Random(5)
    return "\n".join(" ".join(rng.choice(tiny_words) for _ in range(rng.randint(3, 12))) for _ in range(40)) + "\n"


def test_same_windows_for_every_model_and_figures_from_the_files(tmp_path, make_tiny_llama, tokenizer, text):
    full = make_tiny_llama(seed=11, vocab_size=len(tokenizer))
    full.save_pretrained(tmp_path / "f32")
    make_tiny_llama(seed=11, vocab_size=len(tokenizer)).half().save_pretrained(tmp_path / "f16")
    for name in ("f32", "f16"):
        tokenizer.save_pretrained(tmp_path / name)

    progress = []
    result = compare_models([str(tmp_path / "f32"), str(tmp_path / "f16")], text, seqlen=48, windows=3, device="cpu", progress=lambda i, n, d: progress.append((i, n)))

    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    rounded = make_tiny_llama(seed=11, vocab_size=len(tokenizer)).half().float()  # what the f16 file holds
    expected = [reference_perplexity(full, ids, 48, 3)[0], reference_perplexity(rounded, ids, 48, 3)[0]]
    assert [r.ppl for r in result.models] == pytest.approx(expected, rel=1e-5)
    assert (result.seqlen, result.windows) == (48, 3)
    assert all((r.windows, r.seqlen, r.tokens) == (3, 48, 3 * 47) for r in result.models)
    for r, name, bits in zip(result.models, ("f32", "f16"), (32, 16)):
        assert r.size_bytes == sum(p.stat().st_size for p in (tmp_path / name).glob("*.safetensors"))
        assert r.bits_per_weight == bits and r.format == f"float{bits}"
    assert result.recommendation.startswith(str(tmp_path / "f16"))  # half the size, nearly the same ppl
    assert progress[-1] == (6, 6)


def test_models_with_different_tokenizers_are_refused(tmp_path, make_tiny_llama, make_tiny_tokenizer, tokenizer, text):
    make_tiny_llama(seed=1, vocab_size=300).save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "a")
    make_tiny_llama(seed=2, vocab_size=300).save_pretrained(tmp_path / "b")
    make_tiny_tokenizer(vocab_size=270).save_pretrained(tmp_path / "b")
    with pytest.raises(QtoolError, match="tokenizes the text differently"):
        compare_models([str(tmp_path / "a"), str(tmp_path / "b")], text, seqlen=32, device="cpu")


def test_needs_two_models(text):
    with pytest.raises(QtoolError, match="at least two models"):
        compare_models(["only-one"], text)

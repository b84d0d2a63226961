"""Word error rate against a brute-force edit distance (every alignment tried) on fresh random word sequences."""

from __future__ import annotations

import random

import pytest

from qtool.finetune.audio.wer import normalize_words, word_edit_distance, word_error_rate


def brute_force_distance(ref: list[str], hyp: list[str]) -> int:
    """The definition, unmemoized: the cheapest of deleting ref's first word, inserting hyp's first word, or
    pairing the two first words (free if equal), over every way to continue."""
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    return min(1 + brute_force_distance(ref[1:], hyp),
               1 + brute_force_distance(ref, hyp[1:]),
               (ref[0] != hyp[0]) + brute_force_distance(ref[1:], hyp[1:]))


def test_edit_distance_equals_the_brute_force_one():
    rng = random.Random()
    vocabulary = ["the", "king", "wolf", "ran"]  # few words, so matches and partial matches both happen
    for _ in range(80):
        ref = [rng.choice(vocabulary) for _ in range(rng.randint(0, 6))]
        hyp = [rng.choice(vocabulary) for _ in range(rng.randint(0, 6))]
        assert word_edit_distance(ref, hyp) == brute_force_distance(ref, hyp), (ref, hyp)


def test_corpus_wer_sums_errors_over_reference_words():
    refs = ["The king ran.", "a wolf", "Once upon a time"]
    hyps = ["the king ran away", "a", "once upon the time"]
    result = word_error_rate(refs, hyps)
    expected_errors = sum(brute_force_distance(normalize_words(r), normalize_words(h)) for r, h in zip(refs, hyps))
    assert (result.errors, result.reference_words) == (expected_errors, 9)
    assert result.wer == pytest.approx(expected_errors / 9)
    assert word_error_rate(refs, refs).wer == 0.0


def test_normalization_drops_case_and_punctuation_but_keeps_contractions():
    assert normalize_words("  Hello, WORLD! It's the king's -- 'own' house-door.") == ["hello", "world", "it's", "the", "king's", "own", "house", "door"]


def test_an_empty_hypothesis_counts_every_reference_word():
    assert word_error_rate(["one two three"], [""]).wer == 1.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])

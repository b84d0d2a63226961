"""Perplexity protocol: window cutting, seqlen choice, and the result against an independent float64 loop."""

from __future__ import annotations

import random
import time

from pathlib import Path

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.eval.perplexity import choose_seqlen, cut_windows, perplexity

from perplexity_reference import reference_perplexity

WIKITEXT_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def random_text(vocabulary: tuple[str, ...], seed: int, words: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 12))) for _ in range(words // 7)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer, tiny_chat_template):
    return make_tiny_tokenizer(chat_template=tiny_chat_template)


def test_cut_windows_drops_partial_tail_and_takes_first_n():
    ids = torch.arange(11)
    assert cut_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert cut_windows(ids, 3, windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert cut_windows(ids, 11).tolist() == [list(range(11))]


@pytest.mark.parametrize("windows, match", [(4, "more windows than the text holds \\(3 of 3"), (0, "must be at least 1")])
def test_cut_windows_rejects_bad_window_counts(windows, match):
    with pytest.raises(QtoolError, match=match):
        cut_windows(torch.arange(11), 3, windows=windows)


def test_cut_windows_text_shorter_than_one_window():
    with pytest.raises(QtoolError, match="10 tokens, fewer than one window of --seqlen 11"):
        cut_windows(torch.arange(10), 11)


def test_seqlen_defaults_to_2048_or_shorter_context(make_tiny_llama):
    assert choose_seqlen(make_tiny_llama(max_position_embeddings=256), None) == 256
    assert choose_seqlen(make_tiny_llama(max_position_embeddings=4096), None) == 2048
    assert choose_seqlen(make_tiny_llama(max_position_embeddings=256), 100) == 100
    with pytest.raises(QtoolError, match="--seqlen 300 is longer than the model's context \\(256"):
        choose_seqlen(make_tiny_llama(max_position_embeddings=256), 300)
    with pytest.raises(QtoolError, match="--seqlen 1 is too short"):
        choose_seqlen(make_tiny_llama(), 1)


@pytest.mark.parametrize("seed, seqlen, windows", [(0, 64, None), (1, 37, None), (2, 50, 2)])
def test_matches_independent_float64_reference(make_tiny_llama, tokenizer, tiny_words, seed, seqlen, windows):
    model = make_tiny_llama(seed=seed, vocab_size=len(tokenizer))
    text = random_text(tiny_words, seed, 260)
    # The tokenizer's own BOS rule is bypassed in the reference too: the protocol inserts no special token.
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) % seqlen != 0, "the test needs a partial last window to drop"
    expected_ppl, expected_tokens = reference_perplexity(model, ids, seqlen, windows)
    calls = []
    result = perplexity(model, tokenizer, text, seqlen=seqlen, windows=windows, progress=lambda i, n, d: calls.append((i, n)))
    assert result.ppl == pytest.approx(expected_ppl, rel=1e-5)
    assert result.windows == (windows or len(ids) // seqlen)
    assert result.tokens == expected_tokens == result.windows * (seqlen - 1)
    assert result.seqlen == seqlen
    assert result.tokens_per_second == pytest.approx(result.tokens / result.seconds)
    assert calls == [(i, result.windows) for i in range(result.windows + 1)]


def test_no_bos_is_inserted(make_tiny_llama, tokenizer, tiny_words):
    """With a BOS in front the windows would shift by one token and the figure would change."""
    model = make_tiny_llama(seed=3, vocab_size=len(tokenizer))
    text = random_text(tiny_words, 3, 120)
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer would add one by default
    with_bos = [tokenizer.bos_token_id] + tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    shifted, _ = reference_perplexity(model, with_bos, 40)
    plain, _ = reference_perplexity(model, with_bos[1:], 40)
    result = perplexity(model, tokenizer, text, seqlen=40)
    assert result.ppl == pytest.approx(plain, rel=1e-5)
    assert result.ppl != pytest.approx(shifted, rel=1e-5)


@pytest.mark.slow
def test_smollm2_wikitext_first_40_windows(smollm2_path):
    """The float SmolLM2 baseline, measured independently by the project: 20.57 on the first 40 windows."""
    from qtool.data.text import load_eval_text
    from qtool.checkpoints.sources import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    text = load_eval_text(WIKITEXT_TEST)
    start = time.perf_counter()
    result = perplexity(loaded.model, loaded.tokenizer, text, seqlen=2048, windows=40)
    print(f"SmolLM2 wikitext-2 ppl {result.ppl:.4f} over {result.windows}x{result.seqlen} in {time.perf_counter() - start:.1f} s")
    assert result.windows == 40 and result.tokens == 40 * 2047
    assert result.ppl == pytest.approx(20.57, abs=0.02)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_are_an_error_not_a_perplexity(make_tiny_llama, tokenizer, tiny_words, value):
    model = make_tiny_llama(seed=3, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.model.norm.weight[3] = value
    with pytest.raises(QtoolError) as caught:
        perplexity(model, tokenizer, random_text(tiny_words, 1, 400), seqlen=32, windows=2, name="models/broken")
    assert caught.value.one_line() == (
        "the logits of models/broken hold NaN or infinite values, so no result is given "
        "(its weights or config are broken: run `qtool validate models/broken`)"
    )


def test_window_logits_replace_the_models_forward(make_tiny_llama, tokenizer, tiny_words):
    """An injected logits function (what `eval --engine` passes) is what the perplexity is computed from."""
    model, other = (make_tiny_llama(seed=s, vocab_size=len(tokenizer)) for s in (4, 5))
    text = random_text(tiny_words, 4, 200)
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    seen = []

    def other_logits(window):
        seen.append(window.shape)
        return other(window.unsqueeze(0), use_cache=False).logits[0]

    result = perplexity(model, tokenizer, text, seqlen=30, windows=3, window_logits=other_logits)
    expected, _ = reference_perplexity(other, ids, 30, 3)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.ppl != pytest.approx(reference_perplexity(model, ids, 30, 3)[0], rel=1e-3)
    assert seen == [torch.Size([30])] * 3

"""The sampler: filters against hand-computed references, repetition penalty by transformers' rule, per-request
generators (a seeded request samples the same alone and in a batch), NaN/inf refused, bad params refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.engine.sampling import (SamplingParams, apply_repetition_penalty, filter_logits, request_generator,
                                           sample)

PROBS = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])  # most likely first: 1, 3, 0, 4, 2


def kept_probs(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0) -> torch.Tensor:
    logits = filter_logits(PROBS.log().unsqueeze(0), torch.tensor([temperature]), torch.tensor([top_k]),
                           torch.tensor([top_p]), torch.tensor([min_p]))
    return logits.softmax(dim=1)[0]


def expected(kept: dict[int, float]) -> torch.Tensor:
    total = sum(kept.values())
    return torch.tensor([kept.get(i, 0.0) / total for i in range(5)])


def test_top_k_keeps_the_k_most_likely():
    torch.testing.assert_close(kept_probs(top_k=2), expected({1: 0.5, 3: 0.2}))
    torch.testing.assert_close(kept_probs(top_k=0), PROBS)


def test_top_p_keeps_tokens_until_their_mass_reaches_p():
    # masses before each token, most likely first: 0, .5, .7, .85, .95 -> .75 keeps three
    torch.testing.assert_close(kept_probs(top_p=0.75), expected({1: 0.5, 3: 0.2, 0: 0.15}))
    torch.testing.assert_close(kept_probs(top_p=0.1), expected({1: 1.0}))


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely():
    torch.testing.assert_close(kept_probs(min_p=0.25), expected({1: 0.5, 3: 0.2, 0: 0.15}))  # threshold .125
    torch.testing.assert_close(kept_probs(min_p=0.35), expected({1: 0.5, 3: 0.2}))  # threshold .175


def test_temperature_then_filters():
    # temperature 2 flattens p to sqrt(p); top-k 3 then keeps 1, 3, 0
    torch.testing.assert_close(kept_probs(temperature=2.0, top_k=3),
                               expected({i: math.sqrt(float(PROBS[i])) for i in (1, 3, 0)}))


def test_repetition_penalty_by_transformers_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1]], [2.0])
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # greedy sees the penalty too
    assert sample(torch.tensor([[3.0, 2.9]]), [SamplingParams(temperature=0, repetition_penalty=2.0)], [[0]],
                  [torch.Generator()]) == [1]


def test_draws_follow_the_filtered_distribution():
    gen = request_generator(0)
    params = SamplingParams(top_k=2)
    draws = [sample(PROBS.log().unsqueeze(0), [params], [[]], [gen])[0] for _ in range(2000)]
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / 2000 - 5 / 7) < 0.04


def test_a_seeded_request_samples_the_same_alone_and_in_a_batch():
    vocab = 50
    logits = torch.randn(6, 3, vocab, generator=torch.Generator().manual_seed(1))  # 6 steps, 3 requests
    params = [SamplingParams(seed=7, top_p=0.9), SamplingParams(seed=8, temperature=0.7), SamplingParams(temperature=0)]
    alone_gen = request_generator(7)
    alone = [sample(logits[t, :1], params[:1], [[]], [alone_gen])[0] for t in range(6)]
    gens = [request_generator(p.seed) for p in params]
    batched = [sample(logits[t], params, [[]] * 3, gens)[0] for t in range(6)]
    assert alone == batched
    again = request_generator(7)
    assert [sample(logits[t, :1], params[:1], [[]], [again])[0] for t in range(6)] == alone


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_refused(bad):
    logits = torch.zeros(2, 4)
    logits[1, 2] = bad
    with pytest.raises(QtoolError, match=r"NaN or infinite logits for batch rows \[1\]"):
        sample(logits, [SamplingParams(), SamplingParams()], [[], []], [torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.0),
    ("repetition_penalty", 0.0), ("seed", -3), ("stop_token_ids", (-1,)), ("stop", ("",)),
])
def test_bad_params_are_refused_in_one_line_naming_the_field(field, value):
    with pytest.raises(QtoolError) as caught:
        SamplingParams(**{field: value})
    assert field in caught.value.one_line() and "\n" not in caught.value.one_line()


def test_params_keep_lists_as_tuples():
    params = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert params.stop == ("END",) and params.stop_token_ids == (3, 4)

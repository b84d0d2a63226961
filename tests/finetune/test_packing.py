"""Packing without cross-contamination: a packed example's logits equal the same example run alone (transformers
builds a block-diagonal mask from the restarting position ids), and the batch plans keep to the token budget."""

from __future__ import annotations

import pytest
import torch

from qtool.finetune.data import IGNORE, Example
from qtool.finetune.packing import collate, epoch_order, pack_examples, plan_batches, single_rows


def random_examples(lengths, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE] + ids[1:]))
    return examples


# eager attention takes its softmax in float32 even for a float64 model: sums over rows of other lengths round
# differently by ~1e-7; a leak across examples moves the logits by ~1e-1 (the last check)
@pytest.mark.parametrize("attention, tolerance", [("sdpa", 1e-10), ("eager", 1e-5)])
def test_a_packed_example_sees_only_itself(make_tiny_llama, attention, tolerance):
    model = make_tiny_llama(seed=3, num_hidden_layers=2, attn_implementation=attention).double()
    examples = random_examples([7, 1, 13, 5, 9], vocab=300, seed=11)
    rows = pack_examples(examples, seqlen=40)
    assert len(rows) == 1 and rows[0].position_ids == [p for e in examples for p in range(len(e.input_ids))]
    batch = collate(rows + single_rows(examples[:1]), pad_id=0)  # a second, shorter row: padded
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(example.input_ids)], alone, rtol=tolerance, atol=tolerance)
            start += len(example.input_ids)
        padded = model(input_ids=batch["input_ids"][1:], position_ids=batch["position_ids"][1:], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([examples[0].input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(padded[: len(examples[0].input_ids)], alone, rtol=tolerance, atol=tolerance)
        # the same row with positions that run on (no restarts) mixes the examples: the check above can fail
        mixed = model(input_ids=batch["input_ids"][:1], use_cache=False).logits[0]
        second = slice(len(examples[0].input_ids), len(examples[0].input_ids) + 1)
        assert (mixed[second] - packed[second]).abs().max() > 1e3 * tolerance


def test_packing_keeps_examples_whole_and_in_order():
    examples = random_examples([5, 9, 3, 12, 12, 1], vocab=50, seed=2)
    rows = pack_examples(examples, seqlen=16)
    assert [len(r.input_ids) for r in rows] == [14, 15, 13]
    assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]
    assert [t for r in rows for t in r.labels] == [t for e in examples for t in e.labels]


def test_batches_keep_to_the_token_budget_padding_included():
    rows = single_rows(random_examples([3, 17, 8, 8, 30, 2, 11, 5, 25], vocab=50, seed=4))
    order = epoch_order(len(rows), seed=5, epoch=0)
    assert sorted(order) == list(range(len(rows))) and order != epoch_order(len(rows), seed=5, epoch=1)
    batches = plan_batches(rows, order, batch_tokens=34)
    assert [i for batch in batches for i in batch] == order
    for batch in batches:
        longest = max(len(rows[i].input_ids) for i in batch)
        assert len(batch) * longest <= 34 or len(batch) == 1
    # each batch is as large as the budget allows: adding the next row would exceed it
    for batch, following in zip(batches, batches[1:]):
        widened = batch + following[:1]
        assert len(widened) * max(len(rows[i].input_ids) for i in widened) > 34


def test_collate_pads_with_no_labels_and_restarting_positions():
    rows = single_rows(random_examples([4, 2], vocab=50, seed=6))
    batch = collate(rows, pad_id=7)
    assert batch["input_ids"][1].tolist() == rows[1].input_ids + [7, 7]
    assert batch["labels"][1].tolist() == rows[1].labels + [IGNORE, IGNORE]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1]

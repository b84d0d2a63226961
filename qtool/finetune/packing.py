"""Examples into rows, rows into token-budget batches, batches into tensors.

Packed rows hold several examples back to back with position ids that restart at 0 for each. Given position ids
and no attention mask (and no KV cache), transformers (5.x, masking_utils.find_packed_sequence_indices) reads
every restart as the start of a new sequence and builds a block-diagonal causal mask for sdpa and eager
attention, so no example attends to another (tests/finetune/test_packing.py checks the logits). Padding is one
more segment of its own, with no labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.finetune.data import IGNORE, Example


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def label_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def pack_examples(examples: list[Example], seqlen: int) -> list[Row]:
    """Consecutive examples joined into rows of at most seqlen tokens (an example never split between rows)."""
    rows: list[Row] = []
    current = Row([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > seqlen:
            rows.append(current)
            current = Row([], [], [])
        current.input_ids += example.input_ids
        current.labels += example.labels
        current.position_ids += list(range(len(example.input_ids)))
    if current.input_ids:
        rows.append(current)
    return rows


def single_rows(examples: list[Example]) -> list[Row]:
    return [Row(list(e.input_ids), list(e.labels), list(range(len(e.input_ids)))) for e in examples]


def make_rows(examples: list[Example], seqlen: int, packing: bool) -> list[Row]:
    return pack_examples(examples, seqlen) if packing else single_rows(examples)


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The rows' order in one epoch: a permutation drawn from its own generator, so a resumed run finds it again."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(rows, generator=generator).tolist()


def plan_batches(rows: list[Row], order: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive rows of `order` grouped so that each batch, padded to its longest row, holds at most
    batch_tokens tokens (a row longer than the budget is a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = len(rows[index].input_ids)
        if current and (len(current) + 1) * max(longest, length) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids [rows, longest]; the padding continues each row's positions as a
    segment of its own (a restart at 0), so it neither attends to nor is attended by the row's examples."""
    longest = max(len(row.input_ids) for row in rows)
    input_ids, labels, positions = [], [], []
    for row in rows:
        pad = longest - len(row.input_ids)
        input_ids.append(row.input_ids + [pad_id] * pad)
        labels.append(row.labels + [IGNORE] * pad)
        positions.append(row.position_ids + list(range(pad)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }

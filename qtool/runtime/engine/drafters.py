"""Drafters for speculative decoding: each proposes up to k tokens to follow a sequence, which the target model then
verifies in one forward. Prompt lookup copies what followed an earlier occurrence of the sequence's last n tokens;
a draft model (same tokenizer, its own KV cache) decodes k tokens greedily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from qtool.core.errors import QtoolError
from qtool.runtime.engine.block_manager import BlockManager
from qtool.runtime.engine.model_runner import ModelRunner, engine_support
from qtool.runtime.engine.sampling import sample
from qtool.runtime.engine.scheduler import ScheduledChunk
from qtool.runtime.engine.sequence import Sequence, SequenceStatus

DraftRequest = tuple[Sequence, int]  # a running sequence and the most tokens to propose for it


class Drafter(Protocol):
    name: str
    forward_passes: int  # the drafter's own model forwards (0 for prompt lookup)

    def propose(self, requests: list[DraftRequest]) -> dict[int, list[int]]:
        """seq id -> up to k proposed tokens (fewer, or none: that sequence decodes plainly this step)."""
        ...

    def release(self, seq_id: int) -> None:
        """Drop what the drafter holds for a finished or aborted request."""
        ...


def prompt_lookup(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens (n from max_n down to
    min_n; the first n that occurs wins). The copy runs on through the proposal itself, so a repeating pattern
    that ends at the sequence's end still yields k tokens."""
    length = len(tokens)
    if k < 1 or length < 2:
        return []
    ids = np.asarray(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows of tokens[:-1]: each ends before the last token, so at least one token follows it
        hits = np.flatnonzero((sliding_window_view(ids[:-1], n) == ids[-n:]).all(axis=1))
        if hits.size:
            source = int(hits[-1]) + n
            copied = list(tokens)
            for offset in range(k):
                copied.append(copied[source + offset])
            return copied[length:]
    return []


@dataclass
class NgramDrafter:
    """Prompt-lookup drafting over the sequence's prompt and output: free to run, so a miss costs nothing."""

    max_n: int = 3
    min_n: int = 1
    name: str = "ngram"
    forward_passes: int = 0

    def propose(self, requests: list[DraftRequest]) -> dict[int, list[int]]:
        proposals = {}
        for seq, k in requests:
            draft = prompt_lookup(seq.token_ids, k, self.max_n, self.min_n)
            if draft:
                proposals[seq.seq_id] = draft
        return proposals

    def release(self, seq_id: int) -> None:
        pass  # prompt lookup holds nothing per request


def check_draft_model(target: nn.Module, tokenizer: Any, draft: nn.Module, draft_tokenizer: Any) -> None:
    """Refuse a draft model the engine cannot run, or whose token ids mean other text than the target's."""
    reason = engine_support(draft)
    if reason is not None:
        raise QtoolError(f"draft model: {reason}", hint="choose a draft model of a family the engine runs")
    if tokenizer is not None and draft_tokenizer is not None:
        if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise QtoolError("the draft model's tokenizer differs from the model's",
                             hint="a draft model must share the model's tokenizer (e.g. a smaller model of its family)")
        return
    target_vocab, draft_vocab = target.config.vocab_size, draft.config.vocab_size
    if target_vocab != draft_vocab:
        raise QtoolError(f"the draft model's vocabulary has {draft_vocab} ids, the model's {target_vocab}",
                         hint="a draft model must share the model's tokenizer (pass both tokenizers to compare them)")


@dataclass
class _Mirror:
    target: Sequence
    seq: Sequence  # the draft's copy: same prompt, its own output list, block table and cached count
    synced: int  # leading output tokens known to equal the target's


class DraftModelDrafter:
    """A smaller model with the same tokenizer proposes k tokens greedily. It keeps its own paged KV cache (its own
    BlockManager) holding a mirror of each drafting sequence; each round first catches the mirror up on the tokens
    the target accepted since, reusing the K/V of drafts the target agreed with; a long catch-up (a new request's
    prompt) is chunked to `max_forward_tokens` per forward, as the target's prefill is."""

    name = "draft"

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, vocab_size: int, max_forward_tokens: int,
                 max_num_seqs: int = 1):
        self.max_forward_tokens = max_forward_tokens
        self.runner = ModelRunner(model, num_blocks, block_size)
        # on CUDA its kernels compile (and quantized linears tune) at engine start too, never inside a request
        self.runner.warm_up(max_forward_tokens, max_num_seqs)
        self.blocks = BlockManager(num_blocks, block_size)
        self.vocab_size = min(vocab_size, model.config.vocab_size)  # ids the target can take
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.forward_passes = 0
        self._mirrors: dict[int, _Mirror] = {}

    def propose(self, requests: list[DraftRequest]) -> dict[int, list[int]]:
        self._release_stale()
        active: list[tuple[Sequence, int]] = []
        for target, k in requests:
            if self.max_context is not None:
                k = min(k, self.max_context - target.num_tokens)
            mirror = self._synced_mirror(target)
            # positions up to num_tokens + k - 2 get K/V: the last draft token is proposed, never computed
            if k < 1 or not self.blocks.can_grow(mirror, target.num_tokens + k - 1):
                continue
            self.blocks.grow(mirror, target.num_tokens + k - 1)
            active.append((mirror, k))
        proposals: dict[int, list[int]] = {mirror.seq_id: [] for mirror, _ in active}
        while active:
            chunks, budget = [], self.max_forward_tokens
            for mirror, _ in active:  # those past the budget wait for the next forward
                if budget > 0:
                    chunks.append(ScheduledChunk(mirror, min(mirror.num_uncached_tokens, budget)))
                    budget -= chunks[-1].num_tokens
            sampling = [chunk.seq for chunk in chunks if chunk.samples]
            logits = self.runner.execute(chunks)[:, : self.vocab_size]
            # the request's own greedy rule (its repetition penalty included), so a draft agreeing with the
            # target proposes what the target will choose
            contexts = [m.token_ids if m.params.repetition_penalty != 1.0 else [] for m in sampling]
            tokens = dict(zip((m.seq_id for m in sampling), sample(logits, [m.params for m in sampling], contexts,
                                                                   [m.generator for m in sampling])))
            self.forward_passes += 1
            for chunk in chunks:
                chunk.seq.num_cached_tokens += chunk.num_tokens
            still = []
            for mirror, k in active:
                if mirror.seq_id in tokens:
                    mirror.output_ids.append(tokens[mirror.seq_id])
                    proposals[mirror.seq_id].append(tokens[mirror.seq_id])
                if len(proposals[mirror.seq_id]) < k:
                    still.append((mirror, k))
            active = still
        return proposals

    def _synced_mirror(self, target: Sequence) -> Sequence:
        """The draft's copy of target, its output set to the target's; cached K/V kept only for tokens both agree on."""
        entry = self._mirrors.get(target.seq_id)
        if entry is None:
            mirror = Sequence(target.seq_id, target.prompt_ids, target.params, target.generator)
            entry = self._mirrors[target.seq_id] = _Mirror(target, mirror, 0)
        mirror, theirs = entry.seq, target.output_ids
        agreed = entry.synced
        while agreed < min(len(mirror.output_ids), len(theirs)) and mirror.output_ids[agreed] == theirs[agreed]:
            agreed += 1
        del mirror.output_ids[agreed:]
        mirror.output_ids.extend(theirs[agreed:])
        entry.synced = len(theirs)
        # the last token is recomputed even when cached (a draft the target took as its own token): its logits
        # give the first proposal
        mirror.num_cached_tokens = min(mirror.num_cached_tokens, len(mirror.prompt_ids) + agreed, mirror.num_tokens - 1)
        self.blocks.release_tail(mirror, mirror.num_tokens)
        return mirror

    def release(self, seq_id: int) -> None:
        entry = self._mirrors.pop(seq_id, None)
        if entry is not None:
            self.blocks.free(entry.seq)

    def _release_stale(self) -> None:
        """Forget the mirrors of sequences no longer running (a preempted one starts over when readmitted)."""
        for seq_id, entry in list(self._mirrors.items()):
            if entry.target.status is not SequenceStatus.RUNNING:
                self.release(seq_id)

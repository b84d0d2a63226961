"""Continuous batching: each step picks which sequences compute how many tokens under a token budget (decodes
first, then running prefills, then new requests; prefills chunked), preempting by recompute when blocks run out."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence as Seq

from qtool.runtime.engine.block_manager import BlockManager
from qtool.runtime.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` positions of seq from its first uncached one, computed this step: its own tokens, then (for a
    speculating decode) `draft_ids`, tokens proposed after its last one whose logits verify them."""

    seq: Sequence
    num_tokens: int
    draft_ids: tuple[int, ...] = ()

    @property
    def start(self) -> int:
        return self.seq.num_cached_tokens

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the sequence's last token, so its logits give the next token."""
        return self.start + self.num_tokens - len(self.draft_ids) == self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Trailing rows whose logits are wanted: the last token's and each draft token's, or none."""
        return 1 + len(self.draft_ids) if self.samples else 0

    def token_ids(self) -> list[int]:
        """The chunk's input ids: seq's tokens from `start`, then the drafts."""
        return self.seq.token_slice(self.start, self.start + self.num_tokens - len(self.draft_ids)) + list(self.draft_ids)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()  # new and preempted sequences, in the order they will be admitted
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, drafts: Mapping[int, Seq[int]] | None = None) -> list[ScheduledChunk]:
        """This step's chunks. A running sequence that cannot get a block preempts the latest-arrived running
        sequence not yet scheduled this step (itself if it is the latest); new requests wait while that happens.
        `drafts` (seq id -> proposed tokens) makes a decode verify them too, at one token of budget each; a draft
        is cut to the budget and dropped rather than preempt anyone for its blocks."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        preempted = False
        if self.blocks.sliding_window is not None:  # blocks no query will read go back to the pool first
            for seq in self.running:
                self.blocks.release_out_of_window(seq)
        # decodes (one uncached token) first, so a long prompt never stalls the replies under way
        for seq in sorted(self.running, key=lambda s: (s.num_uncached_tokens > 1, s.seq_id)):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            count = min(seq.num_uncached_tokens, budget)
            draft = tuple(drafts.get(seq.seq_id, ()))[: budget - count] if drafts and seq.num_uncached_tokens == 1 else ()
            if draft and self.blocks.can_grow(seq, seq.num_cached_tokens + count + len(draft)):
                count += len(draft)
            else:
                draft = ()
            while not self.blocks.can_grow(seq, seq.num_cached_tokens + count):
                victim = max((s for s in self.running if s.seq_id not in scheduled), key=lambda s: s.seq_id)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.grow(seq, seq.num_cached_tokens + count)
                chunks.append(ScheduledChunk(seq, count, draft))
                scheduled.add(seq.seq_id)
                budget -= count
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            matched = self.blocks.match_prefix(seq)
            cached = len(matched) * self.blocks.block_size
            count = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_admit(matched, cached + count):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.admit(seq, matched)
            self.blocks.grow(seq, cached + count)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, count))
            budget -= count
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it at the front of the queue; it keeps its tokens (prompt and output so far)
        and recomputes their K/V when readmitted, reusing whatever of them is still in the prefix cache."""
        self.blocks.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, chunks: list[ScheduledChunk], tokens: Seq[int | Seq[int]],
               on_token: Callable[[Sequence, int], None] | None = None) -> None:
        """Record a finished step: the chunks' K/V are in the cache, and each sampling chunk's sequence gets its
        token, or for a speculating chunk its run (the accepted drafts, then the target's own token), in the order
        of the sampling chunks. Tokens are appended one by one, each followed by on_token (which may finish the
        sequence: a stop string), and none after the sequence finishes. Only K/V of tokens the sequence keeps
        count as cached, so a rejected draft's slots are never keyed for the prefix cache and are overwritten."""
        runs = iter(tokens)
        for chunk in chunks:
            seq = chunk.seq
            samples = chunk.samples  # read before the cached count moves
            own = chunk.num_tokens - len(chunk.draft_ids)
            if not samples:
                seq.num_cached_tokens += own
                self.blocks.register_full_blocks(seq)
                continue
            run = next(runs)
            run = [run] if isinstance(run, int) else list(run)
            accepted = len(run) - 1
            assert tuple(run[:accepted]) == chunk.draft_ids[:accepted], "a run is accepted drafts and one more token"
            before = seq.num_tokens
            appended = 0
            for token in run:
                seq.append_token(token)
                appended += 1
                if on_token is not None:
                    on_token(seq, token)
                if seq.finish_reason is not None:
                    break
            # K/V are in the cache for the sequence's own tokens and the accepted drafts it kept
            seq.num_cached_tokens = before + min(accepted, appended)
            self.blocks.register_full_blocks(seq)
            if chunk.draft_ids:
                self.blocks.release_tail(seq, seq.num_tokens)  # blocks grown for rejected drafts

    def abort(self, seq_id: int) -> bool:
        """Drop an unfinished sequence (its blocks released, keyed ones stay cached); False when none has that id."""
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.blocks.free(seq)
                self.running.remove(seq)
                break
        else:
            seq = next((s for s in self.waiting if s.seq_id == seq_id), None)
            if seq is None:
                return False
            self.waiting.remove(seq)  # waiting and preempted sequences hold no blocks
        seq.finish("abort")
        seq.status = SequenceStatus.FINISHED
        return True

    def retire_finished(self) -> list[Sequence]:
        """Sequences with a finish reason leave the batch and release their blocks (keyed ones stay cached)."""
        done = [seq for seq in self.running if seq.finish_reason is not None]
        for seq in done:
            self.blocks.free(seq)
            seq.status = SequenceStatus.FINISHED
            self.running.remove(seq)
        return done

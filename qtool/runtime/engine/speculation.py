"""Speculative decoding's policy: which running sequences draft and how many tokens (an adaptive length per request
that grows on full acceptance, shrinks on a rejection and pauses drafting while acceptance stays low), and the
greedy verification that makes the output exactly the target model's own greedy output.

Only greedy requests (temperature 0) speculate; sampled ones decode plainly, so their tokens come from the target's
own distribution unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from qtool.runtime.engine.drafters import Drafter
from qtool.runtime.engine.sequence import Sequence, SequenceStatus

ACCEPTANCE_SMOOTHING = 0.5  # weight of the latest round in the acceptance EMA
MIN_ACCEPTANCE = 0.25  # below this EMA a request pauses drafting: verifying rejected drafts only costs time
FIRST_PAUSE = 4  # plain decode steps of the first pause; each pause that follows a failed probe doubles, up to
MAX_PAUSE = 64


def verification_contexts(seq: Sequence, draft: tuple[int, ...]) -> list[list[int]]:
    """The context of each of the len(draft) + 1 verified positions, for the repetition penalty (the sampler's
    rule: empty when there is none): the sequence's tokens and the drafts before that position."""
    if seq.params.repetition_penalty == 1.0:
        return [[] for _ in range(len(draft) + 1)]
    tokens = seq.token_ids
    return [tokens + list(draft[:i]) for i in range(len(draft) + 1)]


@dataclass
class DraftLength:
    """One request's adaptive draft length. A round that accepts every draft grows k by one; a rejection sets k to
    one more than the drafts accepted. While the acceptance EMA is under MIN_ACCEPTANCE the request decodes
    plainly for a pause, then probes with one round; a probe that fails doubles the next pause."""

    max_tokens: int
    k: int = field(init=False)
    acceptance: float = 1.0
    paused_steps: int = 0
    next_pause: int = FIRST_PAUSE

    def __post_init__(self) -> None:
        self.k = self.max_tokens

    def wanted(self) -> int:
        """Draft tokens for this step (0 while paused; each call is one step)."""
        if self.paused_steps > 0:
            self.paused_steps -= 1
            return 0
        return self.k

    def record(self, drafted: int, accepted: int) -> None:
        self.acceptance += ACCEPTANCE_SMOOTHING * (accepted / drafted - self.acceptance)
        self.k = min(self.max_tokens, self.k + 1) if accepted == drafted else max(1, accepted + 1)
        if self.acceptance < MIN_ACCEPTANCE:
            self.paused_steps = self.next_pause
            self.next_pause = min(MAX_PAUSE, 2 * self.next_pause)
            # one more failed probe pauses again; one good probe lifts the EMA over the bar
            self.acceptance = MIN_ACCEPTANCE
            self.k = 1
        elif accepted > 0:
            self.next_pause = FIRST_PAUSE


@dataclass
class SpeculationStats:
    drafted: int = 0  # draft tokens verified by the target
    accepted: int = 0  # of them, those the target agreed with
    rounds: int = 0  # speculating decode steps (one target forward each, shared with the batch)
    draft_forward_passes: int = 0  # the drafter's own model forwards (a draft model's; prompt lookup has none)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**self.__dict__, "acceptance_rate": self.acceptance_rate}


class Speculator:
    """Drafts for the running greedy decodes, and verifies them against the target's logits."""

    def __init__(self, drafter: Drafter, max_draft_tokens: int):
        self.drafter = drafter
        self.max_draft_tokens = max_draft_tokens
        self._lengths: dict[int, DraftLength] = {}
        self._stats = SpeculationStats()

    def propose(self, running: list[Sequence]) -> dict[int, list[int]]:
        """seq id -> draft tokens, for running greedy sequences whose next step is a decode. A draft never reaches
        past the request's token limit: with the target's own token after it, the run fits max_tokens."""
        requests = []
        for seq in running:
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncached_tokens != 1 or not seq.params.greedy:
                continue
            length = self._lengths.setdefault(seq.seq_id, DraftLength(self.max_draft_tokens))
            k = min(length.wanted(), seq.token_limit() - seq.num_tokens - 1)
            if k >= 1:
                requests.append((seq, k))
        return self.drafter.propose(requests) if requests else {}

    def verify(self, seq: Sequence, draft: tuple[int, ...], choices: list[int]) -> list[int]:
        """The accepted run from the target's greedy choices at the last token and after each draft token
        (len(draft) + 1 of them, see verification_contexts): the longest prefix of draft the target agrees with,
        then the target's own token after it."""
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted]:
            accepted += 1
        self._stats.drafted += len(draft)
        self._stats.accepted += accepted
        self._stats.rounds += 1
        self._lengths.setdefault(seq.seq_id, DraftLength(self.max_draft_tokens)).record(len(draft), accepted)
        return list(draft[:accepted]) + [choices[accepted]]

    def release(self, seq_id: int) -> None:
        """Forget a finished or aborted request's draft length and the drafter's state for it."""
        self._lengths.pop(seq_id, None)
        self.drafter.release(seq_id)

    def stats(self) -> SpeculationStats:
        return SpeculationStats(self._stats.drafted, self._stats.accepted, self._stats.rounds,
                                self.drafter.forward_passes)

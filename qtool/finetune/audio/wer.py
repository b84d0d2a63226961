"""Word error rate: word-level edit distance (substitutions + deletions + insertions) over the reference's word
count, summed over a corpus before dividing (so long utterances weigh by their length, as ASR papers report it)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Keep letters, digits and in-word apostrophes: punctuation and case are not what an ASR error rate measures.
_NOT_WORD = re.compile(r"[^\w']+|(?<!\w)'|'(?!\w)")


def normalize_words(text: str) -> list[str]:
    """Lower-cased words without punctuation: `"Hello, world!"` -> `["hello", "world"]`."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words (each substitution, deletion and insertion costs 1), one row at a time."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class WerResult:
    errors: int
    reference_words: int

    @property
    def wer(self) -> float:
        """Errors per reference word (can exceed 1 when the hypotheses insert words); 0 for an empty reference
        that was matched exactly."""
        if self.reference_words == 0:
            return 0.0 if self.errors == 0 else float(self.errors)
        return self.errors / self.reference_words


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> WerResult:
    """Corpus WER of hypotheses against references (both normalized by `normalize_words`)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for reference, hypothesis in zip(references, hypotheses):
        ref_words = normalize_words(reference)
        errors += word_edit_distance(ref_words, normalize_words(hypothesis))
        words += len(ref_words)
    return WerResult(errors=errors, reference_words=words)

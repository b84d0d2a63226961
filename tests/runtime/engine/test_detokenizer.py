"""Incremental detokenization: the text built token by token equals decoding everything at once, a character split
over several byte tokens is held back until complete, and stop strings cut the text, even across pieces."""

from __future__ import annotations

from qtool.runtime.engine.detokenizer import INCOMPLETE, IncrementalDetokenizer

TEXT = "the quick brown fox é jumps ü over"


def feed(tokenizer, text: str, stop=()) -> tuple[IncrementalDetokenizer, list[str], bool]:
    detokenizer = IncrementalDetokenizer(tokenizer, tuple(stop))
    pieces, stopped = [], False
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        before = detokenizer.text
        stopped = detokenizer.add(token)
        pieces.append(detokenizer.text[len(before):])
        if stopped:
            break
    if not stopped:
        detokenizer.flush()
    return detokenizer, pieces, stopped


def test_incremental_text_equals_decoding_at_once(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # the accented letters take byte tokens
    detokenizer, pieces, stopped = feed(tiny_tokenizer, TEXT)
    assert not stopped and detokenizer.text == tiny_tokenizer.decode(ids) == TEXT
    assert not any(INCOMPLETE in piece for piece in pieces)


def test_stop_strings_cut_the_text_before_them(tiny_tokenizer):
    detokenizer, _, stopped = feed(tiny_tokenizer, TEXT, stop=["own f", "over"])
    assert stopped and detokenizer.text == "the quick br"
    assert detokenizer.add(5) and detokenizer.text == "the quick br"  # final once stopped


def test_a_stop_string_never_met_leaves_the_text_whole(tiny_tokenizer):
    detokenizer, _, stopped = feed(tiny_tokenizer, TEXT, stop=["zebra"])
    assert not stopped and detokenizer.text == TEXT

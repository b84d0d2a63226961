"""Stop strings over growing text: the earliest one found, the end held back while it may still become one, and a
cutter whose handed-out pieces concatenate to the final text without ever showing a stop string."""

from __future__ import annotations

import pytest

from qtool.runtime.stop_strings import StopStringCutter, first_stop, held_back


def test_first_stop_finds_the_earliest():
    assert first_stop("a ### b ## c", ("##", "###")) == 2
    assert first_stop("abc", ("x",)) is None and first_stop("abc", ()) is None


@pytest.mark.parametrize("text,stops,expected", [
    ("hello #", ("###",), 1), ("hello ##", ("###",), 2), ("hello", ("###",), 0), ("ab", ("abc", "bd"), 2),
    ("xb", ("abc", "bd"), 1), ("", ("abc",), 0), ("abc", (), 0),
])
def test_held_back_is_the_longest_end_that_starts_a_stop_string(text, stops, expected):
    assert held_back(text, stops) == expected


@pytest.mark.parametrize("pieces,stops,final", [
    (["the qu", "ick ", "##", "# fox"], ("###",), "the quick "),
    (["the #", "# fox"], ("###",), "the ## fox"),  # a start that did not become one is released
    (["a", "b", "c"], ("bc", "abcd"), "a"),
    (["plain ", "text"], (), "plain text"),
])
def test_cutter_streams_the_final_text_and_never_a_stop_string(pieces, stops, final):
    cutter, streamed = StopStringCutter(stops), ""
    for piece in pieces:
        stopped = cutter.add(piece)
        streamed += cutter.take()
        assert final.startswith(streamed) and not any(s in streamed for s in stops)
        if stopped:
            break
    streamed += cutter.take(final=True)
    assert cutter.text == streamed == final

"""Streamed text is cut exactly as the whole answer is: at the first stop text, stripped."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from instructlm.answering.textcut import TextCutter


def whole(text: str, stops: tuple[str, ...]) -> str:
    """How a non-streamed answer is cut (answerer.Answerer._finish)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[:min(cuts)] if cuts else text).strip()


def streamed(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    cutter = TextCutter(stops)
    out = [cutter.feed(p) for p in pieces]
    return [*out, cutter.finish()], cutter.stopped


# A small alphabet, so that stop texts, and their beginnings, turn up often.
PIECES = st.lists(st.text(alphabet="ab \n", max_size=4), max_size=10)
STOPS = st.lists(st.text(alphabet="ab \n", min_size=1, max_size=3), max_size=3)


@settings(max_examples=500)
@given(PIECES, STOPS)
def test_pieces_add_up_to_the_whole_answer(pieces, stops):
    text = "".join(pieces)
    out, stopped = streamed(pieces, tuple(stops))
    assert "".join(out) == whole(text, tuple(stops))
    assert stopped == any(s in text for s in stops)


def test_a_stop_text_split_over_pieces_is_held_back_then_cut():
    cutter = TextCutter(("\n\n",))
    assert cutter.feed("Hocus Pocus!\n") == "Hocus Pocus!"
    assert cutter.feed("\nmore") == ""
    assert cutter.stopped


def test_text_that_only_looked_like_a_stop_is_let_through():
    cutter = TextCutter(("END!",))
    assert cutter.feed(" Hello EN") == "Hello"  # " EN" might begin the stop text
    assert cutter.feed("D.") == " END."
    assert not cutter.stopped


def test_leading_and_trailing_whitespace_never_streams():
    out, stopped = streamed(["\n ", " Hi", " there ", "\n"], ())
    assert out == ["", "Hi", " there", "", ""] and not stopped


def test_a_stop_text_that_began_earlier_wins_over_one_completed_first():
    """With stops "a" and "bab", "bab" is cut before its "b" even though "a" is complete
    first: the whole answer "bab" is cut to nothing, so the stream must wait and see."""
    cutter = TextCutter(("a", "bab"))
    assert [cutter.feed(p) for p in ("b", "a", "b")] == ["", "", ""]
    assert cutter.stopped and cutter.finish() == ""
    cutter = TextCutter(("a", "bab"))
    assert [cutter.feed(p) for p in ("b", "a", "c")] == ["", "", "b"]
    assert cutter.stopped

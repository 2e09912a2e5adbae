"""The interval answer kind (grounding): its one syntax, its corrections, and a parser that never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvr.infer.protocol import (CORRECTIONS, Breach, format_interval, parse_grounding_turn, parse_interval,
                                parse_turn)

DURATION = 600.0


def answer_turn(answer: str) -> str:
    return f"<think>the goal scene is in (2, 3, 1)</think>\n<answer>{answer}</answer>"


# --------------------------------------------------------------------------- hand-picked cases

@pytest.mark.parametrize("text, interval", [
    ("[12.5, 30]", (12.5, 30.0)),
    ("[12.5,30]", (12.5, 30.0)),
    ("  [ 12.5s , 30s ]  ", (12.5, 30.0)),
    ("[12.5 s, 30 s]", (12.5, 30.0)),
    ("[0, 600]", (0.0, DURATION)),             # the whole video
    ("[-0, 0.000001]", (0.0, 0.000001)),
    ("[42, 42]", (42.0, 42.0)),                # a point is an interval
])
def test_valid_intervals(text, interval):
    assert parse_interval(text, DURATION) == interval


@pytest.mark.parametrize("text", [
    "", "   ", "12.5, 30", "(12.5, 30)", "[12.5 30]", "[12.5; 30]", "12.5-30", "12.5 to 30", "[12.5-30]",
    "[12.5, 30", "[12.5]", "[1, 2, 3]", "[1e3, 2e3]", "[.5, 1]", "[1., 2]", "[nan, 1]", "[inf, 1]",
    "[1, 2] seconds", "from [1, 2]", "[00:10, 00:20]", "[1,5, 2]", "[1.1234567, 2]", "[12345678, 1]",
    "[１, ２]", "[1ss, 2]", "[1, 2]]",
])
def test_malformed_intervals(text):
    assert parse_interval(text, DURATION) == Breach.MALFORMED_INTERVAL


@pytest.mark.parametrize("text, code", [
    ("[30, 12.5]", Breach.REVERSED_INTERVAL),
    ("[30.000001, 30]", Breach.REVERSED_INTERVAL),
    ("[-1, 10]", Breach.INTERVAL_OUTSIDE_VIDEO),
    ("[-0.5s, -0.1s]", Breach.INTERVAL_OUTSIDE_VIDEO),
    ("[500, 600.000001]", Breach.INTERVAL_OUTSIDE_VIDEO),
    ("[700, 800]", Breach.INTERVAL_OUTSIDE_VIDEO),
])
def test_reversed_and_outside(text, code):
    assert parse_interval(text, DURATION) == code


def test_unknown_duration_checks_only_the_start():
    for duration in (None, 0, -5, float("nan"), float("inf"), "long"):
        assert parse_interval("[10, 99999]", duration) == (10.0, 99999.0)
        assert parse_interval("[-1, 5]", duration) == Breach.INTERVAL_OUTSIDE_VIDEO


def test_format_interval_is_the_documented_syntax():
    assert format_interval(12.5, 30.0) == "[12.5, 30]"
    assert format_interval(0.0, 1 / 3) == "[0, 0.333333]"
    assert format_interval(-0.0, 2) == "[0, 2]"


def test_grounding_turn():
    ok = parse_grounding_turn(answer_turn("[12.5, 30s]"), 4, DURATION)
    assert ok.kind == "answer" and ok.breach is None
    assert ok.interval == (12.5, 30.0) and ok.answer == "[12.5, 30s]"
    # Tool calls and turn-level breaches are parse_turn's, unchanged.
    call = "<think>look</think><tool>get_caption((2, 3))</tool>"
    assert parse_grounding_turn(call, 4, DURATION) == parse_turn(call, 4)
    assert parse_grounding_turn("<answer>[1, 2]</answer>", 4, DURATION).breach == Breach.NO_THINK
    assert parse_grounding_turn(answer_turn(" "), 4, DURATION).breach == Breach.EMPTY_ANSWER


@pytest.mark.parametrize("answer, code, quoted", [
    ("around the middle", Breach.MALFORMED_INTERVAL, "around the middle"),
    ("[30, 10]", Breach.REVERSED_INTERVAL, "[30, 10]"),
    ("[550, 650]", Breach.INTERVAL_OUTSIDE_VIDEO, "[550, 650]"),
])
def test_grounding_corrections(answer, code, quoted):
    parsed = parse_grounding_turn(answer_turn(answer), 4, DURATION)
    assert parsed.kind == "invalid" and parsed.breach == code and parsed.interval is None
    assert quoted in parsed.message and "\n" not in parsed.message
    if code == Breach.INTERVAL_OUTSIDE_VIDEO:
        assert "600 seconds" in parsed.message      # the model is told the video's length
    else:
        assert "[12.5, 30]" in parsed.message       # and shown the one syntax


def test_every_interval_code_has_one_correction():
    codes = (Breach.MALFORMED_INTERVAL, Breach.REVERSED_INTERVAL, Breach.INTERVAL_OUTSIDE_VIDEO)
    assert len(set(codes)) == 3 and all(CORRECTIONS[c] for c in codes)


def test_qa_answers_are_not_read_as_intervals():
    # The interval kind is opt-in: parse_turn keeps every answer as text, intervals included.
    for answer in ("B", "[30, 10]", "[1, 2]"):
        parsed = parse_turn(answer_turn(answer), 4)
        assert parsed.answer == answer and parsed.breach is None and parsed.interval is None


# --------------------------------------------------------------------------- properties

integers = st.integers(min_value=0, max_value=9_999_999)
decimals = st.text(alphabet="0123456789", min_size=1, max_size=6)
seconds_text = st.tuples(integers, st.one_of(st.none(), decimals)).map(
    lambda p: str(p[0]) if p[1] is None else f"{p[0]}.{p[1]}")
space = st.text(alphabet=" \t\n", max_size=3)


@st.composite
def written_intervals(draw, ordered=True):
    """An interval as a model may write it: any spacing, optional 's', and the numbers as text."""
    a, b = draw(seconds_text), draw(seconds_text)
    if ordered and float(a) > float(b):
        a, b = b, a
    unit = draw(st.sampled_from(["", "s"]))
    s = [draw(space) for _ in range(8)]
    text = f"{s[0]}[{s[1]}{a}{s[2]}{unit}{s[3]},{s[4]}{b}{s[5]}{unit}{s[6]}]{s[7]}"
    return text, a, b


@settings(max_examples=400)
@given(written_intervals())
def test_valid_intervals_read_back_exactly(written):
    text, a, b = written
    assert parse_interval(text, None) == (float(a), float(b))
    # Inside a video that ends exactly at the end time too.
    assert parse_interval(text, float(b) or 1.0) == (float(a), float(b))
    assert parse_grounding_turn(answer_turn(text), 4, float(b) or 1.0).interval == (float(a), float(b))


@settings(max_examples=300)
@given(st.floats(min_value=0, max_value=9_999_999, allow_nan=False),
       st.floats(min_value=0, max_value=9_999_999, allow_nan=False))
def test_format_interval_reads_back_to_its_decimals(x, y):
    start, end = min(x, y), max(x, y)
    got = parse_interval(format_interval(start, end), None)
    assert isinstance(got, tuple)
    assert got == pytest.approx((start, end), abs=5e-7 + 1e-9)


@settings(max_examples=300)
@given(written_intervals(ordered=False))
def test_reversed_intervals_get_their_correction(written):
    text, a, b = written
    if float(a) > float(b):
        assert parse_interval(text, None) == Breach.REVERSED_INTERVAL
    else:
        assert parse_interval(text, None) == (float(a), float(b))


@settings(max_examples=300)
@given(written_intervals(), st.floats(min_value=0.001, max_value=1e7, allow_nan=False))
def test_outside_the_video_gets_its_correction(written, duration):
    text, a, b = written
    expected = Breach.INTERVAL_OUTSIDE_VIDEO if float(b) > duration else (float(a), float(b))
    assert parse_interval(text, duration) == expected


@settings(max_examples=200)
@given(seconds_text.filter(lambda t: float(t) > 0), seconds_text)
def test_negative_start_is_outside_the_video(start, end):
    assert parse_interval(f"[-{start}, {end}]", None) == Breach.INTERVAL_OUTSIDE_VIDEO


garbage = st.sampled_from(["", "x", "-", "--", ".", "..", ",", ";", "(", ")", "[", "]", "e3", "ss", "1 2"])


@settings(max_examples=400)
@given(written_intervals(), st.integers(min_value=0, max_value=3), garbage.filter(bool))
def test_broken_intervals_are_malformed(written, where, junk):
    text, a, b = written
    core = text.strip()
    broken = {0: junk + core, 1: core + junk, 2: core.replace(",", junk, 1) if junk != "," else core[1:],
              3: core.replace("[", "(", 1).replace("]", ")", 1)}[where]
    assert parse_interval(broken, None) == Breach.MALFORMED_INTERVAL


@settings(max_examples=500)
@given(st.text(max_size=300), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_parser_never_raises(text, duration):
    got = parse_interval(text, duration)
    assert got in (Breach.MALFORMED_INTERVAL, Breach.REVERSED_INTERVAL, Breach.INTERVAL_OUTSIDE_VIDEO) or (
        isinstance(got, tuple) and len(got) == 2 and got[0] <= got[1])
    parsed = parse_grounding_turn(answer_turn(text), 4, duration)
    assert (parsed.interval is not None) == (parsed.kind == "answer")


@settings(max_examples=200)
@given(st.text(alphabet="[]0123456789.,-s \t", max_size=40))
def test_parser_never_raises_on_near_misses(text):
    got = parse_interval(text, 100.0)
    if isinstance(got, tuple):
        assert 0 <= got[0] <= got[1] <= 100.0

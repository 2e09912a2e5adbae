"""The navigator protocol: parser, corrections, answers. The parser must never raise or evaluate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvr.infer.protocol import (Breach, ToolCall, complete_stopped_turn, extract_choice, first_user_message,
                                merge_reasoning, normalise_options, parse_turn, system_prompt, DEFAULT_SYSTEM_PROMPT)


def turn(tool: str) -> str:
    return f"<think>reasoning</think>\n<tool>{tool}</tool>"


@pytest.mark.parametrize("text, call", [
    (turn("get_caption((2, 3))"), ToolCall("get_caption", (2, 3))),
    (turn("get_caption((2,3,1))"), ToolCall("get_caption", (2, 3, 1))),
    (turn(" get_caption( [4, 4] ) "), ToolCall("get_caption", (4, 4))),
    (turn("get_caption(node=(1, 2))"), ToolCall("get_caption", (1, 2))),
    (turn('video_qa((1, 2, 3), "Who is it?")'), ToolCall("video_qa", (1, 2, 3), "Who is it?")),
    (turn("video_qa((1, 2, 3), 'It\\'s \"quoted\"')"), ToolCall("video_qa", (1, 2, 3), "It's \"quoted\"")),
    (turn('video_qa((1,2,3), question="a, b (c)")'), ToolCall("video_qa", (1, 2, 3), "a, b (c)")),
])
def test_valid_calls(text, call):
    parsed = parse_turn(text, 4)
    assert parsed.call == call and parsed.breach is None and parsed.think == "reasoning"


@pytest.mark.parametrize("tool, code", [
    ("get_caption(2, 3)", Breach.MALFORMED_CALL),
    ("get_caption((2, 3)", Breach.MALFORMED_CALL),
    ("get_caption((2, x))", Breach.MALFORMED_CALL),
    ("get_caption((1.5, 2))", Breach.MALFORMED_CALL),
    ("get_caption((2,))", Breach.WRONG_DEPTH),
    ("get_caption((1, 2, 3, 4))", Breach.WRONG_DEPTH),
    ('get_caption((1, 2), "why")', Breach.MALFORMED_CALL),
    ('video_qa((1, 2), "why")', Breach.WRONG_DEPTH),
    ("video_qa((1, 2, 3))", Breach.EMPTY_QUERY),
    ('video_qa((1, 2, 3), "  ")', Breach.EMPTY_QUERY),
    ("get_caption((0, 1))", Breach.OUT_OF_RANGE),
    ("get_caption((1, 5))", Breach.OUT_OF_RANGE),
    ("get_caption((99999999999999999999, 1))", Breach.MALFORMED_CALL),
    ("search((1, 2))", Breach.UNKNOWN_TOOL),
    ("get_captions", Breach.UNKNOWN_TOOL),
    ("__import__('os').system('rm -rf /')", Breach.CODE_IN_ARGUMENTS),
    ("get_caption(eval('(1, 2)'))", Breach.CODE_IN_ARGUMENTS),
    ("get_caption((1, 2)); import os", Breach.CODE_IN_ARGUMENTS),
    ("get_caption(tuple(range(2)))", Breach.CODE_IN_ARGUMENTS),
])
def test_breaches(tool, code):
    parsed = parse_turn(turn(tool), 4)
    assert parsed.call is None and parsed.breach == code
    assert parsed.message and "\n" not in parsed.message


def test_tags():
    assert parse_turn("<tool>get_caption((1, 2))</tool>", 4).breach == Breach.NO_THINK
    assert parse_turn("<think> </think><answer>A</answer>", 4).breach == Breach.NO_THINK
    assert parse_turn("<think>x</think>", 4).breach == Breach.NO_ACTION
    assert parse_turn("", 4).breach == Breach.NO_ACTION
    assert parse_turn("<think>x</think><answer>A</answer><tool>get_caption((1,2))</tool>", 4).breach \
        == Breach.TWO_ACTIONS
    assert parse_turn("<think>x</think><answer> </answer>", 4).breach == Breach.EMPTY_ANSWER
    # A tool mentioned inside the reasoning is not an action.
    p = parse_turn("<think>maybe <tool>get_caption((1,1))</tool>?</think><answer>C</answer>", 4)
    assert p.answer == "C" and p.breach is None
    assert parse_turn("<THINK>x</THINK><ANSWER>b</ANSWER>", 4).answer == "b"


def test_stopped_turns_and_split_reasoning():
    assert complete_stopped_turn("<think>a</think><tool>get_caption((1, 2))") == \
        "<think>a</think><tool>get_caption((1, 2))</tool>"
    assert complete_stopped_turn("<think>a</think><answer>B") == "<think>a</think><answer>B</answer>"
    done = "<think>a</think><answer>B</answer>"
    assert complete_stopped_turn(done) == done
    assert merge_reasoning("<tool>get_caption((1, 2))</tool>", "look at 1") == \
        "<think>look at 1</think>\n<tool>get_caption((1, 2))</tool>"
    assert merge_reasoning(done, "ignored") == done


@pytest.mark.parametrize("answer, choice", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B. a cup", "B"), ("The answer is C", "C"),
    ("answer: (a)", "A"), ("a cup", "B"), ("A cup.", "B"), ("E", None), ("", None), ("A or B", None),
])
def test_extract_choice(answer, choice):
    assert extract_choice(answer, ["A. a phone", "B. a cup", "C. a pen"]) == choice


def test_options_and_first_message():
    assert normalise_options(["a cat", "B. a dog"]) == ("A. a cat", "B. a dog")
    text = first_user_message("Why?", ("A. x", "B. y"), 75.25, [((1,), 0.0, 40.0, "One."), ((2,), 40.0, 75.25, "Two.")])
    assert text == ("Question: Why?\nOptions:\nA. x\nB. y\n\nThe video is 01:15.2 long (75.2 s). "
                    "Captions of its 2 high-level clips:\n\nClip (1,), 00:00.0-00:40.0:\nOne.\n\n"
                    "Clip (2,), 00:40.0-01:15.2:\nTwo.")
    assert "{K}" not in system_prompt(DEFAULT_SYSTEM_PROMPT, 6) and "into 6 high-level" in system_prompt(
        DEFAULT_SYSTEM_PROMPT, 6)
    assert system_prompt("a {K} {other} {", 3) == "a 3 {other} {"


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300), st.integers(min_value=1, max_value=8))
def test_parser_never_raises_on_random_text(text, k):
    parsed = parse_turn(text, k)
    assert (parsed.call is not None) + (parsed.answer is not None) + (parsed.breach is not None) == 1


_pieces = st.sampled_from(["<think>", "</think>", "<tool>", "</tool>", "<answer>", "</answer>", "get_caption",
                           "video_qa", "(", ")", "((", "))", ",", "1", "2", "9", "0", '"', "'", "\\", "q", " ",
                           "__import__", "=", "[", "]", ";", "\n"])


@settings(max_examples=600, deadline=None)
@given(st.lists(_pieces, max_size=40), st.integers(min_value=1, max_value=8))
def test_parser_never_raises_on_protocol_shaped_text(pieces, k):
    parsed = parse_turn("".join(pieces), k)
    if parsed.call is not None:
        assert all(1 <= i <= k for i in parsed.call.node)
        assert len(parsed.call.node) in ((2, 3) if parsed.call.tool == "get_caption" else (3,))

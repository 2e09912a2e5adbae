"""The grounding task in the agent loop: the same tools and loop, the interval answer kind."""

from __future__ import annotations

import asyncio

import pytest

from lvr.infer.agent import AgentOptions, Stop, run_agent
from lvr.infer.profiles import LONGVIDEO_R1_PROFILE, LVR_PROFILE
from lvr.infer.protocol import (DEFAULT_SYSTEM_PROMPT, GROUNDING, Breach, answer_limit, interval_correction,
                                parse_task_turn)
from test_sft_data import DURATION, HIGH, K, FakeEnv, ScriptedModel

QUERY = "the man picks up the keys"


def ground(replies, **agent):
    model = ScriptedModel(replies)
    result = asyncio.run(run_agent(model, FakeEnv(), QUERY, (), template=DEFAULT_SYSTEM_PROMPT,
                                   agent=AgentOptions(**agent), task=GROUNDING))
    return result, model


def test_a_grounding_query_is_told_in_the_system_prompt_and_answered_with_an_interval():
    result, model = ground(["<think>Clip 3.</think><tool>get_caption((3, 2))</tool>",
                            "<think>There.</think><answer>[225, 231.5]</answer>"])
    assert result.stopped == Stop.ANSWERED and result.task == GROUNDING
    assert result.interval == (225.0, 231.5) and result.choice is None
    system, first = model.requests[0][0]["content"], model.requests[0][1]["content"]
    assert system == DEFAULT_SYSTEM_PROMPT.replace("{K}", str(K)) + LVR_PROFILE.grounding_note
    assert "grounding query" in system and "<answer>[754.5, 790]</answer>" in system
    assert first.startswith(f"Find when this happens in the video: {QUERY}\n\nThe video is")
    assert "Options" not in first
    # the same tool, the same result layout as a question's
    assert model.requests[1][-1]["content"].startswith("get_caption: caption of medium clip (3, 2)")
    assert result.turns[-1].to_record()["action"]["interval"] == [225.0, 231.5]


@pytest.mark.parametrize("bad, code", [("[231, 225]", Breach.REVERSED_INTERVAL),
                                       ("at 3:45", Breach.MALFORMED_INTERVAL),
                                       ("[300, 500]", Breach.INTERVAL_OUTSIDE_VIDEO)])
def test_a_bad_interval_is_corrected_and_the_loop_goes_on(bad, code):
    result, model = ground([f"<think>Guess.</think><answer>{bad}</answer>",
                            "<think>Fixed.</think><answer>[225, 231]</answer>"])
    assert result.turns[0].breach == code and result.interval == (225.0, 231.0)
    assert model.requests[1][-1] == {"role": "user", "content": interval_correction(code, bad, answer_limit(DURATION))}


def test_invalid_intervals_in_a_row_end_the_run_like_other_breaches():
    result, _ = ground(["<think>x</think><answer>[2, 1]</answer>"] * 3, max_invalid=1)
    assert result.stopped == Stop.INVALID and result.interval is None and result.answer is None


def test_an_end_at_the_shown_duration_is_inside_and_clipped_to_the_real_length():
    # the first message shows 400.04 s as 400.0 and 400.06 s as 400.1: both ends are accepted
    for duration, end in ((400.04, "400.0"), (400.06, "400.1")):
        parsed = parse_task_turn(f"<think>x</think><answer>[390, {end}]</answer>", K, GROUNDING, duration)
        assert parsed.interval == (390.0, min(float(end), duration)), duration
    assert parse_task_turn("<think>x</think><answer>[390, 400.2]</answer>", K, GROUNDING,
                           400.06).breach == Breach.INTERVAL_OUTSIDE_VIDEO
    assert answer_limit(400.0) == 400.0 and answer_limit(12.31) == 12.4


def test_a_question_still_reads_a_bracketed_answer_as_text():
    parsed = parse_task_turn("<think>x</think><answer>[1, 2]</answer>", K, "qa", DURATION)
    assert parsed.answer == "[1, 2]" and parsed.interval is None


def test_every_profile_says_the_task_and_keeps_its_question_layout():
    for profile in (LVR_PROFILE, LONGVIDEO_R1_PROFILE):
        plain = profile.first_user_content(QUERY, (), DURATION, HIGH)
        grounded = profile.first_user_content(QUERY, (), DURATION, HIGH, grounding=True)
        assert grounded != plain and QUERY in str(grounded)
        assert profile.system_message("T {width}{K}", K, grounding=True).endswith(profile.grounding_note)
        assert "[" in profile.grounding_note and "seconds" in profile.grounding_note


def test_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        asyncio.run(run_agent(ScriptedModel([]), FakeEnv(), QUERY, (), template="t", task="locate"))


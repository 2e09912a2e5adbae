"""`--reward reference`: LongVideo-R1's verl-tool reward, number for number, against hand-worked cases.

The rule (verl-tool/verl/verl/utils/reward_score/longvideor1_score.py in qiujihao19/LongVideo-R1)
reads the rollout's text; node spans are the equal time division of the duration; overlaps are
summed per visit; only get_caption calls count as visits and repeats. lvr's own rule takes the
overlap against the union of the executed visits, which the same rollouts show side by side.
"""

from __future__ import annotations

import pytest

from lvr.infer.environment import Visit
from lvr.train.hints import merge_intervals
from lvr.train.rewards import (RewardWeights, composite_reward, merge_clues, reference_answer, reference_calls,
                               reference_merge_clues, reference_node_span, reference_terms, rollout_reward,
                               rollout_transcript)

OPTIONS = ["A. a cat", "B. a dog", "C. a bird"]
D, K = 160.0, 4          # high nodes 40 s, medium nodes 10 s, low nodes 2.5 s


def turn(call: str) -> str:
    return f"<think>Look.</think><tool>{call}</tool>"


# A rollout that visits medium (2, 2), low (2, 2, 3) inside it, medium (2, 3), asks video_qa on the
# low node, visits (2, 2) again, then answers B.
TURNS = [turn("get_caption((2, 2))"), turn("get_caption((2, 2, 3))"), turn("get_caption((2, 3))"),
         turn('video_qa((2, 2, 3), "what is on the table?")'), turn("get_caption((2,2))"),
         "<think>Seen it.</think><answer>B</answer>"]
RESULTS = ["Medium caption.", "Low caption.", "Medium caption.", "<information>A dog.</information>",
           "Medium caption.", None]
CLUE = [(45.0, 75.0)]


def test_node_spans_are_the_equal_division_of_the_duration():
    assert reference_node_span((2,), D, K) == (40.0, 80.0)
    assert reference_node_span((2, 2), D, K) == (50.0, 60.0)
    assert reference_node_span((2, 2, 3), D, K) == (55.0, 57.5)
    assert reference_node_span((4, 4, 4), D, K) == (157.5, 160.0)
    assert reference_node_span((5,), D, K) == (160.0, 160.0)        # past the end: the end is capped at D
    assert reference_node_span((), D, K) == (0.0, 0.0)


def test_overlapping_visits_sum_their_overlaps():
    """Hand-worked. Clue 45-75 (30 s). get_caption spans, by equal division of 160 s with K = 4:

        (2, 2)     50-60     overlap with the clue 10
        (2, 2, 3)  55-57.5   overlap 2.5  (inside (2, 2): counted again)
        (2, 3)     60-70     overlap 10
        (2, 2)     50-60     overlap 10   (the repeat: counted again)
        video_qa   -         not a visit for the reference

        summed overlap = 10 + 2.5 + 10 + 10 = 32.5 > union of the visits (50-70) = 20
        coverage  = 32.5 / 30 = 13/12
        precision = 32.5 / 20 = 13/8
        F1        = 2 · (13/12) · (13/8) / (13/12 + 13/8) = 338/260 = 1.3
        repeat    = (4 calls − 3 distinct) / 3 = 1/3
        R         = 1 · 1 (answer B) + 1 · 1.3 − 0.2 · 1/3 = 2.2333...
    """
    transcript = rollout_transcript(TURNS, RESULTS)
    f1, repeat = reference_terms(transcript, CLUE, D, K)
    assert f1 == pytest.approx(1.3) and repeat == pytest.approx(1 / 3)
    record = {"answer": "B", "choice": "B", "options": OPTIONS, "reference": "B", "clues": [list(c) for c in CLUE],
              "duration": D, "width": K, "turn_texts": TURNS, "results": RESULTS, "breaches": [None] * len(TURNS),
              "visits": [Visit(0, "get_caption", (2, 2), 50, 60).to_record(),
                         Visit(0, "get_caption", (2, 2, 3), 55, 57.5).to_record(),
                         Visit(0, "get_caption", (2, 3), 60, 70).to_record(),
                         Visit(0, "video_qa", (2, 2, 3), 55, 57.5, query="what is on the table?").to_record(),
                         Visit(0, "get_caption", (2, 2), 50, 60).to_record()]}
    parts = rollout_reward("reference", record)
    assert (parts.rule, parts.answer, parts.center_distance) == ("reference", 1.0, None)
    assert parts.localisation == pytest.approx(1.3)
    assert parts.total == pytest.approx(1 + 1.3 - 0.2 / 3)

    # lvr's rule on the same visits: overlap against their union 50-70, so coverage 20/30, precision 1,
    # F1 = 2 · (2/3) · 1 / (5/3) = 0.8; the video_qa call is a distinct call, so repeat = (5 − 4) / 4.
    lvr = rollout_reward("lvr", record)
    assert lvr.localisation == pytest.approx(0.8) and lvr.repeat == pytest.approx(0.25)
    assert lvr == composite_reward(answer="B", choice="B", options=OPTIONS, reference="B",
                                   visits=record["visits"], clues=CLUE, duration=D)


def test_which_calls_count():
    # Every <tool> block in the text counts, inside the reasoning too; tags are case-sensitive; high
    # nodes count; video_qa never does; a call with 4 ids is left out; `get_caption(1, 2)` reads as (1, 2).
    text = "\n".join([
        "<think>Maybe <tool>get_caption((1,))</tool> first.</think><tool>get_caption((1, 1))</tool>",
        "<think>x</think><TOOL>get_caption((1, 1))</TOOL>",
        "<think>x</think><tool>get_caption(1, 1)</tool>",
        "<think>x</think><tool>get_caption((1, 1, 1, 1))</tool>",
        "<think>x</think><tool>video_qa((1, 1, 1), 'who?')</tool>",
        "<think>x</think><tool>video_qa((1, 1, 1), 'who?')</tool>",
        "<think>x</think><tool>look at get_caption((1, 2))</tool>",
        "<think>x</think><tool>get_caption((1, 2</tool>",
    ])
    assert [a for n, a in reference_calls(text) if n == "get_caption"] == [(1,), (1, 1), (1, 1), (1, 1, 1, 1)]
    f1, repeat = reference_terms(text, [(0.0, 10.0)], D, K)
    # visits (1,) 0-40, (1, 1) 0-10, (1, 1) 0-10: repeat (3 − 2) / 2; overlap 10 + 10 + 10 = 30 over a 10 s
    # clue and a 40 s union: coverage 3, precision 0.75, F1 = 2 · 3 · 0.75 / 3.75 = 1.2
    assert repeat == pytest.approx(0.5) and f1 == pytest.approx(1.2)


def test_arguments_the_reference_cannot_score():
    # (1, 1) twice, 0-10 each, on a clue 0-10: overlap 20, coverage 2, precision 20/10 = 2, F1 2; repeat 1
    good = turn("get_caption((1, 1))") + turn("get_caption((1, 1))")
    assert reference_terms(good, [(0.0, 10.0)], D, K) == (2.0, 1.0)
    # an argument without a length, or an unhashable one: its scoring fails and both terms are 0
    assert reference_terms(good + turn("get_caption(3)"), [(0.0, 10.0)], D, K) == (0.0, 0.0)
    assert reference_terms(good + turn("get_caption([1, 2])"), [(0.0, 10.0)], D, K) == (0.0, 0.0)
    # ids that are not numbers: the repeat term stands, F1 is 0
    assert reference_terms(good + turn('get_caption("ab")'), [(0.0, 10.0)], D, K) == (0.0, pytest.approx(0.5))
    # no get_caption call at all: both 0
    assert reference_terms(turn("video_qa((1, 1, 1), 'q')"), [(0.0, 10.0)], D, K) == (0.0, 0.0)


def test_the_answer_is_the_last_answer_block_exactly():
    assert reference_answer("<answer> B </answer> then <answer>C</answer>") == "C"
    assert reference_answer("<ANSWER>B</ANSWER>") is None
    record = {"answer": "B", "choice": "B", "options": OPTIONS, "reference": "B", "clues": [[0, 10]],
              "duration": D, "width": K, "turn_texts": ["<think>x</think><answer>B. a dog</answer>"],
              "results": [None], "breaches": [None], "visits": []}
    assert rollout_reward("reference", record).answer == 0.0 and rollout_reward("lvr", record).answer == 1.0


def test_corrections_are_not_part_of_the_text():
    # lvr answers a broken turn with a correction that spells the tags; verl-tool observed nothing there
    turns = ["<tool>get_caption((1, 1))</tool>", "<think>x</think><answer>B</answer>"]
    results = ["Your reply has no <think>. Reply <tool>...</tool> or <answer>...</answer>.", None]
    text = rollout_transcript(turns, results, ["no_think", None])
    assert "Your reply" not in text and reference_answer(text) == "B"
    assert "Low caption" in rollout_transcript(["t"], ["Low caption"], [None])


def test_clues_merge_as_the_reference_merges_them():
    # the next clue (by start) joins when it starts at most 5 s after the end of the one before it
    assert reference_merge_clues([(0, 10), (15, 20)]) == [(0.0, 20.0)]
    assert merge_intervals([(0, 10), (15, 20)]) == [(0.0, 10.0), (15.0, 20.0)]   # lvr: less than 5 s apart
    # ... the one before it, not the group: a short clue inside a long one breaks the chain
    assert reference_merge_clues([(0, 100), (10, 20), (30, 40)]) == [(0.0, 100.0), (30.0, 40.0)]
    assert merge_clues("lvr", [(0, 100), (10, 20), (30, 40)]) == [(0.0, 100.0)]
    assert merge_clues("reference", [(30, 40), (0, 10)], gap=20) == [(0.0, 40.0)]
    assert reference_merge_clues([(5, 9)]) == [(5.0, 9.0)] and reference_merge_clues([]) == []


def test_reference_weights_and_no_center_distance():
    transcript = rollout_transcript(TURNS, RESULTS)
    record = {"answer": "B", "choice": "B", "options": OPTIONS, "reference": "B", "clues": [list(c) for c in CLUE],
              "duration": D, "width": K, "turn_texts": TURNS, "results": RESULTS, "breaches": [None] * len(TURNS)}
    w = RewardWeights(answer=2.0, localisation=0.5, repeat=1.0)
    parts = rollout_reward("reference", record, w)
    f1, repeat = reference_terms(transcript, CLUE, D, K)
    assert parts.total == pytest.approx(2.0 * 1 + 0.5 * f1 - 1.0 * repeat)

"""The RL reward: hand-worked cases and properties of the localisation F1."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lvr.infer.environment import Visit
from lvr.train.hints import merge_intervals
from lvr.train.rewards import (
    RewardParts,
    RewardWeights,
    answer_only_reward,
    answer_reward,
    center_distance_reward,
    composite_reward,
    coverage,
    localisation_f1,
    localisation_scores,
    precision,
    repeat_penalty,
    rollout_reward,
)

OPTIONS = ["A. a cat", "B. a dog", "C. a bird"]


def cap(start, end, node=(1, 1, 1)):
    """A get_caption visit of `node` spanning start..end (a Visit object)."""
    return Visit(0, "get_caption", tuple(node), float(start), float(end))


def qa(start, end, node=(1, 1, 1), query="what is shown?"):
    return Visit(0, "video_qa", tuple(node), float(start), float(end), query=query)


# --------------------------------------------------------------------------- answer

def test_answer_reward():
    assert answer_reward("B", "B", OPTIONS, "B") == 1.0
    assert answer_reward("A", "A", OPTIONS, "B") == 0.0
    assert answer_reward("The answer is B", None, OPTIONS, "B") == 1.0   # choice extracted
    assert answer_reward(None, None, OPTIONS, "B") == 0.0
    assert answer_reward("Fourier's law.", None, [], "fourier's law") == 1.0
    assert answer_reward("Ohm's law", None, [], "Fourier's law") == 0.0


# --------------------------------------------------------------------------- localisation, hand-worked

def test_full_overlap():
    s = localisation_scores([cap(10, 20)], [(10, 20)])
    assert (s.coverage, s.precision, s.f1) == (1.0, 1.0, 1.0)


def test_no_overlap():
    s = localisation_scores([cap(30, 40)], [(10, 20)])
    assert (s.coverage, s.precision, s.f1) == (0.0, 0.0, 0.0)
    assert localisation_f1([cap(0, 10)], [(10, 20)]) == 0.0        # touching is not overlapping


def test_partial_overlap():
    # clue 10-20, visit 15-25: overlap 5, coverage 5/10, precision 5/10, F1 0.5
    s = localisation_scores([cap(15, 25)], [(10, 20)])
    assert s.coverage == pytest.approx(0.5)
    assert s.precision == pytest.approx(0.5)
    assert s.f1 == pytest.approx(0.5)


def test_partial_overlap_uneven():
    # clue 10-20, visit 0-40: overlap 10, coverage 1, precision 10/40, F1 2·1·0.25/1.25 = 0.4
    s = localisation_scores([cap(0, 40)], [(10, 20)])
    assert (s.coverage, s.precision) == (1.0, 0.25)
    assert s.f1 == pytest.approx(0.4)
    # clue 0-40, visit 10-20: coverage 0.25, precision 1, same F1
    s = localisation_scores([cap(10, 20)], [(0, 40)])
    assert (s.coverage, s.precision) == (0.25, 1.0)
    assert s.f1 == pytest.approx(0.4)


def test_nested_visits_use_the_union():
    # medium node 0-40, then a low node 10-20 inside it: union 40, not 50
    visits = [cap(0, 40, (1, 1)), cap(10, 20, (1, 1, 2))]
    s = localisation_scores(visits, [(10, 20)])
    assert (s.coverage, s.precision) == (1.0, 0.25)
    assert s.f1 == pytest.approx(0.4)


def test_repeated_visits_not_double_counted():
    s = localisation_scores([cap(15, 25), cap(15, 25), cap(15, 25)], [(10, 20)])
    assert s.f1 == pytest.approx(0.5)


def test_two_clues_and_two_visits():
    # clues 0-10 and 30-40 (20 s); visits 5-15 and 35-45 (20 s); overlap 5 + 5 = 10
    s = localisation_scores([cap(5, 15), cap(35, 45)], [(0, 10), (30, 40)])
    assert (s.coverage, s.precision) == (0.5, 0.5)
    assert s.f1 == pytest.approx(0.5)


def test_video_qa_ignored_for_f1():
    # a video_qa visit exactly on the clue adds nothing; the caption visit alone decides
    assert localisation_f1([cap(15, 25), qa(10, 20)], [(10, 20)]) == pytest.approx(0.5)
    assert localisation_f1([qa(10, 20)], [(10, 20)]) == 0.0


def test_high_nodes_ignored_for_f1():
    assert localisation_f1([cap(0, 100, node=(1,))], [(10, 20)]) == 0.0


def test_empty_trajectory():
    assert localisation_scores([], [(10, 20)]) == localisation_scores([], [])
    assert localisation_f1([], [(10, 20)]) == 0.0
    assert repeat_penalty([]) == 0.0
    assert center_distance_reward([], [(10, 20)], 100) == 0.0
    assert localisation_f1([cap(10, 20)], []) == 0.0                # no clues: nothing to find


def test_records_and_objects_agree():
    record = cap(15, 25, (1, 2)).to_record()
    assert isinstance(record["node"], list)
    assert localisation_f1([record], [[10, 20]]) == localisation_f1([cap(15, 25, (1, 2))], [(10, 20)])
    assert repeat_penalty([record, cap(15, 25, (1, 2))]) == 1.0


# --------------------------------------------------------------------------- repeats

def test_repeat_penalty():
    a, b = cap(0, 10, (1, 1)), cap(10, 20, (1, 2))
    assert repeat_penalty([a, b]) == 0.0
    assert repeat_penalty([a, a, b]) == pytest.approx(0.5)              # (3 - 2) / 2
    assert repeat_penalty([a, a, a, a]) == pytest.approx(3.0)           # (4 - 1) / 1
    leaf = (1, 1, 1)
    # video_qa: another question on the same leaf is a new call; the same question again repeats
    assert repeat_penalty([cap(0, 5, leaf), qa(0, 5, leaf, "who?"), qa(0, 5, leaf, "where?")]) == 0.0
    assert repeat_penalty([qa(0, 5, leaf, "Who?"), qa(0, 5, leaf, " who? ")]) == pytest.approx(1.0)
    # the same node with a different tool is not a repeat
    assert repeat_penalty([cap(0, 5, leaf), qa(0, 5, leaf)]) == 0.0


# --------------------------------------------------------------------------- center distance

def test_center_distance():
    clue = [(40, 60)]                                    # centre 50
    assert center_distance_reward([cap(45, 55)], clue, 100) == 1.0
    assert center_distance_reward([cap(0, 100)], clue, 100) == 1.0          # same centre, no matter the size
    assert center_distance_reward([cap(0, 10)], clue, 100) == pytest.approx(1 - 45 / 100)
    assert center_distance_reward([cap(90, 100)], clue, 200) == pytest.approx(1 - 45 / 200)
    # dense with no overlap: far is smaller than near, and both are above 0
    near, far = center_distance_reward([cap(60, 70)], clue, 100), center_distance_reward([cap(90, 100)], clue, 100)
    assert 0 < far < near < 1
    # the mean over distinct visited spans; repeats count once; video_qa ignored
    assert center_distance_reward([cap(45, 55), cap(0, 10), cap(0, 10), qa(90, 100)], clue, 100) == \
        pytest.approx((1 + 0.55) / 2)
    # nearest clue centre
    assert center_distance_reward([cap(0, 10)], [(0, 10), (80, 100)], 100) == 1.0
    with pytest.raises(ValueError):
        center_distance_reward([cap(0, 10)], clue, 0)


def test_center_distance_monotone():
    clue = [(40, 60)]
    scores = [center_distance_reward([cap(45 + d, 55 + d)], clue, 100) for d in range(0, 60, 5)]
    assert scores[0] == 1.0
    assert all(a > b for a, b in zip(scores, scores[1:]))


# --------------------------------------------------------------------------- composite

def test_composite_default_weights():
    # right answer; visits 15-25 (F1 0.5) twice plus 30-40: calls 3, unique 2, repeat 0.5
    visits = [cap(15, 25, (1, 2)), cap(15, 25, (1, 2)), cap(30, 40, (1, 3))]
    parts = composite_reward(answer="B", choice="B", options=OPTIONS, reference="B",
                             visits=visits, clues=[(10, 20)], duration=100)
    # union 15-25 + 30-40 = 20 s, overlap 5: coverage 0.5, precision 0.25, F1 = 0.25/0.75 = 1/3
    assert parts.answer == 1.0
    assert parts.localisation == pytest.approx(1 / 3)
    assert parts.repeat == pytest.approx(0.5)
    assert parts.total == pytest.approx(1 + 1 / 3 - 0.2 * 0.5)
    assert parts.center_distance > 0                    # logged even with weight 0 ...
    assert parts.total == pytest.approx(parts.answer + parts.localisation - 0.2 * parts.repeat)  # ... not added
    rec = parts.to_record()
    assert set(rec) == {"answer", "localisation", "repeat", "center_distance", "total", "rule", "answer_only",
                        "task", "iou", "interval_center_distance"}
    assert (rec["rule"], rec["answer_only"], rec["task"]) == ("lvr", False, "qa")
    assert rec["iou"] is None and rec["interval_center_distance"] is None      # a QA episode has no interval


def test_composite_no_tool_calls_is_answer_reward():
    for given_answer, expected in (("B", 1.0), ("A", 0.0)):
        parts = composite_reward(answer=given_answer, choice=given_answer, options=OPTIONS, reference="B",
                                 visits=[], clues=[(10, 20)], duration=100)
        assert parts == RewardParts(answer=expected, localisation=0.0, repeat=0.0, center_distance=0.0,
                                    total=expected)


def test_composite_weights():
    w = RewardWeights(answer=2.0, localisation=0.5, repeat=1.0, center_distance=1.0)
    parts = composite_reward(answer="C", choice="C", options=OPTIONS, reference="B",
                             visits=[cap(15, 25), cap(15, 25)], clues=[(10, 20)], duration=100, weights=w)
    # wrong answer, F1 0.5, repeat 1, centre 20 vs 15: CD 1 - 5/100
    assert parts.total == pytest.approx(0 + 0.5 * 0.5 - 1.0 * 1.0 + 0.95)
    with pytest.raises(ValueError):
        composite_reward(answer="B", choice="B", options=OPTIONS, reference="B",
                         visits=[], clues=[(10, 20)], weights=w)
    assert RewardWeights() == RewardWeights(1.0, 1.0, 0.2, 0.0)


# --------------------------------------------------------------------------- items without clues

def rollout(**over) -> dict:
    """A rollout record as `lvr rl` hands it to the reward: two caption visits, then answer B."""
    rec = {"answer": "B", "choice": "B", "options": OPTIONS, "reference": "B",
           "visits": [cap(15, 25, (1, 2)).to_record(), cap(15, 25, (1, 2)).to_record()], "clues": [[10, 20]],
           "duration": 100.0, "width": 4,
           "turn_texts": ["<think>a</think><tool>get_caption((1, 2))</tool>",
                          "<think>b</think><tool>get_caption((1, 2))</tool>", "<think>c</think><answer>B</answer>"],
           "results": ["caption one", "caption two", None], "breaches": [None, None, None]}
    rec.update(over)
    return rec


@pytest.mark.parametrize("rule", ["lvr", "reference"])
def test_items_without_clues_get_the_answer_term_alone(rule):
    w = RewardWeights(answer=2.0, localisation=1.0, repeat=0.2)
    parts = rollout_reward(rule, rollout(clues=[]), w)
    assert parts == RewardParts(answer=1.0, localisation=None, repeat=None, center_distance=None, total=2.0,
                                rule=rule, answer_only=True)
    # the same rollout with its clue is scored by every term (a repeated visit: repeat 1)
    full = rollout_reward(rule, rollout(), w)
    assert not full.answer_only and full.repeat == 1.0 and full.total != 2.0
    wrong = rollout_reward(rule, rollout(clues=[], answer="C", choice="C",
                                         turn_texts=["<think>c</think><answer>C</answer>"]), w)
    assert (wrong.answer, wrong.total, wrong.answer_only) == (0.0, 0.0, True)


def test_answer_only_follows_the_rule_of_the_answer_term():
    # "(B)" picks B for lvr; the reference wants the answer text to be the key exactly
    said = rollout(clues=[], answer="(B)", turn_texts=["<think>c</think><answer>(B)</answer>"])
    assert rollout_reward("lvr", said).answer == 1.0
    assert rollout_reward("reference", said).answer == 0.0
    assert answer_only_reward("lvr", answer=None, choice=None, options=OPTIONS, reference="B").total == 0.0
    with pytest.raises(ValueError, match="unknown reward rule"):
        rollout_reward("paper", rollout())


# --------------------------------------------------------------------------- properties

times = st.floats(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False)
span = st.tuples(times, times).map(lambda t: (min(t), max(t)))
visit_lists = st.lists(span, max_size=6).map(lambda spans: [cap(s, e) for s, e in spans])
clue_lists = st.lists(span, min_size=1, max_size=4).map(merge_intervals)


@settings(max_examples=300)
@given(visit_lists, clue_lists)
def test_scores_in_unit_interval(visits, clues):
    s = localisation_scores(visits, clues)
    for value in (s.coverage, s.precision, s.f1):
        assert 0.0 <= value <= 1.0
    assert s.f1 <= max(s.coverage, s.precision) + 1e-12


@settings(max_examples=300)
@given(clue_lists)
def test_visiting_exactly_the_clue_gives_one(clues):
    assume(sum(e - s for s, e in clues) > 0)
    visits = [cap(s, e) for s, e in clues if e > s]
    assert localisation_f1(visits, clues) == 1.0


@settings(max_examples=300)
@given(visit_lists, clue_lists, st.floats(min_value=0.001, max_value=500), st.floats(min_value=0, max_value=500),
       st.booleans())
def test_far_away_visit_never_raises_precision(visits, clues, length, gap, left):
    lo = min([s for s, _ in clues] + [v.start for v in visits])
    hi = max([e for _, e in clues] + [v.end for v in visits])
    far = cap(lo - gap - length, lo - gap) if left else cap(hi + gap, hi + gap + length)
    before = precision(visits, clues)
    assert precision(visits + [far], clues) <= before
    assert coverage(visits + [far], clues) == coverage(visits, clues)


# --------------------------------------------------------------------------- grounding answers

from lvr.train.rewards import interval_center_distance_reward, temporal_iou  # noqa: E402


def test_temporal_iou_hand_worked():
    assert temporal_iou((10, 20), (10, 20)) == 1.0
    assert temporal_iou((10, 20), (15, 25)) == pytest.approx(5 / 15)        # overlap 5, union 15
    assert temporal_iou((0, 100), (40, 50)) == pytest.approx(10 / 100)      # target inside the answer
    assert temporal_iou((40, 50), (0, 100)) == pytest.approx(10 / 100)      # symmetric
    assert temporal_iou((0, 10), (10, 20)) == 0.0                           # touching is not overlapping
    assert temporal_iou((0, 10), (30, 40)) == 0.0
    assert temporal_iou((12.5, 30.0), (20.0, 40.0)) == pytest.approx(10 / 27.5)
    assert temporal_iou((5, 5), (5, 5)) == 1.0                              # two equal points
    assert temporal_iou((5, 5), (0, 10)) == 0.0                             # a point has no length
    assert temporal_iou((5, 5), (6, 6)) == 0.0
    with pytest.raises(ValueError, match="answered interval ends before it starts"):
        temporal_iou((20, 10), (0, 5))
    with pytest.raises(ValueError, match="target interval"):
        temporal_iou((0, 5), (20, 10))


def test_interval_center_distance_hand_worked():
    assert interval_center_distance_reward((40, 60), (45, 55), 100) == 1.0             # same centre
    assert interval_center_distance_reward((0, 100), (45, 55), 100) == 1.0             # whatever the lengths
    assert interval_center_distance_reward((0, 10), (45, 55), 100) == pytest.approx(1 - 45 / 100)
    assert interval_center_distance_reward((0, 10), (45, 55), 200) == pytest.approx(1 - 45 / 200)
    assert interval_center_distance_reward((0, 0), (100, 100), 100) == 0.0            # a whole video apart
    assert interval_center_distance_reward((0, 0), (100, 100), 50) == 0.0             # capped at 0
    # The same score as the visit-based reward for one visit and one clue.
    assert interval_center_distance_reward((60, 70), (45, 55), 100) == \
        center_distance_reward([cap(60, 70)], [(45, 55)], 100)
    with pytest.raises(ValueError, match="positive video duration"):
        interval_center_distance_reward((0, 10), (45, 55), 0)
    with pytest.raises(ValueError, match="ends before it starts"):
        interval_center_distance_reward((10, 0), (45, 55), 100)


DURATION = 1000.0
video_span = st.tuples(times, times).map(lambda t: (min(t), max(t)))     # inside [0, DURATION]


@settings(max_examples=300)
@given(video_span, video_span)
def test_temporal_iou_in_unit_interval_and_symmetric(pred, target):
    iou = temporal_iou(pred, target)
    assert 0.0 <= iou <= 1.0
    assert iou == pytest.approx(temporal_iou(target, pred))
    assert 0.0 <= interval_center_distance_reward(pred, target, DURATION) <= 1.0


@settings(max_examples=300)
@given(video_span)
def test_exact_interval_scores_one(span):
    assert temporal_iou(span, span) == 1.0
    assert interval_center_distance_reward(span, span, DURATION) == 1.0


@settings(max_examples=300)
@given(st.floats(min_value=0, max_value=400), st.floats(min_value=0.001, max_value=100),
       st.floats(min_value=0.001, max_value=100), st.floats(min_value=0.001, max_value=300),
       st.floats(min_value=0.001, max_value=1), st.booleans())
def test_disjoint_gets_no_iou_but_a_growing_center_distance(start, length, target_length, gap, step, left):
    """A disjoint answer has IoU 0 but a positive CenDist, and moving it towards the target
    (still disjoint) never lowers CenDist and raises it whenever its centre gets closer."""
    target = (start + length + gap, start + length + gap + target_length)   # to the right of the answer
    answer = (start, start + length)
    if left:    # mirror: the answer to the right of the target
        target, answer = (DURATION - target[1], DURATION - target[0]), (DURATION - answer[1], DURATION - answer[0])
    assert temporal_iou(answer, target) == 0.0
    far = interval_center_distance_reward(answer, target, DURATION)
    assert far > 0.0
    shift = gap * step * (-1 if left else 1)            # towards the target, by at most the gap
    closer = (answer[0] + shift, answer[1] + shift)
    assert temporal_iou(closer, target) <= 1e-9         # at most touching (up to rounding)
    near = interval_center_distance_reward(closer, target, DURATION)
    assert near >= far
    if abs(shift) > 1e-6:
        assert near > far


# --------------------------------------------------------------------------- grounding episodes

from lvr.train.rewards import answer_center_distance, answer_iou, grounding_reward  # noqa: E402


def test_answer_terms_take_the_best_target():
    targets = [(10, 20), (60, 70)]
    assert answer_iou((12, 22), targets) == pytest.approx(8 / 12)              # (10, 20): overlap 8, union 12
    assert answer_iou((60, 70), targets) == 1.0
    assert answer_iou(None, targets) == 0.0 and answer_iou((10, 20), []) == 0.0
    # CenDist against the nearest centre (15 or 65): the answer's centre 50 is 15 from 65
    assert answer_center_distance((40, 60), targets, 100) == pytest.approx(1 - 15 / 100)
    assert answer_center_distance(None, targets, 100) == 0.0
    with pytest.raises(ValueError, match="positive video duration"):
        answer_center_distance(None, targets, 0)
    with pytest.raises(ValueError, match="positive video duration"):
        answer_center_distance((0, 1), targets, float("nan"))
    with pytest.raises(ValueError, match="target interval"):
        answer_iou((0, 1), [(5, 4)])


def test_grounding_reward_hand_worked():
    # answer 12-22 vs target 10-20: IoU 8/12, centres 17 vs 15 in 100 s: CenDist 0.98;
    # visits 15-25 twice (F1 0.5, repeat 1), centre 20: CD 0.95
    visits = [cap(15, 25, (1, 2)), cap(15, 25, (1, 2))]
    parts = grounding_reward(interval=(12, 22), targets=[(10, 20)], visits=visits, clues=[(10, 20)], duration=100)
    assert (parts.task, parts.answer, parts.answer_only, parts.rule) == ("grounding", None, False, "lvr")
    assert parts.iou == pytest.approx(8 / 12) and parts.interval_center_distance == pytest.approx(0.98)
    assert (parts.localisation, parts.repeat) == (pytest.approx(0.5), 1.0)
    assert parts.center_distance == pytest.approx(0.95)
    assert parts.total == pytest.approx(8 / 12 + 0.98 + 0.5 - 0.2 * 1.0)       # center distance weight 0
    w = RewardWeights(localisation=0.0, repeat=0.0, center_distance=1.0, iou=2.0, interval_center_distance=0.5)
    weighted = grounding_reward(interval=(12, 22), targets=[(10, 20)], visits=visits, clues=[(10, 20)],
                                duration=100, weights=w)
    assert weighted.total == pytest.approx(2 * 8 / 12 + 0.5 * 0.98 + 0.95)
    # No interval (the run gave no usable answer): both interval terms 0, the visits still count.
    none = grounding_reward(interval=None, targets=[(10, 20)], visits=visits, clues=[(10, 20)], duration=100)
    assert (none.iou, none.interval_center_distance) == (0.0, 0.0)
    assert none.total == pytest.approx(0.5 - 0.2)
    # The weights a QA episode uses leave a grounding one alone, and the other way round.
    assert RewardWeights().iou == RewardWeights().interval_center_distance == 1.0


def grounding_rollout(**over) -> dict:
    rec = rollout(task="grounding", answer="[12, 22]", choice=None, options=[], reference=None,
                  interval=[12.0, 22.0], targets=[[10.0, 20.0]],
                  turn_texts=["<think>a</think><tool>get_caption((1, 2))</tool>",
                              "<think>b</think><tool>get_caption((1, 2))</tool>",
                              "<think>c</think><answer>[12, 22]</answer>"])
    rec.update(over)
    return rec


def test_rollout_reward_scores_a_grounding_rollout_by_its_interval():
    parts = rollout_reward("lvr", grounding_rollout())
    assert parts == grounding_reward(interval=(12, 22), targets=[(10, 20)], visits=rollout()["visits"],
                                     clues=[(10, 20)], duration=100.0)
    assert parts.to_record()["task"] == "grounding"
    assert rollout_reward("lvr", grounding_rollout(interval=None)).iou == 0.0
    # A QA rollout is scored as before, whatever the grounding weights.
    assert rollout_reward("lvr", rollout(), RewardWeights(iou=5.0)) == rollout_reward("lvr", rollout())
    with pytest.raises(ValueError, match="no grounding task"):
        rollout_reward("reference", grounding_rollout())


@settings(max_examples=300)
@given(st.lists(video_span, min_size=1, max_size=4), st.one_of(st.none(), video_span))
def test_answer_terms_in_unit_interval_and_one_on_a_target(targets, pred):
    assert 0.0 <= answer_iou(pred, targets) <= 1.0
    assert 0.0 <= answer_center_distance(pred, targets, DURATION) <= 1.0
    hit = targets[-1]
    assert answer_iou(hit, targets) == 1.0 and answer_center_distance(hit, targets, DURATION) == 1.0


@settings(max_examples=300)
@given(video_span, video_span, visit_lists)
def test_grounding_total_is_the_weighted_sum_of_its_parts(pred, target, visits):
    w = RewardWeights(localisation=0.7, repeat=0.3, center_distance=0.4, iou=1.5, interval_center_distance=0.6)
    p = grounding_reward(interval=pred, targets=[target], visits=visits, clues=[target], duration=DURATION,
                         weights=w)
    assert p.iou == temporal_iou(pred, target)
    assert p.interval_center_distance == interval_center_distance_reward(pred, target, DURATION)
    assert p.total == pytest.approx(1.5 * p.iou + 0.6 * p.interval_center_distance + 0.7 * p.localisation
                                    - 0.3 * p.repeat + 0.4 * p.center_distance)

"""Clue interval merging and interval -> node id mapping for the hint schedule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lvr.train.hints import HINT_PREFIX, covering_ids, hint_for, hint_text, merge_intervals, overlap


def test_merge_hand_worked():
    assert merge_intervals([(30, 40), (0, 10), (12, 20)]) == [(0.0, 20.0), (30.0, 40.0)]
    assert merge_intervals([(0, 10), (15, 20)]) == [(0.0, 10.0), (15.0, 20.0)]      # exactly 5 s apart: kept
    assert merge_intervals([(0, 10), (14.9, 20)]) == [(0.0, 20.0)]
    assert merge_intervals([(0, 10), (2, 3)]) == [(0.0, 10.0)]                      # nested
    assert merge_intervals([(5, 6), (0, 1)], gap=0) == [(0.0, 1.0), (5.0, 6.0)]
    assert merge_intervals([]) == []


# A K=2 tree over 0..40 s: high (1,) 0-20, (2,) 20-40; medium 10 s each.
SPANS = {(1,): (0.0, 20.0), (2,): (20.0, 40.0),
         (1, 1): (0.0, 10.0), (1, 2): (10.0, 20.0), (2, 1): (20.0, 30.0), (2, 2): (30.0, 40.0)}


def test_covering_ids_hand_worked():
    assert covering_ids(SPANS, [(12.0, 14.0)], 1) == [(1,)]
    assert covering_ids(SPANS, [(12.0, 14.0)], 2) == [(1, 2)]
    assert covering_ids(SPANS, [(18.0, 22.0)], 1) == [(1,), (2,)]
    assert covering_ids(SPANS, [(18.0, 22.0)], 2) == [(1, 2), (2, 1)]
    assert covering_ids(SPANS, [(20.0, 25.0)], 2) == [(2, 1)]          # touching (1, 2) at 20 s is no overlap
    assert covering_ids(SPANS, [(1.0, 2.0), (35.0, 36.0)], 2) == [(1, 1), (2, 2)]
    assert covering_ids(SPANS, [(15.0, 15.0)], 2) == [(1, 2)]          # a moment


def test_hint_texts_name_the_ids():
    text, ids = hint_for(1, SPANS, [(18.0, 22.0)])
    assert ids == [(1,), (2,)] and "(1,), (2,)" in text and text.startswith(HINT_PREFIX)
    text, ids = hint_for(2, SPANS, [(18.0, 22.0)])
    assert ids == [(1, 2), (2, 1)] and "(1, 2), (2, 1)" in text
    text, ids = hint_for(3, SPANS, [(18.0, 22.0)])
    assert ids == [] and "video_qa" in text
    assert hint_text(1, [(3,)]).count("(3,)") == 1


intervals = st.lists(st.tuples(st.floats(0, 1000, allow_nan=False), st.floats(0, 100, allow_nan=False))
                     .map(lambda t: (t[0], t[0] + t[1])), max_size=12)


@settings(max_examples=300, deadline=None)
@given(intervals, st.floats(0, 20, allow_nan=False))
def test_merge_properties(spans, gap):
    merged = merge_intervals(spans, gap)
    # Sorted, disjoint and at least `gap` apart.
    for (s1, e1), (s2, e2) in zip(merged, merged[1:]):
        assert e1 <= s2 and s2 - e1 >= gap
    # Every input lies inside one merged interval, and every merged point came from an input.
    for s, e in spans:
        assert any(ms <= s and e <= me for ms, me in merged)
    assert sum(e - s for s, e in merged) <= sum(e - s for s, e in spans) + gap * len(spans) + 1e-6
    assert merge_intervals(merged, gap) == merged   # idempotent


@settings(max_examples=300, deadline=None)
@given(intervals.filter(bool))
def test_covering_ids_cover_the_clue(clues):
    # Leaves of a K=4 two-level tree over 0..1100 s.
    spans = {}
    for h in range(4):
        spans[(h + 1,)] = (h * 275.0, (h + 1) * 275.0)
        for m in range(4):
            spans[(h + 1, m + 1)] = (h * 275.0 + m * 68.75, h * 275.0 + (m + 1) * 68.75)
    for depth in (1, 2):
        ids = covering_ids(spans, clues, depth)
        for clue in clues:
            if clue[1] > clue[0]:
                covered = sum(overlap(spans[i], clue) for i in ids)
                assert abs(covered - (clue[1] - clue[0])) < 1e-6   # the named nodes hold all of the clue
        assert all(any(overlap(spans[i], c) > 0 or c[0] == c[1] for c in clues) for i in ids)
    # Medium ids lie inside the high ids.
    highs = set(covering_ids(spans, clues, 1))
    assert all(i[:1] in highs for i in covering_ids(spans, clues, 2))

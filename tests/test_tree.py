"""Tree geometry: widths, partitions, spans, sampling, time <-> node."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvr.prep.tree import (Level, Tree, TreeOptions, node_count, parse_node_id, sample_indices,
                           split_range, tree_width)


def uniform_tree(k: int, n: int, fps: float = 10.0) -> Tree:
    times = np.arange(n) / fps
    return Tree(k, times, n / fps)


# -- width ------------------------------------------------------------------

@pytest.mark.parametrize("duration,expected", [
    (0, 4), (60, 4), (16 * 4.5 ** 3 - 1, 4), (16 * 4.5 ** 3 + 1, 5),  # round() boundary
    (3600, 6), (16 * 7 ** 3, 7), (10 ** 7, 8),
])
def test_tree_width_follows_the_formula(duration, expected):
    assert tree_width(duration) == expected


def test_tree_width_options():
    assert tree_width(60, min_width=3) == 3  # MLVU's minimum
    assert tree_width(3600, segment_seconds=2, max_width=10) == 10
    assert tree_width(3600, 128, 1, 8) == 3


def test_node_count():
    assert node_count(4) == 84
    assert node_count(6) == 258  # the exhaustive-captioning count docs/architecture.md §2.1 gives


# -- partition --------------------------------------------------------------

@given(st.integers(0, 10_000), st.integers(0, 5000), st.integers(1, 12))
def test_split_range_matches_numpy_array_split(start, n, parts):
    ours = split_range(start, start + n, parts)
    ref = np.array_split(np.arange(start, start + n), parts)
    assert [b - a for a, b in ours] == [len(c) for c in ref]
    assert all(len(c) == 0 or (a == c[0] and b == c[-1] + 1) for (a, b), c in zip(ours, ref))


def test_ids_are_one_based_and_ordered():
    tree = uniform_tree(4, 100)
    ids = list(tree.ids())
    assert ids[:4] == [(1,), (2,), (3,), (4,)]
    assert ids[4] == (1, 1) and ids[4 + 16] == (1, 1, 1) and ids[-1] == (4, 4, 4)
    assert len(ids) == node_count(4)
    with pytest.raises(ValueError):
        tree.span((5,))
    with pytest.raises(ValueError):
        tree.span((0, 1))


def test_tree_needs_one_frame_per_leaf():
    with pytest.raises(ValueError, match="K³"):
        uniform_tree(4, 63)
    uniform_tree(4, 64)


def test_nested_split_differs_from_a_global_split_where_it_should():
    # 70 frames, K=4: high nodes get 18,18,17,17; each splits its own frames.
    tree = uniform_tree(4, 70)
    assert [tree.frame_range((h,)) for h in range(1, 5)] == [(0, 18), (18, 36), (36, 53), (53, 70)]
    assert [tree.frame_range((1, m)) for m in range(1, 5)] == [(0, 5), (5, 10), (10, 14), (14, 18)]


# -- properties ---------------------------------------------------------------

@st.composite
def trees(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(k ** 3, k ** 3 + 400))
    gaps = draw(st.lists(st.floats(0.001, 2.0), min_size=n, max_size=n))  # variable frame rate
    times = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    return Tree(k, times, float(times[-1] + gaps[-1]))


@settings(max_examples=60, deadline=None)
@given(trees())
def test_each_level_tiles_the_video(tree):
    for level in Level:
        spans = [tree.span(i) for i in tree.ids(level)]
        assert spans[0][0] == 0.0 and spans[-1][1] == tree.duration
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
        assert all(s < e for s, e in spans)
        frames = [tree.frame_range(i) for i in tree.ids(level)]
        assert frames[0][0] == 0 and frames[-1][1] == tree.n_frames
        assert all(a[1] == b[0] for a, b in zip(frames, frames[1:]))


@settings(max_examples=60, deadline=None)
@given(trees())
def test_children_tile_their_parent(tree):
    for parent in tree.ids():
        kids = tree.children(parent)
        if not kids:
            continue
        assert len(kids) == tree.k
        a, b = tree.frame_range(parent)
        ranges = [tree.frame_range(c) for c in kids]
        assert ranges[0][0] == a and ranges[-1][1] == b
        assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
        assert tree.span(kids[0])[0] == tree.span(parent)[0]
        assert tree.span(kids[-1])[1] == tree.span(parent)[1]


@settings(max_examples=80, deadline=None)
@given(trees(), st.floats(0, 1, exclude_max=True), st.sampled_from(list(Level)))
def test_time_node_span_round_trip(tree, frac, level):
    t = frac * tree.duration
    node_id = tree.node_at(t, level)
    start, end = tree.span(node_id)
    assert start <= t < end
    assert tree.node_at(start, level) == node_id
    # The node holding t is the one nodes_covering finds for a tiny interval at t.
    assert tree.nodes_covering(t, min(t + 1e-9, tree.duration), level) == [node_id]
    # Ancestors agree.
    if level > Level.HIGH:
        assert tree.node_at(t, Level(level - 1)) == node_id[:-1]


@settings(max_examples=40, deadline=None)
@given(trees(), st.floats(0, 1), st.floats(0, 1), st.sampled_from(list(Level)))
def test_nodes_covering_is_exactly_the_overlapping_nodes(tree, f1, f2, level):
    a, b = sorted((f1 * tree.duration, f2 * tree.duration))
    got = tree.nodes_covering(a, b, level)
    if b <= a:
        assert got == [tree.node_at(a, level)]
        return
    want = [i for i in tree.ids(level) if tree.span(i)[0] < b and tree.span(i)[1] > a]
    assert got == want


# -- sampling -----------------------------------------------------------------

@given(st.integers(0, 1000), st.integers(1, 3000), st.integers(1, 200))
def test_sample_indices_are_distinct_sorted_and_inside(start, n, count):
    idx = sample_indices(start, start + n, count)
    assert len(idx) == min(n, count)
    assert idx == sorted(set(idx))
    assert all(start <= i < start + n for i in idx)
    if n > count >= 2:
        assert idx[0] == start and idx[-1] == start + n - 1  # ends included


def test_sampled_frames_per_level_and_qa_frames():
    tree = uniform_tree(4, 64 * 200)
    opts = TreeOptions()
    assert len(tree.sampled_frames((1,), opts)) == 128
    assert len(tree.sampled_frames((1, 2), opts)) == 64
    assert len(tree.sampled_frames((1, 2, 3), opts)) == 32
    assert len(tree.qa_frames((1, 2, 3), opts)) == 16
    with pytest.raises(ValueError):
        tree.qa_frames((1, 2), opts)


def test_image_sides_follow_design():
    opts = TreeOptions()
    assert opts.image_side(Level.LOW) == 512
    assert opts.image_side(Level.MEDIUM) == 362  # 512 / sqrt(2)
    assert opts.image_side(Level.HIGH) == 256
    assert TreeOptions(caption_side=200).image_side(Level.HIGH) == 140  # the floor


def test_parse_node_id_reads_literals_only():
    assert parse_node_id("(2, 3)") == (2, 3)
    assert parse_node_id("2-3-1") == (2, 3, 1)
    assert parse_node_id([1]) == (1,)
    for bad in ["", "(1,2,3,4)", "__import__('os')", "a,b"]:
        with pytest.raises(ValueError):
            parse_node_id(bad)

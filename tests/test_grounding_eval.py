"""Grounding files (native, ActivityNet/Charades-STA JSON, CG-Bench) and the grounding metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvr.infer.grounding import (
    GroundingFormatError,
    GroundingItem,
    best_iou,
    duration_bucket,
    grounding_format_of,
    load_grounding_items,
    mean_iou,
    recall_at,
    score_grounding,
    temporal_iou,
)

# ---------------------------------------------------------------- the six hand-made queries
#
# (video, duration s, query, targets, prediction), and each prediction's IoU worked by hand:
#   q1  [10,20]  vs [10,20]:  inter 10, union 10+10-10 = 10      -> 1
#   q2  [0,10]   vs [5,15]:   inter 5,  union 10+10-5  = 15      -> 1/3
#   q3  [100,200] vs [150,200]: inter 50, union 100+50-50 = 100  -> 1/2
#   q4  [0,100]  vs [200,250]: disjoint                          -> 0
#   q5  targets [100,110] and [500,600] vs [500,570]: 0 with the first; with the second
#       inter 70, union 100+70-70 = 100 -> 0.7; the best-matching target counts -> 0.7
#   q6  [1000,1400] vs [1000,1100]: inter 100, union 400+100-100 = 400 -> 1/4
CASES = [
    ("a", 100.0, "the chef cracks an egg", [[10, 20]], [10, 20]),
    ("a", 100.0, "the pan is set on the stove", [[0, 10]], [5, 15]),
    ("b", 300.0, "a goal is scored", [[100, 200]], [150, 200]),
    ("b", 300.0, "the referee shows a card", [[0, 100]], [200, 250]),
    ("c", 1200.0, "the speaker opens a laptop", [[100, 110], [500, 600]], [500, 570]),
    ("d", 3600.0, "the lights go out", [[1000, 1400]], [1000, 1100]),
]
PREDICTION = {query: pred for _, _, query, _, pred in CASES}
# mIoU = (1 + 1/3 + 1/2 + 0 + 7/10 + 1/4) / 6 = ((60 + 20 + 30 + 0 + 42 + 15) / 60) / 6 = 167/360
MIOU = 167 / 360
# R@0.3: {1, 1/3, 1/2, 0.7} -> 4/6;  R@0.5: {1, 1/2, 0.7} -> 3/6;  R@0.7: {1, 0.7} -> 2/6
RECALL = {0.3: 4 / 6, 0.5: 3 / 6, 0.7: 2 / 6}
# By duration bucket (a: 100 s, b: 300 s, c: 1200 s, d: 3600 s):
#   <2min    q1, q2: mIoU (1 + 1/3)/2 = 2/3;  R@.3 2/2, R@.5 1/2, R@.7 1/2
#   2-10min  q3, q4: mIoU (1/2 + 0)/2 = 1/4;  R@.3 1/2, R@.5 1/2, R@.7 0
#   10-30min q5:     mIoU 0.7;                R@.3 1,   R@.5 1,   R@.7 1
#   >=30min  q6:     mIoU 1/4;                R@.3 0,   R@.5 0,   R@.7 0
BUCKETS = {
    "<2min": (2, 2 / 3, {0.3: 1.0, 0.5: 0.5, 0.7: 0.5}),
    "2-10min": (2, 1 / 4, {0.3: 0.5, 0.5: 0.5, 0.7: 0.0}),
    "10-30min": (1, 0.7, {0.3: 1.0, 0.5: 1.0, 0.7: 1.0}),
    ">=30min": (1, 1 / 4, {0.3: 0.0, 0.5: 0.0, 0.7: 0.0}),
}


def write_native(path: Path) -> Path:
    lines = [json.dumps({"schema": "lvr.grounding/1", "id": f"q{i}", "video": video, "query": query,
                         "targets": targets, "duration": duration})
             for i, (video, duration, query, targets, _) in enumerate(CASES, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_activitynet(path: Path) -> Path:
    # One timestamp per sentence in this layout: q5 keeps only its second target, [500, 600],
    # against which [500, 570] still scores 0.7.
    videos: dict = {}
    for video, duration, query, targets, _ in CASES:
        v = videos.setdefault(f"v_{video}", {"duration": duration, "timestamps": [], "sentences": []})
        v["timestamps"].append(targets[-1])
        v["sentences"].append(query)
    path.write_text(json.dumps(videos, indent=2), encoding="utf-8")
    return path


def write_cgbench(path: Path) -> Path:
    records = [{"video_uid": video, "qid": 100 + i, "question": query, "choices": ["yes", "no"],
                "right_answer": "A", "clue_intervals": targets, "duration": duration, "domain": "test"}
               for i, (video, duration, query, targets, _) in enumerate(CASES, 1)]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


WRITERS = {"native": write_native, "activitynet": write_activitynet, "cgbench": write_cgbench}


def predictions_for(items: list[GroundingItem]) -> dict:
    return {item.qid: PREDICTION[item.query] for item in items}


@pytest.mark.parametrize("fmt", ["native", "activitynet", "cgbench"])
@pytest.mark.parametrize("given_fmt", ["auto", "explicit"])
def test_six_queries_score_the_hand_computed_values(tmp_path, fmt, given_fmt):
    path = WRITERS[fmt](tmp_path / f"{fmt}.json")
    items, errors = load_grounding_items(path, fmt if given_fmt == "explicit" else "auto")
    assert errors == []
    assert [i.query for i in items] == [c[2] for c in CASES]
    assert {i.source for i in items} == {fmt}
    scores = score_grounding(items, predictions_for(items))
    overall = scores["overall"]
    assert overall.count == 6
    assert overall.miou == pytest.approx(MIOU)
    assert overall.recall == pytest.approx(RECALL)
    assert list(scores["by_duration"]) == list(BUCKETS)
    for bucket, (count, miou, recall) in BUCKETS.items():
        got = scores["by_duration"][bucket]
        assert (got.count, got.miou, got.recall) == (count, pytest.approx(miou), pytest.approx(recall)), bucket


def test_items_keep_what_each_format_says(tmp_path):
    native, _ = load_grounding_items(write_native(tmp_path / "n.jsonl"))
    assert native[4] == GroundingItem("q5", "c", "the speaker opens a laptop", ((100.0, 110.0), (500.0, 600.0)),
                                      1200.0, "native", {})
    anet, _ = load_grounding_items(write_activitynet(tmp_path / "a.json"))
    assert [(i.qid, i.video, i.targets, i.duration) for i in anet[:2]] == [
        ("v_a#1", "v_a", ((10.0, 20.0),), 100.0), ("v_a#2", "v_a", ((0.0, 10.0),), 100.0)]
    cg, _ = load_grounding_items(write_cgbench(tmp_path / "c.json"))
    assert (cg[4].qid, cg[4].video, cg[4].targets) == ("105", "c", ((100.0, 110.0), (500.0, 600.0)))
    assert cg[4].extra == {"choices": ["yes", "no"], "right_answer": "A", "domain": "test"}


def test_native_records_round_trip(tmp_path):
    items, _ = load_grounding_items(write_cgbench(tmp_path / "c.json"))
    out = tmp_path / "native.jsonl"
    out.write_text("".join(json.dumps(i.to_record()) + "\n" for i in items), encoding="utf-8")
    again, errors = load_grounding_items(out)
    assert errors == [] and again == items


def test_the_best_matching_target_counts():
    # [500, 570] against [100, 110] alone: 0; against [500, 600] alone: 70/100; against both: the best.
    assert best_iou([500, 570], [[100, 110]]) == 0.0
    assert best_iou([500, 570], [[100, 110], [500, 600]]) == pytest.approx(0.7)
    assert best_iou(None, [[0, 1]]) == 0.0


def test_a_missing_prediction_counts_as_zero(tmp_path):
    items, _ = load_grounding_items(write_native(tmp_path / "n.jsonl"))
    preds = predictions_for(items)
    del preds["q1"]          # no answer for q1 (IoU 1 before)
    preds["q3"] = None       # an unusable answer for q3 (IoU 1/2 before)
    # mIoU = (0 + 1/3 + 0 + 0 + 7/10 + 1/4) / 6 = ((20 + 42 + 15) / 60) / 6 = 77/360
    # R@0.3: {1/3, 0.7} -> 2/6;  R@0.5: {0.7} -> 1/6;  R@0.7: {0.7} -> 1/6
    overall = score_grounding(items, preds)["overall"]
    assert overall.miou == pytest.approx(77 / 360)
    assert overall.recall == pytest.approx({0.3: 2 / 6, 0.5: 1 / 6, 0.7: 1 / 6})


def test_unknown_durations_use_the_given_lengths_or_an_unknown_bucket():
    items = [GroundingItem("x", "long.mp4", "q", ((0.0, 10.0),)), GroundingItem("y", "other.mp4", "q", ((0.0, 10.0),))]
    scores = score_grounding(items, {"x": [0, 10], "y": [0, 5]}, durations={"long.mp4": 2400.0})
    assert list(scores["by_duration"]) == [">=30min", "unknown"]
    assert scores["by_duration"][">=30min"].miou == 1.0
    assert scores["by_duration"]["unknown"].miou == 0.5      # 5 / 10


@pytest.mark.parametrize("seconds, bucket", [
    (0.5, "<2min"), (119.9, "<2min"), (120, "2-10min"), (599.9, "2-10min"), (600, "10-30min"),
    (1799.9, "10-30min"), (1800, ">=30min"), (10 * 3600, ">=30min"), (None, "unknown"), (float("nan"), "unknown"),
])
def test_duration_buckets(seconds, bucket):
    assert duration_bucket(seconds) == bucket


@pytest.mark.parametrize("pred, target, iou", [
    ([0, 10], [0, 10], 1.0),
    ([0, 10], [10, 20], 0.0),        # touching: no overlap
    ([0, 10], [20, 30], 0.0),
    ([0, 10], [5, 10], 0.5),         # inter 5, union 10
    ([0, 30], [10, 20], 1 / 3),      # inter 10, union 30
    ([10, 0], [0, 10], 0.0),         # reversed prediction: no length
    ([5, 5], [0, 10], 0.0),          # a point: no length
])
def test_temporal_iou(pred, target, iou):
    assert temporal_iou(pred, target) == pytest.approx(iou)
    assert temporal_iou(target, pred) == pytest.approx(iou)


def test_mean_and_recall_of_nothing_are_zero():
    assert mean_iou([]) == 0.0 and recall_at([], 0.5) == 0.0


# ---------------------------------------------------------------- malformed records

def test_native_bad_records_are_named_by_file_and_line(tmp_path):
    good = {"schema": "lvr.grounding/1", "id": "ok", "video": "a.mp4", "query": "q", "targets": [[1, 2]]}
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join([
        json.dumps(good),
        "{not json",
        json.dumps({**good, "id": "rev", "targets": [[5, 2]]}),
        json.dumps({**good, "id": "noq", "query": None}),
        json.dumps({**good, "id": "long", "duration": 60, "targets": [[10, 20], [50, 61]]}),
        json.dumps({**good, "id": "flat", "targets": [1, 2]}),
        json.dumps(good),
        json.dumps({**good, "id": "schema", "schema": "lvr.question/1"}),
    ]) + "\n", encoding="utf-8")
    items, errors = load_grounding_items(path)
    assert [i.qid for i in items] == ["ok"]
    assert errors == [
        f"{path}:2: not JSON (Expecting property name enclosed in double quotes)",
        f"{path}:3: targets[0]: [5, 2] is reversed (start after end)",
        f"{path}:4: missing 'query'",
        f"{path}:5: targets[1]: [50, 61] ends after the video's duration 60 s",
        f"{path}:6: 'targets' must be a list of [start, end] pairs, e.g. [[1, 2]]",
        f"{path}:7: duplicate id 'ok' (first at {path}:1)",
        f"{path}:8: schema 'lvr.question/1' is not 'lvr.grounding/1'",
    ]


def test_activitynet_bad_sentences_name_the_video_and_sentence(tmp_path):
    path = tmp_path / "anet.json"
    path.write_text(
        '{\n'
        '  "v_ok": {"duration": 50, "timestamps": [[1, 4], [9, 4], [40, 55], [2, 3]],\n'
        '           "sentences": ["a dog runs", "a cat sits", "a bird sings", " "]},\n'
        '  "v_counts": {"duration": 20, "timestamps": [[1, 2]], "sentences": ["x", "y"]},\n'
        '  "v_dur": {"duration": -3, "timestamps": [], "sentences": []}\n'
        '}\n', encoding="utf-8")
    items, errors = load_grounding_items(path)
    assert [(i.qid, i.query, i.targets) for i in items] == [("v_ok#1", "a dog runs", ((1.0, 4.0),))]
    assert errors == [
        f"{path}:2: video 'v_ok' sentence 1: timestamp: [9, 4] is reversed (start after end)",
        f"{path}:2: video 'v_ok' sentence 2: timestamp: [40, 55] ends after the video's duration 50 s",
        f"{path}:2: video 'v_ok' sentence 3: the sentence must be non-empty text",
        f"{path}:4: video 'v_counts': 1 timestamps but 2 sentences",
        f"{path}:5: video 'v_dur': 'duration' must be positive, got -3",
    ]


def test_cgbench_record_without_clues_is_named_by_the_line_of_its_brace(tmp_path):
    path = tmp_path / "cg.json"
    path.write_text(
        '[\n'
        '  {"video_uid": "v1", "qid": 1, "question": "when?", "clue_intervals": [[3, 8]]},\n'
        '  {"video_uid": "v1", "qid": 2, "question": "and now?", "clue_intervals": []},\n'
        '  {"video_uid": "v1", "qid": 3, "question": "then?",\n'
        '   "clue_intervals": [[8, 3]]}\n'
        ']\n', encoding="utf-8")
    items, errors = load_grounding_items(path)
    assert [i.qid for i in items] == ["1"]
    assert errors == [f"{path}:3: no 'clue_intervals': nothing to ground the question to",
                      f"{path}:4: clue_intervals[0]: [8, 3] is reversed (start after end)"]


def test_files_that_cannot_be_read_at_all(tmp_path):
    with pytest.raises(GroundingFormatError, match="unknown grounding format"):
        load_grounding_items(tmp_path / "x.json", "charades")
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"video": "a", "question": "q"}\n', encoding="utf-8")
    with pytest.raises(GroundingFormatError, match=r"odd.jsonl:1: cannot tell the grounding format"):
        load_grounding_items(odd)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "v": {"duration": 5, "timestamps": [[1, 2]], "sentences": ["x"]}\n  "w": {}\n}\n',
                      encoding="utf-8")
    with pytest.raises(GroundingFormatError, match=r"broken.json:3: not JSON \(expected ',' or '}'"):
        load_grounding_items(broken, "activitynet")
    with pytest.raises(GroundingFormatError, match="is a directory"):
        load_grounding_items(tmp_path)


def test_a_grounding_file_is_told_from_a_question_file(tmp_path):
    for fmt, write in WRITERS.items():
        assert grounding_format_of(write(tmp_path / f"{fmt}.json").read_text()) == fmt
    question = {"schema": "lvr.question/1", "video": "a.mp4", "question": "Q?", "options": ["A. x", "B. y"],
                "answer": "A"}
    lvbench = {"key": "abc", "qa": [{"question": "Q?\n(A) x\n(B) y", "answer": "A"}]}
    for text in (json.dumps(question) + "\n", json.dumps(lvbench) + "\n", "[1, 2", "{not json\n", ""):
        assert grounding_format_of(text) is None, text

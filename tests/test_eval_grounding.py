"""`lvr eval` on grounding files: six hand-made queries in each format, scored by hand.

Two real videos (8 s and 130 s, so two duration buckets) and one caption store serve every
format; a scripted navigator answers query n with a chosen interval after one tool call.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr_test_helpers import run_lvr
from synthetic_media import make_frame_number_video

# query n: (video, targets, what the navigator answers; None: it only calls tools, so with two
# rounds it never answers). Each IoU worked by hand (inter / union, union = len_p + len_t - inter):
#   q1 short [2,4]   vs [2,4]:  inter 2, union 2+2-2 = 2              -> 1
#   q2 short [2,6]   vs [0,4]:  inter 2, union 4+4-2 = 6              -> 1/3
#   q3 short no answer                                                -> 0
#   q4 long  [95,110] vs [10,30]: disjoint -> 0; vs [90,110]: inter 15, union 15+20-15 = 20 -> 3/4;
#            the best-matching target counts                          -> 3/4
#   q5 long  [40,50] vs [40,60]: inter 10, union 10+20-10 = 20        -> 1/2
#   q6 long  [0,20]  vs [100,120]: disjoint                           -> 0
QUERIES = {
    1: ("short", [[2, 4]], [2, 4]),
    2: ("short", [[0, 4]], [2, 6]),
    3: ("short", [[4, 8]], None),
    4: ("long", [[10, 30], [90, 110]], [95, 110]),
    5: ("long", [[40, 60]], [40, 50]),
    6: ("long", [[100, 120]], [0, 20]),
}
IOU = {1: 1.0, 2: 1 / 3, 3: 0.0, 4: 0.75, 5: 0.5, 6: 0.0}
DURATION = {"short": 8.0, "long": 130.0}

# Overall, IoUs 1, 1/3, 0, 3/4, 1/2, 0:
#   mIoU = (12/12 + 4/12 + 0 + 9/12 + 6/12 + 0) / 6 = (31/12) / 6 = 31/72 = 0.43055.. -> 0.4306
#   R@0.3: {1, 1/3, 3/4, 1/2} = 4/6 -> 0.6667;  R@0.5: {1, 3/4, 1/2} = 3/6 -> 0.5;  R@0.7: {1, 3/4} = 2/6 -> 0.3333
OVERALL = {"count": 6, "miou": 0.4306, "R@0.3": 0.6667, "R@0.5": 0.5, "R@0.7": 0.3333}
# By duration bucket (short: 8 s, long: 130 s):
#   <2min   q1-q3, IoUs 1, 1/3, 0:   mIoU (4/3)/3 = 4/9 -> 0.4444;  R@0.3 2/3, R@0.5 1/3, R@0.7 1/3
#   2-10min q4-q6, IoUs 3/4, 1/2, 0: mIoU (5/4)/3 = 5/12 -> 0.4167; R@0.3 2/3, R@0.5 2/3, R@0.7 1/3
BY_DURATION = {
    "<2min": {"count": 3, "miou": 0.4444, "R@0.3": 0.6667, "R@0.5": 0.3333, "R@0.7": 0.3333},
    "2-10min": {"count": 3, "miou": 0.4167, "R@0.3": 0.6667, "R@0.5": 0.6667, "R@0.7": 0.3333},
}


def query_text(n: int) -> str:
    return f"moment {n}: the counter shows a number"


def navigator(body: dict) -> str:
    if body["model"] == "captioner":
        return "<caption>Numbers count up on a grey screen.</caption>"
    n = int(re.search(r"moment (\d+):", body["messages"][1]["content"]).group(1))
    answer = QUERIES[n][2]
    if answer is None or not any(m["role"] == "assistant" for m in body["messages"]):
        return f"<think>Look at clip 1 for moment {n}.</think><tool>get_caption((1, 1))</tool>"
    return f"<think>There.</think><answer>[{answer[0]}, {answer[1]}]</answer>"


# -- the hand-made files --------------------------------------------------------------------

def write_native(path: Path) -> Path:
    # No durations: each bucket comes from the length probed from the video file.
    path.write_text("".join(json.dumps({"schema": "lvr.grounding/1", "id": f"q{n}", "video": f"{video}.mp4",
                                        "query": query_text(n), "targets": targets}) + "\n"
                            for n, (video, targets, _) in QUERIES.items()), encoding="utf-8")
    return path


def write_activitynet(path: Path) -> Path:
    # One timestamp per sentence in this layout: q4 keeps its second target, [90, 110], against
    # which [95, 110] still scores 3/4. The durations are the files' real lengths.
    videos: dict = {}
    for n, (video, targets, _) in QUERIES.items():
        v = videos.setdefault(video, {"duration": DURATION[video], "timestamps": [], "sentences": []})
        v["timestamps"].append(targets[-1])
        v["sentences"].append(query_text(n))
    path.write_text(json.dumps(videos, indent=2), encoding="utf-8")
    return path


def write_cgbench(path: Path) -> Path:
    records = [{"video_uid": video, "qid": n, "question": query_text(n), "choices": ["yes", "no"],
                "right_answer": "A", "clue_intervals": targets, "duration": DURATION[video]}
               for n, (video, targets, _) in QUERIES.items()]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


# Charades-STA's JSON releases have the ActivityNet layout (video -> duration, timestamps,
# sentences), so the activitynet file stands for both.
FORMATS = {"native": (write_native, []), "activitynet": (write_activitynet, []),
           "cgbench": (write_cgbench, ["--task", "grounding"])}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grounding")
    videos = root / "videos"
    videos.mkdir()
    make_frame_number_video(videos / "short.mp4", width=128, fps=10, duration=8)
    make_frame_number_video(videos / "long.mp4", width=128, fps=2, duration=130)
    return root


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI(navigator, models=("navigator", "captioner")) as s:
        yield s


def run_eval(bench: Path, server, questions: Path, out: Path, *extra):
    return run_lvr("eval", questions, "--base-url", server.url, "--model", "navigator",
                   "--caption-model", "captioner", "--cache-dir", bench / "cache", "--video-dir", bench / "videos",
                   "--max-rounds", "2", "-o", out, *extra)


def qid_number(record: dict) -> int:
    return int(re.search(r"moment (\d+):", record["query"]).group(1))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_six_queries_score_the_hand_computed_values(bench, server, tmp_path, fmt):
    write, flags = FORMATS[fmt]
    questions = write(tmp_path / f"{fmt}.json")
    out, summary, traces = tmp_path / "out.jsonl", tmp_path / "summary.json", tmp_path / "traces.jsonl"
    proc = run_eval(bench, server, questions, out, "--summary", summary, "--traces", traces, *flags)
    assert proc.returncode == 0, proc.stderr

    records = {qid_number(r): r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == list(QUERIES)
    for n, r in records.items():
        video, targets, answer = QUERIES[n]
        assert r["schema"] == "lvr.eval/1" and r["task"] == "grounding" and r["source"] == fmt
        assert r["targets"] == (targets if fmt != "activitynet" else targets[-1:])
        assert r["interval"] == answer and r["iou"] == pytest.approx(IOU[n])
        assert r["video_duration"] == pytest.approx(DURATION[video], abs=0.01)
        assert r["duration_bucket"] == ("<2min" if video == "short" else "2-10min")
        assert r["strategy"] == "navigate" and r["accounting"]["rounds"] == 2
    assert records[3]["prediction"] is None and records[3]["stopped"] == "max_rounds"

    report = json.loads(summary.read_text())
    grounding = report["grounding"]
    assert {k: grounding[k] for k in OVERALL} == OVERALL
    assert grounding["by_duration"] == BY_DURATION
    assert grounding["answered"] == 5
    assert report["questions"] == 6 and report["tasks"] == {"qa": 0, "grounding": 6}
    assert "accuracy" not in report and report["mean_rounds"] == 2.0
    assert report["strategies"] == {"navigate": 6}
    assert "Grounding mIoU 0.4306, R@0.3 66.7%, R@0.5 50.0%, R@0.7 33.3% over 6 queries" in proc.stderr
    assert "<2min: mIoU 0.4444, R@0.3 66.7%, R@0.5 33.3%, R@0.7 33.3% of 3" in proc.stderr
    assert "IoU 0.75 ([95, 110])" in proc.stderr and "IoU 0.00 (no interval)" in proc.stderr

    # The traces carry the targets, for the trace page to draw beside the answered span.
    by_query = {int(re.search(r"moment (\d+):", t["question"]).group(1)): t
                for t in map(json.loads, traces.read_text().splitlines())}
    assert by_query[4]["targets"] == records[4]["targets"] and by_query[4]["task"] == "grounding"
    assert by_query[4]["answer"]["interval"] == [95, 110]


def test_a_rerun_skips_answered_queries_and_scores_the_whole_file(bench, server, tmp_path):
    questions = write_native(tmp_path / "g.jsonl")
    lines = questions.read_text().splitlines()
    partial = tmp_path / "first-four.jsonl"
    partial.write_text("\n".join(lines[:4]) + "\n")
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    assert run_eval(bench, server, partial, out).returncode == 0
    asked_before = len(server.requests)
    proc = run_eval(bench, server, questions, out, "--summary", summary)
    assert proc.returncode == 0, proc.stderr
    asked = [re.search(r"moment (\d+):", b["messages"][1]["content"]).group(1)
             for b in server.requests[asked_before:] if b["model"] == "navigator"]
    assert sorted(set(asked)) == ["5", "6"]
    assert "4 already done" in proc.stderr
    report = json.loads(summary.read_text())
    assert {k: report["grounding"][k] for k in OVERALL} == OVERALL


def test_task_and_format_must_agree(bench, tmp_path):
    """Usage errors, before any model is contacted: one line naming the file and what to do."""
    grounding = write_native(tmp_path / "g.jsonl")
    cgbench = write_cgbench(tmp_path / "cg.json")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"schema": "lvr.question/1", "id": "q", "video": "short.mp4",
                                     "question": "Which?", "options": ["A. a", "B. b"], "answer": "A"}) + "\n")
    cases = [
        ((questions, "--task", "grounding"), "not a grounding file; --task grounding reads lvr.grounding/1"),
        ((questions, "--format", "lvbench", "--task", "grounding"), "--format lvbench holds questions"),
        ((grounding, "--task", "qa"), "a grounding file (native), not questions; drop --task qa"),
        ((cgbench,), "CG-Bench records; lvr eval grades them only as grounding queries, with --task grounding"),
        ((cgbench, "--format", "cgbench", "--task", "qa"), "--format cgbench holds grounding queries"),
        ((grounding, "--task", "when"), "--task takes qa, grounding, not 'when'"),
        ((grounding, "--format", "charades"), "--format takes auto, native, lvbench, videomme, mlvu, "
                                              "longvideo-r1, activitynet, cgbench, not 'charades'"),
    ]
    for args, message in cases:
        proc = run_lvr("eval", *args, "--model", "navigator", "--base-url", "http://127.0.0.1:9/v1",
                       "--cache-dir", tmp_path / "cache", "-o", tmp_path / "out.jsonl")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_the_task_is_told_by_the_file_or_the_flag(tmp_path):
    from lvr.infer.evaluate import EvalOptions, read_items

    native = write_native(tmp_path / "g.jsonl")
    task, items, errors = read_items(native, EvalOptions())
    assert (task, [i.qid for i in items], errors) == ("grounding", [f"q{n}" for n in QUERIES], [])
    anet = write_activitynet(tmp_path / "anet.json")
    task, items, _ = read_items("-", EvalOptions(), stdin=io.StringIO(anet.read_text()))   # stdin read once
    assert task == "grounding" and [i.targets for i in items][3] == ((90.0, 110.0),)
    task, items, _ = read_items(write_cgbench(tmp_path / "cg.json"), EvalOptions(task="grounding"))
    assert task == "grounding" and items[3].targets == ((10.0, 30.0), (90.0, 110.0))
    qa = tmp_path / "q.jsonl"
    qa.write_text(json.dumps({"video": "a.mp4", "question": "Which?", "options": ["A. a", "B. b"],
                              "answer": "B"}) + "\n")
    for options in (EvalOptions(), EvalOptions(task="qa"), EvalOptions(format="native")):
        task, items, _ = read_items(qa, options)
        assert task == "qa" and items[0].answer == "B"


def test_an_output_holding_both_kinds_has_both_blocks():
    """One -o file that got a question file and a grounding file: accuracy over the questions,
    mIoU over the queries, the accounting over all."""
    from lvr.infer.evaluate import summarize

    def question(qid, prediction):
        return {"schema": "lvr.eval/1", "task": "qa", "qid": qid, "options": ["A. a", "B. b"], "answer": "A",
                "prediction": prediction, "choice": prediction, "accounting": {"rounds": 2}}

    # [0, 5] vs [0, 10]: inter 5, union 5+10-5 = 10 -> 1/2; bucket from the probed 8 s
    query = {"schema": "lvr.eval/1", "task": "grounding", "qid": "g", "video": "short.mp4", "query": "q",
             "targets": [[0, 10]], "duration": None, "video_duration": 8.0, "interval": [0, 5],
             "accounting": {"rounds": 4}}
    report = summarize([question("a", "A"), question("b", "B"), query])
    assert report["questions"] == 3 and report["tasks"] == {"qa": 2, "grounding": 1}
    assert report["correct"] == 1 and report["accuracy"] == 0.5
    assert report["grounding"] == {"count": 1, "miou": 0.5, "R@0.3": 1.0, "R@0.5": 1.0, "R@0.7": 0.0,
                                   "answered": 1, "by_duration": {"<2min": {"count": 1, "miou": 0.5, "R@0.3": 1.0,
                                                                            "R@0.5": 1.0, "R@0.7": 0.0}}}
    assert report["mean_rounds"] == round(8 / 3, 4)

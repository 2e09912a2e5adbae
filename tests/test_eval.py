"""`lvr eval` end to end: 20 questions over synthetic videos, a scripted model, a kill and a rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr_test_helpers import LVR, run_lvr
from synthetic_media import make_frame_number_video

N = 20


def scripted(body: dict) -> str:
    """Question n asks for option 'A'/'B' in its text; every third question is answered wrongly."""
    if body["model"] == "captioner":
        return "<caption>Numbers count up on a dark screen.</caption>"
    first = body["messages"][1]["content"]
    n = int(first.split("Question: Q", 1)[1].split(":", 1)[0])
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if turns == 0:
        return f"<think>Look closer at question {n}.</think><tool>get_caption(({n % 4 + 1}, 1))</tool>"
    letter = "A" if n % 2 else "B"
    if n % 3 == 0:
        letter = "B" if letter == "A" else "A"
    return f"<think>Done.</think><answer>{letter}</answer>"


@pytest.fixture(scope="module")
def bench(numbered_video, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    videos = root / "videos"
    videos.mkdir()
    (videos / "one.mp4").write_bytes(numbered_video.read_bytes())
    make_frame_number_video(videos / "two.mp4", width=128, fps=10, duration=8)
    lines = []
    for n in range(1, N + 1):
        lines.append(json.dumps({
            "schema": "lvr.question/1", "id": f"q{n:02d}", "video": "one" if n % 2 else "two.mp4",
            "question": f"Q{n}: which?", "options": ["A. odd", "B. even"], "answer": "A" if n % 2 else "B",
            "category": "odd" if n % 2 else "even"}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def flags(url: str, cache: Path) -> list:
    return ["--base-url", url, "--model", "navigator", "--caption-model", "captioner", "--cache-dir", cache,
            "--video-dir", "videos"]


def expected_correct(n: int) -> bool:
    return n % 3 != 0


def test_eval_records_and_summary(bench, tmp_path):
    out, summary = tmp_path / "results.jsonl", tmp_path / "summary.json"
    with FakeOpenAI(scripted, models=("navigator", "captioner")) as server:
        proc = run_lvr("eval", "questions.jsonl", *flags(server.url, tmp_path / "cache"), "-o", out,
                       "--summary", summary, "--traces", tmp_path / "traces.jsonl", cwd=bench)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["qid"] for r in records) == [f"q{n:02d}" for n in range(1, N + 1)]
    for r in records:
        n = int(r["qid"][1:])
        assert r["schema"] == "lvr.eval/1" and r["correct"] is expected_correct(n)
        assert r["task"] == "qa" and r["strategy"] == "navigate"
        assert r["accounting"]["rounds"] == 2 and r["accounting"]["get_caption_calls"] == 1
        assert r["accounting"]["exhaustive_captions"] == 84
        assert r["settings"]["models"]["reasoning"]["model"] == "navigator"
        assert r["settings"]["max_rounds"] == 30 and r["settings"]["K_bounds"] == [4, 8]
        assert r["settings"]["subtitles"] is False and len(r["settings"]["prompt_hash"]) == 16
    report = json.loads(summary.read_text())
    right = sum(expected_correct(n) for n in range(1, N + 1))
    assert report["questions"] == N and report["correct"] == right
    assert report["tasks"] == {"qa": N, "grounding": 0} and "grounding" not in report
    assert report["accuracy"] == round(right / N, 4)
    assert report["per_category"]["odd"]["questions"] == 10
    assert report["per_category"]["odd"]["accuracy"] == round(sum(expected_correct(n) for n in range(1, N + 1, 2)) / 10, 4)
    assert report["mean_rounds"] == 2.0 and report["mean_exhaustive_captions"] == 84
    assert report["mean_caption_calls"] == 5.0           # 4 high + 1 medium per question
    assert report["tokens"]["reasoning"]["requests"] == 2 * N
    # Captions are made once per node and video, then shared by later questions.
    assert len([b for b in server.requests if b["model"] == "captioner"]) == \
        sum(c["accounting"]["caption_calls"]["made"] for c in records)
    assert f"accuracy {right}/{N}" in proc.stderr
    assert len((tmp_path / "traces.jsonl").read_text().splitlines()) == N


def test_killed_eval_resumes_without_redoing_questions(bench, tmp_path):
    out = tmp_path / "results.jsonl"
    server = FakeOpenAI(scripted, models=("navigator", "captioner"), latency_s=0.15).start()
    try:
        proc = subprocess.Popen([*LVR, "eval", "questions.jsonl", *map(str, flags(server.url, tmp_path / "cache")),
                                 "-o", str(out), "--question-concurrency", "2", "-q"], cwd=bench,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if out.exists() and len(out.read_text().splitlines()) >= 6:
                break
            if proc.poll() is not None:
                pytest.fail(f"eval ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        server.stop()
    first = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    finished = {r["qid"] for r in first}
    assert 6 <= len(finished) < N

    with FakeOpenAI(scripted, models=("navigator", "captioner")) as again:
        proc = run_lvr("eval", "questions.jsonl", *flags(again.url, tmp_path / "cache"), "-o", out, cwd=bench)
        asked = {b["messages"][1]["content"].split(":", 1)[0] for b in again.requests if b["model"] == "navigator"}
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    qids = [r["qid"] for r in records]
    assert sorted(qids) == [f"q{n:02d}" for n in range(1, N + 1)]  # each exactly once
    assert not asked & {f"Question: Q{int(q[1:])}" for q in finished}
    assert f"{len(finished)} already done" in proc.stderr


def test_bad_records_and_missing_videos_are_named(bench, tmp_path):
    qs = tmp_path / "qs.jsonl"
    qs.write_text("\n".join([
        json.dumps({"schema": "lvr.question/1", "id": "ok", "video": "one.mp4", "question": "Q1: which?",
                    "options": ["A. odd", "B. even"], "answer": "A"}),
        "{not json",
        json.dumps({"schema": "lvr.question/1", "id": "escape", "video": "../secret.mp4", "question": "Q3: x?",
                    "options": ["A. a", "B. b"], "answer": "A"}),
        json.dumps({"schema": "lvr.question/1", "id": "gone", "video": "missing.mp4", "question": "Q5: x?",
                    "options": ["A. a", "B. b"], "answer": "A"}),
    ]) + "\n")
    with FakeOpenAI(scripted, models=("navigator", "captioner")) as server:
        proc = run_lvr("eval", qs, *flags(server.url, tmp_path / "cache")[:-1], bench / "videos",
                       "-o", tmp_path / "r.jsonl")
    assert proc.returncode == 1
    assert f"{qs}:2" in proc.stderr
    assert "escape" in proc.stderr and "gone" in proc.stderr
    assert [json.loads(x)["qid"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ["ok"]
    assert "Traceback" not in proc.stderr


# -- scoring rules -----------------------------------------------------------------------------------

# question n: (answer key, what the model replies). None: it only calls tools, so with one round it
# never answers.
SCORING_CASES = {1: ("A", None), 2: ("B", None), 3: ("B", "(B)"), 4: ("B", "B"), 5: ("A", None)}


def no_answer_or_scripted(body: dict) -> str:
    if body["model"] == "captioner":
        return "<caption>Numbers count up on a dark screen.</caption>"
    n = int(body["messages"][1]["content"].split("Question: Q", 1)[1].split(":", 1)[0])
    reply = SCORING_CASES[n][1]
    if reply is None:
        return "<think>I need more.</think><tool>get_caption((1, 1))</tool>"
    return f"<think>Done.</think><answer>{reply}</answer>"


def test_reference_scoring_counts_no_answer_as_a(bench, tmp_path):
    """--scoring reference (LongVideo-R1's eval/evaluation.py): no answer counts as A, the answer text must be
    the key exactly. The default counts no answer as wrong and reads the letter out of "(B)". Both runs
    record their rule, and each summary gives the accuracy under both rules."""
    qs = tmp_path / "qs.jsonl"
    qs.write_text("".join(json.dumps({"schema": "lvr.question/1", "id": f"q{n}", "video": "one.mp4",
                                      "question": f"Q{n}: which?", "options": ["A. odd", "B. even"],
                                      "answer": key}) + "\n" for n, (key, _) in SCORING_CASES.items()))
    runs = {}
    with FakeOpenAI(no_answer_or_scripted, models=("navigator", "captioner")) as server:
        for rule in ("lvr", "reference"):
            out, summary = tmp_path / f"{rule}.jsonl", tmp_path / f"{rule}.summary.json"
            extra = ["--scoring", rule] if rule == "reference" else []
            proc = run_lvr("eval", qs, *flags(server.url, tmp_path / "cache")[:-1], bench / "videos",
                           "--max-rounds", "1", "-o", out, "--summary", summary, *extra)
            assert proc.returncode == 0, proc.stderr
            records = {r["qid"]: r for r in map(json.loads, out.read_text().splitlines())}
            runs[rule] = (records, json.loads(summary.read_text()), proc.stderr)

    lvr_records, lvr_summary, lvr_err = runs["lvr"]
    ref_records, ref_summary, ref_err = runs["reference"]
    assert lvr_records["q1"]["prediction"] is None and lvr_records["q1"]["stopped"] == "max_rounds"
    assert {q: r["correct"] for q, r in lvr_records.items()} == \
        {"q1": False, "q2": False, "q3": True, "q4": True, "q5": False}
    assert {q: r["correct"] for q, r in ref_records.items()} == \
        {"q1": True, "q2": False, "q3": False, "q4": True, "q5": True}
    right = {"lvr": 2, "reference": 3}
    for rule, (records, summary, err) in runs.items():
        assert all(r["scoring"] == rule and r["settings"]["scoring"] == rule for r in records.values())
        assert summary["scoring"] == rule and summary["settings"]["scoring"] == rule
        assert summary["correct"] == right[rule] and summary["accuracy"] == right[rule] / 5
        assert summary["accuracy_by_scoring"] == {"lvr": {"correct": 2, "accuracy": 0.4},
                                                  "reference": {"correct": 3, "accuracy": 0.6}}
        assert f"Accuracy ({rule} scoring) {right[rule]}/5" in err


def test_scoring_rules_by_hand():
    from lvr.infer.evaluate import EvalOptions, score

    options = ["A. odd", "B. even"]
    assert score("reference", None, None, options, "A") and not score("lvr", None, None, options, "A")
    assert not score("reference", None, None, options, "B")
    assert score("lvr", "(B)", "B", options, "B") and not score("reference", "(B)", "B", options, "B")
    assert not score("reference", "b", "B", options, "B") and score("reference", " B ", "B", options, "B")
    assert score("reference", "Fourier's law", None, [], "Fourier's law")
    assert not score("reference", "fourier's law", None, [], "Fourier's law")
    with pytest.raises(ValueError, match="--scoring takes lvr, reference"):
        EvalOptions(scoring="strict")

"""`lvr synthesize` end to end: a teacher that answers wrong twice, then right; resume; budget; dry run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr_test_helpers import LVR, run_lvr

TEACHER = [
    "<think>Start with the first medium clip.</think><tool>get_caption((1, 1))</tool>",
    "<think>It must be A.</think><answer>A</answer>",
    "<think>The hint points at the second high clip.</think><tool>get_caption((2, 1))</tool>",
    "<think>Then C.</think><answer>C</answer>",
    "<think>With the medium hint, B fits.</think><answer>B</answer>",
]


def caption(body: dict) -> str:
    intro = body["messages"][1]["content"][0]["text"]
    return f"<caption>Numbers on screen ({intro.split('from a ', 1)[1].split('-level', 1)[0]}).</caption>"


def teacher(body: dict) -> str:
    if body["model"] == "captioner":
        return caption(body)
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return TEACHER[turns + hints_seen(body)]


def hints_seen(body: dict) -> int:
    return sum(m["content"].count("Hint:") for m in body["messages"] if m["role"] == "user")


@pytest.fixture(scope="module")
def qa_dir(numbered_video, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    (root / "numbers.mp4").write_bytes(numbered_video.read_bytes())
    items = [{"schema": "lvr.qa/1", "id": f"item{n}", "video": "numbers.mp4", "question": f"Item {n}: which?",
              "options": ["A. one", "B. two", "C. three"], "answer": "B",
              # 3.2-3.9 and 4.0-4.4 are 0.1 s apart: merged. 10.0-10.5 is 5.6 s later: kept apart.
              "clues": [[4.0, 4.4], [3.2, 3.9], [10.0, 10.5]]} for n in range(1, 9)]
    (root / "qa.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root


def flags(url: str, cache: Path) -> list:
    return ["--teacher-model", "teacher", "--base-url", url, "--caption-model", "captioner", "--cache-dir", cache]


def test_wrong_twice_then_right(qa_dir, tmp_path):
    out = tmp_path / "traj.jsonl"
    with FakeOpenAI(teacher, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", *flags(server.url, tmp_path / "cache"), "--max-items", "1",
                       "-o", out, "--price-prompt", "1.25", "--price-completion", "10", cwd=qa_dir)
        sent = [b for b in server.requests if b["model"] == "teacher"]
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec["schema"] == "lvr.trajectory/1" and rec["accepted"] is True and rec["attempts"] == 3
    assert rec["clues"] == [[3.2, 4.4], [10.0, 10.5]]
    # Both hints, at the right turns, with exactly the ids the clues imply:
    # high (2,) spans 3-6 s and (4,) 9-12 s; medium (2,1) 3-3.8, (2,2) 3.8-4.6, (4,2) 9.8-10.6
    # (30 frames per high node split 8, 8, 7, 7).
    assert [(h["level"], h["after_turn"], h["ids"]) for h in rec["hints"]] == [
        (1, 1, [[2], [4]]), (2, 2, [[2, 1], [2, 2], [4, 2]])]
    assert "(2,), (4,)" in rec["hints"][0]["text"] and "(2, 1), (2, 2), (4, 2)" in rec["hints"][1]["text"]
    assert [d["answer"] for d in rec["dropped"]] == ["A", "C"]
    assert [d["after_turn"] for d in rec["dropped"]] == [1, 2]
    # The teacher saw each hint right after the turn it follows.
    assert sent[2]["messages"][-1]["content"].endswith(rec["hints"][0]["text"])
    assert sent[4]["messages"][-1]["content"].endswith(rec["hints"][1]["text"])
    assert rec["hints"][0]["text"] not in sent[1]["messages"][-1]["content"]
    # The clean conversation: what `ask` would have sent and received, without hint text or dropped turns.
    msgs = rec["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == [TEACHER[0], TEACHER[2], TEACHER[4]]
    text = json.dumps(msgs)
    assert "Hint" not in text and "<answer>A</answer>" not in text and "<answer>C</answer>" not in text
    assert msgs[:2] == sent[0]["messages"][:2]
    assert msgs[3]["content"].startswith("get_caption: caption of medium clip (1, 1), 00:00.0-00:00.8:")
    assert rec["teacher"] == "teacher" and len(rec["prompt_hash"]) == 16
    assert rec["tokens"]["requests"] == 5 and rec["tokens"]["completion_tokens"] > 0
    expected_cost = (rec["tokens"]["prompt_tokens"] * 1.25 + rec["tokens"]["completion_tokens"] * 10) / 1e6
    assert rec["cost_usd"] == pytest.approx(expected_cost)
    assert [v["node"] for v in rec["visits"]] == [[1, 1], [2, 1]]

    # The lint agrees that this trajectory is clean, and the SFT export carries no hint.
    lint = run_lvr("synthesize", "--lint", out)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    sft = tmp_path / "sft.jsonl"
    exported = run_lvr("synthesize", "--export-sft", out, "-o", sft)
    assert exported.returncode == 0, exported.stderr
    (sample,) = [json.loads(x) for x in sft.read_text().splitlines()]
    assert sample["messages"] == msgs


def test_give_up_after_three_hints(qa_dir, tmp_path):
    def always_wrong(body):
        if body["model"] == "captioner":
            return caption(body)
        return "<think>Surely A.</think><answer>A</answer>"

    out = tmp_path / "traj.jsonl"
    with FakeOpenAI(always_wrong, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", *flags(server.url, tmp_path / "cache"), "--max-items", "1",
                       "-o", out, cwd=qa_dir)
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec["accepted"] is False and rec["stopped"] == "gave_up" and rec["attempts"] == 4
    assert [h["level"] for h in rec["hints"]] == [1, 2, 3]
    assert "video_qa" in rec["hints"][2]["text"]


def test_killed_batch_resumes_each_item_once(qa_dir, tmp_path):
    out = tmp_path / "traj.jsonl"
    server = FakeOpenAI(teacher, models=("teacher", "captioner"), latency_s=0.1).start()
    try:
        proc = subprocess.Popen([*LVR, "synthesize", "qa.jsonl", *map(str, flags(server.url, tmp_path / "cache")),
                                 "-o", str(out), "--item-concurrency", "2", "-q"], cwd=qa_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if out.exists() and len(out.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"synthesize ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        server.stop()
    finished = {json.loads(x)["qid"] for x in out.read_text().splitlines() if x.strip()}
    assert 3 <= len(finished) < 8
    with FakeOpenAI(teacher, models=("teacher", "captioner")) as again:
        proc = run_lvr("synthesize", "qa.jsonl", *flags(again.url, tmp_path / "cache"), "-o", out, cwd=qa_dir)
        firsts = {b["messages"][1]["content"].split(":", 1)[1].split("\n", 1)[0].strip()
                  for b in again.requests if b["model"] == "teacher"}
    assert proc.returncode == 0, proc.stderr
    qids = [json.loads(x)["qid"] for x in out.read_text().splitlines()]
    assert sorted(qids) == sorted(f"item{n}" for n in range(1, 9))
    assert not firsts & {f"Item {q[4:]}" for q in finished}


def test_token_budget_stops_cleanly(qa_dir, tmp_path):
    out = tmp_path / "traj.jsonl"
    with FakeOpenAI(teacher, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", *flags(server.url, tmp_path / "cache"), "-o", out,
                       "--item-concurrency", "1", "--token-budget", "50", cwd=qa_dir)
    assert proc.returncode == 0, proc.stderr
    assert "token budget reached: 7 items not started" in proc.stderr
    assert len(out.read_text().splitlines()) == 1


def test_dry_run_calls_no_model(qa_dir, tmp_path):
    with FakeOpenAI(teacher, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", *flags(server.url, tmp_path / "cache"), "--dry-run",
                       "--price-prompt", "1", "--price-completion", "1", cwd=qa_dir)
        assert server.requests == []
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "8 items over 1 videos"
    assert lines[1].startswith("teacher: about 88 requests")   # 11 rounds per item (10.5 rounded up)
    assert "captioner: at most" in lines[2] and lines[3].startswith("teacher cost: about $")


def test_items_without_clues_are_named_and_skipped(qa_dir, tmp_path):
    def right_away(body):
        return caption(body) if body["model"] == "captioner" else "<think>Two.</think><answer>B</answer>"

    good = {"schema": "lvr.qa/1", "id": "clued", "video": "numbers.mp4", "question": "Which?",
            "options": ["A. one", "B. two"], "answer": "B", "clues": [[4.0, 4.4]]}
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {**good, "id": "no-clues", "clues": None}, good, {**good, "id": "empty-clues", "clues": []}]))
    out = tmp_path / "traj.jsonl"
    with FakeOpenAI(right_away, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", qa, *flags(server.url, tmp_path / "cache"), "--video-dir", qa_dir, "-o", out,
                       "-q")
        asked = {b["messages"][1]["content"].split("\n", 1)[0] for b in server.requests if b["model"] == "teacher"}
    assert proc.returncode == 1, proc.stderr
    errors = [line.split("error: ", 1)[1] for line in proc.stderr.splitlines() if "no clues" in line]
    assert [e.split(": no clues; ")[0] for e in errors] == [f"{qa}: item no-clues", f"{qa}: item empty-clues"]
    assert "2 bad records" in proc.stderr
    # The batch went on with the clued item alone.
    assert [json.loads(x)["qid"] for x in out.read_text().splitlines()] == ["clued"]
    assert asked == {"Question: Which?"}

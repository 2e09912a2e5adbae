"""Progress while `ask`, `eval` and `synthesize` work: timestamped lines off a terminal, bars on one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.infer.agent import Turn
from lvr.infer.protocol import Breach, parse_turn
from lvr.prep.progress import Reporter
from lvr_test_helpers import LVR, run_lvr  # stderr is a pipe: not a terminal, as under nohup, SLURM or CI

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"

NAVIGATOR = [
    "<think>The second high clip looks promising; check its third medium clip.</think>"
    "<tool>get_caption((2, 3))</tool>",
    "<think>Now the first low clip inside it.</think><tool>get_caption((2, 3, 1))</tool>",
    '<think>Verify with the frames.</think><tool>video_qa((2, 3, 1), "What is in the hands?")</tool>',
    "<think>The frames confirm it.</think><answer>B</answer>",
]
QA_REPLY = "A white cup."


def scripted(body: dict) -> str:
    if body["model"] == "captioner":
        return "<caption>Numbers count up on a grey screen.</caption>"
    if body["model"] == "qa":
        return QA_REPLY
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return NAVIGATOR[min(turns, len(NAVIGATOR) - 1)]


def ask_flags(url: str, cache: Path) -> list:
    return ["--base-url", url, "--model", "navigator", "--caption-model", "captioner", "--qa-model", "qa",
            "--cache-dir", cache]


def progress_lines(stderr: str, command: str) -> list[str]:
    """The timestamped lines of `command`, without their timestamps."""
    return [m.group(1) for m in re.finditer(rf"^{STAMP} {command}: (.*)$", stderr, re.M)]


def test_ask_off_a_terminal_writes_a_timestamped_line_per_round(numbered_video, tmp_path):
    cache = tmp_path / "cache"
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", numbered_video, "What is held?", "-O", "A. a phone", "-O", "B. a cup",
                       *ask_flags(server.url, cache), "--trace", tmp_path / "t.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "B. a cup"
    lines = progress_lines(proc.stderr, "lvr ask")
    assert "\r" not in proc.stderr and "|" not in proc.stderr     # no bar drawn into a log
    # The tree is planned from the probe; the first level's frames are decoded as they are captioned:
    # a line at the start and one at the end, none per frame.
    assert lines[:2] == ["probing numbered.mp4 and planning its tree", "K=4 tree ready; captioning the 4 high clips"]
    assert re.fullmatch(r"decoding the first level of numbered\.mp4: \d+ frames to decode", lines[2])
    assert re.fullmatch(r"decoding the first level of numbered\.mp4: \d+ frames in \d+\.\d s", lines[3])
    rounds = lines[4:]
    assert [re.sub(r", \d+\.\d s$", "", r) for r in rounds] == [
        "round 1: get_caption((2, 3)) -> 15 words",
        "round 2: get_caption((2, 3, 1)) -> 16 words",
        'round 3: video_qa((2, 3, 1), "What is in the hands?") -> 18 words',
        "round 4: answer B",
    ]
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert [len(t["result"].split()) for t in trace["turns"][:3]] == [15, 16, 18]
    # The time spent segmenting is accounted for and shown in the summary.
    assert trace["accounting"]["segment_seconds"] > 0
    (summary,) = [x for x in proc.stderr.splitlines() if x.startswith("lvr ask: 4 rounds")]
    assert re.search(r"; \d+\.\d s \+ \d+\.\d s segmenting\.$", summary)

    # Asked again, the tree and the high captions come from the cache: nothing decoded; -q silences progress.
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        again = run_lvr("ask", numbered_video, "And now?", *ask_flags(server.url, cache))
        quiet = run_lvr("ask", numbered_video, "And now?", *ask_flags(server.url, cache), "-q")
    assert again.returncode == 0 and quiet.returncode == 0, again.stderr + quiet.stderr
    lines = progress_lines(again.stderr, "lvr ask")
    assert not [x for x in lines if "decod" in x]
    assert len([x for x in lines if x.startswith("round ")]) == 4
    assert quiet.stderr == ""


def test_ask_verbose_streams_think_call_and_result(numbered_video, tmp_path):
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", numbered_video, "What is held?", "-O", "A. a phone", "-O", "B. a cup",
                       *ask_flags(server.url, tmp_path / "cache"), "--verbose")
        both = run_lvr("ask", numbered_video, "What is held?", *ask_flags(server.url, tmp_path / "cache"),
                       "-v", "-q")
    assert proc.returncode == 0, proc.stderr
    lines = progress_lines(proc.stderr, "lvr ask")
    rounds = [x for x in lines[lines.index("K=4 tree ready; captioning the 4 high clips") + 1:]
              if not x.startswith("decoding the first level")]
    assert [re.sub(r"\(\d+\.\d s\)", "(s)", x) for x in rounds] == [
        "round 1 (s)",
        "  think: The second high clip looks promising; check its third medium clip.",
        "  tool: get_caption((2, 3))",
        "  result (15 words): get_caption: caption of medium clip (2, 3), 00:04.6-00:05.3: "
        "Numbers count up on a grey screen.",
        "round 2 (s)",
        "  think: Now the first low clip inside it.",
        "  tool: get_caption((2, 3, 1))",
        "  result (16 words): get_caption: caption of low clip (2, 3, 1), 00:04.6-00:04.8: "
        "Numbers count up on a grey screen.",
        "round 3 (s)",
        "  think: Verify with the frames.",
        '  tool: video_qa((2, 3, 1), "What is in the hands?")',
        "  result (18 words): video_qa on low clip (2, 3, 1), 00:04.6-00:04.8. "
        f"Question: What is in the hands? Answer: {QA_REPLY}",
        "round 4 (s)",
        "  think: The frames confirm it.",
        "  answer: B",
    ]
    assert both.returncode == 2 and "--quiet and --verbose" in both.stderr


def test_ask_on_a_terminal_draws_bars_not_lines(numbered_video, tmp_path):
    """stderr a pseudo-terminal: a frame bar while segmenting, a round counter, no timestamped lines."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:     # the other end is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
            proc = subprocess.run([*LVR, "ask", str(numbered_video), "What is held?",
                                   *map(str, ask_flags(server.url, tmp_path / "cache"))],
                                  stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, shown
    assert re.search(r"decoding the first level of numbered\.mp4: +\d+%\|", shown)
    assert "ask: round 4 [" in shown and "answer B" in shown
    assert not re.search(STAMP, shown)
    assert "lvr ask: 4 rounds" in shown


def eval_questions(root: Path, video: Path, n: int) -> None:
    (root / "clip.mp4").write_bytes(video.read_bytes())
    (root / "questions.jsonl").write_text("".join(json.dumps({
        "schema": "lvr.question/1", "id": f"q{i}", "video": "clip.mp4", "question": f"Q{i}: which?",
        "options": ["A. one", "B. two"], "answer": "B"}) + "\n" for i in range(1, n + 1)))


def test_eval_off_a_terminal_writes_a_timestamped_line_per_question(numbered_video, tmp_path):
    eval_questions(tmp_path, numbered_video, 3)

    def reply(body: dict) -> str:
        if body["model"] == "captioner":
            return "<caption>Numbers.</caption>"
        if sum(1 for m in body["messages"] if m["role"] == "assistant") == 0:
            return "<think>Look.</think><tool>get_caption((1, 1))</tool>"
        return "<think>Done.</think><answer>B</answer>"

    with FakeOpenAI(reply, models=("navigator", "captioner")) as server:
        proc = run_lvr("eval", "questions.jsonl", "--base-url", server.url, "--model", "navigator",
                       "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", "-o", "r.jsonl",
                       "--summary", "s.json", "--question-concurrency", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = progress_lines(proc.stderr, "lvr eval")
    # One video, planned once; its first level decoded once, by whichever questions got there first.
    starts = [x for x in lines if x.startswith("decoding the first level of clip.mp4") and x.endswith("to decode")]
    assert 1 <= len(starts) <= 3
    items = [x for x in lines if x.startswith("[")]
    assert [x.split("]", 1)[0] for x in items] == ["[1/3", "[2/3", "[3/3"]
    assert sorted(x.split(" ")[1] for x in items) == ["q1:", "q2:", "q3:"]
    for n, x in enumerate(items, 1):
        assert re.fullmatch(r"\[\d/3\] q\d: right \(B\), 2 rounds, 5 captions \(\d new\), \d+\.\d s"
                            rf"( \+ \d+\.\d s segmenting)?; accuracy {n}/{n}", x), x
    # Only the question that segmented the shared video counts the time; the summary adds it up.
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    seg = [r["accounting"]["segment_seconds"] for r in records]
    assert len([s for s in seg if s > 0]) == 1 and seg.count(0.0) == 2
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["segment_seconds"] == pytest.approx(sum(seg), abs=0.002)
    assert re.search(r"; \d+\.\d s segmenting; \d+\.\d s in all\.$", proc.stderr, re.M)


def test_synthesize_off_a_terminal_writes_a_timestamped_line_per_item(numbered_video, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(numbered_video.read_bytes())
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({
        "schema": "lvr.qa/1", "id": f"item{i}", "video": "clip.mp4", "question": f"Item {i}: which?",
        "options": ["A. one", "B. two"], "answer": "B", "clues": [[3.2, 3.9]]}) + "\n" for i in (1, 2)))

    def teacher(body: dict) -> str:
        """Wrong once (a hint follows), then right."""
        if body["model"] == "captioner":
            return "<caption>Numbers.</caption>"
        if any("Hint" in m["content"] for m in body["messages"] if m["role"] == "user"):
            return "<think>The hint says B.</think><answer>B</answer>"
        return "<think>Surely A.</think><answer>A</answer>"

    with FakeOpenAI(teacher, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", "--teacher-model", "teacher", "--base-url", server.url,
                       "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", "-o", "traj.jsonl",
                       "--item-concurrency", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = [x for x in progress_lines(proc.stderr, "lvr synthesize") if x.startswith("[")]
    assert len(items) == 2
    for n, x in enumerate(items, 1):
        assert re.fullmatch(rf"\[{n}/2\] item{n}: accepted \(answered\) after 1 hint, 2 rounds, \d+ teacher "
                            rf"tokens, \d+\.\d s( \+ \d+\.\d s segmenting)?; accepted {n}/{n}, "
                            r"teacher tokens \d+", x), x
    records = [json.loads(x) for x in (tmp_path / "traj.jsonl").read_text().splitlines()]
    assert "segment_seconds" in records[0]["accounting"]


# -- the pieces ---------------------------------------------------------------------------


def test_frame_progress_off_a_terminal(capsys):
    frames = Reporter("lvr test", terminal=False).frames("v.mp4", every_s=0)
    frames.plan(10)
    frames.update(4)
    frames.update(6)
    frames.close()
    frames.close()                      # once only
    lines = progress_lines(capsys.readouterr().err, "lvr test")
    assert lines[:3] == ["segmenting v.mp4: 10 frames to decode", "segmenting v.mp4: 4/10 frames",
                         "segmenting v.mp4: 10/10 frames"]
    assert re.fullmatch(r"segmenting v\.mp4: 10 frames in \d+\.\d s", lines[3]) and len(lines) == 4

    # A long interval: only the start and the end; never planned (a cached tree) or disabled: nothing.
    slow = Reporter("lvr test", terminal=False).frames("v.mp4", every_s=3600)
    slow.plan(10)
    slow.update(10)
    slow.close()
    Reporter("lvr test", terminal=False).frames("cached.mp4").close()
    off = Reporter("lvr test", enabled=False, terminal=False).frames("quiet.mp4", every_s=0)
    off.plan(3)
    off.update(3)
    off.close()
    Reporter("lvr test", enabled=False, terminal=False).line("hidden")
    lines = progress_lines(capsys.readouterr().err, "lvr test")
    assert [x.split(":")[0] for x in lines] == ["segmenting v.mp4", "segmenting v.mp4"]


@pytest.mark.parametrize("text, summary", [
    ("<think>x</think><tool>get_caption(2, 3)</tool>", f"invalid ({Breach.MALFORMED_CALL})"),
    ("<think>x</think><answer>the red one</answer>", "answer the red one"),
])
def test_turn_summary_names_breaches_and_answers(text, summary):
    parsed = parse_turn(text, 4)
    turn = Turn(2, text, parsed, breach=parsed.breach, seconds=1.5)
    assert turn.summary() == f"{summary}, 1.5 s"

"""`lvr ask --ground-then-answer` (issue 15): a grounding run finds the span, then the video_qa model
answers from frames of that span. Scripted models behind a test server, a frame-number video."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr.infer.ground_then_answer import span_frame_range, span_frames
from lvr.infer.profiles import LONGVIDEO_R1_PROFILE, LVR_PROFILE
from lvr.infer.protocol import Breach
from lvr_test_helpers import model_flags, run_lvr
from synthetic_media import make_frame_number_video, read_frame_number

FPS = 10    # frame N is shown from N / 10 s and shows the number N
QUESTION = "What is the person holding?"
OPTIONS = ("A. a phone", "B. a cup")
LABEL = re.compile(r"^\[(\d\d):(\d\d\.\d)\]$")   # lvr's video_qa frame label, [mm:ss.s]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """12 s at 10 fps (120 frames), frame N shows N."""
    return make_frame_number_video(tmp_path_factory.mktemp("gta") / "numbers.mp4", fps=FPS, duration=12)


def models(navigator: str, qa: str = "B"):
    """The scripted models: a navigator that always replies `navigator`, a captioner, a video_qa model."""
    def reply(body: dict) -> str:
        return {"captioner": "<caption>A grey picture with white blocks.</caption>", "qa": qa}.get(
            body["model"], navigator)
    return FakeOpenAI(reply, models=("navigator", "captioner", "qa"))


def ask(server: FakeOpenAI, video: Path, tmp_path: Path, *args) -> tuple:
    proc = run_lvr("ask", video, QUESTION, *args, "--ground-then-answer", *model_flags(server.url),
                   "--cache-dir", tmp_path / "cache", "--trace", tmp_path / "t.jsonl", "-o", tmp_path / "a.jsonl")
    by_model: dict[str, list[dict]] = {"navigator": [], "captioner": [], "qa": []}
    for body in server.requests:
        by_model[body["model"]].append(body)
    return proc, by_model


def shown_frames(request: dict) -> list[tuple[float, Image.Image]]:
    """(time label in seconds, image) of each frame a video_qa request carries, in order."""
    parts = request["messages"][1]["content"]
    frames = []
    for label, image in zip(parts, parts[1:]):
        m = LABEL.match(label.get("text") or "")
        if m and image["type"] == "image_url":
            data = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
            frames.append((int(m.group(1)) * 60 + float(m.group(2)), Image.open(io.BytesIO(data))))
    assert len(frames) == sum(p["type"] == "image_url" for p in parts)   # every image has its label
    return frames


def test_the_video_qa_request_carries_frames_only_from_the_grounded_span(video, tmp_path):
    with models("<think>The cup shows in the middle.</think><answer>[3.05, 7.5]</answer>") as server:
        proc, calls = ask(server, video, tmp_path, "-O", OPTIONS[0], "-O", OPTIONS[1], "--gta-frames", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "B. a cup"   # the video_qa model's answer, as the option it picks

    # Stage 1: one grounding run of the navigator, the question worded as the query, its options shown.
    (nav,) = calls["navigator"]
    assert "grounding query" in nav["messages"][0]["content"]
    assert nav["messages"][1]["content"].startswith(
        f'Find when this happens in the video: the moment that shows the answer to the question "{QUESTION}"'
        "\nOptions:\nA. a phone\nB. a cup\n\n")

    # Stage 2: frames 31..75 lie in [3.05, 7.5]; 8 of them, evenly spread (linspace, rounded), each
    # labelled with its own time and showing its own number.
    (qa,) = calls["qa"]
    frames = shown_frames(qa)
    numbers = [read_frame_number(image) for _, image in frames]
    assert numbers == [31, 37, 44, 50, 56, 62, 69, 75]
    assert all(31 <= n <= 75 for n in numbers)
    assert [t for t, _ in frames] == [n / FPS for n in numbers]
    assert all(3.05 <= t <= 7.5 for t, _ in frames)
    assert {max(image.size) for _, image in frames} == {128}   # the video_qa size, capped at the video's own
    assert qa["messages"][1]["content"][-1]["text"] == (
        f"Question: {QUESTION}\nOptions:\nA. a phone\nB. a cup\nAnswer with the letter of the correct option.")

    # The trace shows both stages; the accounting counts the extra video_qa call.
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert trace["strategy"] == "ground-then-answer" and trace["task"] == "qa" and trace["question"] == QUESTION
    assert trace["answer"] == {"text": "B", "choice": "B", "interval": [3.05, 7.5]}
    (turn,) = trace["turns"]
    assert turn["action"]["interval"] == [3.05, 7.5]
    stage = trace["answer_stage"]
    assert stage["interval"] == [3.05, 7.5] and stage["frame_indices"] == numbers
    assert stage["frame_times"] == [n / FPS for n in numbers] and stage["image_side"] == 128
    assert stage["answer"] == "B" and stage["model"] == "qa" and stage["tokens"]["completion_tokens"] == 1
    assert stage["question"] == qa["messages"][1]["content"][-1]["text"][len("Question: "):]
    acc = trace["accounting"]
    assert acc["video_qa_calls"] == 1 and acc["models"]["qa"]["requests"] == 1
    assert acc["models"]["qa"]["completion_tokens"] == 1 and acc["rounds"] == 1
    assert "grounded to [3.05, 7.5]; asking video_qa about up to 8 frames of it" in proc.stderr   # progress
    assert "video_qa answered from 8 frames of [3.05, 7.5] s" in proc.stderr

    record = json.loads((tmp_path / "a.jsonl").read_text())
    assert record["strategy"] == "ground-then-answer" and record["choice"] == "B"
    assert record["settings"]["strategy"] == "ground-then-answer" and record["settings"]["gta_frames"] == 8


def test_a_short_span_sends_each_of_its_frames_at_the_video_qa_side(video, tmp_path):
    with models("<think>Early.</think><answer>[2, 2.35]</answer>", qa="A white cup.") as server:
        proc, calls = ask(server, video, tmp_path, "--qa-side", "96")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "A white cup."
    (qa,) = calls["qa"]
    frames = shown_frames(qa)
    assert [read_frame_number(image) for _, image in frames] == [20, 21, 22, 23]   # fewer than --gta-frames 32
    assert [t for t, _ in frames] == [2.0, 2.1, 2.2, 2.3]
    assert {max(image.size) for _, image in frames} == {96}
    assert qa["messages"][1]["content"][-1]["text"] == f"Question: {QUESTION}"   # no options, no letter asked
    record = json.loads((tmp_path / "a.jsonl").read_text())
    assert record["settings"]["gta_frames"] == 32 and record["interval"] == [2.0, 2.35]


def test_grounding_that_gives_no_interval_fails_clearly_without_a_fallback(video, tmp_path):
    with models("<think>It is a cup.</think><answer>B</answer>") as server:
        proc, calls = ask(server, video, tmp_path, "-O", OPTIONS[0], "-O", OPTIONS[1], "--max-invalid", "1")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert (f"{video}: ground-then-answer: the grounding stage gave no interval "
            "(more than 1 invalid turns in a row)") in proc.stderr
    assert len(calls["navigator"]) == 2 and calls["qa"] == []
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert [t["action"]["error"] for t in trace["turns"]] == [Breach.MALFORMED_INTERVAL] * 2
    assert trace["strategy"] == "ground-then-answer" and trace["answer_stage"] is None
    assert trace["answer"] == {"text": None, "choice": None, "interval": None}
    assert trace["stopped"] == "invalid" and trace["question"] == QUESTION


def test_gta_frames_must_be_at_least_one(video, tmp_path):
    proc = run_lvr("ask", video, QUESTION, "--ground-then-answer", "--gta-frames", "0", "--model", "m")
    assert proc.returncode == 2 and "--gta-frames" in proc.stderr


TIMES = [i / FPS for i in range(120)]


@pytest.mark.parametrize("start, end, frames", [
    (3.05, 7.5, (31, 76)),      # frames whose times lie inside, both ends included
    (3.0, 3.0, (30, 31)),       # a point on a frame
    (2.01, 2.05, (20, 21)),     # inside one frame's display: the frame shown at its start
    (11.95, 12.0, (119, 120)),  # the end of the video
])
def test_span_frame_range(start, end, frames):
    assert span_frame_range(TIMES, start, end) == frames


def test_span_frames_are_spread_evenly_and_never_repeat():
    assert span_frames(TIMES, 0.0, 11.9, 4) == [0, 40, 79, 119]
    assert span_frames(TIMES, 1.0, 1.25, 32) == [10, 11, 12]
    picked = span_frames(TIMES, 0.35, 9.0, 32)
    assert len(picked) == len(set(picked)) == 32 and picked[0] == 4 and picked[-1] == 90


def test_every_profile_asks_the_span_the_question_with_its_options():
    for profile in (LVR_PROFILE, LONGVIDEO_R1_PROFILE):
        assert profile.span_query(f" {QUESTION} ", ()) == QUESTION
        asked = profile.span_query(QUESTION, OPTIONS)
        assert asked.startswith(QUESTION) and "A. a phone\nB. a cup" in asked and "letter" in asked
        assert QUESTION in profile.gta_query.format(question=QUESTION)

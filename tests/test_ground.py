"""`lvr ground` end to end: a scripted navigator answers an interval about a frame-number video; the
interval is printed, drawn on the HTML timeline (checked in headless Chromium) and cut out with --clip."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import av
import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr.infer.profiles import LVR_PROFILE
from lvr.infer.protocol import Breach, answer_limit, format_interval, interval_correction
from lvr.prep.clips import write_span_clip
from lvr.prep.probe import VideoError, probe_video
from lvr_test_helpers import caption_text, chromium_or_skip, open_in_chromium, run_lvr
from synthetic_media import ffmpeg, frame_number_filter, make_frame_number_video, read_frame_number

FPS = 10
QUERY = "the counter passes forty"
ANSWER = (4.0, 7.5)                       # frames 40..74 of a 10 fps video
PREDICTED = (143, 209, 158)               # .span.predicted background in the page's CSS
HIGH = (211, 226, 244)                    # .node.level-high background: the timeline's full width


def navigator(*answers: str):
    """A scripted endpoint: the navigator reads (2, 1), then gives each answer in turn; the
    captioner names each clip's level and span."""
    script = ["<think>The counter passes forty in the second high clip.</think><tool>get_caption((2, 1))</tool>",
              *(f"<think>It is there.</think><answer>{a}</answer>" for a in answers)]

    def reply(body: dict) -> str:
        if body["model"] == "captioner":
            return f"<caption>{caption_text(body)}</caption>"
        turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
        return script[min(turns, len(script) - 1)]

    return reply


def ground(server: FakeOpenAI, video: Path, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    return run_lvr("ground", video, QUERY, "--base-url", server.url, "--model", "navigator",
                   "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", *args)


def video_frames(path: Path) -> list[int]:
    """The numbers drawn in a video's frames, in display order."""
    with av.open(str(path)) as c:
        return [read_frame_number(f.to_image()) for f in c.decode(video=0)]


def ffprobe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_type",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def silent_video(tmp_path_factory) -> Path:
    """12 s at 10 fps, frame N shows N, no audio."""
    return make_frame_number_video(tmp_path_factory.mktemp("ground") / "silent.mp4", width=128, fps=FPS, duration=12)


@pytest.fixture(scope="module")
def grounded(numbered_video, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    """One `lvr ground` run on the numbered video (12 s, 10 fps, with audio) with every output asked
    for: (the process, its folder, the navigator's requests)."""
    out = tmp_path_factory.mktemp("grounded")
    with FakeOpenAI(navigator(format_interval(*ANSWER)), models=("navigator", "captioner")) as server:
        proc = ground(server, numbered_video, out, "--trace", out / "t.jsonl", "-o", out / "answer.jsonl",
                      "--html", out / "t.html", "--clip", out / "clip.mp4")
        requests = [b for b in server.requests if b["model"] == "navigator"]
    return proc, out, requests


def test_ground_end_to_end(grounded):
    proc, out, requests = grounded
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[4, 7.5]\n"

    # The navigator was told it is a grounding query, and the same tools served it.
    system, first = requests[0]["messages"][0]["content"], requests[0]["messages"][1]["content"]
    assert system.endswith(LVR_PROFILE.grounding_note)
    assert first.startswith(LVR_PROFILE.grounding_question.format(question=QUERY)) and "Options" not in first
    assert requests[1]["messages"][-1]["content"].startswith("get_caption: caption of medium clip (2, 1)")

    trace = json.loads((out / "t.jsonl").read_text())
    assert trace["task"] == "grounding" and trace["stopped"] == "answered"
    assert trace["answer"]["interval"] == list(ANSWER)
    record = json.loads((out / "answer.jsonl").read_text())
    assert record["schema"] == "lvr.answer/1" and record["task"] == "grounding"
    assert record["interval"] == list(ANSWER) and record["question"] == QUERY
    assert record["clip"] == {"path": str(out / "clip.mp4"), "start": 4.0, "end": 7.5, "duration": 3.5}

    # stderr: the summary with the span in clock time, then the clip.
    assert "lvr ground: span 00:04.0-00:07.5 (3.5 s); 2 rounds (0 invalid) with 1 get_caption" in proc.stderr
    assert f"lvr ground: clip {out / 'clip.mp4'}: 3.50 s (00:04.0-00:07.5)." in proc.stderr

    # The clip holds exactly the span's frames, with the video's audio, and lasts end - start.
    clip = out / "clip.mp4"
    assert video_frames(clip) == list(range(40, 75))
    probed = ffprobe(clip)
    assert float(probed["format"]["duration"]) == pytest.approx(3.5, abs=2 / FPS)
    assert sorted(s["codec_type"] for s in probed["streams"]) == ["audio", "video"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_ground_html_page_in_headless_chromium(grounded):
    """The page --html writes, opened offline in a real browser, shows the answered span where it is."""
    exe = chromium_or_skip()
    proc, out, _ = grounded
    assert proc.returncode == 0, proc.stderr
    shot = out / "page.png"
    page = open_in_chromium(exe, out / "t.html", out, screenshot=shot)
    assert next(a for t, a in page.tags if t == "body").get("data-ready") == "1"
    (band,) = [a for t, a in page.tags if a.get("id") == "span-predicted"]
    assert band["class"] == "span predicted" and (band["data-start"], band["data-end"]) == ("4.0", "7.5")
    assert band["style"] == f"left:{100 * 4 / 12:.4f}%;width:{100 * 3.5 / 12:.4f}%"
    assert "0:04.0–0:07.5" in band["title"]
    assert not [a for t, a in page.tags if "target" in a.get("class", "").split()]

    # Drawn: the band's pixels span 4/12 .. 7.5/12 of the timeline's width (the high row's pixels).
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
    x0, x1 = colour_extent(rgb, HIGH)
    b0, b1 = colour_extent(rgb, PREDICTED)
    width = x1 - x0
    assert width > 800, (x0, x1)
    assert abs(b0 - (x0 + width * 4 / 12)) <= 4 and abs(b1 - (x0 + width * 7.5 / 12)) <= 4, (x0, x1, b0, b1)


def colour_extent(image: Image.Image, rgb: tuple[int, int, int], tol: int = 6) -> tuple[int, int]:
    """The leftmost and rightmost x of a colour, over the image rows where it fills a wide stretch
    (a legend swatch of the same colour is too narrow to count)."""
    w, h = image.size
    px = image.load()
    xs: list[int] = []
    for y in range(h):
        row = [x for x in range(w) if all(abs(a - b) <= tol for a, b in zip(px[x, y], rgb))]
        if len(row) > 100:
            xs += (row[0], row[-1])
    assert xs, f"no wide stretch of {rgb} in the screenshot"
    return min(xs), max(xs)


def test_a_reversed_interval_is_corrected_then_cut_from_a_silent_video(silent_video, tmp_path):
    with FakeOpenAI(navigator("[7.5, 4.0]", "[4.0, 7.5]"), models=("navigator", "captioner")) as server:
        proc = ground(server, silent_video, tmp_path, "--trace", tmp_path / "t.jsonl", "--clip",
                      tmp_path / "out" / "clip.mp4", "-q")
        requests = [b for b in server.requests if b["model"] == "navigator"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[4, 7.5]\n" and proc.stderr == ""
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert [t["action"]["error"] for t in trace["turns"]] == [None, Breach.REVERSED_INTERVAL, None]
    assert requests[2]["messages"][-1]["content"] == interval_correction(
        Breach.REVERSED_INTERVAL, "[7.5, 4.0]", answer_limit(trace["video"]["duration"]))
    clip = tmp_path / "out" / "clip.mp4"
    assert video_frames(clip) == list(range(40, 75))
    assert [s["codec_type"] for s in ffprobe(clip)["streams"]] == ["video"]


def test_a_point_interval_answers_but_cuts_nothing(silent_video, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with FakeOpenAI(navigator("[5, 5]"), models=("navigator", "captioner")) as server:
        proc = ground(server, silent_video, tmp_path, "--clip", out / "clip.mp4", "-q")
    assert proc.returncode == 1
    assert proc.stdout == "[5, 5]\n"
    lines = proc.stderr.splitlines()
    assert lines == [f"lvr ground: error: {out / 'clip.mp4'}: the answer [5, 5] is a single point in time, "
                     "not a span; no clip was written"]
    assert list(out.iterdir()) == []


def test_clip_may_not_overwrite_the_video(silent_video, tmp_path):
    video = tmp_path / "v.mp4"
    shutil.copy(silent_video, video)
    proc = run_lvr("ground", video, QUERY, "--model", "navigator", "--base-url", "http://127.0.0.1:9/v1",
                   "--clip", video)
    assert proc.returncode == 2 and "would overwrite the video itself" in proc.stderr
    assert video.read_bytes() == silent_video.read_bytes()


def test_ground_help_shows_examples():
    proc = run_lvr("ground", "--help")
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "lvr ground lecture.mp4" in proc.stdout


# -- the span cut itself ------------------------------------------------------------------

@pytest.fixture(scope="module")
def offset_ts(tmp_path_factory) -> Path:
    """MPEG-TS (no index: a seek may land a keyframe late) whose audio starts 0.5 s before the
    first frame; keyframes every 2.5 s; frame N shows N."""
    path = tmp_path_factory.mktemp("ground_ts") / "offset.ts"
    ffmpeg("-itsoffset", "0.5", "-f", "lavfi", "-i", frame_number_filter(128, FPS, 12),
           "-f", "lavfi", "-i", "sine=frequency=440:duration=13", "-map", "0:v", "-map", "1:a",
           "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))
    return path


@pytest.mark.parametrize("span, frames", [((4.0, 7.5), range(40, 75)), ((0.0, 3.0), range(0, 30)),
                                          ((9.95, 12.0), range(100, 120)), ((3.33, 3.41), range(34, 35))])
def test_span_clip_holds_the_frames_that_start_in_the_span(offset_ts, tmp_path, span, frames):
    info = probe_video(offset_ts)
    out = tmp_path / "clip.mp4"
    covered = write_span_clip(info, *span, out)
    assert covered == pytest.approx((frames[0] / FPS, (frames[-1] + 1) / FPS))
    assert video_frames(out) == list(frames)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_span_clip_failures_are_one_line_and_leave_nothing(offset_ts, tmp_path):
    src = tmp_path / "victim.ts"
    shutil.copy(offset_ts, src)
    info = probe_video(src)
    out = tmp_path / "out"
    with pytest.raises(VideoError, match="no frame starts between 4.01 s and 4.05 s"):
        write_span_clip(info, 4.01, 4.05, out / "clip.mp4")
    src.write_bytes(b"this is no longer a video" * 100)
    with pytest.raises(VideoError) as err:
        write_span_clip(info, 4.0, 7.5, out / "clip.mp4")
    assert "ffmpeg failed" in str(err.value) and "\n" not in str(err.value)
    assert list(out.iterdir()) == []

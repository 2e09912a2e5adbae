#!/usr/bin/env python3
"""Benchmark `lvr ask` on a fresh long video: time to the first reasoning request, and in all.

For each test video (720p H.264, 25 fps; one with a keyframe every 2 s, as streaming
encoders make, one with x264's default GOP of 250 frames, as most downloaded films and
shows have), these are timed one after the other in the same run:

* bare        -- ``ffmpeg -v error -threads 0 -i VIDEO -f null -``: a full decode and nothing else;
* segment     -- ``lvr segment VIDEO --qa-frames``: every frame the tree could need, which is
                 what `ask` decoded before answering until lazy frames came;
* ask exact   -- ``lvr ask --frame-sampling exact``, empty cache;
* ask keyframe -- ``lvr ask`` (its default, keyframe sampling), empty cache.

`ask` runs as a real subprocess (interpreter start and imports included) against a
local OpenAI-compatible server that answers at once: the navigator script reads the
K high captions, fetches a medium and a low caption, asks video_qa once, and answers.
"first request" is when the server receives the navigator's first request, counted
from the launch of `lvr ask`; "total" is the process's wall time.

Targets (issue 17), on a 1-hour video, for both GOPs, in ask's default mode:
first request <= 15 s and <= 0.15x the bare decode; total <= 20 s; 10-minute video:
first request <= 3 s.

The 10-minute videos are encoded once with ffmpeg (testsrc2, CRF 23, veryfast) and
the longer ones are made from them by stream-copy concatenation; all are cached in
bench/.data/ (git-ignored). Generating them takes ~5 minutes on 2 cores.

    .venv/bin/python bench/ask_cold_start.py                        # 10, 60 and 120 minutes
    .venv/bin/python bench/ask_cold_start.py --minutes 60 --skip-segment
    .venv/bin/python bench/ask_cold_start.py --video film.mkv --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / ".data"
TESTS_DIR = BENCH_DIR.parent / "tests"
PIECE_MINUTES = 10
GOPS = {"gop2s": ["-g", "50", "-keyint_min", "50", "-sc_threshold", "0"],   # a keyframe every 2 s
        "gop250": []}                                                      # x264's defaults: keyint 250
NAVIGATOR_SCRIPT = [
    "<think>The second clip looks right.</think><tool>get_caption((2, 3))</tool>",
    "<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>",
    '<think>Check the frames.</think><tool>video_qa((2, 3, 1), "What is on screen?")</tool>',
    "<think>Enough.</think><answer>B</answer>",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- inputs --------------------------------------------------------------------------

def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True)


def test_video(gop: str, minutes: int) -> Path:
    """bench/.data/ask_720p_<gop>_<minutes>min.mp4, made once (atomically: temp name, then rename)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    ignore = DATA_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark inputs\n*\n")
    path = DATA_DIR / f"ask_720p_{gop}_{minutes}min.mp4"
    if path.exists():
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
    try:
        if minutes == PIECE_MINUTES:
            log(f"encoding {path.name} (once)")
            ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=25:duration={minutes * 60}",
                   "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", *GOPS[gop], "-pix_fmt", "yuv420p",
                   str(tmp))
        else:
            if minutes % PIECE_MINUTES:
                raise SystemExit(f"--minutes must be a multiple of {PIECE_MINUTES}")
            piece = test_video(gop, PIECE_MINUTES)
            listing = tmp.with_suffix(".txt")
            listing.write_text(f"file '{piece.name}'\n" * (minutes // PIECE_MINUTES))
            log(f"joining {minutes // PIECE_MINUTES} copies of {piece.name} into {path.name}")
            try:
                ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(tmp))
            finally:
                listing.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def warm_page_cache(path: Path) -> None:
    """Read the file once, so no method pays for the first cold read (a freshly downloaded file is warm too)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# -- the methods -----------------------------------------------------------------------

def lvr_command() -> list[str]:
    return [sys.executable, "-m", "lvr.cli"]


def bare_decode(video: Path) -> float:
    t0 = time.perf_counter()
    ffmpeg("-threads", "0", "-i", str(video), "-f", "null", "-")
    return time.perf_counter() - t0


def segment_everything(video: Path, workdir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([*lvr_command(), "segment", str(video), "--qa-frames", "-q", "-o", str(workdir / "nodes.jsonl"),
                    "--cache-dir", str(workdir / "segment-cache")], check=True, capture_output=True)
    return time.perf_counter() - t0


class Server:
    """The OpenAI-compatible test server of tests/fake_openai.py, answering at once; it notes when
    the navigator's first request arrives."""

    def __init__(self):
        sys.path.insert(0, str(TESTS_DIR))
        from fake_openai import FakeOpenAI

        self.first_request: float | None = None
        self._lock = threading.Lock()
        self.fake = FakeOpenAI(self.reply, models=("navigator", "captioner", "qa"))

    def reply(self, body: dict) -> str:
        if body["model"] == "captioner":
            return "<caption>A test pattern: coloured bars, a gradient and a running clock.</caption>"
        if body["model"] == "qa":
            return "A test pattern with a clock."
        with self._lock:
            if self.first_request is None:
                self.first_request = time.perf_counter()
        turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
        return NAVIGATOR_SCRIPT[min(turns, len(NAVIGATOR_SCRIPT) - 1)]

    def __enter__(self) -> "Server":
        self.fake.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.fake.__exit__(*exc)


def ask(video: Path, sampling: str, workdir: Path) -> dict:
    """One `lvr ask` with an empty cache: seconds to the first reasoning request and in all."""
    cache = workdir / f"ask-cache-{sampling}"
    shutil.rmtree(cache, ignore_errors=True)
    with Server() as server:
        url = server.fake.url
        t0 = time.perf_counter()
        proc = subprocess.run([*lvr_command(), "ask", str(video), "What is on screen?", "-O", "A. a cat",
                               "-O", "B. a test pattern", "--base-url", url, "--model", "navigator",
                               "--caption-model", "captioner", "--qa-model", "qa", "--frame-sampling", sampling,
                               "--cache-dir", str(cache), "--trace", str(workdir / f"trace-{sampling}.jsonl"),
                               "-q"], capture_output=True, text=True)
        total = time.perf_counter() - t0
        first = None if server.first_request is None else server.first_request - t0
    if proc.returncode != 0 or proc.stdout.strip() != "B. a test pattern":
        raise SystemExit(f"lvr ask failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    trace = json.loads((workdir / f"trace-{sampling}.jsonl").read_text().splitlines()[0])
    frames = sum(1 for _ in (cache / "frames").rglob("*.jpg"))
    shutil.rmtree(cache, ignore_errors=True)
    return {"first_request_s": round(first, 2), "total_s": round(total, 2), "frames_stored": frames,
            "first_request_in_process_s": trace["accounting"].get("first_request_seconds")}


# -- the run -------------------------------------------------------------------------

def measure(video: Path, label: str, skip_segment: bool, modes: list[str]) -> dict:
    warm_page_cache(video)
    row: dict = {"video": label, "file": video.name}
    with tempfile.TemporaryDirectory(prefix="lvr-ask-bench-") as tmp:
        workdir = Path(tmp)
        log(f"{label}: bare decode")
        row["bare_s"] = round(bare_decode(video), 2)
        if not skip_segment:
            log(f"{label}: lvr segment (every frame)")
            row["segment_s"] = round(segment_everything(video, workdir), 2)
        for mode in modes:
            log(f"{label}: lvr ask --frame-sampling {mode}")
            row[mode] = ask(video, mode, workdir)
    return row


def table(rows: list[dict], modes: list[str]) -> str:
    head = ["video", "bare s", "segment s"]
    for mode in modes:
        head += [f"{mode}: first s", f"{mode}: total s", f"{mode}: first/bare"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["video"], f"{r['bare_s']:.1f}", f"{r['segment_s']:.1f}" if "segment_s" in r else "-"]
        for mode in modes:
            m = r[mode]
            cells += [f"{m['first_request_s']:.1f}", f"{m['total_s']:.1f}", f"{m['first_request_s'] / r['bare_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=int, action="append",
                    help="video length (multiple of 10; repeat). Default: 10, 60 and 120.")
    ap.add_argument("--gop", choices=sorted(GOPS), action="append", help="test video GOP (repeat). Default: both.")
    ap.add_argument("--video", type=Path, help="time this video instead of the generated ones")
    ap.add_argument("--modes", default="exact,keyframe", help="ask's --frame-sampling values to time")
    ap.add_argument("--skip-segment", action="store_true", help="do not time `lvr segment` (the old path)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]

    rows = []
    if args.video:
        rows.append(measure(args.video, args.video.name, args.skip_segment, modes))
    else:
        for minutes in args.minutes or [10, 60, 120]:
            for gop in args.gop or sorted(GOPS, reverse=True):
                rows.append(measure(test_video(gop, minutes), f"{minutes} min, {gop}", args.skip_segment, modes))
    print(f"# lvr ask on a fresh video ({platform.node()}, {os.cpu_count()} cores, python {platform.python_version()})")
    print(table(rows, modes))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

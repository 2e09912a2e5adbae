#!/usr/bin/env python3
"""Benchmark `lvr transcribe`: audio extraction against a bare ffmpeg, and the in-process backend.

Extraction of a 1-hour video's audio (16 kHz mono float32, the whole track), timed in the same
run, one after the other (best of --repeat, interleaved):

* ours  -- ``read_audio`` + ``audio_windows``: one ffmpeg process (with the timeline-keeping
           ``aresample=async=1:first_pts=0``) piped into this process, cut into the 30 s windows
           with 5 s overlap that the model hears (each window copied out);
* pyav  -- the same audio decoded and resampled in this process with PyAV (the alternative
           lvr measured and did not take; --skip-pyav leaves it out);
* bare  -- ``ffmpeg -v error -i VIDEO -vn -ac 1 -ar 16000 -f f32le -y /dev/null``: the decode and
           resample alone, written nowhere.

Target: ours / bare <= 1.2. Peak memory of the run is printed too (it stays flat: one block
and one window at a time).

Then the in-process backend's throughput: the first --asr-minutes of the same audio transcribed
through `Transcriber` (VAD off, so every window is heard), in audio seconds per second. The
model is --model (a local Whisper folder or a cached Hugging Face id), else the tiny random
Whisper of the tests (tests/tiny_whisper.py), which measures lvr's own cost around a model
rather than Whisper's.

The 1-hour video is bench/.data/ask_720p_gop250_60min.mp4 (made by bench/ask_cold_start.py; it
has no sound) with a speech track muxed on (flite speech, looped, AAC 48 kHz stereo, video
stream-copied), cached as bench/.data/transcribe_720p_60min.mp4. Without that video, a 1-hour
grey 160x90 one is generated instead.

    .venv/bin/python bench/transcribe.py                        # 1-hour video, tiny model, 5 minutes of ASR
    .venv/bin/python bench/transcribe.py --repeat 3 --json bench/out.json --check
    .venv/bin/python bench/transcribe.py --model ~/models/whisper-small --device cuda --asr-minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / ".data"
SILENT_HOUR = DATA_DIR / "ask_720p_gop250_60min.mp4"
VIDEO = DATA_DIR / "transcribe_720p_60min.mp4"
TARGET_OVERHEAD = 1.2     # ours / bare must be at most this
SPEECH = ("Good evening and welcome. Tonight we look at the river, the bridge and the old market. "
          "The weather stays dry until Thursday, then rain moves in from the west.")

sys.path.insert(0, str(BENCH_DIR.parent / "tests"))  # the tiny Whisper of the tests


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def make_video(path: Path, seconds: int) -> None:
    """The silent 1-hour video with a looped speech track muxed on (video stream-copied)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        speech = Path(tmp) / "speech.wav"
        ffmpeg("-f", "lavfi", "-i", f"flite=text='{SPEECH}':voice=slt", "-af", "apad=pad_dur=2",
               "-ar", "48000", "-ac", "2", str(speech))
        partial = path.with_name(f".{path.name}.tmp.mp4")
        if SILENT_HOUR.exists() and seconds == 3600:
            video = ["-i", str(SILENT_HOUR)]
        else:
            video = ["-f", "lavfi", "-i", f"color=c=gray:s=160x90:r=10:d={seconds}"]
        ffmpeg(*video, "-stream_loop", "-1", "-i", str(speech), "-map", "0:v", "-map", "1:a", "-c:v",
               "copy" if video[0] == "-i" else "libx264", "-c:a", "aac", "-b:a", "96k", "-t", str(seconds),
               str(partial))
        partial.replace(path)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def run_ours(video: Path) -> dict:
    from lvr.prep.audio import audio_stream, audio_windows, read_audio

    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stream = audio_stream(video)
    windows, seconds = 0, 0.0
    for window in audio_windows(read_audio(video, stream), 30.0, 5.0):
        windows += 1
        seconds = window.end
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"s": time.perf_counter() - t0, "audio_s": seconds, "windows": windows,
            "ffmpeg_cpu_s": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)}


def run_pyav(video: Path) -> dict:
    import av

    t0 = time.perf_counter()
    samples = 0
    with av.open(str(video)) as container:
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        for packet in container.demux(stream):
            for frame in packet.decode():
                for out in resampler.resample(frame):
                    samples += out.to_ndarray().shape[-1]
        for out in resampler.resample(None):
            samples += out.to_ndarray().shape[-1]
    return {"s": time.perf_counter() - t0, "audio_s": samples / 16000}


def run_bare(video: Path) -> dict:
    t0 = time.perf_counter()
    ffmpeg("-i", str(video), "-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", os.devnull)
    return {"s": time.perf_counter() - t0}


def run_asr(video: Path, model: str, device: str, minutes: float, batch: int) -> dict:
    from lvr.prep.models import ModelSpec
    from lvr.prep.transcribe import TranscribeOptions, Transcriber

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.m4a"
        ffmpeg("-i", str(video), "-t", str(minutes * 60), "-vn", "-c:a", "copy", str(clip))
        spec = ModelSpec(backend="transformers", model=model, device=device)
        options = TranscribeOptions(vad="none", asr_batch_size=batch, language="en")

        async def go() -> tuple[dict, float, float]:
            transcriber = Transcriber(spec, options, Path(tmp) / "cache")
            t_load = time.perf_counter()
            await transcriber.loaded_model()
            loaded = time.perf_counter() - t_load
            t0 = time.perf_counter()
            record = (await transcriber.transcript(clip)).record
            await transcriber.aclose()
            return record, loaded, time.perf_counter() - t0

        record, loaded, seconds = asyncio.run(go())
    return {"model": model, "device": device, "batch": batch, "load_s": loaded, "s": seconds,
            "audio_s": record["duration"], "windows": record["windows"]["heard"],
            "segments": len(record["segments"]), "audio_s_per_s": record["duration"] / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, default=None, help="a video with sound (default: the 1-hour one)")
    ap.add_argument("--repeat", type=int, default=1, help="best of N extraction runs, methods interleaved")
    ap.add_argument("--skip-pyav", action="store_true", help="leave out the PyAV extraction")
    ap.add_argument("--model", default=None, help="Whisper model for the throughput run (default: tiny random)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--asr-minutes", type=float, default=5.0, help="minutes of audio to transcribe")
    ap.add_argument("--asr-batch-size", type=int, default=8)
    ap.add_argument("--skip-asr", action="store_true")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures here")
    ap.add_argument("--check", action="store_true", help=f"exit 1 when ours / bare > {TARGET_OVERHEAD}")
    args = ap.parse_args(argv)

    video = args.video or VIDEO
    if args.video is None and not VIDEO.exists():
        log(f"making {VIDEO.name} (a speech track muxed onto the 1-hour video; once)")
        make_video(VIDEO, 3600)
    warm(video)
    runs: dict[str, list[dict]] = {"ours": [], "bare": [], "pyav": []}
    for i in range(args.repeat):
        for name, run in (("bare", run_bare), ("ours", run_ours), ("pyav", run_pyav)):
            if name == "pyav" and args.skip_pyav:
                continue
            log(f"run {i + 1}/{args.repeat}: {name}")
            runs[name].append(run(video))
    best = {name: min(r, key=lambda x: x["s"]) for name, r in runs.items() if r}
    ratio = best["ours"]["s"] / best["bare"]["s"]
    result = {"video": str(video), "machine": platform.platform(), "cpus": os.cpu_count(),
              "extraction": best, "ours_over_bare": ratio, "target": TARGET_OVERHEAD, "ok": ratio <= TARGET_OVERHEAD,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}

    print(f"audio extraction, {best['ours']['audio_s'] / 60:.1f} min of audio ({video.name}), best of {args.repeat}:")
    for name in ("bare", "ours", "pyav"):
        if name in best:
            print(f"  {name:5s} {best[name]['s']:7.2f} s  {best[name]['s'] / best['bare']['s']:5.2f}x bare")
    print(f"  ours / bare = {ratio:.2f} (target <= {TARGET_OVERHEAD}): {'ok' if result['ok'] else 'MISSED'}; "
          f"{best['ours']['windows']} windows; peak RSS of this process {result['peak_rss_mb']} MB")

    if not args.skip_asr:
        model = args.model
        if model is None:
            from tiny_whisper import build_tiny_whisper

            model = str(DATA_DIR / "tiny-whisper")
            if not (Path(model) / "config.json").exists():
                build_tiny_whisper(model)
        asr = run_asr(video, model, args.device, args.asr_minutes, args.asr_batch_size)
        result["asr"] = asr
        print(f"in-process transcription ({asr['model']}, {asr['device']}, batch {asr['batch']}): "
              f"{asr['audio_s']:.0f} s of audio in {asr['s']:.1f} s = {asr['audio_s_per_s']:.1f} audio-s/s "
              f"({asr['windows']} windows, {asr['segments']} segments; load {asr['load_s']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if args.check and not result["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())

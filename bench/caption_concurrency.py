#!/usr/bin/env python3
"""Benchmark `lvr caption` request concurrency against a slow OpenAI-compatible server.

A local fake server (tests/fake_openai.py) answers every /chat/completions
request after a fixed simulated latency (500 ms by default). It runs in its own
process, so the client's and the server's threads do not share one GIL.

The same N node records (the first N of a K=5 clip tree, 155 nodes: 5 high
nodes of 128 frames, 25 medium of 64 and the rest low nodes of 32) are
captioned twice through the real CLI, `python -m lvr.cli caption`: once with
`--concurrency 1` and once with `--concurrency C` (16 by default). Each run gets
an empty caption store of its own, so neither is served from the other's
cache; both share one frame store, filled once by `lvr segment` before any
timing starts.

With a server that takes L seconds per request and nothing else in the way,
concurrency 1 takes N*L and concurrency C about ceil(N/C)*L, a speed-up of
C for N a multiple of C. What the client adds per request (reading the frames,
base64 and JSON encoding, sending several MB, parsing the reply, writing the
record and the store) shows up as

    per-request overhead = (time at concurrency 1 - N*L) / N

and it must stay small beside L for the speed-up to reach the target:
concurrency C / concurrency 1 >= 10 (`--min-ratio`).

Times are the captioning time `lvr caption` reports on its summary line (node
records read to last record written; 0.1 s resolution). The whole process's
wall time (interpreter start and imports included) is printed as well.

    .venv/bin/python bench/caption_concurrency.py                      # 128 nodes, 0.5 s, concurrency 16
    .venv/bin/python bench/caption_concurrency.py --nodes 64 --latency 0.2 --json out.json
    .venv/bin/python bench/caption_concurrency.py --serve --latency 0.5   # only the server; prints its URL
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / ".data"
TESTS_DIR = REPO / "tests"

# The input video and tree: 10 min of 640x360 at 10 fps, K forced to 5 (5 + 25 + 125 nodes),
# so every low node has >= 32 frames to sample and every high node >= 128.
WIDTH, HEIGHT, FPS, DURATION, K = 640, 360, 10, 600, 5
DEFAULT_NODES, DEFAULT_LATENCY, DEFAULT_CONCURRENCY, DEFAULT_MIN_RATIO = 128, 0.5, 16, 10.0
REPLY = ("<caption>A test pattern fills the frame: coloured bars, a moving gradient and a "
         "running timestamp in the centre. Nothing else changes between frames.</caption>")
SUMMARY_RE = re.compile(r"lvr caption: (\d+) captioned, (\d+) from the store, (\d+) already in the output, "
                        r"(\d+) failed; (\d+) prompt \+ (\d+) completion tokens in (\d+) requests; "
                        r"([0-9.]+) s")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- the server (its own process) ----------------------------------------------------

def serve(latency_s: float) -> int:
    """Run the fake server until stdin closes. Prints its URL, then answers commands on stdin:
    `stats` prints one JSON line about the requests since the last `stats`, and forgets them."""
    sys.path.insert(0, str(TESTS_DIR))
    from fake_openai import FakeOpenAI

    with FakeOpenAI(reply=REPLY, latency_s=latency_s, models=["fake-captioner"]) as server:
        print(server.url, flush=True)
        for line in sys.stdin:
            if line.strip() != "stats":
                continue
            with server._lock:
                bodies, headers = list(server.requests), list(server.headers)
                max_active = server.max_active
                server.requests.clear()
                server.headers.clear()
                server.max_active = 0
            images = sum(1 for b in bodies for m in b.get("messages", [])
                         if isinstance(m.get("content"), list)
                         for p in m["content"] if p.get("type") == "image_url")
            sent = sum(int(h.get("content-length") or 0) for h in headers)
            print(json.dumps({"requests": len(bodies), "max_active": max_active, "images": images,
                              "bytes": sent}), flush=True)
    return 0


class ServerProcess:
    def __init__(self, latency_s: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(latency_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError("the fake server did not start")

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- inputs ------------------------------------------------------------------------

def lvr(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvr.cli", *map(str, args)], text=True,
                          capture_output=True, **kw)


def generate_video(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = DATA_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark inputs\n*\n")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    log(f"generating {path} ({DURATION} s of {WIDTH}x{HEIGHT}@{FPS}); this runs once")
    try:
        subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi",
                        "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}:duration={DURATION}",
                        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-g", str(FPS * 10),
                        "-pix_fmt", "yuv420p", str(tmp)], check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def segmented(workdir: Path) -> tuple[Path, Path]:
    """(node records, frame store) of the bench video, made once and kept under bench/.data/."""
    video = DATA_DIR / f"caption_{HEIGHT}p_{DURATION // 60}min.mp4"
    if not video.exists():
        generate_video(video)
    cache = DATA_DIR / f"caption_{HEIGHT}p_{DURATION // 60}min_K{K}"
    nodes = cache / "nodes.jsonl"
    if not nodes.exists() or not (cache / "frames").is_dir():
        log(f"lvr segment {video.name} (K={K}); this runs once")
        t0 = time.perf_counter()
        partial = cache / "nodes.partial.jsonl"
        partial.unlink(missing_ok=True)
        proc = lvr("segment", video, "-o", partial, "--cache-dir", cache, "-q",
                   "--min-width", K, "--max-width", K)
        if proc.returncode != 0:
            raise SystemExit(f"lvr segment failed:\n{proc.stderr}")
        os.replace(partial, nodes)
        log(f"  segmented in {time.perf_counter() - t0:.1f} s")
    return nodes, cache / "frames"


def warm(frames: Path) -> int:
    """Read every stored frame once, so neither run pays for cold reads. Returns bytes read."""
    total = 0
    for p in frames.rglob("*"):
        if p.is_file():
            total += len(p.read_bytes())
    return total


# -- one timed run ---------------------------------------------------------------------

def caption_run(nodes: Path, frames: Path, server: ServerProcess, concurrency: int, workdir: Path,
                latency_s: float) -> dict:
    cache = workdir / f"cache-c{concurrency}"
    cache.mkdir()
    (cache / "frames").symlink_to(frames.resolve(), target_is_directory=True)  # shared frames, own caption store
    out = workdir / f"captions-c{concurrency}.jsonl"
    timeout = max(600.0, 4 * latency_s * sum(1 for _ in nodes.open()) + 120)
    t0 = time.perf_counter()
    proc = lvr("caption", nodes, "-o", out, "--cache-dir", cache, "--base-url", server.url,
               "--model", "fake-captioner", "--concurrency", concurrency, "--timeout", 60, "-q",
               timeout=timeout)
    wall = time.perf_counter() - t0
    stats = server.stats()
    match = SUMMARY_RE.search(proc.stderr)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"lvr caption --concurrency {concurrency} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    made, cached, skipped, failed, ptok, ctok, requests, seconds = match.groups()
    return {"concurrency": concurrency, "caption_s": float(seconds), "process_wall_s": wall,
            "captioned": int(made), "from_store": int(cached), "failed": int(failed),
            "requests": int(requests), "server": stats,
            "records": sum(1 for _ in out.open())}


# -- main -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time `lvr caption --concurrency 1` against `--concurrency C` "
                                             "on a local server with simulated latency.")
    ap.add_argument("--nodes", type=int, default=DEFAULT_NODES, help=f"nodes to caption (default {DEFAULT_NODES}, "
                    f"at most {K + K * K + K ** 3})")
    ap.add_argument("--latency", type=float, default=DEFAULT_LATENCY,
                    help=f"simulated seconds per request (default {DEFAULT_LATENCY})")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                    help=f"concurrency to compare with 1 (default {DEFAULT_CONCURRENCY})")
    ap.add_argument("--min-ratio", type=float, default=DEFAULT_MIN_RATIO,
                    help=f"exit 1 when time(1) / time(C) is below this (default {DEFAULT_MIN_RATIO})")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.latency)
    if not 1 <= args.nodes <= K + K * K + K ** 3:
        ap.error(f"--nodes must be between 1 and {K + K * K + K ** 3}")
    if args.concurrency < 1 or args.latency < 0:
        ap.error("--concurrency must be at least 1 and --latency not negative")
    if shutil.which("ffmpeg") is None:
        ap.error("ffmpeg is not on PATH")

    workdir = Path(tempfile.mkdtemp(prefix="lvr-bench-caption-"))
    try:
        all_nodes, frames = segmented(workdir)
        nodes = workdir / "nodes.jsonl"
        lines = all_nodes.read_text().splitlines()[: args.nodes]
        nodes.write_text("\n".join(lines) + "\n")
        levels = {}
        for line in lines:
            rec = json.loads(line)
            levels.setdefault(rec["level"], []).append(len(rec["frame_keys"]))
        log(f"{len(lines)} nodes: " + ", ".join(f"{len(v)} {lv} ({min(v)}-{max(v)} frames)"
                                              for lv, v in levels.items()))
        warmed = warm(frames)
        load_before = [round(x, 2) for x in os.getloadavg()]
        with ServerProcess(args.latency) as server:
            log(f"fake server at {server.url}, {args.latency * 1000:.0f} ms per request, own process")
            runs = []
            for c in (args.concurrency, 1):
                log(f"lvr caption --concurrency {c} ({len(lines)} nodes)")
                runs.append(caption_run(nodes, frames, server, c, workdir, args.latency))
                r = runs[-1]
                log(f"  {r['caption_s']:.1f} s captioning, {r['process_wall_s']:.1f} s process; "
                    f"{r['server']['requests']} requests, at most {r['server']['max_active']} at once")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    high, one = runs
    n, lat = len(lines), args.latency
    ratio = one["caption_s"] / high["caption_s"]
    wall_ratio = one["process_wall_s"] / high["process_wall_s"]
    overhead_1 = (one["caption_s"] - n * lat) / n
    ideal_c = math.ceil(n / args.concurrency) * lat
    ok_counts = all(r["captioned"] == r["requests"] == r["server"]["requests"] == r["records"] == n
                    and r["failed"] == 0 for r in runs)
    result = {
        "nodes": n, "latency_s": lat, "concurrency": args.concurrency, "levels": {k: len(v) for k, v in levels.items()},
        "images": one["server"]["images"], "mb_sent_per_run": one["server"]["bytes"] / 1e6,
        "runs": runs,
        "ratio": ratio, "process_wall_ratio": wall_ratio, "ideal_ratio": n * lat / ideal_c if ideal_c else None,
        "overhead_per_request_s": overhead_1,
        "overhead_per_request_c_s": (high["caption_s"] - ideal_c) / math.ceil(n / args.concurrency),
        "min_ratio": args.min_ratio, "ok": ratio >= args.min_ratio and ok_counts, "counts_ok": ok_counts,
        "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "frame_store_mb": warmed / 1e6},
    }

    print()
    print(f"nodes     : {n} ({', '.join(f'{v} {k}' for k, v in result['levels'].items())}), "
          f"{result['images']} images, {result['mb_sent_per_run']:.0f} MB of requests per run")
    print(f"server    : fake OpenAI, {lat * 1000:.0f} ms per request, own process "
          f"(ideal: {n * lat:.1f} s at concurrency 1, {ideal_c:.1f} s at {args.concurrency})")
    print(f"machine   : {result['machine']['cpus']} CPUs, load before {load_before}")
    print()
    head = f"{'concurrency':>11}{'caption s':>11}{'process s':>11}{'requests':>10}{'max in flight':>15}"
    print(head)
    print("-" * len(head))
    for r in (one, high):
        print(f"{r['concurrency']:>11}{r['caption_s']:>11.1f}{r['process_wall_s']:>11.1f}"
              f"{r['server']['requests']:>10}{r['server']['max_active']:>15}")
    print()
    print(f"speed-up  : {ratio:.1f}x captioning time, {wall_ratio:.1f}x process wall "
          f"(ideal {result['ideal_ratio']:.1f}x; target >= {args.min_ratio:g}x)  "
          f"{'PASS' if result['ok'] else 'FAIL'}")
    print(f"overhead  : {overhead_1 * 1000:.0f} ms per request at concurrency 1 "
          f"(= ({one['caption_s']:.1f} s - {n} x {lat:g} s) / {n}); "
          f"{result['overhead_per_request_c_s'] * 1000:.0f} ms per wave of {args.concurrency} at concurrency "
          f"{args.concurrency}")
    if not ok_counts:
        print("counts    : FAIL (a run did not caption every node with exactly one request)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"figures written to {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

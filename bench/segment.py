#!/usr/bin/env python3
"""Benchmark `lvr segment` frame extraction.

Three ways of getting the frames a clip tree needs out of one video are timed
in the same process, one after the other, each into a fresh temporary frame
store that is deleted afterwards:

* ours      -- the library path: ``probe_video`` + ``build_tree`` +
               ``plan_requests`` + ``extract_frames`` (one decoding pass,
               non-reference frames skipped, JPEG encoding in a thread pool).
               Probe time is included.
* baseline  -- what the reference implementation does: every node of the tree
               (K + K² + K³ of them) separately opens the container, seeks to
               the node's first frame, decodes forward to the node's last
               sampled frame, and resizes + JPEG-encodes its sampled frames.
               Same frames, same sizes, same encoder (the library's own
               resize/encode routine), only the decoding strategy differs.
               The probe it needs is done once, outside its timing (this
               flatters the baseline slightly).
* bare      -- ``ffmpeg -v error -i VIDEO -f null -``: a full decode and
               nothing else, the floor for any one-pass approach.

Targets: baseline / ours >= 2.0 and ours / bare <= 1.5.

It then checks that ours and the baseline wrote the same set of frame keys and
that a sample of frames matches pixel for pixel (mean absolute difference).

The input video is generated once with ffmpeg (testsrc2, 1280x720, 30 fps,
H.264, a keyframe every 10 s) and cached under bench/.data/.

    .venv/bin/python bench/segment.py                      # 10-minute video
    .venv/bin/python bench/segment.py --duration 60        # quick check
    .venv/bin/python bench/segment.py --video clip.mp4 --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lvr.prep import frames as lvr_frames
from lvr.prep import segment as lvr_segment
from lvr.prep.probe import VideoInfo, probe_video

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / ".data"
WIDTH, HEIGHT, FPS, GOP_SECONDS = 1280, 720, 30, 10
TARGET_SPEEDUP = 2.0     # baseline / ours must be at least this
TARGET_OVERHEAD = 1.5    # ours / bare must be at most this
MAX_PIXEL_MAD = 2.0      # mean abs difference (0-255) allowed between ours and baseline


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- input video ---------------------------------------------------------------

def duration_label(seconds: int) -> str:
    return f"{seconds // 60}min" if seconds % 60 == 0 else f"{seconds}s"


def default_video_path(duration: int) -> Path:
    return DATA_DIR / f"bench_{HEIGHT}p_{duration_label(duration)}.mp4"


def generate_video(path: Path, duration: int) -> None:
    """Write the synthetic test video (atomically: temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent == DATA_DIR:
        ignore = DATA_DIR / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# generated benchmark inputs\n*\n")
    gop = FPS * GOP_SECONDS
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}:duration={duration}",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
           "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
           "-pix_fmt", "yuv420p", str(tmp)]
    log(f"generating {path} ({duration} s of {WIDTH}x{HEIGHT}@{FPS}); this runs once")
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"generated in {time.perf_counter() - t0:.1f} s")


def warm_page_cache(path: Path) -> None:
    """Read the file once so no method pays for the first cold read."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# -- the three methods -----------------------------------------------------------

@dataclass
class Run:
    wall_s: float
    cpu_s: float
    frames_decoded: int
    frames_written: int
    extra: dict = field(default_factory=dict)


def run_ours(video: Path, store_root: Path, options: lvr_segment.SegmentOptions) -> Run:
    store = lvr_frames.FrameStore(store_root)
    c0, t0 = time.process_time(), time.perf_counter()
    info = probe_video(video)
    t_probe = time.perf_counter()
    tree = lvr_segment.build_tree(info, options.tree)
    requests = lvr_segment.plan_requests(info, tree, options)
    stats = lvr_frames.extract_frames(info, requests, store, quality=options.jpeg_quality)
    t1, c1 = time.perf_counter(), time.process_time()
    return Run(t1 - t0, c1 - c0, stats.frames_decoded, stats.written,
               {"probe_s": t_probe - t0, "requested": stats.requested})


def run_baseline(info: VideoInfo, tree, store_root: Path,
                 options: lvr_segment.SegmentOptions) -> Run:
    """Per-node decoding, as the reference implementation does it."""
    import av

    store = lvr_frames.FrameStore(store_root)
    pts_to_index = {int(p): i for i, p in enumerate(info.frame_pts)}
    decoded = written = seeks = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for node in tree.nodes():
        indices = tree.sampled_frames(node.id, options.tree)
        if not indices:
            continue
        side = lvr_frames.effective_side(info, options.tree.image_side(node.level))
        wanted = set(indices)
        last = max(indices)
        container = av.open(info.path)
        try:
            stream = next(s for s in container.streams.video if s.index == info.stream_index)
            stream.thread_type = "AUTO"
            start_pts = int(info.frame_pts[node.start_frame])
            container.seek(start_pts, stream=stream, backward=True)
            seeks += 1
            for frame in container.decode(stream):
                decoded += 1
                index = pts_to_index.get(frame.pts) if frame.pts is not None else None
                if index is None:
                    continue
                if index in wanted:
                    wanted.discard(index)
                    for s, data in lvr_frames.encode_frame(frame, info, [side], options.jpeg_quality):
                        store.put(lvr_frames.frame_key(info.video_id, index, s), data)
                        written += 1
                if not wanted or index >= last:
                    break
        finally:
            container.close()
        if wanted:
            raise RuntimeError(f"baseline: node {node.id} never decoded frames {sorted(wanted)[:5]}")
    t1, c1 = time.perf_counter(), time.process_time()
    return Run(t1 - t0, c1 - c0, decoded, written, {"seeks": seeks})


def run_bare(video: Path, n_frames: int) -> Run:
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-i", str(video), "-f", "null", "-"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Run(t1 - t0, cpu, n_frames, 0)


# -- correctness ---------------------------------------------------------------------

def store_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def compare_stores(ours: Path, base: Path, expected: set[str], samples: int) -> dict:
    from PIL import Image

    ka, kb = store_keys(ours), store_keys(base)
    common = sorted(ka & kb)
    identical = sum((ours / k).read_bytes() == (base / k).read_bytes() for k in common)
    picks = [common[int(i)] for i in np.unique(np.linspace(0, len(common) - 1, samples).round())] \
        if common and samples > 0 else []
    mads = []
    for k in picks:
        with Image.open(ours / k) as a, Image.open(base / k) as b:
            if a.size != b.size:
                mads.append(float("inf"))
                continue
            xa = np.asarray(a.convert("RGB"), dtype=np.int16)
            xb = np.asarray(b.convert("RGB"), dtype=np.int16)
            mads.append(float(np.abs(xa - xb).mean()))
    max_mad = max(mads) if mads else 0.0
    return {
        "ours_files": len(ka), "baseline_files": len(kb), "expected_files": len(expected),
        "same_keys": ka == kb, "ours_matches_plan": ka == expected,
        "only_ours": sorted(ka - kb)[:5], "only_baseline": sorted(kb - ka)[:5],
        "byte_identical": identical, "sampled": len(picks),
        "max_mean_abs_diff": max_mad, "pixels_match": max_mad <= MAX_PIXEL_MAD,
        "ok": ka == kb and ka == expected and max_mad <= MAX_PIXEL_MAD,
    }


# -- report ------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def print_report(result: dict) -> None:
    v = result["video"]
    m = result["methods"]
    print()
    print(f"video   : {result['video_path']}")
    print(f"          {v['width']}x{v['height']} {v['fps']:.3f} fps, {v['duration']:.1f} s, "
          f"{v['n_frames']} frames, {result['size_mb']:.1f} MB")
    print(f"tree    : K={result['K']}, {result['nodes']} nodes, "
          f"{result['frames_requested']} (frame, size) pairs requested "
          f"({result['distinct_frames']} distinct frames)")
    print(f"machine : {result['machine']['cpus']} CPUs, load before {result['machine']['load_before']}, "
          f"repeat={result['repeat']} (best of)")
    print()
    head = f"{'method':<22}{'wall s':>9}{'cpu s':>9}{'decoded':>10}{'written':>10}  runs (wall s)"
    print(head)
    print("-" * len(head))
    names = {"ours": "ours (lvr, one pass)", "baseline": "baseline (per-node)", "bare": "bare ffmpeg decode"}
    for key in ("ours", "baseline", "bare"):
        if key not in m:
            print(f"{names[key]:<22}{'skipped':>9}")
            continue
        b = m[key]["best"]
        runs = ", ".join(f"{w:.2f}" for w in m[key]["walls"])
        written = str(b["frames_written"]) if key != "bare" else "-"
        print(f"{names[key]:<22}{b['wall_s']:>9.2f}{b['cpu_s']:>9.2f}{b['frames_decoded']:>10}"
              f"{written:>10}  {runs}")
    if "ours" in m:
        print(f"  (ours includes probe: {m['ours']['best']['extra']['probe_s']:.2f} s)")
    print()
    r = result["ratios"]
    if r.get("baseline_over_ours") is not None:
        print(f"baseline / ours = {r['baseline_over_ours']:5.2f}   (target >= {TARGET_SPEEDUP})  "
              f"{verdict(r['speedup_ok'])}")
    else:
        print(f"baseline / ours =   n/a   (baseline skipped)")
    print(f"ours / bare     = {r['ours_over_bare']:5.2f}   (target <= {TARGET_OVERHEAD})  "
          f"{verdict(r['overhead_ok'])}")
    c = result.get("verify")
    if c:
        print()
        print(f"verify  : keys identical: {c['same_keys']} ({c['ours_files']} ours / "
              f"{c['baseline_files']} baseline / {c['expected_files']} planned); "
              f"byte-identical files: {c['byte_identical']}/{min(c['ours_files'], c['baseline_files'])}; "
              f"max mean |diff| over {c['sampled']} sampled frames: {c['max_mean_abs_diff']:.3f}  "
              f"{verdict(c['ok'])}")
        if c["only_ours"] or c["only_baseline"]:
            print(f"          only ours: {c['only_ours']}  only baseline: {c['only_baseline']}")


# -- main --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark lvr segment frame extraction against per-node decoding "
                    "(the reference implementation's strategy) and a bare ffmpeg decode.")
    ap.add_argument("--duration", type=int, default=600,
                    help="seconds of test video to generate (default 600; only used when "
                         "the video file does not exist yet)")
    ap.add_argument("--video", type=Path, default=None,
                    help="video to benchmark; generated there if missing "
                         "(default bench/.data/bench_720p_<duration>.mp4, e.g. bench_720p_10min.mp4)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per method; the best (minimum) wall time is reported (default 1)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not run the per-node baseline (it is the slowest)")
    ap.add_argument("--samples", type=int, default=12,
                    help="frames compared pixel by pixel between ours and the baseline (default 12)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the figures here")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a speed target is missed (a failed correctness check always does)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.duration < 1:
        ap.error("--duration must be at least 1")
    if shutil.which("ffmpeg") is None:
        ap.error("ffmpeg is not on PATH")

    video = (args.video or default_video_path(args.duration)).expanduser()
    if not video.exists():
        generate_video(video, args.duration)
    else:
        log(f"using existing {video}")
    warm_page_cache(video)

    options = lvr_segment.SegmentOptions()
    info = probe_video(video)
    tree = lvr_segment.build_tree(info, options.tree)
    requests = set(lvr_segment.plan_requests(info, tree, options))
    expected = {lvr_frames.frame_key(info.video_id, r.index, r.side) for r in requests}

    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[Run]] = {"bare": [], "ours": []}
    if not args.skip_baseline:
        runs["baseline"] = []
    keep: dict[str, Path] = {}      # first store of ours/baseline, kept for the comparison
    tmp_parent = tempfile.mkdtemp(prefix="lvr-bench-")
    try:
        for rep in range(1, args.repeat + 1):
            # Interleaved, so slow drift in machine load hits every method alike.
            log(f"round {rep}/{args.repeat}: bare ffmpeg decode")
            runs["bare"].append(run_bare(video, info.n_frames))
            log(f"  {runs['bare'][-1].wall_s:.2f} s")

            log(f"round {rep}/{args.repeat}: ours")
            root = Path(tempfile.mkdtemp(prefix="ours-", dir=tmp_parent))
            runs["ours"].append(run_ours(video, root, options))
            log(f"  {runs['ours'][-1].wall_s:.2f} s")
            if "ours" not in keep:
                keep["ours"] = root
            else:
                shutil.rmtree(root)

            if not args.skip_baseline:
                log(f"round {rep}/{args.repeat}: baseline (per-node, {len(list(tree.ids()))} nodes)")
                root = Path(tempfile.mkdtemp(prefix="base-", dir=tmp_parent))
                runs["baseline"].append(run_baseline(info, tree, root, options))
                log(f"  {runs['baseline'][-1].wall_s:.2f} s")
                if "baseline" not in keep:
                    keep["baseline"] = root
                else:
                    shutil.rmtree(root)

        verify = None
        if "baseline" in keep:
            log("verifying: keys and pixels, ours vs baseline")
            verify = compare_stores(keep["ours"], keep["baseline"], expected, args.samples)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)

    methods = {}
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r.wall_s)
        methods[name] = {"best": vars(best), "walls": [r.wall_s for r in rs],
                         "cpus": [r.cpu_s for r in rs]}
    ours_s = methods["ours"]["best"]["wall_s"]
    bare_s = methods["bare"]["best"]["wall_s"]
    ratios: dict = {"ours_over_bare": ours_s / bare_s,
                    "overhead_ok": ours_s / bare_s <= TARGET_OVERHEAD,
                    "baseline_over_ours": None, "speedup_ok": None}
    if "baseline" in methods:
        r = methods["baseline"]["best"]["wall_s"] / ours_s
        ratios.update(baseline_over_ours=r, speedup_ok=r >= TARGET_SPEEDUP)

    import av
    import PIL
    result = {
        "video_path": str(video), "size_mb": video.stat().st_size / 1e6,
        "video": info.summary(), "K": tree.k, "nodes": len(list(tree.ids())),
        "frames_requested": len(requests), "distinct_frames": len({r.index for r in requests}),
        "repeat": args.repeat, "methods": methods, "ratios": ratios, "verify": verify,
        "targets": {"baseline_over_ours_min": TARGET_SPEEDUP, "ours_over_bare_max": TARGET_OVERHEAD,
                    "max_pixel_mean_abs_diff": MAX_PIXEL_MAD},
        "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "pyav": av.__version__,
                    "pillow": PIL.__version__},
    }
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"figures written to {args.json}")

    if verify is not None and not verify["ok"]:
        return 1
    if args.check and not (ratios["overhead_ok"] and ratios["speedup_ok"] is not False):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lvr segment` as a library: videos -> node records, frames in the store.

For each video: probe it, shape its tree, decode every frame the tree needs
in one pass, attach subtitles, optionally cut leaf clips, and emit one
``lvr.node/1`` record per node. A video's records are written together, so
a rerun over the same output skips finished videos and never sees half a video.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .. import __version__
from .cache import frames_dir
from .frames import ExtractStats, FrameRequest, FrameStore, effective_side, extract_frames, frame_key
from .jsonl import JsonlWriter
from .probe import VideoError, VideoInfo, probe_video, video_fingerprint
from .subtitles import SubtitleError, SubtitleLine, lines_overlapping, load_subtitles
from .tree import Level, Tree, TreeOptions, node_count, tree_width

NODE_SCHEMA = "lvr.node/1"
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
    ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv",
})
TIME_DECIMALS = 4


@dataclass(frozen=True)
class SegmentOptions:
    tree: TreeOptions = field(default_factory=TreeOptions)
    qa_frames: bool = False                 # also store the 16 video_qa frames of every leaf
    subtitles: Path | None = None           # explicit subtitle file (one video only)
    use_subtitles: bool = True              # look for sidecar and embedded subtitles
    clips_dir: Path | None = None           # write leaf clips here
    copy_clips: bool = False                # stream copy (keyframe cuts) instead of exact re-encode
    jpeg_quality: int = 90

    def to_record(self) -> dict:
        d = asdict(self)
        for key in ("subtitles", "clips_dir"):
            d[key] = str(d[key]) if d[key] is not None else None
        return d


@dataclass
class VideoResult:
    path: str
    records: list[dict]
    stats: ExtractStats
    seconds: float


@dataclass
class SegmentSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[VideoError] = field(default_factory=list)
    nodes: int = 0
    frames_written: int = 0
    frames_cached: int = 0


def find_videos(inputs: Iterable[str]) -> tuple[list[Path], list[VideoError]]:
    """Expand files, directories (recursively, by video extension) and globs.

    Returns the paths in a stable order, without duplicates, and an error per
    input that names nothing.
    """
    paths: list[Path] = []
    errors: list[VideoError] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                errors.append(VideoError(raw, "directory holds no video files"))
            for f in found:
                add(f)
        elif p.exists():
            add(p)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(raw), recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                errors.append(VideoError(raw, "pattern matches no files"))
            for f in files:
                add(f)
        else:
            errors.append(VideoError(raw, "no such file or directory"))
    return paths, errors


def plan_requests(info: VideoInfo, tree: Tree, options: SegmentOptions) -> list[FrameRequest]:
    """Every (frame, size) the tree's records point at."""
    reqs = []
    for node in tree.nodes():
        side = effective_side(info, options.tree.image_side(node.level))
        reqs.extend(FrameRequest(i, side) for i in tree.sampled_frames(node.id, options.tree))
        if options.qa_frames and node.level == Level.LOW:
            qa_side = effective_side(info, options.tree.qa_side)
            reqs.extend(FrameRequest(i, qa_side) for i in tree.qa_frames(node.id, options.tree))
    return reqs


def _round(t: float) -> float:
    return round(float(t), TIME_DECIMALS)


def node_records(info: VideoInfo, tree: Tree, options: SegmentOptions,
                 subtitles: list[SubtitleLine], clips: dict | None = None) -> list[dict]:
    """One lvr.node/1 record per node, in tree order (high, medium, low)."""
    producer = {"tool": "lvr segment", "version": __version__, "options": options.to_record()}
    video = info.summary()
    records = []
    for node in tree.nodes():
        side = effective_side(info, options.tree.image_side(node.level))
        idx = tree.sampled_frames(node.id, options.tree)
        rec = {
            "schema": NODE_SCHEMA,
            "video_id": info.video_id,
            "path": info.path,
            "K": tree.k,
            "level": node.level.label,
            "id": list(node.id),
            "start": _round(node.start),
            "end": _round(node.end),
            "frame_range": [node.start_frame, node.stop_frame],
            "image_side": side,
            "frame_indices": idx,
            "frame_times": [_round(tree.frame_times[i]) for i in idx],
            "frame_keys": [frame_key(info.video_id, i, side) for i in idx],
            "subtitles": [s.to_record() for s in lines_overlapping(subtitles, node.start, node.end)],
        }
        if options.qa_frames and node.level == Level.LOW:
            qa_side = effective_side(info, options.tree.qa_side)
            qa = tree.qa_frames(node.id, options.tree)
            rec.update({
                "qa_image_side": qa_side,
                "qa_frame_indices": qa,
                "qa_frame_times": [_round(tree.frame_times[i]) for i in qa],
                "qa_frame_keys": [frame_key(info.video_id, i, qa_side) for i in qa],
            })
        if clips is not None and node.id in clips:
            rec["clip"] = clips[node.id]
        rec["video"] = video
        rec["producer"] = producer
        records.append(rec)
    return records


def build_tree(info: VideoInfo, options: TreeOptions) -> Tree:
    """The tree for a probed video, or a VideoError saying why it cannot have one."""
    k = tree_width(info.duration, options.segment_seconds, options.min_width, options.max_width)
    if info.n_frames < k ** 3:
        raise VideoError(info.path, f"too short: {info.n_frames} frames, but a K={k} tree "
                                    f"needs at least K³ = {k ** 3} (one per leaf)")
    try:
        return Tree(k, info.frame_times, info.duration)
    except ValueError as e:
        raise VideoError(info.path, str(e)) from None


def segment_video(path: "str | os.PathLike", options: SegmentOptions, store: FrameStore,
                  on_frames: Callable[[int], None] | None = None,
                  on_plan: Callable[[int], None] | None = None) -> VideoResult:
    """Segment one video. Raises VideoError with a one-line reason when it cannot."""
    t0 = time.perf_counter()
    info = probe_video(path)
    tree = build_tree(info, options.tree)
    requests = plan_requests(info, tree, options)
    if on_plan:
        on_plan(len(set(requests)))
    subtitles: list[SubtitleLine] = []
    if options.use_subtitles or options.subtitles:
        try:
            subtitles, _ = load_subtitles(info.path, options.subtitles, time_offset=info.start_time)
        except SubtitleError as e:
            raise VideoError(info.path, f"subtitles: {e}") from None
    stats = extract_frames(info, requests, store, quality=options.jpeg_quality, on_progress=on_frames)
    clips = None
    if options.clips_dir is not None:
        from .clips import write_leaf_clips

        clips = write_leaf_clips(info, tree, Path(options.clips_dir), copy=options.copy_clips)
    records = node_records(info, tree, options, subtitles, clips)
    return VideoResult(info.path, records, stats, time.perf_counter() - t0)


def complete_videos_prefix(lines: list[str]) -> int:
    """How many leading lines of a node file form whole videos (K + K² + K³ records each)."""
    import json

    done, count, current = 0, 0, None
    for i, line in enumerate(lines):
        rec = json.loads(line)
        vid = rec.get("video_id")
        if vid != current:
            current, count = vid, 0
        count += 1
        k = rec.get("K")
        if isinstance(k, int) and count == node_count(k):
            done, current = i + 1, None
    return done


def segment_videos(
    inputs: Iterable[str],
    options: SegmentOptions,
    store: FrameStore,
    output: "str | os.PathLike | None",
    *,
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = True,
) -> SegmentSummary:
    """Segment a batch. Bad videos are reported and skipped; the rest finish."""
    from tqdm.auto import tqdm

    summary = SegmentSummary()
    paths, errors = find_videos(inputs)
    summary.failed.extend(errors)
    for err in errors:
        log(f"error: {err}")
    with JsonlWriter(output, complete_prefix=complete_videos_prefix) as writer:
        done_ids = {r.get("video_id") for r in writer.existing}
        for n, path in enumerate(paths, 1):
            try:
                vid = video_fingerprint(path) if path.is_file() else None
            except OSError:
                vid = None
            if vid is not None and vid in done_ids:
                summary.skipped.append(str(path))
                log(f"skip: {path} (already in the output)")
                continue
            bar = tqdm(total=0, unit="frame", desc=f"[{n}/{len(paths)}] {path.name}",
                       disable=None if progress else True, leave=False, dynamic_ncols=True)
            try:
                result = segment_video(path, options, store, on_frames=bar.update,
                                       on_plan=lambda total: bar.reset(total=total))
            except VideoError as e:
                summary.failed.append(e)
                log(f"error: {e}")
                continue
            except Exception as e:  # one bad video must not end the batch
                err = VideoError(path, f"unexpected {type(e).__name__}: {e}")
                summary.failed.append(err)
                log(f"error: {err}")
                continue
            finally:
                bar.close()
            writer.write_unit(result.records)
            done_ids.add(result.records[0]["video_id"])
            summary.done.append(result.path)
            summary.nodes += len(result.records)
            summary.frames_written += result.stats.written
            summary.frames_cached += result.stats.cached
            log(f"done: {path}: K={result.records[0]['K']}, {len(result.records)} nodes, "
                f"{result.stats.written} frames stored, {result.stats.cached} cached, "
                f"{result.seconds:.1f} s")
    return summary


def trees_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "trees"


def load_or_segment(path: "str | os.PathLike", options: SegmentOptions, cache_dir: Path) -> list[dict]:
    """A video's node records, segmenting it only the first time (for `ask` and `eval`).

    The records are kept under <cache>/trees/<video_id>/<options hash>.jsonl, so
    asking again, or about a moved copy of the same file, costs no decoding.
    Raises VideoError with a one-line reason.
    """
    import hashlib
    import json

    from .jsonl import dumps, write_atomic

    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such file" if not path.exists() else "not a file")
    try:
        video_id = video_fingerprint(path)
    except OSError as e:
        raise VideoError(path, f"cannot read ({e.strerror})") from None
    settings = json.dumps(options.to_record(), sort_keys=True)
    cached = trees_dir(cache_dir) / video_id / f"{hashlib.sha256(settings.encode()).hexdigest()[:16]}.jsonl"
    if cached.is_file():
        try:
            records = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines() if line]
        except (OSError, ValueError):
            records = []
        store = FrameStore(frames_dir(Path(cache_dir)))
        if records and all(store.has(k) for k in records[0].get("frame_keys", [])):
            for rec in records:  # the file may have moved since
                rec["path"] = str(path)
            return records
    result = segment_video(path, options, FrameStore(frames_dir(Path(cache_dir))))
    write_atomic(cached, "".join(dumps(r) + "\n" for r in result.records))
    return result.records

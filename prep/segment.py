"""`lvr segment` as a library: videos -> node records, frames in the store.

For each video: probe it, shape its tree, decode every frame the tree needs
in one pass, attach subtitles, optionally cut leaf clips, and emit one
``lvr.node/1`` record per node. A video's records are written together, so
a rerun over the same output skips finished videos and never sees half a video.

Real files have a few frames that do not decode. A sampled frame that does
not is replaced by the nearest frame of the same node that does, and the
record says so (``substituted_frames``); only a video with too much missing
(``max_bad_frames``) or a node with nothing decodable is refused. These rules
live here, in the path `lvr segment` and `load_or_segment` share.

`ask`, `eval`, `synthesize` and `rl` take the lazy path instead (`load_or_plan`):
the tree's records come from the demux-only probe with nothing decoded, and a
node's frames are decoded into the same store the first time a reader needs
them (`extract_node_frames`), seeking to the keyframe before each group of
frames. The same per-node substitution rule applies; the whole-video share
(`max_bad_frames`) can only be judged on what was decoded, so it is checked on
the K high nodes' frames once they are in (`check_first_level`).
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from .. import __version__
from .cache import frames_dir
from .frames import (JPEG_QUALITY, DecodableFrames, ExtractStats, FrameRequest, FrameStore, effective_side,
                     extract_frames, extract_frames_at, frame_key)
from .jsonl import JsonlWriter
from .keyframe_snap import snap_to_keyframes, tolerance_for
from .options import check_options, option
from .probe import VideoError, VideoInfo, probe_video, video_fingerprint
from .subtitles import (FROM_TRANSCRIPT, SubtitleError, SubtitleTrack, find_sidecars, load_subtitles,
                        shift_lines)
from .tree import Level, Node, NodeId, Tree, TreeOptions, format_node_id, node_count, tree_width
from .transcribe import Transcription

NODE_SCHEMA = "lvr.node/1"
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
    ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv",
})
TIME_DECIMALS = 4


@dataclass(frozen=True)
class SegmentOptions:
    tree: TreeOptions = field(default_factory=TreeOptions)
    qa_frames: bool = option(False, "--qa-frames/--no-qa-frames",
                             help="Also store the frames video_qa sends for every leaf (16 at 1024 px).")
    subtitles: Path | None = None           # explicit subtitle file (one video only)
    use_subtitles: bool = True              # look for sidecar and embedded subtitles
    transcription: Transcription | None = None  # --transcribe: a transcript for a video with no subtitles
    clips_dir: Path | None = None           # write leaf clips here
    copy_clips: bool = False                # stream copy (keyframe cuts) instead of exact re-encode
    jpeg_quality: int = option(90, "--jpeg-quality", min=1, max=100, help="JPEG quality of stored frames.")
    max_bad_frames: float = option(
        0.05, "--max-bad-frames", min=0.0, max=1.0, metavar="SHARE",
        help="Refuse a video when more than this share of its sampled frames do not decode (or of its "
             "frames cannot be read). Fewer are replaced by the nearest frame of the same node that decodes.")

    def __post_init__(self) -> None:
        check_options(self)

    def to_record(self) -> dict:
        d = asdict(replace(self, transcription=None))
        for key in ("subtitles", "clips_dir"):
            d[key] = str(d[key]) if d[key] is not None else None
        del d["transcription"]
        if self.transcription is not None:  # so trees (and their cache key) with and without speech never mix
            d["transcription"] = self.transcription.identity()
        return d


@dataclass
class VideoResult:
    path: str
    records: list[dict]
    stats: ExtractStats
    seconds: float
    substituted: int = 0   # sampled frames that did not decode and were replaced
    unreadable: int = 0    # frames the header lists beyond those that can be read


@dataclass
class SegmentSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[VideoError] = field(default_factory=list)
    nodes: int = 0
    frames_written: int = 0
    frames_cached: int = 0
    frames_substituted: int = 0


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


@dataclass(frozen=True)
class SampleSet:
    """One set of a node's frames: its caption frames (prefix "") or a leaf's video_qa frames ("qa_")."""

    prefix: str
    side: int                 # longest image side
    indices: list[int]        # frames to show, before any substitution
    sampling: dict | None = None   # keyframe sampling: mode, tolerance, max offset, frames asked for

# Levels whose frames keyframe sampling may move; low nodes are short and video_qa looks closely.
KEYFRAME_LEVELS = (Level.HIGH, Level.MEDIUM)


def sample_sets(info: VideoInfo, tree: Tree, node: Node, options: SegmentOptions) -> list[SampleSet]:
    """A node's sampled frames: its caption frames, and for leaves with qa_frames its video_qa frames."""
    sampled = tree.sampled_frames(node.id, options.tree)
    side = effective_side(info, options.tree.image_side(node.level))
    if options.tree.frame_sampling == "keyframe" and node.level in KEYFRAME_LEVELS:
        snapped = snap_to_keyframes(sampled, info.frame_times, info.keyframe_indices,
                                    (node.start_frame, node.stop_frame), options.tree.keyframe_tolerance)
        tolerance = tolerance_for(sampled, info.frame_times, options.tree.keyframe_tolerance)
        sampling = {"mode": "keyframe", "tolerance": round(float(tolerance), 4),
                    "max_offset": snapped.max_offset, "asked": len(sampled), "keyframes": snapped.keyframes}
        sets = [SampleSet("", side, snapped.indices, sampling)]
    else:
        sets = [SampleSet("", side, sampled)]
    if options.qa_frames and node.level == Level.LOW:
        sets.append(SampleSet("qa_", effective_side(info, options.tree.qa_side), tree.qa_frames(node.id, options.tree)))
    return sets


def plan_requests(info: VideoInfo, tree: Tree, options: SegmentOptions) -> list[FrameRequest]:
    """Every (frame, size) the tree's records point at."""
    return [FrameRequest(i, ss.side) for node in tree.nodes()
            for ss in sample_sets(info, tree, node, options) for i in ss.indices]


# (node id, record field prefix) -> {sampled frame that did not decode: frame used instead}
Substitutes = dict[tuple[NodeId, str], dict[int, int]]


def check_readable_share(info: VideoInfo, max_bad_frames: float) -> None:
    """Refuse a video whose header lists more frames than can be read, beyond the allowed share."""
    lost = info.unreadable_frames
    if lost and lost / info.declared_frames > max_bad_frames:
        raise VideoError(info.path, f"truncated: the header lists {info.declared_frames} frames but only "
                                    f"{info.n_frames} can be read ({lost / info.declared_frames:.1%} missing, "
                                    f"max_bad_frames allows {max_bad_frames:.1%})")


def check_decoded_share(info: VideoInfo, missing: int, sampled: int, max_bad_frames: float) -> None:
    """Refuse a video when more than the allowed share of its sampled frames do not decode."""
    check_decoded_share_of(info.path, missing, sampled, max_bad_frames)


def check_decoded_share_of(path: str, missing: int, sampled: int, max_bad_frames: float) -> None:
    if missing and missing / sampled > max_bad_frames:
        raise VideoError(path, f"{missing} of the {sampled} sampled frames do not decode "
                               f"({missing / sampled:.1%}, max_bad_frames allows {max_bad_frames:.1%})")


def nearest_decodable(wanted: int, start: int, stop: int, shown: set[int],
                      decodable: Callable[[int], bool]) -> int | None:
    """The frame of [start, stop) nearest to `wanted` that decodes: `wanted` itself if it
    does after all, else the nearest the node does not already show (ties: the earlier),
    else the nearest it shows. None when no frame of the span decodes."""
    fallback = None
    for d in range(max(wanted - start, stop - 1 - wanted) + 1):
        for j in ((wanted,) if d == 0 else (wanted - d, wanted + d)):
            if start <= j < stop and decodable(j):
                if j == wanted or j not in shown:
                    return j
                if fallback is None:
                    fallback = j
    return fallback


def substitute_frames(info: VideoInfo, tree: Tree, options: SegmentOptions, missing: list[int]) -> Substitutes:
    """For every node sampling a frame that did not decode, the frame of the same node used instead.

    Raises VideoError when a node has no frame that decodes.
    """
    bad = set(missing)
    subs: Substitutes = {}
    with DecodableFrames(info) as decodable:
        for node in tree.nodes():
            for ss in sample_sets(info, tree, node, options):
                if any(i in bad for i in ss.indices):
                    subs[(node.id, ss.prefix)] = choose_substitutes(
                        info, node.id, (node.start, node.end), (node.start_frame, node.stop_frame),
                        ss.indices, bad, decodable)
    return subs


def choose_substitutes(info: VideoInfo, node_id: NodeId, span: tuple[float, float], frames: tuple[int, int],
                       sampled: list[int], bad: set[int], decodable: Callable[[int], bool]) -> dict[int, int]:
    """{sampled frame that did not decode: the frame of the node's [start, stop) `frames` used instead}.

    Raises VideoError naming the node when none of its frames decodes.
    """
    shown = set(sampled) - bad
    chosen: dict[int, int] = {}
    for i in (i for i in sampled if i in bad):
        j = nearest_decodable(i, frames[0], frames[1], shown, decodable)
        if j is None:
            raise VideoError(info.path, f"no frame of node {format_node_id(node_id)} "
                                        f"({span[0]:.2f}-{span[1]:.2f} s) decodes")
        chosen[i] = j
        shown.add(j)
    return chosen


def store_substitutes(info: VideoInfo, tree: Tree, options: SegmentOptions, subs: Substitutes,
                      store: FrameStore) -> ExtractStats:
    """Decode the frames chosen as substitutes into the store (seeking to each)."""
    requests = [FrameRequest(j, ss.side) for node in tree.nodes()
                for ss in sample_sets(info, tree, node, options)
                for j in subs.get((node.id, ss.prefix), {}).values()]
    stats = extract_frames_at(info, requests, store, quality=options.jpeg_quality)
    if stats.missing:
        raise VideoError(info.path, f"frame {stats.missing[0]} decoded once but not a second time")
    return stats


def shown_frames(sampled: list[int], chosen: dict[int, int]) -> tuple[list[int], list[list[int]]]:
    """The frames a node shows after substitution, in time order, and its [wanted, used] pairs."""
    pairs = [[i, chosen[i]] for i in sampled if chosen.get(i, i) != i]
    return sorted(chosen.get(i, i) for i in sampled), pairs


def _round(t: float) -> float:
    return round(float(t), TIME_DECIMALS)


def frame_fields(info: VideoInfo, prefix: str, side: int, sampled: list[int], chosen: dict[int, int],
                 earlier: list[list[int]] = ()) -> dict:
    """A record's fields for one set of frames (prefix "" or "qa_") after substitution.
    `earlier`: [wanted, used] pairs of a substitution made before (the lazy path may add to them)."""
    idx, pairs = shown_frames(sampled, chosen)
    return {
        f"{prefix}image_side": side,
        f"{prefix}frame_indices": idx,
        f"{prefix}frame_times": [_round(info.frame_times[i]) for i in idx],
        f"{prefix}frame_keys": [frame_key(info.video_id, i, side) for i in idx],
        f"{prefix}substituted_frames": [*earlier, *pairs],
    }


def node_records(info: VideoInfo, tree: Tree, options: SegmentOptions,
                 subtitles: SubtitleTrack, clips: dict | None = None,
                 substitutes: Substitutes | None = None) -> list[dict]:
    """One lvr.node/1 record per node, in tree order (high, medium, low).

    frame_indices/times/keys name the frames actually stored and shown;
    substituted_frames lists [wanted, used] for frames that did not decode.
    """
    producer = {"tool": "lvr segment", "version": __version__, "options": options.to_record()}
    video = info.summary()
    substitutes = substitutes or {}
    records = []
    for node in tree.nodes():
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
        }
        for ss in sample_sets(info, tree, node, options):
            rec.update(frame_fields(info, ss.prefix, ss.side, ss.indices, substitutes.get((node.id, ss.prefix), {})))
            if ss.sampling:
                rec[f"{ss.prefix}frame_sampling"] = ss.sampling
        rec["subtitles"] = subtitles.records(node.start, node.end)
        if subtitles.transcript_id is not None:
            rec["transcript_id"] = subtitles.transcript_id
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


def video_subtitles(info: VideoInfo, options: SegmentOptions) -> SubtitleTrack:
    """The subtitle lines the options ask for (none when they ask for none): a subtitle file or
    stream, else (with `transcription`) the transcript of the video's speech."""
    from .models.base import ModelError

    if not (options.use_subtitles or options.subtitles):
        return SubtitleTrack()
    try:
        lines = load_subtitles(info.path, options.subtitles, time_offset=info.start_time)[0]
    except SubtitleError as e:
        raise VideoError(info.path, f"subtitles: {e}") from None
    if lines or options.transcription is None:
        return SubtitleTrack(lines)
    try:
        transcript = options.transcription.transcript_of(info.path, info.video_id)
    except ModelError as e:
        raise VideoError(info.path, f"transcription: {e}") from None
    return SubtitleTrack(shift_lines(transcript.lines, info.start_time), FROM_TRANSCRIPT, transcript.transcript_id)


def segment_video(path: "str | os.PathLike", options: SegmentOptions, store: FrameStore,
                  on_frames: Callable[[int], None] | None = None,
                  on_plan: Callable[[int], None] | None = None) -> VideoResult:
    """Segment one video. Raises VideoError with a one-line reason when it cannot."""
    t0 = time.perf_counter()
    info = probe_video(path)
    check_readable_share(info, options.max_bad_frames)
    tree = build_tree(info, options.tree)
    requests = plan_requests(info, tree, options)
    if on_plan:
        on_plan(len(set(requests)))
    subtitles = video_subtitles(info, options)
    stats = extract_frames(info, requests, store, quality=options.jpeg_quality, on_progress=on_frames)
    substitutes: Substitutes = {}
    if stats.missing:  # only a damaged video pays for a second look
        check_decoded_share(info, len(stats.missing), len({r.index for r in requests}), options.max_bad_frames)
        substitutes = substitute_frames(info, tree, options, stats.missing)
        stats.written += store_substitutes(info, tree, options, substitutes, store).written
    clips = None
    if options.clips_dir is not None:
        from .clips import write_leaf_clips

        clips = write_leaf_clips(info, tree, Path(options.clips_dir), copy=options.copy_clips)
    records = node_records(info, tree, options, subtitles, clips, substitutes)
    substituted = len({i for chosen in substitutes.values() for i, j in chosen.items() if i != j})
    return VideoResult(info.path, records, stats, time.perf_counter() - t0, substituted, info.unreadable_frames)


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
            summary.frames_substituted += result.substituted
            lost = f", {result.unreadable} frame(s) the header lists cannot be read" if result.unreadable else ""
            log(f"done: {path}: K={result.records[0]['K']}, {len(result.records)} nodes, "
                f"{result.stats.written} frames stored, {result.stats.cached} cached, "
                f"{result.substituted} substituted{lost}, {result.seconds:.1f} s")
    return summary


def trees_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "trees"


def tree_cache_path(cache_dir: Path, video: Path, video_id: str, options: dict) -> Path:
    """<cache>/trees/<video_id>/<hash>.jsonl: where a video's records are kept for ask and eval.

    `options`: `SegmentOptions.to_record()` (the records' producer options). The hash covers them and
    the subtitle files the records' lines come from, so a sidecar added, changed or removed (or a
    copy of the video in a folder with other sidecars) is another tree; with --transcribe the options
    hold the transcripts' identity (model, backend, settings), so trees with and without speech never mix.
    """
    import hashlib
    import json

    settings = json.dumps({**options, "subtitle_files": _subtitle_files(video, options)}, sort_keys=True)
    return trees_dir(cache_dir) / video_id / f"{hashlib.sha256(settings.encode()).hexdigest()[:16]}.jsonl"


def _subtitle_files(video: Path, options: dict) -> list:
    """[path, size, mtime] of each subtitle file the options would read for this video."""
    if not (options.get("use_subtitles") or options.get("subtitles")):
        return []
    out = []
    for f in [Path(options["subtitles"])] if options.get("subtitles") else find_sidecars(video):
        try:
            st = f.stat()
        except OSError:
            continue
        out.append([str(f.absolute()), st.st_size, st.st_mtime_ns])
    return out


def _cached_records(path: Path, video: Path) -> list[dict]:
    """The records kept for a video (path set to where it is now), or [] when there are none that read."""
    import json

    if not path.is_file():
        return []
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError):
        return []
    for rec in records:  # the file may have moved since
        rec["path"] = str(video)
    return records


def _video_id(path: Path) -> str:
    if not path.is_file():
        raise VideoError(path, "no such file" if not path.exists() else "not a file")
    try:
        return video_fingerprint(path)
    except OSError as e:
        raise VideoError(path, f"cannot read ({e.strerror})") from None


def load_or_segment(path: "str | os.PathLike", options: SegmentOptions, cache_dir: Path,
                    on_frames: Callable[[int], None] | None = None,
                    on_plan: Callable[[int], None] | None = None) -> list[dict]:
    """A video's node records, segmenting it (every frame) only the first time.

    The records are kept under <cache>/trees/<video_id>/<options hash>.jsonl, so
    asking again, or about a moved copy of the same file, costs no decoding.
    `on_plan` and `on_frames` follow the decoding as in `segment_video` (never called for a cached tree).
    Raises VideoError with a one-line reason.
    """
    from .jsonl import dumps, write_atomic

    path = Path(path)
    cached = tree_cache_path(cache_dir, path, _video_id(path), options.to_record())
    records = _cached_records(cached, path)
    store = FrameStore(frames_dir(Path(cache_dir)))
    if records and not records[0].get(LAZY_FRAMES) and all(store.has(k) for k in records[0].get("frame_keys", [])):
        return records
    result = segment_video(path, options, store, on_frames=on_frames, on_plan=on_plan)
    write_atomic(cached, "".join(dumps(r) + "\n" for r in result.records))
    return result.records


# -- the lazy path: the tree now, each node's frames when first read --------------------

# Set on records whose frames may not be in the store yet: their frame keys name the frames
# the node will show, and a reader decodes them on first use (frame_repair.read_node_frames).
LAZY_FRAMES = "lazy_frames"


def plan_video(path: "str | os.PathLike", options: SegmentOptions) -> tuple[VideoInfo, list[dict]]:
    """A video's node records with no frame decoded: the demux-only probe, the tree, subtitles.
    Raises VideoError with a one-line reason."""
    from .frame_repair import probe_once

    try:
        info = probe_once(Path(path))
    except OSError as e:
        raise VideoError(path, f"cannot read ({e.strerror})") from None
    check_readable_share(info, options.max_bad_frames)
    tree = build_tree(info, options.tree)
    records = node_records(info, tree, options, video_subtitles(info, options))
    for rec in records:
        rec[LAZY_FRAMES] = True
    return info, records


def extract_node_frames(info: VideoInfo, record: dict, prefix: str, store: FrameStore, *,
                        quality: int = JPEG_QUALITY, on_progress: Callable[[int], None] | None = None) -> ExtractStats:
    """Decode one set of a node's frames (prefix "" for the caption, "qa_" for video_qa) that the
    store lacks, seeking to the keyframe before each group of them: bytes as `segment_video` stores.

    A frame that does not decode is replaced by the nearest of the same node that does, as in
    `segment_video`, and the record is updated to show it (its `missing` stay in the stats).
    Raises VideoError naming the node when none of its frames decodes.
    """
    side, shown = record[f"{prefix}image_side"], record[f"{prefix}frame_indices"]
    stats = extract_frames_at(info, [FrameRequest(i, side) for i in shown], store, quality=quality,
                              on_progress=on_progress)
    if not stats.missing:
        return stats
    with DecodableFrames(info) as decodable:
        chosen = choose_substitutes(info, tuple(record["id"]), (record["start"], record["end"]),
                                    tuple(record["frame_range"]), shown, set(stats.missing), decodable)
    more = extract_frames_at(info, [FrameRequest(j, side) for j in chosen.values()], store, quality=quality)
    if more.missing:
        raise VideoError(info.path, f"frame {more.missing[0]} decoded once but not a second time")
    stats.written += more.written
    record.update(frame_fields(info, prefix, side, shown, chosen, record.get(f"{prefix}substituted_frames", [])))
    return stats


def check_first_level(high: list[dict]) -> None:
    """The whole-video share rule on the lazy path, judged on the K high nodes' frames once they are
    decoded (together they span the video): VideoError when too many had to be substituted."""
    substituted = sum(len(r.get("substituted_frames") or []) for r in high)
    shown = sum(len(r.get("frame_indices") or []) for r in high)
    if high and substituted:
        options = (high[0].get("producer") or {}).get("options") or {}
        limit = options.get("max_bad_frames", SegmentOptions.max_bad_frames)
        check_decoded_share_of(high[0].get("path", ""), substituted, shown, limit)


def load_or_plan(path: "str | os.PathLike", options: SegmentOptions, cache_dir: Path) -> list[dict]:
    """A video's node records for `ask`, `eval`, `synthesize` and `rl`, with nothing decoded: each
    node's frames are decoded when a reader first needs them (`frame_repair.frames_on_demand`).

    The records are kept as `load_or_segment` keeps them, and a tree it made is used as it is.
    Raises VideoError with a one-line reason.
    """
    from .jsonl import dumps, write_atomic

    path = Path(path)
    cached = tree_cache_path(cache_dir, path, _video_id(path), options.to_record())
    records = _cached_records(cached, path)
    if records:
        return records
    _, records = plan_video(path, options)
    write_atomic(cached, "".join(dumps(r) + "\n" for r in records))
    return records


def keep_substitutes(records: list[dict], cache_dir: Path) -> None:
    """Write a lazily planned tree back to the cache once reading it replaced frames that do not
    decode, so later runs show the same frames without decoding to find them again."""
    from .jsonl import dumps, write_atomic

    if records and records[0].get(LAZY_FRAMES) and any(
            r.get("substituted_frames") or r.get("qa_substituted_frames") for r in records):
        first = records[0]
        write_atomic(tree_cache_path(cache_dir, Path(first["path"]), first["video_id"], first["producer"]["options"]),
                     "".join(dumps(r) + "\n" for r in records))

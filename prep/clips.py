"""Leaf clips: one small video file per leaf node, for video_qa and for people.

Two ways to cut, both writing ``<out_dir>/<video_id>/<h>-<m>-<l>.mp4``:

* exact (default): one ffmpeg run re-encodes the video once (libx264) with a
  keyframe forced on every leaf's first frame and the segment muxer splitting
  there, so each clip holds exactly its leaf's frames.
* copy: no re-encode. Packets are copied, so a clip can only begin on a
  keyframe; each clip runs from the last keyframe at or before its leaf to the
  first keyframe at or after the leaf's end, and its record says where it
  really starts and ends.

A video's clips appear all at once: they are written into a temporary folder
that is renamed into place when every clip is done, together with a
``clips.json`` manifest that lets a rerun reuse them without running ffmpeg.

A span clip (`write_span_clip`, for `lvr ground --clip`) is any stretch of the
video as one file, re-encoded like the exact clips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from bisect import bisect_left, bisect_right
from fractions import Fraction
from pathlib import Path

import numpy as np

from .jsonl import output_error
from .probe import VideoError, VideoInfo
from .tree import Level, NodeId, Tree

MANIFEST = "clips.json"
MANIFEST_SCHEMA = "lvr.clips/1"
TIME_DECIMALS = 4
PROBE_TIMEOUT_S = 120
# Re-encoding runs at some multiple of real time; leave room for slow machines.
ENCODE_TIMEOUT_BASE_S = 600
ENCODE_TIMEOUT_PER_S = 10
# Copy mode closes a clip once video has passed its end and audio has too, or
# video has passed it by this much (a short or sparsely muxed audio track must
# not keep hundreds of files open).
AUDIO_SLACK_S = 5.0
# The re-encode of exact and span clips: x264 needs even sizes for 4:2:0, and yuv420p plays everywhere.
REENCODE = ("-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2,format=yuv420p",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-c:a", "aac")
# A span's ends match a frame's time this closely (answers carry at most 6 decimals).
SPAN_TOLERANCE_S = 1e-4


def leaf_name(node_id: NodeId) -> str:
    return "-".join(str(i) for i in node_id)


def _round(t: float) -> float:
    return round(float(t), TIME_DECIMALS)


def write_leaf_clips(info: VideoInfo, tree: Tree, out_dir: Path, *,
                     copy: bool = False) -> dict[NodeId, dict]:
    """Write (or reuse) the K³ leaf clips of one video.

    Returns ``{leaf id: {"path", "start", "end", "exact"}}`` with start/end in
    seconds on the video's timeline (0 = first frame). Raises VideoError with
    a one-line reason when ffmpeg or the copy fails.
    """
    copy = bool(copy)
    out_dir = Path(out_dir).resolve()
    final = out_dir / info.video_id
    leaves = list(tree.ids(Level.LOW))

    reused = _load_manifest(final, info, tree, leaves, copy)
    if reused is not None:
        return reused

    tmp = out_dir / f".{info.video_id}.tmp-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash with our pid
        tmp.mkdir()
        if copy:
            ranges = _copy_clips(info, tree, leaves, tmp)
        else:
            ranges = _exact_clips(info, tree, leaves, tmp)
        records = {leaf: {"path": str(final / f"{leaf_name(leaf)}.mp4"),
                          "start": _round(ranges[leaf][0]), "end": _round(ranges[leaf][1]),
                          "exact": not copy}
                   for leaf in leaves}
        _write_manifest(tmp, info, tree, records, copy)
        _publish(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            # Another process may have published the same clips meanwhile.
            again = _load_manifest(final, info, tree, leaves, copy)
            if again is not None:
                return again
            raise VideoError(info.path, f"cannot write clips to {final}: {e}") from None
        raise
    return records


# -- manifest -------------------------------------------------------------------


def _write_manifest(folder: Path, info: VideoInfo, tree: Tree, records: dict, copy: bool) -> None:
    doc = {
        "schema": MANIFEST_SCHEMA,
        "video_id": info.video_id,
        "copy": copy,
        "K": tree.k,
        "clips": {leaf_name(k): v for k, v in records.items()},
    }
    part = folder / (MANIFEST + ".part")
    part.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(part, folder / MANIFEST)


def _load_manifest(final: Path, info: VideoInfo, tree: Tree, leaves: list[NodeId],
                   copy: bool) -> dict[NodeId, dict] | None:
    """The clips already in `final`, or None when they are missing, stale or of the other kind."""
    try:
        doc = json.loads((final / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA
            or doc.get("video_id") != info.video_id or doc.get("copy") is not copy
            or doc.get("K") != tree.k or not isinstance(doc.get("clips"), dict)):
        return None
    clips = doc["clips"]
    if set(clips) != {leaf_name(leaf) for leaf in leaves}:
        return None
    out = {}
    tol = 0.6 * 10 ** -TIME_DECIMALS  # rounding of the stored times
    for leaf in leaves:
        rec = clips[leaf_name(leaf)]
        path = final / f"{leaf_name(leaf)}.mp4"
        try:
            start, end = float(rec["start"]), float(rec["end"])
            if path.stat().st_size == 0:
                return None
        except (OSError, KeyError, TypeError, ValueError):
            return None
        s, e = tree.span(leaf)
        # A different tree (other options, other K) means other cuts: rebuild.
        if copy:
            if start > s + tol or end < e - tol:
                return None
        elif abs(start - s) > tol or abs(end - e) > tol:
            return None
        # The folder may have been moved since: paths follow where it is now.
        out[leaf] = {"path": str(path), "start": start, "end": end, "exact": not copy}
    return out


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished folder into place, replacing a stale one."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    finally:
        shutil.rmtree(old, ignore_errors=True)


# -- exact: one re-encode, split at every leaf -----------------------------------


def _container_start(path: str) -> float:
    """The container's start time: ffmpeg counts its timeline from here, not from the first frame."""
    cmd = ["ffprobe", "-v", "error", "-show_entries", "format=start_time", "-of", "json", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        value = json.loads(proc.stdout or "{}").get("format", {}).get("start_time")
        return float(value) if value not in (None, "N/A") else 0.0
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0.0


def _first_frame_offset(info: VideoInfo) -> float:
    """Where our timeline's 0 (the first frame) sits on ffmpeg's, which starts at the container start."""
    return info.start_time - _container_start(info.path)


def _run_ffmpeg(info: VideoInfo, cmd: list[str], timeout: float, what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise VideoError(info.path, "ffmpeg not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise VideoError(info.path, f"{what}: ffmpeg took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise VideoError(info.path, f"{what}: ffmpeg failed: {last}")


def _exact_clips(info: VideoInfo, tree: Tree, leaves: list[NodeId],
                 tmp: Path) -> dict[NodeId, tuple[float, float]]:
    starts = [tree.node(leaf).start_frame for leaf in leaves]
    cuts = starts[1:]
    times = tree.frame_times
    # ffmpeg's timeline starts at the container start, which is before the
    # first frame when audio begins earlier. Start the output at the first
    # frame, dropping that audio: clip 1 then begins at its first frame like
    # every other clip, and the encoder's timeline is ours.
    lead = _first_frame_offset(info)
    trim = ["-ss", f"{max(0.0, lead - 1e-6):.6f}"] if lead > 1e-6 else []
    # Keyframes are forced by time (an expression over frame numbers overflows
    # ffmpeg's parser at a few hundred cuts); halfway between a leaf's first
    # frame and the frame before it, so the exact rounding does not matter.
    keyframes = ",".join(f"{(times[a - 1] + times[a]) / 2:.6f}" for a in cuts)
    seg_list = tmp / "segments.csv"
    cmd = [
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-i", info.path,
        "-map", f"0:{info.stream_index}", "-map", "0:a:0?",
        *trim,
        # Keep every frame with its own timestamp: no CFR duplication or drops.
        "-fps_mode", "passthrough", "-enc_time_base", "-1",
        *REENCODE,
        *(["-force_key_frames", keyframes] if cuts else []),
        # The muxer splits by frame number, not time: it sees timestamps
        # shifted again for B-frame delay and AAC priming, while a frame
        # number means the same to us and to it (passthrough keeps every
        # frame, and at a closed-GOP keyframe the decode-order count equals
        # the display index). The check below proves it held.
        "-f", "segment", "-segment_format", "mp4",
        "-segment_frames", ",".join(str(i) for i in cuts) if cuts else str(info.n_frames + 1),
        "-reset_timestamps", "1",
        # Let each mp4 handle B-frame delay with an edit list rather than the
        # segment muxer shifting every timestamp (and the cut times with them).
        "-avoid_negative_ts", "disabled",
        "-segment_list", str(seg_list), "-segment_list_type", "csv",
        str(tmp / "%06d.mp4"),
    ]
    timeout = ENCODE_TIMEOUT_BASE_S + ENCODE_TIMEOUT_PER_S * info.duration
    _run_ffmpeg(info, cmd, timeout, "cutting exact clips")

    segments = _read_segment_list(seg_list)
    if len(segments) != len(leaves):
        raise VideoError(info.path, f"cutting exact clips: ffmpeg wrote {len(segments)} "
                                    f"clips, expected {len(leaves)}")
    # Check every cut landed on its leaf's first frame (segment start times are
    # on the output timeline, which now starts at the first frame).
    for j, (leaf, (_, seg_start)) in enumerate(zip(leaves, segments)):
        if j == 0:
            continue
        a = starts[j]
        gap = min(times[a] - times[a - 1],
                  (times[a + 1] if a + 1 < len(times) else tree.duration) - times[a])
        want = tree.span(leaf)[0]
        if abs(seg_start - want) > gap / 2:
            raise VideoError(info.path, f"cutting exact clips: clip {leaf_name(leaf)} starts at "
                                        f"{seg_start:.4f} s instead of {want:.4f} s")
    for leaf, (name, _) in zip(leaves, segments):
        os.rename(tmp / name, tmp / f"{leaf_name(leaf)}.mp4")
    seg_list.unlink()
    return {leaf: tree.span(leaf) for leaf in leaves}


def _read_segment_list(path: Path) -> list[tuple[str, float]]:
    """(file name, start time) per segment, in order, from the segment muxer's csv list."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.strip().rsplit(",", 2)
        if len(parts) == 3:
            out.append((parts[0].strip('"'), float(parts[1])))
    return out


# -- copy: keyframe-aligned cuts, no re-encode ------------------------------------


class _CopyClip:
    """One output file being filled with copied packets."""

    def __init__(self, path: Path, first: int, stop: int | None, time_base: Fraction):
        self.path = path
        self.first = first            # pts of the keyframe the clip starts on (video ticks)
        self.stop = stop              # pts of the keyframe it ends before; None: the video's end
        # The same two as exact container times: float seconds would put a
        # keyframe a hair before itself.
        self.start_t = first * time_base
        self.end_t = stop * time_base if stop is not None else None
        self.container = None
        self.ostreams: dict[int, object] = {}
        self.shift: dict[int, int] = {}   # per input stream: ticks to subtract so the clip starts at 0
        self.held = None              # the end keyframe, kept back in case an open GOP needs it
        self.held_sent = False
        self.min_pts: int | None = None
        self.max_pts: int | None = None

    def open(self, av, streams: list, video_tb) -> None:
        self.container = av.open(str(self.path), "w", format="mp4")
        for s in streams:
            if hasattr(self.container, "add_stream_from_template"):
                o = self.container.add_stream_from_template(s)
            else:  # PyAV < 14
                o = self.container.add_stream(template=s)
            self.ostreams[s.index] = o
            self.shift[s.index] = round(self.first * video_tb / s.time_base)

    def mux(self, packet, src: int, fields: tuple) -> None:
        pts, dts, duration, time_base = fields
        shift = self.shift[src]
        # One packet goes to several clips, and muxing rebases it in place:
        # set every field afresh each time.
        packet.time_base = time_base
        packet.pts = None if pts is None else pts - shift
        packet.dts = None if dts is None else dts - shift
        packet.duration = duration
        packet.stream = self.ostreams[src]
        self.container.mux(packet)

    def copy_video(self, packet, src: int, fields: tuple, pts: int) -> None:
        """Copy a video packet if its frame lies in the clip's range."""
        if pts < self.first:
            return  # before the start keyframe (an open GOP's leading frame)
        if self.stop is not None and pts >= self.stop:
            if pts == self.stop and packet.is_keyframe and self.held is None:
                # The end keyframe: kept back, since frames decoded after it
                # but shown before it (open GOP) refer to it.
                self.held = (packet, fields)
            return
        if self.held is not None and not self.held_sent:
            # Such a leading frame: the end keyframe goes in first, and the
            # clip then ends one frame past it.
            held_packet, held_fields = self.held
            self.mux(held_packet, src, held_fields)
            self.held_sent = True
            self._saw(self.stop)
        self.mux(packet, src, fields)
        self._saw(pts)

    def _saw(self, pts: int) -> None:
        self.min_pts = pts if self.min_pts is None else min(self.min_pts, pts)
        self.max_pts = pts if self.max_pts is None else max(self.max_pts, pts)

    def close(self) -> None:
        if self.container is not None:
            container, self.container = self.container, None
            container.close()


def _copy_clips(info: VideoInfo, tree: Tree, leaves: list[NodeId],
                tmp: Path) -> dict[NodeId, tuple[float, float]]:
    """One demux pass, each packet copied into every clip whose range holds it.

    Done with PyAV rather than one `ffmpeg -ss -t -c copy` per leaf: ffmpeg
    ends a stream copy on decode timestamps (B-frames spill past the end
    keyframe) and input seeking lets audio from before the keyframe in, so
    its cut points are not the keyframes. Choosing packets by presentation
    time makes the cuts exactly the keyframes.
    """
    import av

    pts_all = info.frame_pts
    first_pts = int(pts_all[0])
    tb = info.time_base
    kf_index = sorted({int(np.searchsorted(pts_all, first_pts + round(t / tb)))
                       for t in info.keyframe_times} - {info.n_frames})

    clips: dict[NodeId, _CopyClip] = {}
    for leaf in leaves:
        a, b = tree.frame_range(leaf)
        i = bisect_right(kf_index, a) - 1
        # Frames before the first keyframe have nothing earlier to cut at:
        # such a clip starts at the first frame.
        s = kf_index[i] if i >= 0 else 0
        j = bisect_left(kf_index, b)
        e = kf_index[j] if j < len(kf_index) else None
        clips[leaf] = _CopyClip(tmp / f"{leaf_name(leaf)}.mp4", int(pts_all[s]),
                                None if e is None else int(pts_all[e]), tb)

    try:
        container = av.open(info.path)
    except Exception as e:
        raise VideoError(info.path, f"cannot open for clip copy: {e}") from None
    order = list(clips.values())   # leaf order: starts never go back in time
    try:
        vstream = next((s for s in container.streams.video if s.index == info.stream_index), None)
        if vstream is None:
            raise VideoError(info.path, "clip copy: the video stream is gone (file changed?)")
        astream = container.streams.audio[0] if container.streams.audio else None
        streams = [vstream] + ([astream] if astream is not None else [])
        opened = 0
        live: list[_CopyClip] = []
        # Newest video dts / audio pts seen, as exact container times.
        last_v = last_a = None
        slack = Fraction(AUDIO_SLACK_S)

        for packet in container.demux(*streams):
            if packet.size == 0 or packet.is_discard:
                continue
            src = packet.stream.index
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                continue
            fields = (packet.pts, packet.dts, packet.duration, packet.time_base)
            t = ts * packet.time_base
            if src == vstream.index:
                dts_t = packet.dts * packet.time_base if packet.dts is not None else t
                last_v = dts_t if last_v is None else max(last_v, dts_t)
            else:
                last_a = t if last_a is None else max(last_a, t)

            while opened < len(order) and order[opened].start_t <= t:
                order[opened].open(av, streams, tb)
                live.append(order[opened])
                opened += 1

            for clip in live:
                if src == vstream.index:
                    clip.copy_video(packet, src, fields, ts)
                elif clip.start_t <= t and (clip.end_t is None or t < clip.end_t):
                    clip.mux(packet, src, fields)

            # Close clips no later packet can reach: decode times only grow,
            # and a frame is never shown before it is decoded.
            still = []
            for clip in live:
                end = clip.end_t
                done = (end is not None and last_v is not None and last_v >= end
                        and (astream is None or (last_a is not None and last_a >= end)
                             or last_v >= end + slack))
                if done:
                    clip.close()
                else:
                    still.append(clip)
            live = still
        for clip in order:
            clip.close()
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoError(info.path, f"clip copy failed (exact clips re-encode any codec): {e}") from None
    finally:
        for clip in order:
            try:
                clip.close()
            except Exception:
                pass  # already failing; the temp folder goes anyway
        container.close()

    ranges = {}
    for leaf, clip in clips.items():
        if clip.min_pts is None:
            raise VideoError(info.path, f"clip copy: no video frames for leaf {leaf_name(leaf)}")
        # The real range: the first copied frame to the end of the last one.
        lo = int(np.searchsorted(pts_all, clip.min_pts))
        hi = int(np.searchsorted(pts_all, clip.max_pts))
        ranges[leaf] = (tree.frame_start_time(lo), tree.frame_start_time(hi + 1))
    return ranges


# -- a span: any stretch of the video as one file -------------------------------


def write_span_clip(info: VideoInfo, start: float, end: float, out: "str | os.PathLike") -> tuple[float, float]:
    """Cut the frames that start inside [start, end) (seconds from the first frame) into `out`,
    re-encoded so the cut is frame-accurate, with the video's first audio track beside them.

    ffmpeg seeks to a keyframe well before the span (a container without an index, such as
    MPEG-TS, may land a keyframe late), then decodes up to the span's first frame; a cut that
    still misses frames is made again decoding from the start. The file appears whole or not at
    all: it is written under a temporary name in the same folder and renamed into place.
    Returns what the clip covers: its first frame's time and the time its last frame ends.
    Raises VideoError with a one-line reason naming the video (no frame starts in the span,
    ffmpeg fails) or OutputError naming `out` (it cannot be written).
    """
    times = info.frame_times
    first = int(np.searchsorted(times, start - SPAN_TOLERANCE_S))
    stop = int(np.searchsorted(times, end - SPAN_TOLERANCE_S))
    if stop <= first:
        raise VideoError(info.path, f"no frame starts between {start:g} s and {end:g} s: nothing to cut")
    covered = (float(times[first]), float(times[stop]) if stop < info.n_frames else info.duration)
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")  # the suffix tells ffmpeg the format
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for keyframe in dict.fromkeys((_keyframe_before(info, first), 0.0)):  # the second: from the start
            _cut_span(info, covered, keyframe, tmp)
            frames = _video_packets(str(tmp))
            if frames == stop - first:
                break
        else:
            raise VideoError(info.path, f"cutting {covered[0]:g}-{covered[1]:g} s: the clip holds {frames} frames "
                                        f"instead of {stop - first}")
        os.replace(tmp, out)
    except OSError as e:
        raise output_error(out, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return covered


def _keyframe_before(info: VideoInfo, index: int) -> float:
    """The time of the keyframe before the one that frame `index` decodes from (0 near the start):
    a seek there that lands a keyframe late still starts decoding at or before the frame."""
    keyframes = info.keyframe_times
    at = bisect_right(keyframes, float(info.frame_times[index]) + SPAN_TOLERANCE_S) - 1
    return float(keyframes[at - 1]) if at >= 1 else 0.0


def _cut_span(info: VideoInfo, covered: tuple[float, float], keyframe: float, tmp: Path) -> None:
    """One ffmpeg run: seek to `keyframe` (0: read from the start), decode up to the span, encode it."""
    offset = _first_frame_offset(info)
    gaps = np.diff(info.frame_times)
    # Start a hair before the first frame, so rounding cannot drop it, and far less than a
    # frame, so the frame before it stays out.
    margin = min(1e-3, float(gaps.min()) / 4) if len(gaps) else 1e-3
    seek = max(0.0, offset + keyframe - margin) if keyframe > 0 else 0.0
    skip = max(0.0, offset + covered[0] - margin - seek)
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
           *(["-ss", f"{seek:.6f}"] if seek > 0 else []), "-i", info.path,
           "-ss", f"{skip:.6f}", "-t", f"{covered[1] - covered[0]:.6f}",
           "-map", f"0:{info.stream_index}", "-map", "0:a:0?",
           "-fps_mode", "passthrough", "-enc_time_base", "-1", *REENCODE, str(tmp)]
    timeout = ENCODE_TIMEOUT_BASE_S + ENCODE_TIMEOUT_PER_S * (covered[1] - keyframe)
    _run_ffmpeg(info, cmd, timeout, f"cutting {covered[0]:g}-{covered[1]:g} s")


def _video_packets(path: str) -> int:
    """How many frames a file's first video stream holds (0 when it has none or cannot be read)."""
    cmd = ["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0",
           "-show_entries", "stream=nb_read_packets", "-of", "json", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        streams = json.loads(proc.stdout or "{}").get("streams") or [{}]
        return int(streams[0].get("nb_read_packets") or 0)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0

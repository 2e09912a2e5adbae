"""Probing: what a video file holds, and the exact timestamp of every frame.

ffprobe gives container and stream facts (codec, rotation, streams, declared
frame count); a PyAV packet scan (demux only, no decoding) gives every video
frame's presentation time. Frame times come from the packets, not from an fps,
so variable-frame-rate video gets a correct tree.

Probing reports what can be read and leaves judging it to the caller: a header
that lists a few more frames than the packets hold (edit lists hide some, real
files lose a tail) and a demux error partway (the frames before it are kept)
are facts in VideoInfo, not errors.
"""

from __future__ import annotations

import functools

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

FINGERPRINT_CHUNK = 1 << 20  # bytes hashed from each end of the file
PROBE_TIMEOUT_S = 120


class VideoError(Exception):
    """A video cannot be used. The message is one line naming the file and why."""

    def __init__(self, path: "str | os.PathLike", reason: str):
        self.path = str(path)
        self.reason = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
        super().__init__(f"{self.path}: {self.reason}")


def video_fingerprint(path: "str | os.PathLike") -> str:
    """Content id: a hash of the size and the first and last MiB.

    A moved or renamed file keeps its id (and so its frames and captions);
    reading 2 MiB is instant even for multi-GB files.
    """
    h = hashlib.blake2b(digest_size=12)
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_CHUNK))
        if size > FINGERPRINT_CHUNK:
            f.seek(max(FINGERPRINT_CHUNK, size - FINGERPRINT_CHUNK))
            h.update(f.read(FINGERPRINT_CHUNK))
    return h.hexdigest()


@dataclass
class VideoInfo:
    path: str
    video_id: str
    size_bytes: int
    container: str
    codec: str
    stream_index: int
    width: int               # coded size
    height: int
    display_width: int       # after sample aspect ratio and rotation
    display_height: int
    rotation: int            # degrees clockwise to turn decoded frames upright: 0, 90, 180, 270
    fps: float               # average over the stream
    vfr: bool
    n_frames: int
    duration: float          # seconds, first frame start to last frame end
    start_time: float        # absolute time of the first frame in the container
    time_base: Fraction
    frame_pts: np.ndarray = field(repr=False)     # per frame, presentation order, stream ticks
    frame_times: np.ndarray = field(repr=False)   # per frame, seconds from the first frame
    keyframe_times: list[float] = field(repr=False, default_factory=list)
    declared_frames: int = 0  # the header's frame count (0: none given)
    demux_error: str = ""     # why the packet scan stopped early ("" when it read to the end)
    has_audio: bool = False
    streams: list[dict] = field(default_factory=list)

    @functools.cached_property
    def keyframe_indices(self) -> list[int]:
        """Sorted frame indices of the keyframes (the times above come from the same pts arithmetic)."""
        found = self.frame_times.searchsorted(self.keyframe_times)
        return sorted({int(i) for i in found if i < self.n_frames})

    @property
    def unreadable_frames(self) -> int:
        """Frames the header lists beyond those that can be read (a lost tail)."""
        return max(0, self.declared_frames - self.n_frames)

    def summary(self) -> dict:
        """The facts a record carries about its video."""
        return {
            "duration": round(self.duration, 3), "fps": round(self.fps, 3),
            "n_frames": self.n_frames, "width": self.display_width,
            "height": self.display_height, "rotation": self.rotation,
            "vfr": self.vfr, "codec": self.codec, "has_audio": self.has_audio,
        }


def _ffprobe(path: str) -> dict:
    cmd = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except FileNotFoundError:
        raise VideoError(path, "ffprobe is not installed (install ffmpeg)") from None
    except subprocess.TimeoutExpired:
        raise VideoError(path, f"ffprobe did not finish within {PROBE_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        reason = msg[-1] if msg else "ffprobe failed"
        # ffprobe prefixes its message with the path; keep only the reason.
        reason = reason.split(": ", 1)[1] if reason.startswith(path) and ": " in reason else reason
        raise VideoError(path, f"not a readable video ({reason})")
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise VideoError(path, "ffprobe gave unreadable output") from None


def probe_duration(path: "str | os.PathLike") -> float:
    """A video's declared duration in seconds, from ffprobe alone (fast; for estimates)."""
    spath = str(path)
    meta = _ffprobe(spath)
    for value in [(meta.get("format") or {}).get("duration")] + [
            s.get("duration") for s in meta.get("streams", []) if s.get("codec_type") == "video"]:
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    raise VideoError(spath, "no duration known")


def _rotation(stream: dict) -> int:
    """Clockwise degrees that turn decoded frames upright, from the display matrix."""
    rot = None
    for sd in stream.get("side_data_list", []) or []:
        if "rotation" in sd:
            rot = float(sd["rotation"])
    if rot is None and "rotate" in (stream.get("tags") or {}):
        # Old-style tag is already clockwise.
        return int(round(float(stream["tags"]["rotate"]))) % 360
    if rot is None:
        return 0
    # The display matrix angle is counter-clockwise.
    return int(round(-rot)) % 360


def _sar(stream: dict) -> Fraction:
    raw = stream.get("sample_aspect_ratio") or "1:1"
    try:
        num, den = (int(x) for x in raw.split(":"))
        return Fraction(num, den) if num > 0 and den > 0 else Fraction(1)
    except ValueError:
        return Fraction(1)


def probe_video(path: "str | os.PathLike") -> VideoInfo:
    """Probe a video file. Raises VideoError with a one-line reason on any problem."""
    import av  # PyAV: demux-only scan for per-frame timestamps
    import numpy as np  # here, so option parsing (`lvr --help`) never loads numpy

    p = Path(path)
    spath = str(p)
    if not p.exists():
        raise VideoError(spath, "no such file")
    if p.is_dir():
        raise VideoError(spath, "is a directory, not a video file")
    size = p.stat().st_size
    if size == 0:
        raise VideoError(spath, "empty file (0 bytes)")

    meta = _ffprobe(spath)
    streams = meta.get("streams", [])
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not (s.get("disposition") or {}).get("attached_pic")]
    if not videos:
        kinds = sorted({s.get("codec_type", "?") for s in streams})
        what = f"only {', '.join(kinds)} streams" if kinds else "no streams"
        raise VideoError(spath, f"no video stream ({what})")
    vs = videos[0]
    declared = int(vs.get("nb_frames") or 0)

    try:
        container = av.open(spath)
    except Exception as e:  # PyAV raises several error types
        raise VideoError(spath, f"cannot open: {e}") from None
    try:
        stream = next(s for s in container.streams.video if s.index == vs["index"])
        time_base = stream.time_base or Fraction(1, 90000)
        pts, durations, keys = [], [], []
        demux_error = ""
        try:
            for pkt in container.demux(stream):
                if pkt.size == 0 or pkt.is_discard:
                    continue  # flush packets, and frames an edit list hides
                ts = pkt.pts if pkt.pts is not None else pkt.dts
                if ts is None:
                    continue
                pts.append(ts)
                durations.append(pkt.duration or 0)
                if pkt.is_keyframe:
                    keys.append(ts)
        except Exception as e:  # keep the frames before a damaged or truncated tail
            demux_error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        container.close()

    if not pts:
        raise VideoError(spath, f"damaged or truncated: {demux_error}" if demux_error
                         else "video stream has no frames")
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    frame_pts = np.asarray(pts, dtype=np.int64)[order]
    keep = np.concatenate([[True], np.diff(frame_pts) > 0])  # drop duplicate timestamps
    frame_pts = frame_pts[keep]
    tb = float(time_base)
    first = int(frame_pts[0])
    frame_times = (frame_pts - first) * tb

    diffs = np.diff(frame_times)
    last_dur = float(np.asarray(durations, dtype=np.int64)[order][keep][-1]) * tb
    if last_dur <= 0:
        last_dur = float(np.median(diffs)) if len(diffs) else 1.0 / 25
    duration = float(frame_times[-1] + last_dur)
    vfr = bool(len(diffs) > 1 and np.max(np.abs(diffs - np.median(diffs))) > 0.1 * np.median(diffs))
    fps = (len(frame_pts) / duration) if duration > 0 else 0.0

    width, height = int(vs.get("width") or 0), int(vs.get("height") or 0)
    if width <= 0 or height <= 0:
        raise VideoError(spath, "video stream has no picture size")
    rotation = _rotation(vs)
    disp_w, disp_h = max(1, round(width * _sar(vs))), height
    if rotation in (90, 270):
        disp_w, disp_h = disp_h, disp_w

    stream_list = [{"index": s.get("index"), "type": s.get("codec_type"),
                    "codec": s.get("codec_name"),
                    "language": (s.get("tags") or {}).get("language")} for s in streams]
    return VideoInfo(
        path=str(p.resolve()), video_id=video_fingerprint(p), size_bytes=size,
        container=(meta.get("format") or {}).get("format_name", ""),
        codec=vs.get("codec_name", ""), stream_index=int(vs["index"]),
        width=width, height=height, display_width=disp_w, display_height=disp_h,
        rotation=rotation, fps=fps, vfr=vfr, n_frames=len(frame_pts), duration=duration,
        start_time=first * tb, time_base=time_base, frame_pts=frame_pts,
        frame_times=frame_times,
        keyframe_times=sorted((k - first) * tb for k in keys),
        declared_frames=declared, demux_error=demux_error,
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
        streams=stream_list,
    )

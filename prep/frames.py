"""Frame extraction in one decoding pass, into a content-addressed JPEG store.

Every frame a tree needs (all levels, and optionally the video_qa frames) is
decoded exactly once, however many levels share it, and resized from the
full-resolution picture once per requested size. Decoding uses libavcodec's
own threads; resizing and JPEG encoding run in a thread pool that overlaps
with decoding (both release the GIL). Packets whose frames nobody needs are
decoded with ``skip_frame=NONREF`` so non-reference frames are skipped
outright, and decoding stops after the last needed frame.
"""

from __future__ import annotations

import io
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .probe import VideoError, VideoInfo

JPEG_QUALITY = 90
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}/[0-9]{1,5}/[0-9]{1,10}\.jpg$")


def frame_key(video_id: str, index: int, side: int) -> str:
    """Store key of one frame at one size: '<video_id>/<longest side>/<index>.jpg'."""
    return f"{video_id}/{side}/{index:08d}.jpg"


class FrameStore:
    """JPEG frames on disk under <cache>/frames, addressed by frame_key().

    Writes go to a temporary name and are renamed into place, so a reader
    never sees half a file and concurrent writers of the same key are harmless.
    """

    def __init__(self, root: "str | os.PathLike"):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        # Keys may come from untrusted records: accept only our own shape.
        if not _KEY_RE.match(key):
            raise ValueError(f"not a frame store key: {key!r}")
        return self.root / key

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def image(self, key: str):
        from PIL import Image

        with Image.open(self.path(key)) as im:
            return im.convert("RGB")


@dataclass(frozen=True)
class FrameRequest:
    index: int  # frame index in presentation order
    side: int   # longest side of the stored image, in pixels (never upscaled)


@dataclass
class ExtractStats:
    requested: int = 0     # distinct (frame, size) pairs asked for
    cached: int = 0        # already in the store
    written: int = 0       # newly encoded
    frames_decoded: int = 0  # frames that came out of the decoder


def effective_side(info: VideoInfo, side: int) -> int:
    """The longest side actually stored: never more than the video's own (no upscaling)."""
    return min(side, max(info.display_width, info.display_height))


def output_size(info: VideoInfo, side: int) -> tuple[int, int]:
    """Upright (width, height) with the longest side `side`, keeping the display aspect."""
    dw, dh = info.display_width, info.display_height
    side = effective_side(info, side)
    if dw >= dh:
        return side, max(1, round(dh * side / dw))
    return max(1, round(dw * side / dh)), side


def encode_frame(frame, info: VideoInfo, sides: list[int], quality: int) -> list[tuple[int, bytes]]:
    """Resize a decoded frame to each longest side, turn it upright, JPEG-encode it."""
    from PIL import Image

    out = []
    for side in sides:
        w, h = output_size(info, side)
        # Scale in the coded orientation, then turn upright.
        cw, ch = (h, w) if info.rotation in (90, 270) else (w, h)
        img = frame.to_image(width=cw, height=ch, interpolation="AREA")
        if info.rotation == 90:
            img = img.transpose(Image.Transpose.ROTATE_270)
        elif info.rotation == 180:
            img = img.transpose(Image.Transpose.ROTATE_180)
        elif info.rotation == 270:
            img = img.transpose(Image.Transpose.ROTATE_90)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append((side, buf.getvalue()))
    return out


def extract_frames(
    info: VideoInfo,
    requests: Iterable[FrameRequest],
    store: FrameStore,
    *,
    quality: int = JPEG_QUALITY,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ExtractStats:
    """Make sure every requested frame is in the store, decoding the video once.

    `on_progress(n)` is called with the number of newly stored frames as they land.
    Raises VideoError if the video cannot be decoded or requested frames never appear.
    """
    import av

    stats = ExtractStats()
    want: dict[int, list[int]] = {}
    for req in set(requests):
        if not 0 <= req.index < info.n_frames:
            raise ValueError(f"frame {req.index} is outside a {info.n_frames}-frame video")
        stats.requested += 1
        if store.has(frame_key(info.video_id, req.index, req.side)):
            stats.cached += 1
        else:
            want.setdefault(req.index, []).append(req.side)
    if not want:
        return stats

    pts_to_index = {int(p): i for i, p in enumerate(info.frame_pts)}
    wanted_pts = {int(info.frame_pts[i]) for i in want}
    remaining = set(want)
    workers = workers or os.cpu_count() or 2
    # Bound frames in flight: each holds a full-resolution picture.
    slots = threading.BoundedSemaphore(max(4, 4 * workers))
    pending: list[Future] = []

    def store_frame(frame, index: int) -> int:
        for side, data in encode_frame(frame, info, sorted(want[index]), quality):
            store.put(frame_key(info.video_id, index, side), data)
        if on_progress:
            on_progress(len(want[index]))
        return len(want[index])

    try:
        container = av.open(info.path)
    except Exception as e:
        raise VideoError(info.path, f"cannot open: {e}") from None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lvr-jpeg")
    try:
        stream = next(s for s in container.streams.video if s.index == info.stream_index)
        stream.thread_type = "AUTO"
        codec = stream.codec_context
        skipping = None
        decode_order = 0

        def handle(frame) -> None:
            nonlocal decode_order
            stats.frames_decoded += 1
            index = pts_to_index.get(frame.pts) if frame.pts is not None else decode_order
            decode_order += 1
            if index is None or index not in remaining:
                return
            remaining.discard(index)
            slots.acquire()
            fut = pool.submit(store_frame, frame, index)
            fut.add_done_callback(lambda _: slots.release())
            pending.append(fut)

        try:
            for packet in container.demux(stream):
                if not remaining:
                    break
                if packet.size:  # flush packets always decode fully
                    mode = "DEFAULT" if (packet.pts is None or packet.pts in wanted_pts) else "NONREF"
                    if mode != skipping:
                        codec.skip_frame = mode
                        skipping = mode
                for frame in packet.decode():
                    handle(frame)
        except av.error.FFmpegError as e:
            raise VideoError(info.path, f"decoding failed: {e}") from None
        for fut in pending:
            stats.written += fut.result()
    finally:
        pool.shutdown(wait=True)
        container.close()
    if remaining:
        raise VideoError(info.path, f"{len(remaining)} frames could not be decoded "
                                    f"(first missing: frame {min(remaining)})")
    return stats

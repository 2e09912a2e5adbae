"""Frame extraction in one decoding pass, into a content-addressed JPEG store.

Every frame a tree needs (all levels, and optionally the video_qa frames) is
decoded exactly once, however many levels share it, and resized from the
full-resolution picture once per requested size. Decoding uses libavcodec's
own threads; resizing and JPEG encoding run in a thread pool that overlaps
with decoding (both release the GIL). Packets whose frames nobody needs are
decoded with ``skip_frame=NONREF`` so non-reference frames are skipped
outright, and decoding stops after the last needed frame.

Real files have packets that do not decode. The pass goes on past them and
reports the requested frames that never came out whole (`ExtractStats.missing`);
the caller decides what to do about them. `DecodableFrames` and
`extract_frames_at` then decode short spans after a seek, to find neighbours
that do decode and to store them (or to decode a damaged stored frame again).
"""

from __future__ import annotations

import bisect
import errno
import io
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .probe import VideoError, VideoInfo

JPEG_QUALITY = 90
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}/[0-9]{1,5}/[0-9]{1,10}\.jpg$")


def frame_key(video_id: str, index: int, side: int) -> str:
    """Store key of one frame at one size: '<video_id>/<longest side>/<index>.jpg'."""
    return f"{video_id}/{side}/{index:08d}.jpg"


def parse_frame_key(key: str) -> tuple[str, int, int]:
    """'<video_id>/<side>/<index>.jpg' -> (video_id, index, side)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"not a frame store key: {key!r}")
    video_id, side, name = key.split("/")
    return video_id, int(name[:-len(".jpg")]), int(side)


class FrameStoreError(Exception):
    """A frame could not be written to the store. One line naming the store and why."""


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_file(tmp, data)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # never leave a torn file behind
            why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise FrameStoreError(f"frame store {self.root}: cannot write {key}: {why}") from None

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
    decode_errors: int = 0   # packets the decoder rejected (the pass went on)
    missing: list[int] = field(default_factory=list)  # requested frames that never came out whole


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


def _open_video(info: VideoInfo):
    """(container, video stream) for decoding with libavcodec's own threads."""
    import av

    try:
        container = av.open(info.path)
    except Exception as e:  # PyAV raises several error types
        raise VideoError(info.path, f"cannot open: {e}") from None
    stream = next(s for s in container.streams.video if s.index == info.stream_index)
    stream.thread_type = "AUTO"
    return container, stream


def _demux(container, stream, stats: ExtractStats) -> Iterator:
    """Packets in file order. A demux error partway (a truncated or damaged tail)
    ends the stream with the packets read so far, then a flush of the decoder."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError:
            stats.decode_errors += 1
            yield None  # flush what the decoder still holds
            return
        yield packet


def _decode(codec, packet, stats: ExtractStats) -> list:
    """The whole frames one packet (None: a flush) gives. A packet the decoder
    rejects is counted and skipped: its frame, and frames that cannot be
    rebuilt without it, simply never come out."""
    import av

    try:
        frames = codec.decode(packet)
    except av.error.FFmpegError:
        stats.decode_errors += 1
        return []
    stats.frames_decoded += len(frames)
    return [f for f in frames if not f.is_corrupt]


class _JpegWriter:
    """Encodes and stores frames in a thread pool, with a bound on frames in flight."""

    def __init__(self, info: VideoInfo, want: dict[int, list[int]], store: FrameStore, quality: int,
                 workers: int | None, on_progress: Callable[[int], None] | None):
        self.info, self.want, self.store, self.quality = info, want, store, quality
        self.on_progress = on_progress
        workers = workers or os.cpu_count() or 2
        # Bound frames in flight: each holds a full-resolution picture.
        self.slots = threading.BoundedSemaphore(max(4, 4 * workers))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lvr-jpeg")
        self.pending: list[Future] = []

    def _store(self, frame, index: int) -> int:
        sides = sorted(self.want[index])
        for side, data in encode_frame(frame, self.info, sides, self.quality):
            self.store.put(frame_key(self.info.video_id, index, side), data)
        if self.on_progress:
            self.on_progress(len(sides))
        return len(sides)

    def submit(self, frame, index: int) -> None:
        self.slots.acquire()
        fut = self.pool.submit(self._store, frame, index)
        fut.add_done_callback(lambda _: self.slots.release())
        self.pending.append(fut)

    def finish(self) -> int:
        """Frames written. A store that cannot be written ends the video with its reason."""
        try:
            return sum(fut.result() for fut in self.pending)
        except FrameStoreError as e:
            raise VideoError(self.info.path, str(e)) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _plan(info: VideoInfo, requests: Iterable[FrameRequest], store: FrameStore,
          stats: ExtractStats, replace: bool = False) -> dict[int, list[int]]:
    """The sizes still to be made of each frame; `replace` remakes stored ones too."""
    want: dict[int, list[int]] = {}
    for req in set(requests):
        if not 0 <= req.index < info.n_frames:
            raise ValueError(f"frame {req.index} is outside a {info.n_frames}-frame video")
        stats.requested += 1
        if not replace and store.has(frame_key(info.video_id, req.index, req.side)):
            stats.cached += 1
        else:
            want.setdefault(req.index, []).append(req.side)
    return want


def extract_frames(
    info: VideoInfo,
    requests: Iterable[FrameRequest],
    store: FrameStore,
    *,
    quality: int = JPEG_QUALITY,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ExtractStats:
    """Put every requested frame in the store, decoding the video once from the start.

    `on_progress(n)` is called with the number of newly stored frames as they land.
    Frames that never come out of the decoder whole are listed in `missing`;
    raises VideoError only if the video cannot be opened or the store written.
    """
    stats = ExtractStats()
    want = _plan(info, requests, store, stats)
    if not want:
        return stats

    pts_to_index = {int(p): i for i, p in enumerate(info.frame_pts)}
    wanted_pts = {int(info.frame_pts[i]) for i in want}
    container, stream = _open_video(info)

    def decoded():
        codec = stream.codec_context
        skipping = None
        decode_order = 0
        for packet in _demux(container, stream, stats):
            if packet is not None and packet.size:  # flush packets always decode fully
                mode = "DEFAULT" if (packet.pts is None or packet.pts in wanted_pts) else "NONREF"
                if mode != skipping:
                    codec.skip_frame = mode
                    skipping = mode
            for frame in _decode(codec, packet, stats):
                index = pts_to_index.get(frame.pts) if frame.pts is not None else decode_order
                decode_order += 1
                yield index, frame

    try:
        _store_wanted(decoded(), want, _JpegWriter(info, want, store, quality, workers, on_progress), stats)
    finally:
        container.close()
    return stats


def _store_wanted(decoded, want: dict, writer: "_JpegWriter", stats: ExtractStats) -> None:
    """Hand each wanted frame to the writer as it comes out; stop once all have. Sets written and missing."""
    remaining = set(want)
    try:
        for index, frame in decoded:
            if index in remaining:
                remaining.discard(index)
                writer.submit(frame, index)
                if not remaining:
                    break
        stats.written = writer.finish()
    finally:
        writer.close()
    stats.missing = sorted(remaining)


# -- seeking: short spans, for neighbours of bad frames and for repairs ---------------

SEEK_TRIES = 3  # seeks that land after the target before decoding from the start instead


class _SpanDecoder:
    """Decodes spans of frames after a seek to the keyframe before them, skipping nothing.

    Containers whose seeks are unreliable (MPEG-TS lands anywhere) are handled by
    checking where the seek landed: packets are dropped up to a keyframe, and a
    keyframe after the target means seeking further back, at last from the start.
    """

    def __init__(self, info: VideoInfo, *, one_thread: bool = False):
        self.info = info
        self.one_thread = one_thread  # parallel workers each decode on one thread
        self.stats = ExtractStats()
        self.pts_to_index = {int(p): i for i, p in enumerate(info.frame_pts)}
        self.container, self.stream = self._open()

    def _open(self):
        container, stream = _open_video(self.info)
        if self.one_thread:
            stream.thread_type = "SLICE"
            stream.thread_count = 1
        return container, stream

    def close(self) -> None:
        self.container.close()

    def _packets_from(self, target: int) -> Iterator:
        """Packets from a keyframe whose pts is at or before `target`."""
        ticks_per_s = 1 / float(self.info.time_base)
        back = 0
        for _ in range(SEEK_TRIES):
            self.container.seek(max(int(target - back), int(self.info.frame_pts[0])), stream=self.stream,
                                backward=True)
            packets = _demux(self.container, self.stream, self.stats)
            first = next((p for p in packets if p is None or (p.size and p.is_keyframe)), None)
            landed = None if first is None else (first.pts if first.pts is not None else first.dts)
            if landed is not None and landed <= target:
                yield first
                yield from packets
                return
            back = max(2 * back, 10 * ticks_per_s)
        self.container.close()  # no seek landed early enough: decode from the very start
        self.container, self.stream = self._open()
        yield from _demux(self.container, self.stream, self.stats)

    def span(self, first: int, last: int, wanted_pts: set[int] | None = None) -> Iterator[tuple[int, object]]:
        """(index, frame) for the frames first..last that come out of the decoder whole.

        With `wanted_pts`, frames nobody wants are skipped where no other frame needs them
        (`skip_frame=NONREF`, as in `extract_frames`), so they may not come out at all.
        """
        codec = self.stream.codec_context
        codec.skip_frame = "DEFAULT"
        skipping = "DEFAULT"
        for packet in self._packets_from(int(self.info.frame_pts[first])):
            codec = self.stream.codec_context  # the stream is new after a restart
            if wanted_pts is not None and packet is not None and packet.size:
                mode = "DEFAULT" if (packet.pts is None or packet.pts in wanted_pts) else "NONREF"
                if mode != skipping or codec.skip_frame != mode:
                    codec.skip_frame = skipping = mode
            for frame in _decode(codec, packet, self.stats):
                index = self.pts_to_index.get(frame.pts) if frame.pts is not None else None
                if index is None or index < first:
                    continue
                if index > last:  # frames come out in presentation order
                    return
                yield index, frame


    def keyframe(self, index: int) -> Iterator[tuple[int, object]]:
        """(index, frame) for one keyframe, decoded alone: its packet, then a flush (the packets
        behind it are not needed to finish it). Nothing when it is not where the probe saw it."""
        import av

        target = int(self.info.frame_pts[index])
        try:
            self.container.seek(target, stream=self.stream, backward=True)
        except av.error.FFmpegError:
            self.stats.decode_errors += 1
            return
        codec = self.stream.codec_context
        codec.skip_frame = "DEFAULT"
        for packet in _demux(self.container, self.stream, self.stats):
            if packet is None:
                return
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None or pts < target or not packet.size:
                continue  # a seek may land a little early
            if pts > target or not packet.is_keyframe:
                return
            for frame in _decode(codec, packet, self.stats) + _decode(codec, None, self.stats):
                if frame.pts == target:
                    yield index, frame
            return


class DecodableFrames:
    """Which frames of a video come out of the decoder whole, learnt on demand.

    Asking about a frame nobody has tried decodes the WINDOW frames either side
    of it after a seek; a frame that does not come out there is not decodable.
    Use as a context manager (it holds the video open).
    """

    WINDOW = 32

    def __init__(self, info: VideoInfo):
        import numpy as np  # here, so option parsing (`lvr --help`) never loads numpy

        self.info = info
        self.state = np.zeros(info.n_frames, dtype=np.int8)  # 0 not tried, 1 whole, -1 not decodable
        self._decoder: _SpanDecoder | None = None

    def __enter__(self) -> "DecodableFrames":
        return self

    def __exit__(self, *exc) -> None:
        if self._decoder is not None:
            self._decoder.close()

    def __call__(self, index: int) -> bool:
        if self.state[index] == 0:
            self._learn(index)
        return bool(self.state[index] == 1)

    def _learn(self, index: int) -> None:
        if self._decoder is None:
            self._decoder = _SpanDecoder(self.info)
        a = max(0, index - self.WINDOW)
        b = min(self.info.n_frames - 1, index + self.WINDOW)
        whole = [i for i, _ in self._decoder.span(a, b)]
        untried = self.state[a:b + 1] == 0
        self.state[a:b + 1][untried] = -1
        self.state[[i for i in whole if untried[i - a]]] = 1


def extract_frames_at(info: VideoInfo, requests: Iterable[FrameRequest], store: FrameStore, *,
                      quality: int = JPEG_QUALITY, replace: bool = False,
                      on_progress: Callable[[int], None] | None = None, workers: int | None = None) -> ExtractStats:
    """Store a few frames by seeking to each (for substitutes and repairs), not by a whole pass.

    Frames close together share one span of decoding. `replace` remakes frames
    already stored (a damaged file is overwritten atomically). Frames that do
    not come out whole are listed in `missing`; `on_progress` as in `extract_frames`. Spans are
    decoded by up to `workers` parallel decoders (default: one per core).
    """
    stats = ExtractStats()
    want = _plan(info, requests, store, stats, replace)
    if not want:
        return stats
    keyframes = info.keyframe_indices
    spans = _spans(sorted(want), keyframes)
    wanted_pts = {int(info.frame_pts[i]) for i in want}
    writer = _JpegWriter(info, want, store, quality, None, on_progress)
    _store_wanted(_decode_spans(info, spans, wanted_pts, set(keyframes), stats, workers), want, writer, stats)
    return stats


# Spans per worker below which one decoder with libavcodec's own threads does as well.
SPANS_PER_WORKER = 4


def _decode_spans(info: VideoInfo, spans: list[tuple[int, int]], wanted_pts: set[int], keyframes: set[int],
                  stats: ExtractStats, workers: int | None = None) -> Iterator[tuple[int, object]]:
    """(index, frame) for the frames of every span, in completion order.

    Spans start at a keyframe's group of pictures and do not depend on each other, so they are
    split over parallel workers, each decoding on one thread (QuickVideo's keyframe-parallel
    decoding); a few spans go to one decoder with frame threads instead.
    """
    import queue

    workers = max(1, min(workers or os.cpu_count() or 1, len(spans) // SPANS_PER_WORKER))

    def run(decoder: _SpanDecoder, chunk: list[tuple[int, int]]) -> Iterator[tuple[int, object]]:
        for first, last in chunk:
            if first == last and first in keyframes:
                yield from decoder.keyframe(first)
            else:
                yield from decoder.span(first, last, wanted_pts)

    def merge(decoder: _SpanDecoder) -> None:
        stats.frames_decoded += decoder.stats.frames_decoded
        stats.decode_errors += decoder.stats.decode_errors

    if workers == 1:
        decoder = _SpanDecoder(info)
        try:
            yield from run(decoder, spans)
        finally:
            decoder.close()
            merge(decoder)
        return

    done: queue.Queue = queue.Queue(maxsize=4 * workers)  # bounded: each frame is a full picture
    stop = threading.Event()
    decoders: list[_SpanDecoder] = []

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                done.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work(chunk: list[tuple[int, int]]) -> None:
        try:
            decoder = _SpanDecoder(info, one_thread=True)
            decoders.append(decoder)
            try:
                for item in run(decoder, chunk):
                    if not hand_over(item):
                        return
            finally:
                decoder.close()
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
            hand_over(e)
        finally:
            hand_over(None)

    # Interleaved, so each worker's share spreads over the video (and so over its costly parts).
    threads = [threading.Thread(target=work, args=(spans[w::workers],), name="lvr-decode", daemon=True)
               for w in range(workers)]
    for t in threads:
        t.start()
    finished = 0
    try:
        while finished < len(threads):
            item = done.get()
            if item is None:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()  # the consumer may stop early: workers see this and end
        for t in threads:
            t.join()
        for decoder in decoders:
            merge(decoder)


def _spans(indices: list[int], keyframes: list[int]) -> list[tuple[int, int]]:
    """Group sorted frame indices into spans; a keyframe between two frames starts a new span
    (seeking there costs no more than decoding on). `keyframes`: sorted frame indices."""
    spans: list[tuple[int, int]] = []
    for i in indices:
        after = bisect.bisect_right(keyframes, spans[-1][1]) if spans else 0
        if spans and not (after < len(keyframes) and keyframes[after] <= i):
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return spans

"""Frames read from the store are checked before use, and healed from the video when damaged.

A crash, a full disk or a bad copy can leave a stored JPEG missing, empty or
cut short. Every read that feeds a model goes through `read_node_frames`: a
frame that is not a whole JPEG is decoded again from the video the node record
names (its `path`) and replaced atomically, so a damaged file is never sent.

The check is cheap: the SOI/EOI markers and PIL's header parse (`verify`) take
about 0.02 ms for a 512 px frame. A full decode takes 0.8 ms and catches no
more: a cut-short file has lost its EOI marker already.

Records of a lazily planned tree (`lazy_frames`, see prep/segment.py) may name
frames nobody has decoded yet: `read_node_frames` decodes a missing one as the
first use of the node's frames (`frames_on_demand`), not as a repair.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from .frames import (JPEG_QUALITY, FrameRequest, FrameStore, FrameStoreError, extract_frames_at, frame_key,
                     parse_frame_key)
from .probe import VideoError, VideoInfo, probe_video

log = logging.getLogger(__name__)

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


class FrameRepairError(Exception):
    """A stored frame is damaged and cannot be decoded again. One line."""


def jpeg_problem(data: bytes) -> str | None:
    """Why these bytes are not a whole JPEG, or None when they are."""
    from PIL import Image

    if not data:
        return "empty"
    if data[:2] != JPEG_SOI:
        return "not a JPEG"
    if data[-2:] != JPEG_EOI:
        return "truncated"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a bad header
        return f"unreadable ({type(e).__name__})"
    return None


def _read(store: FrameStore, key: str) -> tuple[bytes, str | None]:
    """A stored frame and what is wrong with it (None: nothing)."""
    try:
        data = store.get(key)
    except FileNotFoundError:
        return b"", "missing"
    except OSError as e:
        return b"", f"unreadable ({e.strerror})"
    return data, jpeg_problem(data)


_probe_lock = threading.Lock()
_probed: dict[tuple[str, int, int], VideoInfo] = {}


def probe_once(path: Path) -> VideoInfo:
    """Probe a video once per process (repairs of many nodes share it)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _probe_lock:
        if key not in _probed:
            _probed[key] = probe_video(path)
        return _probed[key]


def heal_frames(store: FrameStore, keys: list[str], video_path: "str | os.PathLike | None",
                quality: int = JPEG_QUALITY) -> None:
    """Decode these frames again from their video and put them in the store, replacing what is there."""
    if not keys:
        return
    first = keys[0]
    if not video_path:
        raise FrameRepairError(f"{store.path(first)} needs decoding again, but the record names no video")
    try:
        info = probe_once(Path(video_path))
        video_id = parse_frame_key(first)[0]
        if info.video_id != video_id:
            raise FrameRepairError(f"{store.path(first)} needs decoding again, but {video_path} "
                                   f"is not the video it came from")
        requests = []
        for key in keys:
            _, index, side = parse_frame_key(key)
            requests.append(FrameRequest(index, side))
        stats = extract_frames_at(info, requests, store, quality=quality, replace=True)
    except OSError as e:
        raise FrameRepairError(f"{store.path(first)} needs decoding again, but {video_path} "
                               f"cannot be read ({e.strerror})") from None
    except (VideoError, FrameStoreError, ValueError) as e:
        raise FrameRepairError(f"{store.path(first)} needs decoding again, but: {e}") from None
    if stats.missing:
        raise FrameRepairError(f"{store.path(first)} needs decoding again, but frame {stats.missing[0]} "
                               f"of {video_path} does not decode")
    log.warning("frame store: decoded %d damaged frame(s) again from %s", len(set(keys)), video_path)


def _quality(node: dict) -> int:
    """The JPEG quality the node's frames are stored at."""
    return ((node.get("producer") or {}).get("options") or {}).get("jpeg_quality") or JPEG_QUALITY


# One decoder per video at a time: each extraction already uses every core, and readers then
# get their nodes in the order they asked (the first high node is captioned while the rest decode).
_decoding: dict[str, threading.Lock] = {}
_decoding_guard = threading.Lock()


def _decoding_lock(video_id: str) -> threading.Lock:
    with _decoding_guard:
        return _decoding.setdefault(video_id, threading.Lock())


def frames_on_demand(store: FrameStore, node: dict, keys: list[str],
                     on_progress: Callable[[int], None] | None = None) -> list[str]:
    """For a lazily planned node: decode its frame sets holding any of `keys` that the store lacks.

    A frame that does not decode is replaced by the nearest of the node that does, and the node
    record is updated in place (segment.extract_node_frames); the keys come back with such
    replacements made. `on_progress(n)` counts frames as they are stored.
    Raises FrameRepairError (one line, naming the node) when it cannot.
    """
    from .segment import LAZY_FRAMES, extract_node_frames

    if not node.get(LAZY_FRAMES) or all(store.has(key) for key in keys):
        return keys
    video = node.get("path")
    if not video:
        raise FrameRepairError(f"{store.path(keys[0])} is not decoded yet, but the record names no video")
    renamed: dict[str, str] = {}
    try:
        with _decoding_lock(str(node.get("video_id"))):
            absent = {key for key in keys if not store.has(key)}  # another reader may have decoded them
            info = probe_once(Path(video)) if absent else None
            if info is not None and info.video_id != node.get("video_id"):
                raise FrameRepairError(f"{video} is not the video node {node.get('id')} was planned from")
            for prefix in ("", "qa_"):
                before = node.get(f"{prefix}frame_keys") or []
                if absent & set(before):  # sets may share keys (a small video caps both sizes alike)
                    absent -= set(before)
                    extract_node_frames(info, node, prefix, store, quality=_quality(node), on_progress=on_progress)
                side = node.get(f"{prefix}image_side")
                renamed.update((frame_key(node["video_id"], i, side), frame_key(node["video_id"], j, side))
                               for i, j in node.get(f"{prefix}substituted_frames") or [])
    except OSError as e:
        raise FrameRepairError(f"{video} cannot be read ({e.strerror})") from None
    except (VideoError, FrameStoreError) as e:
        raise FrameRepairError(str(e)) from None
    return [renamed.get(key, key) for key in keys]


def read_node_frames(store: FrameStore, node: dict, keys: list[str]) -> list[bytes]:
    """The whole JPEGs for a node's frame keys, healing damaged ones from the node's video first
    (and, for a lazily planned node, decoding them on first use: see `frames_on_demand`).

    Raises FrameRepairError (one line) when a frame is damaged and cannot be decoded again,
    and ValueError for a key that is not a frame store key.
    """
    keys = frames_on_demand(store, node, keys)
    frames = [_read(store, key) for key in keys]
    damaged = [key for key, (_, problem) in zip(keys, frames) if problem]
    if not damaged:
        return [data for data, _ in frames]
    heal_frames(store, list(dict.fromkeys(damaged)), node.get("path"), _quality(node))
    out = []
    for key, (data, problem) in zip(keys, frames):
        if problem:
            data, again = _read(store, key)
            if again:
                raise FrameRepairError(f"{store.path(key)} is still {again} after decoding it again")
        out.append(data)
    return out

"""Keyframe sampling: the cheap frames near each sampled time, for a fast first look at a video.

Exact sampling shows a node's frames at evenly spread times, and on a long video
that means decoding nearly all of it: every sampled frame has to be rebuilt from
the keyframe before it. Keyframe sampling moves each sampled time to the
cheapest frame within a tolerance of it:

* the nearest keyframe, when one lies within the tolerance: one frame decoded
  after a seek;
* else (keyframes are sparse: screen recordings, some phone and security
  cameras) the sampled frame itself, decoded forward from the keyframe before
  it. Moving it earlier would save little (the frames before it in its group
  of pictures are decoded for the other samples anyway) and would leave the
  end of the stretch unseen.

Several sampled times may land on one keyframe; a node shows each frame once,
so it can show fewer frames than exact sampling asks for (a 10-minute node of a
video with a keyframe every 10 s shows about 60 frames instead of 128).
The tolerance is never below half the sampling interval: a keyframe that close
is as good a sample of its stretch of video as the exact frame.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

SAMPLING_MODES = ("exact", "keyframe")


@dataclass(frozen=True)
class SnappedFrames:
    indices: list[int]       # distinct frames to show, in time order
    max_offset: float        # largest |picked time - sampled time|, seconds
    keyframes: int           # how many of `indices` are keyframes


def tolerance_for(sampled: Sequence[int], frame_times: Sequence[float], tolerance_s: float) -> float:
    """The tolerance used for one node: `tolerance_s`, but never below half its sampling interval."""
    if len(sampled) < 2:
        return tolerance_s
    interval = (frame_times[sampled[-1]] - frame_times[sampled[0]]) / (len(sampled) - 1)
    return max(tolerance_s, interval / 2)


def snap_to_keyframes(sampled: Sequence[int], frame_times: Sequence[float], keyframes: Sequence[int],
                      frames: tuple[int, int], tolerance_s: float) -> SnappedFrames:
    """The frames of the node `frames` = [start, stop) to show in place of the `sampled` ones.

    `keyframes`: sorted keyframe frame indices of the whole video (VideoInfo.keyframe_indices). Every pick lies in the
    node and within the tolerance (`tolerance_for`) of its sampled time.
    """
    start, stop = frames
    tol = tolerance_for(sampled, frame_times, tolerance_s)
    lo_k, hi_k = bisect.bisect_left(keyframes, start), bisect.bisect_left(keyframes, stop)
    node_keys = keyframes[lo_k:hi_k]
    key_times = [frame_times[k] for k in node_keys]
    picked: set[int] = set()
    max_offset = 0.0
    for i in sampled:
        t = frame_times[i]
        j = _nearest_keyframe(node_keys, key_times, t, tol)
        if j is None:
            j = i  # no keyframe close enough: decode forward to the frame itself
        picked.add(j)
        max_offset = max(max_offset, abs(frame_times[j] - t))
    keys = set(node_keys)
    return SnappedFrames(sorted(picked), round(float(max_offset), 4), sum(1 for j in picked if j in keys))


def _nearest_keyframe(keys: Sequence[int], key_times: Sequence[float], t: float, tol: float) -> int | None:
    pos = bisect.bisect_left(key_times, t)
    best = None
    for p in (pos - 1, pos):
        if 0 <= p < len(keys) and abs(key_times[p] - t) <= tol:
            if best is None or abs(key_times[p] - t) < abs(key_times[best] - t):
                best = p
    return None if best is None else keys[best]


def exact_twin(record: dict) -> dict:
    """A keyframe-sampled node record as exact sampling would give it, for looking up the exact
    caption of the same node (the caption key reads the level, span, frame count and side)."""
    twin = {k: v for k, v in record.items() if k != "frame_sampling"}
    twin["frame_indices"] = [None] * record["frame_sampling"]["asked"]
    return twin

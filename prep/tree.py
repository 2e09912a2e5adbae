"""Tree geometry: the K / K² / K³ clip hierarchy over a video's frames.

Everything here is a pure function of (frame count, frame times, options), so
it is cheap to test exhaustively and every later step agrees on the same tree.

Facts followed (LongVideo-R1, see docs/architecture.md §2.1):

* width ``K = clamp(round((duration / segment_seconds) ** (1/3)), min_width, max_width)``;
* three levels, ids are 1-based tuples ``(h,)``, ``(h, m)``, ``(h, m, l)``;
* each node's frames are split among its K children the way
  ``numpy.array_split`` does (the first ``n % K`` chunks get one extra frame),
  so children tile their parent exactly;
* frames sampled per node uniformly (linspace): 128 / 64 / 32 for
  high / medium / low;
* longest image side ``caption_side / sqrt(s)`` with s = 1, 2, 4 for low,
  medium, high, and a floor of ``min_side``.

A node's span runs from its first frame's timestamp to the next node's first
frame timestamp (the video's end for the last node). Each frame therefore
"owns" the interval up to the next frame, and the spans tile the video with no
gaps. (The reference export format also carries first/last frame times; those
are in the records as ``frame_times``.)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterator, Sequence

from .keyframe_snap import SAMPLING_MODES
from .options import OptionError, check_options, option

NodeId = tuple[int, ...]


class Level(IntEnum):
    HIGH = 1
    MEDIUM = 2
    LOW = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: "str | int | Level") -> "Level":
        if isinstance(value, Level):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(f"unknown level {value!r}; expected high, medium or low") from None


TREE_PANEL = "Tree shape and frames"


@dataclass(frozen=True)
class TreeOptions:
    """How a tree is shaped and sampled. Defaults follow the paper (docs/architecture.md §2.1)."""

    segment_seconds: float = option(16.0, "--segment-seconds", min=0.001, panel=TREE_PANEL,
                                    help="K = clamp(round((duration / this) ** (1/3)), min, max).")
    min_width: int = option(4, "--min-width", min=1, panel=TREE_PANEL,
                            help="Smallest tree width K (MLVU used 3).")
    max_width: int = option(8, "--max-width", min=1, panel=TREE_PANEL, help="Largest tree width K.")
    high_frames: int = option(128, "--high-frames", min=1, panel=TREE_PANEL,
                              help="Frames sampled per high node (what the captioner sees).")
    medium_frames: int = option(64, "--medium-frames", min=1, panel=TREE_PANEL,
                                help="Frames sampled per medium node.")
    low_frames: int = option(32, "--low-frames", min=1, panel=TREE_PANEL, help="Frames sampled per low node.")
    qa_frame_count: int = option(16, "--qa-frame-count", min=1, panel=TREE_PANEL,
                                 help="Frames video_qa sends per leaf.")
    caption_side: int = option(512, "--caption-side", min=1, panel=TREE_PANEL,
                               help="Longest image side at the low level; level s gets this/sqrt(s), s=1,2,4.")
    min_side: int = option(140, "--min-side", min=1, panel=TREE_PANEL, help="Floor on the longest image side.")
    qa_side: int = option(1024, "--qa-side", min=1, panel=TREE_PANEL,
                          help="Longest image side of video_qa frames.")
    frame_sampling: str = option(
        "exact", "--frame-sampling", choices=SAMPLING_MODES, panel=TREE_PANEL,
        help="How high and medium nodes pick their frames: exact (evenly spread, as in the paper) or keyframe "
             "(the nearest keyframe within --keyframe-tolerance of each sampled time: fewer, distinct frames, "
             "and a long video is not decoded in full). Low nodes and video_qa are always exact. Default: "
             "keyframe for ask (a fresh 1-hour video's first request goes out after seconds, not after a full "
             "decode); exact elsewhere (scores and trajectories see the paper's frames, and segment decodes "
             "every level in one pass anyway).")
    keyframe_tolerance: float = option(
        5.0, "--keyframe-tolerance", min=0.0, metavar="SECONDS", panel=TREE_PANEL,
        help="With keyframe sampling: how far a picked frame may be from its sampled time (never less than "
             "half the sampling interval). 5 s is half of x264's default GOP at 25 fps.")

    def __post_init__(self) -> None:
        check_options(self)
        if self.min_width > self.max_width:
            raise OptionError(f"--min-width {self.min_width} is larger than --max-width {self.max_width}")

    def frames_per_node(self, level: Level) -> int:
        return {Level.HIGH: self.high_frames, Level.MEDIUM: self.medium_frames,
                Level.LOW: self.low_frames}[Level(level)]

    def image_side(self, level: Level) -> int:
        """Longest image side sent to the captioner for a node of this level."""
        scale = {Level.LOW: 1, Level.MEDIUM: 2, Level.HIGH: 4}[Level(level)]
        return max(self.min_side, round(self.caption_side / math.sqrt(scale)))


def tree_width(duration_s: float, segment_seconds: float = 16.0,
               min_width: int = 4, max_width: int = 8) -> int:
    """K = clamp(round((duration / segment_seconds) ** (1/3)), min_width, max_width).

    Python's round() (half to even) is used, as the reference does.
    """
    raw = round((max(duration_s, 0.0) / segment_seconds) ** (1.0 / 3.0))
    return int(min(max(raw, min_width), max_width))


def node_count(k: int) -> int:
    """Nodes in a full three-level tree: K + K² + K³."""
    return k + k * k + k * k * k


def split_range(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Split [start, stop) into `parts` contiguous half-open ranges, numpy.array_split style."""
    n = stop - start
    base, extra = divmod(n, parts)
    bounds, a = [], start
    for i in range(parts):
        b = a + base + (1 if i < extra else 0)
        bounds.append((a, b))
        a = b
    return bounds


def _child_of_frame(start: int, stop: int, parts: int, frame: int) -> int:
    """0-based index of the chunk of split_range(start, stop, parts) holding `frame`."""
    base, extra = divmod(stop - start, parts)
    offset = frame - start
    big = extra * (base + 1)
    if offset < big:
        return offset // (base + 1)
    return extra + (offset - big) // base


def sample_indices(start: int, stop: int, count: int) -> list[int]:
    """`count` frame indices spread uniformly over [start, stop).

    Nodes shorter than `count` frames give every frame once, so no frame is
    ever sent twice. Otherwise linspace from first to last frame, rounded;
    the step is then > 1, so the rounded indices are distinct.
    """
    n = stop - start
    if n <= 0:
        return []
    if n <= count:
        return list(range(start, stop))
    import numpy as np  # here, so option parsing (`lvr --help`) never loads numpy

    return [int(i) for i in np.linspace(start, stop - 1, count).round().astype(np.int64)]


def parse_node_id(value: "str | Sequence[int]") -> NodeId:
    """Parse "(2, 3)", "2,3", "2-3" or [2, 3] into a node id (no evaluation)."""
    if isinstance(value, str):
        parts = [p for p in value.replace("(", " ").replace(")", " ")
                 .replace("-", ",").replace(",", " ").split() if p]
        try:
            nums = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"bad node id {value!r}") from None
    else:
        nums = tuple(int(p) for p in value)
    if not 1 <= len(nums) <= 3:
        raise ValueError(f"bad node id {value!r}: needs 1 to 3 parts")
    return nums


def format_node_id(node_id: NodeId) -> str:
    return "(" + ", ".join(str(i) for i in node_id) + ")"


@dataclass(frozen=True)
class Node:
    id: NodeId
    start_frame: int  # first frame index
    stop_frame: int   # one past the last frame index
    start: float      # seconds
    end: float        # seconds

    @property
    def level(self) -> Level:
        return Level(len(self.id))

    @property
    def n_frames(self) -> int:
        return self.stop_frame - self.start_frame


class Tree:
    """A three-level tree over a video's frames.

    `frame_times` are per-frame presentation times in seconds, starting at 0
    and increasing; `duration` is where the last frame ends. Frame rate may
    vary: spans come from the real timestamps, not from an fps.
    """

    def __init__(self, k: int, frame_times: Sequence[float], duration: float):
        import numpy as np

        times = np.asarray(frame_times, dtype=np.float64)
        if k < 1:
            raise ValueError("tree width must be at least 1")
        if len(times) < k ** 3:
            raise ValueError(f"{len(times)} frames cannot fill a K={k} tree, "
                             f"which needs at least K³ = {k ** 3} frames")
        if np.any(np.diff(times) <= 0):
            raise ValueError("frame times must increase strictly")
        if duration <= times[-1]:
            raise ValueError("duration must end after the last frame starts")
        self.k = k
        self.frame_times = times
        self.duration = float(duration)
        self.n_frames = len(times)

    @classmethod
    def for_video(cls, frame_times: Sequence[float], duration: float,
                  options: TreeOptions = TreeOptions()) -> "Tree":
        k = tree_width(duration, options.segment_seconds, options.min_width, options.max_width)
        return cls(k, frame_times, duration)

    # -- ids and frame ranges -------------------------------------------------

    def check_id(self, node_id: NodeId) -> None:
        if not 1 <= len(node_id) <= 3 or any(not 1 <= i <= self.k for i in node_id):
            raise ValueError(f"node id {format_node_id(node_id)} is outside a K={self.k} tree "
                             f"(ids run 1..{self.k}, up to three levels)")

    def frame_range(self, node_id: NodeId) -> tuple[int, int]:
        self.check_id(node_id)
        a, b = 0, self.n_frames
        for i in node_id:
            a, b = split_range(a, b, self.k)[i - 1]
        return a, b

    def frame_start_time(self, index: int) -> float:
        return self.duration if index >= self.n_frames else float(self.frame_times[index])

    def span(self, node_id: NodeId) -> tuple[float, float]:
        a, b = self.frame_range(node_id)
        return self.frame_start_time(a), self.frame_start_time(b)

    def node(self, node_id: NodeId) -> Node:
        a, b = self.frame_range(node_id)
        return Node(tuple(node_id), a, b, self.frame_start_time(a), self.frame_start_time(b))

    def children(self, node_id: NodeId) -> list[NodeId]:
        if len(node_id) >= 3:
            return []
        self.check_id(node_id)
        return [tuple(node_id) + (i,) for i in range(1, self.k + 1)]

    def ids(self, level: Level | None = None) -> Iterator[NodeId]:
        """Node ids in tree order: all high, then all medium, then all low."""
        levels = [Level(level)] if level is not None else list(Level)
        for lv in levels:
            yield from _ids_at_depth(self.k, int(lv))

    def nodes(self, level: Level | None = None) -> Iterator[Node]:
        for node_id in self.ids(level):
            yield self.node(node_id)

    # -- time <-> node --------------------------------------------------------

    def frame_at(self, t: float) -> int:
        """Index of the frame shown at time t (clamped to the video)."""
        i = bisect.bisect_right(self.frame_times, t) - 1
        return min(max(i, 0), self.n_frames - 1)

    def node_at(self, t: float, level: Level = Level.LOW) -> NodeId:
        """The node of `level` whose span holds time t."""
        frame = self.frame_at(t)
        a, b, node_id = 0, self.n_frames, ()
        for _ in range(int(level)):
            c = _child_of_frame(a, b, self.k, frame)
            a, b = split_range(a, b, self.k)[c]
            node_id += (c + 1,)
        return node_id

    def nodes_covering(self, start: float, end: float, level: Level = Level.LOW) -> list[NodeId]:
        """Nodes of `level` whose spans overlap [start, end) by a positive amount.

        An empty interval (end <= start) gives the node holding `start`.
        """
        if end <= start:
            return [self.node_at(start, level)]
        first, last = self.node_at(start, level), self.node_at(end, level)
        out = []
        for node_id in self.ids(level):
            if first <= node_id <= last:
                s, e = self.span(node_id)
                if s < end and e > start:
                    out.append(node_id)
        return out

    # -- sampling -------------------------------------------------------------

    def sampled_frames(self, node_id: NodeId, options: TreeOptions = TreeOptions()) -> list[int]:
        a, b = self.frame_range(node_id)
        return sample_indices(a, b, options.frames_per_node(Level(len(node_id))))

    def qa_frames(self, node_id: NodeId, options: TreeOptions = TreeOptions()) -> list[int]:
        """The frames video_qa sends for a leaf."""
        if len(node_id) != 3:
            raise ValueError("video_qa frames exist only for low-level (leaf) nodes")
        a, b = self.frame_range(node_id)
        return sample_indices(a, b, options.qa_frame_count)


def _ids_at_depth(k: int, depth: int) -> Iterator[NodeId]:
    if depth == 0:
        yield ()
        return
    for prefix in _ids_at_depth(k, depth - 1):
        for i in range(1, k + 1):
            yield prefix + (i,)

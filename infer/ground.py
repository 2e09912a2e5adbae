"""`lvr ground` as a library: find when something happens in one local video, and cut it out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..prep.progress import Reporter
from .ask import answer_record, ask_video
from .navigator import Asked, NavigatorOptions
from .protocol import GROUNDING, format_interval


@dataclass
class SpanClip:
    """The file `--clip` wrote: where, and the stretch of the video it holds (seconds)."""

    path: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_record(self) -> dict:
        return {"path": self.path, "start": round(self.start, 6), "end": round(self.end, 6),
                "duration": round(self.duration, 6)}


@dataclass
class Grounded:
    """One grounding query's run: the navigation, its trace, and the clip when one was asked for."""

    asked: Asked
    trace: dict
    clip: SpanClip | None = None
    clip_error: str | None = None     # why no clip was written: one line naming the clip's path or the video

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.asked.result.interval


def ground_record(grounded: Grounded) -> dict:
    """The lvr.answer/1 record of a grounding query, with the clip written (or null)."""
    return {**answer_record(grounded.asked, grounded.trace),
            "clip": grounded.clip.to_record() if grounded.clip is not None else None}


def cut_span(video: "str | os.PathLike", interval: tuple[float, float], out: "str | os.PathLike") -> SpanClip:
    """Cut an answered interval out of the video into `out` (`prep.clips.write_span_clip`).

    Raises ValueError naming `out` for a point in time (nothing to cut), and VideoError or
    OutputError, one line each, when the video cannot be cut or `out` cannot be written.
    """
    from ..prep.clips import write_span_clip
    from ..prep.probe import probe_video

    start, end = interval
    if end <= start:
        raise ValueError(f"{out}: the answer {format_interval(start, end)} is a single point in time, "
                         "not a span; no clip was written")
    covered = write_span_clip(probe_video(video), start, end, out)
    return SpanClip(str(out), *covered)


def ground_video(video: "str | os.PathLike", query: str, nav: NavigatorOptions, cache_dir: Path, *,
                 subtitles: bool = True, trace_path=None, html_path=None, clip_path=None,
                 reporter: Reporter | None = None) -> Grounded:
    """Navigate the video's caption tree to the interval where `query` happens (`ask_video` with
    the grounding task), write the trace files asked for, and cut the interval into `clip_path`.

    A clip that cannot be made is reported in `clip_error`, beside the answer; nothing is
    written at `clip_path` then. Raises ModelError when an endpoint cannot be reached at all.
    """
    from ..prep.jsonl import OutputError
    from ..prep.probe import VideoError

    asked, trace = ask_video(video, query, (), nav, cache_dir, subtitles=subtitles, trace_path=trace_path,
                             html_path=html_path, reporter=reporter, task=GROUNDING)
    grounded = Grounded(asked, trace)
    if clip_path is not None and grounded.interval is not None:
        try:
            grounded.clip = cut_span(video, grounded.interval, clip_path)
        except (ValueError, VideoError, OutputError) as e:
            grounded.clip_error = str(e)
    return grounded

"""Ground, then answer (LongVTG-R1; issue 15): find the span of the video that answers a question,
then ask the video_qa model the question about frames from that span.

The first stage is a grounding run of the navigator (`run_agent(task="grounding")`, started by
`Navigator.ask`): the same tools and loop, with the question worded as a grounding query (the
profile's `gta_query`) and its options shown. The second stage sends up to `--gta-frames` frames
spread evenly over the answered interval, at the video_qa size (`--qa-side`) and through the frame
store, each labelled with its time, with the question and its options (`Profile.span_query`), in
the profile's video_qa layout; the vision model's reply is the answer. A grounding run that gives
no interval gives no answer: there is no fallback to navigation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..prep.frame_repair import FrameRepairError, probe_once, read_node_frames
from ..prep.frames import DecodableFrames, FrameRequest, FrameStore, FrameStoreError, effective_side, \
    extract_frames_at, frame_key
from ..prep.options import check_options, option
from ..prep.probe import VideoError, VideoInfo
from ..prep.segment import TIME_DECIMALS, choose_substitutes, shown_frames
from ..prep.tree import sample_indices
from .agent import AGENT_PANEL, AgentResult, Stop
from .environment import VideoEnv
from .protocol import QA, extract_choice, format_interval
from .video_qa import VideoQAError

NAVIGATE, GROUND_THEN_ANSWER = "navigate", "ground-then-answer"   # what answered a question (Asked.strategy)


@dataclass(frozen=True)
class AnsweringOptions:
    """How a question is answered: by navigation (the default), or ground-then-answer."""

    ground_then_answer: bool = option(
        False, "--ground-then-answer/--no-ground-then-answer", panel=AGENT_PANEL,
        help="Answer each question in two stages: the navigator first finds the span of the video that "
             "answers it (a grounding run, as `lvr ground`), then the video_qa model answers from up to "
             "--gta-frames frames of that span. No span, no answer: the run fails, named. The trace shows "
             "both stages. Grounding queries are always navigated.")
    gta_frames: int = option(32, "--gta-frames", min=1, panel=AGENT_PANEL,
                             help="With --ground-then-answer: frames sent to the video_qa model, spread evenly "
                                  "over the grounded span (each of its frames once when it has fewer), at the "
                                  "video_qa size (--qa-side).")

    def __post_init__(self) -> None:
        check_options(self)

    def to_record(self) -> dict:
        on = self.ground_then_answer
        return {"strategy": GROUND_THEN_ANSWER if on else NAVIGATE, "gta_frames": self.gta_frames if on else None}


def span_frame_range(frame_times, start: float, end: float) -> tuple[int, int]:
    """The frames [a, b) whose times (as records round them) lie in [start, end]. A span shorter
    than the gap between two frames gets the one frame shown at its start."""
    import numpy as np

    times = np.round(np.asarray(frame_times, dtype=np.float64), TIME_DECIMALS)
    a, b = int(np.searchsorted(times, start, "left")), int(np.searchsorted(times, end, "right"))
    if a >= b:
        a = max(int(np.searchsorted(times, start, "right")) - 1, 0)
        b = a + 1
    return a, b


def span_frames(frame_times, start: float, end: float, count: int) -> list[int]:
    """Up to `count` frames spread evenly over the span (the tree's sampling rule, `sample_indices`)."""
    return sample_indices(*span_frame_range(frame_times, start, end), count)


def _substitutes(info: VideoInfo, interval: tuple[float, float], frames: tuple[int, int], wanted: list[int],
                 missing: list[int], store: FrameStore, side: int, quality: int) -> dict[int, int]:
    """Frames of the span that decode, stored in place of those that do not (as a node's are)."""
    try:
        with DecodableFrames(info) as decodable:
            chosen = choose_substitutes(info, (), interval, frames, wanted, set(missing), decodable)
    except VideoError:
        raise VideoError(info.path, f"no frame of the grounded span {format_interval(*interval)} decodes") from None
    more = extract_frames_at(info, [FrameRequest(j, side) for j in chosen.values()], store, quality=quality)
    if more.missing:
        raise VideoError(info.path, f"frame {more.missing[0]} decoded once but not a second time")
    return chosen


def decode_span(store: FrameStore, video: str, video_id: str, interval: tuple[float, float], count: int,
                side: int, quality: int) -> tuple[dict, list[bytes]]:
    """The span's frames at the video_qa size, decoded into the store (a leaf's stored video_qa
    frames are reused), and a record of them shaped like a node's frame fields.

    VideoError, FrameStoreError, FrameRepairError or OSError (one line) when they cannot be had.
    """
    info = probe_once(Path(video))
    if info.video_id != video_id:
        raise VideoError(video, "is not the video the tree was planned from")
    side = effective_side(info, side)
    a, b = span_frame_range(info.frame_times, *interval)
    wanted = sample_indices(a, b, count)
    stats = extract_frames_at(info, [FrameRequest(i, side) for i in wanted], store, quality=quality)
    chosen = _substitutes(info, interval, (a, b), wanted, stats.missing, store, side, quality) if stats.missing else {}
    shown, substituted = shown_frames(wanted, chosen)
    span = {"path": video, "start": interval[0], "end": interval[1], "image_side": side, "frame_indices": shown,
            "frame_times": [round(float(info.frame_times[i]), TIME_DECIMALS) for i in shown],
            "frame_keys": [frame_key(video_id, i, side) for i in shown], "substituted_frames": substituted,
            "producer": {"options": {"jpeg_quality": quality}}}   # what a repair re-encodes at
    return span, read_node_frames(store, span, span["frame_keys"])


def as_question(grounding: AgentResult, question: str, options: tuple[str, ...], **changes) -> AgentResult:
    """The grounding run's result as the question's: its turns and accounting, the question's text."""
    return replace(grounding, **{"question": question, "options": tuple(options), "task": QA, "answer": None,
                                 "choice": None, **changes})


def no_interval(grounding: AgentResult, question: str, options: tuple[str, ...], why: str) -> AgentResult:
    """The question's result when grounding gave no interval (`why`: what ended the run)."""
    return as_question(grounding, question, options,
                       error=f"ground-then-answer: the grounding stage gave no interval ({why})")


async def answer_from_span(grounding: AgentResult, question: str, options: tuple[str, ...], env: VideoEnv, *,
                           frames: int, qa_side: int, quality: int,
                           on_stage: Callable[[str], None] | None = None) -> tuple[AgentResult, dict]:
    """The second stage: the question about up to `frames` frames of the grounded interval.

    Returns the question's result (the video_qa answer, its option letter; the interval kept) and
    the stage's record for the trace. Failures come back in the result's `error`, never raised.
    The video_qa call's tokens count in `env.qa_usage`.
    """
    started = time.perf_counter()
    start, end = grounding.interval
    qa = env.video_qa
    query = qa.profile.span_query(question, options) if qa is not None else question
    stage: dict = {"interval": [start, end], "question": query}

    def failed(why: str) -> tuple[AgentResult, dict]:
        stage["error"] = why
        return as_question(grounding, question, options, stopped=Stop.ERROR, error=f"ground-then-answer: {why}",
                           seconds=grounding.seconds + time.perf_counter() - started), stage

    if qa is None:
        return failed("no video_qa model is configured")
    if not env.path:
        return failed("the tree's records name no video to take the span's frames from")
    if on_stage is not None:
        on_stage(f"grounded to {format_interval(start, end)}; asking video_qa about up to {frames} frames of it")
    try:
        span, images = await asyncio.to_thread(decode_span, qa.frames, env.path, env.video_id, (start, end),
                                               frames, qa_side, quality)
    except OSError as e:
        return failed(f"{env.path}: cannot read ({e.strerror})")
    except (VideoError, FrameStoreError, FrameRepairError) as e:
        return failed(f"frames: {e}")
    stage.update({k: span[k] for k in ("image_side", "frame_indices", "frame_times", "frame_keys",
                                       "substituted_frames")})
    try:
        text, reply = await qa.ask_frames(span, images, span["frame_times"], query,
                                          f"video_qa on the grounded span {format_interval(start, end)}")
    except VideoQAError as e:
        return failed(str(e))
    env.qa_usage.add(reply.usage, reply.seconds)
    stage.update(answer=text, model=qa.model.name, seconds=round(time.perf_counter() - started, 3),
                 tokens=reply.usage.to_record())
    if not text:
        return failed("the video_qa model gave no answer")
    return as_question(grounding, question, options, answer=text, choice=extract_choice(text, options),
                       stopped=Stop.ANSWERED, error=None,
                       seconds=grounding.seconds + time.perf_counter() - started), stage

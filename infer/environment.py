"""The tool environment: one video's caption tree, where every tool call runs.

`ask`, `eval`, `synthesize` and `rl` rollouts all go through `VideoEnv.call`,
so a rule is enforced (and a caption is fetched) the same way everywhere.
Captions come lazily through the shared caption store, so only the nodes a
model visits are ever captioned.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..prep.captioning import CaptionError, Captioner, node_label
from ..prep.frame_repair import FrameRepairError, frames_on_demand
from ..prep.models.base import Usage
from ..prep.probe import VideoError
from ..prep.segment import LAZY_FRAMES, check_first_level
from ..prep.tree import node_count
from .profiles import LVR_PROFILE, Profile
from .protocol import Breach, ToolCall, correction, format_id
from .video_qa import VideoQA, VideoQAError


class EnvError(Exception):
    """A tool could not run for a reason outside the model's control (a model or store failed)."""


@dataclass
class Visit:
    """One executed tool call."""

    order: int
    tool: str
    node: tuple[int, ...]
    start: float
    end: float
    cached: bool | None = None      # get_caption: served from the store
    query: str | None = None        # video_qa
    seconds: float = 0.0

    def to_record(self) -> dict:
        d = asdict(self)
        d["node"] = list(self.node)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class ToolOutcome:
    text: str                       # what the model reads next (a result or a correction)
    visit: Visit | None = None
    breach: str | None = None


@dataclass
class RoleUsage:
    """Tokens and seconds one model role spent on one question."""

    model: str = ""
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0

    def add(self, usage: Usage, seconds: float) -> None:
        self.usage.add(usage)
        self.seconds += seconds

    def to_record(self) -> dict:
        return {"model": self.model, **self.usage.to_record(), "seconds": round(self.seconds, 3)}


def check_tree(nodes: list[dict]) -> tuple[str, int]:
    """(video_id, K) of a complete tree's node records, or ValueError saying what is wrong."""
    if not nodes:
        raise ValueError("no node records")
    video_ids = {n.get("video_id") for n in nodes}
    if len(video_ids) != 1:
        raise ValueError(f"node records of {len(video_ids)} videos given for one tree")
    k = nodes[0].get("K")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"bad K {k!r} in the node records")
    ids = {tuple(n.get("id") or ()) for n in nodes}
    if len(ids) != node_count(k):
        raise ValueError(f"{len(ids)} nodes given, but a K={k} tree has {node_count(k)}")
    return video_ids.pop(), k


class VideoEnv:
    """Tools over one video's tree, for one question: records every visit."""

    def __init__(self, nodes: list[dict], captioner: Captioner, video_qa: VideoQA | None = None,
                 profile: Profile = LVR_PROFILE):
        self.video_id, self.k = check_tree(nodes)
        self.profile = profile      # how tool results are worded (the rules are the same for every profile)
        self.nodes = {tuple(n["id"]): n for n in nodes}
        first = nodes[0]
        self.path = first.get("path")
        video = first.get("video") or {}
        self.duration = float(video.get("duration") or max(n["end"] for n in nodes))
        self.captioner = captioner
        self.video_qa = video_qa
        self.visits: list[Visit] = []
        self.captions: dict[tuple[int, ...], str] = {}   # every caption this question has seen
        self.caption_made = 0
        self.caption_cached = 0
        self.caption_usage = RoleUsage(captioner.model.name)
        self.qa_usage = RoleUsage(video_qa.model.name if video_qa else "")
        self._low_read: set[tuple[int, ...]] = set()
        # Progress of the first level's decoding (`lvr ask` shows it): frames to decode, frames stored.
        self.on_plan: Callable[[int], None] | None = None
        self.on_frames: Callable[[int], None] | None = None

    def node(self, node_id) -> dict:
        return self.nodes[tuple(node_id)]

    async def caption(self, node_id) -> str:
        """A node's caption through the store; counts a made or cached caption call."""
        node = self.node(node_id)
        try:
            result = await self.captioner.get_or_make(node)
        except CaptionError as e:
            raise EnvError(str(e)) from None
        if result.cached:
            self.caption_cached += 1
        else:
            self.caption_made += 1
            self.caption_usage.add(result.usage, result.seconds)
        self.captions[tuple(node_id)] = result.caption
        return result.caption

    async def high_captions(self) -> list[tuple[tuple[int, ...], float, float, str]]:
        """(id, start, end, caption) of the K high nodes, for the first prompt (times as the profile shows them).

        High nodes without a stored caption have their frames decoded one node after another, and each
        is captioned as soon as its own frames are in: the first prompt waits for the slower of decoding
        and captioning, not for their sum. Then the whole-video bad-frame rule is judged on them.
        """
        ids = [(h,) for h in range(1, self.k + 1)]
        frames = self.captioner.frames
        # A captioner that reads captions from files needs no frames: a node its file lacks fails unread.
        todo = {i for i in ids if self.node(i).get(LAZY_FRAMES) and self.captioner.cached(self.node(i)) is None
                and not self.captioner.reads_files}
        if todo and self.on_plan is not None:
            self.on_plan(sum(1 for i in todo for key in self.node(i).get("frame_keys") or [] if not frames.has(key)))
        tasks: list[asyncio.Task] = []
        try:
            for i in ids:
                node = self.node(i)
                if i in todo:
                    try:
                        await asyncio.to_thread(frames_on_demand, frames, node, node.get("frame_keys") or [],
                                                self.on_frames)
                    except FrameRepairError as e:
                        raise EnvError(f"{node_label(node, 'caption')}: frames: {e}") from None
                tasks.append(asyncio.create_task(self.caption(i)))
            if todo:
                try:
                    check_first_level([self.node(i) for i in ids])
                except VideoError as e:
                    raise EnvError(str(e)) from None
            captions = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [(i, *self.profile.span(self.node(i)), c) for i, c in zip(ids, captions)]

    async def call(self, call: ToolCall) -> ToolOutcome:
        """Run a parsed tool call. Rule breaches come back as corrections; EnvError on failure."""
        node_id = tuple(call.node)
        if node_id not in self.nodes:  # the parser checks 1..K; this guards other callers
            return ToolOutcome(correction(Breach.OUT_OF_RANGE, node=format_id(node_id), K=self.k),
                               breach=Breach.OUT_OF_RANGE)
        node = self.node(node_id)
        started = time.perf_counter()
        if call.tool == "get_caption":
            cached_before = self.caption_cached
            text = await self.caption(node_id)
            if len(node_id) == 3:
                self._low_read.add(node_id)
            visit = Visit(len(self.visits) + 1, "get_caption", node_id, node["start"], node["end"],
                          cached=self.caption_cached > cached_before)
        elif call.tool == "video_qa":
            if node_id not in self._low_read:
                return ToolOutcome(correction(Breach.QA_BEFORE_CAPTION, node=format_id(node_id)),
                                   breach=Breach.QA_BEFORE_CAPTION)
            if self.video_qa is None:
                raise EnvError("video_qa was called but no video_qa model is configured")
            try:
                # A lazily planned leaf's frames are decoded off the event loop, and a bad one replaced
                # (its record updated), before video_qa reads the record's frame times.
                await asyncio.to_thread(frames_on_demand, self.video_qa.frames, node, node.get("qa_frame_keys") or [])
                text, reply = await self.video_qa.ask(node, call.query or "")
            except VideoQAError as e:
                raise EnvError(str(e)) from None
            except FrameRepairError as e:
                raise EnvError(f"{node_label(node, 'video_qa')}: frames: {e}") from None
            self.qa_usage.add(reply.usage, reply.seconds)
            visit = Visit(len(self.visits) + 1, "video_qa", node_id, node["start"], node["end"],
                          query=call.query)
        else:
            return ToolOutcome(correction(Breach.UNKNOWN_TOOL, name=call.tool), breach=Breach.UNKNOWN_TOOL)
        visit.seconds = time.perf_counter() - started
        self.visits.append(visit)
        return ToolOutcome(self.profile.tool_result(call.tool, node_id, *self.profile.span(node), text,
                                                    query=call.query), visit=visit)

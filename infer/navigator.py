"""A navigator session: the models for each role, the stores, and one agent run per question.

`Navigator` is long-lived, so `eval` (and later `synthesize`) share models,
the caption store and the trees across questions: a second question about a
video costs no decoding and no caption already made.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..prep.caption_store import CaptionStore
from ..prep.caption_step import caption_store_path
from ..prep.captioning import CaptionOptions, Captioner
from ..prep.frames import FrameStore
from ..prep.cache import frames_dir
from ..prep.models import ModelSpec
from ..prep.models.base import ChatModel, ModelError
from ..prep.options import option
from ..prep.keyframe_snap import exact_twin
from ..prep.segment import SegmentOptions, keep_substitutes, load_or_plan
from ..prep.transcribe import Transcription
from ..prep.tree import TreeOptions
from .agent import AgentOptions, AgentResult, OnTurn, Review, Stop, run_agent
from .environment import VideoEnv
from .ground_then_answer import GROUND_THEN_ANSWER, NAVIGATE, AnsweringOptions, answer_from_span, no_interval
from .profiles import Profile, Prompts
from .protocol import GROUNDING, QA
from .video_qa import VideoQA

TRACE_SCHEMA = "lvr.trace/1"


@dataclass(frozen=True)
class CaptionFiles:
    """Captions read from files instead of made by a captioner."""

    captions: Path | None = option(
        None, "--captions", metavar="DIR",
        help="Take every caption from the LongVideo-R1 caption files in DIR (one <video stem>.json per video, as "
             "released) instead of a captioner: no caption model is needed or contacted. A node or video the files "
             "lack fails its question, named. video_qa still needs a vision model (--qa-model).")


@dataclass(frozen=True)
class NavigatorOptions:
    """Everything that decides an answer; recorded with every result so a score can be reproduced."""

    reasoning: ModelSpec = field(default_factory=ModelSpec)
    caption: ModelSpec | None = field(default_factory=ModelSpec)   # None with captions_dir
    qa: ModelSpec | None = field(default_factory=ModelSpec)        # None: no video_qa model
    agent: AgentOptions = field(default_factory=AgentOptions)
    captioning: CaptionOptions = field(default_factory=CaptionOptions)
    tree: TreeOptions = field(default_factory=TreeOptions)
    system_prompt_file: Path | None = None
    caption_prompt_file: Path | None = None
    qa_prompt_file: Path | None = None
    qa_max_tokens: int = 512
    captions_dir: Path | None = None   # `--captions`: captions from these files, no captioner
    transcription: Transcription | None = None   # `--transcribe`: transcripts for videos without subtitles
    answering: AnsweringOptions = field(default_factory=AnsweringOptions)   # navigate, or ground-then-answer

    def __post_init__(self) -> None:
        # A profile whose prompts are not shipped fails here, naming the flags, before anything runs.
        self._prompt_profile().check_prompt_files(self.system_prompt_file, self.caption_prompt_file,
                                                  self.qa_prompt_file)

    def _prompt_profile(self) -> Profile:
        """The profile as far as prompt files go: a role with no model sends no prompt and needs no file."""
        profile = self.agent.profile
        if self.captions_dir is not None:
            profile = replace(profile, caption_system_prompt=profile.caption_system_prompt or "")
        if self.qa is None:
            profile = replace(profile, qa_system_prompt=profile.qa_system_prompt or "")
        return profile

    def prompts(self) -> Prompts:
        """The three system prompts, from the protocol profile or the user's files (ValueError, CaptionError)."""
        return self._prompt_profile().load_prompts(self.system_prompt_file, self.caption_prompt_file,
                                                   self.qa_prompt_file)

    def settings(self, prompts: Prompts, subtitles: bool, captions: dict | None = None) -> dict:
        """`captions`: where the captions came from when they were read from files (`ReleasedCaptioner.record`)."""
        profile = self.agent.profile
        return {
            "lvr": __version__,
            "models": {role: spec.to_record() if spec is not None else None
                       for role, spec in (("reasoning", self.reasoning), ("caption", self.caption), ("qa", self.qa))},
            "protocol": profile.name,
            "prompt_hash": profile.prompt_hash(prompts.system),
            "caption_prompt_hash": captions["prompt_hash"] if captions else profile.caption_prompt_hash(prompts.caption),
            "captions": captions,
            "qa_prompt_hash": profile.qa_prompt_hash(prompts.qa),
            "max_rounds": self.agent.max_rounds, "max_invalid": self.agent.max_invalid,
            "max_tokens": self.agent.max_tokens, "temperature": self.agent.temperature,
            "seed": self.agent.seed,
            "K_bounds": [self.tree.min_width, self.tree.max_width],
            "tree": asdict(self.tree),
            "captioning": asdict(self.captioning), "qa_max_tokens": self.qa_max_tokens,
            "subtitles": subtitles, **self.answering.to_record(),
            **({"transcription": self.transcription.identity()} if self.transcription is not None else {}),
        }


@dataclass(frozen=True)
class AskCallbacks:
    """What a caller may follow of one question, for progress (each is optional).

    `on_plan` and `on_frames` come only when the high nodes' frames must be decoded (as their
    captions are made), `on_frames` from a worker thread; the others from the event loop.
    """

    on_probe: Callable[[], None] | None = None          # the video is being probed and its tree planned
    on_plan: Callable[[int], None] | None = None        # frames to decode
    on_frames: Callable[[int], None] | None = None      # frames decoded since the last call
    on_tree: Callable[[VideoEnv], None] | None = None   # the tree is planned; the K high captions come next
    on_turn: OnTurn | None = None                       # a model turn has ended
    on_stage: Callable[[str], None] | None = None       # ground-then-answer: the answer stage begins (what it does)


@dataclass
class Asked:
    """One question's run: the agent's result and the environment it ran in."""

    result: AgentResult
    env: VideoEnv | None
    settings: dict
    video: str
    error: str | None = None
    segment_seconds: float = 0.0    # loading or segmenting the tree (0 when another question had it)
    first_request_seconds: float | None = None  # from the question to the first reasoning request
    strategy: str = NAVIGATE        # what answered: navigate, or ground-then-answer
    answer_stage: dict | None = None    # ground-then-answer: the span's frames and the video_qa call that answered

    def accounting(self) -> dict:
        """The agent's accounting plus the time spent on the tree; empty when there was no tree.
        Ground-then-answer's video_qa call counts with the others (its tokens are in env.qa_usage)."""
        if self.env is None:
            return {}
        first = None if self.first_request_seconds is None else round(self.first_request_seconds, 3)
        offsets = [n["frame_sampling"]["max_offset"] for i, n in self.env.nodes.items()
                   if i in self.env.captions and n.get("frame_sampling")]
        agent = self.result.accounting(self.env)
        if self.answer_stage is not None and "tokens" in self.answer_stage:
            agent["video_qa_calls"] += 1
        return {**agent, "segment_seconds": round(self.segment_seconds, 3),
                "first_request_seconds": first,
                # the sampling the tree used (keyframe gives way to stored exact captions), and for
                # keyframe sampling how far a shown frame was from its sampled time, at most
                "frame_sampling": "keyframe" if any(n.get("frame_sampling") for n in self.env.nodes.values())
                else "exact",
                "frame_offset_max_seconds": max(offsets) if offsets else None}


class _FirstRequest:
    """A model that notes when its first request is sent (time to the first reasoning request)."""

    def __init__(self, model: ChatModel):
        self.model, self.sent_at = model, None

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    async def complete(self, messages, options):
        if self.sent_at is None:
            self.sent_at = time.perf_counter()
        return await self.model.complete(messages, options)


class Navigator:
    def __init__(self, options: NavigatorOptions, cache_dir: Path):
        self.options = options
        self.cache_dir = Path(cache_dir)
        self.profile = options.agent.profile
        self.prompts = options.prompts()
        self.template = self.prompts.system
        self.frames = FrameStore(frames_dir(self.cache_dir))
        self.store = CaptionStore(caption_store_path(self.cache_dir))
        self._models: dict[ModelSpec, ChatModel] = {}
        self._captioners: dict[bool, Captioner] = {}
        self._trees: dict[str, list[dict]] = {}
        self._tree_locks: dict[str, asyncio.Lock] = {}
        transcription = options.transcription and replace(options.transcription, cache_dir=self.cache_dir)
        self.segment_options = SegmentOptions(tree=options.tree, qa_frames=True, transcription=transcription)
        self.released = None   # --captions: the one captioner, reading the files
        if options.captions_dir is not None:
            from ..prep.longvideo_r1 import ReleasedCaptioner

            self.released = ReleasedCaptioner(options.captions_dir, self.store, self.frames)

    # -- models -------------------------------------------------------------------------

    def model(self, spec: ModelSpec) -> ChatModel:
        """One instance per distinct spec, so a captioner that also answers video_qa loads once."""
        if spec not in self._models:
            self._models[spec] = spec.build()
        return self._models[spec]

    async def preflight(self) -> None:
        """Catch set-up mistakes before any video is decoded: no model, a model that cannot be
        found, an endpoint that cannot be reached, a text-only model in an image role."""
        from ..prep.models import Roles, check_roles
        from ..prep.models.openai_backend import OpenAIChat

        roles = Roles(self.options.reasoning, self.options.caption, self.options.qa)
        await asyncio.to_thread(check_roles, roles)
        seen = set()
        for _, spec in roles.items():   # a role with no model (--captions) is never contacted
            model = self.model(spec)
            if isinstance(model, OpenAIChat) and id(model) not in seen:
                seen.add(id(model))
                await model.check_reachable()
        # A captioner that fell back to the reasoning endpoint may be a text-only navigator:
        # one tiny image finds out before it is sent 128 (which can jam the server).
        for role in ("caption", "qa"):
            spec = getattr(roles, role)
            if spec is not None and roles.owner(role) == "reasoning" and isinstance(self.model(spec), OpenAIChat):
                await self._check_takes_images(roles, role)
                break

    async def _check_takes_images(self, roles, role: str) -> None:
        from ..prep.models import text_only_message
        from ..prep.models.base import GenerationOptions, image_part, probe_images, text_part

        chat = self.model(getattr(roles, role))
        content = [text_part("Reply with OK."), image_part(probe_images(1)[0])]
        try:
            await chat.complete([{"role": "user", "content": content}], GenerationOptions(max_tokens=1))
        except ModelError as e:
            if any(f"HTTP {code}" in str(e) for code in (400, 415, 422)):
                raise ModelError(text_only_message(roles, role, f"its server refuses an image ({e})")) from None

    def captioner(self, subtitles: bool) -> Captioner:
        if self.released is not None:   # the files' text, whatever the subtitles
            return self.released
        if subtitles not in self._captioners:
            opts = replace(self.options.captioning, use_subtitles=subtitles)
            self._captioners[subtitles] = Captioner(self.model(self.options.caption), self.store, self.frames,
                                                    opts, self.prompts.caption, self.profile.caption_layout)
        return self._captioners[subtitles]

    def video_qa(self) -> VideoQA:
        from ..prep.models import NO_QA_MODEL, NoModel

        model = self.model(self.options.qa) if self.options.qa is not None else NoModel("none", NO_QA_MODEL)
        return VideoQA(model, self.frames, max_tokens=self.options.qa_max_tokens,
                       system_prompt=self.prompts.qa, profile=self.profile)

    # -- trees ----------------------------------------------------------------------------

    async def tree(self, video: "str | os.PathLike") -> list[dict]:
        """The video's node records (VideoError when it cannot have a tree).

        Nothing is decoded here: a node's frames are decoded when a caption or video_qa
        first reads them (prep/segment.py, the lazy path; VideoEnv.high_captions)."""
        nodes, _ = await self._timed_tree(video)
        return nodes

    async def _timed_tree(self, video, on_probe: Callable[[], None] | None = None,
                          options: SegmentOptions | None = None) -> tuple[list[dict], float]:
        """The node records and the seconds this call spent loading or segmenting them.

        With --captions the video's caption file is imported here too (ValueError naming it)."""
        options = options or self.segment_options
        key = (os.path.realpath(video), options.tree.frame_sampling, options.transcription is not None)
        lock = self._tree_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._trees:
                return self._trees[key], 0.0
            if on_probe is not None:
                on_probe()
            started = time.perf_counter()
            nodes = await asyncio.to_thread(load_or_plan, video, options, self.cache_dir)
            if self.released is not None:
                await asyncio.to_thread(self.released.load, nodes, video)
            self._trees[key] = nodes
            return nodes, time.perf_counter() - started

    async def _already_captioned(self, video, nodes: list[dict], subtitles: bool) -> tuple[list[dict], float]:
        """Keyframe sampling is for a fresh video. When the K high nodes' exact captions are already
        stored (the video went through `lvr segment` and `lvr caption`, or an `eval`), the exact tree
        is used instead: its first level needs no decoding and no captioning."""
        high = [n for n in nodes if n["level"] == "high"]
        if self.released is not None or not all(n.get("frame_sampling") for n in high):
            return nodes, 0.0
        captioner = self.captioner(subtitles)
        if not all(captioner.cached(exact_twin(n)) is not None for n in high):
            return nodes, 0.0
        base = self._segment_options(subtitles)
        exact = replace(base, tree=replace(base.tree, frame_sampling="exact"))
        return await self._timed_tree(video, options=exact)

    def _segment_options(self, subtitles: bool) -> SegmentOptions:
        """A question asked without subtitles is never shown a transcript, so its tree is planned
        without one (nothing is transcribed for it)."""
        if subtitles or self.segment_options.transcription is None:
            return self.segment_options
        return replace(self.segment_options, transcription=None)

    # -- questions ------------------------------------------------------------------------

    def settings(self, subtitles: bool) -> dict:
        return self.options.settings(self.prompts, subtitles, self.released.record() if self.released else None)

    async def ask(self, video: "str | os.PathLike", question: str, options: tuple[str, ...] = (),
                  *, subtitles: bool = True, nodes: list[dict] | None = None, task: str = QA,
                  make_review: Callable[[VideoEnv], Review] | None = None,
                  callbacks: AskCallbacks = AskCallbacks()) -> Asked:
        """Answer one question about one video. Failures come back in `Asked.error`, never raised.

        `task`: ``qa``, or ``grounding`` for a query answered with a time interval (`run_agent`).
        With `--ground-then-answer` a question is answered in two stages (infer/ground_then_answer.py):
        a grounding run, then video_qa on frames of the span it gives.

        `make_review(env)` gives a reviewer for the answers (teacher synthesis).
        """
        from ..prep.probe import VideoError
        from .environment import EnvError

        settings = self.settings(subtitles)
        started = time.perf_counter()
        empty = AgentResult(question, tuple(options), task=task)
        segment_seconds = 0.0
        grounds = self.options.answering.ground_then_answer and task == QA
        strategy = GROUND_THEN_ANSWER if grounds else NAVIGATE
        try:
            if nodes is None:
                nodes, segment_seconds = await self._timed_tree(video, callbacks.on_probe,
                                                                self._segment_options(subtitles))
                nodes, more = await self._already_captioned(video, nodes, subtitles)
                segment_seconds += more
            env = VideoEnv(nodes, self.captioner(subtitles), self.video_qa(), self.profile)
            env.on_plan, env.on_frames = callbacks.on_plan, callbacks.on_frames
        except (VideoError, ValueError, ModelError, EnvError) as e:
            empty.stopped, empty.error = "error", str(e)
            return Asked(empty, None, settings, str(video), str(e), segment_seconds, strategy=strategy)
        if callbacks.on_tree is not None:
            callbacks.on_tree(env)
        reasoning = _FirstRequest(self.model(self.options.reasoning))
        query, run_task = (self.profile.gta_query.format(question=question.strip()), GROUNDING) if grounds \
            else (question, task)
        result = await run_agent(reasoning, env, query, options,
                                 template=self.template, agent=self.options.agent, task=run_task,
                                 review=make_review(env) if make_review else None, on_turn=callbacks.on_turn)
        first = None if reasoning.sent_at is None else reasoning.sent_at - started
        stage = None
        if grounds:
            result, stage = await self._answer_from_span(result, question, tuple(options), env, callbacks)
        await asyncio.to_thread(keep_substitutes, nodes, self.cache_dir)
        return Asked(result, env, settings, str(video), result.error, segment_seconds, first, strategy, stage)

    async def _answer_from_span(self, grounding: AgentResult, question: str, options: tuple[str, ...],
                                env: VideoEnv, callbacks: AskCallbacks) -> tuple[AgentResult, dict | None]:
        """Ground-then-answer's second stage, or the failure when grounding gave no interval."""
        if grounding.interval is None:
            return no_interval(grounding, question, options, stop_reason(grounding, self.options.agent)), None
        return await answer_from_span(grounding, question, options, env, frames=self.options.answering.gta_frames,
                                      qa_side=self.options.tree.qa_side, quality=self.segment_options.jpeg_quality,
                                      on_stage=callbacks.on_stage)

    async def aclose(self) -> None:
        for model in self._models.values():
            try:
                await model.aclose()
            except Exception:  # noqa: BLE001 - closing must not hide the real outcome
                pass
        self.store.close()


def stop_reason(result: AgentResult, agent: AgentOptions) -> str:
    """Why a run gave no answer, in words: its error, else what ended it."""
    return result.error or {Stop.MAX_ROUNDS: f"no answer within {agent.max_rounds} rounds",
                            Stop.INVALID: f"more than {agent.max_invalid} invalid turns in a row"}.get(
        result.stopped, result.stopped)


def build_trace(asked: Asked, *, correct_answer: str | None = None, correct: bool | None = None,
                extra: dict | None = None) -> dict:
    """The full record of one run: conversation, turns, visits, tree and accounting (lvr.trace/1)."""
    result, env = asked.result, asked.env
    trace = {
        "schema": TRACE_SCHEMA,
        "video": {"video_id": env.video_id if env else None, "path": asked.video,
                  "duration": env.duration if env else None, "K": env.k if env else None},
        "task": result.task, "strategy": asked.strategy, "question": result.question, "options": list(result.options),
        "answer": {"text": result.answer, "choice": result.choice,
                   "interval": list(result.interval) if result.interval is not None else None},
        "answer_stage": asked.answer_stage,
        "correct_answer": correct_answer, "correct": correct,
        "stopped": result.stopped, "error": result.error,
        "turns": [t.to_record() for t in result.turns],
        "visits": [v.to_record() for v in env.visits] if env else [],
        "messages": result.messages,
        "accounting": asked.accounting(),
        "settings": asked.settings,
        "tree": [],
    }
    if env is not None:
        asked_qa = {tuple(v.node) for v in env.visits if v.tool == "video_qa"}
        for node_id, node in env.nodes.items():
            keys = node.get("frame_keys") or []
            entry = {"id": list(node_id), "level": node["level"], "start": node["start"],
                     "end": node["end"], "thumb_key": keys[len(keys) // 2] if keys else None,
                     "caption": env.captions.get(node_id)}
            # The frames each model was actually shown (keyframe sampling moves them).
            sets = (("",) if node_id in env.captions else ()) + (("qa_",) if node_id in asked_qa else ())
            for prefix in sets:
                for name in ("frame_indices", "frame_times", "frame_sampling"):
                    if node.get(prefix + name) is not None:
                        entry[prefix + name] = node[prefix + name]
            trace["tree"].append(entry)
    if extra:
        trace.update(extra)
    return trace

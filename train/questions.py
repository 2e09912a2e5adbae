"""`lvr questions` as a library: grounded multiple-choice questions from a caption tree.

After LongVPO: each question is anchored to specific leaves (low-level clips), whose
spans become its clue intervals, and filtered so that it really needs those leaves.

- **Single-segment** questions are written from one anchor leaf's caption.
- **Multi-segment** questions are written from 2-3 anchor leaves under different
  medium nodes, with the high captions and the anchors' medium captions as context.

This module runs the batch: per video, a plan of seeded slots; per slot, one question
written and filtered; a few questions in flight through the one work queue. The parts:

- `caption_trees`: lvr.caption/1 records -> one complete caption tree per video;
- `lexicon`: TF-IDF similarity of leaf captions and look-alike (near-duplicate) leaves;
- `anchors`: seeded anchor slots and distractor leaves;
- `question_replies`: asking the model for JSON and reading its replies;
- `question_writer`: one candidate question, options in our seeded order;
- `question_filters`: the filters (lookalike, no_leak, answerable, needs_all_anchors,
  specificity; see docs/questions.md for the exact definitions).

Questions that pass go to the output as ``lvr.qa/1`` records (what `lvr synthesize`
reads); dropped ones optionally to a rejected file. Each finished question is one
append, so a killed run loses nothing and a rerun skips questions already written.

With ``task="grounding"`` (`--task grounding`) the same batch writes grounding queries
instead: each describes the moment of one leaf or of a span of 2-3 adjacent leaves
(`span_anchor_slots`), passes the grounding filters, and is written as an
``lvr.grounding/1`` record whose target is exactly the anchors' span.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ..infer.grounding import GroundingItem
from ..prep.jsonl import JsonlWriter, RecordError
from ..prep.models.base import Usage
from ..prep.tree import NodeId
from ..prep.work_queue import run_jobs
from . import question_prompts as prompts
from .anchors import ID_TAGS, Slot, multi_anchor_slots, single_anchor_slots, span_anchor_slots
from .caption_trees import CaptionTree, assign_video_names, load_caption_trees
from .lexicon import VideoIndex
from .qa_items import QA_SCHEMA
from .question_filters import GroundingFilters, QuestionFilters
from .question_replies import JsonAsker, QuestionFailed
from .question_writer import write_candidate, write_grounding_candidate

# Also reachable from here, as before the split into modules (tests and callers import them
# from lvr.train.questions; strip_think is how the writer's replies lose their reasoning).
from ..prep.tags import strip_think
from .lexicon import lookalike_pairs
from .question_replies import ReplyError, parse_json_reply

__all__ = ["KINDS", "TASKS", "TASK_KINDS", "SOURCE", "QuestionMaker", "GroundingMaker", "QuestionOptions",
           "QuestionsError", "QuestionsSummary", "run_questions", "CaptionTree", "load_caption_trees", "VideoIndex",
           "lookalike_pairs", "single_anchor_slots", "multi_anchor_slots", "span_anchor_slots", "ReplyError",
           "parse_json_reply", "strip_think"]
SOURCE = "lvr questions"
KINDS = ("single", "multi")
TASKS = ("qa", "grounding")
# Each task's kinds: the second one is the share `multi_share` asks for.
TASK_KINDS = {"qa": KINDS, "grounding": ("single", "span")}
# How the summary and notes name a task's items and its second kind.
TASK_NOUNS = {"qa": "questions", "grounding": "grounding queries"}
KIND_NAMES = {"single": "single", "multi": "multi-segment", "span": "span"}


class QuestionsError(Exception):
    """The run cannot start (bad input file, bad options). One line."""


@dataclass(frozen=True)
class QuestionOptions:
    per_video: int = 8              # questions to keep per video
    multi_share: float = 0.5        # of them, this share multi-segment (rounded)
    max_tries: int = 3              # candidates tried per wanted question, at most
    min_anchors: int = 2            # anchors of a multi-segment question
    max_anchors: int = 3
    distractor_leaves: int = 3      # other leaves offered to the writer as distractor sources
    specificity_k: int = 4          # top-k lexically similar non-anchor leaves checked
    lookalike_threshold: float = 0.8
    leak_tries: int = 1             # no-leak: dropped when right in every one of these blind tries
    json_retries: int = 2           # a reply that is not the JSON asked for is asked again this often
    temperature: float = 0.7        # the writer's; the filters always use 0
    max_tokens: int = 1024
    seed: int = 0
    video_root: Path | None = None  # `video` is written relative to it; default: the videos' common parent
    concurrency: int = 8            # questions in flight
    task: str = "qa"                # qa: multiple-choice questions; grounding: grounding queries

    def validate(self) -> None:
        if self.task not in TASKS:
            raise QuestionsError(f"--task takes {' or '.join(TASKS)}, not {self.task!r}")
        if self.per_video < 1:
            raise QuestionsError("--per-video must be at least 1")
        if not 0.0 <= self.multi_share <= 1.0:
            raise QuestionsError(f"--multi-share must be between 0 and 1, not {self.multi_share:g}")
        if not 2 <= self.min_anchors <= self.max_anchors:
            raise QuestionsError("multi-segment questions and spans need 2 <= --min-anchors <= --max-anchors")
        if not 0.0 < self.lookalike_threshold <= 1.0:
            raise QuestionsError("--lookalike-threshold must be in (0, 1]")
        for name in ("max_tries", "leak_tries", "concurrency"):
            if getattr(self, name) < 1:
                raise QuestionsError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def kinds(self) -> tuple[str, str]:
        return TASK_KINDS[self.task]

    def wanted(self) -> dict[str, int]:
        single, shared = self.kinds
        multi = int(math.floor(self.per_video * self.multi_share + 0.5))
        return {single: self.per_video - multi, shared: multi}

    def to_record(self) -> dict:
        d = asdict(self)
        d["video_root"] = str(self.video_root) if self.video_root else None
        return d


class QuestionMaker:
    """Writes and filters questions through one chat model."""

    def __init__(self, chat, options: QuestionOptions):
        self.o = options
        self.asker = JsonAsker(chat, max_tokens=options.max_tokens, json_retries=options.json_retries)
        self.filters = QuestionFilters(self.asker, leak_tries=options.leak_tries,
                                       specificity_k=options.specificity_k)

    async def make(self, slot: Slot, producer: dict, usage: Usage) -> tuple[dict, bool]:
        """One question: write it, filter it; its requests are added to `usage`. Returns (record, kept)."""
        cand = await write_candidate(self.asker, slot, usage, seed=self.o.seed, temperature=self.o.temperature,
                                     distractor_count=self.o.distractor_leaves)
        verdicts = await self.filters.run(cand, usage)
        tree = slot.index.tree
        record = {
            "schema": QA_SCHEMA, "id": slot.qid, "video": tree.video, "video_id": tree.video_id,
            "question": cand.draft.question, "options": list(cand.options), "answer": cand.answer,
            "clues": [list(tree.span(a)) for a in slot.anchors], "category": slot.kind, "source": SOURCE,
            "anchors": [list(a) for a in slot.anchors],
            "distractor_leaves": {k: (list(v) if v else None) for k, v in cand.sources.items()},
            "filters": [v.to_record() for v in verdicts],
            "producer": {**producer, "captioners": tree.captioners},
            "tokens": usage.to_record(),
        }
        fail = next((v for v in verdicts if v.verdict == "fail"), None)
        if fail is not None:
            record["rejected_by"] = fail.name
            record["reason"] = fail.reason
        return record, fail is None


class GroundingMaker:
    """Writes and filters grounding queries through one chat model."""

    def __init__(self, chat, options: QuestionOptions):
        self.o = options
        self.asker = JsonAsker(chat, max_tokens=options.max_tokens, json_retries=options.json_retries)
        self.filters = GroundingFilters(self.asker, specificity_k=options.specificity_k)

    async def make(self, slot: Slot, producer: dict, usage: Usage) -> tuple[dict, bool]:
        """One grounding query: write it, filter it; its requests are added to `usage`. Returns (record, kept)."""
        cand = await write_grounding_candidate(self.asker, slot, usage, seed=self.o.seed,
                                               temperature=self.o.temperature)
        verdicts = await self.filters.run(cand, usage)
        tree = slot.index.tree
        # The target is the anchors' span: from the first anchor's start to the last one's end.
        target = (tree.span(slot.anchors[0])[0], tree.span(slot.anchors[-1])[1])
        extra = {"video_id": tree.video_id, "category": slot.kind, "anchors": [list(a) for a in slot.anchors],
                 "filters": [v.to_record() for v in verdicts], "producer": {**producer, "captioners": tree.captioners},
                 "tokens": usage.to_record()}
        record = GroundingItem(slot.qid, tree.video, cand.query, (target,), tree.duration, SOURCE, extra).to_record()
        fail = next((v for v in verdicts if v.verdict == "fail"), None)
        if fail is not None:
            record["rejected_by"] = fail.name
            record["reason"] = fail.reason
        return record, fail is None


# -- the batch ------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^(?P<vid>.+)-(?P<tag>gs|[smg])(?P<n>\d+)$")


@dataclass
class QuestionsSummary:
    videos: int = 0
    written: Counter = field(default_factory=Counter)       # kind -> kept this run
    dropped: Counter = field(default_factory=Counter)       # filter -> dropped this run
    skipped: int = 0                                        # kept in an earlier run
    failed: list[str] = field(default_factory=list)         # items and videos, each one line
    short: list[str] = field(default_factory=list)          # videos that ran out of candidates
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


class _Plan:
    """One video's progress: which slots were tried, how many were kept, what is in flight."""

    def __init__(self, tree: CaptionTree, options: QuestionOptions, kept: dict[str, int],
                 tried: dict[str, set[int]]):
        self.tree = tree
        self.o = options
        self.kinds = options.kinds
        self.wanted = options.wanted()
        self.kept = kept
        self.tried = tried
        self.in_flight = {k: 0 for k in self.kinds}
        self.index: VideoIndex | None = None
        self.slots: dict[str, list[tuple[NodeId, ...]]] = {}
        self.finished = False

    def remaining(self) -> int:
        return sum(max(0, self.wanted[k] - self.kept[k]) for k in self.kinds)

    def _ensure(self) -> None:
        if self.index is None:
            o = self.o
            self.index = VideoIndex.build(self.tree, o.lookalike_threshold)
            limit = {k: o.max_tries * self.wanted[k] for k in self.kinds}
            self.slots = {"single": single_anchor_slots(self.index, o.seed)[:limit["single"]]}
            if o.task == "grounding":
                self.slots["span"] = span_anchor_slots(self.index, o.seed, limit["span"], o.min_anchors,
                                                       o.max_anchors)
            else:
                self.slots["multi"] = multi_anchor_slots(self.index, o.seed, limit["multi"], o.min_anchors,
                                                         o.max_anchors)

    def next_slot(self) -> Slot | None:
        if self.finished or self.remaining() == 0:
            return None
        self._ensure()
        for kind in self.kinds:
            if self.kept[kind] + self.in_flight[kind] >= self.wanted[kind]:
                continue
            for n, anchors in enumerate(self.slots[kind], 1):
                if n not in self.tried[kind]:
                    self.tried[kind].add(n)
                    self.in_flight[kind] += 1
                    return Slot(self.index, kind, n, anchors, self.o.task)
        return None

    def next_slot_possible(self) -> bool:
        if self.remaining() == 0:
            return False
        self._ensure()
        return any(self.kept[k] + self.in_flight[k] < self.wanted[k]
                   and any(n not in self.tried[k] for n in range(1, len(self.slots[k]) + 1)) for k in self.kinds)


def _existing(records: list[dict], task: str) -> dict[str, dict[str, set[int]]]:
    """video_id -> kind -> slot numbers, from our own earlier records of this task."""
    kind_of = {tag: kind for (t, kind), tag in ID_TAGS.items() if t == task}
    out: dict[str, dict[str, set[int]]] = {}
    for r in records:
        m = _ID_RE.match(str(r.get("id", ""))) if r.get("source") == SOURCE else None
        extra = r.get("extra") if isinstance(r.get("extra"), dict) else {}
        # QA records carry video_id at the top level, grounding records in `extra`.
        if m and m.group("tag") in kind_of and r.get("video_id", extra.get("video_id")) == m.group("vid"):
            out.setdefault(m.group("vid"), {k: set() for k in TASK_KINDS[task]})[kind_of[m.group("tag")]].add(
                int(m.group("n")))
    return out


def run_questions(source: str, output: "str | os.PathLike | None", model, options: QuestionOptions, *,
                  rejected: "str | os.PathLike | None" = None, log=lambda msg: None, progress: bool = True,
                  stdin: IO[str] | None = None) -> QuestionsSummary:
    """Everything `lvr questions` does.

    `model` is a ModelSpec (or anything with .build() returning a ChatModel). Per-video and
    per-question failures are in the summary; QuestionsError (bad input or options) and
    ModelError (no endpoint reachable) are raised.
    """
    from .. import __version__

    options.validate()
    if output not in (None, "-") and rejected is not None and \
            Path(output).resolve() == Path(rejected).resolve():
        raise QuestionsError("--rejected must be another file than -o")
    summary = QuestionsSummary()
    t0 = time.perf_counter()
    try:
        trees, errors = load_caption_trees(source, stdin=stdin)
    except RecordError as e:
        raise QuestionsError(str(e)) from None
    root, name_errors = assign_video_names(trees, options.video_root)
    trees = [t for t in trees if t.video]
    errors += name_errors
    for e in errors:
        log(f"error: {e}")
    summary.failed += errors
    summary.videos = len(trees)
    if root is not None:
        log(f"videos are named relative to {root}")
    producer = {"tool": SOURCE, "version": __version__, "prompt_hash": prompts.prompt_hash(options.task),
                "seed": options.seed, "options": options.to_record()}
    with JsonlWriter(output) as out, (JsonlWriter(rejected) if rejected is not None else _NoWriter()) as rej:
        kept = _existing(out.existing, options.task)
        tried = _existing(out.existing + rej.existing, options.task)
        plans = []
        for t in trees:
            k_kept = {k: len(kept.get(t.video_id, {}).get(k, ())) for k in options.kinds}
            summary.skipped += sum(k_kept.values())
            k_tried = {k: set(tried.get(t.video_id, {}).get(k, ())) for k in options.kinds}
            plans.append(_Plan(t, options, k_kept, k_tried))
        asyncio.run(_run_all(plans, out, rej, model, options, producer, summary, log, progress))
    summary.seconds = time.perf_counter() - t0
    return summary


class _NoWriter:
    existing: list[dict] = []

    def write_unit(self, records) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


async def _run_all(plans: list[_Plan], out, rej, model, options: QuestionOptions, producer: dict,
                   summary: QuestionsSummary, log, progress: bool) -> None:
    from tqdm.auto import tqdm

    noun = TASK_NOUNS[options.task]
    total = sum(p.remaining() for p in plans)
    if total == 0:
        if plans:
            log(f"nothing to do: every video has its {noun} already")
        return
    chat = model.build()
    producer = {**producer, "model": chat.name}
    maker = GroundingMaker(chat, options) if options.task == "grounding" else QuestionMaker(chat, options)
    unit = "query" if options.task == "grounding" else "question"
    bar = tqdm(total=total, unit=unit, desc=noun, disable=None if progress else True, dynamic_ncols=True)
    cursor = 0

    def next_job() -> tuple[_Plan, Slot] | None:
        nonlocal cursor
        while cursor < len(plans) and plans[cursor].finished:
            cursor += 1
        for plan in plans[cursor:]:
            if plan.finished:
                continue
            slot = plan.next_slot()
            if slot is not None:
                return plan, slot
            close(plan)
        return None

    def close(plan: _Plan) -> None:
        """Mark a plan finished once nothing is in flight and nothing more can be tried."""
        if plan.finished or sum(plan.in_flight.values()) or plan.next_slot_possible():
            return
        plan.finished = True
        short = plan.remaining()
        if short:
            bar.update(short)
            single, shared = plan.kinds
            msg = (f"{plan.tree.label}: kept {plan.kept[single]} single and {plan.kept[shared]} "
                   f"{KIND_NAMES[shared]} {noun} of {plan.wanted[single]} and {plan.wanted[shared]} wanted "
                   f"(candidates used up; raise --max-tries or lower --per-video)")
            summary.short.append(msg)
            log(f"note: {msg}")
        plan.index = None  # free the lexicon

    async def one(job: tuple[_Plan, Slot]) -> None:
        plan, slot = job
        usage = Usage()
        try:
            record, ok = await maker.make(slot, producer, usage)
        except QuestionFailed as e:
            msg = f"{slot.qid} ({plan.tree.label}): {e}"
            summary.failed.append(msg)
            log(f"error: {msg}")
            return
        finally:
            summary.usage.add(usage)
        if ok:
            out.write_unit([record])
            plan.kept[slot.kind] += 1
            summary.written[slot.kind] += 1
            bar.update(1)
        else:
            rej.write_unit([record])
            summary.dropped[record["rejected_by"]] += 1
        bar.set_postfix(kept=sum(summary.written.values()), dropped=sum(summary.dropped.values()),
                        failed=len(summary.failed), refresh=False)

    def done(job: tuple[_Plan, Slot]) -> None:
        # Before the queue asks for the next job: the plan's count drops, it may close.
        plan, slot = job
        plan.in_flight[slot.kind] -= 1
        close(plan)

    try:
        check = getattr(chat, "check_reachable", None)
        if check is not None:
            await check()
        # next_job returns None while a plan waits on its questions in flight (they decide
        # whether it needs more slots); the queue then waits for one to finish.
        await run_jobs(next_job, one, concurrency=options.concurrency, on_done=done)
    finally:
        bar.close()
        await chat.aclose()

"""`lvr synthesize` as a library: a teacher model writes tool trajectories through the `ask` loop.

The teacher runs the same environment, protocol and loop as `lvr ask`, with a
reviewer that knows the answer: a wrong answer is dropped and a hint shown
(train/hints.py), up to three times. Each item's trajectory is appended as
soon as it ends, so a killed run resumes with the items not yet written.

Grounding items (``lvr.grounding/1``, alone or mixed with QA items in one file) run
as grounding queries: the teacher answers with an interval, which is right when its
IoU with the best-matching target is at least `accept_iou`; the hints are built from
the targets exactly as a QA item's are from its clues.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..infer.agent import AgentResult, Turn, Verdict
from ..infer.benchmarks import EvalFormatError, default_video_dir, resolve_video
from ..infer.environment import VideoEnv
from ..infer.grounding import recall_at
from ..infer.navigator import Asked, Navigator, NavigatorOptions
from ..infer.progress import BatchProgress, time_spent
from ..infer.protocol import GROUNDING, answer_matches
from ..prep.options import check_options, option
from ..prep.work_queue import run_jobs, unfinished
from ..prep.jsonl import JsonlWriter
from ..prep.models.base import Usage, text_messages
from ..prep.progress import Reporter
from .hints import CLUE_GAP_S, MAX_HINTS, hint_for, merge_intervals
from .lint import TRAJECTORY_SCHEMA
from .qa_items import TrainingItem, clue_intervals, item_options, item_query, item_task, load_training_items
from .rewards import answer_iou

DATA_PANEL = "QA items"


@dataclass(frozen=True)
class SynthesizeOptions:
    format: str = "auto"
    video_dir: Path | None = None           # default: the QA file's folder
    concurrency: int = 4                    # items in flight
    max_items: int | None = None
    token_budget: int | None = None         # teacher tokens (prompt + completion); stop starting items past it
    clue_gap_s: float = CLUE_GAP_S
    subtitles: bool = True
    price_prompt_per_m: float | None = None      # USD per million teacher prompt tokens
    price_completion_per_m: float | None = None  # USD per million teacher completion tokens
    accept_iou: float = option(0.5, "--accept-iou", min=0.0, max=1.0, metavar="IOU", panel=DATA_PANEL,
                               help="Grounding items: accept the teacher's interval when its IoU with the "
                                    "best-matching target is at least this; below it the turn is dropped and the "
                                    "next hint shown, as for a wrong QA answer.")

    def __post_init__(self) -> None:
        check_options(self)


def cost_usd(usage: Usage, options: SynthesizeOptions) -> float | None:
    if options.price_prompt_per_m is None and options.price_completion_per_m is None:
        return None
    return round(usage.prompt_tokens * (options.price_prompt_per_m or 0.0) / 1e6
                 + usage.completion_tokens * (options.price_completion_per_m or 0.0) / 1e6, 10)


def is_right(item: TrainingItem, result: AgentResult, accept_iou: float) -> bool:
    """Whether the result's answer is right: a QA answer matches the item's answer
    (`answer_matches`); a grounding interval reaches `accept_iou` against its best target
    (eval's R@t rule, so a threshold is met up to float rounding)."""
    if item_task(item) == GROUNDING:
        return result.interval is not None and recall_at([answer_iou(result.interval, item.targets)], accept_iou) == 1
    return answer_matches(result.answer, result.choice, item.options, item.answer)


def make_reviewer(item: TrainingItem, clues: list[tuple[float, float]], accept_iou: float):
    """The answer reviewer for one item: accept a right answer, else the next hint, else give up."""

    def for_env(env: VideoEnv):
        spans = {node_id: (n["start"], n["end"]) for node_id, n in env.nodes.items()}

        async def review(result: AgentResult, turn: Turn) -> Verdict:
            if is_right(item, result, accept_iou):
                return Verdict(True)
            level = len(result.hints) + 1
            if level > MAX_HINTS:
                return Verdict(False)
            text, ids = hint_for(level, spans, clues)
            return Verdict(False, text, level, tuple(ids))

        return review

    return for_env


def trajectory_record(item: TrainingItem, asked: Asked, clues, options: SynthesizeOptions) -> dict:
    result, env = asked.result, asked.env
    grounding = item_task(item) == GROUNDING
    correct = result.stopped == "answered" and is_right(item, result, options.accept_iou)
    dropped_turns = [t for t in result.turns if t.dropped]
    hints = [{"level": h.level, "after_turn": h.after_turn, "ids": [list(i) for i in h.ids], "text": h.text}
             for h in result.hints]
    dropped = []
    for i, turn in enumerate(dropped_turns):
        kept_before = sum(1 for t in result.turns[: result.turns.index(turn)] if not t.dropped)
        dropped.append({"after_turn": kept_before, "text": turn.text, "answer": turn.parsed.answer,
                        "hint_level": result.hints[i].level if i < len(result.hints) else None,
                        **(_interval_fields(turn.parsed.interval, item) if grounding else {})})
    usage = result.reasoning.usage
    return {
        "schema": TRAJECTORY_SCHEMA, "task": item_task(item), "qid": item.qid, "video": item.video,
        "video_id": env.video_id, "K": env.k, "duration": env.duration,
        "question": item_query(item), "options": list(item_options(item)),
        "answer": None if grounding else item.answer,
        **({"targets": [list(t) for t in item.targets], "accept_iou": options.accept_iou,
            **_interval_fields(result.interval, item)} if grounding else {}),
        "clues": [list(c) for c in clues], "category": getattr(item, "category", None),
        "accepted": correct, "correct": correct, "stopped": result.stopped,
        "attempts": sum(1 for t in result.turns if t.parsed.answer is not None),
        "messages": text_messages(result.clean_messages()),
        "hints": hints, "dropped": dropped,
        "visits": [v.to_record() for v in env.visits],
        "teacher": result.reasoning.model, "prompt_hash": asked.settings["prompt_hash"],
        "tokens": usage.to_record(), "cost_usd": cost_usd(usage, options),
        "accounting": asked.accounting(), "settings": asked.settings,
    }


def _interval_fields(interval: tuple[float, float] | None, item: TrainingItem) -> dict:
    """A grounding answer's interval and its IoU with the best-matching target (both None without one)."""
    if interval is None:
        return {"interval": None, "iou": None}
    return {"interval": list(interval), "iou": answer_iou(interval, item.targets)}


@dataclass
class SynthesizeSummary:
    written: int = 0
    accepted: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    budget_stopped: bool = False
    not_started: int = 0
    teacher: Usage = field(default_factory=Usage)
    seconds: float = 0.0


def load_items(qa_path: str, options: SynthesizeOptions) -> tuple[list[TrainingItem], list[str]]:
    """The items to synthesize (QA and grounding), and one error line per record or item that cannot be."""
    loaded, errors = load_training_items(qa_path, options.format)
    items = []
    for item in loaded:
        if clue_intervals(item):
            items.append(item)
        else:   # the reviewer's hints are built from the clues: a clue-free item would get empty ones
            errors.append(f"{qa_path}: item {item.qid}: no clues; synthesize needs at least one clue interval "
                          f"for its hints (lvr rl scores such an item by its answer alone)")
    if options.max_items is not None:
        items = items[: options.max_items]
    return items, errors


def run_synthesize(qa_path: str, output: "str | os.PathLike | None", nav: NavigatorOptions, cache_dir: Path,
                   options: SynthesizeOptions = SynthesizeOptions(), *, log=lambda msg: None,
                   reporter: Reporter | None = None) -> SynthesizeSummary:
    """Write a trajectory for every item not yet in `output`.

    `reporter` shows a bar (or a line per item off a terminal); nothing without one.

    Raises EvalFormatError-like errors when the QA file cannot be read at all,
    and ModelError when an endpoint cannot be reached.
    """
    summary = SynthesizeSummary()
    items, summary.load_errors = load_items(qa_path, options)
    for err in summary.load_errors:
        log(f"error: {err}")
    video_dir = default_video_dir(options.video_dir, qa_path)
    t0 = time.perf_counter()
    with JsonlWriter(output) as writer:
        todo = unfinished(items, (r for r in writer.existing if r.get("schema") == TRAJECTORY_SCHEMA),
                          lambda it: it.qid)
        summary.skipped = len(items) - len(todo)
        if summary.skipped:
            log(f"skip: {summary.skipped} items already in the output")
        asyncio.run(_synthesize_all(todo, writer, nav, cache_dir, video_dir, options, summary, log,
                                    reporter or Reporter("lvr synthesize", enabled=False)))
    summary.seconds = time.perf_counter() - t0
    return summary


async def _synthesize_all(items: list[TrainingItem], writer: JsonlWriter, nav: NavigatorOptions, cache_dir: Path,
                          video_dir: Path, options: SynthesizeOptions, summary: SynthesizeSummary, log,
                          reporter: Reporter) -> None:
    navigator = Navigator(nav, cache_dir)
    progress = BatchProgress(reporter, "synthesize", len(items), "item")

    def over_budget() -> bool:
        return options.token_budget is not None and summary.teacher.total_tokens >= options.token_budget

    async def one(item: TrainingItem) -> None:
        try:
            video = resolve_video(item.video, video_dir)
        except (EvalFormatError, OSError) as e:
            summary.failed.append(f"{item.qid}: {e}")
            log(f"error: {item.qid}: {e}")
            progress.item_ended(None)
            return
        clues = merge_intervals(clue_intervals(item), options.clue_gap_s)
        question = progress.question(video)
        asked = await navigator.ask(video, item_query(item), item_options(item), subtitles=options.subtitles,
                                    task=item_task(item), make_review=make_reviewer(item, clues, options.accept_iou),
                                    callbacks=question.callbacks)
        summary.teacher.add(asked.result.reasoning.usage)
        if asked.env is None or asked.result.stopped == "error":
            summary.failed.append(f"{item.qid}: {asked.error}")
            log(f"error: {item.qid}: {asked.error}")
            progress.item_ended(question)
            return
        record = trajectory_record(item, asked, clues, options)
        writer.write_unit([record])
        summary.written += 1
        summary.accepted += bool(record["accepted"])
        progress.item_ended(question, f"{item.qid}: {item_line(record)}; accepted {summary.accepted}/"
                                      f"{summary.written}, teacher tokens {summary.teacher.total_tokens}",
                            accept=f"{summary.accepted}/{summary.written}", tokens=summary.teacher.total_tokens)

    try:
        if items:
            await navigator.preflight()
        ran = await run_jobs(items, one, concurrency=options.concurrency, stop=over_budget)
        summary.budget_stopped, summary.not_started = ran.stopped, ran.not_started
    finally:
        progress.close()
        await navigator.aclose()


def item_line(record: dict) -> str:
    """How one item went, for its progress line."""
    acc, tokens = record["accounting"], record["tokens"]
    hints = len(record["hints"])
    return (f"{'accepted' if record['accepted'] else 'not accepted'} ({record['stopped']}) after "
            f"{hints} hint{'' if hints == 1 else 's'}, {acc['rounds']} rounds, "
            f"{tokens['prompt_tokens'] + tokens['completion_tokens']} teacher tokens, {time_spent(acc)}")


# -- dry run ------------------------------------------------------------------------

@dataclass
class Estimate:
    items: int
    videos: int
    teacher_requests: int
    teacher_prompt_tokens: int
    teacher_completion_tokens: int
    caption_requests: int
    cost_usd: float | None
    unreadable: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.items} items over {self.videos} videos",
               f"teacher: about {self.teacher_requests} requests, {self.teacher_prompt_tokens} prompt + "
               f"{self.teacher_completion_tokens} completion tokens",
               f"captioner: at most {self.caption_requests} requests (fewer with captions already stored)"]
        if self.cost_usd is not None:
            out.append(f"teacher cost: about ${self.cost_usd:.2f}")
        out.extend(f"cannot read {u}" for u in self.unreadable)
        return out


# Rough sizes behind the estimate (tokens); the paper's navigator averages about 10.5 rounds.
EST_ROUNDS = 10.5
EST_TURN_TOKENS = 150           # a think plus one call
EST_CAPTION_TOKENS = {1: 530, 2: 530, 3: 270}   # ~400 / ~200 words
EST_SYSTEM_TOKENS = 450


def estimate(items: list[TrainingItem], video_dir: Path, nav: NavigatorOptions,
             options: SynthesizeOptions) -> Estimate:
    """Requests and tokens a run would need, from video durations alone (no model is called)."""
    from ..prep.probe import VideoError, probe_duration
    from ..prep.tree import tree_width

    widths: dict[str, int] = {}
    unreadable = []
    for item in items:
        if item.video in widths:
            continue
        try:
            duration = probe_duration(resolve_video(item.video, video_dir))
        except (EvalFormatError, OSError, VideoError) as e:
            unreadable.append(f"{item.video}: {e}")
            continue
        widths[item.video] = tree_width(duration, nav.tree.segment_seconds, nav.tree.min_width, nav.tree.max_width)
    rounds = min(EST_ROUNDS, nav.agent.max_rounds)
    per_round_growth = EST_TURN_TOKENS + (EST_CAPTION_TOKENS[2] + EST_CAPTION_TOKENS[3]) / 2
    prompt = completion = requests = captions = 0
    for item in items:
        k = widths.get(item.video)
        if k is None:
            continue
        base = EST_SYSTEM_TOKENS + k * EST_CAPTION_TOKENS[1] + 60
        n = math.ceil(rounds)
        requests += n
        prompt += int(sum(base + r * per_round_growth for r in range(n)))
        completion += int(n * EST_TURN_TOKENS)
        captions += n
    captions += sum(widths.values())
    usage = Usage(prompt, completion, requests)
    return Estimate(len(items), len(widths), requests, prompt, completion, captions, cost_usd(usage, options),
                    unreadable)

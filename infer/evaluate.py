"""`lvr eval` as a library: many questions, concurrently, one result record each, and a summary.

A question's record is written the moment it finishes, so a killed run loses
nothing; a rerun over the same output skips questions already in it. A
question that fails for a reason outside the model (a video that cannot be
read, an endpoint that keeps failing) is named and left out, so the rerun
tries it again.

Two scoring rules (`--scoring`, `score`): lvr's, and the reference's own
(LongVideo-R1's eval/evaluation.py), so a score can be compared with the paper's.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..prep.work_queue import run_jobs, unfinished
from ..prep.jsonl import JsonlWriter, dumps, write_atomic
from ..prep.options import check_options, option
from ..prep.progress import Reporter, shorten
from .benchmarks import EvalFormatError, EvalItem, default_video_dir, load_eval_items, resolve_item_video
from .navigator import Asked, Navigator, NavigatorOptions, build_trace
from .progress import BatchProgress, time_spent
from .protocol import answer_matches

EVAL_SCHEMA = "lvr.eval/1"
SUMMARY_SCHEMA = "lvr.eval_summary/1"
SCORING_RULES = ("lvr", "reference")
# eval/evaluation.py of qiujihao19/LongVideo-R1 scores a question left without an answer as if it had answered A.
REFERENCE_NO_ANSWER = "A"


@dataclass(frozen=True)
class EvalOptions:
    format: str = "auto"
    subtitles: bool | None = None            # None: each format's default (Video-MME must say)
    videomme_duration: str | None = "long"
    video_dir: Path | None = None            # default: the questions file's folder
    concurrency: int = 4                     # questions in flight
    max_questions: int | None = None
    scoring: str = option("lvr", "--scoring", choices=SCORING_RULES,
                          help="How a prediction is scored. lvr: the chosen option letter (read from the answer "
                               "text) for multiple choice, the same words for open questions; no answer is wrong. "
                               "reference: LongVideo-R1's eval/evaluation.py, the answer text equal to the "
                               "answer key exactly, and no answer counted as A.")

    def __post_init__(self):
        check_options(self)


def score(rule: str, prediction: str | None, choice: str | None, options, answer: str) -> bool:
    """Whether a prediction is right under `rule` (`SCORING_RULES`).

    lvr: `infer.protocol.answer_matches`. reference: the answer text (stripped) is
    the answer key exactly ("B" is right for B; "b", "(B)" and "B. a dog" are not),
    and a question without an answer (out of rounds, given up) counts as answering
    `REFERENCE_NO_ANSWER`.
    """
    if rule == "reference":
        said = prediction.strip() if prediction is not None else REFERENCE_NO_ANSWER
        return said == str(answer)
    if rule != "lvr":
        raise ValueError(f"unknown scoring rule {rule!r} (use one of {', '.join(SCORING_RULES)})")
    return answer_matches(prediction, choice, options, answer)


def is_correct(item: EvalItem, asked: Asked, rule: str = "lvr") -> bool:
    return score(rule, asked.result.answer, asked.result.choice, item.options, item.answer)


def result_record(item: EvalItem, asked: Asked, trace: dict, correct: bool, rule: str = "lvr") -> dict:
    result = asked.result
    return {
        "schema": EVAL_SCHEMA, "qid": item.qid, "video": item.video, "video_id": trace["video"]["video_id"],
        "category": item.category, "source": item.source, "question": item.question,
        "options": list(item.options), "answer": item.answer,
        "prediction": result.answer, "choice": result.choice, "correct": correct, "scoring": rule,
        "stopped": result.stopped, "accounting": trace["accounting"],
        "settings": {**asked.settings, "scoring": rule},
    }


def record_correct(record: dict, rule: str) -> bool:
    """An lvr.eval/1 record's verdict under `rule`, from its prediction and answer key."""
    return score(rule, record.get("prediction"), record.get("choice"), record.get("options") or (),
                 record.get("answer"))


@dataclass
class EvalSummary:
    done: int = 0                     # answered in this run
    skipped: int = 0                  # already in the output
    failed: list[str] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: dict = field(default_factory=dict)


def summarize(records: list[dict], settings: dict | None = None, rule: str = "lvr") -> dict:
    """Accuracy overall and per category, rounds, caption calls against exhaustive, tokens, time.

    Every record is scored under `rule` (so an output file resumed under another rule is
    still scored one way), and the accuracy under each rule is given beside it.
    """
    n = len(records)

    def mean(values) -> float:
        values = list(values)
        return round(sum(values) / len(values), 4) if values else 0.0

    verdicts = {r: [record_correct(rec, r) for rec in records] for r in SCORING_RULES}
    correct = verdicts[rule]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for r, right in zip(records, correct):
        by_category[r.get("category") or "(none)"].append(right)
    acc = [r.get("accounting") or {} for r in records]
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                             "requests": 0})
    for a in acc:
        for role, m in (a.get("models") or {}).items():
            for key in ("prompt_tokens", "completion_tokens", "requests"):
                tokens[role][key] += int(m.get(key) or 0)
    return {
        "schema": SUMMARY_SCHEMA,
        "questions": n,
        "scoring": rule,
        "correct": sum(correct),
        "accuracy": mean(correct),
        "accuracy_by_scoring": {r: {"correct": sum(v), "accuracy": mean(v)} for r, v in verdicts.items()},
        "per_category": {c: {"questions": len(v), "accuracy": mean(v)} for c, v in sorted(by_category.items())},
        "stopped": dict(sorted(_count(r.get("stopped") for r in records).items())),
        "mean_rounds": mean(a.get("rounds", 0) for a in acc),
        "mean_caption_calls": mean((a.get("caption_calls") or {}).get("total", 0) for a in acc),
        "mean_captions_made": mean((a.get("caption_calls") or {}).get("made", 0) for a in acc),
        "mean_exhaustive_captions": mean(a.get("exhaustive_captions", 0) for a in acc),
        "mean_video_qa_calls": mean(a.get("video_qa_calls", 0) for a in acc),
        "tokens": dict(tokens),
        "mean_seconds": mean(a.get("seconds", 0.0) for a in acc),
        "segment_seconds": round(sum(a.get("segment_seconds", 0.0) for a in acc), 3),
        "settings": settings,
    }


def _count(values) -> dict:
    out: dict = defaultdict(int)
    for v in values:
        out[str(v)] += 1
    return out


def run_eval(questions: str, output: "str | os.PathLike | None", nav: NavigatorOptions, cache_dir: Path,
             options: EvalOptions = EvalOptions(), *, summary_path: "str | os.PathLike | None" = None,
             traces_path: "str | os.PathLike | None" = None, log=lambda msg: None,
             reporter: Reporter | None = None) -> EvalSummary:
    """Answer every question not yet in `output`; return the summary of the whole output file.

    `reporter` shows a bar (or a line per question off a terminal); nothing without one.

    Raises EvalFormatError when the questions file cannot be read at all and
    ModelError when an endpoint cannot be reached.
    """
    summary = EvalSummary()
    items, summary.load_errors = load_eval_items(questions, options.format, subtitles=options.subtitles,
                                                 videomme_duration=options.videomme_duration)
    for err in summary.load_errors:
        log(f"error: {err}")
    if options.max_questions is not None:
        items = items[: options.max_questions]
    video_dir = default_video_dir(options.video_dir, questions)
    t0 = time.perf_counter()
    with JsonlWriter(output) as writer:
        todo = unfinished(items, (r for r in writer.existing if r.get("schema") == EVAL_SCHEMA), lambda it: it.qid)
        summary.skipped = len(items) - len(todo)
        if summary.skipped:
            log(f"skip: {summary.skipped} questions already in the output")
        traces = JsonlWriter(traces_path) if traces_path is not None else None
        try:
            records = asyncio.run(_answer_all(todo, writer, traces, nav, cache_dir, video_dir, options,
                                              summary, log, reporter or Reporter("lvr eval", enabled=False)))
        finally:
            if traces is not None:
                traces.close()
        everything = [r for r in writer.existing if r.get("schema") == EVAL_SCHEMA] + records
    summary.seconds = time.perf_counter() - t0
    settings = {**everything[-1]["settings"], "scoring": options.scoring} if everything else None
    summary.report = summarize(everything, settings, options.scoring)
    if summary_path is not None:
        write_atomic(summary_path, dumps(summary.report) + "\n")
    return summary


async def _answer_all(items: list[EvalItem], writer: JsonlWriter, traces: JsonlWriter | None,
                      nav: NavigatorOptions, cache_dir: Path, video_dir: Path, options: EvalOptions,
                      summary: EvalSummary, log, reporter: Reporter) -> list[dict]:
    records: list[dict] = []
    navigator = Navigator(nav, cache_dir)
    progress = BatchProgress(reporter, "eval", len(items), "question")

    async def one(item: EvalItem) -> None:
        try:
            video = resolve_item_video(item, video_dir)
        except (EvalFormatError, OSError) as e:
            summary.failed.append(f"{item.qid}: {e}")
            log(f"error: {item.qid}: {e}")
            progress.item_ended(None)
            return
        question = progress.question(video)
        asked = await navigator.ask(video, item.question, item.options, subtitles=item.subtitles,
                                    callbacks=question.callbacks)
        if asked.env is None or asked.result.stopped == "error":
            summary.failed.append(f"{item.qid}: {asked.error}")
            log(f"error: {item.qid}: {asked.error}")
            progress.item_ended(question)
            return
        correct = is_correct(item, asked, options.scoring)
        trace = build_trace(asked, correct_answer=item.answer, correct=correct,
                            extra={"qid": item.qid, "scoring": options.scoring})
        record = result_record(item, asked, trace, correct, options.scoring)
        if traces is not None:
            traces.write_unit([trace])
        writer.write_unit([record])  # last: a question counts as done only once all of it is on disk
        records.append(record)
        summary.done += 1
        right = sum(1 for r in records if r["correct"])
        progress.item_ended(question, f"{item.qid}: {item_line(asked, correct, trace['accounting'])}; "
                                      f"accuracy {right}/{len(records)}", acc=f"{right}/{len(records)}")

    try:
        if items:
            await navigator.preflight()
        await run_jobs(items, one, concurrency=options.concurrency)
    finally:
        progress.close()
        await navigator.aclose()
    return records


def item_line(asked: Asked, correct: bool, accounting: dict) -> str:
    """How one question went, for its progress line."""
    result = asked.result
    said = result.choice or shorten(result.answer or "no answer", 40)
    calls = accounting["caption_calls"]
    return (f"{'right' if correct else 'wrong'} ({said}), {accounting['rounds']} rounds, "
            f"{calls['total']} captions ({calls['made']} new), {time_spent(accounting)}")

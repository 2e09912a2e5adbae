"""`lvr eval` as a library: many questions, concurrently, one result record each, and a summary.

A question's record is written the moment it finishes, so a killed run loses
nothing; a rerun over the same output skips questions already in it. A
question that fails for a reason outside the model (a video that cannot be
read, an endpoint that keeps failing) is named and left out, so the rerun
tries it again.

Two scoring rules (`--scoring`, `score`): lvr's, and the reference's own
(LongVideo-R1's eval/evaluation.py), so a score can be compared with the paper's.

Grounding files (`--task grounding`, told by the file when not given; `read_items`)
hold queries answered with a time interval instead: each is scored by its temporal
IoU with the best-matching target, and the summary gives mIoU and R@0.3/0.5/0.7
overall and by duration bucket (`lvr.infer.grounding`).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..prep.work_queue import run_jobs, unfinished
from ..prep.jsonl import JsonlWriter, dumps, write_atomic
from ..prep.options import check_options, option, override
from ..prep.progress import Reporter, shorten
from ..prep.records import STDIO, read_text
from .benchmarks import (EVAL_FORMATS, EvalFormatError, EvalItem, default_video_dir, load_eval_items,
                         resolve_item_video)
from .ground_then_answer import NAVIGATE
from .grounding import (GROUNDING_FORMATS, GroundingItem, TaskOptions, best_iou, grounding_format_of, item_bucket,
                        load_grounding_items, score_grounding)
from .navigator import Asked, Navigator, NavigatorOptions, build_trace
from .progress import BatchProgress, time_spent
from .protocol import GROUNDING, QA, answer_matches, format_interval

EVAL_SCHEMA = "lvr.eval/1"
SUMMARY_SCHEMA = "lvr.eval_summary/1"
SCORING_RULES = ("lvr", "reference")
# eval/evaluation.py of qiujihao19/LongVideo-R1 scores a question left without an answer as if it had answered A.
REFERENCE_NO_ANSWER = "A"
# --format: the question formats, then the formats only grounding files come in.
GROUNDING_ONLY_FORMATS = tuple(f for f in GROUNDING_FORMATS if f not in EVAL_FORMATS)
FORMATS = EVAL_FORMATS + GROUNDING_ONLY_FORMATS
# Summary figures are rounded to this many decimals.
DIGITS = 4


@dataclass(frozen=True)
class EvalOptions(TaskOptions):
    task: str | None = override(TaskOptions, "task", None)   # None: told by the file (`eval_task`)
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
        if self.format not in FORMATS:
            raise ValueError(f"--format takes {', '.join(FORMATS)}, not {self.format!r}")


def eval_task(name: str, fmt: str, task: str | None, found: str | None) -> str:
    """The task a file is evaluated as: `task` (``--task``) when given, else told by the file.

    `found`: the grounding format the file's text is in (`grounding_format_of`), None for a
    question file. lvr.grounding/1 and the ActivityNet/Charades-STA layout are grounding files;
    CG-Bench questions are graded only as grounding queries (their clue intervals are the targets),
    so they need ``--task grounding``. Raises EvalFormatError when the task and the format disagree.
    """
    readers = f"lvr.grounding/1 (native), {', '.join(GROUNDING_ONLY_FORMATS)}"
    if fmt in GROUNDING_ONLY_FORMATS:
        if task == QA:
            raise EvalFormatError(f"{name}: --format {fmt} holds grounding queries, not questions; drop --task qa")
        return GROUNDING
    if fmt not in ("auto", "native"):
        if task == GROUNDING:
            raise EvalFormatError(f"{name}: --format {fmt} holds questions; --task grounding reads {readers}")
        return QA
    if task == GROUNDING:
        if found is None:
            raise EvalFormatError(f"{name}: not a grounding file; --task grounding reads {readers}")
        return GROUNDING
    if found == "cgbench":
        raise EvalFormatError(f"{name}: CG-Bench records; lvr eval grades them only as grounding queries, with "
                              "--task grounding (their clue intervals are the targets)")
    if task == QA:
        if found is not None:
            raise EvalFormatError(f"{name}: a grounding file ({found}), not questions; drop --task qa")
        return QA
    return GROUNDING if found == "native" or (found == "activitynet" and fmt == "auto") else QA


def read_items(questions: str, options: EvalOptions, *,
               stdin=None) -> tuple[str, list[EvalItem] | list[GroundingItem], list[str]]:
    """(task, items, errors) of a question or grounding file (``-``: stdin, read once), as `eval_task`
    decides. Raises EvalFormatError when the file cannot be read or the task does not fit it."""
    name, fmt = str(questions), options.format
    found = None
    # Only JSON text can be a grounding file (a folder is MLVU's, parquet Video-MME's).
    text_file = name == STDIO or Path(name).is_file() and Path(name).suffix.lower() != ".parquet"
    if fmt in ("auto", "native") and text_file:
        text = read_text(name, stdin)
        found = grounding_format_of(text)
        stdin = io.StringIO(text)
    task = eval_task(name, fmt, options.task, found)
    if task == GROUNDING:
        items, errors = load_grounding_items(name, fmt, stdin=stdin)
    else:
        items, errors = load_eval_items(name, fmt, subtitles=options.subtitles,
                                        videomme_duration=options.videomme_duration, stdin=stdin)
    return task, items, errors


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
        "schema": EVAL_SCHEMA, "task": QA, "qid": item.qid, "video": item.video,
        "video_id": trace["video"]["video_id"], "category": item.category, "source": item.source,
        "question": item.question, "options": list(item.options), "answer": item.answer,
        "prediction": result.answer, "choice": result.choice, "correct": correct, "scoring": rule,
        "strategy": asked.strategy, "stopped": result.stopped, "accounting": trace["accounting"],
        "settings": {**asked.settings, "scoring": rule},
    }


def grounding_record(item: GroundingItem, asked: Asked, trace: dict, iou: float) -> dict:
    """A grounding query's lvr.eval/1 record: the answered interval (None without one), the targets,
    the IoU with the best-matching target (0 without an interval) and the duration bucket."""
    result, video = asked.result, trace["video"]
    return {
        "schema": EVAL_SCHEMA, "task": GROUNDING, "qid": item.qid, "video": item.video,
        "video_id": video["video_id"], "source": item.source, "query": item.query,
        "targets": [[s, e] for s, e in item.targets], "duration": item.duration,
        "video_duration": video["duration"], "duration_bucket": item_bucket(item, video["duration"]),
        "prediction": result.answer, "interval": list(result.interval) if result.interval is not None else None,
        "iou": iou, "strategy": asked.strategy, "stopped": result.stopped, "accounting": trace["accounting"],
        "settings": asked.settings,
    }


def is_grounding(record: dict) -> bool:
    return record.get("task") == GROUNDING   # records written before grounding are questions


def record_correct(record: dict, rule: str) -> bool:
    """An lvr.eval/1 record's verdict under `rule`, from its prediction and answer key."""
    return score(rule, record.get("prediction"), record.get("choice"), record.get("options") or (),
                 record.get("answer"))


@dataclass
class EvalSummary:
    task: str = QA                    # what the file held: questions or grounding queries
    done: int = 0                     # answered in this run
    skipped: int = 0                  # already in the output
    failed: list[str] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: dict = field(default_factory=dict)


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), DIGITS) if values else 0.0


def summarize(records: list[dict], settings: dict | None = None, rule: str = "lvr") -> dict:
    """Accuracy overall and per category (questions), mIoU and R@k overall and per duration bucket
    (grounding queries, under "grounding"), and for all: rounds, caption calls against exhaustive,
    tokens, time. "questions" counts every record, "tasks" each kind; the accuracy keys are given
    when the file holds questions (or nothing), "grounding" when it holds grounding queries.
    """
    queries = [r for r in records if is_grounding(r)]
    questions = [r for r in records if not is_grounding(r)]
    report = {"schema": SUMMARY_SCHEMA, "questions": len(records),
              "tasks": {QA: len(questions), GROUNDING: len(queries)}}
    if questions or not queries:
        report.update(accuracy(questions, rule))
    if queries:
        report["grounding"] = grounding_scores(queries)
    return {**report, **effort(records), "settings": settings}


def accuracy(records: list[dict], rule: str) -> dict:
    """Accuracy of question records, overall and per category.

    Every record is scored under `rule` (so an output file resumed under another rule is
    still scored one way), and the accuracy under each rule is given beside it.
    """
    verdicts = {r: [record_correct(rec, r) for rec in records] for r in SCORING_RULES}
    correct = verdicts[rule]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for r, right in zip(records, correct):
        by_category[r.get("category") or "(none)"].append(right)
    return {
        "scoring": rule,
        "correct": sum(correct),
        "accuracy": _mean(correct),
        "accuracy_by_scoring": {r: {"correct": sum(v), "accuracy": _mean(v)} for r, v in verdicts.items()},
        "per_category": {c: {"questions": len(v), "accuracy": _mean(v)} for c, v in sorted(by_category.items())},
    }


def grounding_scores(records: list[dict]) -> dict:
    """mIoU and R@0.3/0.5/0.7 of grounding records, overall and per duration bucket (`score_grounding`,
    from each record's targets and interval; the bucket from the source's duration, else the video's)."""
    items = [GroundingItem(r["qid"], r["video"], r.get("query") or "", tuple(map(tuple, r["targets"])),
                           r.get("duration")) for r in records]
    scores = score_grounding(items, {r["qid"]: r.get("interval") for r in records},
                             {r["video"]: r.get("video_duration") for r in records})

    def rounded(s) -> dict:
        return {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in s.to_record().items()}

    return {**rounded(scores["overall"]), "answered": sum(r.get("interval") is not None for r in records),
            "by_duration": {bucket: rounded(s) for bucket, s in scores["by_duration"].items()}}


def effort(records: list[dict]) -> dict:
    """What the records cost: how they stopped, rounds, caption and video_qa calls, tokens, time."""
    acc = [r.get("accounting") or {} for r in records]
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                             "requests": 0})
    for a in acc:
        for role, m in (a.get("models") or {}).items():
            for key in ("prompt_tokens", "completion_tokens", "requests"):
                tokens[role][key] += int(m.get(key) or 0)
    return {
        "stopped": dict(sorted(_count(r.get("stopped") for r in records).items())),
        "strategies": dict(sorted(_count(r.get("strategy", NAVIGATE) for r in records).items())),
        "mean_rounds": _mean(a.get("rounds", 0) for a in acc),
        "mean_caption_calls": _mean((a.get("caption_calls") or {}).get("total", 0) for a in acc),
        "mean_captions_made": _mean((a.get("caption_calls") or {}).get("made", 0) for a in acc),
        "mean_exhaustive_captions": _mean(a.get("exhaustive_captions", 0) for a in acc),
        "mean_video_qa_calls": _mean(a.get("video_qa_calls", 0) for a in acc),
        "tokens": dict(tokens),
        "mean_seconds": _mean(a.get("seconds", 0.0) for a in acc),
        "segment_seconds": round(sum(a.get("segment_seconds", 0.0) for a in acc), 3),
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
    """Answer every question (or grounding query) not yet in `output`; return the summary of the
    whole output file.

    `reporter` shows a bar (or a line per question off a terminal); nothing without one.

    Raises EvalFormatError when the questions file cannot be read at all (or is not of the
    task asked for) and ModelError when an endpoint cannot be reached.
    """
    summary = EvalSummary()
    summary.task, items, summary.load_errors = read_items(questions, options)
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
            log(f"skip: {summary.skipped} {item_noun(summary.task)} already in the output")
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


def item_noun(task: str) -> str:
    return "grounding queries" if task == GROUNDING else "questions"


async def _answer_all(items: list[EvalItem] | list[GroundingItem], writer: JsonlWriter, traces: JsonlWriter | None,
                      nav: NavigatorOptions, cache_dir: Path, video_dir: Path, options: EvalOptions,
                      summary: EvalSummary, log, reporter: Reporter) -> list[dict]:
    records: list[dict] = []
    navigator = Navigator(nav, cache_dir)
    grounding = summary.task == GROUNDING
    progress = BatchProgress(reporter, "eval", len(items), "query" if grounding else "question")

    async def one(item: EvalItem | GroundingItem) -> None:
        try:
            video = resolve_item_video(item, video_dir)
        except (EvalFormatError, OSError) as e:
            summary.failed.append(f"{item.qid}: {e}")
            log(f"error: {item.qid}: {e}")
            progress.item_ended(None)
            return
        question = progress.question(video)
        if grounding:   # no record says whether subtitles are shown: --subtitles does, else not
            asked = await navigator.ask(video, item.query, (), subtitles=bool(options.subtitles), task=GROUNDING,
                                        callbacks=question.callbacks)
        else:
            asked = await navigator.ask(video, item.question, item.options, subtitles=item.subtitles,
                                        callbacks=question.callbacks)
        if asked.env is None or asked.result.stopped == "error":
            summary.failed.append(f"{item.qid}: {asked.error}")
            log(f"error: {item.qid}: {asked.error}")
            progress.item_ended(question)
            return
        record, trace, line = (grounding_outcome(item, asked) if grounding
                               else question_outcome(item, asked, options.scoring))
        if traces is not None:
            traces.write_unit([trace])
        writer.write_unit([record])  # last: a question counts as done only once all of it is on disk
        records.append(record)
        summary.done += 1
        so_far, postfix = running_score(records)
        progress.item_ended(question, f"{item.qid}: {line}; {so_far}", **postfix)

    try:
        if items:
            await navigator.preflight()
        await run_jobs(items, one, concurrency=options.concurrency)
    finally:
        progress.close()
        await navigator.aclose()
    return records


def question_outcome(item: EvalItem, asked: Asked, rule: str) -> tuple[dict, dict, str]:
    """A question's record, trace and progress line."""
    correct = is_correct(item, asked, rule)
    trace = build_trace(asked, correct_answer=item.answer, correct=correct, extra={"qid": item.qid, "scoring": rule})
    return result_record(item, asked, trace, correct, rule), trace, item_line(asked, correct, trace["accounting"])


def grounding_outcome(item: GroundingItem, asked: Asked) -> tuple[dict, dict, str]:
    """A grounding query's record, trace (with the targets, for the trace page) and progress line."""
    iou = best_iou(asked.result.interval, item.targets)
    trace = build_trace(asked, extra={"qid": item.qid, "targets": [[s, e] for s, e in item.targets], "iou": iou})
    return grounding_record(item, asked, trace, iou), trace, grounding_line(asked, iou, trace["accounting"])


def running_score(records: list[dict]) -> tuple[str, dict]:
    """The score so far, for progress: accuracy of questions, mIoU of grounding queries."""
    if records and is_grounding(records[0]):
        miou = sum(r["iou"] for r in records) / len(records)
        return f"mIoU {miou:.3f} over {len(records)}", {"mIoU": f"{miou:.3f}"}
    right = sum(1 for r in records if r["correct"])
    return f"accuracy {right}/{len(records)}", {"acc": f"{right}/{len(records)}"}


def item_line(asked: Asked, correct: bool, accounting: dict) -> str:
    """How one question went, for its progress line."""
    result = asked.result
    said = result.choice or shorten(result.answer or "no answer", 40)
    return f"{'right' if correct else 'wrong'} ({said}), {effort_phrase(accounting)}"


def grounding_line(asked: Asked, iou: float, accounting: dict) -> str:
    """How one grounding query went, for its progress line."""
    interval = asked.result.interval
    said = format_interval(*interval) if interval is not None else "no interval"
    return f"IoU {iou:.2f} ({said}), {effort_phrase(accounting)}"


def effort_phrase(accounting: dict) -> str:
    calls = accounting["caption_calls"]
    return (f"{accounting['rounds']} rounds, {calls['total']} captions ({calls['made']} new), "
            f"{time_spent(accounting)}")

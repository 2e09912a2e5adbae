"""QA items for trajectory synthesis: video, question, options, answer and clue intervals.

A teacher trajectory needs what an eval question has plus ground-truth *clue
intervals*: the spans of the video (in seconds) that hold the evidence. The
hints that follow a wrong answer are computed from them. Three record shapes are
read (see docs/qa_format.md):

- ``native``: JSONL records with ``"schema": "lvr.qa/1"`` (`QAItem.to_record`
  writes them). ``lvr.question/1`` records are accepted too. Clues are optional: an item
  without them cannot be synthesized, and ``lvr rl`` scores it by its answer alone.
- ``cgbench``: CG-Bench's annotation files (``cgbench.json``,
  ``cgbench_mini.json``: a JSON list of objects with ``video_uid``, ``qid``,
  ``question``, ``choices``, ``right_answer``, ``clue_intervals`` ...), or the
  same objects as JSONL.
- ``longvideo-r1``: the LongVideo-R1 release's RL data, verl rows (``prompt``,
  ``reward_model``, ``extra_info``), read by `lvr.train.released_data.rl_row`.

Each may also be a parquet file (read with pyarrow, which ``datasets`` installs).

`lvr synthesize` and `lvr rl` also train on grounding items (`load_training_items`):
a native file may hold ``lvr.grounding/1`` records (`lvr.infer.grounding`), alone or
mixed with ``lvr.qa/1`` records in one file; each record is read by its schema. A
grounding item's clue intervals are its targets (`clue_intervals`).

A bad record is named (``file:line: reason``) and skipped while the rest load;
a qid seen twice is an error for the later record. A file that cannot be read
at all raises `QAFormatError`. The files and fields are read with the toolkit
`lvr eval` uses (`lvr.prep.records`), so options and answers are read identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..infer.benchmarks import NATIVE_SCHEMA as QUESTION_SCHEMA, EvalFormatError, QuestionItem
from ..infer.grounding import GROUNDING_SCHEMA, GroundingItem, native_record
from ..infer.protocol import GROUNDING, QA
from ..prep.records import (STDIO, Collector, RecordSkip, answer_field, category_field, extra_field, interval_list, interval_pair,
                            json_records, options_field, parquet_records, read_text, sniff_format,
                            schema_field, source_field, text_field)
from .released_data import is_rl_row, rl_row

__all__ = ["QA_FORMATS", "QA_SCHEMA", "QAFormatError", "QAItem", "TrainingItem", "load_qa_items",
           "load_training_items", "validate_clues", "item_task", "item_query", "item_options",
           "clue_intervals"]

QA_FORMATS = ("auto", "native", "cgbench", "longvideo-r1")
QA_SCHEMA = "lvr.qa/1"

# A file that cannot be read at all (the same error `lvr eval` raises for question files).
QAFormatError = EvalFormatError


@dataclass(frozen=True)
class QAItem(QuestionItem):
    """One question about one video, with the clue intervals that answer it.

    qid: unique within its file. video: a file name, relative path or video id
    (resolved with `lvr.infer.benchmarks.resolve_video`). options: ``("A. text",
    ...)``, ``()`` for an open question. answer: the letter for multiple choice,
    the reference text otherwise. clues: ``((start, end), ...)`` in seconds, as
    given (not merged or sorted). source: "native" or "cgbench". extra: what
    else the source says (duration, domain, ...).
    """

    qid: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    clues: tuple[tuple[float, float], ...]
    category: str | None = None
    source: str = "native"
    extra: dict = field(default_factory=dict, hash=False)

    def to_record(self) -> dict:
        """The item as a native ``lvr.qa/1`` record (JSON-safe); `load_qa_items` reads it back unchanged."""
        return self.record(QA_SCHEMA, clues=[[s, e] for s, e in self.clues])


# ---------------------------------------------------------------- clues

def validate_clues(value: Any, key: str = "clues", *, required: bool = True) -> tuple[tuple[float, float], ...]:
    """A list of ``[start, end]`` pairs in seconds -> tuple of float pairs.

    Each pair needs finite numbers with ``0 <= start < end``; at least one pair,
    unless `required` is False: then a missing (None) or empty list gives ``()``.
    Raises ValueError naming the first bad pair.
    """
    if not required and (value is None or (isinstance(value, (list, tuple)) and not value)):
        return ()
    out = []
    for i, pair in enumerate(interval_list(value, key)):
        start, end = interval_pair(pair, f"{key}[{i}]")
        if not start < end:
            raise ValueError(f"{key}[{i}]: start {start:g} is not before end {end:g}")
        out.append((start, end))
    return tuple(out)


def _clues(rec: dict, key: str) -> tuple[tuple[float, float], ...]:
    """A record's clue intervals; none (missing or empty) is an item without clues, which `lvr rl`
    scores by its answer alone. Malformed pairs skip the record."""
    try:
        return validate_clues(rec.get(key), key, required=False)
    except ValueError as e:
        raise RecordSkip(str(e)) from None


# ---------------------------------------------------------------- adapters

def _native(col: Collector, where: str, rec: dict) -> None:
    schema_field(rec, QA_SCHEMA, QUESTION_SCHEMA)
    video = text_field(rec, "video")
    qid = col.item_id(rec, ("id",), video)
    question = text_field(rec, "question")
    options = options_field(rec.get("options") or [])
    answer = answer_field(rec.get("answer"), options) if options else text_field(rec, "answer")
    clues = _clues(rec, "clues")
    source = source_field(rec, "native")
    extra = extra_field(rec)
    if "subtitles" in rec:  # an lvr.question/1 field; kept so nothing is lost
        if not isinstance(rec["subtitles"], bool):
            raise RecordSkip(f"'subtitles' must be true or false, got {json.dumps(rec['subtitles'])}")
        extra["subtitles"] = rec["subtitles"]
    col.add(where, QAItem(qid, video, question, options, answer, clues, category_field(rec.get("category")),
                          source, extra))


# CG-Bench keys that become QAItem fields; every other key is carried in `extra`.
_CGBENCH_MAPPED = {"video_uid", "qid", "question", "choices", "right_answer", "answer", "clue_intervals",
                   "sub_category"}


def _cgbench(col: Collector, where: str, rec: dict) -> None:
    video = text_field(rec, "video_uid")
    qid = col.item_id(rec, ("qid",), video)
    question = text_field(rec, "question")
    options = options_field(rec.get("choices") or [])
    answer_text = rec.get("answer")
    if options:
        # right_answer is the option letter (CG-Bench's MCQ scoring compares it with the
        # predicted letter); `answer` is the right option's text, used when no letter is given.
        if rec.get("right_answer") is not None:
            answer = answer_field(rec["right_answer"], options)
        elif answer_text is not None:
            answer = answer_field(answer_text, options)
        else:
            raise RecordSkip("missing 'right_answer'")
    else:
        answer = text_field(rec, "answer")
    clues = _clues(rec, "clue_intervals")
    extra = {k: v for k, v in rec.items() if k not in _CGBENCH_MAPPED}
    if options and answer_text is not None:
        extra["answer_text"] = answer_text
    if rec.get("sub_category") is not None:
        extra["sub_category"] = rec["sub_category"]
    col.add(where, QAItem(qid, video, question, options, answer, clues,
                          category_field(rec.get("sub_category")), "cgbench", extra))


def _longvideo_r1(col: Collector, where: str, rec: dict) -> None:
    row = rl_row(rec)
    n = col.next_n(row.video)
    options = options_field(list(row.options))
    answer = answer_field(row.answer, options) if options else row.answer
    clues = _clues({"clue_intervals": row.clues}, "clue_intervals")
    col.add(where, QAItem(row.qid or f"{row.video}#{n}", row.video, row.question, options, answer, clues,
                          None, "longvideo-r1", row.extra))


_ADAPTERS = {"native": _native, "cgbench": _cgbench, "longvideo-r1": _longvideo_r1}


def _sniff(rec: dict) -> str | None:
    schema = rec.get("schema")
    if isinstance(schema, str) and (schema.startswith("lvr.qa/") or schema.startswith("lvr.question/")):
        return "native"
    if is_rl_row(rec):
        return "longvideo-r1"
    if "video_uid" in rec or "clue_intervals" in rec or "right_answer" in rec:
        return "cgbench"
    if "video" in rec and "question" in rec:
        return "native"
    return None


def load_qa_items(path: "str | Path", fmt: str = "auto", *,
                  stdin: IO[str] | None = None) -> tuple[list[QAItem], list[str]]:
    """Read a QA file (``-`` for stdin): JSONL, a JSON list, or parquet.

    Returns (items, errors): each error is one line ``"file:line: reason"`` for a
    record that was skipped (for a JSON list, the line where the record's ``{``
    stands); the other records still load. A later record whose qid repeats an
    earlier one is such an error. Raises QAFormatError when the file cannot be
    read at all or its format cannot be told.
    """
    return _load(path, fmt, stdin, _ADAPTERS, _sniff)


# ---------------------------------------------------------------- training items (QA and grounding)

TrainingItem = QAItem | GroundingItem


def item_task(item: TrainingItem) -> str:
    """``grounding`` for a grounding item (answered with an interval), else ``qa``."""
    return GROUNDING if isinstance(item, GroundingItem) else QA


def item_query(item: TrainingItem) -> str:
    """The text the navigator is asked: a QA item's question, a grounding item's query."""
    return item.query if isinstance(item, GroundingItem) else item.question


def item_options(item: TrainingItem) -> tuple[str, ...]:
    """A QA item's options (``()`` for an open question); a grounding query has none."""
    return () if isinstance(item, GroundingItem) else item.options


def clue_intervals(item: TrainingItem) -> tuple[tuple[float, float], ...]:
    """The intervals hints and the localisation reward are computed from: a QA item's clues,
    a grounding item's targets."""
    return item.targets if isinstance(item, GroundingItem) else item.clues


def _native_or_grounding(col: Collector, where: str, rec: dict) -> None:
    """A native record read by its schema: ``lvr.grounding/1`` a grounding item, else a QA item."""
    if rec.get("schema") == GROUNDING_SCHEMA:
        native_record(col, where, rec)   # the one home of its fields; ids unique across both kinds
    else:
        _native(col, where, rec)


def _sniff_training(rec: dict) -> str | None:
    schema = rec.get("schema")
    if isinstance(schema, str) and schema.startswith("lvr.grounding/"):
        return "native"
    return _sniff(rec)


def load_training_items(path: "str | Path", fmt: str = "auto", *,
                        stdin: IO[str] | None = None) -> tuple[list[TrainingItem], list[str]]:
    """`load_qa_items` for `lvr synthesize` and `lvr rl`: a native file may also hold
    ``lvr.grounding/1`` records, alone or mixed with ``lvr.qa/1`` ones, each read by its
    schema (a grounding record by `lvr.infer.grounding`'s rules). Ids are unique across both
    kinds; errors are named ``file:line: reason`` and the other records still load."""
    return _load(path, fmt, stdin, {**_ADAPTERS, "native": _native_or_grounding}, _sniff_training)


def _load(path: "str | Path", fmt: str, stdin: IO[str] | None, adapters: dict, sniff) -> tuple[list, list[str]]:
    """Read a QA file's records and run each through its format's adapter (the loaders above)."""
    if fmt not in QA_FORMATS:
        raise QAFormatError(f"unknown QA format {fmt!r}; one of {', '.join(QA_FORMATS)}")
    name = str(path)
    if name != STDIO and Path(name).is_dir():
        raise QAFormatError(f"{name}: is a directory; give a QA file")
    if name != STDIO and Path(name).suffix.lower() == ".parquet":
        records = list(parquet_records(name))
    else:
        records = list(json_records(name, read_text(name, stdin)))
    if not records:
        return [], []
    if fmt == "auto":
        fmt = sniff_format(name, records, sniff, "QA")
    col = Collector()
    for lineno, rec in records:
        col.take(f"{name}:{lineno}", rec, adapters[fmt])
    return col.items, col.errors

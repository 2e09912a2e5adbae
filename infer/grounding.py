"""Temporal grounding files and metrics: "when in the video does this happen?".

`load_grounding_items` turns a grounding file into a list of `GroundingItem`:
one text query about one video and the target interval(s), in seconds, that
answer it. Three record shapes are read (see docs/eval_formats.md, "Grounding
files"):

- ``native``: JSONL (or a JSON list) with ``"schema": "lvr.grounding/1"``;
  `GroundingItem.to_record` writes them.
- ``activitynet``: the public ActivityNet-Captions / Charades-STA style JSON,
  one object mapping each video to ``{"duration", "timestamps": [[s, e], ...],
  "sentences": [...]}``; each sentence is one item whose target is its
  timestamp pair.
- ``cgbench``: CG-Bench annotation records; the question is the query and its
  ``clue_intervals`` are the targets.

A bad record is named (``file:line: reason``) and skipped while the rest load;
a file that cannot be read at all raises `GroundingFormatError`. Reading files
and fields is `lvr.prep.records`.

The metrics (`temporal_iou`, `best_iou`, `mean_iou`, `recall_at`,
`duration_bucket`, `score_grounding`) are pure functions; this module is the
one home of the temporal IoU formula (the train layer imports it from here).

`TaskOptions` is the one home of the ``--task qa|grounding`` option, and
`grounding_format_of` tells a grounding file from a question file (`lvr eval`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

from ..prep.options import check_options, option
from ..prep.records import (STDIO, Collector, RecordFileError, RecordSkip, extra_field, first_records,
                            interval_list, interval_pair, json_records, read_text, seconds_field, sniff_format,
                            schema_field, source_field, text_field)
from .protocol import QA, TASKS

__all__ = [
    "GROUNDING_FORMATS",
    "GROUNDING_SCHEMA",
    "DURATION_BUCKETS",
    "RECALL_THRESHOLDS",
    "GroundingFormatError",
    "GroundingItem",
    "GroundingScores",
    "TaskOptions",
    "grounding_format_of",
    "load_grounding_items",
    "native_record",
    "validate_intervals",
    "temporal_iou",
    "best_iou",
    "mean_iou",
    "recall_at",
    "duration_bucket",
    "item_bucket",
    "score_grounding",
]

GROUNDING_FORMATS = ("auto", "native", "activitynet", "cgbench")
GROUNDING_SCHEMA = "lvr.grounding/1"

# A grounding file cannot be used at all: the same error class as question and QA files.
GroundingFormatError = RecordFileError

Interval = tuple[float, float]


@dataclass(frozen=True)
class TaskOptions:
    """Which kind of item a command reads or writes: a question (`qa`) or a grounding query.

    The one home of ``--task``; a command's settings subclass it and may give it another default
    (`lvr eval`'s None: told by the file, `lvr.infer.evaluate.EvalOptions`).
    """

    task: str | None = option(
        QA, "--task", metavar="qa|grounding", choices=TASKS,
        help="What kind of item: qa, questions answered with an option letter or text; grounding, queries "
             "answered with a time interval, its start and end in seconds (lvr.grounding/1). questions writes qa "
             "unless told; eval tells it from the file unless told (CG-Bench needs grounding: its clue intervals "
             "become the targets).")

    def __post_init__(self):
        check_options(self)


@dataclass(frozen=True)
class GroundingItem:
    """One query about one video, with the interval(s) that answer it.

    qid: unique within its file (the source's id, else ``"<video>#<n>"``).
    video: as written in the source (resolved with `lvr.infer.benchmarks.resolve_video`).
    query: the text to ground. targets: ``((start, end), ...)`` in seconds, each
    ``0 <= start < end``, as given (not merged or sorted); a prediction is scored
    against the best-matching one. duration: the video's length in seconds when
    the source says it (targets then lie within it), else None. source: "native",
    "activitynet" or "cgbench". extra: what else the source says.
    """

    qid: str
    video: str
    query: str
    targets: tuple[Interval, ...]
    duration: float | None = None
    source: str = "native"
    extra: dict = field(default_factory=dict, hash=False)

    def to_record(self) -> dict:
        """The item as a native ``lvr.grounding/1`` record (JSON-safe); the loader reads it back unchanged."""
        return {"schema": GROUNDING_SCHEMA, "id": self.qid, "video": self.video, "query": self.query,
                "targets": [[s, e] for s, e in self.targets], "duration": self.duration, "source": self.source,
                "extra": json.loads(json.dumps(self.extra, ensure_ascii=False, default=str))}


# ---------------------------------------------------------------- intervals

def _duration(value: Any) -> float | None:
    """A record's video duration: None when absent, else a positive number of seconds."""
    if value is None:
        return None
    try:
        d = seconds_field(value, "'duration'")
    except ValueError as e:
        raise RecordSkip(str(e)) from None
    if d <= 0:
        raise RecordSkip(f"'duration' must be positive, got {d:g}")
    return d


def validate_intervals(value: Any, key: str, duration: float | None = None) -> tuple[Interval, ...]:
    """A list of ``[start, end]`` pairs in seconds -> tuple of float pairs.

    Each pair needs finite numbers with ``0 <= start < end`` (a pair with start
    after end is *reversed*), and ``end <= duration`` when the duration is known.
    At least one pair. Raises ValueError naming the first bad pair.
    """
    return tuple(_interval(pair, f"{key}[{i}]", duration) for i, pair in enumerate(interval_list(value, key)))


def _interval(pair: Any, where: str, duration: float | None) -> Interval:
    start, end = interval_pair(pair, where)
    if start > end:
        raise ValueError(f"{where}: [{start:g}, {end:g}] is reversed (start after end)")
    if start == end:
        raise ValueError(f"{where}: [{start:g}, {end:g}] is empty (start equals end)")
    if duration is not None and end > duration:
        raise ValueError(f"{where}: [{start:g}, {end:g}] ends after the video's duration {duration:g} s")
    return start, end


def _targets(value: Any, key: str, duration: float | None) -> tuple[Interval, ...]:
    try:
        return validate_intervals(value, key, duration)
    except ValueError as e:
        raise RecordSkip(str(e)) from None


# ---------------------------------------------------------------- adapters

def native_record(col: Collector, where: str, rec: dict) -> None:
    """One ``lvr.grounding/1`` record into `col` (RecordSkip with the reason when it is unusable);
    `lvr.train.qa_items` reads the grounding records of a mixed training file with it too."""
    schema_field(rec, GROUNDING_SCHEMA)
    video = text_field(rec, "video")
    qid = col.item_id(rec, ("id",), video)
    query = text_field(rec, "query")
    duration = _duration(rec.get("duration"))
    targets = _targets(rec.get("targets"), "targets", duration)
    col.add(where, GroundingItem(qid, video, query, targets, duration, source_field(rec, "native"), extra_field(rec)))


# CG-Bench keys that become item fields; every other key is carried in `extra`.
_CGBENCH_MAPPED = {"video_uid", "qid", "question", "clue_intervals", "duration"}


def _cgbench(col: Collector, where: str, rec: dict) -> None:
    video = text_field(rec, "video_uid")
    qid = col.item_id(rec, ("qid",), video)
    query = text_field(rec, "question")
    duration = _duration(rec.get("duration"))
    if not rec.get("clue_intervals"):
        raise RecordSkip("no 'clue_intervals': nothing to ground the question to")
    targets = _targets(rec["clue_intervals"], "clue_intervals", duration)
    extra = {k: v for k, v in rec.items() if k not in _CGBENCH_MAPPED}
    col.add(where, GroundingItem(qid, video, query, targets, duration, "cgbench", extra))


def _activitynet_video(col: Collector, where: str, video: str, rec: Any) -> None:
    """One video of the ActivityNet / Charades-STA layout: one item per sentence.

    A problem with one sentence skips that sentence only, named by the video key and sentence index
    (the line of a sentence inside the video's object is not told).
    """
    here = f"{where}: video {video!r}"
    try:
        if not isinstance(rec, dict):
            raise RecordSkip("not a JSON object")
        duration = _duration(rec.get("duration"))
        stamps, sentences = rec.get("timestamps"), rec.get("sentences")
        if not isinstance(stamps, list):
            raise RecordSkip("'timestamps' must be a list of [start, end] pairs")
        if not isinstance(sentences, list):
            raise RecordSkip("'sentences' must be a list of strings")
        if len(stamps) != len(sentences):
            raise RecordSkip(f"{len(stamps)} timestamps but {len(sentences)} sentences")
    except RecordSkip as e:
        col.error(here, str(e))
        return
    base = {k: v for k, v in rec.items() if k not in ("duration", "timestamps", "sentences")}
    for i, (stamp, sentence) in enumerate(zip(stamps, sentences)):
        at = f"{here} sentence {i}"
        try:
            if not isinstance(sentence, str) or not sentence.strip():
                raise RecordSkip("the sentence must be non-empty text")
            try:
                target = _interval(stamp, "timestamp", duration)
            except ValueError as e:
                raise RecordSkip(str(e)) from None
            item = GroundingItem(f"{video}#{i + 1}", video, sentence.strip(), (target,), duration,
                                 "activitynet", {**base, "sentence_index": i})
        except RecordSkip as e:
            col.error(at, str(e))
            continue
        col.add(at, item)


# ---------------------------------------------------------------- reading files

def _sniff(rec: dict) -> str | None:
    schema = rec.get("schema")
    if isinstance(schema, str) and schema.startswith("lvr.grounding/"):
        return "native"
    if "video_uid" in rec or "clue_intervals" in rec:
        return "cgbench"
    if "video" in rec and ("query" in rec or "targets" in rec):
        return "native"
    return None


def _is_activitynet(obj: Any) -> bool:
    """A top-level object whose values describe videos (duration, timestamps, sentences)."""
    return isinstance(obj, dict) and _sniff(obj) is None and any(
        isinstance(v, dict) and ("timestamps" in v or "sentences" in v) for v in obj.values())


def _object_members(name: str, text: str) -> Iterator[tuple[int, str, Any]]:
    """(line, key, value) of each member of a top-level JSON object, the line where its key stands."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")

    def fail(pos: int, msg: str) -> GroundingFormatError:
        return GroundingFormatError(f"{name}:{text.count(chr(10), 0, pos) + 1}: not JSON ({msg})")

    pos = ws.match(text, 0).end()
    if text[pos:pos + 1] != "{":
        raise fail(pos, "expected a JSON object of videos")
    pos = ws.match(text, pos + 1).end()
    if text[pos:pos + 1] == "}":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        if text[pos:pos + 1] != '"':
            raise fail(pos, "expected a video key in double quotes")
        try:
            key, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        pos = ws.match(text, pos).end()
        if text[pos:pos + 1] != ":":
            raise fail(pos, "expected ':' after the video key")
        try:
            value, pos = decoder.raw_decode(text, ws.match(text, pos + 1).end())
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        yield line, key, value
        pos = ws.match(text, pos).end()
        sep = text[pos:pos + 1]
        if sep == ",":
            pos = ws.match(text, pos + 1).end()
        elif sep == "}":
            if ws.match(text, pos + 1).end() != len(text):
                raise fail(pos + 1, "extra data after the object")
            return
        else:
            raise fail(pos, "expected ',' or '}' between videos")


def _whole_object(text: str) -> Any:
    """The text as one JSON value when it is a single object, else None (JSONL, a list, or broken)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def grounding_format_of(text: str) -> str | None:
    """The grounding format a file's text is in ("native", "activitynet" or "cgbench"), told as
    `load_grounding_items` tells it with ``auto``; None when it is not a grounding file (a question
    file, or text that cannot be read). Never raises."""
    if _is_activitynet(_whole_object(text)):
        return "activitynet"
    try:
        first = next((rec for _, rec in first_records(json_records("-", text)) if isinstance(rec, dict)), None)
    except RecordFileError:
        return None
    return _sniff(first) if first is not None else None


def load_grounding_items(path: "str | Path", fmt: str = "auto", *,
                         stdin: IO[str] | None = None) -> tuple[list[GroundingItem], list[str]]:
    """Read a grounding file (``-`` for stdin) into items.

    Returns (items, errors): each error is one line ``"file:line: reason"`` for
    a record (ActivityNet layout: a video, or one sentence of it, named by key
    and index) that was skipped; the rest still load. A later record whose qid
    repeats an earlier one is such an error. Raises GroundingFormatError when the
    file cannot be read at all or its format cannot be told.
    """
    if fmt not in GROUNDING_FORMATS:
        raise GroundingFormatError(f"unknown grounding format {fmt!r}; one of {', '.join(GROUNDING_FORMATS)}")
    name = str(path)
    if name != STDIO and Path(name).is_dir():
        raise GroundingFormatError(f"{name}: is a directory; give a grounding file")
    text = read_text(name, stdin)
    col = Collector()
    whole = _whole_object(text)
    if fmt == "activitynet" or (fmt == "auto" and _is_activitynet(whole)):
        for line, video, rec in _object_members(name, text):
            _activitynet_video(col, f"{name}:{line}", video, rec)
        return col.items, col.errors
    records = list(json_records(name, text))
    if not records:
        return [], []
    if fmt == "auto":
        fmt = sniff_format(name, list(first_records(iter(records))), _sniff, "grounding")
    adapter = {"native": native_record, "cgbench": _cgbench}[fmt]
    for lineno, rec in records:
        col.take(f"{name}:{lineno}", rec, adapter)
    return col.items, col.errors


# ---------------------------------------------------------------- metrics

RECALL_THRESHOLDS = (0.3, 0.5, 0.7)

# (name, lower bound inclusive, upper bound exclusive) in seconds; a video of unknown length is "unknown".
DURATION_BUCKETS = (("<2min", 0.0, 120.0), ("2-10min", 120.0, 600.0), ("10-30min", 600.0, 1800.0),
                    (">=30min", 1800.0, math.inf))
UNKNOWN_BUCKET = "unknown"

# A computed IoU that should equal a threshold (0.3 = 3 s / 10 s) may land a rounding step below it.
_TOLERANCE = 1e-9


def temporal_iou(pred: Sequence[float], target: Sequence[float]) -> float:
    """Temporal IoU of two intervals ``[s, e]`` in seconds.

        inter = max(0, min(e_p, e_t) − max(s_p, s_t))
        union = (e_p − s_p) + (e_t − s_t) − inter
        IoU   = inter / union          (0 when union <= 0)

    so IoU ∈ [0, 1]: 1 for the same interval (two equal points included), 0 for disjoint or
    touching ones. A reversed interval (s > e) has no length and overlaps nothing. The one home of
    the formula: eval's metrics and rl's grounding reward (train/rewards.py) both use it.
    """
    sp, ep = float(pred[0]), float(pred[1])
    st, et = float(target[0]), float(target[1])
    len_p, len_t = max(0.0, ep - sp), max(0.0, et - st)
    inter = max(0.0, min(ep, et) - max(sp, st)) if len_p and len_t else 0.0
    union = len_p + len_t - inter
    if union <= 0:
        return 1.0 if (sp, ep) == (st, et) and sp <= ep else 0.0
    return min(1.0, inter / union)


def best_iou(pred: Sequence[float] | None, targets: Iterable[Sequence[float]]) -> float:
    """``max over targets t of temporal_iou(pred, t)``: an item with several target intervals is
    scored against the one the prediction matches best. 0 for no prediction (None) or no targets."""
    if pred is None:
        return 0.0
    return max((temporal_iou(pred, t) for t in targets), default=0.0)


def mean_iou(ious: Sequence[float]) -> float:
    """mIoU = (1/N) · Σ IoU_i over the N items; 0 for none."""
    return sum(ious) / len(ious) if ious else 0.0


def recall_at(ious: Sequence[float], threshold: float) -> float:
    """R@t = |{i : IoU_i >= t}| / N (a 1e-9 tolerance absorbs float rounding); 0 for no items."""
    return sum(1 for x in ious if x >= threshold - _TOLERANCE) / len(ious) if ious else 0.0


def duration_bucket(duration: float | None) -> str:
    """The bucket of a video length in seconds: ``<2min`` [0, 120), ``2-10min`` [120, 600),
    ``10-30min`` [600, 1800), ``>=30min`` [1800, ∞); ``unknown`` when the length is not known
    (None, negative or NaN)."""
    if duration is None:
        return UNKNOWN_BUCKET
    return next((name for name, lo, hi in DURATION_BUCKETS if lo <= duration < hi), UNKNOWN_BUCKET)


def item_bucket(item: GroundingItem, probed: float | None = None) -> str:
    """An item's duration bucket: from the duration its source gives, else from `probed` (the length
    read from the video file), else ``unknown``."""
    return duration_bucket(item.duration if item.duration is not None else probed)


@dataclass(frozen=True)
class GroundingScores:
    """mIoU and R@0.3/0.5/0.7 over `count` items (recall keys are the thresholds)."""

    count: int
    miou: float
    recall: dict[float, float]

    @classmethod
    def of(cls, ious: Sequence[float]) -> "GroundingScores":
        return cls(len(ious), mean_iou(ious), {t: recall_at(ious, t) for t in RECALL_THRESHOLDS})

    def to_record(self) -> dict:
        return {"count": self.count, "miou": self.miou, **{f"R@{t:g}": r for t, r in self.recall.items()}}


def score_grounding(items: Iterable[GroundingItem], predictions: Mapping[str, Sequence[float] | None],
                    durations: Mapping[str, float] | None = None) -> dict:
    """Overall and per-duration-bucket scores of predicted intervals, keyed by item qid.

    Each item's IoU is `best_iou` of its prediction against its targets; an item with no
    prediction (absent, or None: the model gave no usable interval) counts as IoU 0, as a
    wrong answer counts in QA accuracy. The bucket comes from the item's duration, else from
    `durations[video]` (e.g. probed from the file). Returns ``{"overall": GroundingScores,
    "by_duration": {bucket: GroundingScores}}`` with buckets in `DURATION_BUCKETS` order
    (then ``unknown``), only those that hold items.
    """
    ious: list[float] = []
    by_bucket: dict[str, list[float]] = {}
    for item in items:
        iou = best_iou(predictions.get(item.qid), item.targets)
        ious.append(iou)
        by_bucket.setdefault(item_bucket(item, (durations or {}).get(item.video)), []).append(iou)
    order = [name for name, _, _ in DURATION_BUCKETS] + [UNKNOWN_BUCKET]
    return {"overall": GroundingScores.of(ious),
            "by_duration": {b: GroundingScores.of(by_bucket[b]) for b in order if b in by_bucket}}

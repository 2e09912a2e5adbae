"""Question files for `lvr eval`: the native format and benchmark adapters.

`load_eval_items` turns a question file into a list of `EvalItem`: one
question about one video, its options normalised to ``"A. text"``, and the
correct answer as a letter (or reference text for open questions). Four
record shapes are read:

- ``native``: JSONL records with ``"schema": "lvr.question/1"`` (see
  docs/eval_formats.md); `EvalItem.to_record` writes them.
- ``lvbench``: LVBench's ``video_info.meta.jsonl``, one line per video with its
  ``qa`` list; the options are split out of the question text.
- ``videomme``: Video-MME's rows (``videoID``, ``question_id``, ``options``,
  ...), as JSONL, a JSON list, or parquet when pyarrow happens to be installed.
  Only ``duration == "long"`` is kept by default, and whether subtitles are
  shown must be said explicitly.
- ``mlvu``: MLVU dev's per-task JSON lists (``1_plotQA.json`` ...), one file
  or a directory of them; the answer text is mapped to its letter.

A bad record is named (``file:line: reason``) and skipped while the rest
load; a file that cannot be read at all raises `EvalFormatError`.

`resolve_video` maps the video value of an item (untrusted input) to a file
inside ``--video-dir`` and refuses anything that would leave it.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any, Iterator, Sequence

__all__ = [
    "EVAL_FORMATS",
    "NATIVE_SCHEMA",
    "VIDEO_EXTENSIONS",
    "VIDEOMME_DURATIONS",
    "MLVU_TASK_FOLDERS",
    "EvalItem",
    "EvalFormatError",
    "VideoNotFoundError",
    "detect_format",
    "load_eval_items",
    "normalize_options",
    "split_question_options",
    "resolve_video",
    "resolve_item_video",
]

EVAL_FORMATS = ("auto", "native", "lvbench", "videomme", "mlvu")
NATIVE_SCHEMA = "lvr.question/1"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEOMME_DURATIONS = ("short", "medium", "long")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# MLVU dev: question_type -> the task's folder (the JSON file's stem, and the
# folder under video/ that holds its videos). 1-7 are multiple choice, 8-9 open.
MLVU_TASK_FOLDERS = {
    "plotQA": "1_plotQA",
    "findNeedle": "2_needle",
    "needle": "2_needle",
    "ego": "3_ego",
    "count": "4_count",
    "order": "5_order",
    "anomaly_reco": "6_anomaly_reco",
    "topic_reasoning": "7_topic_reasoning",
    "subPlot": "8_sub_scene",
    "sub_scene": "8_sub_scene",
    "summary": "9_summary",
}

STDIO = "-"


class EvalFormatError(Exception):
    """A question file cannot be used, or a video value cannot be resolved. One line."""


class VideoNotFoundError(EvalFormatError, FileNotFoundError):
    """No file for an item's video value exists inside the video directory."""

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EvalItem:
    """One question about one video.

    qid: unique within its file (the source's id, else derived deterministically).
    video: as written in the source: a file name, relative path or video id.
    question: the question text without the options.
    options: ``("A. text", "B. text", ...)``; ``()`` for an open question.
    answer: the correct letter for multiple choice, the reference text otherwise.
    category: the key for per-category accuracy.
    subtitles: whether subtitles are shown for this item.
    source: which format it came from ("native", "lvbench", "videomme", "mlvu").
    extra: what else the source says (duration bucket, domain, time reference ...).
    """

    qid: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    category: str | None = None
    subtitles: bool = False
    source: str = "native"
    extra: dict = field(default_factory=dict, hash=False)

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    def to_record(self) -> dict:
        """The item as a native ``lvr.question/1`` record (JSON-safe)."""
        return {
            "schema": NATIVE_SCHEMA,
            "id": self.qid,
            "video": self.video,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
            "category": self.category,
            "subtitles": self.subtitles,
            "source": self.source,
            "extra": json.loads(json.dumps(self.extra, ensure_ascii=False, default=str)),
        }


class _Skip(ValueError):
    """A record is unusable; the message is the reason (no file:line yet)."""


# ---------------------------------------------------------------- options

# "A. text", "A) text", "(A) text", "[A] text", "A: text" (also full-width colon).
_LABEL = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.):：])\s*(.*)$", re.DOTALL)


def _label(option: str) -> tuple[str, str] | None:
    m = _LABEL.match(option)
    if not m:
        return None
    return (m.group(1) or m.group(2) or m.group(3)), m.group(4)


def normalize_options(options: Sequence[Any]) -> tuple[str, ...]:
    """Options as ``("A. text", "B. text", ...)``.

    Either every option already carries its letter in order (``"A. x"``,
    ``"(A) x"``, ``"A) x"`` ...), and the labels are rewritten, or none does,
    and letters are added. Numbers are written as text. Raises ValueError on
    empty options, more than 26, or options lettered only in part.
    """
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise ValueError("options must be a list of strings")
    texts = [_scalar_text(o, "option") for o in options]
    if len(texts) > len(LETTERS):
        raise ValueError(f"{len(texts)} options; at most {len(LETTERS)}")
    labels = [_label(t) for t in texts]
    lettered = [lab is not None and lab[0] == LETTERS[i] for i, lab in enumerate(labels)]
    if texts and all(lettered):
        bodies = [lab[1].strip() for lab in labels]  # type: ignore[index]
    elif lettered and lettered[0]:
        raise ValueError("options are lettered only in part")
    else:
        bodies = [t.strip() for t in texts]
    for i, body in enumerate(bodies):
        if not body:
            raise ValueError(f"option {LETTERS[i]} is empty")
    return tuple(f"{LETTERS[i]}. {body}" for i, body in enumerate(bodies))


def _option_body(option: str) -> str:
    return option.split(". ", 1)[1] if ". " in option else option


def _answer_letter(answer: Any, options: tuple[str, ...]) -> str:
    """The letter of a multiple-choice answer given as "B", "(B)", "B. text" or the option text."""
    text = _scalar_text(answer, "answer")
    letters = LETTERS[: len(options)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    lab = _label(text)
    if lab and lab[0] in letters and (not lab[1].strip() or lab[1].strip() == _option_body(options[LETTERS.index(lab[0])])):
        return lab[0]
    matches = [i for i, o in enumerate(options) if _option_body(o) == text]
    if not matches:
        matches = [i for i, o in enumerate(options) if _option_body(o).casefold() == text.casefold()]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    if len(matches) > 1:
        raise _Skip(f"answer {text!r} matches {len(matches)} options")
    raise _Skip(f"answer {text!r} is not one of the options {letters[0]}-{letters[-1]}")


# LVBench: "question text\n(A) ...\n(B) ...\n(C) ...\n(D) ..."
_INLINE_OPTION = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")


def split_question_options(text: str) -> tuple[str, tuple[str, ...]]:
    """Split ``"Q?\\n(A) a\\n(B) b"`` into ``("Q?", ("A. a", "B. b"))``.

    Option lines start with ``(A)``, ``(B)``, ... in order; a line that does not
    continues the option above it. Raises ValueError when no options follow
    the question, or the letters are out of order.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if (m := _INLINE_OPTION.match(line)) and m.group(1) == "A"), None)
    if start is None:
        raise ValueError("no '(A) ...' option lines in the question text")
    question = "\n".join(lines[:start]).strip()
    if not question:
        raise ValueError("question text is empty")
    bodies: list[str] = []
    for line in lines[start:]:
        m = _INLINE_OPTION.match(line)
        if m:
            expected = LETTERS[len(bodies)] if len(bodies) < len(LETTERS) else None
            if m.group(1) != expected:
                raise ValueError(f"option ({m.group(1)}) out of order")
            bodies.append(m.group(2).strip())
        elif line.strip():
            bodies[-1] = f"{bodies[-1]} {line.strip()}".strip()
    if len(bodies) < 2:
        raise ValueError("fewer than two options in the question text")
    return question, normalize_options(bodies)


# ---------------------------------------------------------------- small checks

def _scalar_text(value: Any, what: str) -> str:
    """A string field; ints and floats (MLVU counts) are written as text."""
    if isinstance(value, bool) or value is None:
        raise _Skip(f"{what} must be text, got {json.dumps(value)}")
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    raise _Skip(f"{what} must be text, got {type(value).__name__}")


def _text(rec: dict, key: str, *, required: bool = True) -> str | None:
    if rec.get(key) is None:
        if required:
            raise _Skip(f"missing {key!r}")
        return None
    text = _scalar_text(rec[key], repr(key)).strip()
    if required and not text:
        raise _Skip(f"{key!r} is empty")
    return text


def _id(value: Any) -> str:
    text = _scalar_text(value, "id").strip()
    if not text:
        raise _Skip("id is empty")
    return text


def _options(value: Any) -> tuple[str, ...]:
    try:
        return normalize_options(value)
    except ValueError as e:
        raise _Skip(f"options: {e}") from None


# ---------------------------------------------------------------- reading files

def _read_text(name: str, stdin: IO[str] | None) -> str:
    if name == STDIO:
        return (stdin or sys.stdin).read()
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except IsADirectoryError:
        raise EvalFormatError(f"{name}: is a directory (only the mlvu format reads a directory)") from None
    except UnicodeDecodeError:
        raise EvalFormatError(f"{name}: not UTF-8 text") from None
    except OSError as e:
        raise EvalFormatError(f"{name}: cannot open ({e.strerror})") from None
    return text.lstrip("\ufeff")


class _Bad:
    """A record slot that is not a JSON object (JSONL keeps going past it)."""

    def __init__(self, reason: str):
        self.reason = reason


def _records(name: str, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) from a JSON list or from JSONL text.

    In JSONL a line that is not JSON is yielded as `_Bad` and reading goes on;
    a JSON list that does not parse cannot be resynchronised and raises.
    """
    if text.lstrip().startswith("["):
        yield from _json_array(name, text)
        return
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, _Bad(f"not JSON ({e.msg})")


def _json_array(name: str, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")

    def fail(pos: int, msg: str) -> EvalFormatError:
        return EvalFormatError(f"{name}:{text.count(chr(10), 0, pos) + 1}: not JSON ({msg})")

    pos = ws.match(text, 0).end() + 1  # past "["
    pos = ws.match(text, pos).end()
    if text[pos:pos + 1] == "]":
        end = ws.match(text, pos + 1).end()
        if end != len(text):
            raise fail(end, "extra data after the list")
        return
    line, counted = 1, 0
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        yield line, value
        pos = ws.match(text, pos).end()
        sep = text[pos:pos + 1]
        if sep == ",":
            pos = ws.match(text, pos + 1).end()
        elif sep == "]":
            end = ws.match(text, pos + 1).end()
            if end != len(text):
                raise fail(end, "extra data after the list")
            return
        else:
            raise fail(pos, "expected ',' or ']' between list items")


def _parquet_records(name: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only if it happens to be installed
    except ImportError:
        raise EvalFormatError(f"{name}: reading parquet needs pyarrow; install it or convert the file to JSONL") from None
    try:
        rows = pq.read_table(name).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise EvalFormatError(f"{name}: cannot read parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for i, row in enumerate(rows, 1):
        yield i, row


def _sniff(rec: dict) -> str | None:
    schema = rec.get("schema")
    if isinstance(schema, str) and schema.startswith("lvr.question/"):
        return "native"
    if "qa" in rec and "key" in rec:
        return "lvbench"
    if "videoID" in rec or {"question_id", "duration", "options"} <= rec.keys():
        return "videomme"
    if "candidates" in rec or {"question_type", "duration"} <= rec.keys() and ("video" in rec or "video_name" in rec):
        return "mlvu"
    if "video" in rec and "question" in rec:
        return "native"
    return None


def _detect(name: str, records: list[tuple[int, Any]], sniff=None, what: str = "question") -> str:
    """The format of the first JSON object record, by `sniff` (this module's by default)."""
    sniff = sniff or _sniff
    for lineno, rec in records:
        if isinstance(rec, dict):
            fmt = sniff(rec)
            if fmt is None:
                keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
                raise EvalFormatError(f"{name}:{lineno}: cannot tell the {what} format from this record "
                                      f"(keys: {keys}); pass the format explicitly")
            return fmt
    raise EvalFormatError(f"{name}: no JSON object records to tell the {what} format from")


def _mlvu_files(path: Path) -> list[Path]:
    folder = path
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file() and not p.name.startswith(".")]
    if not files and (path / "json").is_dir():  # the MLVU root: json/ and video/
        folder = path / "json"
        files = [p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file() and not p.name.startswith(".")]
    if not files:
        raise EvalFormatError(f"{path}: no .json question files in this directory")

    def order(p: Path) -> tuple[int, str]:
        m = re.match(r"(\d+)_", p.name)
        return (int(m.group(1)) if m else 1 << 30, p.name)

    return sorted(files, key=order)


def detect_format(path: "str | Path") -> str:
    """The format of a question file (or MLVU directory), from its first record's keys.

    Returns one of "native", "lvbench", "videomme", "mlvu"; raises EvalFormatError
    when the file cannot be read or its records match none of them.
    """
    name = str(path)
    if name == STDIO:
        raise EvalFormatError("-: cannot sniff stdin without consuming it; use load_eval_items")
    p = Path(name)
    if p.is_dir():
        _mlvu_files(p)
        return "mlvu"
    if p.suffix.lower() == ".parquet":
        return _detect(name, list(_first(_parquet_records(name))))
    text = _read_text(name, None)
    return _detect(name, list(_first(_records(name, text), 20)))


def _first(it: Iterator[tuple[int, Any]], n: int = 20) -> Iterator[tuple[int, Any]]:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


# ---------------------------------------------------------------- adapters

class _Collector:
    """Gathers items and errors, and enforces unique qids across a load."""

    def __init__(self, subtitles: bool | None):
        self.items: list[EvalItem] = []
        self.errors: list[str] = []
        self.subtitles = subtitles
        self._seen: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def next_n(self, key: str) -> int:
        """1-based running count per video, for ids derived as f"{video}#{n}"."""
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key]

    def error(self, where: str, reason: str) -> None:
        self.errors.append(f"{where}: {reason}")

    def add(self, where: str, item: EvalItem) -> None:
        first = self._seen.get(item.qid)
        if first is not None:
            self.error(where, f"duplicate id {item.qid!r} (first at {first})")
            return
        self._seen[item.qid] = where
        if self.subtitles is not None and item.subtitles != self.subtitles:
            item = _replace(item, subtitles=self.subtitles)
        self.items.append(item)


def _replace(item: EvalItem, **changes: Any) -> EvalItem:
    from dataclasses import replace
    return replace(item, **changes)


def _native(col: _Collector, where: str, rec: dict) -> None:
    schema = rec.get("schema", NATIVE_SCHEMA)
    if schema != NATIVE_SCHEMA:
        raise _Skip(f"schema {schema!r} is not {NATIVE_SCHEMA!r}")
    video = _text(rec, "video")
    n = col.next_n(video)
    qid = _id(rec["id"]) if rec.get("id") is not None else f"{video}#{n}"
    question = _text(rec, "question")
    raw = rec.get("options") or []
    options = _options(raw)
    if options:
        answer = _answer_letter(rec.get("answer"), options)
    else:
        answer = _text(rec, "answer")
    category = rec.get("category")
    if isinstance(category, list):
        category = ", ".join(_scalar_text(c, "category") for c in category) or None
    elif category is not None:
        category = _scalar_text(category, "category").strip() or None
    subtitles = rec.get("subtitles", False)
    if not isinstance(subtitles, bool):
        raise _Skip(f"'subtitles' must be true or false, got {json.dumps(subtitles)}")
    source = rec.get("source", "native")
    if not isinstance(source, str) or not source:
        raise _Skip("'source' must be a non-empty string")
    extra = rec.get("extra", {})
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise _Skip("'extra' must be a JSON object")
    col.add(where, EvalItem(qid, video, question, options, answer, category, subtitles, source, dict(extra)))


def _lvbench(col: _Collector, where: str, rec: dict) -> None:
    key = _text(rec, "key")
    qa = rec.get("qa")
    if not isinstance(qa, list):
        raise _Skip("'qa' must be a list of questions")
    base_extra: dict[str, Any] = {}
    if rec.get("type") is not None:
        base_extra["video_type"] = rec["type"]
    if isinstance(rec.get("video_info"), dict):
        base_extra["video_info"] = rec["video_info"]
    for i, q in enumerate(qa):
        here = f"{where}: qa[{i}]"
        try:
            if not isinstance(q, dict):
                raise _Skip("not a JSON object")
            qid = _id(q["uid"]) if q.get("uid") is not None else f"{key}#{i + 1}"
            text = _text(q, "question")
            try:
                question, options = split_question_options(text)
            except ValueError as e:
                raise _Skip(f"question: {e}") from None
            answer = _answer_letter(q.get("answer"), options)
            types = q.get("question_type") or []
            if isinstance(types, str):
                types = [types]
            if not isinstance(types, list):
                raise _Skip("'question_type' must be a list of strings")
            types = [_scalar_text(t, "question_type") for t in types]
            extra = dict(base_extra)
            extra["question_types"] = types
            if q.get("time_reference") is not None:
                extra["time_reference"] = q["time_reference"]
            item = EvalItem(qid, key, question, options, answer, ", ".join(types) or None,
                            False, "lvbench", extra)
        except _Skip as e:
            col.error(here, str(e))
            continue
        col.add(here, item)


def _videomme(col: _Collector, where: str, rec: dict, duration: str | None) -> None:
    dur = rec.get("duration")
    if duration is not None:
        if dur is None:
            raise _Skip("missing 'duration' (needed to keep only Video-MME's "
                        f"{duration!r} videos)")
        if dur != duration:
            return  # filtered out, not an error
    video = _text(rec, "videoID")
    n = col.next_n(video)
    qid = _id(rec["question_id"]) if rec.get("question_id") is not None else f"{video}#{n}"
    question = _text(rec, "question")
    options = _options(rec.get("options") or [])
    if not options:
        raise _Skip("missing 'options'")
    answer = _answer_letter(rec.get("answer"), options)
    extra = {k: rec[k] for k in ("duration", "domain", "sub_category", "video_id", "url") if rec.get(k) is not None}
    category = None
    if rec.get("task_type") is not None:
        category = _scalar_text(rec["task_type"], "task_type").strip() or None
    col.add(where, EvalItem(qid, video, question, options, answer, category, False, "videomme", extra))


def _mlvu(col: _Collector, where: str, rec: dict, file_task: str | None) -> None:
    video = _text(rec, "video" if "video" in rec or "video_name" not in rec else "video_name")
    qtype = rec.get("question_type", rec.get("task_type"))
    qtype = _scalar_text(qtype, "question_type").strip() if qtype is not None else None
    task = file_task or MLVU_TASK_FOLDERS.get(qtype or "")
    n = col.next_n(f"{task}/{video}")
    if rec.get("question_id") is not None:
        qid = _id(rec["question_id"])
    else:
        qid = f"{task}/{video}#{n}" if task else f"{video}#{n}"
    question = _text(rec, "question")
    candidates = rec.get("candidates")
    if candidates:
        options = _options(candidates)
        answer_text = _scalar_text(rec.get("answer"), "answer").strip() if rec.get("answer") is not None else ""
        if not answer_text:
            raise _Skip("missing 'answer'")
        hits = [i for i, o in enumerate(options) if _option_body(o) == answer_text]
        if not hits:
            hits = [i for i, o in enumerate(options) if _option_body(o).casefold() == answer_text.casefold()]
        if len(hits) != 1:
            raise _Skip(f"answer {answer_text!r} is not exactly one of the candidates" if not hits
                        else f"answer {answer_text!r} matches {len(hits)} candidates")
        answer = LETTERS[hits[0]]
    else:
        options = ()
        answer = _text(rec, "answer")
    extra: dict[str, Any] = {}
    if task:
        extra["task"] = task
        extra["video_subdir"] = task
    for k in ("duration", "scoring_points"):
        if rec.get(k) is not None:
            extra[k] = rec[k]
    col.add(where, EvalItem(qid, video, question, options, answer, qtype or task, False, "mlvu", extra))


def _task_from_stem(stem: str) -> str | None:
    return stem if re.fullmatch(r"\d+_\w+", stem) else None


def load_eval_items(path: "str | Path", fmt: str = "auto", *, subtitles: bool | None = None,
                    videomme_duration: str | None = "long",
                    stdin: IO[str] | None = None) -> tuple[list[EvalItem], list[str]]:
    """Read a question file (``-`` for stdin; a directory for MLVU) into items.

    Returns (items, errors): each error is one line ``"file:line: reason"`` for
    a record that was skipped; the other records still load. A later record
    whose qid repeats an earlier one is such an error. ``subtitles`` True or
    False sets every item's flag; Video-MME requires it. ``videomme_duration``
    keeps only that Video-MME duration bucket (None keeps all). Raises
    EvalFormatError when the file cannot be read at all or its format not told.
    """
    if fmt not in EVAL_FORMATS:
        raise EvalFormatError(f"unknown question format {fmt!r}; one of {', '.join(EVAL_FORMATS)}")
    if videomme_duration is not None and videomme_duration not in VIDEOMME_DURATIONS:
        raise EvalFormatError(f"Video-MME duration {videomme_duration!r} is not one of "
                              f"{', '.join(VIDEOMME_DURATIONS)}")
    name = str(path)
    col = _Collector(subtitles)

    # (display name, records, task folder for MLVU) per file
    sources: list[tuple[str, list[tuple[int, Any]], str | None]] = []
    if name != STDIO and Path(name).is_dir():
        if fmt not in ("auto", "mlvu"):
            raise EvalFormatError(f"{name}: is a directory (only the mlvu format reads a directory)")
        fmt = "mlvu"
        for f in _mlvu_files(Path(name)):
            sources.append((str(f), list(_records(str(f), _read_text(str(f), None))), _task_from_stem(f.stem)))
    elif name != STDIO and Path(name).suffix.lower() == ".parquet":
        sources.append((name, list(_parquet_records(name)), _task_from_stem(Path(name).stem)))
    else:
        text = _read_text(name, stdin)
        stem = None if name == STDIO else _task_from_stem(Path(name).stem)
        sources.append((name, list(_records(name, text)), stem))

    if not any(recs for _, recs, _ in sources):
        return [], []
    if fmt == "auto":
        first_name, first_recs, _ = next(s for s in sources if s[1])
        fmt = _detect(first_name, first_recs)
    if fmt == "videomme" and subtitles is None:
        raise EvalFormatError(f"{name}: Video-MME needs --subtitles or --no-subtitles")

    for fname, recs, task in sources:
        for lineno, rec in recs:
            where = f"{fname}:{lineno}"
            if isinstance(rec, _Bad):
                col.error(where, rec.reason)
                continue
            if not isinstance(rec, dict):
                col.error(where, "not a JSON object")
                continue
            try:
                if fmt == "native":
                    _native(col, where, rec)
                elif fmt == "lvbench":
                    _lvbench(col, where, rec)
                elif fmt == "videomme":
                    _videomme(col, where, rec, videomme_duration)
                else:
                    _mlvu(col, where, rec, task)
            except _Skip as e:
                col.error(where, str(e))
    return col.items, col.errors


# ---------------------------------------------------------------- videos

def _check_relative(value: str, what: str, video_dir: Path) -> PurePosixPath:
    if not value or "\x00" in value:
        raise EvalFormatError(f"{what} {value!r} is not a usable path (under {video_dir})")
    win = PureWindowsPath(value)
    posix = PurePosixPath(value.replace("\\", "/"))
    if posix.is_absolute() or win.is_absolute() or win.drive or value.startswith(("/", "\\")):
        raise EvalFormatError(f"{what} {value!r} is an absolute path; it must be relative to {video_dir}")
    if ".." in posix.parts:
        raise EvalFormatError(f"{what} {value!r} climbs out with '..'; it must stay inside {video_dir}")
    return PurePosixPath(value)


def resolve_video(item_video: str, video_dir: "str | Path", *,
                  extensions: Sequence[str] = VIDEO_EXTENSIONS,
                  subdirs: Sequence[str] = ()) -> Path:
    """The file inside ``video_dir`` that an item's video value names.

    The value is untrusted: absolute paths and ``..`` are refused, and the file
    found must still be inside ``video_dir`` after symlinks are resolved. Tried
    in order, for ``video_dir`` and then each of ``subdirs`` (e.g. MLVU's task
    folder): the value as written, then the value with each extension added
    (a Video-MME ``videoID`` or LVBench ``key`` names ``<id>.mp4``). Raises
    EvalFormatError for an unsafe value, VideoNotFoundError when nothing exists.
    """
    video_dir = Path(video_dir)
    if not isinstance(item_video, str):
        raise EvalFormatError(f"video {item_video!r} is not text")
    rel = _check_relative(item_video, "video", video_dir)
    try:
        base = video_dir.resolve(strict=True)
    except (OSError, RuntimeError):
        raise VideoNotFoundError(f"video directory {str(video_dir)!r} does not exist") from None
    if not base.is_dir():
        raise VideoNotFoundError(f"video directory {str(video_dir)!r} is not a directory")
    prefixes = [PurePosixPath()]
    for sub in subdirs:
        if sub:
            prefixes.append(_check_relative(sub, "video folder", video_dir))
    names = [rel.as_posix()]
    if rel.suffix.lower() not in {e.lower() for e in extensions}:
        names += [rel.as_posix() + ext for ext in extensions]
    tried: list[str] = []
    for prefix in prefixes:
        for n in names:
            cand = base / prefix / n
            tried.append((prefix / n).as_posix())
            if not cand.is_file():
                continue
            real = cand.resolve()
            if not real.is_relative_to(base):
                raise EvalFormatError(f"video {item_video!r} resolves to {str(real)!r}, "
                                      f"outside {str(video_dir)!r} (symlink)")
            return real
    shown = ", ".join(tried[:8]) + (", ..." if len(tried) > 8 else "")
    raise VideoNotFoundError(f"video {item_video!r} not found in {str(video_dir)!r} (tried {shown})")


def resolve_item_video(item: EvalItem, video_dir: "str | Path", *,
                       extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Path:
    """`resolve_video` for an item, also trying its ``extra["video_subdir"]`` (MLVU task folders)."""
    sub = item.extra.get("video_subdir")
    subdirs = [sub] if isinstance(sub, str) and sub else []
    return resolve_video(item.video, video_dir, extensions=extensions, subdirs=subdirs)

"""Question files for `lvr eval`: the native format and benchmark adapters.

`load_eval_items` turns a question file into a list of `EvalItem`: one
question about one video, its options normalised to ``"A. text"``, and the
correct answer as a letter (or reference text for open questions). Five
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
- ``longvideo-r1``: the flat JSON lists the LongVideo-R1 reference evaluates
  (``eval/evaluation.py``): one question per entry, the video named by ``key``
  (LVBench), ``videoID`` (Video-MME long) or ``video_name`` (MLVU), options in
  ``options`` or as lettered lines of the question, the answer a letter.

A bad record is named (``file:line: reason``) and skipped while the rest
load; a file that cannot be read at all raises `EvalFormatError`. Reading the
files and their fields is `lvr.prep.records`; option letters are
`lvr.prep.lettering`.

`resolve_video` maps the video value of an item (untrusted input) to a file
inside ``--video-dir`` and refuses anything that would leave it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any, Sequence

from ..prep.lettering import LETTERS, normalize_options, split_label, text_matches
from ..prep.records import (STDIO, Collector, RecordFileError, RecordSkip, answer_field, category_field, extra_field,
                            first_records, id_field, json_records, options_field, parquet_records, read_text,
                            scalar_text, schema_field, sniff_format, source_field, text_field)

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

EVAL_FORMATS = ("auto", "native", "lvbench", "videomme", "mlvu", "longvideo-r1")
NATIVE_SCHEMA = "lvr.question/1"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEOMME_DURATIONS = ("short", "medium", "long")

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

# A question file cannot be used, or a video value cannot be resolved. One line. The same
# class as the record toolkit's, so `lvr eval`, `synthesize` and `--lint` catch one error.
EvalFormatError = RecordFileError


class VideoNotFoundError(EvalFormatError, FileNotFoundError):
    """No file for an item's video value exists inside the video directory."""

    def __str__(self) -> str:  # OSError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class QuestionItem:
    """What every question item (EvalItem here, QAItem for training) has and how it is written.

    Subclasses are dataclasses with qid, video, question, options, answer, category, source, extra.
    """

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    def record(self, schema: str, **fields) -> dict:
        """A JSON-safe native record of this item, with the subclass's own `fields`."""
        return {"schema": schema, "id": self.qid, "video": self.video, "question": self.question,
                "options": list(self.options), "answer": self.answer, **fields, "category": self.category,
                "source": self.source, "extra": json.loads(json.dumps(self.extra, ensure_ascii=False, default=str))}


@dataclass(frozen=True)
class EvalItem(QuestionItem):
    """One question about one video.

    qid: unique within its file (the source's id, else derived deterministically).
    video: as written in the source: a file name, relative path or video id.
    question: the question text without the options.
    options: ``("A. text", "B. text", ...)``; ``()`` for an open question.
    answer: the correct letter for multiple choice, the reference text otherwise.
    category: the key for per-category accuracy.
    subtitles: whether subtitles are shown for this item.
    source: which format it came from ("native", "lvbench", "videomme", "mlvu", "longvideo-r1").
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

    def to_record(self) -> dict:
        """The item as a native ``lvr.question/1`` record (JSON-safe)."""
        return self.record(NATIVE_SCHEMA, subtitles=self.subtitles)


# LVBench: "question text\n(A) ...\n(B) ...\n(C) ...\n(D) ..."
_INLINE_OPTION = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")


def split_question_options(text: str, *, any_label: bool = False) -> tuple[str, tuple[str, ...]]:
    """Split ``"Q?\\n(A) a\\n(B) b"`` into ``("Q?", ("A. a", "B. b"))``.

    Option lines start with ``(A)``, ``(B)``, ... in order; a line that does not
    continues the option above it. Raises ValueError when no options follow
    the question, or the letters are out of order.

    `any_label`: the options may be lettered in any style lvr reads (``A. a``,
    ``A) a``, ``[A] a``, ``(A) a``; `lettering.split_label`) and start at the last
    line lettered A, since the question above them may hold such a line too (the
    LongVideo-R1 flat evaluation files and RL prompts).
    """
    if any_label:
        return _split_any_label(text)
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


def _split_any_label(text: str) -> tuple[str, tuple[str, ...]]:
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i in range(len(lines) - 1, -1, -1) if split_label(lines[i], "A")), None)
    if start is None:
        raise ValueError("no option line lettered A in the question text")
    question = "\n".join(lines[:start]).strip()
    if not question:
        raise ValueError("question text is empty")
    bodies: list[str] = []
    for line in lines[start:]:
        label = split_label(line, LETTERS[len(bodies)]) if len(bodies) < len(LETTERS) else None
        if label:
            bodies.append(label[1])
        elif line.strip():
            bodies[-1] = f"{bodies[-1]} {line.strip()}".strip()
    if len(bodies) < 2:
        raise ValueError("fewer than two options in the question text")
    return question, normalize_options(bodies)


# ---------------------------------------------------------------- reading files

def _sniff(rec: dict) -> str | None:
    schema = rec.get("schema")
    if isinstance(schema, str) and schema.startswith("lvr.question/"):
        return "native"
    if "qa" in rec and "key" in rec:
        return "lvbench"
    if "question" in rec and ("key" in rec or "video_name" in rec and not {"candidates", "question_type"} & rec.keys()):
        return "longvideo-r1"  # the reference's flat LVBench and MLVU entries (its Video-MME ones are Video-MME rows)
    if "videoID" in rec or {"question_id", "duration", "options"} <= rec.keys():
        return "videomme"
    if "candidates" in rec or {"question_type", "duration"} <= rec.keys() and ("video" in rec or "video_name" in rec):
        return "mlvu"
    if "video" in rec and "question" in rec:
        return "native"
    return None


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

    Returns one of "native", "lvbench", "videomme", "mlvu", "longvideo-r1"; raises EvalFormatError
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
        return sniff_format(name, list(first_records(parquet_records(name))), _sniff, "question")
    text = read_text(name)
    return sniff_format(name, list(first_records(json_records(name, text))), _sniff, "question")


# ---------------------------------------------------------------- adapters

def _native(col: Collector, where: str, rec: dict) -> None:
    schema_field(rec, NATIVE_SCHEMA)
    video = text_field(rec, "video")
    qid = col.item_id(rec, ("id",), video)
    question = text_field(rec, "question")
    raw = rec.get("options") or []
    options = options_field(raw)
    if options:
        answer = answer_field(rec.get("answer"), options)
    else:
        answer = text_field(rec, "answer")
    subtitles = rec.get("subtitles", False)
    if not isinstance(subtitles, bool):
        raise RecordSkip(f"'subtitles' must be true or false, got {json.dumps(subtitles)}")
    col.add(where, EvalItem(qid, video, question, options, answer, category_field(rec.get("category")), subtitles,
                            source_field(rec, "native"), extra_field(rec)))


def _lvbench(col: Collector, where: str, rec: dict) -> None:
    key = text_field(rec, "key")
    qa = rec.get("qa")
    if not isinstance(qa, list):
        raise RecordSkip("'qa' must be a list of questions")
    base_extra: dict[str, Any] = {}
    if rec.get("type") is not None:
        base_extra["video_type"] = rec["type"]
    if isinstance(rec.get("video_info"), dict):
        base_extra["video_info"] = rec["video_info"]
    for i, q in enumerate(qa):
        here = f"{where}: qa[{i}]"
        try:
            if not isinstance(q, dict):
                raise RecordSkip("not a JSON object")
            qid = id_field(q["uid"]) if q.get("uid") is not None else f"{key}#{i + 1}"
            text = text_field(q, "question")
            try:
                question, options = split_question_options(text)
            except ValueError as e:
                raise RecordSkip(f"question: {e}") from None
            answer = answer_field(q.get("answer"), options)
            types = q.get("question_type") or []
            if isinstance(types, str):
                types = [types]
            if not isinstance(types, list):
                raise RecordSkip("'question_type' must be a list of strings")
            types = [scalar_text(t, "question_type") for t in types]
            extra = dict(base_extra)
            extra["question_types"] = types
            if q.get("time_reference") is not None:
                extra["time_reference"] = q["time_reference"]
            item = EvalItem(qid, key, question, options, answer, ", ".join(types) or None,
                            False, "lvbench", extra)
        except RecordSkip as e:
            col.error(here, str(e))
            continue
        col.add(here, item)


def _videomme(col: Collector, where: str, rec: dict, duration: str | None) -> None:
    dur = rec.get("duration")
    if duration is not None:
        if dur is None:
            raise RecordSkip("missing 'duration' (needed to keep only Video-MME's "
                        f"{duration!r} videos)")
        if dur != duration:
            return  # filtered out, not an error
    video = text_field(rec, "videoID")
    qid = col.item_id(rec, ("question_id",), video)
    question = text_field(rec, "question")
    options = options_field(rec.get("options") or [])
    if not options:
        raise RecordSkip("missing 'options'")
    answer = answer_field(rec.get("answer"), options)
    extra = {k: rec[k] for k in ("duration", "domain", "sub_category", "video_id", "url") if rec.get(k) is not None}
    category = None
    if rec.get("task_type") is not None:
        category = scalar_text(rec["task_type"], "task_type").strip() or None
    col.add(where, EvalItem(qid, video, question, options, answer, category, False, "videomme", extra))


def _mlvu(col: Collector, where: str, rec: dict, file_task: str | None) -> None:
    video = text_field(rec, "video" if "video" in rec or "video_name" not in rec else "video_name")
    qtype = rec.get("question_type", rec.get("task_type"))
    qtype = scalar_text(qtype, "question_type").strip() if qtype is not None else None
    task = file_task or MLVU_TASK_FOLDERS.get(qtype or "")
    n = col.next_n(f"{task}/{video}")
    if rec.get("question_id") is not None:
        qid = id_field(rec["question_id"])
    else:
        qid = f"{task}/{video}#{n}" if task else f"{video}#{n}"
    question = text_field(rec, "question")
    candidates = rec.get("candidates")
    if candidates:
        options = options_field(candidates)
        answer_text = scalar_text(rec.get("answer"), "answer").strip() if rec.get("answer") is not None else ""
        if not answer_text:
            raise RecordSkip("missing 'answer'")
        hits = text_matches(answer_text, options)
        if len(hits) != 1:
            raise RecordSkip(f"answer {answer_text!r} is not exactly one of the candidates" if not hits
                             else f"answer {answer_text!r} matches {len(hits)} candidates")
        answer = hits[0]
    else:
        options = ()
        answer = text_field(rec, "answer")
    extra: dict[str, Any] = {}
    if task:
        extra["task"] = task
        extra["video_subdir"] = task
    for k in ("duration", "scoring_points"):
        if rec.get(k) is not None:
            extra[k] = rec[k]
    col.add(where, EvalItem(qid, video, question, options, answer, qtype or task, False, "mlvu", extra))


# The key that names the video in each of the reference's flat files, and the benchmark it marks.
_FLAT_VIDEO_KEYS = (("key", "lvbench"), ("videoID", "videomme"), ("video_name", "mlvu"))


def _longvideo_r1(col: Collector, where: str, rec: dict) -> None:
    key, benchmark = next(((k, b) for k, b in _FLAT_VIDEO_KEYS if rec.get(k) is not None), (None, None))
    if key is None:
        raise RecordSkip("missing the video: 'key' (LVBench), 'videoID' (Video-MME) or 'video_name' (MLVU)")
    video = text_field(rec, key)
    qid = col.item_id(rec, ("uid", "question_id"), video)
    text = text_field(rec, "question")
    if rec.get("options"):
        question, options = text, options_field(rec["options"])
    elif rec.get("candidates"):
        question, options = text, options_field(rec["candidates"])
    else:
        try:
            question, options = split_question_options(text, any_label=True)
        except ValueError as e:
            raise RecordSkip(f"question: {e}") from None
    answer = answer_field(rec.get("answer"), options)
    category = category_field(rec.get("question_type", rec.get("task_type")), "question_type")
    extra: dict[str, Any] = {"benchmark": benchmark}
    if question != text:  # the options were lines of it: what the reference sends, as written
        extra["question_text"] = text
    for k in ("time_reference", "duration", "domain", "sub_category"):
        if rec.get(k) is not None:
            extra[k] = rec[k]
    col.add(where, EvalItem(qid, video, question, options, answer, category, False, "longvideo-r1", extra))


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
    col = Collector()

    # (display name, records, task folder for MLVU) per file
    sources: list[tuple[str, list[tuple[int, Any]], str | None]] = []
    if name != STDIO and Path(name).is_dir():
        if fmt not in ("auto", "mlvu"):
            raise EvalFormatError(f"{name}: is a directory (only the mlvu format reads a directory)")
        fmt = "mlvu"
        for f in _mlvu_files(Path(name)):
            sources.append((str(f), list(json_records(str(f), read_text(str(f)))), _task_from_stem(f.stem)))
    elif name != STDIO and Path(name).suffix.lower() == ".parquet":
        sources.append((name, list(parquet_records(name)), _task_from_stem(Path(name).stem)))
    else:
        text = read_text(name, stdin)
        stem = None if name == STDIO else _task_from_stem(Path(name).stem)
        sources.append((name, list(json_records(name, text)), stem))

    if not any(recs for _, recs, _ in sources):
        return [], []
    if fmt == "auto":
        first_name, first_recs, _ = next(s for s in sources if s[1])
        fmt = sniff_format(first_name, first_recs, _sniff, "question")
    if fmt == "videomme" and subtitles is None:
        raise EvalFormatError(f"{name}: Video-MME needs --subtitles or --no-subtitles")

    for fname, recs, task in sources:
        adapter = {"native": _native, "lvbench": _lvbench,
                   "videomme": partial(_videomme, duration=videomme_duration),
                   "mlvu": partial(_mlvu, file_task=task), "longvideo-r1": _longvideo_r1}[fmt]
        for lineno, rec in recs:
            col.take(f"{fname}:{lineno}", rec, adapter)
    items = col.items
    if subtitles is not None:  # --subtitles / --no-subtitles override every item's own flag
        items = [i if i.subtitles == subtitles else replace(i, subtitles=subtitles) for i in items]
    return items, col.errors


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


def default_video_dir(given: "Path | None", records_path: str) -> Path:
    """--video-dir, else the folder of the records file (the working folder for stdin)."""
    return Path(given) if given else (Path(records_path).parent if records_path != "-" else Path.cwd())


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


def resolve_item_video(item: Any, video_dir: "str | Path", *,
                       extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Path:
    """`resolve_video` for an item (an EvalItem or a grounding item: its ``video`` and ``extra``),
    also trying its ``extra["video_subdir"]`` (MLVU task folders)."""
    sub = item.extra.get("video_subdir")
    subdirs = [sub] if isinstance(sub, str) and sub else []
    return resolve_video(item.video, video_dir, extensions=extensions, subdirs=subdirs)

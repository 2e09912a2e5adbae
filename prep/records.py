"""Reading record files: JSON lists, JSONL and parquet, format sniffing, and field checks.

The loaders of question files (`lvr eval`), QA files (`lvr synthesize`) and
trajectory files (`--lint`) share these. A file that cannot be read at all
raises `RecordFileError`; one bad record is a `RecordSkip` (a JSONL line that
is not JSON comes back as `BadLine`), which the loader turns into a one-line
``file:line: reason`` error while the other records still load.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import IO, Any, Callable, Iterator

from .lettering import answer_key, normalize_options

STDIO = "-"


class RecordFileError(Exception):
    """A record file cannot be used at all (missing, not UTF-8, not JSON, format unknown). One line."""


class RecordSkip(ValueError):
    """One record is unusable; the message is the reason (no file:line yet)."""


class BadLine:
    """A record slot that is not JSON (JSONL keeps going past it)."""

    def __init__(self, reason: str):
        self.reason = reason


# ---------------------------------------------------------------- files

def read_prompt_file(path: "str | os.PathLike | None", default: str, error: type[Exception] = ValueError, *,
                     strip: bool = True) -> str:
    """A system prompt from a user's file (`default` when none is given); `error` names an unusable file.

    Trimmed, with its newlines read as ``\\n``; with ``strip=False``, byte for byte as written
    (a prompt a checkpoint was trained with). A blank file is refused either way.
    """
    if path is None:
        return default
    try:
        with open(path, encoding="utf-8", newline=None if strip else "") as f:
            text = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read the system prompt ({e.strerror})") from None
    if not text.strip():
        raise error(f"{path}: the system prompt file is empty")
    return text.strip() if strip else text


def read_text(name: str, stdin: IO[str] | None = None) -> str:
    """The whole text of a file (``-``: stdin), without a byte-order mark."""
    if name == STDIO:
        return (stdin or sys.stdin).read()
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except IsADirectoryError:
        raise RecordFileError(f"{name}: is a directory") from None
    except UnicodeDecodeError:
        raise RecordFileError(f"{name}: not UTF-8 text") from None
    except OSError as e:
        raise RecordFileError(f"{name}: cannot open ({e.strerror})") from None
    return text.lstrip("\ufeff")


def json_records(name: str, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) from a JSON list or from JSONL text.

    In JSONL a line that is not JSON is yielded as `BadLine` and reading goes on;
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
            yield lineno, BadLine(f"not JSON ({e.msg})")


def _json_array(name: str, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")

    def fail(pos: int, msg: str) -> RecordFileError:
        return RecordFileError(f"{name}:{text.count(chr(10), 0, pos) + 1}: not JSON ({msg})")

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


def parquet_records(name: str) -> Iterator[tuple[int, Any]]:
    """(row number, row as a dict) of a parquet file; needs pyarrow, which is optional."""
    try:
        import pyarrow.parquet as pq  # optional: only if it happens to be installed
    except ImportError:
        raise RecordFileError(f"{name}: reading parquet needs pyarrow; install it or convert the file to JSONL") \
            from None
    try:
        rows = pq.read_table(name).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise RecordFileError(f"{name}: cannot read parquet "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for i, row in enumerate(rows, 1):
        yield i, row


def first_records(records: Iterator[tuple[int, Any]], n: int = 20) -> Iterator[tuple[int, Any]]:
    for i, x in enumerate(records):
        if i >= n:
            return
        yield x


def sniff_format(name: str, records: list[tuple[int, Any]], sniff: Callable[[dict], str | None],
                 what: str) -> str:
    """The format of the first JSON object record, as `sniff` tells it from the record's keys."""
    for lineno, rec in records:
        if isinstance(rec, dict):
            fmt = sniff(rec)
            if fmt is None:
                keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
                raise RecordFileError(f"{name}:{lineno}: cannot tell the {what} format from this record "
                                      f"(keys: {keys}); pass the format explicitly")
            return fmt
    raise RecordFileError(f"{name}: no JSON object records to tell the {what} format from")


# ---------------------------------------------------------------- fields

def scalar_text(value: Any, what: str) -> str:
    """A string field; ints and floats (MLVU counts) are written as text."""
    if isinstance(value, bool) or value is None:
        raise RecordSkip(f"{what} must be text, got {json.dumps(value)}")
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    raise RecordSkip(f"{what} must be text, got {type(value).__name__}")


def text_field(rec: dict, key: str, *, required: bool = True) -> str | None:
    """``rec[key]`` as stripped text; RecordSkip when a required one is missing or empty."""
    if rec.get(key) is None:
        if required:
            raise RecordSkip(f"missing {key!r}")
        return None
    text = scalar_text(rec[key], repr(key)).strip()
    if required and not text:
        raise RecordSkip(f"{key!r} is empty")
    return text


def id_field(value: Any) -> str:
    text = scalar_text(value, "id").strip()
    if not text:
        raise RecordSkip("id is empty")
    return text


def options_field(value: Any) -> tuple[str, ...]:
    """A record's options, lettered ``"A. text"`` (`lettering.normalize_options`); numbers become text."""
    try:
        if isinstance(value, (list, tuple)):
            value = [scalar_text(o, "option") for o in value]
        return normalize_options(value)
    except ValueError as e:
        raise RecordSkip(f"options: {e}") from None


def answer_field(value: Any, options: tuple[str, ...]) -> str:
    """The letter a record's multiple-choice answer names (`lettering.answer_key`)."""
    try:
        return answer_key(scalar_text(value, "answer"), options)
    except ValueError as e:
        raise RecordSkip(str(e)) from None


def category_field(value: Any, what: str = "category") -> str | None:
    """A record's category as text: a list is joined with ", "; empty or absent is None."""
    if isinstance(value, list):
        return ", ".join(scalar_text(c, what) for c in value) or None
    if value is None:
        return None
    return scalar_text(value, what).strip() or None


def schema_field(rec: dict, *accepted: str) -> str:
    """A native record's ``schema``: one of `accepted` (the first when absent), else RecordSkip."""
    schema = rec.get("schema", accepted[0])
    if schema not in accepted:
        wanted = repr(accepted[0]) if len(accepted) == 1 else f"neither {' nor '.join(map(repr, accepted))}"
        raise RecordSkip(f"schema {schema!r} is {'not ' if len(accepted) == 1 else ''}{wanted}")
    return schema


def source_field(rec: dict, default: str) -> str:
    """A record's ``source`` (where the item came from), `default` when absent."""
    source = rec.get("source", default)
    if not isinstance(source, str) or not source:
        raise RecordSkip("'source' must be a non-empty string")
    return source


def extra_field(rec: dict) -> dict:
    """A copy of a record's free-form ``extra`` object ({} when absent or null)."""
    extra = rec.get("extra")
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise RecordSkip("'extra' must be a JSON object")
    return dict(extra)


def seconds_field(value: Any, what: str) -> float:
    """A finite number of seconds; ValueError naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {json.dumps(value, default=str)}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return x


def interval_list(value: Any, key: str) -> list:
    """A field that must hold a non-empty list of ``[start, end]`` pairs, checked as a list (each pair
    is the caller's to check); ValueError naming `key` and what is wrong."""
    if value is None:
        raise ValueError(f"missing {key!r} (at least one [start, end] interval in seconds)")
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{key!r} must be a list of [start, end] pairs")
    if not value:
        raise ValueError(f"{key!r} is empty; at least one [start, end] interval is needed")
    if len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{key!r} must be a list of [start, end] pairs, e.g. [[{value[0]}, {value[1]}]]")
    return list(value)


def interval_pair(pair: Any, where: str) -> tuple[float, float]:
    """One ``[start, end]`` pair of finite seconds, start not negative (order is the caller's rule)."""
    if isinstance(pair, (str, bytes, dict)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"{where} must be a [start, end] pair, got {json.dumps(pair, default=str)}")
    start, end = seconds_field(pair[0], f"{where} start"), seconds_field(pair[1], f"{where} end")
    if start < 0:
        raise ValueError(f"{where}: start {start:g} is negative")
    return start, end


class Collector:
    """Gathers a load's items and errors, and keeps item ids (`.qid`) unique across it."""

    def __init__(self):
        self.items: list = []
        self.errors: list[str] = []
        self._seen: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def next_n(self, key: str) -> int:
        """1-based running count per video, for ids derived as f"{video}#{n}"."""
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._counts[key]

    def item_id(self, rec: dict, keys: tuple[str, ...], video: str) -> str:
        """The record's id from the first of `keys` it holds, else ``f"{video}#{n}"`` (n counts the
        video's records so far, this one included)."""
        n = self.next_n(video)
        return next((id_field(rec[k]) for k in keys if rec.get(k) is not None), f"{video}#{n}")

    def error(self, where: str, reason: str) -> None:
        self.errors.append(f"{where}: {reason}")

    def add(self, where: str, item) -> None:
        first = self._seen.get(item.qid)
        if first is not None:
            self.error(where, f"duplicate id {item.qid!r} (first at {first})")
            return
        self._seen[item.qid] = where
        self.items.append(item)

    def take(self, where: str, rec: Any, adapter: Callable[["Collector", str, dict], None]) -> None:
        """Run one record through `adapter`; a record that is not a JSON object, or that the
        adapter skips, becomes an error."""
        if isinstance(rec, BadLine):
            self.error(where, rec.reason)
        elif not isinstance(rec, dict):
            self.error(where, "not a JSON object")
        else:
            try:
                adapter(self, where, rec)
            except RecordSkip as e:
                self.error(where, str(e))

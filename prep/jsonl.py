"""JSONL records: reading (with '-' for stdin), crash-safe appending, resuming.

Every step writes one unit of work (a video, a node, a question) as one
write of whole lines, flushed and fsynced, so a killed run loses at most the
unit in flight. On restart `JsonlWriter` cuts any torn tail off the file and
the step skips units already present.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

STDIO = "-"


class RecordError(Exception):
    """A JSONL input line is not a usable record. One line: file, line number, reason."""


def read_jsonl(source: "str | os.PathLike", *, stdin: IO[str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a JSONL file, or stdin for '-'.

    Blank lines are skipped. A line that is not a JSON object raises RecordError.
    """
    name = str(source)
    if name == STDIO:
        fh, close = (stdin or sys.stdin), False
    else:
        try:
            fh, close = open(name, encoding="utf-8"), True
        except OSError as e:
            raise RecordError(f"{name}: cannot open ({e.strerror})") from None
    try:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{name}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise RecordError(f"{name}:{lineno}: not a JSON object")
            yield lineno, rec
    finally:
        if close:
            fh.close()


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class JsonlWriter:
    """Append records to a JSONL file (or stdout), one unit per write.

    For a file, `complete_prefix(lines) -> int` may be given: it receives the
    file's whole lines and returns how many of them form complete units.
    Anything after that (a torn line, or the first lines of an unfinished
    unit) is cut off before appending, so the file never holds a partial unit.
    An exclusive lock stops two runs from appending to the same file.
    """

    def __init__(self, path: "str | os.PathLike | None",
                 complete_prefix: Callable[[list[str]], int] | None = None):
        self.path = None if path in (None, STDIO) else Path(path)
        self.existing: list[dict] = []
        self._fh: IO[str]
        if self.path is None:
            self._fh = sys.stdout
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+", encoding="utf-8")
        self._lock()
        self._repair(complete_prefix)

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # non-POSIX: no lock
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise RecordError(f"{self.path}: another lvr run is writing this file") from None

    def _repair(self, complete_prefix: Callable[[list[str]], int] | None) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        lines = data.split("\n")
        whole = lines[:-1]  # the last piece has no newline: torn or empty
        keep = len(whole)
        parsed: list[dict] = []
        for i, line in enumerate(whole):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):  # torn or foreign: cut from here
                keep = i
                break
            parsed.append(rec)
        if complete_prefix is not None:
            keep = min(keep, complete_prefix(whole[:keep]))
        keep_bytes = sum(len(line.encode("utf-8")) + 1 for line in whole[:keep])
        if keep_bytes != len(data.encode("utf-8")):
            self._fh.truncate(keep_bytes)
        self._fh.seek(0, os.SEEK_END)
        self.existing = parsed[:keep]

    def write_unit(self, records: Iterable[dict]) -> None:
        """Write the records of one finished unit in a single write, then sync."""
        text = "".join(dumps(r) + "\n" for r in records)
        if not text:
            return
        self._fh.write(text)
        self._fh.flush()
        if self.path is not None:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self.path is not None:
            self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: "str | os.PathLike", data: "str | bytes") -> None:
    """Write a file that must appear whole: temporary name, fsync, rename."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)

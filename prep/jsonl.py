"""JSONL records: reading (with '-' for stdin), crash-safe appending, resuming.

Every step writes one unit of work (a video, a node, a question) as one
write of whole lines, flushed and fsynced, so a killed run loses at most the
unit in flight. On restart `JsonlWriter` cuts any torn tail off the file and
the step skips units already present. A write that fails (a full disk) is
cut back off at once and ends the run with an OutputError; an output file
that got nothing is removed on close.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

STDIO = "-"


class RecordError(Exception):
    """A JSONL input line is not a usable record. One line: file, line number, reason."""


class OutputError(RecordError, OSError):
    """An output file cannot be written (a full disk...). One line naming the file.

    Both kinds, so every step that reports an unusable output (RecordError) or
    file (OSError) reports this one too. `errno` is the failed call's.
    """


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def output_error(path: "str | os.PathLike", e: OSError) -> OutputError:
    """The one-line error for a failed write to path; nothing half-written is left."""
    if e.errno in DISK_FULL:
        msg = f"{path}: the disk is full ({e.strerror}); nothing half-written was kept - free some space and rerun"
    else:
        msg = f"{path}: cannot write ({e.strerror or e})"
    err = OutputError(msg)
    err.errno = e.errno
    return err


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
    An exclusive lock stops two runs from appending to the same file. A write
    that fails is cut back off (OutputError); a file left empty is removed on close.
    """

    def __init__(self, path: "str | os.PathLike | None",
                 complete_prefix: Callable[[list[str]], int] | None = None):
        self.path = None if path in (None, STDIO) else Path(path)
        self.existing: list[dict] = []
        self._fh: IO[bytes]
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Made now, not at the first write, so the lock below covers it from
        # the start; removed on close if nothing is written.
        self._fh = open(self.path, "a+b")
        self._lock()
        try:
            self._repair(complete_prefix)
        except BaseException:
            self.close()
            raise

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
        # Bytes, not text: a torn tail may end inside a multi-byte character.
        self._fh.seek(0)
        data = self._fh.read()
        whole = data.split(b"\n")[:-1]  # the last piece has no newline: torn or empty
        keep = len(whole)
        parsed: list[dict] = []
        for i, line in enumerate(whole):
            try:
                rec = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                rec = None
            if not isinstance(rec, dict):  # torn or foreign: cut from here
                keep = i
                break
            parsed.append(rec)
        if complete_prefix is not None:
            keep = min(keep, complete_prefix([line.decode("utf-8") for line in whole[:keep]]))
        keep_bytes = sum(len(line) + 1 for line in whole[:keep])
        if keep_bytes != len(data):
            self._fh.truncate(keep_bytes)
        self.existing = parsed[:keep]

    def write_unit(self, records: Iterable[dict]) -> None:
        """Write the records of one finished unit in a single write, then sync.

        If the write fails (a full disk), whatever part of it reached the file
        is cut off again and OutputError names the file.
        """
        text = "".join(dumps(r) + "\n" for r in records)
        if not text:
            return
        if self.path is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        fd = self._fh.fileno()
        size = os.fstat(fd).st_size
        try:
            data = memoryview(text.encode("utf-8"))
            while data:  # the file is opened for appending: each write lands at the end
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the next run's repair cuts the torn tail off instead
            raise output_error(self.path, e) from None

    def close(self) -> None:
        if self.path is None or self._fh.closed:
            return
        try:
            # Removed while still locked, so no other run can have begun on it.
            st = os.fstat(self._fh.fileno())
            if st.st_size == 0 and stat.S_ISREG(st.st_mode):  # never /dev/null or a pipe
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # an empty file left behind is harmless
        finally:
            self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: "str | os.PathLike", data: "str | bytes") -> None:
    """Write a file that must appear whole: temporary name, fsync, rename.

    On failure (OutputError for a full disk...) the temporary file is removed
    and the destination is left as it was.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # keep the original error
        if isinstance(e, OSError):
            raise output_error(dest, e) from None
        raise

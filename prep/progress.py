"""Progress on stderr for every command: a tqdm bar on a terminal, timestamped lines off one.

Under nohup, SLURM or CI stderr is a file: a bar there is either disabled or a
mess of carriage returns, so progress becomes whole lines instead, each with
a timestamp, one per item (or round) and never one per frame.
"""

from __future__ import annotations

import sys
import threading
import time

FRAME_LINE_EVERY_S = 60.0       # off a terminal, a running count of frames at most this often


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def shorten(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters, for a progress line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Reporter:
    """Where one command's progress goes; `command` starts each line ("lvr ask").

    Disabled (`--quiet`), it shows nothing at all. `verbose` asks callers for
    more detail; the reporter itself only decides how a line or bar is shown.
    """

    def __init__(self, command: str, *, enabled: bool = True, verbose: bool = False,
                 terminal: bool | None = None):
        self.command = command
        self.enabled = enabled
        self.verbose = enabled and verbose
        self.terminal = stderr_is_terminal() if terminal is None else terminal

    def line(self, message: str) -> None:
        """One line: above any bar on a terminal, with a timestamp off one."""
        if not self.enabled:
            return
        if self.terminal:
            from tqdm.auto import tqdm

            tqdm.write(f"{self.command}: {message}", file=sys.stderr)
        else:
            print(f"{timestamp()} {self.command}: {message}", file=sys.stderr, flush=True)

    def bar(self, desc: str, *, total: int | None = None, unit: str = "it", leave: bool = True,
            bar_format: str | None = None):
        """A tqdm bar on a terminal; off one a disabled tqdm, so callers need not check (they write lines)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, bar_format=bar_format, dynamic_ncols=True,
                    file=sys.stderr, disable=not (self.enabled and self.terminal))

    def frames(self, name: str, *, every_s: float = FRAME_LINE_EVERY_S,
               doing: str = "segmenting") -> "FrameProgress":
        return FrameProgress(self, name, every_s=every_s, doing=doing)


class FrameProgress:
    """Frames decoded from one video: a bar on a terminal; off one, a line at the start, at most
    every `every_s` seconds, and at the end.

    Nothing shows until `plan` is called and a first frame stored, so a cached tree stays silent.
    `plan` and `update` may come from a worker thread (decoding runs in one).
    """

    def __init__(self, reporter: Reporter, name: str, *, every_s: float = FRAME_LINE_EVERY_S,
                 doing: str = "segmenting"):
        self.reporter = reporter
        self.name = name
        self.doing = doing   # what the lines say: "segmenting NAME: ..."
        self.every_s = every_s
        self.total = 0
        self.done = 0
        self.started: float | None = None
        self._last_line = 0.0
        self._bar = None
        self._closed = False
        self._lock = threading.Lock()

    def plan(self, total: int) -> None:
        """Frames there are to decode. Nothing shows until the first of them is stored: another
        worker (a concurrent question on the same video) may decode them all first."""
        with self._lock:
            self.total, self.done = total, 0

    def _start(self) -> None:
        self.started = self._last_line = time.perf_counter()
        self._bar = self.reporter.bar(f"{self.doing} {self.name}", total=self.total, unit="frame", leave=False)
        if not self.reporter.terminal:
            self.reporter.line(f"{self.doing} {self.name}: {self.total} frames to decode")

    def update(self, n: int) -> None:
        with self._lock:
            if self.total == 0 or n <= 0:
                return
            if self._bar is None:
                if self._closed:
                    return
                self._start()
            self.done += n
            self._bar.update(n)
            now = time.perf_counter()
            due = not self.reporter.terminal and now - self._last_line >= self.every_s
            if due:
                self._last_line = now
        if due:
            self.reporter.line(f"{self.doing} {self.name}: {self.done}/{self.total} frames")

    def close(self, ok: bool = True) -> None:
        """End the bar; off a terminal, say how long the decoding took (only when there was some)."""
        with self._lock:
            bar, self._bar, self._closed = self._bar, None, True
        if bar is None:
            return
        bar.close()
        if ok and not self.reporter.terminal:
            self.reporter.line(f"{self.doing} {self.name}: {self.done} frames in "
                               f"{time.perf_counter() - self.started:.1f} s")

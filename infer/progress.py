"""What `ask`, `eval` and `synthesize` show while they work.

The navigator reports through callbacks (`AskCallbacks`); these classes turn
them into bars and lines through a `Reporter` (prep/progress.py), which
decides between a bar on a terminal and timestamped lines off one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..prep.progress import Reporter, shorten
from .agent import Turn
from .environment import VideoEnv
from .navigator import AskCallbacks

VERBOSE_CHARS = 300             # think text and tool results, per --verbose line


class QuestionProgress:
    """One question: the first level's frames while they are decoded (silent when its captions are
    stored), then its turns."""

    def __init__(self, reporter: Reporter, video: "str | os.PathLike", *, on_probe=None, on_tree=None,
                 on_turn=None, on_stage=None):
        self.frames = reporter.frames(Path(video).name, doing="decoding the first level of")
        self.env: VideoEnv | None = None
        self._on_probe, self._on_tree, self._on_turn, self._on_stage = on_probe, on_tree, on_turn, on_stage
        self._captions_counted = 0

    @property
    def callbacks(self) -> AskCallbacks:
        return AskCallbacks(on_probe=self._on_probe, on_plan=self.frames.plan, on_frames=self.frames.update,
                            on_tree=self._tree, on_turn=self._turn, on_stage=self._on_stage)

    def _tree(self, env: VideoEnv) -> None:
        self.env = env
        if self._on_tree is not None:
            self._on_tree(env)

    def _turn(self, turn: Turn) -> None:
        self.frames.close()  # the first turn comes after the first level's frames
        if self._on_turn is not None:
            self._on_turn(turn)

    def new_captions(self) -> int:
        """Captions made since the last call (the slow ones: those from the store cost nothing)."""
        made = self.env.caption_made if self.env is not None else 0
        new, self._captions_counted = made - self._captions_counted, made
        return new

    def close(self) -> None:
        """End the frame bar if segmenting failed half way."""
        self.frames.close(ok=False)


class AskProgress:
    """`lvr ask`: a bar of rounds on a terminal, one line per round off one; `--verbose` shows each
    round whole (think, call, result) as it ends."""

    def __init__(self, reporter: Reporter, video: "str | os.PathLike"):
        self.reporter = reporter
        self.video_name = Path(video).name
        self.question = QuestionProgress(reporter, video, on_probe=self._probe, on_tree=self._tree,
                                         on_turn=self._turn, on_stage=self._stage)
        self.rounds = None

    @property
    def callbacks(self) -> AskCallbacks:
        return self.question.callbacks

    def _probe(self) -> None:
        if self.reporter.verbose or not self.reporter.terminal:
            self.reporter.line(f"probing {self.video_name} and planning its tree")

    def _tree(self, env: VideoEnv) -> None:
        # A counter, not a bar: most runs end well before --max-rounds.
        self.rounds = self.reporter.bar("ask", unit="round", bar_format="{desc}: round {n_fmt} [{elapsed}{postfix}]")
        self.rounds.set_postfix_str(f"captioning the {env.k} high clips")
        if self.reporter.verbose or not self.reporter.terminal:
            self.reporter.line(f"K={env.k} tree ready; captioning the {env.k} high clips")

    def _turn(self, turn: Turn) -> None:
        if self.rounds is not None:
            self.rounds.set_postfix_str(shorten(turn.summary(), 60), refresh=False)
            self.rounds.update(1)
        if self.reporter.verbose:
            for line in verbose_lines(turn):
                self.reporter.line(line)
        elif not self.reporter.terminal:
            self.reporter.line(f"round {turn.round}: {turn.summary()}")

    def _stage(self, doing: str) -> None:
        """Ground-then-answer's second stage (after the grounding rounds)."""
        if self.rounds is not None:
            self.rounds.set_postfix_str(shorten(doing, 60))
        if self.reporter.verbose or not self.reporter.terminal:
            self.reporter.line(doing)

    def close(self) -> None:
        self.question.close()
        if self.rounds is not None:
            self.rounds.close()


def time_spent(accounting: dict) -> str:
    """A question's time from its accounting: `12.3 s`, or `12.3 s + 40.1 s segmenting`."""
    segmenting = accounting.get("segment_seconds") or 0.0
    return f"{accounting['seconds']:.1f} s" + (f" + {segmenting:.1f} s segmenting" if segmenting >= 0.05 else "")


def verbose_lines(turn: Turn) -> list[str]:
    """One round, whole: the think text, the call (or answer, or breach), and what the model read next."""
    p = turn.parsed
    lines = [f"round {turn.round} ({turn.seconds:.1f} s)"]
    if p.think:
        lines.append(f"  think: {shorten(p.think, VERBOSE_CHARS)}")
    if p.call is not None:
        lines.append(f"  tool: {p.call.render()}")
    elif p.answer is not None:
        lines.append(f"  answer: {shorten(p.answer, VERBOSE_CHARS)}" + (" (rejected)" if turn.dropped else ""))
    if turn.breach:
        lines.append(f"  invalid: {turn.breach}")
    if turn.result is not None:
        lines.append(f"  result ({len(turn.result.split())} words): {shorten(turn.result, VERBOSE_CHARS)}")
    return lines


class BatchProgress:
    """`eval` and `synthesize`: a bar of items on a terminal, with the rounds and new captions of the
    questions in flight counted as they happen; off one, a timestamped line per item ended."""

    def __init__(self, reporter: Reporter, desc: str, total: int, unit: str):
        self.reporter = reporter
        self.total = total
        self.ended = 0
        self.rounds = 0
        self.captioned = 0          # captions made (not served from the store) so far
        self.postfix: dict = {}
        self.bar = reporter.bar(desc, total=total, unit=unit)

    def question(self, video: "str | os.PathLike") -> QuestionProgress:
        def turn(_: Turn) -> None:
            self.rounds += 1
            self.captioned += q.new_captions()
            self._refresh()

        q = QuestionProgress(self.reporter, video, on_turn=turn)
        return q

    def item_ended(self, question: QuestionProgress | None, line: str | None = None, **postfix) -> None:
        """One item is over: a bar step; off a terminal, `line` (None for a failure, named elsewhere)."""
        if question is not None:
            question.close()
            self.captioned += question.new_captions()
        self.ended += 1
        self.postfix.update(postfix)
        self._refresh(redraw=False)
        self.bar.update(1)
        if line is not None and not self.reporter.terminal:
            self.reporter.line(f"[{self.ended}/{self.total}] {line}")

    def _refresh(self, redraw: bool = True) -> None:
        self.bar.set_postfix(**self.postfix, rounds=self.rounds, captioned=self.captioned, refresh=redraw)

    def close(self) -> None:
        self.bar.close()

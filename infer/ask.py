"""`lvr ask` as a library: one question about one local video."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ..prep.jsonl import dumps, write_atomic
from ..prep.progress import Reporter
from .navigator import Asked, Navigator, NavigatorOptions, build_trace
from .progress import AskProgress
from .protocol import QA

ANSWER_SCHEMA = "lvr.answer/1"


def answer_record(asked: Asked, trace: dict) -> dict:
    """The short result of one question (the trace holds the rest)."""
    result = asked.result
    return {
        "schema": ANSWER_SCHEMA, "video_id": trace["video"]["video_id"], "path": asked.video,
        "task": result.task, "strategy": asked.strategy, "question": result.question, "options": list(result.options),
        "answer": result.answer, "choice": result.choice,
        "interval": list(result.interval) if result.interval is not None else None,
        "stopped": result.stopped, "error": result.error,
        "accounting": trace["accounting"], "settings": asked.settings,
    }


def write_trace_files(trace: dict, navigator: Navigator, trace_path: "str | os.PathLike | None",
                      html_path: "str | os.PathLike | None") -> None:
    if trace_path is not None:
        write_atomic(trace_path, dumps(trace) + "\n")
    if html_path is not None:
        from .trace_html import write_trace_html

        write_trace_html(html_path, trace, navigator.frames)


def ask_video(video: "str | os.PathLike", question: str, options: tuple[str, ...], nav: NavigatorOptions,
              cache_dir: Path, *, subtitles: bool = True, trace_path=None, html_path=None,
              reporter: Reporter | None = None, task: str = QA) -> tuple[Asked, dict]:
    """Segment (cached), navigate, answer; write the trace files asked for.

    `task="grounding"` answers with a time interval (`lvr ground`).

    `reporter` shows the segmenting and each round as they happen (nothing without one).
    Raises ModelError when an endpoint cannot be reached at all; every other
    failure is reported in the returned result's `error`.
    """
    progress = AskProgress(reporter or Reporter("lvr ask", enabled=False), video)

    async def go() -> tuple[Asked, dict]:
        navigator = Navigator(nav, cache_dir)
        try:
            await navigator.preflight()
            asked = await navigator.ask(video, question, options, subtitles=subtitles, task=task,
                                        callbacks=progress.callbacks)
        finally:
            progress.close()
            await navigator.aclose()
        trace = build_trace(asked)
        write_trace_files(trace, navigator, trace_path, html_path)
        return asked, trace

    return asyncio.run(go())

"""One async work queue for every batch step (caption, eval, synthesize, questions).

`run_jobs` runs `work(job)` for each job with at most `concurrency` in flight.
Jobs come from a list, or from a function that hands out the next job when
one is ready: it returns None when there is nothing to start now, and the
queue then waits for a job in flight to end (which may make new jobs ready,
as in `lvr questions`) or finishes when none is in flight. `stop()` is asked
before each start (a token budget); jobs already started always finish, and
whatever their `work` writes is appended as each one ends, so a killed run
resumes from its output. Each finished job is reported to `on_done`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


@dataclass
class QueueStats(Generic[T]):
    started: int = 0
    finished: int = 0
    stopped: bool = False       # stop() ended the run early
    not_started: int = 0        # jobs of a list that were never started


async def run_jobs(jobs: "Iterable[T] | Callable[[], T | None]", work: Callable[[T], Awaitable[None]], *,
                   concurrency: int, stop: Callable[[], bool] | None = None,
                   on_done: Callable[[T], None] | None = None) -> QueueStats:
    """Run the jobs `concurrency` at a time. An exception in `work` ends the run (catch per job inside it)."""
    stats: QueueStats = QueueStats()
    if callable(jobs):
        next_job = jobs
        remaining = None
    else:
        pending = list(jobs)
        remaining = pending
        pending.reverse()

        def next_job():
            return pending.pop() if pending else None
    in_flight = 0
    changed = asyncio.Condition()

    async def runner() -> None:
        nonlocal in_flight
        while True:
            if stop is not None and stop():
                stats.stopped = True
                return
            job = next_job()
            if job is None:
                if in_flight == 0:
                    return
                async with changed:
                    await changed.wait()
                continue
            in_flight += 1
            stats.started += 1
            try:
                await work(job)
                stats.finished += 1
                if on_done is not None:
                    on_done(job)
            finally:
                in_flight -= 1
                async with changed:
                    changed.notify_all()

    await asyncio.gather(*(runner() for _ in range(max(1, concurrency))))
    if remaining is not None:
        stats.not_started = len(remaining)
    return stats


def unfinished(items: list[T], finished: Iterable[dict], key: Callable[[T], str]) -> list[T]:
    """The items whose key is not among the ids of the records already written (resuming a run)."""
    done = {r.get("qid") for r in finished}
    return [it for it in items if key(it) not in done]

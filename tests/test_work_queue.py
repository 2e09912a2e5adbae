"""The one async work queue: concurrency bound, stop before a start, jobs that make jobs."""

from __future__ import annotations

import asyncio

from lvr.prep.work_queue import run_jobs


def test_a_list_runs_every_job_at_most_concurrency_at_once():
    running, peak, done = 0, 0, []

    async def work(job):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (job % 3))
        running -= 1
        done.append(job)

    stats = asyncio.run(run_jobs(range(20), work, concurrency=4))
    assert sorted(done) == list(range(20)) and peak == 4
    assert (stats.started, stats.finished, stats.not_started, stats.stopped) == (20, 20, 0, False)


def test_stop_is_asked_before_each_start_and_started_jobs_finish():
    finished = []

    async def work(job):
        await asyncio.sleep(0.001)
        finished.append(job)

    stats = asyncio.run(run_jobs(range(10), work, concurrency=2, stop=lambda: len(finished) >= 3))
    assert stats.stopped and 3 <= len(finished) < 10
    assert stats.not_started == 10 - stats.started and stats.finished == stats.started


def test_a_job_source_may_wait_for_jobs_in_flight_to_make_new_ones():
    """A source with nothing ready returns None; the queue waits for a finish instead of ending."""
    ready, made = [1], []

    def next_job():
        return ready.pop() if ready else None

    async def work(job):
        await asyncio.sleep(0.001)
        made.append(job)
        if job < 5:
            ready.append(job + 1)  # finishing a job makes the next one ready

    stats = asyncio.run(run_jobs(next_job, work, concurrency=3, on_done=lambda job: None))
    assert made == [1, 2, 3, 4, 5] and stats.finished == 5


def test_on_done_sees_every_finished_job():
    seen = []

    async def work(job):
        await asyncio.sleep(0)

    asyncio.run(run_jobs(["a", "b", "c"], work, concurrency=2, on_done=seen.append))
    assert sorted(seen) == ["a", "b", "c"]

"""Two `lvr caption` runs on one store at once: every node is asked for exactly once."""

from __future__ import annotations

import sqlite3
import subprocess
import time

from fake_openai import FakeOpenAI
from lvr_test_helpers import LVR, caption_reply, fresh_cache
from lvr_test_helpers import load_jsonl as load


def caption_run(nodes, out, cache, url, *extra) -> subprocess.Popen:
    return subprocess.Popen([*LVR, "caption", str(nodes), "-o", str(out), "--cache-dir", str(cache),
                             "--base-url", url, "--model", "fake-model", "--concurrency", "4", "-q", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def test_two_runs_on_one_store_ask_once_per_node(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    node_ids = sorted(tuple(r["id"]) for r in load(nodes))
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    # Slow replies: each run takes seconds, so the two overlap throughout.
    with FakeOpenAI(reply=caption_reply, latency_s=0.15) as server:
        runs = [caption_run(nodes, out, cache, server.url) for out in outs]
        for proc in runs:
            finish(proc)
        requests = len(server.requests)
    assert requests == len(node_ids) == 84  # every node captioned, none paid for twice
    for out in outs:
        records = load(out)
        assert sorted(tuple(r["id"]) for r in records) == node_ids
    made = [sum(not r["cached"] for r in load(out)) for out in outs]
    assert sum(made) == 84
    con = sqlite3.connect(cache / "captions.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM captions").fetchone() == (84,)
    assert con.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)  # all released


def test_claims_of_a_killed_run_do_not_hold_up_the_next(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    out = tmp_path / "captions.jsonl"
    with FakeOpenAI(reply=caption_reply, latency_s=0.05) as server:
        killed = caption_run(nodes, out, cache, server.url)
        store = cache / "captions.sqlite3"
        deadline = time.time() + 120
        while time.time() < deadline and not _held_claims(store):
            time.sleep(0.01)
        killed.kill()
        killed.communicate()
        assert _held_claims(store)
        # Claims that would never expire: only seeing that their owner is gone frees them.
        with sqlite3.connect(store) as con:
            con.execute("UPDATE claims SET expires = expires + 86400")
        finish(caption_run(nodes, out, cache, server.url))
    assert sorted(tuple(r["id"]) for r in load(out)) == sorted(tuple(r["id"]) for r in load(nodes))


def _held_claims(store) -> int:
    if not store.exists():
        return 0
    try:
        return sqlite3.connect(store).execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0

"""The shared caption store: keys, round trips, first-writer-wins, many writers."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import socket
import sqlite3
import threading
import time
import traceback
from dataclasses import replace

import pytest

from lvr.prep.caption_store import CaptionEntry, CaptionKey, CaptionStore, CaptionStoreError, captions_path

SETTINGS = CaptionKey.settings(frames=32, side=512, subtitles=True)


def key(i: int = 0, video: str = "vid0", **kw) -> CaptionKey:
    base = dict(video_id=video, level="low", start=i * 1.5, end=i * 1.5 + 1.5,
                model="qwen-vl", prompt_hash="p1", frame_settings=SETTINGS)
    base.update(kw)
    return CaptionKey(**base)


@pytest.fixture
def store(tmp_path):
    s = CaptionStore(captions_path(tmp_path / "cache"))
    yield s
    s.close()


def test_round_trip(store):
    k = key(3)
    text = 'A "quoted" caption\nwith lines and unicode: café – 字幕 🎬'
    assert store.get(k) is None
    assert store.put(k, (1, 2, 3), text, {"tokens": 57, "raw": f"<caption>{text}</caption>"})
    got = store.get(k)
    assert isinstance(got, CaptionEntry)
    assert got.key == k and got.node_id == (1, 2, 3) and got.caption == text
    assert got.meta["tokens"] == 57 and "created_at" in got.meta
    assert store.count() == 1
    assert [e.caption for e in store.entries()] == [text]
    assert list(store.entries(video_id="other")) == []
    assert len(list(store.entries(video_id="vid0", model="qwen-vl"))) == 1


def test_key_normalisation():
    a = key(start=1.00001, end=2.0, frame_settings='{"side":512, "subtitles":true, "frames":32}')
    b = key(start=1.0, end=2.00000001, frame_settings=SETTINGS)
    assert a == b and a.digest() == b.digest()
    assert a.frame_settings == '{"frames":32,"side":512,"subtitles":true}'
    assert key(start=-0.0).digest() == key(start=0.0).digest()
    with pytest.raises(ValueError, match="level"):
        key(level="top")
    with pytest.raises(ValueError, match="frame_settings"):
        key(frame_settings="{not json")


def test_digest_changes_with_each_field():
    base = key(1)
    changes = dict(video_id="vid1", level="medium", start=base.start + 0.001, end=base.end + 0.001,
                   model="other-model", prompt_hash="p2",
                   frame_settings=CaptionKey.settings(frames=16, side=512, subtitles=True))
    digests = {base.digest()}
    for name, value in changes.items():
        d = replace(base, **{name: value}).digest()
        assert d not in digests, name
        digests.add(d)
    assert len(base.digest()) == 64


def test_put_twice_keeps_one_row(store):
    k = key(1)
    assert store.put(k, (1,), "first", {}) is True
    assert store.put(k, (1,), "second", {}) is False
    assert store.count() == 1
    assert store.get(k).caption == "first"


def test_get_many_batches(store):
    keys = [key(i) for i in range(1234)]
    for i, k in enumerate(keys[::2]):
        store.put(k, (1, 1, 1), f"c{i}", {})
    found = store.get_many(keys + [key(99999)])
    assert len(found) == 617
    assert found[keys[0].digest()].caption == "c0"
    assert found[keys[2].digest()].caption == "c1"
    assert keys[1].digest() not in found
    assert len(list(store.entries())) == 617  # paged reading sees every row once


def test_reopen_after_close(tmp_path):
    path = tmp_path / "deep" / "dir" / "captions.sqlite3"
    s = CaptionStore(path)
    s.put(key(1), (1,), "kept", {"n": 1})
    s.close()
    with pytest.raises(CaptionStoreError, match="closed"):
        s.get(key(1))
    with CaptionStore(path) as again:
        assert again.get(key(1)).caption == "kept"
        assert again.count() == 1
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_corrupt_file_gives_one_line_error(tmp_path):
    path = tmp_path / "captions.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just some bytes\n" * 100)
    with pytest.raises(CaptionStoreError) as err:
        CaptionStore(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "caption store" in msg


def test_other_sqlite_schema_version_is_refused(tmp_path):
    path = tmp_path / "captions.sqlite3"
    CaptionStore(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(CaptionStoreError, match="version 99"):
        CaptionStore(path)


def test_threads_share_one_store(store):
    errors = []

    def work(t):
        try:
            for i in range(100):
                store.put(key(i), (1,), f"thread {t}", {})
                store.put(key(i, video=f"own{t}"), (1,), "own", {})
                assert store.get(key(i)) is not None
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert store.count() == 100 + 6 * 100


# -- several processes ---------------------------------------------------------

SHARED, OWN, WORKERS = 200, 50, 4


def _writer(path: str, worker: int, start, results) -> None:
    """One process: put the shared keys and its own keys, in its own random order."""
    try:
        store = CaptionStore(path)
        jobs = [(key(i, video="shared"), True) for i in range(SHARED)]
        jobs += [(key(i, video=f"own-{worker}"), False) for i in range(OWN)]
        random.Random(worker).shuffle(jobs)
        start.wait()
        won = {"shared": 0, "own": 0}
        for k, shared in jobs:
            if store.put(k, (1, 1, 1), f"worker {worker}", {"worker": worker}):
                won["shared" if shared else "own"] += 1
        store.close()
        results.put((worker, won, None))
    except BaseException:
        results.put((worker, None, traceback.format_exc()))


def test_concurrent_processes(tmp_path):
    path = str(tmp_path / "cache" / "captions.sqlite3")  # a fresh file: schema creation races too
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, w, start, results)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    failures = [tb for _, _, tb in outcomes if tb]
    assert not failures, failures[0]
    assert sum(w["shared"] for _, w, _ in outcomes) == SHARED   # each shared key won exactly once
    assert all(w["own"] == OWN for _, w, _ in outcomes)
    with CaptionStore(path) as store:
        assert store.count() == SHARED + WORKERS * OWN == 400
        rows = sqlite3.connect(path).execute(
            "SELECT COUNT(DISTINCT digest), COUNT(*) FROM captions").fetchone()
        assert rows == (400, 400)


# -- claims: one maker per caption across processes -------------------------------

def put_claim(path, k: CaptionKey, owner: str, expires: float) -> None:
    """A claim row as another process would leave it."""
    con = sqlite3.connect(path)
    con.execute("INSERT OR REPLACE INTO claims (digest, owner, expires) VALUES (?, ?, ?)",
                (k.digest(), owner, expires))
    con.commit()
    con.close()


def claims(path) -> list[tuple]:
    return sqlite3.connect(path).execute("SELECT owner, expires FROM claims").fetchall()


def test_a_claimant_waits_for_the_holder_and_gets_its_caption(store):
    k = key(1)

    async def scenario():
        async with store.claim(k) as entry:
            assert entry is None  # ours to make
            waiter = asyncio.create_task(_claim_and_report(store, k))
            await asyncio.sleep(0.3)
            assert not waiter.done()  # held: the other claimant waits
            store.put(k, (1,), "made once", {})
        return await waiter

    assert asyncio.run(scenario()) == "made once"
    assert claims(store.path) == []  # released


async def _claim_and_report(store, k):
    async with store.claim(k) as entry:
        return None if entry is None else entry.caption


def test_a_failed_holder_lets_the_next_claimant_make_it(store):
    k = key(2)

    async def scenario():
        waiter = None
        with pytest.raises(RuntimeError):
            async with store.claim(k):
                waiter = asyncio.create_task(_claim_and_report(store, k))
                await asyncio.sleep(0.1)
                raise RuntimeError("the model failed")
        return await waiter

    assert asyncio.run(scenario()) is None  # nothing stored: the waiter now holds the claim


def test_expired_and_orphaned_claims_are_taken_over(store):
    dead = mp.get_context("spawn").Process(target=int)  # a process that has ended: its pid is free
    dead.start()
    dead.join()
    put_claim(store.path, key(3), "elsewhere:123:abcd", time.time() - 1)                   # expired
    put_claim(store.path, key(4), f"{socket.gethostname()}:{dead.pid}:abcd", time.time() + 3600)  # killed owner
    put_claim(store.path, key(5), "elsewhere:123:abcd", time.time() + 3600)                # alive elsewhere
    assert asyncio.run(_claim_and_report(store, key(3))) is None
    assert asyncio.run(_claim_and_report(store, key(4))) is None

    async def blocked():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_claim_and_report(store, key(5)), 0.5)
    asyncio.run(blocked())
    assert claims(store.path) == [("elsewhere:123:abcd", pytest.approx(time.time() + 3600, abs=60))]


def test_a_held_claim_is_renewed(store):
    k = key(6)

    async def scenario():
        async with store.claim(k, ttl=0.6):
            first = claims(store.path)[0][1]
            await asyncio.sleep(1.5)  # longer than the ttl: only renewal keeps it alive
            later = claims(store.path)[0][1]
            assert later > time.time()  # still live: nobody else may take it over
            return first, later

    first, later = asyncio.run(scenario())
    assert later > first


def test_a_store_from_before_claims_gets_the_table(tmp_path):
    path = tmp_path / "captions.sqlite3"
    CaptionStore(path).close()
    con = sqlite3.connect(path)
    con.execute("DROP TABLE claims")
    con.commit()
    con.close()
    with CaptionStore(path) as s:
        s.put(key(1), (1,), "old store", {})
        assert asyncio.run(_claim_and_report(s, key(1))) == "old store"
        assert asyncio.run(_claim_and_report(s, key(2))) is None

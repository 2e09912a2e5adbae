"""A damaged caption store is refused untouched, with commands that recover it; a full store loses nothing."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import sqlite3
import subprocess

import pytest

from fake_openai import FakeOpenAI
from lvr.prep.caption_store import CaptionKey, CaptionStore, CaptionStoreError
from lvr_test_helpers import caption_reply, fresh_cache, run_lvr

SETTINGS = CaptionKey.settings(frames=8, side=256, subtitles=False)
PAGE = 4096


def key(i: int) -> CaptionKey:
    return CaptionKey("vid", "low", i * 2.0, i * 2.0 + 2.0, "m", "p", SETTINGS)


def filled_store(path, n: int = 300):
    """A store of n captions of ~1 KB, all in the main file (closing checkpoints the WAL)."""
    rnd = random.Random(7)
    with CaptionStore(path) as store:
        for i in range(n):
            store.put(key(i), (1, i + 1), " ".join(f"word{rnd.randrange(10**6)}" for _ in range(90)), {})
    assert not path.with_name(path.name + "-wal").exists()
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def garbage_page(path):
    data = bytearray(path.read_bytes())
    middle = (len(data) // PAGE // 2) * PAGE
    data[middle:middle + PAGE] = random.Random(1).randbytes(PAGE)
    path.write_bytes(bytes(data))


def truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: (len(data) // PAGE // 2) * PAGE])


def text_file(path):
    path.write_text("these are my notes, not a database\n" * 200)


def header_garbage(path):
    data = bytearray(path.read_bytes())
    data[:100] = random.Random(2).randbytes(100)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [garbage_page, truncate_half, text_file, header_garbage])
def test_damaged_store_is_refused_untouched(tmp_path, damage):
    path = filled_store(tmp_path / "captions.sqlite3")
    damage(path)
    before = digest(path)
    with pytest.raises(CaptionStoreError) as err:
        CaptionStore(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a usable caption store (")
    assert "mkdir " in msg and ".dump" in msg
    assert digest(path) == before  # never recreated, repaired or overwritten
    with pytest.raises(CaptionStoreError):  # and refused again, not "fixed" by the first try
        CaptionStore(path)
    assert digest(path) == before


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 command-line tool")
def test_the_commands_in_the_message_recover_the_captions(tmp_path):
    folder = tmp_path / "my cache"  # a space: the commands must quote paths
    path = filled_store(folder / "captions.sqlite3")
    garbage_page(path)
    with pytest.raises(CaptionStoreError) as err:
        CaptionStore(path)
    msg = str(err.value)
    move = re.search(r"Move it aside: (.*?) ; then", msg).group(1)
    salvage = re.search(r"still holds: (.*?) ; then rerun", msg).group(1)
    for command in (move, salvage):
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
    assert (folder / "damaged-captions.sqlite3" / "captions.sqlite3").exists()
    with CaptionStore(path) as store:  # the salvaged store opens and serves what survived
        kept = store.count()
        assert 0 < kept <= 300
        assert store.get(next(iter(store.entries())).key) is not None
        assert store.put(key(10_000), (1,), "new", {})


def test_caption_and_ask_report_a_damaged_store_in_one_line(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    store = cache / "captions.sqlite3"
    store.write_bytes(b"\x00garbage" * 5000)
    before = digest(store)
    out = tmp_path / "captions.jsonl"
    with FakeOpenAI(reply=caption_reply) as server:
        proc = run_lvr("caption", nodes, "-o", out, "--cache-dir", cache, "--base-url", server.url,
                       "--model", "fake-model")
        asked = run_lvr("ask", nodes, "What is shown?", "--cache-dir", cache, "--base-url", server.url,
                        "--model", "fake-model")
        assert not server.requests
    for p in (proc, asked):
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and str(store) in lines[0] and "Move it aside" in lines[0], p.stderr
    assert not out.exists()  # no empty output left behind
    assert digest(store) == before


# -- a full disk ------------------------------------------------------------------

def test_full_store_keeps_every_row_whole(tmp_path):
    path = tmp_path / "captions.sqlite3"
    store = CaptionStore(path)
    for i in range(20):
        store.put(key(i), (1,), f"caption {i}", {})
    conn = store._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    # A real SQLITE_FULL: the database may not grow by another page.
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(CaptionStoreError) as err:
        store.put(key(99), (1,), "x" * 50_000, {"big": True})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: the disk is full")
    assert store.get(key(99)) is None and store.count() == 20
    conn.execute(f"PRAGMA max_page_count = {pages * 100}")  # space again: writing goes on
    assert store.put(key(99), (1,), "x" * 50_000, {})
    store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert check.execute("SELECT COUNT(*), SUM(length(caption)) FROM captions").fetchone() == (
        21, sum(len(f"caption {i}") for i in range(20)) + 50_000)

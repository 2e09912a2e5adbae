"""Crash-safe JSONL output and input."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import pytest

from lvr.prep.jsonl import JsonlWriter, OutputError, RecordError, read_jsonl, write_atomic
from lvr.prep.segment import complete_videos_prefix


def rec(video: str, k: int = 1, i: int = 0) -> dict:
    return {"video_id": video, "K": k, "i": i}


def lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_torn_last_line_is_cut(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(lines(rec("a"), rec("b")) + '{"video_id": "c", "K"')
    with JsonlWriter(path) as w:
        assert [r["video_id"] for r in w.existing] == ["a", "b"]
        w.write_unit([rec("c")])
    assert [json.loads(x)["video_id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_unfinished_unit_is_cut(tmp_path):
    # K=1 needs 1+1+1 = 3 records per video; "b" has only 2.
    path = tmp_path / "out.jsonl"
    path.write_text(lines(*(rec("a", i=i) for i in range(3)), rec("b", i=0), rec("b", i=1)))
    with JsonlWriter(path, complete_prefix=complete_videos_prefix) as w:
        assert {r["video_id"] for r in w.existing} == {"a"} and len(w.existing) == 3
    assert len(path.read_text().splitlines()) == 3


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path):
        with pytest.raises(RecordError, match="another lvr run"):
            JsonlWriter(path)


def test_read_jsonl_from_stdin_and_errors(tmp_path):
    got = list(read_jsonl("-", stdin=io.StringIO('{"a": 1}\n\n{"b": 2}\n')))
    assert got == [(1, {"a": 1}), (3, {"b": 2})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not a JSON object"):
        list(read_jsonl(bad))
    bad.write_text("{oops\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:1: not JSON"):
        list(read_jsonl(bad))
    with pytest.raises(RecordError, match="cannot open"):
        list(read_jsonl(tmp_path / "none.jsonl"))


def test_write_atomic_leaves_no_temp_files(tmp_path):
    write_atomic(tmp_path / "x.json", '{"ok": true}')
    write_atomic(tmp_path / "x.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert (tmp_path / "x.json").read_bytes() == b"{}"


# -- a full disk, and outputs that stay empty ---------------------------------------

def no_space(*_args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_after(n_bytes: int):
    """An os.write that writes n_bytes for real, then fails as a full disk does."""
    real = os.write
    left = [n_bytes]

    def write(fd, data):
        if left[0] <= 0:
            no_space()
        n = real(fd, bytes(data[: left[0]]))
        left[0] -= n
        return n
    return write


def test_failed_write_leaves_no_torn_unit(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write_unit([rec("a", i=0), rec("a", i=1)])
        before = path.read_bytes()
        monkeypatch.setattr(os, "write", full_disk_after(30))  # half a unit reaches the disk
        with pytest.raises(OutputError) as err:
            w.write_unit([rec("b", i=0), rec("b", i=1)])
        monkeypatch.undo()
        assert path.read_bytes() == before
        w.write_unit([rec("c")])  # space again: appending goes on after the last whole unit
    msg = str(err.value)
    assert msg.startswith(f"{path}: the disk is full") and "\n" not in msg
    assert err.value.errno == errno.ENOSPC
    assert isinstance(err.value, RecordError) and isinstance(err.value, OSError)  # caught by every step
    assert [json.loads(x)["video_id"] for x in path.read_text().splitlines()] == ["a", "a", "c"]


def test_failed_sync_leaves_no_unit(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        w.write_unit([rec("a")])
        monkeypatch.setattr(os, "fsync", no_space)
        with pytest.raises(OutputError, match="disk is full"):
            w.write_unit([rec("b")])
    assert [json.loads(x)["video_id"] for x in path.read_text().splitlines()] == ["a"]


def test_write_atomic_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "summary.json"
    write_atomic(dest, '{"old": true}\n')
    monkeypatch.setattr(os, "fsync", no_space)  # the data never reached the disk
    with pytest.raises(OutputError) as err:
        write_atomic(dest, '{"new": true}\n' * 1000)
    monkeypatch.undo()
    assert str(err.value).startswith(f"{dest}: the disk is full")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left
    assert dest.read_text() == '{"old": true}\n'


def test_an_output_that_stays_empty_is_not_left_behind(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with JsonlWriter(path) as w:
        assert path.exists()  # held (and locked) while open
        with pytest.raises(RecordError, match="another lvr run"):
            JsonlWriter(path)
        w.write_unit([])
    assert not path.exists()
    # A file with whole units stays; one whose only content was torn is removed.
    with JsonlWriter(path) as w:
        w.write_unit([rec("a")])
    with JsonlWriter(path) as w:
        assert len(w.existing) == 1
    assert path.exists()
    path.write_text('{"video_id": "tor')
    with JsonlWriter(path) as w:
        assert w.existing == []
    assert not path.exists()
    if os.path.exists(os.devnull):  # never removes what is not a regular file
        with JsonlWriter(os.devnull):
            pass
        assert os.path.exists(os.devnull)


def test_segment_of_a_bad_video_leaves_no_output(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video\n")
    out = tmp_path / "nodes.jsonl"
    proc = subprocess.run([sys.executable, "-m", "lvr.cli", "segment", str(bad), "-o", str(out),
                           "--cache-dir", str(tmp_path / "cache"), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "broken.mp4" in proc.stderr
    assert not out.exists()

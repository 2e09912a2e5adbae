"""Crash-safe JSONL output and input."""

from __future__ import annotations

import io
import json

import pytest

from lvr.prep.jsonl import JsonlWriter, RecordError, read_jsonl, write_atomic
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

"""A frame store that heals: damaged JPEGs are decoded again from the video, never sent."""

from __future__ import annotations

import base64
import errno
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr.prep import frames as frames_module
from lvr.prep.caption_store import STORE_FILENAME
from lvr.prep.frame_repair import FrameRepairError, jpeg_problem, read_node_frames
from lvr.prep.frames import FrameStore, FrameStoreError, parse_frame_key
from lvr.prep.probe import VideoError
from lvr.prep.segment import SegmentOptions, segment_video
from lvr_test_helpers import model_flags, run_lvr, scripted
from synthetic_media import make_frame_number_video, read_frame_number


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """12 s at 10 fps, frame N shows N."""
    return make_frame_number_video(tmp_path_factory.mktemp("repair") / "numbers.mp4", width=128)


def whole_jpeg(data: bytes) -> Image.Image:
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    im = Image.open(io.BytesIO(data))
    im.load()  # a full decode
    return im


def sent_images(server: FakeOpenAI) -> list[bytes]:
    return [base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            for body in server.requests for message in body["messages"]
            if isinstance(message["content"], list)
            for part in message["content"] if part.get("type") == "image_url"]


def test_damaged_frames_are_decoded_again_before_ask_sends_them(video, tmp_path):
    cache = tmp_path / "cache"
    ask = ("ask", video, *model_flags("URL"), "--cache-dir", cache, "-O", "A. one", "-O", "B. two")
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        flags = [a if a != "URL" else server.url for a in ask]
        proc = run_lvr(*flags[:2], "What is shown?", *flags[2:])
        assert proc.returncode == 0, proc.stderr
        first_images = len(sent_images(server))

    # Damage frames the next ask sends: high node (1,) for the first prompt, the video_qa frames of (2, 3, 1).
    (tree_file,) = (cache / "trees").glob("*/*.jsonl")
    nodes = {tuple(r["id"]): r for r in map(json.loads, tree_file.read_text().splitlines())}
    store = FrameStore(cache / "frames")
    high, qa = nodes[(1,)]["frame_keys"], nodes[(2, 3, 1)]["qa_frame_keys"]
    truncated, emptied, deleted = high[0:3], high[10:12], [qa[0]]
    for key in truncated:
        data = store.get(key)
        store.path(key).write_bytes(data[: len(data) // 2])
    for key in emptied:
        store.path(key).write_bytes(b"")
    for key in deleted:
        store.path(key).unlink()
    (cache / STORE_FILENAME).unlink()  # so every caption is asked for again

    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        flags = [a if a != "URL" else server.url for a in ask]
        proc = run_lvr(*flags[:2], "What else is shown?", *flags[2:])
        assert proc.returncode == 0, proc.stderr
        images = sent_images(server)
    assert len(images) == first_images
    for data in images:
        whole_jpeg(data)
    for key in truncated + emptied + deleted:
        _, index, _ = parse_frame_key(key)
        assert read_frame_number(whole_jpeg(store.get(key))) == index, key
    assert "damaged frame(s) again from" in proc.stderr


def test_jpeg_problems_are_named():
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "white").save(buf, format="JPEG")
    data = buf.getvalue()
    assert jpeg_problem(data) is None
    assert jpeg_problem(b"") == "empty"
    assert jpeg_problem(data[: len(data) // 2]) == "truncated"
    assert jpeg_problem(b"GIF89a" + data) == "not a JPEG"
    assert jpeg_problem(data[:2] + b"\x00" * 40 + data[-2:]).startswith("unreadable")


def test_a_frame_that_cannot_be_healed_is_one_line(video, tmp_path):
    cache = tmp_path / "cache"
    store = FrameStore(cache / "frames")
    result = segment_video(video, SegmentOptions(), store)
    node = result.records[0]
    key = node["frame_keys"][0]
    store.path(key).write_bytes(b"")
    other = make_frame_number_video(tmp_path / "other.mp4", width=64, duration=8)
    for path, reason in ((tmp_path / "gone.mp4", "cannot be read"), (other, "is not the video it came from"),
                         (None, "the record names no video")):
        with pytest.raises(FrameRepairError) as e:
            read_node_frames(store, {**node, "path": path and str(path)}, node["frame_keys"])
        assert reason in str(e.value) and str(store.path(key)) in str(e.value)
        assert "\n" not in str(e.value)
    assert read_frame_number(whole_jpeg(read_node_frames(store, node, node["frame_keys"])[0])) == 0


def torn_write_then_disk_full(path: Path, data: bytes) -> None:
    """The write layer on a full disk: part of the file lands, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_leaves_nothing_torn(video, tmp_path, monkeypatch):
    monkeypatch.setattr(frames_module, "_write_file", torn_write_then_disk_full)
    store = FrameStore(tmp_path / "frames")
    key = "0123456789abcdef01234567/128/00000001.jpg"
    with pytest.raises(FrameStoreError) as e:
        store.put(key, b"\xff\xd8" + b"x" * 1000 + b"\xff\xd9")
    message = str(e.value)
    assert message == f"frame store {store.root}: cannot write {key}: disk full"
    assert [p for p in store.root.rglob("*") if p.is_file()] == []

    # Segmenting into a full store is one line naming the video, the store and the reason.
    with pytest.raises(VideoError) as e:
        segment_video(video, SegmentOptions(), store)
    assert f"frame store {store.root}: cannot write" in str(e.value) and "disk full" in str(e.value)
    assert str(video) in str(e.value) and "\n" not in str(e.value)
    assert [p for p in store.root.rglob("*") if p.is_file()] == []

"""Leaf clips: exact cuts hold exactly their leaf's frames, copy cuts cover their leaf
from keyframe to keyframe, finished clips are reused, and failures leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import av
import pytest

from lvr.prep import clips as clips_mod
from lvr.prep.clips import MANIFEST, leaf_name, write_leaf_clips
from lvr.prep.probe import VideoError, probe_video
from lvr.prep.tree import Level, Tree
from synthetic_media import ffmpeg, frame_number_filter, read_frame_number

FPS = 10
SECONDS = 12


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Frame N shows N; 10 fps, 12 s, keyframe every 2.5 s, with audio.

    "mp4" starts at 0. "ts" is MPEG-TS (container start ~1.4 s) whose audio
    begins 0.5 s before the first frame, so ffmpeg's timeline differs from ours.
    """
    d = tmp_path_factory.mktemp("clip_videos")
    vf = frame_number_filter(128, FPS, SECONDS)
    common = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-g", "25",
              "-pix_fmt", "yuv420p", "-c:a", "aac"]
    mp4 = d / "numbered.mp4"
    ffmpeg("-f", "lavfi", "-i", vf, "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}",
           *common, "-shortest", str(mp4))
    ts = d / "offset.ts"
    ffmpeg("-itsoffset", "0.5", "-f", "lavfi", "-i", vf,
           "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS + 1}",
           "-map", "0:v", "-map", "1:a", *common, str(ts))
    return {"mp4": mp4, "ts": ts}


def tree_for(info, k: int = 4) -> Tree:
    return Tree(k, info.frame_times, info.duration)


def decoded_numbers(path: str, every: bool = True) -> tuple[list[int], int, float]:
    """Frame numbers drawn in a clip's frames (display order; only the first and
    last unless `every`), the frame count, and the first frame's time."""
    with av.open(path) as c:
        frames = list(c.decode(video=0))
    pick = frames if every else [frames[0], frames[-1]]
    return [read_frame_number(f.to_image()) for f in pick], len(frames), float(frames[0].time)


def ffprobe_video(path: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0",
                          "-show_entries", "stream=nb_read_packets,start_time",
                          "-show_entries", "packet=flags",
                          "-of", "json", path],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def leftovers(out_dir: Path) -> list[str]:
    return [p.name for p in out_dir.iterdir() if p.name.startswith(".")] if out_dir.exists() else []


@pytest.mark.parametrize("kind", ["mp4", "ts"])
def test_exact_clips_hold_exactly_their_leaf(videos, tmp_path, kind):
    info = probe_video(videos[kind])
    tree = tree_for(info)
    out = tmp_path / "clips"
    recs = write_leaf_clips(info, tree, out)

    leaves = list(tree.ids(Level.LOW))
    folder = out / info.video_id
    assert set(recs) == set(leaves)
    assert sorted(p.name for p in folder.glob("*.mp4")) == sorted(f"{leaf_name(l)}.mp4" for l in leaves)
    assert leftovers(out) == []
    for leaf in leaves:
        node, rec = tree.node(leaf), recs[leaf]
        assert rec["exact"] is True
        assert rec["path"] == str((folder / f"{leaf_name(leaf)}.mp4").resolve())
        assert (rec["start"], rec["end"]) == (round(node.start, 4), round(node.end, 4))
        numbers, count, t0 = decoded_numbers(rec["path"])
        # Frame-accurate: first frame is the leaf's first, last is its last, none missing.
        assert numbers == list(range(node.start_frame, node.stop_frame)), leaf
        assert t0 == pytest.approx(0, abs=1e-3)  # each clip's own timeline starts at its cut
    # ffprobe agrees on the frame counts (a few clips: each ffprobe costs ~0.1 s).
    for leaf in leaves[::13] + [leaves[-1]]:
        probe = ffprobe_video(recs[leaf]["path"])
        assert int(probe["streams"][0]["nb_read_packets"]) == tree.node(leaf).n_frames
        assert len(probe["packets"]) == tree.node(leaf).n_frames
        assert probe["packets"][0]["flags"].startswith("K")
    # The manifest holds the same records, ids as "h-m-l", and the copy flag.
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["copy"] is False
    assert manifest["clips"] == {leaf_name(k): v for k, v in recs.items()}


@pytest.mark.parametrize("kind", ["mp4", "ts"])
def test_copy_clips_cover_their_leaf_from_keyframe_to_keyframe(videos, tmp_path, kind):
    info = probe_video(videos[kind])
    tree = tree_for(info)
    out = tmp_path / "clips"
    recs = write_leaf_clips(info, tree, out, copy=True)

    leaves = list(tree.ids(Level.LOW))
    assert set(recs) == set(leaves)
    assert len(list((out / info.video_id).glob("*.mp4"))) == len(leaves)
    assert leftovers(out) == []
    keyframes = {round(t, 4) for t in info.keyframe_times}
    assert len(keyframes) > 1  # the cuts below are real keyframe cuts, not the whole video
    for leaf in leaves:
        node, rec = tree.node(leaf), recs[leaf]
        assert rec["exact"] is False
        assert rec["start"] <= round(node.start, 4) and rec["end"] >= round(node.end, 4), leaf
        assert rec["start"] in keyframes
        assert rec["end"] in keyframes or rec["end"] == round(info.duration, 4)
        # The real cut points: the clip holds exactly the frames from start to end.
        first, stop = tree.frame_at(rec["start"] + 1e-5), tree.frame_at(rec["end"] - 1e-5) + 1
        numbers, count, t0 = decoded_numbers(rec["path"], every=False)
        assert (numbers, count) == ([first, stop - 1], stop - first), leaf
        assert t0 == pytest.approx(0, abs=1e-3)
    for leaf in leaves[::21]:
        probe = ffprobe_video(recs[leaf]["path"])
        assert probe["packets"][0]["flags"].startswith("K")  # starts on a keyframe
        assert float(probe["streams"][0]["start_time"]) == pytest.approx(0, abs=1e-3)


def test_copy_clips_of_open_gop_video_keep_the_frames_they_need(tmp_path):
    """Open GOP: frames shown just before a keyframe are decoded after it, so a
    clip ending there carries that keyframe too, and its end says so."""
    src = tmp_path / "open_gop.mp4"
    ffmpeg("-f", "lavfi", "-i", frame_number_filter(128, FPS, SECONDS), "-c:v", "libx264",
           # A 26-frame GOP leaves one B-frame before each keyframe, shown
           # before it but decoded after it.
           "-preset", "veryfast", "-crf", "12", "-g", "26", "-bf", "3",
           "-x264-params", "open-gop=1:scenecut=0:b-adapt=0", "-pix_fmt", "yuv420p", str(src))
    info = probe_video(src)
    tree = tree_for(info)
    recs = write_leaf_clips(info, tree, tmp_path / "clips", copy=True)
    keyframes = {round(t, 4) for t in info.keyframe_times}
    past = {round(t + 1 / FPS, 4) for t in info.keyframe_times}
    assert any(r["end"] in past and r["end"] not in keyframes for r in recs.values())
    for leaf in tree.ids(Level.LOW):
        node, rec = tree.node(leaf), recs[leaf]
        assert rec["start"] <= round(node.start, 4) and rec["end"] >= round(node.end, 4), leaf
        first, stop = tree.frame_at(rec["start"] + 1e-5), tree.frame_at(rec["end"] - 1e-5) + 1
        numbers, count, _ = decoded_numbers(rec["path"], every=False)
        assert (numbers, count) == ([first, stop - 1], stop - first), leaf


def test_second_call_reuses_clips_without_ffmpeg(videos, tmp_path, monkeypatch):
    info = probe_video(videos["mp4"])
    tree = tree_for(info)
    out = tmp_path / "clips"
    first = write_leaf_clips(info, tree, out)
    folder = out / info.video_id
    before = snapshot(folder)

    def no_ffmpeg(*args, **kwargs):
        raise AssertionError("ffmpeg must not run when the clips are already there")

    monkeypatch.setattr(clips_mod.subprocess, "run", no_ffmpeg)
    assert write_leaf_clips(info, tree, out) == first
    assert snapshot(folder) == before


def test_copy_flag_or_tree_change_rebuilds(videos, tmp_path):
    info = probe_video(videos["mp4"])
    out = tmp_path / "clips"
    folder = out / info.video_id
    exact = write_leaf_clips(info, tree_for(info), out)
    copied = write_leaf_clips(info, tree_for(info), out, copy=True)
    assert all(not r["exact"] for r in copied.values())
    assert json.loads((folder / MANIFEST).read_text())["copy"] is True
    assert copied != exact

    # Another tree (K=3): other leaves, so the folder is rebuilt with 27 clips.
    small = tree_for(info, k=3)
    recs = write_leaf_clips(info, small, out)
    assert len(recs) == 27
    assert len(list(folder.glob("*.mp4"))) == 27
    assert leftovers(out) == []


def test_broken_manifest_rebuilds(videos, tmp_path):
    info = probe_video(videos["mp4"])
    tree = tree_for(info)
    out = tmp_path / "clips"
    first = write_leaf_clips(info, tree, out)
    folder = out / info.video_id
    (folder / "1-1-1.mp4").unlink()
    assert write_leaf_clips(info, tree, out) == first
    assert (folder / "1-1-1.mp4").stat().st_size > 0


@pytest.mark.parametrize("copy", [False, True])
def test_failure_raises_video_error_and_leaves_no_temp_folder(videos, tmp_path, copy):
    src = tmp_path / "victim.mp4"
    shutil.copy(videos["mp4"], src)
    info = probe_video(src)
    tree = tree_for(info)
    src.write_bytes(b"this is no longer a video" * 100)
    out = tmp_path / "clips"
    with pytest.raises(VideoError) as err:
        write_leaf_clips(info, tree, out, copy=copy)
    assert err.value.path == info.path
    assert "\n" not in str(err.value)
    if not copy:
        assert "ffmpeg failed" in str(err.value)
    assert leftovers(out) == []
    assert not (out / info.video_id).exists()

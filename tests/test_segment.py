"""`lvr segment` end to end: real ffmpeg videos through the real CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from lvr.prep.frames import FrameStore
from lvr.prep.tree import node_count, tree_width
from lvr_test_helpers import LVR, run_lvr
from lvr_test_helpers import load_jsonl as load
from synthetic_media import ffmpeg, frame_number_filter, make_frame_number_video, read_frame_number


def by_video(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["video_id"], []).append(r)
    return out


def check_tree(records: list[dict], store: FrameStore) -> None:
    """The structural promises of one video's node records."""
    k = records[0]["K"]
    video = records[0]["video"]
    assert k == tree_width(video["duration"])
    assert len(records) == node_count(k)
    for level, depth in (("high", 1), ("medium", 2), ("low", 3)):
        nodes = [r for r in records if r["level"] == level]
        assert len(nodes) == k ** depth
        assert all(len(r["id"]) == depth and all(1 <= i <= k for i in r["id"]) for r in nodes)
        spans = [(r["start"], r["end"]) for r in nodes]
        assert spans[0][0] == 0.0
        assert spans[-1][1] == pytest.approx(video["duration"], abs=1e-3)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "spans must tile the video"
        ranges = [r["frame_range"] for r in nodes]
        assert ranges[0][0] == 0 and ranges[-1][1] == video["n_frames"]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for r in records:
        assert r["schema"] == "lvr.node/1"
        assert r["frame_times"], r["id"]
        assert all(r["start"] <= t < r["end"] for t in r["frame_times"]), r["id"]
        assert all(r["frame_range"][0] <= i < r["frame_range"][1] for i in r["frame_indices"])
        assert all(store.has(key) for key in r["frame_keys"])
        assert r["producer"]["tool"] == "lvr segment"


def check_frame_numbers(records: list[dict], store: FrameStore, rotate_back=None) -> int:
    """Every stored frame shows the number of the frame its record says it is."""
    checked = 0
    for r in records:
        for key, index in zip(r["frame_keys"] + r.get("qa_frame_keys", []),
                              r["frame_indices"] + r.get("qa_frame_indices", [])):
            img = store.image(key)
            if rotate_back is not None:
                img = img.transpose(rotate_back)
            assert read_frame_number(img) == index, (key, r["id"])
            checked += 1
    return checked


# -- correct trees ------------------------------------------------------------

def test_sample_media_give_correct_trees(media_files, tmp_path, cache_dir):
    import av

    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", *media_files, "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    videos = by_video(load(out))
    assert len(videos) == len(media_files)
    store = FrameStore(cache_dir / "frames")
    for records in videos.values():
        check_tree(records, store)
    first = {Path(r[0]["path"]).name: r[0] for r in videos.values()}
    # The AVI's first decoded frame has a pts above 0: times still start at 0 (check_tree).
    with av.open(str(next(p for p in media_files if p.suffix == ".avi"))) as container:
        assert next(container.decode(video=0)).pts > 0
    assert first["living_room_ntsc.mp4"]["video"]["fps"] == pytest.approx(30000 / 1001, abs=0.01)
    assert first["tablet_224x224.mp4"]["video"]["has_audio"] is False
    # The phone clip is stored landscape with a display matrix: records and frames are upright.
    phone = first["phone_portrait.mp4"]
    assert phone["video"]["rotation"] in (90, 270)
    assert phone["video"]["width"] < phone["video"]["height"]
    width, height = store.image(phone["frame_keys"][0]).size
    assert width < height
    # The MKV's embedded subtitle stream reaches the nodes it overlaps.
    talk = videos[first["talk_subtitled.mkv"]["video_id"]]
    assert {s["text"] for r in talk for s in r["subtitles"]} == {"The kettle is on.", "Tea will be ready soon."}


def test_sampled_frames_are_the_right_pictures(numbered_video, tmp_path, cache_dir):
    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", numbered_video, "--qa-frames", "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    records = load(out)
    store = FrameStore(cache_dir / "frames")
    check_tree(records, store)
    assert records[0]["video"]["has_audio"] is True
    leaves = [r for r in records if r["level"] == "low"]
    assert all(len(r["qa_frame_keys"]) == len(r["qa_frame_indices"]) > 0 for r in leaves)
    # 320 px wide source: high frames are downscaled to 256, others stay 320.
    assert {r["image_side"] for r in records} == {256, 320}
    assert Image.open(store.path(records[0]["frame_keys"][0])).size == (256, 144)
    assert check_frame_numbers(records, store) > 300


def test_twenty_minute_video(long_video, tmp_path, cache_dir):
    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", long_video, "-o", out, "--cache-dir", cache_dir, "-q")
    assert proc.returncode == 0, proc.stderr
    records = load(out)
    store = FrameStore(cache_dir / "frames")
    check_tree(records, store)
    assert records[0]["K"] == 4 and records[0]["video"]["n_frames"] == 6000
    high = [r for r in records if r["level"] == "high"]
    assert [len(r["frame_indices"]) for r in high] == [128] * 4
    assert all(len(r["frame_indices"]) == 32 for r in records if r["level"] == "low")
    assert check_frame_numbers(records, store) == sum(len(r["frame_keys"]) for r in records)


def test_rerun_decodes_nothing(numbered_video, tmp_path, cache_dir):
    first = run_lvr("segment", numbered_video, "-o", tmp_path / "a.jsonl", "--cache-dir", cache_dir)
    assert first.returncode == 0
    second = run_lvr("segment", numbered_video, "-o", tmp_path / "b.jsonl", "--cache-dir", cache_dir)
    assert second.returncode == 0
    assert "0 frames stored" in second.stderr
    assert load(tmp_path / "a.jsonl") == load(tmp_path / "b.jsonl")


# -- odd but valid inputs -------------------------------------------------------

def test_variable_frame_rate(video_dir, tmp_path, cache_dir):
    path = video_dir / "vfr.mp4"
    # 60 frames at 10 fps, then 60 at 25 fps.
    ffmpeg("-f", "lavfi", "-i",
           frame_number_filter(128, 10, 12) + ",setpts='if(lt(N\\,60)\\,N/10\\,6+(N-60)/25)/TB'",
           "-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12",
           "-pix_fmt", "yuv420p", str(path))
    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", path, "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    records = load(out)
    store = FrameStore(cache_dir / "frames")
    check_tree(records, store)
    assert records[0]["video"]["vfr"] is True
    assert records[0]["video"]["duration"] == pytest.approx(6 + 60 / 25, abs=0.05)
    # Times come from the real timestamps: frame 60 is at 6.0 s, frame 90 at 7.2 s.
    times = {i: t for r in records for i, t in zip(r["frame_indices"], r["frame_times"])}
    assert times[60] == pytest.approx(6.0, abs=1e-3) and times[90] == pytest.approx(7.2, abs=1e-3)
    check_frame_numbers(records, store)


def test_rotation_metadata_is_applied(video_dir, tmp_path, cache_dir):
    plain = make_frame_number_video(video_dir / "to_rotate.mp4", width=128, fps=10, duration=8)
    path = video_dir / "rotated.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", path, "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    records = load(out)
    store = FrameStore(cache_dir / "frames")
    check_tree(records, store)
    video = records[0]["video"]
    assert video["rotation"] in (90, 270)
    assert (video["width"], video["height"]) == (72, 128)  # portrait once upright
    img = store.image(records[0]["frame_keys"][3])
    assert img.height > img.width
    # Upright as ffmpeg itself shows it: compare with ffmpeg's autorotated frame.
    index = records[0]["frame_indices"][3]
    ref = tmp_path / "ref.png"
    ffmpeg("-i", str(path), "-vf", f"select=eq(n\\,{index})", "-frames:v", "1", str(ref))
    import numpy as np

    ours = np.asarray(img.convert("L"), dtype=np.float32)
    theirs = np.asarray(Image.open(ref).convert("L").resize(img.size), dtype=np.float32)
    assert np.abs(ours - theirs).mean() < 12
    undo = Image.Transpose.ROTATE_270 if video["rotation"] == 270 else Image.Transpose.ROTATE_90
    check_frame_numbers(records, store, rotate_back=undo)


def test_avi_without_audio(video_dir, tmp_path, cache_dir):
    path = video_dir / "numbered.avi"
    ffmpeg("-f", "lavfi", "-i", frame_number_filter(128, 10, 8), "-c:v", "mjpeg", "-q:v", "2", str(path))
    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", path, "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    records = load(out)
    store = FrameStore(cache_dir / "frames")
    check_tree(records, store)
    assert records[0]["video"]["has_audio"] is False
    check_frame_numbers(records, store)


# -- bad inputs ---------------------------------------------------------------------

def test_bad_inputs_are_named_and_the_batch_finishes(numbered_video, video_dir, tmp_path, cache_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = bad / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    empty = bad / "empty.mp4"
    empty.touch()
    truncated = bad / "truncated.mp4"  # moov at the end, cut off
    truncated.write_bytes(numbered_video.read_bytes()[: numbered_video.stat().st_size * 2 // 3])
    faststart = bad / "faststart.mp4"
    ffmpeg("-i", str(numbered_video), "-c", "copy", "-movflags", "+faststart", str(faststart))
    truncated_fs = bad / "truncated_faststart.mp4"  # index intact, media data cut off
    truncated_fs.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    faststart.unlink()
    audio = bad / "audio_only.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=3", "-c:a", "aac", str(audio))
    one_frame = bad / "one_frame.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-frames:v", "1",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(one_frame))
    short = bad / "short.mp4"  # 40 frames < K³ = 64
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=4",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(short))
    missing = bad / "missing.mp4"
    bad_inputs = [missing, text, truncated, truncated_fs, empty, audio, one_frame, short]

    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", *bad_inputs[:4], numbered_video, *bad_inputs[4:], "-o", out,
                   "--cache-dir", cache_dir)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == len(bad_inputs), proc.stderr
    for path in bad_inputs:
        assert sum(str(path) in line for line in errors) == 1, (path, errors)
    reasons = {Path(line.split("error: ", 1)[1].split(": ", 1)[0]).name: line for line in errors}
    assert "no such file" in reasons["missing.mp4"]
    assert "empty" in reasons["empty.mp4"]
    assert "no video stream" in reasons["audio_only.m4a"]
    assert "truncated" in reasons["truncated_faststart.mp4"]
    assert "too short" in reasons["one_frame.mp4"] and "too short" in reasons["short.mp4"]
    # The good video in the middle of the batch finished.
    records = load(out)
    assert len(by_video(records)) == 1 and len(records) == 84


def test_usage_errors_exit_2(numbered_video, tmp_path):
    assert run_lvr("segment").returncode == 2
    proc = run_lvr("segment", numbered_video, numbered_video, "--subtitles", tmp_path / "x.srt")
    assert proc.returncode == 2 and "one video" in proc.stderr
    assert run_lvr("segment", numbered_video, "--copy").returncode == 2


# -- output, resume, config ----------------------------------------------------------

def test_stdout_gets_records_and_stderr_gets_the_log(numbered_video, cache_dir):
    proc = run_lvr("segment", numbered_video, "--cache-dir", cache_dir)
    assert proc.returncode == 0
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 84
    assert "done:" in proc.stderr


def _numbered_batch(video_dir: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = video_dir / f"batch_{i}.mp4"
        if not path.exists():
            make_frame_number_video(path, width=96, fps=10 + i, duration=10)
        paths.append(path)
    return paths


def test_killed_run_resumes_without_duplicates(video_dir, tmp_path, cache_dir):
    videos = _numbered_batch(video_dir, 5)
    out = tmp_path / "nodes.jsonl"
    proc = subprocess.Popen([*LVR, "segment", *map(str, videos), "-o", str(out),
                             "--cache-dir", str(cache_dir), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = by_video(load(out))
    assert 1 <= len(partial) < 5, "the kill should land mid-batch"
    # Simulate the worst case too: a torn, half-written video at the end.
    whole = out.read_text()
    other = run_lvr("segment", videos[-1], "--cache-dir", cache_dir).stdout
    out.write_text(whole + other[: len(other) // 2])

    proc = run_lvr("segment", *videos, "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skip:") == len(partial)
    records = load(out)  # every line parses: no partial record
    videos_out = by_video(records)
    assert len(videos_out) == 5
    assert all(len(recs) == 84 for recs in videos_out.values())
    assert len(records) == 5 * 84


def test_config_file_sets_options_and_flags_override(numbered_video, tmp_path, cache_dir):
    cfg = tmp_path / "lvr.yaml"
    cfg.write_text("min_width: 3\nmax-width: 3\nsegment:\n  low_frames: 2\n")
    proc = run_lvr("segment", numbered_video, "--config", cfg, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records[0]["K"] == 3 and len(records) == node_count(3)
    assert all(len(r["frame_indices"]) <= 2 for r in records if r["level"] == "low")
    assert records[0]["producer"]["options"]["tree"]["low_frames"] == 2
    # A flag beats the file.
    proc = run_lvr("segment", numbered_video, "--config", cfg, "--max-width", "5", "--min-width", "4",
                   "--cache-dir", cache_dir)
    assert json.loads(proc.stdout.splitlines()[0])["K"] == 4
    # TOML works too; an unknown option in the command's table is a usage error.
    toml = tmp_path / "lvr.toml"
    toml.write_text("[segment]\nmin_width = 3\nmax_width = 3\n")
    proc = run_lvr("segment", numbered_video, "--config", toml, "--cache-dir", cache_dir)
    assert json.loads(proc.stdout.splitlines()[0])["K"] == 3
    toml.write_text("[segment]\nbogus = 1\n")
    proc = run_lvr("segment", numbered_video, "--config", toml, "--cache-dir", cache_dir)
    assert proc.returncode == 2 and "bogus" in proc.stderr


def test_sidecar_subtitles_reach_the_nodes(numbered_video, tmp_path, cache_dir):
    video = tmp_path / "talk.mp4"
    shutil.copy(numbered_video, video)
    (tmp_path / "talk.srt").write_text(
        "1\n00:00:01,000 --> 00:00:02,000\nHello <i>there</i>\n\n"
        "2\n00:00:09,500 --> 00:00:11,000\nGoodbye\n")
    out = tmp_path / "nodes.jsonl"
    assert run_lvr("segment", video, "-o", out, "--cache-dir", cache_dir).returncode == 0
    records = load(out)
    first = next(r for r in records if r["id"] == [1])
    assert [s["text"] for s in first["subtitles"]] == ["Hello there"]
    for r in records:
        for s in r["subtitles"]:
            assert s["start"] < r["end"] and s["end"] > r["start"]
    leaves_with_goodbye = [r for r in records if r["level"] == "low"
                           and any(s["text"] == "Goodbye" for s in r["subtitles"])]
    assert leaves_with_goodbye and all(r["end"] > 9.5 for r in leaves_with_goodbye)
    # --no-subtitles turns them off.
    proc = run_lvr("segment", video, "--no-subtitles", "--cache-dir", cache_dir)
    assert all(not json.loads(line)["subtitles"] for line in proc.stdout.splitlines())


def test_clips_are_written_and_recorded(numbered_video, tmp_path, cache_dir):
    out = tmp_path / "nodes.jsonl"
    clips = tmp_path / "clips"
    proc = run_lvr("segment", numbered_video, "-o", out, "--cache-dir", cache_dir, "--clips", clips)
    assert proc.returncode == 0, proc.stderr
    leaves = [r for r in load(out) if r["level"] == "low"]
    assert len(leaves) == 64
    for r in leaves:
        clip = r["clip"]
        assert Path(clip["path"]).is_file() and clip["exact"] is True
        assert (clip["start"], clip["end"]) == pytest.approx((r["start"], r["end"]), abs=1e-3)


def test_directories_and_globs_expand(video_dir, tmp_path, cache_dir):
    videos = _numbered_batch(video_dir, 2)
    folder = tmp_path / "nested" / "deeper"
    folder.mkdir(parents=True)
    shutil.copy(videos[0], folder / "a.mp4")
    (folder / "notes.txt").write_text("not a video, and not picked up from a folder")
    pattern = str(video_dir / "batch_1.mp*")  # quoted glob: lvr expands it
    proc = run_lvr("segment", tmp_path / "nested", pattern, str(tmp_path / "none_*.mp4"),
                   "--cache-dir", cache_dir, "-o", tmp_path / "n.jsonl")
    assert proc.returncode == 1  # the glob that matches nothing is named
    assert "none_*.mp4: pattern matches no files" in proc.stderr
    paths = {r["path"] for r in load(tmp_path / "n.jsonl")}
    assert paths == {str((folder / "a.mp4").resolve()), str(videos[1].resolve())}


def test_copy_clips_record_real_cut_points(numbered_video, tmp_path, cache_dir):
    out = tmp_path / "nodes.jsonl"
    proc = run_lvr("segment", numbered_video, "-o", out, "--cache-dir", cache_dir,
                   "--clips", tmp_path / "clips", "--copy")
    assert proc.returncode == 0, proc.stderr
    leaves = [r for r in load(out) if r["level"] == "low"]
    assert all(r["clip"]["exact"] is False for r in leaves)
    # Keyframe cuts cover the leaf, so they start at or before it and end at or after it.
    assert all(r["clip"]["start"] <= r["start"] + 1e-6 and r["clip"]["end"] >= r["end"] - 1e-6 for r in leaves)
    assert any(r["clip"]["start"] < r["start"] for r in leaves)  # a GOP is 25 frames: some cuts move

"""The lazy path (`ask`, `eval`, `synthesize`, `rl`): the tree from the probe alone, each node's
frames decoded the first time a reader needs them, byte for byte what `lvr segment` stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.prep.caption_store import STORE_FILENAME
from lvr.prep.frame_repair import FrameRepairError, read_node_frames
from lvr.prep.frames import FrameStore, parse_frame_key
from lvr.prep.probe import VideoError
from lvr.prep.segment import LAZY_FRAMES, SegmentOptions, check_first_level, load_or_plan, plan_video, segment_video
from lvr.prep.tree import Level, sample_indices
from lvr_test_helpers import load_jsonl, model_flags, run_lvr, scripted
from synthetic_media import make_frame_number_video, read_frame_number
from test_bad_frames import damage, expected_substitute, non_ref

OPTIONS = SegmentOptions(qa_frames=True)  # as the navigator plans its trees


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """12 s at 10 fps, 640x360 with B-frames (every level's side is a real resize); frame N shows N."""
    return make_frame_number_video(tmp_path_factory.mktemp("lazy") / "numbers.mp4", width=640)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The 128 px numbered video tests/test_bad_frames.py damages."""
    return make_frame_number_video(tmp_path_factory.mktemp("lazy_bad") / "clean.mp4", width=128)


def stored(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}


def frame_sets(record: dict) -> list[str]:
    return [prefix for prefix in ("", "qa_") if f"{prefix}frame_keys" in record]


def test_frames_decoded_on_demand_are_the_bytes_segment_stores(video, tmp_path):
    full = FrameStore(tmp_path / "full")
    segmented = segment_video(video, OPTIONS, full).records
    info, records = plan_video(video, OPTIONS)
    lazy = FrameStore(tmp_path / "lazy")
    assert not lazy.root.exists()  # planning decodes nothing
    assert all(r.pop(LAZY_FRAMES) for r in records) and records == segmented  # the same tree

    for rec in records:
        rec[LAZY_FRAMES] = True
        for prefix in frame_sets(rec):  # as a captioner and video_qa read them
            read_node_frames(lazy, rec, rec[f"{prefix}frame_keys"])
    keys = stored(full.root)
    assert stored(lazy.root) == keys and len({parse_frame_key(k)[2] for k in keys}) == 4  # 4 sizes
    for key in sorted(keys):
        assert lazy.get(key) == full.get(key), key
        assert read_frame_number(lazy.image(key)) == parse_frame_key(key)[1], key


def test_ask_decodes_only_the_nodes_it_visits(video, tmp_path):
    cache = tmp_path / "cache"

    def ask() -> int:
        with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
            proc = run_lvr("ask", video, "What is shown?", "-O", "A. one", "-O", "B. two",
                           *model_flags(server.url), "--cache-dir", cache)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == "B. two"
            return sum(1 for body in server.requests if body["model"] == "captioner")

    assert ask() == 6
    (tree_file,) = (cache / "trees").glob("*/*.jsonl")
    records = {tuple(r["id"]): r for r in load_jsonl(tree_file)}
    assert all(r[LAZY_FRAMES] for r in records.values())
    # The script reads the 4 high nodes, (2, 3) and (2, 3, 1), then asks video_qa about (2, 3, 1).
    expected = {k for node_id, r in records.items() if len(node_id) == 1 for k in r["frame_keys"]}
    expected |= set(records[(2, 3)]["frame_keys"]) | set(records[(2, 3, 1)]["frame_keys"])
    expected |= set(records[(2, 3, 1)]["qa_frame_keys"])
    assert stored(cache / "frames") == expected

    # Asked again with no captions kept, the same nodes' frames are read again: nothing is decoded.
    mtimes = {k: (cache / "frames" / k).stat().st_mtime_ns for k in expected}
    for f in cache.glob(STORE_FILENAME + "*"):
        f.unlink()
    assert ask() == 6
    assert {k: (cache / "frames" / k).stat().st_mtime_ns for k in stored(cache / "frames")} == mtimes


def test_a_bad_frame_is_replaced_within_its_node_when_the_node_is_read(clean, tmp_path):
    bad_frames = non_ref(clean, [5, 17, 51])
    bad = damage(clean, tmp_path / "damaged.mp4", bad_frames)
    info, records = plan_video(bad, OPTIONS)
    store = FrameStore(tmp_path / "frames")

    def wanted(rec: dict, prefix: str) -> list[int]:
        count = OPTIONS.tree.qa_frame_count if prefix else OPTIONS.tree.frames_per_node(Level(len(rec["id"])))
        return sample_indices(*rec["frame_range"], count)

    # Planned, nothing substituted yet: nothing has been decoded.
    assert all(rec[f"{p}frame_indices"] == wanted(rec, p) for rec in records for p in frame_sets(rec))
    substituted = set()
    for rec in records:
        start, stop = rec["frame_range"]
        for prefix in frame_sets(rec):
            frames = read_node_frames(store, rec, rec[f"{prefix}frame_keys"])
            pairs = rec[f"{prefix}substituted_frames"]
            sampled = wanted(rec, prefix)
            assert [w for w, _ in pairs] == [i for i in sampled if i in bad_frames], rec["id"]
            for w, u in pairs:
                assert u == expected_substitute(w, start, stop, sampled, set(bad_frames)), (rec["id"], w, u)
                substituted.add(w)
            # The record now names the frames shown, and the bytes read are pictures of them.
            assert rec[f"{prefix}frame_indices"] == sorted(dict(pairs).get(i, i) for i in sampled)
            assert [round(t * 10) for t in rec[f"{prefix}frame_times"]] == rec[f"{prefix}frame_indices"]
            assert [read_frame_number(store.image(k)) for k in rec[f"{prefix}frame_keys"]] \
                == rec[f"{prefix}frame_indices"]
            assert len(frames) == len(rec[f"{prefix}frame_keys"])
    assert substituted == set(bad_frames)


def test_a_node_with_nothing_decodable_fails_alone_naming_it(clean, tmp_path):
    dead_start = damage(clean, tmp_path / "dead_start.mp4", [0])  # the first group of pictures is lost
    cache = tmp_path / "cache"
    store = FrameStore(cache / "frames")
    # The share of bad frames is judged on what was decoded: the high nodes' frames, once read.
    records = {tuple(r["id"]): r for r in load_or_plan(dead_start, OPTIONS, cache)}
    high = [records[(h,)] for h in range(1, 5)]
    for rec in high:
        read_node_frames(store, rec, rec["frame_keys"])
    with pytest.raises(VideoError, match="sampled frames do not decode"):
        check_first_level(high)
    records = {tuple(r["id"]): r for r in load_or_plan(dead_start, SegmentOptions(qa_frames=True, max_bad_frames=1),
                                                       cache)}
    high = [records[(h,)] for h in range(1, 5)]
    for rec in high:
        read_node_frames(store, rec, rec["frame_keys"])
    check_first_level(high)  # allowed by this max_bad_frames
    assert [read_frame_number(store.image(k)) for k in records[(1,)]["frame_keys"]] \
        == records[(1,)]["frame_indices"]
    with pytest.raises(FrameRepairError, match=r"no frame of node \(1, 1\) \(0\.00-0\.80 s\) decodes"):
        read_node_frames(store, records[(1, 1)], records[(1, 1)]["frame_keys"])
    leaf = records[(4, 4, 4)]
    assert [read_frame_number(store.image(k)) for k in leaf["qa_frame_keys"]] == leaf["qa_frame_indices"]
    assert len(read_node_frames(store, leaf, leaf["qa_frame_keys"])) == len(leaf["qa_frame_keys"])


def test_a_segmented_cache_is_warm_for_ask(video, tmp_path):
    cache = tmp_path / "cache"
    proc = run_lvr("segment", video, "--qa-frames", "-o", tmp_path / "nodes.jsonl", "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr
    mtimes = {k: (cache / "frames" / k).stat().st_mtime_ns for k in stored(cache / "frames")}
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", video, "What is shown?", "-O", "A. one", "-O", "B. two",
                       *model_flags(server.url), "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr
    assert {k: (cache / "frames" / k).stat().st_mtime_ns for k in stored(cache / "frames")} == mtimes


def test_a_sidecar_added_after_the_first_plan_reaches_the_tree(video, tmp_path):
    """The tree cache is keyed by the subtitle files too: a later .srt is not hidden by the first plan."""
    import shutil

    copy = tmp_path / "talk.mp4"
    shutil.copy(video, copy)
    cache = tmp_path / "cache"
    assert not any(r["subtitles"] for r in load_or_plan(copy, OPTIONS, cache))
    copy.with_suffix(".srt").write_text("1\n00:00:01,000 --> 00:00:02,500\nHello there.\n")
    lines = [s["text"] for r in load_or_plan(copy, OPTIONS, cache) if r["level"] == "high" for s in r["subtitles"]]
    assert lines == ["Hello there."]
    assert len(list((cache / "trees").glob("*/*.jsonl"))) == 2

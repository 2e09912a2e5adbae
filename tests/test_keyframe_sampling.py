"""Keyframe sampling (`--frame-sampling keyframe`, ask's default) and the first level's overlap of
decoding with captioning: the picks, the records, the store, and what each command records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.infer.navigator import AskCallbacks, Navigator, NavigatorOptions
from lvr.prep.caption_store import CaptionStore
from lvr.prep.captioning import Captioner
from lvr.prep.frame_repair import read_node_frames
from lvr.prep.frames import FrameRequest, FrameStore, extract_frames, extract_frames_at, parse_frame_key
from lvr.prep.keyframe_snap import snap_to_keyframes, tolerance_for
from lvr.prep.models import ModelSpec
from lvr.prep.probe import probe_video
from lvr.prep.segment import SegmentOptions, plan_video, segment_video
from lvr.prep.tree import Level, Tree, TreeOptions
from lvr_test_helpers import load_jsonl, model_flags, run_lvr, scripted
from synthetic_media import make_frame_number_video, read_frame_number

KEYFRAME = SegmentOptions(qa_frames=True, tree=TreeOptions(frame_sampling="keyframe", keyframe_tolerance=1.25))


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory) -> Path:
    """40 s at 10 fps with B-frames and a keyframe every 2.5 s; frame N shows N."""
    return make_frame_number_video(tmp_path_factory.mktemp("kf") / "gop.mp4", width=256, duration=40,
                                   extra_args=("-sc_threshold", "0"))


@pytest.fixture(scope="module")
def sparse_video(tmp_path_factory) -> Path:
    """40 s at 10 fps whose only keyframe is the first frame (a screen recording's shape)."""
    return make_frame_number_video(tmp_path_factory.mktemp("kf") / "sparse.mp4", width=256, duration=40,
                                   extra_args=("-g", "1000", "-sc_threshold", "0"))


def exact_samples(info, node: dict) -> list[int]:
    tree = Tree(node["K"], info.frame_times, info.duration)
    return tree.sampled_frames(tuple(node["id"]), KEYFRAME.tree)


def check_picks(info, records: list[dict], store: FrameStore) -> int:
    """Every picked frame is within the node's tolerance of a sampled time and every sampled time has
    a pick within it; the records hold the real indices and times; the pixels show those indices.
    Returns how many picks were keyframes."""
    keyframes = set(info.keyframe_indices)
    on_keyframes = 0
    for rec in records:
        if rec["level"] == "low":
            assert "frame_sampling" not in rec and rec["frame_indices"] == exact_samples(info, rec)
            continue
        sampled = exact_samples(info, rec)
        tol = tolerance_for(sampled, info.frame_times, KEYFRAME.tree.keyframe_tolerance)
        picks = rec["frame_indices"]
        assert picks == sorted(set(picks)) and len(picks) <= len(sampled)          # distinct, in time order
        assert all(rec["frame_range"][0] <= i < rec["frame_range"][1] for i in picks)  # inside the node
        times = info.frame_times
        assert all(min(abs(times[i] - times[s]) for s in sampled) <= tol + 1e-6 for i in picks)
        assert all(min(abs(times[i] - times[s]) for i in picks) <= tol + 1e-6 for s in sampled)
        # The rule: the nearest keyframe of the node when one is within the tolerance, else the frame itself.
        node_keys = [k for k in keyframes if rec["frame_range"][0] <= k < rec["frame_range"][1]]
        expected = set()
        for s_ in sampled:
            near = [k for k in node_keys if abs(times[k] - times[s_]) <= tol]
            expected.add(min(near, key=lambda k: abs(times[k] - times[s_])) if near else s_)
        assert set(picks) == expected
        assert rec["frame_times"] == [round(float(times[i]), 4) for i in picks]
        assert rec["frame_sampling"]["mode"] == "keyframe" and rec["frame_sampling"]["asked"] == len(sampled)
        assert rec["frame_sampling"]["max_offset"] <= tol + 1e-6
        on_keyframes += sum(1 for i in picks if i in keyframes)
        frames = read_node_frames(store, rec, rec["frame_keys"])
        assert len(frames) == len(picks)
        for key, i in zip(rec["frame_keys"], picks):
            assert parse_frame_key(key)[1] == i and read_frame_number(store.image(key)) == i
    return on_keyframes


def test_keyframe_picks_lie_within_tolerance_and_records_hold_them(gop_video, tmp_path):
    info, records = plan_video(gop_video, KEYFRAME)
    store = FrameStore(tmp_path / "frames")
    upper = [r for r in records if r["level"] != "low"]
    picks = sum(len(r["frame_indices"]) for r in upper)
    # A keyframe every 2.5 s and a 1.25 s tolerance: high nodes show only keyframes, medium nodes
    # (2.5 s each) a keyframe where one is close and exact frames elsewhere.
    assert check_picks(info, records, store) < picks
    for rec in (r for r in records if r["level"] == "high"):
        # All keyframes but near the node's end, where the nearest keyframe belongs to the next node.
        inner = [i for i in rec["frame_indices"] if info.frame_times[i] < rec["end"] - 1.25]
        assert set(inner) <= set(info.keyframe_indices)
        assert len(rec["frame_indices"]) < KEYFRAME.tree.high_frames


def test_sparse_keyframes_fall_back_to_the_sampled_frames(sparse_video, tmp_path):
    info, records = plan_video(sparse_video, KEYFRAME)
    assert info.keyframe_indices == [0]
    store = FrameStore(tmp_path / "frames")
    check_picks(info, records, store)
    for rec in records:
        if rec["level"] != "low" and rec["frame_range"][0] > 50:  # far from the one keyframe
            assert rec["frame_indices"] == exact_samples(info, rec)


def test_segment_in_keyframe_mode_stores_the_same_bytes_as_on_demand(gop_video, tmp_path):
    """`lvr segment --frame-sampling keyframe` and the lazy path agree byte for byte, like exact mode."""
    full = FrameStore(tmp_path / "full")
    segmented = segment_video(gop_video, KEYFRAME, full).records
    _, records = plan_video(gop_video, KEYFRAME)
    lazy = FrameStore(tmp_path / "lazy")
    for rec in records:
        for prefix in ("", "qa_"):
            if f"{prefix}frame_keys" in rec:
                read_node_frames(lazy, rec, rec[f"{prefix}frame_keys"])
    keys = {p.relative_to(full.root).as_posix() for p in full.root.rglob("*.jpg")}
    assert keys == {p.relative_to(lazy.root).as_posix() for p in lazy.root.rglob("*.jpg")}
    assert all(full.get(k) == lazy.get(k) for k in keys)
    assert [r["frame_indices"] for r in segmented] == [r["frame_indices"] for r in records]


def test_snapping_prefers_the_nearest_keyframe_and_never_leaves_the_node():
    times = [i / 10 for i in range(200)]          # 20 s at 10 fps
    keyframes = [0, 50, 100, 150]                 # every 5 s
    snapped = snap_to_keyframes([60, 70, 80, 95, 120], times, keyframes, (60, 130), 2.0)
    # 60, 70 -> no keyframe of the node within 2 s (50 is outside it): themselves; 80 -> itself
    # (100 is 2.0 s away: within); 95 and 120 -> 100.
    assert snapped.indices == [60, 70, 100] and snapped.keyframes == 1
    assert snapped.max_offset == pytest.approx(2.0)


def test_captions_of_keyframe_and_exact_nodes_never_mix(gop_video, tmp_path):
    _, exact = plan_video(gop_video, SegmentOptions(qa_frames=True))
    _, fast = plan_video(gop_video, KEYFRAME)
    store = CaptionStore(tmp_path / "captions.sqlite")
    try:
        captioner = Captioner(ModelSpec(backend="openai", model="m", base_urls=("http://127.0.0.1:9/v1",)).build(),
                              store, FrameStore(tmp_path / "frames"))
        for a, b in zip(exact, fast):
            if a["level"] == "low":
                assert captioner.key_for(a) == captioner.key_for(b)  # the same frames: shared
            else:
                assert captioner.key_for(a).digest() != captioner.key_for(b).digest()
    finally:
        store.close()


def test_ask_defaults_to_keyframe_and_eval_records_exact(gop_video, tmp_path):
    cache = tmp_path / "cache"
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"video": gop_video.name, "question": "What is shown?",
                                     "options": ["A. one", "B. two"], "answer": "B"}) + "\n")
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        asked = run_lvr("ask", gop_video, "What is shown?", "-O", "A. one", "-O", "B. two",
                        *model_flags(server.url), "--cache-dir", cache, "--trace", tmp_path / "t.jsonl")
        assert asked.returncode == 0, asked.stderr
        evaluated = run_lvr("eval", questions, "--video-dir", gop_video.parent, *model_flags(server.url),
                            "--cache-dir", cache, "-o", tmp_path / "r.jsonl")
        assert evaluated.returncode == 0, evaluated.stderr
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert trace["settings"]["tree"]["frame_sampling"] == "keyframe"
    # The trace names the frames each model was shown, and how far they moved.
    shown = {tuple(n["id"]): n for n in trace["tree"] if n["caption"] is not None}
    assert {(1,), (2,), (3,), (4,), (2, 3), (2, 3, 1)} <= set(shown)
    assert all(n["frame_sampling"]["mode"] == "keyframe" for i, n in shown.items() if len(i) < 3)
    assert "frame_sampling" not in shown[(2, 3, 1)] and shown[(2, 3, 1)]["qa_frame_indices"]
    offsets = [n["frame_sampling"]["max_offset"] for i, n in shown.items() if len(i) < 3]
    assert trace["accounting"]["frame_offset_max_seconds"] == max(offsets) > 0
    (result,) = load_jsonl(tmp_path / "r.jsonl")
    assert result["settings"]["tree"]["frame_sampling"] == "exact"
    assert result["accounting"]["frame_offset_max_seconds"] is None
    trees = sorted((cache / "trees").glob("*/*.jsonl"))
    assert len(trees) == 2   # one tree per sampling mode
    modes = {json.dumps(load_jsonl(t)[0].get("frame_sampling", {}).get("mode")) for t in trees}
    assert modes == {'"keyframe"', "null"}


def test_first_high_node_is_captioned_before_the_last_is_decoded(gop_video, tmp_path):
    """Decoding the first level runs node after node, and each node's caption request goes out as
    soon as its own frames are in. A slow decoder (each stored frame is reported to a callback that
    takes its time) makes the order plain: when the first caption request arrives, the last high
    node's frames are not all in the store yet."""
    cache = tmp_path / "cache"
    frames = FrameStore(cache / "frames")
    seen: list[int] = []                 # for each caption request: high nodes whose frames were all in

    def reply(body: dict) -> str:
        if body["model"] == "captioner":
            nodes = [r for r in plan if r["level"] == "high"]
            seen.append(sum(1 for r in nodes if all(frames.has(k) for k in r["frame_keys"])))
        return scripted(body)

    _, plan = plan_video(gop_video, SegmentOptions(qa_frames=True, tree=TreeOptions(frame_sampling="exact")))

    def slow_decoder(n: int) -> None:
        import time
        time.sleep(0.01 * n)

    async def run(url: str):
        spec = {"backend": "openai", "base_urls": (url,)}
        nav = NavigatorOptions(reasoning=ModelSpec(model="navigator", **spec),
                               caption=ModelSpec(model="captioner", **spec), qa=ModelSpec(model="qa", **spec))
        navigator = Navigator(nav, cache)
        try:
            return await navigator.ask(gop_video, "What is shown?", ("A. one", "B. two"),
                                       callbacks=AskCallbacks(on_frames=slow_decoder))
        finally:
            await navigator.aclose()

    with FakeOpenAI(reply, models=("navigator", "captioner", "qa")) as server:
        asked = asyncio.run(run(server.url))
    assert asked.error is None and asked.result.answer is not None
    k = plan[0]["K"]
    assert len(seen) >= k and seen[0] < k   # the first caption request came before the last node was in


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_span_decoding_stores_the_bytes_of_one_pass(gop_video, tmp_path, workers):
    """Keyframes alone, frames deep in a group of pictures (B-frames skipped around them) and runs of
    neighbours, spread over the video so several workers share them: the bytes one full pass stores."""
    info = probe_video(gop_video)
    keyframes = info.keyframe_indices
    wanted = sorted({*keyframes[::2], *(k + 13 for k in keyframes[1::3]), *range(200, 212), info.n_frames - 1})
    requests = [FrameRequest(i, 128) for i in wanted]
    one_pass, spans = FrameStore(tmp_path / "pass"), FrameStore(tmp_path / f"spans{workers}")
    assert not extract_frames(info, requests, one_pass).missing
    stats = extract_frames_at(info, requests, spans, workers=workers)
    assert stats.written == len(wanted) and not stats.missing
    for i in wanted:
        key = f"{info.video_id}/128/{i:08d}.jpg"
        assert spans.get(key) == one_pass.get(key), i
        assert read_frame_number(spans.image(key)) == i
    assert stats.frames_decoded < info.n_frames   # seeking, and skipping, decoded less than everything


def test_ask_reuses_stored_exact_captions_instead_of_sampling_keyframes(gop_video, tmp_path):
    """A video that went through `lvr segment` and `lvr caption` is answered from those captions:
    ask's keyframe default gives way, so the first level costs no decoding and no captioning."""
    cache = tmp_path / "cache"
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("segment", gop_video, "-o", tmp_path / "nodes.jsonl", "--cache-dir", cache)
        assert proc.returncode == 0, proc.stderr
        proc = run_lvr("caption", tmp_path / "nodes.jsonl", "--base-url", server.url, "--model", "captioner",
                       "--cache-dir", cache, "-o", tmp_path / "captions.jsonl")
        assert proc.returncode == 0, proc.stderr
        before = len(server.requests)
        proc = run_lvr("ask", gop_video, "What is shown?", "-O", "A. one", "-O", "B. two",
                       *model_flags(server.url), "--cache-dir", cache, "--trace", tmp_path / "t.jsonl")
        assert proc.returncode == 0, proc.stderr
        asked = [b["model"] for b in server.requests[before:]]
    assert "captioner" not in asked                  # every caption it read was stored
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert trace["settings"]["tree"]["frame_sampling"] == "keyframe"   # what was asked for
    assert trace["accounting"]["frame_sampling"] == "exact"            # what was used, and why
    assert trace["accounting"]["caption_calls"]["made"] == 0

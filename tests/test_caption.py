"""`lvr caption` end to end against an OpenAI-compatible test server."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import subprocess
import time

from PIL import Image

from fake_openai import FakeOpenAI
from lvr.prep.captioning import build_caption_messages, frame_subtitles, parse_caption
from lvr_test_helpers import LVR, caption_reply, fresh_cache, run_lvr
from lvr_test_helpers import load_jsonl as load

SECRET = "sk-test-SECRET-do-not-leak-1234567890"


def test_caption_end_to_end_sends_what_it_should(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    out = tmp_path / "captions.jsonl"
    with FakeOpenAI(reply=caption_reply) as server:
        proc = run_lvr("caption", nodes, "-o", out, "--cache-dir", cache, "--base-url", server.url,
                       "--model", "fake-model", "--api-key", SECRET, "--concurrency", "4")
        assert proc.returncode == 0, proc.stderr
        requests, headers = list(server.requests), list(server.headers)
    node_recs = load(nodes)
    records = load(out)
    assert len(records) == len(node_recs) == 84
    assert all(r["schema"] == "lvr.caption/1" and r["caption"].startswith("Clip starting [") for r in records)
    assert all(r["model"] == "fake-model" and len(r["prompt_hash"]) == 16 for r in records)
    assert sum(r["tokens"]["prompt_tokens"] for r in records) > 0
    assert len(requests) == 84
    by_first_time = {}
    for body in requests:
        parts = body["messages"][1]["content"]
        labels = [p["text"] for p in parts if p["type"] == "text" and p["text"].startswith("[")]
        images = [p for p in parts if p["type"] == "image_url"]
        assert len(labels) == len(images) > 0
        by_first_time.setdefault(labels[0], []).append((body, labels, images))
    for node in node_recs:
        # Find the request for this node by its frame count and first timestamp.
        matches = [m for key, ms in by_first_time.items() for m in ms
                   if len(m[2]) == len(node["frame_keys"]) and m[1][0].startswith("[" + _fmt(node["frame_times"][0]))]
        assert matches, node["id"]
        body, labels, images = matches[0]
        img = Image.open(io.BytesIO(base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1])))
        img.load()
        assert img.format == "JPEG" and max(img.size) == node["image_side"]
        words = "200" if node["level"] == "low" else "400"
        assert f"about {words} words" in body["messages"][1]["content"][-1]["text"]
    # Subtitles ride along with the frame they are on screen for.
    sub_labels = [lab for ms in by_first_time.values() for m in ms for lab in m[1] if "Subtitles:" in lab]
    assert sub_labels and all("Welcome to the kitchen" in lab for lab in sub_labels)
    # The key went in the Authorization header and nowhere else.
    assert all(h.get("authorization") == f"Bearer {SECRET}" for h in headers)
    assert SECRET not in proc.stdout + proc.stderr + out.read_text()
    assert SECRET.encode() not in (cache / "captions.sqlite3").read_bytes()


def _fmt(t: float) -> str:
    m, s = divmod(t, 60)
    return f"{int(m):02d}:{s:04.1f}"


def test_rerun_makes_no_request_and_store_is_shared(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    out = tmp_path / "captions.jsonl"
    with FakeOpenAI(reply=caption_reply) as server:
        args = ("--cache-dir", cache, "--base-url", server.url, "--model", "fake-model")
        assert run_lvr("caption", nodes, "-o", out, *args, "--levels", "high,medium").returncode == 0
        assert len(server.requests) == 20
        # Same output: nothing to do. New output: all from the store.
        proc = run_lvr("caption", nodes, "-o", out, *args, "--levels", "high", "--levels", "medium")
        assert proc.returncode == 0 and "20 already in the output" in proc.stderr
        proc = run_lvr("caption", nodes, "-o", tmp_path / "other.jsonl", *args, "--levels", "high")
        assert proc.returncode == 0 and "4 from the store" in proc.stderr
        assert len(server.requests) == 20
        # stdin input and stdout output chain like a pipeline.
        proc = run_lvr("caption", "-", *args, "--levels", "low", "-q", input=nodes.read_text())
        assert proc.returncode == 0
        assert len([json.loads(x) for x in proc.stdout.splitlines()]) == 64
        assert len(server.requests) == 84
    assert len(load(out)) == 20


def test_faults_end_in_captions_or_a_named_failure(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    with FakeOpenAI(reply=caption_reply) as server:
        server.faults.extend([("status", 500), ("status", 500), ("status", 429, {"Retry-After": "1"}),
                              ("close",), ("hang", 3.0)])
        out = tmp_path / "a.jsonl"
        proc = run_lvr("caption", nodes, "-o", out, "--cache-dir", cache, "--base-url", server.url,
                       "--model", "fake-model", "--levels", "high", "--timeout", "1", "--concurrency", "1")
        assert proc.returncode == 0, proc.stderr
        assert len(load(out)) == 4
        # No retries left: one node fails with its name; the rest finish.
        server.faults.append(("status", 500))
        out = tmp_path / "b.jsonl"
        proc = run_lvr("caption", nodes, "-o", out, "--cache-dir", cache, "--base-url", server.url,
                       "--model", "fake-model", "--levels", "medium", "--max-retries", "0",
                       "--concurrency", "1")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "talk.mp4 node (" in errors[0] and "500" in errors[0]
    assert len(load(out)) == 15


def test_killed_batch_resumes_without_repeating_finished_nodes(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    out = tmp_path / "captions.jsonl"
    with FakeOpenAI(reply=caption_reply, latency_s=0.05) as server:
        args = [*LVR, "caption", str(nodes), "-o", str(out), "--cache-dir", str(cache),
                "--base-url", server.url, "--model", "fake-model", "--concurrency", "2", "-q"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 10):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = {tuple(r["id"]) for r in load(out)}
        assert 10 <= len(finished) < 84
        first_run = len(server.requests)
        rerun = run_lvr(*args[3:])
        assert rerun.returncode == 0, rerun.stderr
        second = server.requests[first_run:]
    records = load(out)
    assert len(records) == 84 and len({tuple(r["id"]) for r in records}) == 84
    # Nodes finished before the kill were not asked for again.
    node_key = {tuple(r["id"]): (f"[{_fmt(r['frame_times'][0])}]", len(r["frame_keys"])) for r in load(nodes)}
    asked_again = {request_key(body) for body in second}
    assert not {node_key[i] for i in finished} & asked_again
    assert len(second) <= 84 - len(finished) + 2  # at most the two requests in flight were repeated


def request_key(body: dict) -> tuple[str, int]:
    """(first timestamp label, image count): which node a request was for."""
    parts = body["messages"][1]["content"]
    first = next(p["text"] for p in parts if p["type"] == "text" and p["text"].startswith("["))
    return first.split("]")[0] + "]", sum(p["type"] == "image_url" for p in parts)


def test_bad_input_lines_are_named(segmented, tmp_path):
    nodes, _ = segmented
    cache = fresh_cache(segmented, tmp_path)
    lines = nodes.read_text().splitlines()[:3]
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps({"schema": "lvr.node/1", "video_id": "x"}) + "\n" + lines[1] + "\n")
    with FakeOpenAI(reply=caption_reply) as server:
        proc = run_lvr("caption", bad, "--cache-dir", cache, "--base-url", server.url, "--model", "fake-model")
    assert proc.returncode == 1
    assert re.search(r"mixed.jsonl:2: node record lacks", proc.stderr)
    assert len(proc.stdout.splitlines()) == 2
    # A missing --model is a usage error.
    assert run_lvr("caption", bad, "--cache-dir", cache, "--base-url", "http://127.0.0.1:9/v1").returncode == 2


# -- prompt pieces, no server -----------------------------------------------------

def test_parse_caption_takes_tags_or_the_whole_reply():
    assert parse_caption("x <caption> A cat. </caption> y") == "A cat."
    assert parse_caption("<think>hmm <caption>no</caption></think>A dog sits.") == "A dog sits."
    assert parse_caption("<caption>cut off mid") == "cut off mid"
    assert parse_caption("  plain reply ") == "plain reply"


def test_subtitles_are_attached_to_the_first_frame_they_overlap():
    node = {"level": "low", "start": 0.0, "end": 4.0, "frame_times": [0.0, 1.0, 2.0, 3.0],
            "subtitles": [{"start": 0.5, "end": 2.5, "text": "hello"}, {"start": 3.5, "end": 9, "text": "bye"}]}
    assert frame_subtitles(node) == [["hello"], [], [], ["bye"]]
    messages = build_caption_messages(node, [b"j0", b"j1", b"j2", b"j3"], "SYS")
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["text"] + ["text", "image"] * 4 + ["text"]
    assert parts[1]["text"] == "[00:00.0] Subtitles: hello" and parts[2]["jpeg"] == b"j0"
    assert "about 200 words" in parts[-1]["text"]
    no_subs = build_caption_messages(node, [b"j0", b"j1", b"j2", b"j3"], "SYS", use_subtitles=False)
    assert "Subtitles" not in json.dumps([p.get("text", "") for p in no_subs[1]["content"]])


# -- in process: a tiny Qwen2.5-VL through the transformers backend ------------------

def test_tiny_qwen_vl_captions_a_real_clip(street_clip, tmp_path):
    import asyncio

    from tiny_models import build_tiny_qwen_vl

    from lvr.prep.caption_store import CaptionStore
    from lvr.prep.captioning import CaptionOptions, Captioner
    from lvr.prep.frames import FrameStore
    from lvr.prep.models.transformers_backend import TransformersChat

    clip = street_clip
    cache = tmp_path / "cache"
    proc = run_lvr("segment", clip, "--cache-dir", cache, "-q", "--low-frames", "3")
    assert proc.returncode == 0, proc.stderr
    node = next(json.loads(x) for x in proc.stdout.splitlines() if json.loads(x)["level"] == "low")
    node["subtitles"] = [{"start": node["start"], "end": node["end"], "text": "a line of dialogue"}]

    chat = TransformersChat(str(build_tiny_qwen_vl(tmp_path / "tiny-vl")), device="cpu")
    seen = []
    chat.inspect = seen.append
    store = CaptionStore(cache / "captions.sqlite3")
    # A random model: sample a few tokens so it says something, not just end-of-text.
    captioner = Captioner(chat, store, FrameStore(cache / "frames"),
                          CaptionOptions(max_tokens_low=8, temperature=1.0))
    result = asyncio.run(captioner.get_or_make(node))
    assert result.cached is False and result.usage.completion_tokens > 0
    assert len(seen) == 1
    inputs, text, images = seen[0]["inputs"], seen[0]["text"], seen[0]["images"]
    # The model got exactly the node's sampled frames, as pictures of the stored size.
    assert len(images) == len(node["frame_keys"]) == inputs["image_grid_thw"].shape[0]
    stored = [FrameStore(cache / "frames").image(k) for k in node["frame_keys"]]
    assert [im.size for im in images] == [im.size for im in stored]
    # The prompt it saw holds each frame's timestamp and the subtitle line.
    for t in node["frame_times"]:
        assert f"[{_fmt(t)}]" in text
    assert "a line of dialogue" in text and "about 200 words" in text
    assert text.count("<|vision_start|>") == len(images)
    # A second call is served from the store.
    assert asyncio.run(captioner.get_or_make(node)).cached is True
    store.close()

"""`lvr ask` end to end: a scripted navigator, a captioner and a video_qa model behind a test server."""

from __future__ import annotations

import base64
import io
import json
import socket
from pathlib import Path

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr.infer.protocol import Breach, correction, tool_result_message
from lvr_test_helpers import ASK_SCRIPT as SCRIPT
from lvr_test_helpers import ASK_SECRET as SECRET
from lvr_test_helpers import (QA_REPLY, caption_text, chromium_or_skip, model_flags, open_in_chromium,
                              run_lvr, scripted, tree_boxes)


def split(server: FakeOpenAI) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"navigator": [], "captioner": [], "qa": []}
    for body in server.requests:
        out[body["model"]].append(body)
    return out


@pytest.fixture(scope="module")
def clip(street_clip) -> Path:
    return street_clip


def test_scripted_navigation_end_to_end(clip, tmp_path):
    cache = tmp_path / "cache"
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", clip, "What is the person holding?", "-O", "A. a phone", "-O", "B. a cup",
                       *model_flags(server.url), "--cache-dir", cache, "--trace", tmp_path / "t.jsonl",
                       "-o", tmp_path / "answer.jsonl", "--html", tmp_path / "t.html")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "B. a cup"
        calls = split(server)

    # Only the visited nodes were captioned: the 4 high ones for the first prompt, then (2,3) and (2,3,1).
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    nodes = {tuple(n["id"]): n for n in trace["tree"]}
    assert len(nodes) == 4 + 16 + 64
    captioned = sorted(tuple(n["id"]) for n in trace["tree"] if n["caption"] is not None)
    assert captioned == [(1,), (2,), (2, 3), (2, 3, 1), (3,), (4,)]
    assert len(calls["captioner"]) == 6
    spans = sorted(caption_text(b) for b in calls["captioner"])
    assert spans == sorted(f"A {n['level']} clip from {_t(n['start'])} to {_t(n['end'])}."
                           for i, n in nodes.items() if i in captioned)

    # The exact tool results the navigator received, in order.
    nav = calls["navigator"]
    assert len(nav) == 4
    med, low = nodes[(2, 3)], nodes[(2, 3, 1)]
    expected = [
        f"get_caption: caption of medium clip (2, 3), {_t(med['start'])}-{_t(med['end'])}:\n"
        f"A medium clip from {_t(med['start'])} to {_t(med['end'])}.",
        f"get_caption: caption of low clip (2, 3, 1), {_t(low['start'])}-{_t(low['end'])}:\n"
        f"A low clip from {_t(low['start'])} to {_t(low['end'])}.",
        f"video_qa on low clip (2, 3, 1), {_t(low['start'])}-{_t(low['end'])}. "
        f"Question: What is in the hands?\nAnswer:\n{QA_REPLY}",
    ]
    assert [m["content"] for m in nav[3]["messages"][3::2]] == expected
    assert expected[0] == tool_result_message("get_caption", (2, 3), med["start"], med["end"],
                                              f"A medium clip from {_t(med['start'])} to {_t(med['end'])}.")
    # The first prompt holds the question, options, duration and the 4 high captions with spans.
    first = nav[0]["messages"][1]["content"]
    assert first.startswith("Question: What is the person holding?\nOptions:\nA. a phone\nB. a cup\n")
    for h in range(1, 5):
        n = nodes[(h,)]
        assert f"Clip ({h},), {_t(n['start'])}-{_t(n['end'])}:\nA high clip from" in first
    assert "4 high-level clips" in nav[0]["messages"][0]["content"]
    assert nav[0]["stop"] == ["</tool>", "</answer>"]

    # video_qa got 16 frames of the leaf (all of them here: a short clip's leaf has fewer),
    # decodable and at full size (the clip is smaller than 1024 px).
    (qa,) = calls["qa"]
    images = [p for p in qa["messages"][1]["content"] if p["type"] == "image_url"]
    (tree_file,) = (cache / "trees").glob("*/*.jsonl")
    leaf = next(r for r in map(json.loads, tree_file.read_text().splitlines()) if r["id"] == [2, 3, 1])
    assert len(images) == min(16, leaf["frame_range"][1] - leaf["frame_range"][0]) == len(leaf["qa_frame_keys"])
    first_image = Image.open(io.BytesIO(base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1])))
    assert max(first_image.size) == 640
    assert qa["messages"][1]["content"][-1]["text"] == "Question: What is in the hands?"

    # The accounting numbers.
    acc = trace["accounting"]
    assert acc["rounds"] == 4 and acc["invalid_turns"] == 0
    assert acc["caption_calls"] == {"made": 6, "cached": 0, "total": 6}
    assert acc["get_caption_calls"] == 2 and acc["video_qa_calls"] == 1
    assert acc["exhaustive_captions"] == 84
    assert acc["models"]["reasoning"]["requests"] == 4
    assert acc["models"]["reasoning"]["completion_tokens"] == sum(len(s.split()) for s in SCRIPT)
    assert acc["models"]["caption"]["requests"] == 6
    assert acc["models"]["qa"]["requests"] == 1
    assert acc["models"]["qa"]["completion_tokens"] == len(QA_REPLY.split())
    assert [(v["tool"], v["node"]) for v in trace["visits"]] == [
        ("get_caption", [2, 3]), ("get_caption", [2, 3, 1]), ("video_qa", [2, 3, 1])]
    assert trace["answer"] == {"text": "B", "choice": "B", "interval": None} and trace["stopped"] == "answered"
    record = json.loads((tmp_path / "answer.jsonl").read_text())
    assert record["schema"] == "lvr.answer/1" and record["choice"] == "B"
    assert record["settings"]["max_rounds"] == 30 and record["settings"]["subtitles"] is True
    assert "6 made, 0 from the store" in proc.stderr

    # The key is sent but never shown.
    for text in (proc.stdout, proc.stderr, (tmp_path / "t.jsonl").read_text(),
                 (tmp_path / "answer.jsonl").read_text()):
        assert SECRET not in text
    assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.headers)

    # A second question about the same video makes no caption request for stored nodes.
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as again:
        proc = run_lvr("ask", clip, "And what happens next?", *model_flags(again.url), "--cache-dir", cache,
                       "--trace", tmp_path / "t2.jsonl", "-q")
        assert proc.returncode == 0, proc.stderr
        calls2 = split(again)
    assert calls2["captioner"] == []
    acc2 = json.loads((tmp_path / "t2.jsonl").read_text())["accounting"]
    assert acc2["caption_calls"] == {"made": 0, "cached": 6, "total": 6}
    assert proc.stdout.strip() == "B"


def _t(seconds: float) -> str:
    from lvr.prep.captioning import format_time

    return format_time(seconds)


BREACHES = [
    ("<think>x</think><tool>get_caption(2, 3)</tool>", Breach.MALFORMED_CALL),
    ("<think>x</think><tool>get_caption((2, 9))</tool>", Breach.OUT_OF_RANGE),
    ('<think>x</think><tool>video_qa((1, 1, 1), "what?")</tool>', Breach.QA_BEFORE_CAPTION),
    ("<think>x</think><tool>get_caption((1, 2))</tool><tool>get_caption((1, 3))</tool>", Breach.TWO_ACTIONS),
    ("<tool>get_caption((1, 2))</tool>", Breach.NO_THINK),
    ("<think>x</think><tool>search((1, 2))</tool>", Breach.UNKNOWN_TOOL),
    ("<think>x</think><tool>get_caption(__import__('os').system('touch pwned'))</tool>", Breach.CODE_IN_ARGUMENTS),
]


def test_every_breach_is_corrected_and_the_run_goes_on(clip, tmp_path):
    """Each rule breach gets its corrective message; the model then answers."""
    script = [text for text, _ in BREACHES] + ["<think>done</think><answer>A</answer>"]

    def reply(body: dict) -> str:
        if body["model"] == "captioner":
            return f"<caption>{caption_text(body)}</caption>"
        turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
        return script[turns]

    with FakeOpenAI(reply, models=("navigator", "captioner")) as server:
        # --max-invalid 0 would stop at the first breach; these come in a row, so allow them all.
        proc = run_lvr("ask", clip, "Q?", "--base-url", server.url, "--model", "navigator",
                       "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", "--max-invalid", "9",
                       "--trace", tmp_path / "t.jsonl", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        nav = [b for b in server.requests if b["model"] == "navigator"]
    assert not (tmp_path / "pwned").exists()
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert [t["action"]["error"] for t in trace["turns"]] == [code for _, code in BREACHES] + [None]
    corrections = [m["content"] for m in nav[-1]["messages"][3::2]]
    assert len(corrections) == len(BREACHES)
    assert corrections[1] == correction(Breach.OUT_OF_RANGE, node="(2, 9)", K=4)
    assert corrections[2] == correction(Breach.QA_BEFORE_CAPTION, node="(1, 1, 1)")
    assert "no <think></think>" in corrections[4]
    assert "no tool called search" in corrections[5]
    assert "never run" in corrections[6]
    assert trace["visits"] == [] and trace["answer"]["choice"] is None  # open question: no options
    assert trace["answer"]["text"] == "A"


def test_too_many_invalid_turns_stop_cleanly(clip, tmp_path):
    with FakeOpenAI(lambda b: "<caption>c</caption>" if b["model"] == "captioner" else "gibberish",
                    models=("navigator", "captioner")) as server:
        proc = run_lvr("ask", clip, "Q?", "--base-url", server.url, "--model", "navigator",
                       "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", "--max-invalid", "2",
                       "--trace", tmp_path / "t.jsonl")
        nav = [b for b in server.requests if b["model"] == "navigator"]
    assert proc.returncode == 1
    assert "more than 2 invalid turns in a row" in proc.stderr
    assert len(nav) == 3
    assert json.loads((tmp_path / "t.jsonl").read_text())["stopped"] == "invalid"


def test_last_round_demands_an_answer(clip, tmp_path):
    def reply(body):
        if body["model"] == "captioner":
            return "<caption>c</caption>"
        return "<think>more</think><tool>get_caption((1, 1))</tool>"

    with FakeOpenAI(reply, models=("navigator", "captioner")) as server:
        proc = run_lvr("ask", clip, "Q?", "--base-url", server.url, "--model", "navigator",
                       "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", "--max-rounds", "3")
        nav = [b for b in server.requests if b["model"] == "navigator"]
    assert proc.returncode == 1 and "no answer within 3 rounds" in proc.stderr
    assert len(nav) == 3
    assert nav[2]["messages"][-1]["content"].endswith("give your final answer now, inside <answer></answer>.")
    assert "<answer>" not in nav[1]["messages"][-1]["content"]


def test_unreachable_endpoint_is_one_line_naming_the_url(clip, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    proc = run_lvr("ask", clip, "Q?", "--base-url", url, "--model", "m", "--cache-dir", tmp_path / "cache",
                   "--timeout", "2", "--api-key", SECRET)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "cannot reach" in lines[0]
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr


def test_bad_video_is_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with FakeOpenAI("x", models=("navigator",)) as server:
        proc = run_lvr("ask", bad, "Q?", "--base-url", server.url, "--model", "navigator",
                       "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_ask_help_shows_examples():
    proc = run_lvr("ask", "--help")
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "lvr ask movie.mp4" in proc.stdout


def test_ask_html_page_in_headless_chromium(clip, tmp_path):
    """The page `lvr ask --html` writes, opened offline in a real browser, shows the visited path."""
    exe = chromium_or_skip()
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", clip, "What is the person holding?", *model_flags(server.url),
                       "--cache-dir", tmp_path / "cache", "--html", tmp_path / "t.html", "-q")
    assert proc.returncode == 0, proc.stderr
    page = open_in_chromium(exe, tmp_path / "t.html", tmp_path)
    assert next(a for t, a in page.tags if t == "body").get("data-ready") == "1"
    boxes = tree_boxes(page)
    assert len(boxes) == 84
    visited = {i: a["data-order"] for i, a in boxes.items() if "visited" in a["class"].split()}
    assert visited == {"2-3": "1", "2-3-1": "2 3"}
    assert "qa" in boxes["2-3-1"]["class"].split()
    turns = [a for t, a in page.tags if t == "section" and "turn" in a.get("class", "").split()]
    assert [a["data-round"] for a in turns] == ["1", "2", "3", "4"]
    thumbs = [a for t, a in page.tags if t == "img"]
    assert thumbs and all(a["src"].startswith("data:image/jpeg;base64,") for a in thumbs)


def test_ask_with_tiny_in_process_models_ends_cleanly(clip, tmp_path):
    """Real transformers backends on random tiny models: garbage output, still a clean end within the rounds."""
    from tiny_models import build_tiny_qwen3, build_tiny_qwen_vl

    navigator = build_tiny_qwen3(tmp_path / "tiny-qwen3")
    vision = build_tiny_qwen_vl(tmp_path / "tiny-vl")
    proc = run_lvr("ask", clip, "What is the person holding?", "-O", "A. a phone", "-O", "B. a cup",
                   "--backend", "transformers", "--model", navigator, "--caption-model", vision, "--device", "cpu",
                   "--max-rounds", "3", "--max-tokens", "12", "--caption-max-tokens", "6",
                   # Random weights: sample, so the models say something rather than stop at once.
                   "--temperature", "1", "--caption-temperature", "1", "--seed", "0",
                   "--high-frames", "2", "--medium-frames", "2", "--low-frames", "2", "--caption-side", "140",
                   "--qa-side", "140", "--cache-dir", tmp_path / "cache", "--trace", tmp_path / "t.jsonl",
                   timeout=600)
    assert "Traceback" not in proc.stderr
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    assert trace["error"] is None, trace["error"]
    assert 1 <= trace["accounting"]["rounds"] <= 3
    assert trace["stopped"] in ("answered", "max_rounds", "invalid")
    assert proc.returncode == (0 if trace["stopped"] == "answered" else 1), proc.stderr
    models = trace["accounting"]["models"]
    assert models["reasoning"]["requests"] == trace["accounting"]["rounds"]
    assert models["caption"]["requests"] == 4 and models["caption"]["completion_tokens"] > 0
    # Each turn got its correction or result back, with the last one told to answer.
    nav_msgs = trace["messages"]
    assert nav_msgs[0]["role"] == "system" and "4 high-level clips" in nav_msgs[0]["content"]
    if trace["stopped"] == "max_rounds":
        assert nav_msgs[-2]["content"].endswith("inside <answer></answer>.")

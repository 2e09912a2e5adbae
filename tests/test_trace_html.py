"""Trace pages: self-contained, escaped, the tree drawn right; checked again in headless Chromium."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from lvr.infer.trace_html import render_trace_html, write_trace_html
from lvr.prep.frames import FrameStore, frame_key
from lvr_test_helpers import PageElements, chromium_or_skip, open_in_chromium, parse_page, tree_boxes

VID = "0123456789abcdef"
K = 2
DURATION = 100.0
VISITED = (255, 140, 0)  # .node.visited background in the page's CSS
QA = (123, 47, 247)      # .node.qa inset border
EVIL_CAPTION = "<script>window.pwned=1;document.documentElement.setAttribute('data-pwned','caption')</script>"
EVIL_TEXT = ("I will look. <img src=x onerror=\"window.pwned=1;"
             "document.documentElement.setAttribute('data-pwned','img')\"> <answer>B</answer>")
EVIL_SPAN = "<img src=x onerror=span>"
COLOURS = {(1,): (0, 160, 0), (2,): (0, 0, 200), (1, 2): (200, 0, 0), (1, 2, 1): (0, 180, 180)}


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 36), rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tree() -> list[dict]:
    nodes = []

    def add(nid, start, end):
        level = ("high", "medium", "low")[len(nid) - 1]
        index = int((start + end) / 2 * 10)  # middle frame at a pretend 10 fps: distinct per node
        node = {"id": list(nid), "level": level, "start": start, "end": end,
                "thumb_key": frame_key(VID, index, 512), "caption": None}
        nodes.append(node)
        if len(nid) < 3:
            step = (end - start) / K
            for c in range(K):
                add(nid + (c + 1,), start + c * step, start + (c + 1) * step)

    for h in range(K):
        add((h + 1,), h * DURATION / K, (h + 1) * DURATION / K)
    for n in nodes:
        if n["level"] == "high":
            n["caption"] = f"High node {n['id']}: a street & some cars."
    byid = {tuple(n["id"]): n for n in nodes}
    byid[(1, 2)]["caption"] = "A man walks to a red car."
    byid[(1, 2, 1)]["caption"] = EVIL_CAPTION
    return nodes


def make_trace() -> dict:
    tree = _tree()
    byid = {tuple(n["id"]): n for n in tree}
    span = lambda nid: (byid[nid]["start"], byid[nid]["end"])  # noqa: E731
    turns = [
        {"round": 1, "text": "<think>The car is probably in (1,2).</think><tool>get_caption((1, 2))</tool>",
         "think": "The car is probably in (1,2).",
         "action": {"kind": "tool", "tool": "get_caption", "node": [1, 2], "query": None,
                    "call": "get_caption((1, 2))", "answer": None, "error": None},
         "result": "get_caption((1, 2)) [0:25.0–0:50.0]: A man walks to a red car."},
        {"round": 2, "text": "<think>Zoom in.</think><tool>get_caption((1, 2, 1))</tool>",
         "think": "Zoom in.",
         "action": {"kind": "tool", "tool": "get_caption", "node": [1, 2, 1], "query": None,
                    "call": "get_caption((1, 2, 1))", "answer": None, "error": None},
         "result": f"get_caption((1, 2, 1)): {EVIL_CAPTION}"},
        {"round": 3, "text": "<think>Check the colour.</think><tool>video_qa((1, 2, 1), \"colour <b>?\")</tool>",
         "think": "Check the colour & be sure </details> closes nothing.",
         "action": {"kind": "tool", "tool": "video_qa", "node": [1, 2, 1], "query": "colour <b>?",
                    "call": "video_qa((1, 2, 1), \"colour <b>?\")", "answer": None, "error": None},
         "result": "The car is red."},
        {"round": 4, "text": EVIL_TEXT, "think": None,
         "action": {"kind": "invalid", "tool": None, "node": None, "query": None, "call": None,
                    "answer": None, "error": "no_think"},
         "result": "Your reply must start with <think>...</think>."},
        {"round": 5, "text": "<think>It is red.</think><answer>B</answer>", "think": "It is red.",
         "action": {"kind": "answer", "tool": None, "node": None, "query": None, "call": None,
                    "answer": "B", "error": None},
         "result": None},
    ]
    visits = [
        {"order": 1, "tool": "get_caption", "node": [1, 2], "start": span((1, 2))[0], "end": span((1, 2))[1],
         "cached": False},
        {"order": 2, "tool": "get_caption", "node": [1, 2, 1], "start": span((1, 2, 1))[0],
         "end": span((1, 2, 1))[1], "cached": True},
        {"order": 3, "tool": "video_qa", "node": [1, 2, 1], "start": span((1, 2, 1))[0],
         "end": span((1, 2, 1))[1], "cached": False},
    ]
    return {
        "schema": "lvr.trace/1",
        "video": {"video_id": VID, "path": "/videos/<street>.mp4", "duration": DURATION, "K": K},
        "question": "What colour is the car? <b>bold?</b>",
        "options": ["A. blue", "B. red", "C. green", "D. <i>none</i>"],
        "answer": {"text": "B", "choice": "B"},
        "correct_answer": "B", "correct": True,
        "stopped": "answered",
        "tree": tree, "turns": turns, "visits": visits,
        "accounting": {"rounds": 5, "invalid_turns": 1, "caption_calls": {"made": 1, "cached": 1},
                       "video_qa_calls": 1,
                       "models": {"reasoning": {"model": "navigator<8b>", "prompt_tokens": 5120,
                                                "completion_tokens": 410, "requests": 5, "seconds": 3.2},
                                  "caption": {"model": "qwen-vl", "prompt_tokens": 900, "completion_tokens": 120,
                                              "requests": 1, "seconds": 1.5},
                                  "qa": {"model": "qwen-vl", "prompt_tokens": 700, "completion_tokens": 9,
                                         "requests": 1, "seconds": 0.8}}},
        "settings": {"base_url": "http://127.0.0.1:8000/v1", "max_rounds": 30, "note": "<script>x</script>"},
    }


@pytest.fixture
def store(tmp_path) -> FrameStore:
    fs = FrameStore(tmp_path / "frames")
    tree = {tuple(n["id"]): n for n in _tree()}
    for nid, rgb in COLOURS.items():
        fs.put(tree[nid]["thumb_key"], _jpeg(rgb))
    return fs


def check_tree(p: PageElements) -> None:
    boxes = tree_boxes(p)
    assert len(boxes) == K + K**2 + K**3
    for h in range(1, K + 1):
        assert boxes[f"{h}"]["class"].split()[:2] == ["node", "level-high"]
        for m in range(1, K + 1):
            assert "level-medium" in boxes[f"{h}-{m}"]["class"].split()
            for leaf in range(1, K + 1):
                assert "level-low" in boxes[f"{h}-{m}-{leaf}"]["class"].split()
    visited = {i: a for i, a in boxes.items() if "visited" in a["class"].split()}
    in_order = sorted(visited, key=lambda i: int(visited[i]["data-order"].split()[0]))
    assert in_order == ["1-2", "1-2-1"]
    assert boxes["1-2"]["class"] == "node level-medium visited"
    assert boxes["1-2"]["data-order"] == "1"
    assert boxes["1-2-1"]["class"] == "node level-low visited qa"
    assert boxes["1-2-1"]["data-order"] == "2 3"
    assert all(a["data-order"] == "" for i, a in boxes.items() if i not in visited)
    # Boxes sit where their spans are: (1,2) covers 25%..50% of the video.
    assert re.search(r"left:25(\.0+)?%;width:25(\.0+)?%", boxes["1-2"]["style"])
    assert re.search(r"left:25(\.0+)?%;width:12\.50*%", boxes["1-2-1"]["style"])
    assert "(1, 2, 1)" in boxes["1-2-1"]["title"] and "0:25.0–0:37.5" in boxes["1-2-1"]["title"]


def test_page_is_self_contained_escaped_and_draws_the_tree(store):
    trace = make_trace()
    page = render_trace_html(trace, store)
    p = parse_page(page)

    # Nothing points outside the page.
    for tag, attrs in p.tags:
        for name in ("src", "href", "action", "poster", "srcset", "data"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, name, value[:60])
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:|//)", page, re.I)
    assert "@import" not in page
    assert "http://127.0.0.1:8000/v1" in page  # the settings value, shown as text only

    # Untrusted text arrives as text.
    assert "<script>window.pwned" not in page
    assert "&lt;script&gt;window.pwned=1;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=" in page
    assert "<b>bold?</b>" not in page and "&lt;b&gt;bold?&lt;/b&gt;" in page
    assert "<i>none</i>" not in page
    assert len(p.scripts) == 1 and "pwned" not in p.scripts[0]
    assert not any(k.startswith("on") for _, a in p.tags for k in a)
    assert [a.get("src", "") for t, a in p.tags if t == "img"] and \
        all(a["src"].startswith("data:image/jpeg;base64,") for t, a in p.tags if t == "img")

    check_tree(p)

    turns = [a for t, a in p.tags if t == "section" and "turn" in a.get("class", "").split()]
    assert [a["data-round"] for a in turns] == ["1", "2", "3", "4", "5"]
    assert [a.get("data-node") for a in turns] == ["1-2", "1-2-1", "1-2-1", None, None]
    assert "kind-invalid" in turns[3]["class"] and "no_think" in page
    assert page.count('<details class="think"') == 4

    # Thumbnails are the stored bytes; (1,2) then (1,2,1) twice.
    uris = [a["src"] for t, a in p.tags if t == "img"]
    tree = {tuple(n["id"]): n for n in trace["tree"]}
    assert [base64.b64decode(u.split(",", 1)[1]) for u in uris] == [
        store.get(tree[(1, 2)]["thumb_key"]), store.get(tree[(1, 2, 1)]["thumb_key"]),
        store.get(tree[(1, 2, 1)]["thumb_key"])]

    answer = re.search(r'<div id="answer"[^>]*>(.*?)</div>', page, re.S)
    assert answer and "B" in answer.group(1) and "correct" in answer.group(0)
    for needle in ("5120", "410", "navigator&lt;8b&gt;", "video_qa calls", "answered", "/videos/&lt;street&gt;.mp4"):
        assert needle in page, needle


def test_missing_frames_and_no_store_give_placeholders(store, tmp_path):
    trace = make_trace()
    tree = {tuple(n["id"]): n for n in trace["tree"]}
    tree[(1, 2)]["thumb_key"] = frame_key(VID, 99999, 512)   # not in the store
    tree[(1, 2, 1)]["thumb_key"] = "../../etc/passwd"         # not a store key at all
    page = render_trace_html(trace, store)
    assert "<img" not in page and page.count('class="missing"') == 3
    page = render_trace_html(make_trace(), None)
    assert "<img" not in page and page.count('class="missing"') == 3
    check_tree(parse_page(page))


def test_degenerate_traces_render():
    for trace in ({}, {"turns": None, "tree": "x", "visits": [None, 3]}, {"video": {"duration": "nan"}},
                  {"turns": [{"action": None}, {"round": "7", "action": {"kind": "weird", "node": ["a"]}}]}):
        page = render_trace_html(trace, None)
        assert page.startswith("<!DOCTYPE html>") and 'id="answer"' in page
    # Without a tree, the visited nodes are still drawn from the visits.
    trace = make_trace()
    del trace["tree"]
    boxes = tree_boxes(parse_page(render_trace_html(trace, None)))
    assert set(boxes) == {"1-2", "1-2-1"} and boxes["1-2-1"]["data-order"] == "2 3"


def test_grounding_trace_draws_the_answered_and_target_spans():
    trace = make_trace()
    trace.update(task="grounding", options=[], targets=[[20, 40], [90.5, 100], [EVIL_SPAN, 3], [5, 1], "x", [-1, 2]])
    trace["answer"] = {"text": "[25, 37.5]", "choice": None, "interval": [25.0, 37.5]}
    page = render_trace_html(trace, None)
    p = parse_page(page)
    bands = {a["id"]: a for t, a in p.tags if "span" in a.get("class", "").split()}
    assert list(bands) == ["span-predicted", "span-target-1", "span-target-2"]  # unusable targets are left out
    assert bands["span-predicted"]["class"] == "span predicted"
    assert (bands["span-predicted"]["data-start"], bands["span-predicted"]["data-end"]) == ("25.0", "37.5")
    assert bands["span-target-1"]["class"] == bands["span-target-2"]["class"] == "span target"
    # Each band sits at its interval's share of the duration (100 s), like the node boxes.
    assert bands["span-predicted"]["style"] == "left:25.0000%;width:12.5000%"
    assert bands["span-target-1"]["style"] == "left:20.0000%;width:20.0000%"
    assert bands["span-target-2"]["style"] == "left:90.5000%;width:9.5000%"
    assert bands["span-predicted"]["title"] == "answer [25, 37.5]: 0:25.0–0:37.5"
    assert "0:25.0–0:37.5</span>" in page and "answered span" in page and "target span" in page
    assert "onerror=span" not in page   # not a number: never drawn, not even as text
    check_tree(p)

    # A question answered by ground-then-answer draws the span its grounding stage found.
    trace.update(task="qa", strategy="ground-then-answer", targets=[],
                 answer={"text": "B", "choice": "B", "interval": [25.0, 37.5]})
    bands = [a for t, a in parse_page(render_trace_html(trace, None)).tags if "span" in a.get("class", "").split()]
    assert [(a["id"], a["style"]) for a in bands] == [("span-predicted", "left:25.0000%;width:12.5000%")]
    trace["strategy"] = "navigate"

    # Only a grounding trace draws spans, and only a usable interval.
    for task, interval in (("qa", [25.0, 37.5]), ("grounding", None), ("grounding", [EVIL_SPAN, 2]),
                           ("grounding", [30, 20]), ("grounding", [float("nan"), 2])):
        trace.update(task=task, targets=[], answer={"text": "x", "choice": None, "interval": interval})
        page = render_trace_html(trace, None)
        assert 'class="span' not in page and "onerror=span" not in page, (task, interval)


def test_write_is_atomic(store, tmp_path):
    out = tmp_path / "sub" / "trace.html"
    write_trace_html(out, make_trace(), store)
    assert out.read_text(encoding="utf-8") == render_trace_html(make_trace(), store)
    assert [p.name for p in out.parent.iterdir()] == ["trace.html"]


# --- the real browser ---------------------------------------------------------------

def test_page_in_headless_chromium(store, tmp_path):
    exe = chromium_or_skip()
    page_path = tmp_path / "trace.html"
    write_trace_html(page_path, make_trace(), store)
    shot = tmp_path / "trace.png"
    p = open_in_chromium(exe, page_path, tmp_path, screenshot=shot, window="1280,2000")
    html_attrs = next(a for t, a in p.tags if t == "html")
    body = next(a for t, a in p.tags if t == "body")
    assert body.get("data-ready") == "1", "the page's own script did not run"
    assert "data-pwned" not in html_attrs and "data-pwned" not in body
    assert len(p.scripts) == 1 and "pwned" not in p.scripts[0]
    assert not [a for t, a in p.tags if t == "img" and not a.get("src", "").startswith("data:")]
    assert not any(k.startswith("on") for _, a in p.tags for k in a)
    check_tree(p)

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
    assert rgb.size == (1280, 2000)
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, "screenshot is (nearly) one colour"

    def count(target, tol=12):
        return sum(n for n, c in colours if all(abs(a - b) <= tol for a, b in zip(c, target)))

    assert count(VISITED) > 300, "visited-node highlight not visible"
    assert count(QA) > 50, "video_qa marking not visible"
    # The embedded thumbnail of (1,2) shows up (solid red JPEG).
    assert count(COLOURS[(1, 2)], tol=20) > 1000, "thumbnail not drawn"

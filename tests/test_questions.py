"""`lvr questions` end to end: segment -> caption -> questions -> synthesize, and the filters.

The video is the numbered test video (frame N shows N in binary). Every leaf of its
tree stands for a card with a known word and colour: the scripted captioner reads the
frame numbers off the pictures it is sent and captions each leaf with that leaf's card,
so captions really follow the video's content. Two leaves ("twins") get near-duplicate
captions. A scripted LLM writes questions from what it is shown and answers the filter
prompts from the captions it is given, like a careful model would; it plants three bad
questions: one about the card's colour (shared with other leaves), one answerable from
general knowledge, and one whose distractor is taken from the anchor's twin.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr.train import question_prompts as qp
from lvr_test_helpers import LVR, run_lvr
from synthetic_media import read_frame_number


SYLLABLES = ["ba", "de", "fi", "ko", "lu", "ma", "ne", "po"]
WORD_LIST = [a + b for a in SYLLABLES for b in SYLLABLES]            # 64 made-up words
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
NUMBERS = ["three", "four", "five", "six"]
VOCAB = set(WORD_LIST) | set(COLOURS) | set(NUMBERS)

TWIN_A, TWIN_B = (1, 3, 1), (4, 2, 3)
NONSPECIFIC = (1, 1, 2)     # the writer asks for the card's colour: seven other leaves share it
LEAK = (2, 2, 2)            # the writer asks what two plus two is


def load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def fid(node_id) -> str:
    return "(" + ", ".join(map(str, node_id)) + ")"


# -- the world: what each leaf shows ------------------------------------------------------------

class World:
    def __init__(self, nodes: list[dict]):
        self.leaves = sorted(tuple(n["id"]) for n in nodes if n["level"] == "low")
        self.leaf_of_frame = {}
        for n in nodes:
            if n["level"] == "low":
                a, b = n["frame_range"]
                for f in range(a, b):
                    self.leaf_of_frame[f] = tuple(n["id"])
        self.word = {leaf: WORD_LIST[i] for i, leaf in enumerate(self.leaves)}
        self.colour = {leaf: COLOURS[i % len(COLOURS)] for i, leaf in enumerate(self.leaves)}
        self.leaf_of_word = {w: leaf for leaf, w in self.word.items()}

    def leaf_caption(self, leaf) -> str:
        if leaf in (TWIN_A, TWIN_B):
            return (f"A grey card rests on a wooden table beside an open window while rain streaks the glass and "
                    f"a cat sleeps on a cushion; the card shows the word {self.word[leaf]} in black letters.")
        return f"A {self.colour[leaf]} card fills the screen and shows the word {self.word[leaf]} in black letters."


def frames_in(body: dict) -> list[int]:
    out = []
    for part in body["messages"][1]["content"]:
        if part.get("type") == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            out.append(read_frame_number(Image.open(io.BytesIO(data))))
    return out


def captioner(world: World, body: dict) -> str:
    intro = body["messages"][1]["content"][0]["text"]
    leaves = list(dict.fromkeys(world.leaf_of_frame[f] for f in frames_in(body)))
    if "low-level clip" in intro:
        assert len(leaves) == 1, leaves
        return f"<caption>{world.leaf_caption(leaves[0])}</caption>"
    return ("<caption>Cards with these words appear one after another: "
            + ", ".join(world.word[leaf] for leaf in leaves) + ".</caption>")


# -- the scripted LLM ------------------------------------------------------------------------------

_CLIP_RE = re.compile(r"Clip \((\d+), (\d+), (\d+)\), [^\n]*:\n([^\n]*)")


def _clips(text: str) -> list[tuple[tuple[int, ...], str]]:
    return [((int(a), int(b), int(c)), cap) for a, b, c, cap in _CLIP_RE.findall(text)]


def _word_in(caption: str) -> str:
    return next(w for w in re.findall(r"[a-z]+", caption) if w in WORD_LIST)


def write_question(world: World, text: str) -> dict:
    anchor_part, _, other_part = text.partition("OTHER clips")
    anchor_part = anchor_part[anchor_part.index("ANCHOR"):]
    anchors = _clips(anchor_part)
    others = _clips(other_part)
    src = [{"text": _word_in(cap), "from_clip": fid(leaf)} for leaf, cap in others]
    if "MULTI-SEGMENT" in text:
        ws = [_word_in(cap) for _, cap in anchors]
        join = ", then ".join
        wrong = [join(ws[::-1]), join(ws[:-1] + [src[0]["text"]]), join([src[1]["text"]] + ws[1:])]
        return {"question": "In what order do these words appear on the cards?", "answer": join(ws),
                "distractors": [{"text": w, "from_clip": None} for w in wrong]}
    ((leaf, cap),) = anchors
    if leaf == NONSPECIFIC:
        others_c = [c for c in COLOURS if c != world.colour[leaf]][:3]
        return {"question": "What colour is the card that fills the screen?", "answer": world.colour[leaf],
                "distractors": [{"text": c, "from_clip": None} for c in others_c]}
    if leaf == LEAK:
        return {"question": "What is two plus two?", "answer": "four",
                "distractors": ["three", "five", "six"]}
    if leaf == TWIN_A:  # takes a distractor from its own near-duplicate
        src[0] = {"text": world.word[TWIN_B], "from_clip": list(TWIN_B)}
    colour = "grey" if leaf in (TWIN_A, TWIN_B) else world.colour[leaf]
    return {"question": f"Which word does the {colour} card show?", "answer": world.word[leaf],
            "distractors": src[:3]}


def answer_from(captions: str, options: list[str]) -> str:
    """Pick the one option whose known words all occur in the captions, in that order; else none."""
    stream = re.findall(r"[a-z]+", captions.lower())
    supported = []
    for opt in options:
        letter, body = opt.split(". ", 1)
        rel = [t for t in re.findall(r"[a-z]+", body.lower()) if t in VOCAB]
        pos, ok = -1, bool(rel)
        for t in rel:
            try:
                pos = stream.index(t, pos + 1)
            except ValueError:
                ok = False
                break
        if ok:
            supported.append(letter)
    return supported[0] if len(supported) == 1 else "none"


def _options(text: str) -> list[str]:
    return re.findall(r"^[A-D]\. .*$", text.split("Options:", 1)[1], flags=re.M)


class LLM:
    """Plays the captioner and the question model; counts requests by kind."""

    def __init__(self, world: World, *, malformed: int = 0, fenced: bool = True):
        self.world = world
        self.malformed = malformed     # writer replies that are prose, not JSON, before a good one
        self.fenced = fenced
        self.kinds: list[str] = []

    def __call__(self, body: dict) -> str:
        if body["model"] == "captioner":
            return captioner(self.world, body)
        system = body["messages"][0]["content"]
        user = body["messages"][1]["content"]
        if system == qp.WRITER_SYSTEM:
            self.kinds.append("write")
            if self.malformed:
                self.malformed -= 1
                return "Sure! Here is a great question about the card: which word does it show?"
            reply = json.dumps(write_question(self.world, user))
            return f"<think>Let me see.</think>```json\n{reply}\n```" if self.fenced else reply
        if system == qp.ANSWER_SYSTEM:
            self.kinds.append("answer")
            captions = user.split("Question:", 1)[0]
            return json.dumps({"answer": answer_from(captions, _options(user))})
        if system == qp.BLIND_SYSTEM:
            self.kinds.append("blind")
            opts = _options(user)
            if "two plus two" in user:
                return json.dumps({"answer": next(o[0] for o in opts if o.endswith("four"))})
            return json.dumps({"answer": "none"})
        raise AssertionError(f"unexpected request: {system[:80]}")


# -- fixtures ------------------------------------------------------------------------------------------

def segment_and_caption(numbered_video: Path, root: Path, make_world=World):
    """videos/numbers.mp4 under `root`, segmented by `lvr segment` and captioned by the scripted
    captioner: (captions file, cache, world)."""
    (root / "videos").mkdir()
    video = root / "videos" / "numbers.mp4"
    shutil.copy(numbered_video, video)
    cache = root / "cache"
    proc = run_lvr("segment", video, "-o", root / "nodes.jsonl", "--cache-dir", cache, "-q")
    assert proc.returncode == 0, proc.stderr
    world = make_world(load(root / "nodes.jsonl"))
    assert len(world.leaves) == 64
    with FakeOpenAI(lambda body: captioner(world, body), models=("captioner",)) as server:
        proc = run_lvr("caption", root / "nodes.jsonl", "--model", "captioner", "--base-url", server.url,
                       "--cache-dir", cache, "-o", root / "captions.jsonl", "-q")
    assert proc.returncode == 0, proc.stderr
    return root / "captions.jsonl", cache, world


@pytest.fixture(scope="module")
def captioned(numbered_video, tmp_path_factory):
    """videos/numbers.mp4 segmented and captioned: (root, captions file, cache, world)."""
    root = tmp_path_factory.mktemp("questions")
    return (root, *segment_and_caption(numbered_video, root))


def questions(url: str, captions: Path, out: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return run_lvr("questions", captions, "--model", "writer", "--base-url", url, "-o", out, *extra, **kw)


def leaf_spans(captions: Path) -> dict:
    return {tuple(r["id"]): [r["start"], r["end"]] for r in load(captions) if r["level"] == "low"}


# -- Done when: questions end to end -----------------------------------------------------------------

def test_questions_end_to_end_then_synthesize(captioned, tmp_path):
    root, captions, cache, world = captioned
    out, rejected = tmp_path / "qa.jsonl", tmp_path / "rejected.jsonl"
    llm = LLM(world)
    with FakeOpenAI(llm, models=("writer", "captioner")) as server:
        proc = questions(server.url, captions, out, "--per-video", "6", "--rejected", rejected, "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    recs = load(out)
    assert sorted(r["category"] for r in recs) == ["multi"] * 3 + ["single"] * 3
    spans = leaf_spans(captions)
    for r in recs:
        anchors = [tuple(a) for a in r["anchors"]]
        # The clue intervals are exactly the anchors' spans.
        assert r["clues"] == [spans[a] for a in anchors]
        assert r["schema"] == "lvr.qa/1" and r["video"] == "numbers.mp4" and r["source"] == "lvr questions"
        assert re.fullmatch(rf"{r['video_id']}-{r['category'][0]}\d+", r["id"]), r["id"]
        assert len(r["options"]) == 4 and r["answer"] in "ABCD"
        right = r["options"]["ABCD".index(r["answer"])].split(". ", 1)[1]
        if r["category"] == "single":
            assert len(anchors) == 1 and right == world.word[anchors[0]]  # the anchor's own card
        else:
            assert 2 <= len(anchors) <= 3 and len({a[:2] for a in anchors}) == len(anchors)
            assert anchors == sorted(anchors) and right == ", then ".join(world.word[a] for a in anchors)
        names = [f["name"] for f in r["filters"]]
        assert names == ["lookalike", "no_leak", "answerable"] + \
            (["needs_all_anchors"] if r["category"] == "multi" else []) + ["specificity"]
        assert all(f["verdict"] == "pass" and f["reason"] for f in r["filters"])
        assert r["producer"]["model"] == "writer" and len(r["producer"]["prompt_hash"]) == 16
        assert r["producer"]["captioners"][0]["model"] == "captioner"
    # Option letters are ours (seeded), not the writer's.
    assert len({r["answer"] for r in recs}) > 1
    for r in load(rejected):
        assert r["rejected_by"] in ("lookalike", "no_leak", "answerable", "needs_all_anchors", "specificity")

    # `lvr synthesize` reads the file unchanged.
    from lvr.train.qa_items import load_qa_items

    items, errors = load_qa_items(out)
    assert errors == [] and [i.qid for i in items] == [r["id"] for r in recs]
    assert [[list(c) for c in i.clues] for i in items] == [r["clues"] for r in recs]
    vdir = root / "videos"
    proc = run_lvr("synthesize", out, "--video-dir", vdir, "--teacher-model", "teacher", "--base-url",
                   "http://127.0.0.1:9/v1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "6 items over 1 videos"

    keys = {(r["question"], tuple(r["options"])): r["answer"] for r in recs}

    def teacher(body: dict) -> str:
        if body["model"] == "captioner":
            return captioner(world, body)
        first = body["messages"][1]["content"]
        question = first.split("Question: ", 1)[1].split("\n", 1)[0]
        options = tuple(re.findall(r"^[A-D]\. .*$", first.split("Options:", 1)[1].split("\n\n", 1)[0], re.M))
        return f"<think>The captions settle it.</think><answer>{keys[(question, options)]}</answer>"

    traj = tmp_path / "traj.jsonl"
    with FakeOpenAI(teacher, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", out, "--video-dir", vdir, "--teacher-model", "teacher", "--base-url",
                       server.url, "--caption-model", "captioner", "--cache-dir", cache, "-o", traj, "-q")
    assert proc.returncode == 0, proc.stderr
    trajs = load(traj)
    assert sorted(t["qid"] for t in trajs) == sorted(r["id"] for r in recs)
    assert all(t["accepted"] for t in trajs)


def test_rerun_resumes_without_repeating(captioned, tmp_path):
    root, captions, cache, world = captioned
    out = tmp_path / "qa.jsonl"
    llm = LLM(world, fenced=False)
    with FakeOpenAI(llm, models=("writer",)) as server:
        proc = questions(server.url, captions, out, "--per-video", "2", "-q")
        assert proc.returncode == 0, proc.stderr
        first = out.read_text()
        assert len(load(out)) == 2
        n = len(server.requests)
        proc = questions(server.url, captions, out, "--per-video", "2")   # nothing left to do
        assert proc.returncode == 0, proc.stderr
        assert len(server.requests) == n and out.read_text() == first
        assert "1 already done" not in proc.stderr and "2 already done" in proc.stderr
        # A torn last line (a killed run) is cut off; a larger --per-video adds to the file.
        with open(out, "a") as f:
            f.write('{"schema": "lvr.qa/1", "id": "torn')
        proc = questions(server.url, captions, out, "--per-video", "4", "-q")
        assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith(first) and "torn" not in text
    recs = load(out)
    assert len(recs) == 4 and len({r["id"] for r in recs}) == 4
    assert sorted(r["category"] for r in recs) == ["multi", "multi", "single", "single"]


def test_killed_run_loses_nothing(captioned, tmp_path):
    root, captions, cache, world = captioned
    out, rejected = tmp_path / "qa.jsonl", tmp_path / "rejected.jsonl"
    args = ["questions", captions, "--model", "writer", "--per-video", "64", "--multi-share", "0",
            "-o", out, "--rejected", rejected, "-q"]
    server = FakeOpenAI(LLM(world), models=("writer",), latency_s=0.02).start()
    try:
        proc = subprocess.Popen([*LVR, *map(str, args), "--base-url", server.url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(load(out)) < 10:
            if proc.poll() is not None:
                pytest.fail(f"questions ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        server.stop()
    before = {r["id"]: r for r in load(out) + load(rejected)}
    assert 10 <= len(before) < 64
    llm = LLM(world)
    with FakeOpenAI(llm, models=("writer",)) as again:
        proc = run_lvr(*args, "--base-url", again.url)
    assert proc.returncode == 0, proc.stderr
    kept, dropped = load(out), load(rejected)
    ids = [r["id"] for r in kept + dropped]
    assert len(ids) == len(set(ids)) == 64 and len(kept) == 61
    assert llm.kinds.count("write") == 64 - len(before)          # finished questions were not redone
    assert all({r["id"]: r for r in kept + dropped}[i] == r for i, r in before.items())


# -- Done when: filters ---------------------------------------------------------------------------------

def test_planted_bad_questions_are_dropped_with_the_right_reason(captioned, tmp_path):
    root, captions, cache, world = captioned
    out, rejected = tmp_path / "qa.jsonl", tmp_path / "rejected.jsonl"
    llm = LLM(world)
    with FakeOpenAI(llm, models=("writer",)) as server:
        # One single-segment question per leaf: every planted anchor is used.
        proc = questions(server.url, captions, out, "--per-video", "64", "--multi-share", "0",
                         "--rejected", rejected, "--concurrency", "16", "-q")
    assert proc.returncode == 0, proc.stderr
    kept, dropped = load(out), load(rejected)
    assert len(kept) == 61 and len(dropped) == 3, [r["reason"] for r in dropped]
    by_anchor = {tuple(r["anchors"][0]): r for r in dropped}
    assert set(by_anchor) == {NONSPECIFIC, LEAK, TWIN_A}

    # 1. Answerable from another leaf: one with the same colour, found by the lexical pre-filter.
    r = by_anchor[NONSPECIFIC]
    assert r["rejected_by"] == "specificity"
    assert r["reason"].startswith("answerable from non-anchor leaf (")
    hit = next(f for f in r["filters"] if f["name"] == "specificity")["details"]["leaf"]
    assert tuple(hit) != NONSPECIFIC and world.colour[tuple(hit)] == world.colour[NONSPECIFIC]
    assert fid(hit) in r["reason"]

    # 2. Answerable with no captions.
    r = by_anchor[LEAK]
    assert r["rejected_by"] == "no_leak" and r["reason"].startswith("answerable without the video")
    assert [f["verdict"] for f in r["filters"]] == ["pass", "fail", "skipped", "skipped"]

    # 3. A distractor drawn from the anchor's near-duplicate.
    r = by_anchor[TWIN_A]
    assert r["rejected_by"] == "lookalike" and r["reason"].startswith("look-alike:")
    assert fid(TWIN_A) in r["reason"] and fid(TWIN_B) in r["reason"]
    assert r["filters"][0]["details"]["pair"] == [list(TWIN_A), list(TWIN_B)]
    letter = r["filters"][0]["details"]["distractor"]
    assert r["options"]["ABCD".index(letter)].endswith(world.word[TWIN_B])

    # The twin's own question is fine: its near-duplicate was checked first and cannot answer it.
    (twin_b,) = [q for q in kept if tuple(q["anchors"][0]) == TWIN_B]
    spec = next(f for f in twin_b["filters"] if f["name"] == "specificity")
    assert spec["details"]["checked"][0] == {"leaf": list(TWIN_A), "score": spec["details"]["checked"][0]["score"],
                                             "lookalike": True}
    # Good questions never offer a look-alike of their anchor as a distractor source.
    assert all(v != list(TWIN_A) for v in twin_b["distractor_leaves"].values())


# -- malformed replies, bad inputs ------------------------------------------------------------------

def test_malformed_reply_is_asked_again_then_named(captioned, tmp_path):
    root, captions, cache, world = captioned
    out = tmp_path / "qa.jsonl"
    llm = LLM(world, malformed=1)
    with FakeOpenAI(llm, models=("writer",)) as server:
        proc = questions(server.url, captions, out, "--per-video", "1", "--multi-share", "0", "-q")
        writes = [b for b in server.requests if b["messages"][0]["content"] == qp.WRITER_SYSTEM]
    assert proc.returncode == 0, proc.stderr
    (rec,) = load(out)
    assert writes[1]["messages"][-1]["content"].startswith("Your reply could not be used: the reply is not a JSON")
    assert writes[1]["messages"][-2] == {
        "role": "assistant", "content": "Sure! Here is a great question about the card: which word does it show?"}
    assert rec["tokens"]["requests"] >= 2 + 1   # two writes, then the filters

    out2 = tmp_path / "qa2.jsonl"
    llm = LLM(world, malformed=10**6)
    with FakeOpenAI(llm, models=("writer",)) as server:
        proc = questions(server.url, captions, out2, "--per-video", "1", "--multi-share", "0",
                         "--max-tries", "1", "--json-retries", "1", "-q")
    assert proc.returncode == 1
    assert f"{rec['video_id']}-s1" in proc.stderr and "no usable JSON after 2 tries" in proc.stderr
    assert load(out2) == []


def test_videos_outside_the_root_and_incomplete_trees_are_named(captioned, tmp_path):
    root, captions, cache, world = captioned
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with FakeOpenAI(LLM(world), models=("writer",)) as server:
        proc = questions(server.url, captions, tmp_path / "qa.jsonl", "--video-root", elsewhere, "-q")
        assert proc.returncode == 1 and "outside --video-root" in proc.stderr and "numbers.mp4" in proc.stderr
        partial = tmp_path / "partial.jsonl"
        partial.write_text("".join(json.dumps(r) + "\n" for r in load(captions) if r["id"] != [2, 1, 3]))
        proc = questions(server.url, partial, tmp_path / "qa.jsonl", "-q")
        assert proc.returncode == 1 and "incomplete" in proc.stderr and "1 of 64 low captions" in proc.stderr
        assert server.requests == []
    proc = run_lvr("questions", captions, "--model", "writer", "--base-url", "http://127.0.0.1:9/v1",
                   "-o", tmp_path / "q.jsonl", "--rejected", tmp_path / "q.jsonl")
    assert proc.returncode == 2 and "--rejected" in proc.stderr


# -- pieces ---------------------------------------------------------------------------------------------

def test_parse_json_reply_reads_json_only():
    from lvr.train.questions import ReplyError, parse_json_reply

    assert parse_json_reply('{"answer": "B"}') == {"answer": "B"}
    assert parse_json_reply('<think>hmm {no}</think>\n```json\n{"answer": "C"}\n```') == {"answer": "C"}
    assert parse_json_reply('Here you go: {"question": "q?", "n": [1, 2]} Hope it helps.')["n"] == [1, 2]
    for bad in ["", "B", "{'answer': 'B'}", "__import__('os').system('touch /tmp/x')", "[1, 2]", "{answer: B}"]:
        with pytest.raises(ReplyError):
            parse_json_reply(bad)


def test_lookalikes_and_anchor_sampling(captioned):
    from lvr.train.questions import VideoIndex, load_caption_trees, lookalike_pairs, multi_anchor_slots, \
        single_anchor_slots

    root, captions, cache, world = captioned
    (tree,), errors = load_caption_trees(str(captions))
    assert errors == []
    index = VideoIndex.build(tree, 0.8)
    ((a, b, score),) = lookalike_pairs(index)
    assert (a, b) == (TWIN_A, TWIN_B) and score >= 0.8
    sims = index.lexicon.similarities()
    i, j = index.leaves.index((1, 1, 1)), index.leaves.index((1, 1, 2))
    assert sims[i, j] < 0.5   # two ordinary cards share a template, not their content

    singles = single_anchor_slots(index, seed=1)
    assert sorted(s[0] for s in singles) == index.leaves and singles == single_anchor_slots(index, seed=1)
    assert singles != single_anchor_slots(index, seed=2)
    many = multi_anchor_slots(index, seed=1, count=40)
    assert multi_anchor_slots(index, seed=1, count=5) == many[:5]
    assert len(set(many)) == len(many) == 40
    for anchors in many:
        assert 2 <= len(anchors) <= 3 and len({x[:2] for x in anchors}) == len(anchors)
        assert not {TWIN_A, TWIN_B} <= set(anchors)

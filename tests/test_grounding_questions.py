"""`lvr questions --task grounding`: grounding queries from a caption tree, filtered (issue 15, item 4).

The video and its captions are built as in test_questions.py: the numbered test video is
segmented for real, and the scripted captioner reads the frame numbers off the pictures
it is sent, so every leaf is captioned with its own card. Two pairs of leaves get
near-duplicate captions (planted look-alikes): the pair of test_questions.py, far apart,
and a pair of adjacent leaves across a high boundary. A scripted LLM writes a query from
the anchors it is shown and says a query fits some clips when their captions hold every
key word of it (and each clip holds one). It plants ambiguous queries: on each look-alike
leaf, one that describes only the scene the look-alikes share; on one leaf, one that
names only the card's colour (seven other cards share it); and on one leaf a query its
caption does not support.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.train import question_prompts as qp
from lvr_test_helpers import run_lvr
from test_questions import (COLOURS, NONSPECIFIC, TWIN_A, TWIN_B, WORD_LIST, World, captioner, fid, load,
                            segment_and_caption)

ADJ_A, ADJ_B = (2, 4, 4), (3, 1, 1)      # adjacent in time, near-duplicate captions
LOOKALIKES = {TWIN_A: TWIN_B, TWIN_B: TWIN_A, ADJ_A: ADJ_B, ADJ_B: ADJ_A}
UNSUPPORTED = (2, 2, 2)                  # the writer describes something its caption does not show

TWIN_SCENE = "a grey card on a table by a window while rain falls and a cat sleeps"
ADJ_SCENE = "a long train crosses a stone bridge over a river at dusk"
KEY_WORDS = set(WORD_LIST) | set(COLOURS) | {"grey", "window", "rain", "cat", "train", "bridge", "river", "dusk",
                                             "dog"}


class GroundingWorld(World):
    def leaf_caption(self, leaf) -> str:
        if leaf in (ADJ_A, ADJ_B):
            return (f"A long train crosses a stone bridge over a river at dusk while birds circle above the water; "
                    f"a sign on the bridge reads {self.word[leaf]}.")
        return super().leaf_caption(leaf)


# -- the scripted LLM ------------------------------------------------------------------------------

_CLIP_RE = re.compile(r"Clip \((\d+), (\d+), (\d+)\), [^\n]*:\n([^\n]*)")


def _clips(text: str) -> list[tuple[tuple[int, ...], str]]:
    return [((int(a), int(b), int(c)), cap) for a, b, c, cap in _CLIP_RE.findall(text)]


def write_query(world: GroundingWorld, text: str) -> str:
    moment = re.split(r"Just BEFORE|Just AFTER|Write one", text[text.index("The MOMENT"):])[0]
    leaves = [leaf for leaf, _ in _clips(moment)]
    if len(leaves) > 1:
        return ", then ".join(f"the card with the word {world.word[leaf]}" for leaf in leaves)
    (leaf,) = leaves
    if leaf in (TWIN_A, TWIN_B):
        return TWIN_SCENE
    if leaf in (ADJ_A, ADJ_B):
        return ADJ_SCENE
    if leaf == NONSPECIFIC:
        return f"a {world.colour[leaf]} card fills the screen"
    if leaf == UNSUPPORTED:
        return f"a dog barks at the card with the word {world.word[leaf]}"
    return f"the {world.colour[leaf]} card with the word {world.word[leaf]}"


def fits(user: str) -> bool:
    """Every key word of the query is in the captions, and every clip shows one of them."""
    captions = [set(re.findall(r"[a-z]+", cap.lower())) for _, cap in _clips(user.split("Moment:", 1)[0])]
    query = user.split("Moment: ", 1)[1].split("\n", 1)[0]
    keys = {w for w in re.findall(r"[a-z]+", query.lower()) if w in KEY_WORDS}
    return bool(keys) and keys <= set().union(*captions) and all(keys & c for c in captions)


class LLM:
    def __init__(self, world: GroundingWorld):
        self.world = world

    def __call__(self, body: dict) -> str:
        if body["model"] == "captioner":
            return captioner(self.world, body)
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system == qp.GROUNDING_WRITER_SYSTEM:
            return f"<think>One moment.</think>{json.dumps({'query': write_query(self.world, user)})}"
        if system == qp.FITS_SYSTEM:
            return json.dumps({"answer": "yes" if fits(user) else "no"})
        raise AssertionError(f"unexpected request: {system[:80]}")


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioned(numbered_video, tmp_path_factory):
    """videos/numbers.mp4 segmented and captioned: (root, captions file, world)."""
    root = tmp_path_factory.mktemp("grounding_questions")
    captions, _, world = segment_and_caption(numbered_video, root, GroundingWorld)
    return root, captions, world


def grounding(url: str, captions: Path, out: Path, *extra):
    return run_lvr("questions", captions, "--task", "grounding", "--model", "writer", "--base-url", url,
                   "-o", out, *extra)


def leaf_spans(captions: Path) -> dict:
    return {tuple(r["id"]): (r["start"], r["end"]) for r in load(captions) if r["level"] == "low"}


def video_index(captions: Path):
    from lvr.train.questions import VideoIndex, load_caption_trees

    (tree,), errors = load_caption_trees(str(captions))
    assert errors == []
    return VideoIndex.build(tree, 0.8)


# -- Done when: ambiguous planted queries are dropped, kept targets are the anchor spans ------------

def test_grounding_queries_drop_the_ambiguous_ones_and_target_their_anchor_span(captioned, tmp_path):
    from lvr.infer.grounding import GROUNDING_SCHEMA, load_grounding_items

    root, captions, world = captioned
    out, rejected = tmp_path / "grounding.jsonl", tmp_path / "rejected.jsonl"
    # Every leaf once as a single-leaf query (64), and 16 span queries.
    args = ("--per-video", "80", "--multi-share", "0.2", "--rejected", rejected, "--concurrency", "16", "-q")
    with FakeOpenAI(LLM(world), models=("writer",)) as server:
        proc = grounding(server.url, captions, out, *args)
    assert proc.returncode == 0, proc.stderr
    kept, dropped = load(out), load(rejected)
    spans = leaf_spans(captions)
    leaves = sorted(spans)
    duration = max(end for _, end in spans.values())

    # Exactly the planted ambiguous (and the unsupported) single-leaf queries are dropped; nothing else.
    planted = set(LOOKALIKES) | {NONSPECIFIC, UNSUPPORTED}
    assert {tuple(r["extra"]["anchors"][0]) for r in dropped} == planted, [r["reason"] for r in dropped]
    assert len(dropped) == len(planted) and all(r["extra"]["category"] == "single" for r in dropped)
    singles = [r for r in kept if r["extra"]["category"] == "single"]
    span_recs = [r for r in kept if r["extra"]["category"] == "span"]
    assert len(singles) == 64 - len(planted) and len(span_recs) == 16
    assert {tuple(r["extra"]["anchors"][0]) for r in singles} == set(leaves) - planted

    by_anchor = {tuple(r["extra"]["anchors"][0]): r for r in dropped}
    for anchor, twin in LOOKALIKES.items():
        r = by_anchor[anchor]
        assert r["rejected_by"] == "specificity" and r["reason"].startswith("look-alike: the query also fits leaf ")
        assert fid(twin) in r["reason"] and f"near-duplicate of anchor {fid(anchor)}" in r["reason"]
        look, answerable, spec = r["extra"]["filters"]
        assert look["name"] == "lookalike" and look["verdict"] == "pass"
        assert look["details"]["lookalikes"] == [{"anchor": list(anchor), "leaf": list(twin),
                                                  "cosine": look["details"]["lookalikes"][0]["cosine"]}]
        assert answerable["verdict"] == "pass"
        # The look-alike is checked first, and it is the one that fits.
        assert spec["details"]["checked"][0]["leaf"] == list(twin) and spec["details"]["checked"][0]["lookalike"]
        assert spec["details"]["pair"] == [list(anchor), list(twin)] and spec["details"]["leaf"] == list(twin)
    r = by_anchor[NONSPECIFIC]
    assert r["rejected_by"] == "specificity" and r["reason"].startswith("the query also fits non-anchor leaf (")
    hit = tuple(r["extra"]["filters"][2]["details"]["leaf"])
    assert hit != NONSPECIFIC and world.colour[hit] == world.colour[NONSPECIFIC] and fid(hit) in r["reason"]
    r = by_anchor[UNSUPPORTED]
    assert r["rejected_by"] == "answerable" and "does not fit its anchors' captions" in r["reason"]
    assert [f["verdict"] for f in r["extra"]["filters"]] == ["pass", "fail", "skipped"]

    for r in kept:
        anchors = [tuple(a) for a in r["extra"]["anchors"]]
        first = leaves.index(anchors[0])
        assert anchors == leaves[first:first + len(anchors)]           # adjacent leaves, in time order
        # The target is exactly the anchor span.
        assert r["targets"] == [[spans[anchors[0]][0], spans[anchors[-1]][1]]]
        assert r["schema"] == GROUNDING_SCHEMA and r["source"] == "lvr questions" and r["video"] == "numbers.mp4"
        assert r["duration"] == duration and "rejected_by" not in r
        tag = "g" if r["extra"]["category"] == "single" else "gs"
        assert re.fullmatch(rf"{r['extra']['video_id']}-{tag}\d+", r["id"]), r["id"]
        assert len(anchors) == 1 if tag == "g" else 2 <= len(anchors) <= 3
        assert [(f["name"], f["verdict"]) for f in r["extra"]["filters"]] == \
            [("lookalike", "pass"), ("answerable", "pass"), ("specificity", "pass")]
        assert r["extra"]["producer"]["prompt_hash"] == qp.prompt_hash("grounding")
        assert r["extra"]["producer"]["options"]["task"] == "grounding"
        assert r["extra"]["tokens"]["requests"] >= 3
    # A span may hold a look-alike leaf (its query names every card, so it is specific), never both of a pair.
    assert any(set(map(tuple, r["extra"]["anchors"])) & set(LOOKALIKES) for r in span_recs)
    assert not any({ADJ_A, ADJ_B} <= set(map(tuple, r["extra"]["anchors"])) for r in span_recs)
    assert any(r["extra"]["anchors"][0][:2] != r["extra"]["anchors"][-1][:2] for r in span_recs)

    # The output is a grounding file `lvr eval` reads as it is.
    items, errors = load_grounding_items(out)
    assert errors == [] and [i.qid for i in items] == [r["id"] for r in kept]
    assert [[list(t) for t in i.targets] for i in items] == [r["targets"] for r in kept]
    assert items[0].extra["anchors"] == kept[0]["extra"]["anchors"] and items[0].source == "lvr questions"

    # A rerun writes nothing new and asks nothing.
    before_out, before_rej = out.read_text(), rejected.read_text()
    llm = LLM(world)
    with FakeOpenAI(llm, models=("writer",)) as server:
        proc = grounding(server.url, captions, out, *args[:-1])
        assert server.requests == []
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == before_out and rejected.read_text() == before_rej
    assert "0 grounding queries written (0 single, 0 span)" in proc.stderr
    assert f"{len(kept)} already done" in proc.stderr


# -- pieces ---------------------------------------------------------------------------------------------

def test_span_anchor_stream_is_adjacent_ordered_seeded_and_stable(captioned):
    from lvr.train.questions import span_anchor_slots

    root, captions, world = captioned
    index = video_index(captions)
    spans = leaf_spans(captions)
    leaves = index.leaves
    # The planted adjacent look-alikes are next to each other: a span could hold both.
    assert leaves.index(ADJ_B) == leaves.index(ADJ_A) + 1 and index.lookalike(ADJ_A, ADJ_B) is not None

    many = span_anchor_slots(index, seed=1, count=40)
    assert len(many) == len(set(many)) == 40
    assert span_anchor_slots(index, seed=1, count=5) == many[:5]       # slot n does not depend on the count
    assert span_anchor_slots(index, seed=1, count=40) == many
    assert span_anchor_slots(index, seed=2, count=40) != many
    for span in many:
        assert 2 <= len(span) <= 3
        first = leaves.index(span[0])
        assert list(span) == leaves[first:first + len(span)]
        assert all(spans[a][1] == spans[b][0] for a, b in zip(span, span[1:]))   # each ends where the next starts
        assert not {ADJ_A, ADJ_B} <= set(span)
    assert any(span[0][:2] != span[-1][:2] for span in many)            # across medium boundaries too
    assert {len(s) for s in many} == {2, 3}
    assert all(len(s) == 2 for s in span_anchor_slots(index, seed=1, count=10, max_leaves=2))


def test_lookalike_filter_refuses_a_span_of_two_lookalikes(captioned):
    from lvr.train.anchors import Slot
    from lvr.train.question_filters import GroundingFilters
    from lvr.train.question_writer import GroundingCandidate

    root, captions, world = captioned
    index = video_index(captions)
    filters = GroundingFilters(None, specificity_k=4)
    v = filters.lookalike(GroundingCandidate(Slot(index, "span", 1, (ADJ_A, ADJ_B), "grounding"), ADJ_SCENE))
    assert v.verdict == "fail" and v.details["pair"] == [list(ADJ_A), list(ADJ_B)]
    assert v.reason.startswith(f"look-alike: anchors {fid(ADJ_A)} and {fid(ADJ_B)} are near-duplicates")
    v = filters.lookalike(GroundingCandidate(Slot(index, "single", 1, (NONSPECIFIC,), "grounding"), "q"))
    assert v.verdict == "pass" and v.reason == "the anchors have no near-duplicate leaves"


def test_grounding_replies_and_task_option(captioned, tmp_path):
    from lvr.train.question_replies import ReplyError, check_fits, check_query
    from lvr.train.questions import QuestionOptions, QuestionsError

    assert check_query({"query": "  a man  opens the door "}) == "a man opens the door"
    for bad in [{}, {"query": ""}, {"query": 3}, {"query": "the card at 00:12"}, {"query": "clip (1, 2, 3) ends"}]:
        with pytest.raises(ReplyError):
            check_query(bad)
    assert check_fits({"answer": "Yes."}) is True and check_fits({"answer": "no"}) is False
    with pytest.raises(ReplyError):
        check_fits({"answer": "maybe"})

    assert QuestionOptions(task="grounding", per_video=5, multi_share=0.4).wanted() == {"single": 3, "span": 2}
    with pytest.raises(QuestionsError, match="--task takes qa or grounding"):
        QuestionOptions(task="mcq").validate()
    root, captions, world = captioned
    proc = run_lvr("questions", captions, "--task", "ground", "--model", "writer", "--base-url",
                   "http://127.0.0.1:9/v1", "-o", tmp_path / "g.jsonl")
    assert proc.returncode == 2 and "--task takes qa or grounding, not 'ground'" in proc.stderr
    assert not (tmp_path / "g.jsonl").exists() or (tmp_path / "g.jsonl").read_text() == ""

"""`lvr vpo`: LongVPO preference triples from anchored questions and the clips' video_qa frames.

Four frame-number videos (frame N shows N in binary), each showing its own 30 numbers
(0-29, 200-229, 400-429, 600-629) four times over: with K = 4 every high node shows the
same content, so every leaf has three planted look-alikes, one under each other high node
(the far part of its own video a distractor may come from). Each video's numbers differ
from the others', so a frame read back from its pixels says which leaf content it is.
The questions are written here as `lvr questions` writes them, one per leaf.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr_test_helpers import load_jsonl, run_lvr, write_jsonl
from synthetic_media import make_frame_number_video, read_frame_number

OFFSETS = (0, 200, 400, 600)
PERIOD = 30                      # frames shown before the content repeats (a high node's worth at K = 4)
FPS = 10
DISTRACTORS = 3
CHI_SQUARE_99 = {3: 11.345, 4: 13.277}  # chi-square critical values at p = 0.01 by degrees of freedom


def looped_video(path: Path, offset: int) -> Path:
    """12 s at 10 fps: frames showing offset .. offset+29, four times over."""
    return make_frame_number_video(path, width=128, fps=FPS, duration=(offset + PERIOD) / FPS,
                                   extra_filters=f"trim=start_frame={offset},setpts=PTS-STARTPTS,"
                                                 f"loop=loop=3:size={PERIOD}:start=0,setpts=N/{FPS}/TB")


def question_record(n: int, leaf: dict, rng: random.Random, others: list[list[int]], *, category: str = "single",
                    anchors: list[list[int]] | None = None) -> dict:
    answer = rng.choice("ABCD")
    return {"schema": "lvr.qa/1", "id": f"{leaf['video_id']}-{category[0]}{n}", "video_id": leaf["video_id"],
            "video": Path(leaf["path"]).name, "question": "Which numbers does the clip show?",
            "options": [f"{x}. the numbers of clip {x}" for x in "ABCD"], "answer": answer,
            "anchors": anchors or [leaf["id"]], "category": category,
            "distractor_leaves": {x: rng.choice(others) for x in "ABCD" if x != answer} if others else {},
            "filters": [{"name": "specificity", "verdict": "pass", "reason": "not answerable elsewhere"}],
            "source": "lvr questions"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Videos segmented with --qa-frames; one single-segment question per leaf (256) and a few multi-segment ones."""
    root = tmp_path_factory.mktemp("vpo")
    videos = root / "videos"
    videos.mkdir()
    for i, offset in enumerate(OFFSETS):
        looped_video(videos / f"v{i}.mp4", offset)
    cache, nodes = root / "cache", root / "nodes.jsonl"
    proc = run_lvr("segment", videos, "--qa-frames", "-o", nodes, "--cache-dir", cache, "-q")
    assert proc.returncode == 0, proc.stderr
    records = load_jsonl(nodes)
    leaves = [r for r in records if r["level"] == "low"]
    assert len(leaves) == 4 * 64
    offset_of = {r["video_id"]: OFFSETS[int(Path(r["path"]).stem[1:])] for r in leaves}
    rng = random.Random(7)
    single, multi = [], []
    for n, leaf in enumerate(leaves, 1):
        others = [x["id"] for x in leaves if x["video_id"] == leaf["video_id"] and x["id"] != leaf["id"]]
        single.append(question_record(n, leaf, rng, others))
    for n, leaf in enumerate(leaves[::16], 1):   # the first leaf of each medium node's first child ...
        h, m, _ = leaf["id"]
        anchors = [leaf["id"], [h, m % 4 + 1, 2]] + ([[h, (m + 1) % 4 + 1, 3]] if n % 2 else [])
        multi.append(question_record(n, leaf, rng, [], category="multi", anchors=sorted(anchors)))
    qa = write_jsonl(root / "qa.jsonl", single + multi)
    return {"root": root, "cache": cache, "nodes": nodes, "qa": qa, "records": records, "offset_of": offset_of,
            "leaves": {(r["video_id"], tuple(r["id"])): r for r in leaves}, "single": single, "multi": multi}


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("vl") / "tiny-vl", vocab="small")


def shown_numbers(cache: Path, keys: list[str]) -> list[int]:
    """The frame numbers the stored JPEGs show, read from their pixels."""
    return [read_frame_number(Image.open(cache / "frames" / key)) for key in keys]


def expected_numbers(world, leaf: dict) -> list[int]:
    return [world["offset_of"][leaf["video_id"]] + i % PERIOD for i in leaf["qa_frame_indices"]]


def is_twin(clip: dict, anchor: dict) -> bool:
    """A planted look-alike: the same video, the same place under another high node."""
    return clip["video_id"] == anchor["video_id"] and clip["id"][1:] == anchor["id"][1:] and clip["id"] != anchor["id"]


# -- Done when: stage-1 data -------------------------------------------------------------------------

def test_vpo_stage1_end_to_end(world, tmp_path):
    out = tmp_path / "vpo.jsonl"
    proc = run_lvr("vpo", world["qa"], "--nodes", world["nodes"], "--cache-dir", world["cache"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    recs = load_jsonl(out)
    assert len(recs) == len(world["single"]) == 256
    questions = {q["id"]: q for q in world["single"]}
    twins_left_out = 0
    for r in recs:
        q = questions[r["qid"]]
        assert r["schema"] == "lvr.vpo/1" and r["stage"] == 1 and r["id"] == f"{q['id']}-vpo1"
        assert r["clip_count"] == DISTRACTORS + 1 == len(r["clips"]) and len(r["anchor_clips"]) == 1
        (n,) = r["anchor_clips"]
        anchor = r["clips"][n - 1]
        leaf = world["leaves"][(q["video_id"], tuple(q["anchors"][0]))]
        # The anchor's frames are the anchor leaf's video_qa frames: keys, and the numbers their pixels show.
        assert anchor["role"] == "anchor" and anchor["id"] == leaf["id"] and anchor["video_id"] == leaf["video_id"]
        assert anchor["frame_keys"] == leaf["qa_frame_keys"] and anchor["frame_times"] == leaf["qa_frame_times"]
        assert shown_numbers(world["cache"], anchor["frame_keys"]) == expected_numbers(world, leaf)
        anchor_shows = set(expected_numbers(world, leaf))
        # Distractors: far in the same video or from another one, below the threshold, none a look-alike.
        sim = r["similarity"]
        assert sim["measure"] == "pixel" and sim["threshold"] == 0.92 and sim["model"] is None
        for clip in r["clips"]:
            if clip["role"] == "distractor":
                assert clip["video_id"] != leaf["video_id"] or clip["id"][0] != leaf["id"][0]
                assert 0 <= clip["similarity"] < sim["threshold"]
                assert set(shown_numbers(world["cache"], clip["frame_keys"])) != anchor_shows
        for left_out in sim["excluded"]:
            assert left_out["similarity"] >= sim["threshold"]
            if is_twin(left_out, anchor):
                assert left_out["similarity"] > 0.99
                twins_left_out += 1
        # Chosen is the key; rejected the option a distractor clip was the source of, or another written one.
        assert r["chosen"] == q["options"]["ABCD".index(q["answer"])] and r["rejected"] != r["chosen"]
        letter = r["rejected"][0]
        if r["rejected_source"] == "distractor_clip":
            assert r["clips"][r["rejected_clip"] - 1]["id"] == q["distractor_leaves"][letter]
        else:
            assert r["rejected_source"] == "written_option" and r["rejected_clip"] is None
    assert twins_left_out >= 20, twins_left_out   # the planted look-alikes were drawn, and always left out
    assert {r["rejected_source"] for r in recs} == {"distractor_clip", "written_option"}

    # Anchor positions over the data set are uniform (chi-square at p = 0.01), as the command reports.
    counts = [sum(1 for r in recs if r["anchor_clips"] == [i]) for i in range(1, DISTRACTORS + 2)]
    expected = len(recs) / len(counts)
    assert sum((c - expected) ** 2 / expected for c in counts) < CHI_SQUARE_99[DISTRACTORS], counts
    assert f"anchors per position {counts}" in proc.stderr and ": uniform" in proc.stderr
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("lvr vpo: 256 triples written (stage 1; rejected: ") and " 0 failed" in summary
    assert f"{len(world['multi'])} questions of the other stage" in summary

    # A rerun writes nothing new.
    text = out.read_text()
    proc = run_lvr("vpo", world["qa"], "--nodes", world["nodes"], "--cache-dir", world["cache"], "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == text and "0 triples written" in proc.stderr and "256 already done" in proc.stderr


def test_chi_square_and_the_position_check():
    from lvr.train.vpo_data import chi_square_p, position_check

    for counts, p in (([60, 40], 0.0455), ([70, 50, 40, 40], 0.00738), ([52, 48], 0.6892), ([55, 45, 50, 50], 0.8013),
                      ([25] * 8, 1.0)):
        assert chi_square_p(counts)[1] == pytest.approx(p, abs=5e-5)
    assert chi_square_p([10] * 20 + [100])[1] < 1e-6
    skewed = [{"schema": "lvr.vpo/1", "stage": 1, "clip_count": 4, "anchor_clips": [1 if i % 3 else 2]}
              for i in range(90)]
    (check,) = position_check(skewed)
    assert check["anchor_counts"] == [60, 30, 0, 0] and check["triples"] == 90 and not check["uniform"]


def test_killed_run_resumes_and_bad_questions_are_named(world, tmp_path):
    good = world["single"][:6]
    bad = [{**world["single"][6], "rejected_by": "specificity"},
           {**world["single"][7], "anchors": []},
           {**world["single"][8], "video_id": "f" * 24, "id": "f" * 24 + "-s1"},
           {**world["single"][9], "answer": "Z"}]
    qa = write_jsonl(tmp_path / "qa.jsonl", good + bad)
    out = tmp_path / "vpo.jsonl"
    proc = run_lvr("vpo", qa, "--nodes", world["nodes"], "--cache-dir", world["cache"], "-o", out)
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(errors) == 4, proc.stderr
    assert f"{qa}:7: did not pass the question filters (rejected by specificity)" in errors[0]
    assert f"{qa}:8: no anchor leaves" in errors[1]
    assert f"{qa}:10: answer 'Z' is not one of the option letters" in errors[2]
    assert "f" * 24 + "-s1: video " + "f" * 24 + " is not in --nodes" in errors[3]
    assert len(load_jsonl(out)) == 6
    # A killed run leaves a torn last line; the rerun cuts it off and writes only what is missing.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:50])
    proc = run_lvr("vpo", qa, "--nodes", world["nodes"], "--cache-dir", world["cache"], "-o", out, "-q")
    assert proc.returncode == 1 and "2 triples written" in proc.stderr and "4 already done" in proc.stderr
    assert [r["id"] for r in load_jsonl(out)] == [f"{q['id']}-vpo1" for q in good]


def test_usage_errors(world, tmp_path):
    base = [world["qa"], "--nodes", world["nodes"], "--cache-dir", world["cache"], "-o", tmp_path / "o.jsonl"]
    for extra, message in ((["--stage", "2"], "--stage 2 needs --model"),
                           (["--similarity", "vision"], "--similarity vision needs --similarity-model"),
                           (["--similarity", "colour"], "--similarity takes pixel, vision, not 'colour'"),
                           (["--max-similarity", "1.5"], "1.5")):
        proc = run_lvr("vpo", *base, *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, proc.stderr)
    proc = run_lvr("vpo", world["qa"], "--nodes", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl")
    assert proc.returncode == 2 and "missing.jsonl: cannot open" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
    # Leaves segmented without --qa-frames are named, not used.
    plain = [{k: v for k, v in r.items() if not k.startswith("qa_")} for r in world["records"]]
    nodes = write_jsonl(tmp_path / "plain.jsonl", plain)
    proc = run_lvr("vpo", world["qa"], "--nodes", nodes, "--cache-dir", world["cache"], "-o", tmp_path / "p.jsonl",
                   "-q")
    assert proc.returncode == 1 and "segment it with `lvr segment --qa-frames`" in proc.stderr
    assert "0 triples written" in proc.stderr


def test_vision_tower_similarity(world, tiny_vl, tmp_path):
    """--similarity vision: the tiny VLM's mean-pooled vision features find the planted look-alikes too."""
    qa = write_jsonl(tmp_path / "qa.jsonl", world["single"][:24])
    out = tmp_path / "vpo.jsonl"
    proc = run_lvr("vpo", qa, "--nodes", world["nodes"], "--cache-dir", world["cache"], "-o", out,
                   "--similarity", "vision", "--similarity-model", tiny_vl, "--max-similarity", "0.999",
                   "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    recs = load_jsonl(out)
    assert len(recs) == 24
    twins = 0
    for r in recs:
        sim = r["similarity"]
        assert sim == {**sim, "measure": "vision", "model": str(tiny_vl), "threshold": 0.999}
        anchor = r["clips"][r["anchor_clips"][0] - 1]
        assert all(c["similarity"] < 0.999 and not is_twin(c, anchor) for c in r["clips"] if c["role"] == "distractor")
        twins += sum(1 for e in sim["excluded"] if is_twin(e, anchor) and e["similarity"] >= 0.999)
    assert twins >= 1


# -- Done when: stage 2 ---------------------------------------------------------------------------------

def caption_records(nodes: list[dict]) -> list[dict]:
    """lvr.caption/1 records of every node, naming the node so the scripted writer can be checked."""
    return [{"schema": "lvr.caption/1", "video_id": n["video_id"], "path": n["path"], "K": n["K"], "id": n["id"],
             "level": n["level"], "start": n["start"], "end": n["end"], "model": "captioner", "prompt_hash": "p",
             "caption": f"Stripes of video {n['video_id'][:6]} node {n['id']}."} for n in nodes]


class Writer:
    """A scripted stage-2 writer: each answer reasons from the clips it is told to use.

    `careless` questions get, once each, a rejected answer that picks the key (it must be asked again).
    """

    def __init__(self, careless: int = 0):
        self.careless = careless
        self.requests: list[str] = []

    def __call__(self, body: dict) -> str:
        user = body["messages"][-1]["content"]
        if user.startswith("Your reply could not be used"):
            user = body["messages"][1]["content"]
        self.requests.append(user)
        anchors = re.search(r"about clips ([\d, ]+);", user).group(1)
        wrong = re.search(r"rejected answer: clip (\d+)", user).group(1)
        key = re.search(r"correct answer is ([A-D])", user).group(1)
        other = key if self.careless and len(body["messages"]) == 2 else next(x for x in "ABCD" if x != key)
        if self.careless and len(body["messages"]) == 2:
            self.careless -= 1
        return json.dumps({"chosen": f"The count runs on through clips {anchors}.\nAnswer: {key}",
                           "rejected": f"Clip {wrong} shows the count running on.\nAnswer: {other}"})


def test_vpo_stage2_from_a_scripted_writer(world, tmp_path):
    captions = write_jsonl(tmp_path / "captions.jsonl", caption_records(world["records"]))
    out = tmp_path / "vpo.jsonl"
    writer = Writer(careless=2)
    with FakeOpenAI(writer, models=("writer",)) as server:
        proc = run_lvr("vpo", world["qa"], "--stage", "2", "--nodes", world["nodes"], "--caption-records", captions,
                       "--cache-dir", world["cache"], "--model", "writer", "--base-url", server.url, "-o", out)
    assert proc.returncode == 0, proc.stderr
    recs = load_jsonl(out)
    questions = {q["id"]: q for q in world["multi"]}
    assert sorted(r["qid"] for r in recs) == sorted(questions) and len(recs) == 16
    assert len(writer.requests) == 16 + 2     # two careless replies were sent back with the reason
    caption_of = {(c["video_id"], tuple(c["id"])): c["caption"] for c in caption_records(world["records"])}
    for r in recs:
        q = questions[r["qid"]]
        assert r["stage"] == 2 and r["id"] == f"{q['id']}-vpo2" and r["rejected_source"] == "llm"
        assert r["clip_count"] == DISTRACTORS + len(q["anchors"]) and r["anchor_clips"] == sorted(r["anchor_clips"])
        # The anchors, in time order, with their own frames (read back from pixels).
        anchors = [r["clips"][n - 1] for n in r["anchor_clips"]]
        assert [a["id"] for a in anchors] == q["anchors"] and all(a["role"] == "anchor" for a in anchors)
        for a in anchors:
            leaf = world["leaves"][(a["video_id"], tuple(a["id"]))]
            assert shown_numbers(world["cache"], a["frame_keys"]) == expected_numbers(world, leaf)
        for clip in r["clips"]:
            if clip["role"] == "distractor":
                assert clip["video_id"] != q["video_id"] or clip["id"][0] not in {a[0] for a in q["anchors"]}
                assert not any(is_twin(clip, a) for a in anchors) and clip["similarity"] < 0.92
        # The writer read every clip's caption, in the order the model sees them; the wrong clip is a distractor.
        request = next(x for x in writer.requests if f"about clips {', '.join(map(str, r['anchor_clips']))};" in x
                       and all(f"Clip {i}: {caption_of[(c['video_id'], tuple(c['id']))]}" in x
                               for i, c in enumerate(r["clips"], 1)))
        wrong = r["rejected_clip"]
        assert r["clips"][wrong - 1]["role"] == "distractor" and f"rejected answer: clip {wrong}." in request
        assert r["chosen"].endswith(f"Answer: {q['answer']}") and not r["rejected"].endswith(f"Answer: {q['answer']}")
        assert f"Clip {wrong} " in r["rejected"]
        assert r["producer"]["model"] == "writer"
    assert "anchor positions: stage 2" in proc.stderr
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("lvr vpo: 16 triples written (stage 2; rejected: 16 llm)")
    assert "256 questions of the other stage" in summary and "requests" in summary


def test_stage2_writer_that_keeps_failing_is_named(world, tmp_path):
    captions = write_jsonl(tmp_path / "captions.jsonl", caption_records(world["records"]))
    qa = write_jsonl(tmp_path / "qa.jsonl", world["multi"][:2])
    out = tmp_path / "vpo.jsonl"
    with FakeOpenAI(lambda body: json.dumps({"chosen": "Clips one and two.", "rejected": "No idea."}),
                    models=("writer",)) as server:
        proc = run_lvr("vpo", qa, "--stage", "2", "--nodes", world["nodes"], "--caption-records", captions,
                       "--cache-dir", world["cache"], "--model", "writer", "--base-url", server.url, "-o", out, "-q")
        assert len(server.requests) == 2 * 3     # asked again twice with the reason, then given up
    assert proc.returncode == 1 and not out.exists()
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(errors) == 2 and all("answers: no usable JSON after 3 tries ('chosen' must end with the line "
                                    "\"Answer: " in e for e in errors), proc.stderr

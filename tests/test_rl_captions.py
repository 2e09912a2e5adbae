"""`lvr rl --captions DIR`: GRPO with the released LongVideo-R1 caption files in place of a captioner.

The caption folder is written from our own tree of the numbered video in the release's layout
(`caption_tree`, as tests/test_released_data.py does for `eval --captions`). A tiny Qwen3 is
warm-started with a few `lvr sft` steps on one four-turn trajectory over those captions
(get_caption, get_caption, video_qa, answer), so its rollouts run the environment; the only
server is a vision model for video_qa, which serves no caption model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.infer.protocol import LAST_ROUND_NOTICE, first_user_message, system_prompt, tool_result_message
from lvr_test_helpers import run_lvr
from test_released_data import caption_tree
from test_rl import OPTIONS, PROMPT, sft

QUERY = "Which number?"
SCRIPT = ["<think>Clip (2,) fits.</think><tool>get_caption((2, 3))</tool>",
          "<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>",
          f'<think>Look.</think><tool>video_qa((2, 3, 1), "{QUERY}")</tool>',
          "<think>Seen it.</think><answer>B</answer>"]
SEEN = "The number 61."   # the vision model's answer


def released_text(node: dict) -> str:
    """The caption `caption_tree` writes for a node, without its tags."""
    return f"Released caption of {node['level']} clip {tuple(node['id'])}."


@pytest.fixture(scope="module")
def world(numbered_video, tmp_path_factory) -> dict:
    """Videos numbers.mp4, nohigh.mp4 and nofile.mp4 (copies), a caption folder with numbers' whole tree
    and a nohigh tree lacking high node (2,) (none for nofile), a QA item about each, a tiny model."""
    from tiny_models import build_tiny_qwen3

    from lvr.prep.segment import SegmentOptions, load_or_plan
    from lvr.prep.tree import TreeOptions

    root = tmp_path_factory.mktemp("rl-captions")
    videos, captions, cache = root / "videos", root / "captions", root / "cache"
    videos.mkdir()
    captions.mkdir()
    for name in ("numbers", "nohigh", "nofile"):
        shutil.copy(numbered_video, videos / f"{name}.mp4")
    nodes = load_or_plan(videos / "numbers.mp4", SegmentOptions(tree=TreeOptions(), qa_frames=True), cache)
    by_id = {tuple(n["id"]): n for n in nodes}
    assert nodes[0]["K"] == 4
    (captions / "numbers.json").write_text(json.dumps(caption_tree(nodes, "numbers.mp4")))
    nohigh = caption_tree(nodes, "nohigh.mp4")
    nohigh["captions"][0] = [e for e in nohigh["captions"][0] if e["segment_id"] != 2]
    (captions / "nohigh.json").write_text(json.dumps(nohigh))
    clue = [by_id[(2, 3)]["start"], by_id[(2, 3)]["end"]]
    items = [{"schema": "lvr.qa/1", "id": name, "video": f"{name}.mp4", "question": "Where is the key?",
              "options": OPTIONS, "answer": "B", "clues": [clue]} for name in ("numbers", "nohigh", "nofile")]
    (root / "qa.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "prompt.txt").write_text(PROMPT)
    return {"root": root, "videos": videos, "captions": captions, "cache": cache, "nodes": by_id,
            "duration": float(nodes[0]["video"]["duration"]), "qa": root / "qa.jsonl", "prompt": root / "prompt.txt",
            "model": build_tiny_qwen3(root / "tiny", vocab="small")}


def caption_result(world: dict, node_id: tuple) -> str:
    node = world["nodes"][node_id]
    return tool_result_message("get_caption", node_id, node["start"], node["end"], released_text(node))


def qa_result(world: dict) -> str:
    node = world["nodes"][(2, 3, 1)]
    return tool_result_message("video_qa", (2, 3, 1), node["start"], node["end"], SEEN, QUERY)


@pytest.fixture(scope="module")
def policy(world) -> Path:
    """A policy that (almost always) plays SCRIPT over the released captions."""
    by_id = world["nodes"]
    high = [((h,), by_id[(h,)]["start"], by_id[(h,)]["end"], released_text(by_id[(h,)])) for h in range(1, 5)]
    results = [caption_result(world, (2, 3)), caption_result(world, (2, 3, 1)),
               qa_result(world) + "\n\n" + LAST_ROUND_NOTICE]
    messages = [{"role": "system", "content": system_prompt(PROMPT, 4)},
                {"role": "user", "content": first_user_message("Where is the key?", OPTIONS, world["duration"], high)}]
    for turn, result in zip(SCRIPT, results):
        messages += [{"role": "assistant", "content": turn}, {"role": "user", "content": result}]
    messages.append({"role": "assistant", "content": SCRIPT[-1]})
    return sft(world, [{"messages": messages}], world["root"] / "scripted", steps=80, batch=1, lr="2e-2")


def expected_record(world: dict) -> dict:
    from lvr.prep.longvideo_r1 import folder_digest

    digest = folder_digest(world["captions"].glob("*.json"))
    return {"source": "longvideo-r1", "dir": str(world["captions"]), "sha256": digest,
            "model": "longvideo-r1-captions", "prompt_hash": f"imported:{digest[:16]}"}


def test_captions_stand_in_for_the_caption_model(world, tmp_path):
    """--captions needs no --caption-model; --dry-run checks the folder as eval does (in process)."""
    from typer.testing import CliRunner

    from lvr.cli.main import app

    base = ["rl", str(world["qa"]), "--video-dir", str(world["videos"]), "--model", str(world["model"]),
            "-o", str(tmp_path / "out"), "--dry-run"]
    runner = CliRunner()
    shown = runner.invoke(app, [*base, "--captions", str(world["captions"])])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)["data"]
    assert data["captions"] == expected_record(world) and data["items"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (([*base], "give --caption-model"),
                          ([*base], "or --captions DIR"),
                          ([*base, "--captions", str(tmp_path / "missing")], f"--captions {tmp_path / 'missing'}: "
                                                                              "not a folder"),
                          ([*base, "--captions", str(empty)], f"--captions {empty}: no caption files (*.json) in it")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len([x for x in result.output.splitlines() if x.strip()]) == 1, \
            result.output
    assert not (tmp_path / "out").exists()


def test_one_step_reads_every_caption_from_the_files(world, policy, tmp_path):
    """One GRPO step with --captions and a server that serves no caption model: the rollouts' captions are
    the files' text and no caption request is sent; nofile's item is skipped and nohigh's rollouts fail,
    each named, while numbers' train."""
    from transformers import AutoTokenizer

    out, log = tmp_path / "rl", tmp_path / "rollouts.jsonl"
    with FakeOpenAI(SEEN, models=("vision",), strict_models=True) as server:
        proc = run_lvr("rl", world["qa"], "--video-dir", world["videos"], "--model", policy, "-o", out,
                       "--captions", world["captions"], "--qa-model", "vision", "--qa-base-url", server.url,
                       "--cache-dir", world["cache"], "--system-prompt", world["prompt"], "--cpu",
                       "--no-gradient-checkpointing", "--num-generations", "2", "--batch-size", "2",
                       "--questions-per-step", "2", "--max-steps", "1", "--max-turns", "4", "--max-tokens", "64",
                       "--max-completion-length", "600", "--rollout-log", log)
    assert proc.returncode == 0, proc.stderr[-4000:]
    videos, captions = world["videos"], world["captions"]
    assert (f"lvr rl: a rollout of nohigh failed and is not scored: {videos / 'nohigh.mp4'} node (2,) (high level), "
            f"caption: no caption for it in {captions / 'nohigh.json'} (segment_id 2 of the high list)" in proc.stderr)

    record = json.loads((out / "lvr_rl.json").read_text())
    assert record["steps"] == 1 and record["data"]["items"] == 2
    assert record["data"]["skipped"] == [f"nofile: {videos / 'nofile.mp4'}: no caption file for it in --captions "
                                         f"{captions} (expected {captions / 'nofile.json'})"]
    navigator = record["navigator"]
    assert navigator["captions"] == expected_record(world)
    assert navigator["caption_prompt_hash"] == expected_record(world)["prompt_hash"]
    assert navigator["models"]["caption"] is None and navigator["models"]["qa"]["model"] == "vision"

    rollouts = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["qid"] for r in rollouts) == ["nohigh", "nohigh", "numbers", "numbers"]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    visits = []
    for r in rollouts:
        if r["qid"] == "nohigh":
            assert r["error"].endswith("(segment_id 2 of the high list)") and r["reward"] is None
            continue
        assert r["error"] is None and r["reward"] is not None
        prompt = tokenizer.decode(r["prompt_ids"])
        assert all(released_text(world["nodes"][(h,)]) in prompt for h in range(1, 5))
        for visit in r["visits"]:
            node = tuple(visit["node"])
            expected = caption_result(world, node) if visit["tool"] == "get_caption" else qa_result(world)
            assert expected in r["results"], (expected, r["results"])
            visits.append(visit["tool"])
    # The files answered the get_caption calls; the vision model answered video_qa's, and was asked nothing else.
    assert visits.count("get_caption") >= 2 and "video_qa" in visits, [r["turn_texts"] for r in rollouts]
    assert len(server.requests) == visits.count("video_qa")
    for body in server.requests:
        assert body["model"] == "vision" and QUERY in json.dumps(body["messages"])

"""Protocol profiles: the longvideo-r1 message layout field by field, and lvr's own left as it was.

The longvideo-r1 episode runs `lvr ask` end to end against scripted models behind a recording
server: two get_caption calls, one video_qa call and an answer, the answer in the last round.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import typer

from fake_openai import FakeOpenAI
from lvr.cli.main import app
from lvr.infer.agent import AgentOptions, Verdict
from lvr.infer.navigator import Navigator, NavigatorOptions
from lvr.infer.profiles import LONGVIDEO_R1_PROFILE, LVR_PROFILE, PROTOCOLS, message_text, text_messages
from lvr.prep.captioning import CAPTION_LAYOUT, frame_subtitles
from lvr.prep.captioning import prompt_hash as caption_prompt_hash
from lvr.prep.models import ModelSpec
from lvr_test_helpers import ASK_SCRIPT, load_jsonl, run_lvr

QUESTION = "What does the cook hold?"
OPTIONS = ["A. a knife", "B. a spoon"]
# Prompt files as a user has them: leading and trailing newlines, a CRLF line, stray braces.
SYSTEM = "\nYou navigate a caption tree {of clips}.\r\nThink, then call one tool or answer.\n"
QA_SYSTEM = "\nAnswer about the frames inside <answer></answer>.\n"
CAPTION_SYSTEM = "Describe the {num_frame} frames in at most {num_words} words, inside <caption></caption>."
QA_ANSWER = "A steel spoon."
LAST_ROUND = "This is the last round. You must provide the final answer in this round."


def reply(body: dict) -> str:
    """Scripted models: the navigator follows ASK_SCRIPT; the captioner names its first frame label."""
    if body["model"] == "captioner":
        return f"<think>plan</think><caption>Frames from {body['messages'][1]['content'][0]['text']}</caption>"
    if body["model"] == "qa":
        return f"<reasoning>The hand holds a spoon.</reasoning><answer>{QA_ANSWER}</answer>"
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return ASK_SCRIPT[min(turns, len(ASK_SCRIPT) - 1)]


def seconds(t: float) -> str:
    return str(round(t, 1))


def prompt_files(folder: Path) -> dict[str, Path]:
    files = {"--system-prompt": SYSTEM, "--qa-system-prompt": QA_SYSTEM, "--caption-system-prompt": CAPTION_SYSTEM}
    out = {}
    for flag, text in files.items():
        out[flag] = folder / (flag.strip("-") + ".txt")
        out[flag].write_bytes(text.encode())
    return out


@pytest.fixture(scope="module")
def kitchen(numbered_video, tmp_path_factory) -> Path:
    """The numbered video (12 s at 10 fps) with a sidecar subtitle line at 0.5-1.5 s."""
    root = tmp_path_factory.mktemp("kitchen")
    video = root / "kitchen.mp4"
    shutil.copy(numbered_video, video)
    (root / "kitchen.srt").write_text("1\n00:00:00,500 --> 00:00:01,500\nWelcome to the kitchen\n")
    return video


@pytest.fixture(scope="module")
def episode(kitchen, tmp_path_factory):
    """`lvr ask --protocol longvideo-r1` over 4 rounds: the requests each model got, the nodes, the record."""
    root = tmp_path_factory.mktemp("episode")
    files = prompt_files(root)
    cache = root / "cache"
    with FakeOpenAI(reply, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", kitchen, QUESTION, "-O", "a knife", "-O", "B. a spoon", "--protocol", "longvideo-r1",
                       *[a for flag, path in files.items() for a in (flag, path)], "--max-rounds", "4",
                       "--base-url", server.url, "--model", "navigator", "--caption-model", "captioner",
                       "--qa-model", "qa", "--cache-dir", cache, "-o", root / "answer.jsonl", "-q")
        assert proc.returncode == 0, proc.stderr
        requests = list(server.requests)
    (tree_file,) = (cache / "trees").glob("*/*.jsonl")
    nodes = {tuple(n["id"]): n for n in load_jsonl(tree_file)}
    calls = {name: [b for b in requests if b["model"] == name] for name in ("navigator", "captioner", "qa")}
    return {"stdout": proc.stdout, "calls": calls, "nodes": nodes, "cache": cache, "files": files,
            "record": load_jsonl(root / "answer.jsonl")[0]}


def frame_span(node: dict) -> tuple[str, str]:
    return seconds(node["frame_times"][0]), seconds(node["frame_times"][-1])


def caption_labels(node: dict) -> list[str]:
    """The reference's frame labels: the time, and on every frame of a node with subtitle lines, those."""
    if not node["subtitles"]:
        return [f"{seconds(t)}s." for t in node["frame_times"]]
    return [f"{seconds(t)}s. Subtitle: {','.join(lines)}." for t, lines in zip(node["frame_times"],
                                                                              frame_subtitles(node))]


def test_first_user_turn_is_question_duration_and_one_part_per_high_caption(episode):
    nav, nodes = episode["calls"]["navigator"], episode["nodes"]
    assert episode["stdout"].strip() == "B. a spoon"
    assert len(nav) == 4
    first = nav[0]["messages"][1]
    assert first["role"] == "user" and isinstance(first["content"], list)
    parts = first["content"]
    k = nodes[(1,)]["K"]
    assert len(parts) == 2 + k and all(p["type"] == "text" for p in parts)
    assert parts[0]["text"] == f"{QUESTION}\nA. a knife\nB. a spoon\n"
    assert parts[1]["text"] == "The total duration of the video is 12.0 seconds."
    for h in range(1, k + 1):
        start, end = frame_span(nodes[(h,)])
        m = re.fullmatch(r"High-level Caption (\d+) from (\d+\.\d) to (\d+\.\d):<caption>(.*)</caption>",
                         parts[1 + h]["text"], re.S)
        assert m, parts[1 + h]["text"]
        # Each clip's times are its first and last sampled frame's, in seconds to 0.1 s.
        assert m.groups()[:3] == (str(h), start, end)
        assert m.group(4) == f"Frames from {caption_labels(nodes[(h,)])[0]}"
    # The high captions open the conversation; no other message carries parts.
    assert all(isinstance(m["content"], str) for m in nav[-1]["messages"] if m is not nav[-1]["messages"][1])


def test_system_prompt_file_is_sent_unchanged(episode):
    for body in episode["calls"]["navigator"]:
        assert body["messages"][0] == {"role": "system", "content": SYSTEM}
    assert episode["files"]["--system-prompt"].read_bytes() == SYSTEM.encode()


def test_tool_results_and_the_last_round_message(episode):
    nav, nodes = episode["calls"]["navigator"], episode["nodes"]
    messages = nav[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "user"] * 3 + ["user"]
    assert [m["content"] for m in messages[2::2][:3]] == ASK_SCRIPT[:3]
    med_start, med_end = frame_span(nodes[(2, 3)])
    low_start, low_end = frame_span(nodes[(2, 3, 1)])
    assert messages[3]["content"] == (f"Medium-level Caption from tool get_caption((2,3)). From {med_start} to "
                                      f"{med_end}:<caption>Frames from {med_start}s.</caption>")
    assert messages[5]["content"] == (f"Low-level Caption from tool get_caption((2,3,1)). From {low_start} to "
                                      f"{low_end}:<caption>Frames from {low_start}s.</caption>")
    # video_qa's answer is read from its <answer> tag and comes back inside <information>.
    assert messages[7]["content"] == f"<information>{QA_ANSWER}</information>"
    # The last round gets a user message of its own, after the last tool result, in that round only.
    assert messages[8] == {"role": "user", "content": LAST_ROUND}
    assert all(LAST_ROUND not in json.dumps(body["messages"]) for body in nav[:-1])


def test_video_qa_request_layout(episode):
    (qa,) = episode["calls"]["qa"]
    leaf = episode["nodes"][(2, 3, 1)]
    assert qa["messages"][0] == {"role": "system", "content": QA_SYSTEM}
    parts = qa["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "What is in the hands?"}
    labels, images = parts[1::2], parts[2::2]
    assert [p["text"] for p in labels] == [f"Video frame at {seconds(t)} seconds:" for t in leaf["qa_frame_times"]]
    assert len(images) == len(leaf["qa_frame_keys"]) and all(p["type"] == "image_url" for p in images)


def test_caption_request_layout(episode):
    calls, nodes = episode["calls"]["captioner"], episode["nodes"]
    assert len(calls) == 4 + 2
    by_labels = {tuple(p["text"] for p in body["messages"][1]["content"][0::2]): body for body in calls}
    for node_id, words in (((1,), 400), ((2,), 400), ((2, 3), 400), ((2, 3, 1), 200)):
        # No intro and no closing words: a time label before each frame (with subtitles, on every label).
        labels = caption_labels(nodes[node_id])
        body = by_labels[tuple(labels)]
        parts = body["messages"][1]["content"]
        assert all(p["type"] == "image_url" for p in parts[1::2]) and len(parts) == 2 * len(labels)
        # The word limit per level and the frame count fill the user's caption prompt.
        assert body["messages"][0]["content"] == CAPTION_SYSTEM.replace("{num_frame}", str(len(labels))).replace(
            "{num_words}", str(words))
    assert any(label.endswith("s. Subtitle: Welcome to the kitchen.") for label in caption_labels(nodes[(1,)]))
    assert not nodes[(2,)]["subtitles"]


def test_protocol_is_recorded_and_hashed(episode):
    settings = episode["record"]["settings"]
    assert settings["protocol"] == "longvideo-r1"
    assert settings["prompt_hash"] == LONGVIDEO_R1_PROFILE.prompt_hash(SYSTEM) != LVR_PROFILE.prompt_hash(SYSTEM)
    assert settings["qa_prompt_hash"] == LONGVIDEO_R1_PROFILE.qa_prompt_hash(QA_SYSTEM) != \
        LVR_PROFILE.qa_prompt_hash(QA_SYSTEM)
    # Captions made under one layout are never served to the other: the layout is in the caption key.
    layout = LONGVIDEO_R1_PROFILE.caption_layout
    assert settings["caption_prompt_hash"] == caption_prompt_hash(CAPTION_SYSTEM, layout) != \
        caption_prompt_hash(CAPTION_SYSTEM)


def test_hints_are_parts_and_leave_the_clean_conversation(episode, kitchen):
    """Teacher synthesis under longvideo-r1: a hint is a text part of the last user message, and
    the clean conversation (what trajectories keep) has none of it."""
    files, hint = episode["files"], "Look again at the second clip."

    async def run(url: str):
        nav = NavigatorOptions(reasoning=ModelSpec(backend="openai", model="navigator", base_urls=(url,)),
                               caption=ModelSpec(backend="openai", model="captioner", base_urls=(url,)),
                               qa=ModelSpec(backend="openai", model="qa", base_urls=(url,)),
                               agent=AgentOptions(protocol="longvideo-r1"),
                               system_prompt_file=files["--system-prompt"],
                               caption_prompt_file=files["--caption-system-prompt"],
                               qa_prompt_file=files["--qa-system-prompt"])
        navigator = Navigator(nav, episode["cache"])
        verdicts = iter([Verdict(False, hint, 1), Verdict(True)])

        async def review(result, turn):
            return next(verdicts)

        try:
            return await navigator.ask(kitchen, QUESTION, tuple(OPTIONS), make_review=lambda env: review)
        finally:
            await navigator.aclose()

    with FakeOpenAI(reply, models=("navigator", "captioner", "qa")) as server:
        asked = asyncio.run(run(server.url))
        sent = [b["messages"] for b in server.requests if b["model"] == "navigator"]
    result = asked.result
    assert result.stopped == "answered" and result.choice == "B" and len(result.hints) == 1
    hinted = sent[-1][result.hints[0].message_index]
    assert hinted["content"] == [{"type": "text", "text": f"<information>{QA_ANSWER}</information>"},
                                 {"type": "text", "text": hint}]
    clean = result.clean_messages()
    assert clean[result.hints[0].message_index]["content"] == f"<information>{QA_ANSWER}</information>"
    assert hint not in json.dumps(clean)
    flat = text_messages(clean)
    assert all(isinstance(m["content"], str) for m in flat)
    assert flat[1]["content"] == message_text(clean[1]["content"]) == \
        "\n".join(p["text"] for p in clean[1]["content"])


def test_a_missing_prompt_file_is_named(tmp_path):
    proc = run_lvr("ask", tmp_path / "v.mp4", "Q?", "--protocol", "longvideo-r1", "--model", "m",
                   "--qa-system-prompt", prompt_files(tmp_path)["--qa-system-prompt"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert "--system-prompt FILE" in text and "--caption-system-prompt FILE" in text
    assert "--qa-system-prompt FILE" not in text and "lvr protocol extract" in text
    with pytest.raises(ValueError, match="--system-prompt FILE"):
        NavigatorOptions(agent=AgentOptions(protocol="longvideo-r1"))


def test_protocol_flag_on_every_navigating_command():
    group = typer.main.get_command(app)
    for name in ("ask", "eval", "synthesize", "rl"):
        (param,) = [p for p in group.commands[name].params if "--protocol" in p.opts]
        assert param.default == "lvr" and all(p in param.help for p in PROTOCOLS)
        assert "--qa-system-prompt" in {o for p in group.commands[name].params for o in p.opts}


def test_width_field_is_filled_and_other_braces_kept():
    assert LONGVIDEO_R1_PROFILE.system_message("{width} clips, {K}, {other}", 6) == "6 clips, {K}, {other}"
    assert LVR_PROFILE.system_message("{width} and {K}", 6) == "{width} and 6"


def test_lvr_profile_is_what_lvr_always_sent():
    """The default profile keeps every hash and the video_qa layout it had before profiles existed."""
    text = "Some prompt {K}."
    assert AgentOptions().protocol == "lvr" and NavigatorOptions().agent.profile is LVR_PROFILE
    assert LVR_PROFILE.prompt_hash(text) == hashlib.sha256(f"1\n{text}".encode()).hexdigest()[:16]
    assert LVR_PROFILE.qa_prompt_hash(text) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert LVR_PROFILE.caption_prompt_hash(text) == caption_prompt_hash(text, CAPTION_LAYOUT) == \
        hashlib.sha256(f"1\n{text}".encode()).hexdigest()[:16]
    node = {"start": 62.0, "end": 65.5}
    messages = LVR_PROFILE.video_qa_messages(node, [b"a", b"b"], [62.0, 63.75], "Who?", "SYS")
    assert messages == [{"role": "system", "content": "SYS"}, {"role": "user", "content": [
        {"type": "text",
         "text": "2 frames from a clip of a video, 01:02.0 to 01:05.5, each preceded by its timestamp."},
        {"type": "text", "text": "[01:02.0]"}, {"type": "image", "jpeg": b"a"},
        {"type": "text", "text": "[01:03.8]"}, {"type": "image", "jpeg": b"b"},
        {"type": "text", "text": "Question: Who?"}]}]
    assert LVR_PROFILE.video_qa_answer("\n A white cup.<answer>x</answer> ") == "A white cup.<answer>x</answer>"
    assert LONGVIDEO_R1_PROFILE.video_qa_answer("<reasoning>r</reasoning><answer> A cup. </answer>") == "A cup."
    assert LONGVIDEO_R1_PROFILE.video_qa_answer("A cup, untagged.") == "A cup, untagged."

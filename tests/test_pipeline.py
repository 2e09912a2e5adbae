"""The training pipeline end to end: synthesize -> export -> sft -> ask with the checkpoint.

A scripted teacher writes trajectories through the real `ask` loop, a tiny Qwen3 is
fine-tuned on them, and `lvr ask --backend transformers --model OUT` then emits
protocol-valid turns on a held-in example.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fake_openai import FakeOpenAI
from lvr.infer.protocol import parse_turn

LVR = [sys.executable, "-m", "lvr.cli"]
QUESTIONS = ["Which number shows first?", "What colour is the text?", "Is there sound?", "What counts up?"]
FIRST_TURN = "<think>The second high clip looks right.</think>\n<tool>get_caption((2, 1))</tool>"
LAST_TURN = "<think>That settles it.</think>\n<answer>B</answer>"


def run_lvr(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models train faster single-threaded on a busy CPU
    return subprocess.run([*LVR, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def scripted(body: dict) -> str:
    if body["model"] == "captioner":
        return "<caption>White digits count up on black.</caption>"
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return FIRST_TURN if turns == 0 else LAST_TURN


def test_synthesize_sft_then_ask_emits_protocol_turns(numbered_video, tmp_path):
    from tiny_models import build_tiny_qwen3

    (tmp_path / "numbers.mp4").write_bytes(numbered_video.read_bytes())
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({
        "schema": "lvr.qa/1", "id": f"q{i}", "video": "numbers.mp4", "question": q,
        "options": ["A. no", "B. yes"], "answer": "B", "clues": [[3.0, 3.8]]}) + "\n"
        for i, q in enumerate(QUESTIONS)))
    cache = tmp_path / "cache"
    with FakeOpenAI(scripted, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", "--teacher-model", "teacher", "--base-url", server.url,
                       "--caption-model", "captioner", "--cache-dir", cache, "-o", "traj.jsonl", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        proc = run_lvr("synthesize", "--export-sft", tmp_path / "traj.jsonl", "-o", tmp_path / "sft.jsonl")
        assert proc.returncode == 0, proc.stderr
        assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == len(QUESTIONS)

        out = tmp_path / "navigator"
        model = build_tiny_qwen3(tmp_path / "tiny", vocab="small")
        proc = run_lvr("sft", tmp_path / "sft.jsonl", "--model", model, "-o", out, "--max-steps", "50",
                       "--lr", "1e-2", "--batch-size", "4", "--warmup-ratio", "0.05", "--scheduler", "constant_with_warmup", "--cpu",
                       "--no-gradient-checkpointing", "--logging-steps", "1")
        assert proc.returncode == 0, proc.stderr
        losses = [p["loss"] for p in json.loads((out / "lvr_sft.json").read_text())["losses"]]
        assert losses[-1] < losses[0] / 2, losses

        # Held-in example: the first question, with the captions the teacher saw (from the store).
        proc = run_lvr("ask", tmp_path / "numbers.mp4", QUESTIONS[0], "-O", "A. no", "-O", "B. yes",
                       "--backend", "transformers", "--model", out, "--device", "cpu",
                       "--caption-backend", "openai", "--caption-base-url", server.url, "--caption-model", "captioner",
                       "--cache-dir", cache, "--max-rounds", "4", "--max-tokens", "48", "--trace", tmp_path / "t.jsonl")
    trace = json.loads((tmp_path / "t.jsonl").read_text())
    turns = trace["turns"]
    assert turns, proc.stderr
    first = parse_turn(turns[0]["text"], 4)
    assert first.breach is None and first.think, turns[0]["text"]
    assert first.call is not None and first.call.render() == "get_caption((2, 1))", turns[0]["text"]
    assert all(parse_turn(t["text"], 4).breach is None for t in turns), [t["text"] for t in turns]
    assert trace["stopped"] == "answered" and trace["answer"]["choice"] == "B"
    assert proc.returncode == 0 and proc.stdout.strip() == "B. yes", proc.stderr
    assert trace["accounting"]["caption_calls"]["made"] == 0   # every caption came from the store
    print(f"\npipeline: sft loss {losses[0]:.3f} -> {losses[-1]:.3f}; ask turns: "
          + " | ".join(t["text"].replace("\n", " ") for t in turns) + f"; stopped {trace['stopped']}")

"""The training pipeline end to end: synthesize -> export -> sft -> ask, then pairs -> dpo -> ask.

A scripted teacher writes trajectories through the real `ask` loop (wrong once on two
items, so there are dropped turns), a tiny Qwen3 is fine-tuned on them, and
`lvr ask --backend transformers --model OUT` then emits protocol-valid turns on a
held-in example. The dropped turns become preference pairs, `lvr dpo` trains on them
from the SFT checkpoint, and `lvr ask` runs the DPO checkpoint too.
"""

from __future__ import annotations

import json

from fake_openai import FakeOpenAI
from lvr.infer.protocol import parse_turn
from lvr_test_helpers import run_lvr

QUESTIONS = ["Which number shows first?", "What colour is the text?", "Is there sound?", "What counts up?"]
FIRST_TURN = "<think>The second high clip looks right.</think>\n<tool>get_caption((2, 1))</tool>"
LAST_TURN = "<think>That settles it.</think>\n<answer>B</answer>"
WRONG_TURN = "<think>Probably not.</think>\n<answer>A</answer>"


def scripted(body: dict) -> str:
    if body["model"] == "captioner":
        return "<caption>White digits count up on black.</caption>"
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if turns == 0:
        return FIRST_TURN
    hinted = "Hint:" in body["messages"][-1]["content"]
    first_try_wrong = any(q in body["messages"][1]["content"] for q in QUESTIONS[2:])
    return WRONG_TURN if first_try_wrong and not hinted else LAST_TURN


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

    # The two dropped wrong answers become preference pairs; DPO trains on them from the SFT checkpoint.
    proc = run_lvr("synthesize", "--export-pairs", tmp_path / "traj.jsonl", "-o", tmp_path / "pairs.jsonl")
    assert proc.returncode == 0, proc.stderr
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 and all(p["rejected"][0]["content"] == WRONG_TURN for p in pairs)
    assert all(p["chosen"][0]["content"] == LAST_TURN for p in pairs)
    dpo_out = tmp_path / "navigator-dpo"
    proc = run_lvr("dpo", tmp_path / "pairs.jsonl", "--model", out, "-o", dpo_out, "--max-steps", "4",
                   "--lr", "1e-4", "--batch-size", "2", "--cpu", "--precompute-ref")
    assert proc.returncode == 0, proc.stderr
    with FakeOpenAI(scripted, models=("teacher", "captioner")) as server:
        proc = run_lvr("ask", tmp_path / "numbers.mp4", QUESTIONS[2], "-O", "A. no", "-O", "B. yes",
                       "--backend", "transformers", "--model", dpo_out, "--device", "cpu",
                       "--caption-backend", "openai", "--caption-base-url", server.url, "--caption-model", "captioner",
                       "--cache-dir", cache, "--max-rounds", "4", "--max-tokens", "48", "--trace", tmp_path / "t2.jsonl")
    dpo_turns = json.loads((tmp_path / "t2.jsonl").read_text())["turns"]
    assert dpo_turns and all(parse_turn(t["text"], 4).breach is None for t in dpo_turns), proc.stderr
    assert proc.returncode == 0 and proc.stdout.strip() == "B. yes", [t["text"] for t in dpo_turns]
    print(f"\npipeline: sft loss {losses[0]:.3f} -> {losses[-1]:.3f}; ask turns: "
          + " | ".join(t["text"].replace("\n", " ") for t in turns) + f"; stopped {trace['stopped']}")

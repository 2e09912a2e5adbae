"""Training on grounding items (issue 15): mixed QA and grounding files, the teacher's interval
review and hints in `lvr synthesize`, the grounding reward in `lvr rl`, and token-aware KL on the
timestamp tokens of an interval answer.

The world is the 12 s numbered video (K = 4): the QA item's clue is medium clip (2, 3), the
grounding item's target is its first leaf (2, 3, 1). The RL policy is a tiny Qwen3 SFT'd on one
scripted trajectory per task (two get_caption calls, then the answer: the letter B, or the leaf's
interval), so its rollouts are real multi-turn runs through the environment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.infer.profiles import LVR_PROFILE
from lvr.infer.protocol import format_interval, format_time
from lvr_test_helpers import caption_text, load_jsonl, run_lvr, write_jsonl

OPTIONS = ["A. one", "B. two", "C. three", "D. four"]
PROMPT = "Explore the {K}-ary clip tree. Reply <think>...</think> then <tool>get_caption((h, m))</tool> or " \
         "<answer>X</answer>."
QUESTION = "Question 0: where is it?"
QUERY = "the first frames of the third medium clip of the second high clip"
MEDIUM, LEAF = (2, 3), (2, 3, 1)


def captioner(body: dict) -> str:
    return f"<caption>{caption_text(body)}</caption>"


def node_caption(node: dict) -> str:
    """What `captioner` writes for NODE (the caption the environment hands back)."""
    return f"A {node['level']} clip from {format_time(node['start'])} to {format_time(node['end'])}."


def span(world: dict, node_id: tuple) -> list[float]:
    node = world["nodes"][node_id]
    return [node["start"], node["end"]]


@pytest.fixture(scope="module")
def world(numbered_video, tmp_path_factory) -> dict:
    """The video, its tree, one QA and one grounding item in one file, a prompt file, a tiny model."""
    from tiny_models import build_tiny_qwen3

    from lvr.prep.segment import SegmentOptions, load_or_segment
    from lvr.prep.tree import TreeOptions

    root = tmp_path_factory.mktemp("grounding-training")
    (root / "numbers.mp4").write_bytes(numbered_video.read_bytes())
    cache = root / "cache"
    nodes = load_or_segment(root / "numbers.mp4", SegmentOptions(tree=TreeOptions(), qa_frames=True), cache)
    by_id = {tuple(n["id"]): n for n in nodes}
    assert nodes[0]["K"] == 4
    w = {"root": root, "cache": cache, "nodes": by_id, "duration": float(nodes[0]["video"]["duration"])}
    qa = {"schema": "lvr.qa/1", "id": "q0", "video": "numbers.mp4", "question": QUESTION, "options": OPTIONS,
          "answer": "B", "clues": [span(w, MEDIUM)]}
    grounding = {"schema": "lvr.grounding/1", "id": "g0", "video": "numbers.mp4", "query": QUERY,
                 "targets": [span(w, LEAF)]}
    write_jsonl(root / "mixed.jsonl", [qa, grounding])
    (root / "prompt.txt").write_text(PROMPT)
    return {**w, "qa": root / "mixed.jsonl", "prompt": root / "prompt.txt",
            "model": build_tiny_qwen3(root / "tiny", vocab="small")}


# -- the mixed file ----------------------------------------------------------------------------------

def test_one_file_mixes_qa_and_grounding_items(tmp_path):
    from lvr.infer.grounding import GroundingItem
    from lvr.train.qa_items import QAItem, clue_intervals, item_task, load_qa_items, load_training_items

    qa = {"schema": "lvr.qa/1", "video": "v.mp4", "question": "Which?", "options": ["A. x", "B. y"], "answer": "B",
          "clues": [[1, 2]]}
    ground = {"schema": "lvr.grounding/1", "video": "v.mp4", "query": "a door opens", "targets": [[3, 4], [8, 9]]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        qa, ground,
        {**ground, "targets": [[5, 4]]},                                  # reversed: named and skipped
        {**ground, "id": "v.mp4#1", "query": "the same id as the QA item"},   # ids are unique across kinds
        {**ground, "id": "g", "video": "w.mp4", "duration": 10.0},
        {**qa, "schema": "lvr.nothing/1"},
    ])
    items, errors = load_training_items(path)
    assert [(type(i), i.qid) for i in items] == [(QAItem, "v.mp4#1"), (GroundingItem, "v.mp4#2"), (GroundingItem, "g")]
    assert [item_task(i) for i in items] == ["qa", "grounding", "grounding"]
    assert clue_intervals(items[1]) == ((3.0, 4.0), (8.0, 9.0))          # a grounding item's clues: its targets
    assert items[2].duration == 10.0 and items[1].query == "a door opens"
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:3", f"{path}:4", f"{path}:6"]
    assert "reversed" in errors[0] and "duplicate id 'v.mp4#1'" in errors[1] and "lvr.nothing/1" in errors[2]
    # A file of grounding items alone is told apart too; the QA-only loader still refuses them.
    alone = write_jsonl(tmp_path / "grounding.jsonl", [ground])
    assert [item_task(i) for i in load_training_items(alone)[0]] == ["grounding"]
    assert load_qa_items(path)[0] == [items[0]]


# -- the timestamp tokens of an interval answer ---------------------------------------------------------

def merging_tokenizer():
    """A byte-level BPE with no pre-tokenizer split, so its tokens run across digits, brackets and commas."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"<think>Near the end.</think><answer>[{a}.5, {b}]</answer>" for a in range(10, 20)
              for b in range(25, 35)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def char_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's characters in the decoded text, measured by decoding ever longer prefixes."""
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


@pytest.mark.parametrize("tokenizer_kind", ["merging", "tiny"])
def test_timestamp_tokens_are_the_interval_numbers(world, tokenizer_kind):
    from transformers import AutoTokenizer

    from lvr.train.rollout import timestamp_token_mask

    tokenizer = merging_tokenizer() if tokenizer_kind == "merging" else AutoTokenizer.from_pretrained(world["model"])
    text = "<think>Not [1, 2] but later.</think><answer>[12.5, 30s]</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    if tokenizer_kind == "merging":  # the case this tokenizer is for: a digit and a bracket or comma in one token
        assert any(re.search(r"\d", p) and re.search(r"[\[\],]", p) for p in pieces), pieces
    answer = text.index("<answer>")
    times = [(answer + m.start(), answer + m.end()) for m in re.finditer(r"\d+(?:\.\d+)?", text[answer:])]
    assert [text[a:b] for a, b in times] == ["12.5", "30"]
    expected = [int(any(a < hi and b > lo for lo, hi in times)) for a, b in char_spans(tokenizer, ids)]
    assert timestamp_token_mask(tokenizer, ids) == expected
    marked = "".join(p for p, m in zip(pieces, expected) if m)
    assert "12.5" in marked and "30" in marked and "answer" not in marked
    for other in ("<think>x</think><answer>B</answer>", "<think>x</think><answer>at 12.5 s</answer>",
                  "<think>x</think><tool>get_caption((2, 3))</tool>", "<think>[1, 2]</think>"):
        assert not any(timestamp_token_mask(tokenizer, tokenizer(other, add_special_tokens=False)["input_ids"]))


# -- synthesize: the teacher's interval is reviewed by IoU -------------------------------------------------

def grounding_teacher(world: dict):
    """A teacher that answers the QA item at once, and grounds the query first with the whole medium
    clip (IoU 2/7 with the leaf), then, after a hint, with the leaf itself."""
    script = ["<think>The query is in clip (2, 3).</think><tool>get_caption((2, 3))</tool>",
              f"<think>All of it.</think><answer>{format_interval(*span(world, MEDIUM))}</answer>",
              "<think>Its first leaf, then.</think><tool>get_caption((2, 3, 1))</tool>",
              f"<think>Exactly this leaf.</think><answer>{format_interval(*span(world, LEAF))}</answer>"]

    def reply(body: dict) -> str:
        if body["model"] == "captioner":
            return captioner(body)
        if not body["messages"][1]["content"].startswith("Find when this happens"):
            return "<think>Two.</think><answer>B</answer>"
        turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
        hints = sum(m["content"].count("Hint:") for m in body["messages"] if m["role"] == "user")
        return script[turns + hints]

    return reply


def synthesize(world: dict, out: Path, *extra):
    with FakeOpenAI(grounding_teacher(world), models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", world["qa"], "--model", "teacher", "--base-url", server.url, "--caption-model",
                       "captioner", "--cache-dir", world["cache"], "--system-prompt", world["prompt"], "-o", out,
                       *extra)
        sent = [b for b in server.requests if b["model"] == "teacher" and "Find when" in b["messages"][1]["content"]]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["qid"]: r for r in load_jsonl(out)}, sent


def test_synthesize_reviews_an_interval_by_iou_and_hints_the_target_node(world, tmp_path):
    leaf, medium = span(world, LEAF), span(world, MEDIUM)
    records, sent = synthesize(world, tmp_path / "traj.jsonl")
    qa, rec = records["q0"], records["g0"]
    assert (qa["task"], qa["accepted"], qa["answer"], qa["hints"]) == ("qa", True, "B", [])
    assert "targets" not in qa and "iou" not in qa
    # The medium clip's interval overlaps the leaf by 0.2 s of 0.7 s: below 0.5, so dropped, and the
    # first hint names the high clip that holds the target.
    assert rec["task"] == "grounding" and rec["accepted"] is True and rec["correct"] is True
    assert (rec["question"], rec["options"], rec["answer"]) == (QUERY, [], None)
    assert rec["targets"] == [leaf] and rec["clues"] == [leaf] and rec["accept_iou"] == 0.5
    assert rec["interval"] == leaf and rec["iou"] == 1.0 and rec["attempts"] == 2
    assert [(h["level"], h["after_turn"], h["ids"]) for h in rec["hints"]] == [(1, 1, [[2]])]
    assert "(2,)" in rec["hints"][0]["text"]
    (dropped,) = rec["dropped"]
    assert dropped["interval"] == medium and dropped["iou"] == pytest.approx(2 / 7)
    assert dropped["answer"] == format_interval(*medium) and dropped["hint_level"] == 1
    # The teacher was told it is grounding, saw the hint after its dropped answer, and the saved
    # conversation is the clean one.
    assert sent[0]["messages"][0]["content"].endswith(LVR_PROFILE.grounding_note)
    assert sent[2]["messages"][-1]["content"].endswith(rec["hints"][0]["text"])
    msgs = rec["messages"]
    assert [m["content"] for m in msgs if m["role"] == "assistant"][-1].endswith(
        f"<answer>{format_interval(*leaf)}</answer>")
    assert "Hint" not in json.dumps(msgs) and format_interval(*medium) not in json.dumps(msgs)
    assert [v["node"] for v in rec["visits"]] == [list(MEDIUM), list(LEAF)]
    # The trajectory passes the lint and exports to SFT like a QA one.
    assert run_lvr("synthesize", "--lint", tmp_path / "traj.jsonl").returncode == 0
    sft = tmp_path / "sft.jsonl"
    assert run_lvr("synthesize", "--export-sft", tmp_path / "traj.jsonl", "-o", sft).returncode == 0
    exported = sorted(json.dumps(s["messages"]) for s in load_jsonl(sft))   # items end in either order
    assert exported == sorted(json.dumps(m) for m in (qa["messages"], msgs))


def test_accept_iou_sets_the_threshold(world, tmp_path):
    records, _ = synthesize(world, tmp_path / "traj.jsonl", "--accept-iou", "0.25")
    rec = records["g0"]
    assert rec["accepted"] is True and rec["hints"] == [] and rec["accept_iou"] == 0.25
    assert rec["interval"] == span(world, MEDIUM) and rec["iou"] == pytest.approx(2 / 7)
    from typer.testing import CliRunner

    from lvr.cli.main import app

    bad = CliRunner().invoke(app, ["synthesize", str(world["qa"]), "--model", "m", "--accept-iou", "1.5"])
    assert bad.exit_code == 2 and "--accept-iou" in bad.output


# -- rl: one step on the mixed file --------------------------------------------------------------------------

def opening(world: dict, grounding: bool) -> list[dict]:
    """The first two messages of a rollout, as `run_agent` builds them for the task."""
    high = [((h,), *span(world, (h,)), node_caption(world["nodes"][(h,)])) for h in range(1, 5)]
    return [{"role": "system", "content": LVR_PROFILE.system_message(PROMPT, 4, grounding)},
            {"role": "user", "content": LVR_PROFILE.first_user_content(QUERY if grounding else QUESTION,
                                                                       () if grounding else OPTIONS,
                                                                       world["duration"], high, grounding)}]


def result_for(world: dict, node_id: tuple) -> str:
    node = world["nodes"][node_id]
    return LVR_PROFILE.tool_result("get_caption", node_id, node["start"], node["end"], node_caption(node))


@pytest.fixture(scope="module")
def policy(world) -> Path:
    """A policy that (almost always) reads (2, 3), then (2, 3, 1), then answers B or the leaf's interval."""
    samples = []
    for grounding in (False, True):
        answer = format_interval(*span(world, LEAF)) if grounding else "B"
        messages = opening(world, grounding) + [
            {"role": "assistant", "content": "<think>Clip (2,) fits.</think><tool>get_caption((2, 3))</tool>"},
            {"role": "user", "content": result_for(world, MEDIUM)},
            {"role": "assistant", "content": "<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>"},
            {"role": "user", "content": result_for(world, LEAF)}]
        LVR_PROFILE.add_last_round(messages)
        samples += [{"messages": messages + [{"role": "assistant",
                                              "content": f"<think>Seen it.</think><answer>{answer}</answer>"}]}] * 2
    data = write_jsonl(world["root"] / "policy.jsonl", samples)
    out = world["root"] / "policy"
    proc = run_lvr("sft", data, "--model", world["model"], "-o", out, "--lr", "1e-2", "--max-steps", "200",
                   "--batch-size", "1", "--warmup-ratio", "0", "--scheduler", "constant", "--max-length", "2048",
                   "--save-steps", "10000", "--cpu", "--no-gradient-checkpointing", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_rl_reads_a_mixed_file_and_the_reference_rule_refuses_grounding(world, tmp_path):
    """Checked before any model loads (in process: a dry run imports nothing heavy)."""
    from typer.testing import CliRunner

    from lvr.cli.main import app

    base = ["rl", str(world["qa"]), "--model", str(world["model"]), "-o", str(tmp_path / "out"), "--caption-model",
            "c", "--dry-run"]
    shown = CliRunner().invoke(app, base)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["data"] == {"items": 2, "videos": 1, "skipped": []}
    refused = CliRunner().invoke(app, [*base, "--reward", "reference"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "1 grounding items, which --reward reference cannot score" in refused.output


STEP = ["--num-generations", "2", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--max-turns", "3",
        "--max-tokens", "40", "--max-completion-length", "400"]


def test_one_step_on_a_mixed_file_scores_grounding_by_its_interval(world, policy, tmp_path):
    from lvr.train.rewards import rollout_reward

    out, log = tmp_path / "rl", tmp_path / "rollouts.jsonl"
    with FakeOpenAI(captioner, models=("captioner",)) as server:
        proc = run_lvr("rl", world["qa"], "--model", policy, "-o", out, "--caption-model", "captioner",
                       "--caption-base-url", server.url, "--cache-dir", world["cache"], "--system-prompt",
                       world["prompt"], "--cpu", "--no-gradient-checkpointing", *STEP, "--kl-timestamp-scale", "0.1",
                       "--rollout-log", log)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 items (1 QA, 1 grounding) over 1 videos" in proc.stderr
    record = json.loads((out / "lvr_rl.json").read_text())
    s = record["settings"]
    assert (s["w_iou"], s["w_interval_center_distance"], s["kl_timestamp_scale"]) == (1.0, 1.0, 0.1)
    assert record["settings"]["reward_weights"]["iou"] == 1.0
    rollouts = load_jsonl(log)
    assert sorted(r["qid"] for r in rollouts) == ["g0", "g0", "q0", "q0"]
    leaf = span(world, LEAF)
    for r in rollouts:
        parts = r["reward"]
        assert parts == rollout_reward("lvr", r).to_record()        # the logged parts are the rule's numbers
        if r["qid"] == "g0":
            assert r["task"] == parts["task"] == "grounding" and r["targets"] == [leaf] and r["reference"] is None
            assert r["clues"] == [leaf] and r["options"] == []
            assert parts["answer"] is None and parts["iou"] is not None and parts["localisation"] is not None
            if r["interval"] == leaf:
                assert parts["iou"] == 1.0 and parts["interval_center_distance"] == 1.0
            assert parts["total"] == pytest.approx(parts["iou"] + parts["interval_center_distance"]
                                                   + parts["localisation"] - 0.2 * parts["repeat"])
        else:
            assert r["task"] == parts["task"] == "qa" and "interval" not in r
            assert parts["iou"] is None and parts["interval_center_distance"] is None and parts["answer"] is not None
    answered = [r for r in rollouts if r["qid"] == "g0" and r["interval"] is not None]
    assert answered, [r["turn_texts"] for r in rollouts]
    point = record["curve"][0]
    assert "rewards/iou" in point and "rewards/interval_center_distance" in point and "rewards/answer" in point
    assert point["kl_timestamp_tokens"] > 0


# -- token-aware KL on the timestamp tokens, read off the trained batch ----------------------------------

def timestamp_positions(tokenizer, ids: list[int], sampled: list[int]) -> list[int]:
    """Where the two numbers of the last interval answer stand among IDS, found independently of lvr's mask:
    per-token character spans by prefix decoding, the numbers by a regex over the decoded text."""
    text = tokenizer.decode(ids)
    found = list(re.finditer(r"<answer>\[\s*(\d+(?:\.\d+)?)\s*s?\s*,\s*(\d+(?:\.\d+)?)\s*s?\s*\]</answer>", text))
    if not found:
        return []
    numbers = [found[-1].span(1), found[-1].span(2)]
    return [i for i, (a, b) in enumerate(char_spans(tokenizer, ids))
            if sampled[i] and any(a < hi and b > lo for lo, hi in numbers)]


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scale", [0.1, None])
def test_the_answer_timestamp_tokens_get_the_scaled_kl(world, policy, tmp_path, one_thread, scale):
    """One GRPO step in process, its reference model moved away from the policy (as after some
    training) so the reference and sampling log-probs differ. On the timestamp tokens of each
    grounding answer the KL's reference is moved so that the k3 gradient is `scale` times TRL's; every
    other token keeps TRL's reference, and with the option off all of them do."""
    import torch
    from transformers import AutoTokenizer

    from lvr.infer.agent import AgentOptions
    from lvr.infer.navigator import NavigatorOptions
    from lvr.prep.models import ModelSpec
    from lvr.train.rl import RlSettings, build_trainer, scaled_reference

    settings = RlSettings(qa=str(world["qa"]), output=str(tmp_path / "rl"), model=str(policy), cpu=True,
                          gradient_checkpointing=False, num_generations=2, batch_size=2, grad_accum=2, max_steps=1,
                          max_turns=3, max_tokens=40, max_completion_length=400, kl_timestamp_scale=scale)
    with FakeOpenAI(captioner, models=("captioner",)) as server:
        captions = ModelSpec(backend="openai", model="captioner", base_urls=(server.url,))
        nav = NavigatorOptions(reasoning=ModelSpec(backend="transformers", model=str(policy)), caption=captions,
                               qa=captions, agent=AgentOptions(max_rounds=3, max_tokens=40, temperature=1.0, seed=42),
                               system_prompt_file=world["prompt"])
        run = build_trainer(settings, nav, world["cache"])
        trainer = run.trainer
        try:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in trainer.ref_model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            trainer.train()
        finally:
            run.rollouts.close()
    batch, rollouts = trainer.lvr_last_batch, trainer.lvr_rollouts.last
    before, after, current = batch["trl_ref_per_token_logps"], batch["ref_per_token_logps"], batch["kl_current_logps"]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    marks = torch.zeros_like(before, dtype=torch.bool)
    for row, r in enumerate(rollouts):
        n = int(batch["completion_mask"][row].sum())
        sampled = batch.get("tool_mask", batch["completion_mask"])[row][:n].tolist()
        positions = timestamp_positions(tokenizer, batch["completion_ids"][row][:n].tolist(), sampled)
        assert not positions or r["task"] == "grounding"
        marks[row, positions] = True
    assert marks.any(), [r["turn_texts"] for r in rollouts]     # a grounding rollout answered with an interval
    logged = trainer.state.log_history[0]
    if scale is None:
        assert torch.equal(after, before) and "kl_timestamp_tokens" not in logged
        return
    assert torch.equal(after[~marks], before[~marks])
    assert torch.allclose(after[marks], scaled_reference(before, current, scale)[marks], atol=1e-6)
    assert (after[marks] - before[marks]).abs().max() > 1e-2          # the shift is real, not a rounding
    assert logged["kl_timestamp_tokens"] == int(marks.sum())

    def k3_gradient(ref):  # TRL's per-token KL term, differentiated at the sampling log-probs
        logp = current[marks].clone().requires_grad_(True)
        (torch.exp(ref[marks] - logp) - (ref[marks] - logp) - 1).sum().backward()
        return logp.grad

    assert torch.allclose(k3_gradient(after), scale * k3_gradient(before), atol=1e-5)

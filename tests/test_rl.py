"""`lvr rl`: multi-turn GRPO rollouts through the `ask` loop, their masks, one step, two processes, learning.

Everything is offline: a 12 s synthetic video (K = 4), a captioner behind the fake
OpenAI server, and a tiny Qwen3 with a small BPE vocabulary, warm-started with a few
`lvr sft` steps so that it writes valid turns:

- `scripted_policy`: SFT on one fixed three-turn trajectory, so rollouts call
  get_caption((2, 3)), then get_caption((2, 3, 1)), then answer: real multi-turn
  rollouts that run the environment;
- the sampled learning test: SFT on trajectories with random clips and answers, so RL
  has something to improve.

Every subprocess runs with one torch thread: tiny models train many times faster
without intra-op threads fighting over a small shared CPU.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.infer.protocol import (LAST_ROUND_NOTICE, complete_stopped_turn, first_user_message, format_time,
                                system_prompt, tool_result_message)
from lvr_test_helpers import REPO, run_lvr, run_lvr_in_two_processes

OPTIONS = ["A. one", "B. two", "C. three", "D. four"]
PROMPT = "Explore the {K}-ary clip tree. Reply <think>...</think> then <tool>get_caption((h, m))</tool> or " \
         "<answer>X</answer>."
SCRIPT = ["<think>Clip (2,) fits.</think><tool>get_caption((2, 3))</tool>",
          "<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>",
          "<think>Seen it.</think><answer>B</answer>"]
IM_END, USER, ASSISTANT = "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n"


def caption_for(level: str, start: str, end: str) -> str:
    return f"A {level} clip from {start} to {end}."


def fake_caption(body: dict) -> str:
    intro = body["messages"][1]["content"][0]["text"]
    m = re.search(r"from a (\w+)-level clip of a video, from (\S+) to (\S+)\.(?:\s|$)", intro)
    return f"<caption>{caption_for(*m.groups())}</caption>"


def node_caption(node: dict) -> str:
    return caption_for(node["level"], format_time(node["start"]), format_time(node["end"]))


# -- the toy world ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(numbered_video, tmp_path_factory) -> dict:
    """A QA folder (video, QA items with the clue in medium clip (2, 3)), its tree, a prompt file, a tiny model."""
    from tiny_models import build_tiny_qwen3

    from lvr.prep.segment import SegmentOptions, load_or_segment
    from lvr.prep.tree import TreeOptions

    root = tmp_path_factory.mktemp("rl")
    video = root / "numbers.mp4"
    video.write_bytes(numbered_video.read_bytes())
    cache = root / "cache"
    nodes = load_or_segment(video, SegmentOptions(tree=TreeOptions(), qa_frames=True), cache)
    by_id = {tuple(n["id"]): n for n in nodes}
    assert nodes[0]["K"] == 4
    clue = [by_id[(2, 3)]["start"], by_id[(2, 3)]["end"]]
    items = [{"schema": "lvr.qa/1", "id": f"q{n}", "video": "numbers.mp4", "question": f"Question {n}: where is it?",
              "options": OPTIONS, "answer": "B", "clues": [clue]} for n in range(4)]
    (root / "qa.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "prompt.txt").write_text(PROMPT)
    model = build_tiny_qwen3(root / "tiny", vocab="small")
    return {"root": root, "cache": cache, "nodes": by_id, "duration": float(nodes[0]["video"]["duration"]),
            "items": items, "model": model, "qa": root / "qa.jsonl", "prompt": root / "prompt.txt"}


def opening(world: dict, question: str) -> list[dict]:
    """The first two messages of a rollout, as `run_agent` will build them."""
    by_id = world["nodes"]
    high = [((h,), by_id[(h,)]["start"], by_id[(h,)]["end"], node_caption(by_id[(h,)])) for h in range(1, 5)]
    return [{"role": "system", "content": system_prompt(PROMPT, 4)},
            {"role": "user", "content": first_user_message(question, OPTIONS, world["duration"], high)}]


def result_for(world: dict, node_id: tuple) -> str:
    node = world["nodes"][node_id]
    return tool_result_message("get_caption", node_id, node["start"], node["end"], node_caption(node))


def sft(world: dict, samples: list[dict], out: Path, steps: int, batch: int, lr: str) -> Path:
    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    proc = run_lvr("sft", data, "--model", world["model"], "-o", out, "--lr", lr, "--max-steps", steps,
                   "--batch-size", batch, "--warmup-ratio", "0", "--scheduler", "constant", "--max-length", "2048",
                   "--save-steps", "10000", "--cpu", "--no-gradient-checkpointing", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def scripted_policy(world) -> Path:
    """A policy that (almost always) plays SCRIPT: two get_caption calls, then the answer."""
    samples = []
    for item in world["items"]:
        messages = opening(world, item["question"])
        messages += [{"role": "assistant", "content": SCRIPT[0]},
                     {"role": "user", "content": result_for(world, (2, 3))},
                     {"role": "assistant", "content": SCRIPT[1]},
                     {"role": "user", "content": result_for(world, (2, 3, 1)) + "\n\n" + LAST_ROUND_NOTICE},
                     {"role": "assistant", "content": SCRIPT[2]}]
        samples.append({"messages": messages})
    return sft(world, samples, world["root"] / "scripted", steps=60, batch=1, lr="2e-2")


def rl_args(world: dict, model: Path, out: Path, url: str, *extra) -> list:
    """`lvr rl` arguments for WORLD's QA items, captioned at URL, and EXTRA."""
    return [world["qa"], "--model", model, "-o", out, "--caption-model", "captioner",
            "--caption-base-url", url, "--cache-dir", world["cache"], "--system-prompt", world["prompt"],
            "--cpu", "--no-gradient-checkpointing", *extra]


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(mask value, start, end) of each run of equal values."""
    out: list[tuple[int, int, int]] = []
    for i, m in enumerate(mask):
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1], i + 1)
        else:
            out.append((m, i, i + 1))
    return out


# -- fast pieces, in process ---------------------------------------------------------------------

class _StubCaptioner:
    name = "stub-captioner"

    async def complete(self, messages, options=None):
        from lvr.prep.models.base import Completion

        return Completion(text=fake_caption({"messages": messages}), model=self.name)

    async def aclose(self):
        pass


class _ScriptedGenerator:
    """A TurnGenerator that 'samples' SCRIPT turn by turn (the turn index is read off the sequence)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.batches = []

    def generate(self, requests):
        from lvr.train.rollout import Generated

        self.batches.append(len(requests))
        out = []
        for r in requests:
            turn = self.tokenizer.decode(r.ids).count(ASSISTANT) - 1
            tokens = self.tokenizer(SCRIPT[turn], add_special_tokens=False)["input_ids"]
            out.append(Generated(tokens, [-0.5] * len(tokens), "stop"))
        return out


def test_recorded_tokens_interleave_turns_and_masked_tool_results(world, tmp_path):
    """TokenRecordingModel under the real `run_agent` and VideoEnv: the token record is the conversation."""
    from transformers import AutoTokenizer

    from lvr.infer.agent import AgentOptions, run_agent
    from lvr.infer.environment import VideoEnv
    from lvr.prep.cache import frames_dir
    from lvr.prep.caption_store import CaptionStore
    from lvr.prep.captioning import Captioner
    from lvr.prep.frames import FrameStore
    from lvr.train.rollout import TokenRecordingModel, TurnBatcher

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    store = CaptionStore(tmp_path / "captions.sqlite3")
    captioner = Captioner(_StubCaptioner(), store, FrameStore(frames_dir(world["cache"])))
    nodes = list(world["nodes"].values())
    generator = _ScriptedGenerator(tokenizer)

    async def main():
        batcher = TurnBatcher(generator)
        models = [TokenRecordingModel(tokenizer, batcher, max_completion_tokens=1000) for _ in range(3)]

        async def one(model):
            env = VideoEnv(nodes, captioner)
            result = await run_agent(model, env, "Where is it?", OPTIONS, template=PROMPT,
                                     agent=AgentOptions(max_rounds=3, temperature=1.0))
            return result, env

        return models, await batcher.run([one(m) for m in models])

    models, results = asyncio.run(main())
    store.close()
    assert generator.batches == [3, 3, 3]  # the three rollouts' turns were sampled together, turn by turn
    for model, (result, env) in zip(models, results):
        rec = model.record
        assert result.answer == "B" and [v.node for v in env.visits] == [(2, 3), (2, 3, 1)]
        assert tokenizer.decode(rec.prompt_ids) == tokenizer.apply_chat_template(
            opening(world, "Where is it?"), tokenize=False, add_generation_prompt=True)
        pieces = [(m, tokenizer.decode(rec.completion_ids[s:e])) for m, s, e in runs(rec.env_mask)]
        assert pieces == [
            (1, SCRIPT[0]),
            (0, IM_END + "\n" + USER + result_for(world, (2, 3)) + IM_END + "\n" + ASSISTANT),
            (1, SCRIPT[1]),
            (0, IM_END + "\n" + USER + result_for(world, (2, 3, 1)) + "\n\n" + LAST_ROUND_NOTICE + IM_END + "\n"
             + ASSISTANT),
            (1, SCRIPT[2]),
        ]
        assert rec.logprobs == [-0.5 if m else 0.0 for m in rec.env_mask]
        assert [rec.completion_ids[s:e] for s, e in rec.turns] == [
            tokenizer(t, add_special_tokens=False)["input_ids"] for t in SCRIPT]


def test_argument_tokens_are_the_node_id(world):
    from transformers import AutoTokenizer

    from lvr.train.rollout import argument_token_mask

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    for text, node in [(SCRIPT[0], "(2, 3)"), (SCRIPT[1], "(2, 3, 1)"),
                       ('<think>q</think><tool>video_qa((4, 1, 2), "who (is) it?")</tool>', "(4, 1, 2)")]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        mask = argument_token_mask(tokenizer, ids)
        marked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert node in marked and "caption" not in marked and "think" not in marked and "who" not in marked
    ids = tokenizer(SCRIPT[2], add_special_tokens=False)["input_ids"]
    assert not any(argument_token_mask(tokenizer, ids))  # an answer has no node id


def test_vllm_turns_are_cut_like_transformers_turns(world):
    """The vLLM adapter reads TRL's VLLMGeneration.generate output (a stand-in here: vLLM needs CUDA)."""
    from transformers import AutoTokenizer

    from lvr.train.rollout import TurnRequest, VLLMTurnGenerator

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    replies = [encode(SCRIPT[0]), encode(SCRIPT[2]) + [eos], encode("<think>" + "la " * 40)]

    class StandIn:
        def generate(self, prompts, images, num_generations):
            assert images is None and num_generations == 1 and len(prompts) == 3
            return prompts, replies, [[[-0.25] for _ in r] for r in replies], None

    got = VLLMTurnGenerator(StandIn(), tokenizer, eos_token_ids=[eos]).generate(
        [TurnRequest([1, 2], 40), TurnRequest([1], 40), TurnRequest([3], 5)])
    assert [g.finish for g in got] == ["stop", "eos", "length"]
    assert got[0].tokens == replies[0] and got[1].tokens == replies[1] and got[2].tokens == replies[2][:5]
    assert got[0].logprobs == [-0.25] * len(replies[0]) and len(got[2].logprobs) == 5


def test_scaled_reference_scales_the_k3_gradient():
    """Token-aware KL: moving ref scales the gradient of TRL's k3 term by s at the sampling log-prob."""
    import torch

    from lvr.train.rl import scaled_reference

    ref = torch.tensor([-1.0, -3.0, -0.2, -7.0])
    current = torch.tensor([-1.5, -0.5, -0.2, -0.1])

    def k3_grad(r):
        logp = current.clone().requires_grad_(True)
        (torch.exp(r - logp) - (r - logp) - 1).sum().backward()
        return logp.grad

    for s in (0.0, 0.1, 0.5, 1.0):
        assert torch.allclose(k3_grad(scaled_reference(ref, current, s)), s * k3_grad(ref), atol=1e-5)
    assert torch.equal(scaled_reference(ref, current, 0.0), current)


def test_usage_errors_are_one_line(world, tmp_path):
    """Checked before any model loads (in process: these paths import nothing heavy)."""
    from typer.testing import CliRunner

    from lvr.cli.main import app

    base = ["rl", str(world["qa"]), "--model", str(world["model"]), "-o", str(tmp_path / "out")]
    cases = [
        ([*base], "give --caption-model"),
        ([*base, "--caption-model", "c", "--num-generations", "1"], "--num-generations must be at least 2"),
        ([*base, "--caption-model", "c", "--num-generations", "3", "--batch-size", "2", "--grad-accum", "1"],
         "not a multiple of --num-generations 3"),
        ([*base, "--caption-model", "c", "--vllm", "server"], "--vllm must be auto, off or colocate"),
        ([*base, "--caption-model", "c", "--kl-argument-scale", "2"], "--kl-argument-scale must be in [0, 1]"),
        ([*base, "--caption-model", "c", "--kl-timestamp-scale", "-0.5"], "--kl-timestamp-scale must be in [0, 1]"),
        ([*base, "--caption-model", "c", "--kl-timestamp-scale", "0.1", "--beta", "0"],
         "--kl-timestamp-scale needs a KL term"),
        ([*base, "--caption-model", "c", "--w-iou", "-1"], "reward weights must not be negative"),
        ([*base, "--caption-model", "c", "--reward", "paper"], "--reward must be one of lvr, reference"),
        ([*base, "--caption-model", "c", "--reward", "reference", "--w-center-distance", "0.5"],
         "--reward reference has no center-distance term"),
        ([*base, "--caption-model", "c", "--questions-per-step", "5", "--batch-size", "3", "--dry-run"],
         "= 80 rollouts per step, which 1 process(es) x --batch-size 3 = 3 per micro-step do not divide"),
        ([*base, "--caption-model", "c", "--model", str(tmp_path / "nowhere")], "no such model folder"),
        (["rl", str(tmp_path / "missing.jsonl"), "--model", str(world["model"]), "-o", str(tmp_path / "o"),
          "--caption-model", "c", "--dry-run"], "no such QA file"),
    ]
    runner = CliRunner()
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert len([x for x in result.output.splitlines() if x.strip()]) == 1, result.output
    result = runner.invoke(app, [*base, "--caption-model", "c", "--config", str(REPO / "configs" / "rl_qwen3_8b.yaml"),
                                 "--model", str(world["model"]), "--dry-run"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["data"]["items"] == 4
    s = shown["settings"]
    assert (s["num_generations"], s["lr"], s["beta"], s["temperature"], s["max_turns"]) == (16, 1e-6, 1e-4, 1.0, 15)
    assert (s["w_answer"], s["w_localisation"], s["w_repeat"], s["kl_argument_scale"]) == (1.0, 1.0, 0.2, None)
    assert (s["w_iou"], s["w_interval_center_distance"], s["kl_timestamp_scale"]) == (1.0, 1.0, None)


# -- one step, end to end ---------------------------------------------------------------------------

def test_one_step_masks_tool_results_not_model_tokens(world, scripted_policy, tmp_path):
    """One `lvr rl` step: the trained batch's loss mask covers exactly the sampled turns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, log = tmp_path / "rl", tmp_path / "rollouts.jsonl"
    with FakeOpenAI(fake_caption, models=("captioner",)) as server:
        proc = run_lvr("rl", *rl_args(world, scripted_policy, out, server.url, "--num-generations", "2",
                                      "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--max-turns", "3",
                                      "--max-tokens", "40", "--max-completion-length", "400", "--lr", "1e-3",
                                      "--rollout-log", log))
        assert proc.returncode == 0, proc.stderr[-4000:]
        # The checkpoint loads into `lvr ask` and navigates with the same protocol (in process: quicker).
        from typer.testing import CliRunner

        from lvr.cli.main import app

        ask = CliRunner().invoke(app, ["ask", str(world["root"] / "numbers.mp4"), "Question 0: where is it?",
                                       *sum([["-O", o] for o in OPTIONS], []), "--backend", "transformers",
                                       "--model", str(out), "--caption-model", "captioner", "--caption-base-url",
                                       server.url, "--cache-dir", str(world["cache"]), "--system-prompt",
                                       str(world["prompt"]), "--max-rounds", "3", "--max-tokens", "40",
                                       "--device", "cpu", "--trace", str(tmp_path / "trace.jsonl")])
    assert ask.exit_code in (0, 1), ask.output[-3000:]
    trace = json.loads((tmp_path / "trace.jsonl").read_text().splitlines()[0])
    assert trace["settings"]["models"]["reasoning"]["model"] == str(out) and trace["turns"]
    assert "lvr rl: step 1/1 reward" in proc.stderr

    record = json.loads((out / "lvr_rl.json").read_text())
    assert record["steps"] == 1 and record["world_size"] == 1
    point = record["curve"][0]
    for key in ("reward", "rewards/answer", "rewards/localisation", "rewards/repeat", "rewards/center_distance",
                "rollout/turns", "rollout/invalid_turn_share", "kl"):
        assert key in point, (key, point)
    assert record["settings"]["beta"] == 1e-4 and "k3" in record["settings"]["kl_estimator"]

    rollouts = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rollouts) == 4 and {r["step"] for r in rollouts} == {0}
    assert sum(len(r["visits"]) for r in rollouts) >= 2, [r["turn_texts"] for r in rollouts]  # the env ran tools
    tokenizer = AutoTokenizer.from_pretrained(scripted_policy)
    eos = tokenizer.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(scripted_policy).eval()
    for r in rollouts:
        ids, mask = r["completion_ids"], r["loss_mask"]
        assert len(ids) == len(mask) == len(r["sampling_logprobs"])
        model_runs = [(s, e) for m, s, e in runs(mask) if m == 1]
        env_runs = [(s, e) for m, s, e in runs(mask) if m == 0]
        # Unmasked tokens are exactly the sampled turns, in order.
        assert len(model_runs) == r["turns"]
        for text, (s, e) in zip(r["turn_texts"], model_runs):
            sampled = tokenizer.decode(ids[s:e], skip_special_tokens=True)
            cut = next((sampled[: sampled.find(t) + len(t)] for t in ("</tool>", "</answer>") if t in sampled),
                       sampled)
            assert complete_stopped_turn(cut) == text
        # Masked tokens are exactly the environment's text: the end of the turn, the tool result or
        # correction as a user turn (with the last-turn notice before the last turn), the next prompt.
        assert mask[0] == 1 and len(env_runs) in (len(model_runs) - 1, len(model_runs))
        for i, (s, e) in enumerate(env_runs[: len(model_runs) - 1]):
            result = r["results"][i] + ("\n\n" + LAST_ROUND_NOTICE if i + 2 == 3 else "")
            expected = IM_END + "\n" + USER + result + IM_END + "\n" + ASSISTANT
            if ids[model_runs[i][1] - 1] == eos:  # the policy ended its turn itself
                expected = expected[len(IM_END):]
            assert tokenizer.decode(ids[s:e]) == expected
        if len(env_runs) == len(model_runs):
            assert ids[env_runs[-1][0]:] == [eos]  # the closing end-of-turn, not trained on
        # The results in the masked text are the environment's: each visit's caption result.
        for visit in r["visits"]:
            assert result_for(world, tuple(visit["node"])) in r["results"]
        model_text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert "get_caption: caption of" not in model_text and "clip from" not in model_text
        # The policy sampled from exactly these tokens: its log-probs over the batch sequence (step 0
        # is the start model) are the ones recorded while sampling.
        seq = torch.tensor([r["prompt_ids"] + ids])
        with torch.no_grad():
            logits = policy(seq).logits[0, len(r["prompt_ids"]) - 1:-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        sampled = torch.tensor(r["sampling_logprobs"])
        on = torch.tensor(mask, dtype=torch.bool)
        assert torch.allclose(logps[on], sampled[on], atol=2e-3), (logps[on] - sampled[on]).abs().max()
        assert torch.all(sampled[~on] == 0)


def test_one_step_on_items_with_and_without_clues(world, scripted_policy, tmp_path):
    """A QA file mixing an item with clues and items without (an empty list, no key): one step under
    --reward reference. The clue-free items get the answer-only reward; the other the reference's terms."""
    from lvr.train.rewards import reference_merge_clues, rollout_reward

    with_clues, *clue_free = [dict(world["items"][0], id="clued"), dict(world["items"][1], id="empty", clues=[]),
                              {k: v for k, v in world["items"][2].items() if k != "clues"} | {"id": "none"}]
    qa = tmp_path / "mixed.jsonl"
    qa.write_text("".join(json.dumps(i) + "\n" for i in [with_clues, *clue_free]))
    out, log = tmp_path / "rl", tmp_path / "rollouts.jsonl"
    with FakeOpenAI(fake_caption, models=("captioner",)) as server:
        args = rl_args(world, scripted_policy, out, server.url, "--video-dir", world["root"], "--reward", "reference",
                       "--num-generations", "2", "--batch-size", "2", "--questions-per-step", "3", "--warmup-steps",
                       "1", "--max-steps", "1", "--max-turns", "3", "--max-tokens", "40", "--max-completion-length",
                       "400", "--rollout-log", log, "-q")
        proc = run_lvr("rl", qa, *args[1:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_rl.json").read_text())
    assert record["data"]["items"] == 3 and record["data"]["skipped"] == []
    s = record["settings"]
    assert (s["reward"], s["questions_per_step"], s["grad_accum"], s["warmup_steps"]) == ("reference", 3, 3, 1)  # 3 questions x 2 rollouts = 6 = 1 process x 2 per micro-step x 3
    assert "rewards/answer_only" in record["curve"][0]
    rollouts = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["qid"] for r in rollouts) == ["clued", "clued", "empty", "empty", "none", "none"]
    for r in rollouts:
        parts = r["reward"]
        assert parts["rule"] == "reference" and r["width"] == 4
        if r["qid"] == "clued":
            assert parts["answer_only"] is False and parts["localisation"] is not None and parts["repeat"] is not None
            assert r["clues"] == [list(c) for c in reference_merge_clues(with_clues["clues"])]
        else:
            assert r["clues"] == [] and parts["answer_only"] is True
            assert parts["localisation"] is None and parts["repeat"] is None and parts["center_distance"] is None
            assert parts["total"] == parts["answer"]
        assert parts == rollout_reward("reference", r).to_record()  # the logged parts are the rule's numbers


@pytest.mark.slow  # trains in two processes
def test_two_processes_one_step(world, scripted_policy, tmp_path):
    """accelerate launch, 2 CPU processes over gloo: each runs its own rollouts; one GRPO step.

    Token-aware KL is on here, so its per-token reference shift runs on the real batch too.
    """
    out, log = tmp_path / "rl2", tmp_path / "rollouts.jsonl"
    with FakeOpenAI(fake_caption, models=("captioner",)) as server:
        proc = run_lvr_in_two_processes(
            "rl", *rl_args(world, scripted_policy, out, server.url, "--num-generations", "2", "--batch-size", "2",
                           "--grad-accum", "1", "--max-steps", "1", "--max-turns", "3", "--max-tokens", "40",
                           "--max-completion-length", "400", "--rollout-log", log, "--kl-argument-scale", "0.1",
                           "-q"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_rl.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 1
    assert record["curve"][0]["kl_argument_tokens"] > 0  # node-id tokens whose KL was scaled, over both processes
    rollouts = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["process"] for r in rollouts) == [0, 0, 1, 1]
    assert proc.stderr.count("lvr rl: 4 items, 1 steps") == 1  # the main process alone reports
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()


# -- learning signal ------------------------------------------------------------------------------------

@pytest.mark.sampled
def test_reward_rises_on_a_toy_task(world, tmp_path):
    """The answer (B) and the clue (medium clip (2, 3)) are fixed; a policy SFT'd to pick clips and
    letters at random must learn both. Mean reward over the last 5 of 30 steps beats the first 5."""
    rnd = random.Random(0)
    samples = []
    for n in range(64):
        h, m, letter = rnd.randint(1, 4), rnd.randint(1, 4), rnd.choice("ABCD")
        messages = opening(world, f"Question {n % 4}: where is it?")
        messages += [{"role": "assistant", "content": f"<think>Look.</think><tool>get_caption(({h}, {m}))</tool>"},
                     {"role": "user", "content": result_for(world, (h, m))},
                     {"role": "assistant", "content": f"<think>Done.</think><answer>{letter}</answer>"}]
        samples.append({"messages": messages})
    policy = sft(world, samples, tmp_path / "random-policy", steps=80, batch=8, lr="1e-2")
    out = tmp_path / "rl"
    with FakeOpenAI(fake_caption, models=("captioner",)) as server:
        proc = run_lvr("rl", *rl_args(world, policy, out, server.url, "--num-generations", "8", "--batch-size", "8",
                                      "--grad-accum", "2", "--max-steps", "30", "--max-turns", "3", "--max-tokens",
                                      "40", "--max-completion-length", "300", "--lr", "1e-3", "--seed", "1"),
                       timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    curve = json.loads((out / "lvr_rl.json").read_text())["curve"]
    rewards = [p["reward"] for p in curve]
    print("reward curve:", " ".join(f"{x:.2f}" for x in rewards))
    print("answer:", " ".join(f"{p['rewards/answer']:.2f}" for p in curve))
    print("F1:", " ".join(f"{p['rewards/localisation']:.2f}" for p in curve))
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards


def test_vllm_auto_falls_back_to_transformers_without_vllm_or_gpu(monkeypatch):
    import importlib.util

    from lvr.train.rl import resolve_vllm_mode

    assert resolve_vllm_mode("off") == "off" and resolve_vllm_mode("colocate") == "colocate"
    assert resolve_vllm_mode("auto", cpu=True) == "off"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert resolve_vllm_mode("auto") == "off"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_vllm_mode("auto") == "colocate"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_vllm_mode("auto") == "off"

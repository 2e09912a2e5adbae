"""`lvr dpo`: DPO on turn-level pairs raises the chosen-over-rejected margin; precomputed reference; LoRA.

A tiny random Qwen3 with a small BPE (fast on CPU) carries a chat template that, like
Qwen3's stock one, drops earlier turns' <think> text, so every run must fix it. The
pairs come from hand-built trajectories through `lvr.train.pairs`, as
`lvr synthesize --export-pairs` makes them.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from lvr.train.chat_template import LVR_CHATML_TEMPLATE, template_keeps_think
from lvr_test_helpers import (REPO, kill_lvr_at_first_checkpoint, run_lvr, run_lvr_in_two_processes, trajectory,
                              write_jsonl)
from tiny_models import STRIPPING_TEMPLATE

FAST = ["--cpu", "--no-gradient-checkpointing"]
STEPS = 20
LETTERS = "ABCD"


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on one thread, as the subprocesses run (OMP_NUM_THREADS=1): several times faster
    for these tiny models on small shared CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("dpo") / "tiny-qwen3", vocab="small",
                            chat_template=STRIPPING_TEMPLATE)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """12 pairs from 6 trajectories: each right answer against two dropped wrong ones."""
    from lvr.train.pairs import dropped_pairs

    records = []
    for i in range(6):
        right = LETTERS[i % 4]
        wrong = tuple(x for x in LETTERS if x != right)[:2]
        records.append(trajectory(i, answer=right, wrong=wrong, dropped_after=(1, 2) if i % 2 else (2, 2),
                                  short=True))
    made, stats = dropped_pairs(records)
    assert len(made) == 12 and not stats.skipped
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", made)


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def mean_logp_margin(model_dir: Path, pairs: list[dict], template_dir: Path) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected), both given the prompt, summed over the turn's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(template_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt: list[dict], turn: list[dict]) -> float:
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        whole = tok.apply_chat_template(prompt + turn, tokenize=False)
        assert whole.startswith(head)
        n = len(tok(head, add_special_tokens=False)["input_ids"])
        ids = tok(whole, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        token_logps = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        return float(token_logps[n - 1:].sum())

    margins = [logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)


def settings(small_model: Path, pairs: Path, out: Path, **overrides):
    from lvr.train.dpo import DpoSettings

    base = dict(data=str(pairs), model=str(small_model), output=str(out), cpu=True, gradient_checkpointing=False,
                lr=1e-3, batch_size=2, max_steps=STEPS, warmup_ratio=0.1, logging_steps=1)
    return DpoSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def full_run(small_model, pairs, tmp_path_factory):
    """`lvr dpo` from the command line: full fine-tune, a reference copy, settings from a config file."""
    tmp = tmp_path_factory.mktemp("dpo-run")
    config = tmp / "dpo.yaml"
    config.write_text("dpo:\n  lr: 1.0e-5\n  batch_size: 2\n  warmup_ratio: 0.1\n  beta: 0.1\n")
    out = tmp / "navigator-dpo"
    started = time.time()
    proc = run_lvr("dpo", pairs, "--model", small_model, "-o", out, "--config", config, "--lr", "1e-3",
                   "--max-steps", STEPS, *FAST)
    elapsed = time.time() - started
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "lvr_dpo.json").read_text()), proc, elapsed


def test_dpo_raises_the_margin_and_the_output_loads_for_ask(full_run, small_model, pairs):
    import asyncio

    from transformers import AutoTokenizer

    from lvr.infer.protocol import parse_turn
    from lvr.prep.models.base import GenerationOptions
    from lvr.prep.models.transformers_backend import TransformersChat

    out, record, proc, elapsed = full_run
    assert record["schema"] == "lvr.dpo/1" and record["steps"] == STEPS and record["layout"] == "full"
    assert record["reference"] == "model-copy" and record["world_size"] == 1
    s = record["settings"]
    assert (s["lr"], s["batch_size"], s["beta"], s["loss_type"], s["precompute_ref"]) == (1e-3, 2, 0.1, "sigmoid",
                                                                                           False)
    assert record["data"] == {"path": str(pairs), "format": "conversational", "records": 12, "pairs": 12,
                              "identical_left_out": 0, "sources": {"dropped_turn": 12}, "prompt_too_long": 0,
                              "cut_at_max_length": 0}
    assert record["template"]["source"] == "lvr-chatml" and record["template"]["changed"]

    # The curve: the policy starts as the reference (margin 0, loss log 2), then prefers the chosen turns.
    curve = record["curve"]
    assert [p["step"] for p in curve] == list(range(1, STEPS + 1))
    assert curve[0]["margin"] == 0 and curve[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    head, tail = curve[:5], curve[-5:]
    mean = lambda points, key: sum(p[key] for p in points) / len(points)  # noqa: E731
    assert mean(tail, "margin") > mean(head, "margin") + 0.5, curve
    assert mean(tail, "loss") < mean(head, "loss") - 0.2, curve
    assert mean(tail, "accuracy") == 1.0
    assert record["last_margin"] > record["first_margin"] and record["last_loss"] < record["first_loss"]
    print(f"\nDPO: loss {mean(head, 'loss'):.3f} -> {mean(tail, 'loss'):.3f}, reward margin "
          f"{mean(head, 'margin'):.3f} -> {mean(tail, 'margin'):.3f} in {STEPS} steps, {elapsed:.1f} s wall")

    # Measured apart from TRL: the mean log-prob margin of chosen over rejected turns rose.
    data = read_pairs(pairs)
    before, after = mean_logp_margin(small_model, data, out), mean_logp_margin(out, data, out)
    assert after > before + 5, (before, after)
    print(f"mean log p(chosen) - log p(rejected): {before:.2f} -> {after:.2f}")

    assert "lvr dpo: step 20/20 loss" in proc.stderr and " margin " in proc.stderr
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("lvr dpo: 12 pairs, 20 steps, loss 0.6931 -> ") and "reward margin 0.0000 -> " in summary
    assert "Writing model shards" not in proc.stderr

    # The saved template keeps earlier <think> (the model's own dropped it), and `lvr ask` loads the checkpoint.
    assert (out / "chat_template.jinja").read_text() == LVR_CHATML_TEMPLATE
    tok = AutoTokenizer.from_pretrained(out)
    assert template_keeps_think(tok) and not template_keeps_think(tok, STRIPPING_TEMPLATE)
    prompt = data[0]["prompt"]
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert all(m["content"] in text for m in prompt if m["role"] == "assistant")
    chat = TransformersChat(str(out), device="cpu")
    reply = asyncio.run(chat.complete(prompt, GenerationOptions(max_tokens=16)))
    assert parse_turn(reply.text, 4).kind in ("tool", "answer", "invalid")


def test_precomputed_reference_trains_the_same_without_a_reference_copy(full_run, small_model, pairs, tmp_path):
    """--precompute-ref: no reference model is kept, and training matches the run with one step for step."""
    from lvr.train.dpo import DATA_DIR, build_trainer, run_dpo

    with_copy = build_trainer(settings(small_model, pairs, tmp_path / "a"))
    precomputed = build_trainer(settings(small_model, pairs, tmp_path / "b", precompute_ref=True))
    assert with_copy.trainer.ref_model is not None and precomputed.trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(precomputed.trainer.train_dataset.column_names)
    assert with_copy.reference == "model-copy" and precomputed.reference == "precomputed"
    del with_copy, precomputed

    out = tmp_path / "precomputed"
    lines: list[str] = []
    record = run_dpo(settings(small_model, pairs, out, precompute_ref=True), log=lines.append)
    assert record["reference"] == "precomputed" and record["steps"] == STEPS
    assert "reference precomputed" in lines[0]
    reference_curve = full_run[1]["curve"]
    for mine, theirs in zip(record["curve"], reference_curve, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-3, abs=1e-4)
        assert mine["margin"] == pytest.approx(theirs["margin"], rel=1e-3, abs=1e-4)
    assert not (out / DATA_DIR).exists()
    assert (out / "chat_template.jinja").read_text() == LVR_CHATML_TEMPLATE


def test_lora_is_merged_into_a_checkpoint_that_reloads(small_model, pairs, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lvr.train.dpo import run_dpo

    out = tmp_path / "lora"
    record = run_dpo(settings(small_model, pairs, out, lora=True, lora_r=4, lora_targets="q_proj,v_proj",
                              lr=5e-2, max_steps=3))
    assert record["layout"] == "merged" and record["adapter"] == "adapter" and record["reference"] == "adapter-off"
    assert record["settings"]["lora_targets"] == ["q_proj", "v_proj"] and record["steps"] == 3
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged, base = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(small_model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    assert torch.equal(merged.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       base.state_dict()["model.layers.0.mlp.up_proj.weight"])
    again = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    assert torch.allclose(again.state_dict()[name], merged.state_dict()[name], atol=1e-6)
    assert (out / "chat_template.jinja").read_text() == LVR_CHATML_TEMPLATE


# -- data and usage errors ----------------------------------------------------------------

def test_pairs_are_checked(tmp_path, pairs):
    from lvr.train.dpo import DpoError, load_pairs

    good = read_pairs(pairs)[0]
    hinted = json.loads(json.dumps(good))
    hinted["prompt"][-1]["content"] += "\n\nHint: that answer is not right."
    cases = {
        "empty": ("", "no records"),
        "trajectory": (json.dumps(trajectory(0)) + "\n", "export-pairs"),
        "missing": ('{"prompt": [{"role": "user", "content": "q"}], "chosen": []}\n', "no rejected"),
        "mixed": (json.dumps(good) + '\n{"prompt": "q", "chosen": "a", "rejected": "b"}\n', ":2: a standard pair"),
        "ends_on_assistant": (json.dumps({**good, "prompt": good["prompt"] + good["chosen"]}) + "\n",
                              "prompt ends with an assistant"),
        "user_in_chosen": (json.dumps({**good, "chosen": [{"role": "user", "content": "x"}]}) + "\n",
                           "chosen: must hold assistant messages only"),
        "hint": (json.dumps(hinted) + "\n", "hint text in the prompt"),
        "identical": (json.dumps({**good, "rejected": good["chosen"]}) + "\n", "no usable pairs"),
        "bad_json": (json.dumps(good) + "\n{oops\n", ":2: not JSON"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(DpoError, match=message):
            load_pairs(path)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no"},
                                                   {"prompt": "Q?", "chosen": "same", "rejected": "same"}])
    loaded = load_pairs(plain)
    assert loaded.format == "standard" and len(loaded.samples) == 1 and loaded.identical == 1


def test_usage_errors_and_the_shipped_config(tmp_path, pairs, small_model):
    traj = write_jsonl(tmp_path / "traj.jsonl", [trajectory(0)])
    for args, message in (
        ([tmp_path / "missing.jsonl", "--model", small_model], "no such pairs file"),
        ([traj, "--model", small_model], "a trajectory, not a preference pair"),
        ([pairs, "--model", small_model, "--beta", "0"], "--beta must be positive"),
        ([pairs, "--model", tmp_path / "nowhere", "--cpu"], "no such model folder"),
    ):
        proc = run_lvr("dpo", *args, "-o", tmp_path / "out", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "out").exists()

    proc = run_lvr("dpo", pairs, "--config", REPO / "configs" / "dpo_qwen3_8b.yaml", "-o", tmp_path / "o",
                   "--dry-run", "--beta", "0.2")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    s = shown["settings"]
    assert s["model"] == "navigator-sft" and s["precompute_ref"] is True and s["lora"] is False
    assert (s["lr"], s["epochs"], s["scheduler"], s["warmup_ratio"], s["max_length"]) == (5e-7, 1, "cosine", 0.1,
                                                                                          24576)
    assert s["beta"] == 0.2  # the flag wins over the file's 0.1
    assert shown["data"] == {"format": "conversational", "records": 12, "pairs": 12, "identical_left_out": 0,
                             "sources": {"dropped_turn": 12}}


# -- several processes, resuming -----------------------------------------------------------

@pytest.mark.slow  # trains in two processes
def test_two_processes_with_precomputed_reference(small_model, pairs, tmp_path):
    """accelerate launch, 2 CPU processes over gloo: the precomputed log-probs are shared through OUT."""
    out = tmp_path / "two"
    proc = run_lvr_in_two_processes("dpo", pairs, "--model", small_model, "-o", out, "--max-steps", "3", "--lr", "1e-3",
                                    "--precompute-ref", "-q", *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_dpo.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 3 and record["reference"] == "precomputed"
    assert proc.stderr.count("lvr dpo: 12 pairs, 3 steps") == 1
    assert (out / "model.safetensors").is_file() and not (out / ".lvr-dpo-data").exists()


def test_a_killed_run_resumes(small_model, pairs, tmp_path):
    from lvr.train.sft import last_checkpoint

    out = tmp_path / "resumable"
    proc = kill_lvr_at_first_checkpoint("dpo", pairs, "--model", small_model, "-o", out, "--lr", "1e-3",
                                        "--save-steps", "2", "--max-steps", "400", "--precompute-ref", "-q", *FAST,
                                        out=out)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resume_from = last_checkpoint(out)
    assert resume_from is not None and not (out / "lvr_dpo.json").exists()
    done = int(Path(resume_from).name.split("-")[1])

    proc = run_lvr("dpo", pairs, "--model", small_model, "-o", out, "--max-steps", str(done + 2), "-q", *FAST)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = run_lvr("dpo", pairs, "--model", small_model, "-o", out, "--lr", "1e-3", "--save-steps", "2",
                   "--max-steps", str(done + 2), "--precompute-ref", "--resume", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {resume_from}" in proc.stderr
    record = json.loads((out / "lvr_dpo.json").read_text())
    assert record["resumed_from"] == resume_from and record["steps"] == done + 2
    assert [p["step"] for p in record["curve"]] == list(range(1, done + 3))
    logged = [int(line.split()[3].split("/")[0]) for line in proc.stderr.splitlines()
              if line.startswith("lvr dpo: step ")]
    assert logged == [done + 1, done + 2]

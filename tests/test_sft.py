"""`lvr sft`: the think-keeping chat template, assistant-only labels, fitting, LoRA, two processes, resuming.

Two tiny random Qwen3 checkpoints are built offline. Both carry a chat template that,
like Qwen3's stock one, drops the <think> text of assistant turns before the last user
message, so every run here has to detect and fix it:

- `qwen_model` has the real Qwen tokenizer (151k tokens). The label tests use it, with no
  training: its full-vocabulary logits cost about a second per CPU step.
- `small_model` has a small BPE (a few hundred tokens), so the training runs take a
  fraction of a second per step.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from lvr.infer.protocol import (DEFAULT_SYSTEM_PROMPT, first_user_message, parse_turn, system_prompt,
                                tool_result_message)
from lvr.train.chat_template import (LVR_CHATML_TEMPLATE, TemplateError,
                                     ensure_think_preserving_template, template_keeps_think,
                                     template_masks_assistant)
from lvr_test_helpers import REPO, kill_lvr_at_first_checkpoint, run_lvr, run_lvr_in_two_processes, write_jsonl
from tiny_models import STRIPPING_TEMPLATE

FAST = ["--cpu", "--no-gradient-checkpointing", "-q"]


def trajectory(i: int, *, accepted: bool = True, long_prompt: bool = False, k: int = 4) -> dict:
    """An lvr.trajectory/1 record: three assistant turns, two tool results, a hint kept out of messages."""
    rnd = random.Random(i)
    h, m, l = rnd.randint(1, k), rnd.randint(1, k), rnd.randint(1, k)
    letter = "ABCD"[i % 4]
    high = [((j,), 60.0 * (j - 1), 60.0 * j, f"Scene {j} of video {i}.") for j in range(1, k + 1)]
    system = system_prompt(DEFAULT_SYSTEM_PROMPT, k) if long_prompt else f"Navigate the caption tree (K={k})."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": first_user_message(f"What happens in video {i}?",
                                                       ["A. a cup", "B. a book", "C. keys", "D. a hat"],
                                                       240.0, high)},
        {"role": "assistant", "content": f"<think>Clip ({h},) fits video {i}; read medium {m}.</think>\n"
                                         f"<tool>get_caption(({h}, {m}))</tool>"},
        {"role": "user", "content": tool_result_message("get_caption", (h, m), 10.0, 20.0,
                                                        f"A person holds thing {i}.")},
        {"role": "assistant", "content": f"<think>Low clip {l} should show it.</think>\n"
                                         f"<tool>get_caption(({h}, {m}, {l}))</tool>"},
        {"role": "user", "content": tool_result_message("get_caption", (h, m, l), 12.0, 14.0,
                                                        f"Close-up of thing {i}.")},
        {"role": "assistant", "content": f"<think>So the answer is {letter}.</think>\n<answer>{letter}</answer>"},
    ]
    return {"schema": "lvr.trajectory/1", "qid": f"q{i}", "video_id": f"v{i}", "K": k, "answer": letter,
            "accepted": accepted, "correct": accepted, "stopped": "answered", "messages": messages,
            "hints": [{"level": 1, "after_turn": 1, "ids": [[h]], "text": f"Hint: the clue lies in clip ({h},)."}],
            "dropped": []}


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("sft") / "tiny-qwen3-real-vocab", chat_template=STRIPPING_TEMPLATE)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("sft") / "tiny-qwen3-small-vocab", vocab="small",
                            chat_template=STRIPPING_TEMPLATE)


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_model)


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> Path:
    """Seven accepted short trajectories and one that was not accepted."""
    path = tmp_path_factory.mktemp("sft-data") / "trajectories.jsonl"
    return write_jsonl(path, [trajectory(i, accepted=i != 7) for i in range(8)])


# -- the chat template ------------------------------------------------------------------

def test_detects_a_template_that_strips_earlier_think(qwen_tokenizer):
    from tiny_models import CHATML_TEMPLATE
    from trl.chat_template_utils import qwen3_chat_template

    assert not template_keeps_think(qwen_tokenizer, STRIPPING_TEMPLATE)
    assert not template_keeps_think(qwen_tokenizer, qwen3_chat_template)  # the real stock Qwen3 template
    assert template_keeps_think(qwen_tokenizer, CHATML_TEMPLATE)
    assert template_keeps_think(qwen_tokenizer, LVR_CHATML_TEMPLATE)
    # Keeping <think> is not enough for assistant-only loss: the turns must be marked.
    assert not template_masks_assistant(qwen_tokenizer, CHATML_TEMPLATE)
    assert template_masks_assistant(qwen_tokenizer, LVR_CHATML_TEMPLATE)
    # Base checkpoints end sequences with <|endoftext|>; a turn still ends on <|im_end|>, which is trained.
    eos = qwen_tokenizer.eos_token
    try:
        qwen_tokenizer.eos_token = "<|endoftext|>"
        assert template_masks_assistant(qwen_tokenizer, LVR_CHATML_TEMPLATE)
    finally:
        qwen_tokenizer.eos_token = eos


def test_fixes_stripping_templates(qwen_tokenizer, tmp_path):
    from trl.chat_template_utils import qwen3_chat_template, qwen3_training_chat_template

    tok = qwen_tokenizer
    original = tok.chat_template
    try:
        # A Qwen-like (ChatML) template that TRL does not know: ours replaces it.
        tok.chat_template = STRIPPING_TEMPLATE
        fix = ensure_think_preserving_template(tok)
        assert fix.changed and fix.source == "lvr-chatml" and "drops the <think>" in fix.reason
        assert tok.chat_template == LVR_CHATML_TEMPLATE

        # The stock Qwen3 template: TRL's own training variant, which always renders the reasoning.
        tok.chat_template = qwen3_chat_template
        fix = ensure_think_preserving_template(tok)
        assert fix.source == "trl:qwen3_training" and tok.chat_template == qwen3_training_chat_template
        assert template_keeps_think(tok) and template_masks_assistant(tok)

        # A template that is already right is left alone.
        fix = ensure_think_preserving_template(tok)
        assert not fix.changed and fix.source == "model"

        # A stripping template of an unknown, non-ChatML family cannot be fixed automatically...
        tok.chat_template = ("{% for m in messages %}### {{ m.role }}: {{ m.content.split('</think>')[-1] }}\n"
                             "{% endfor %}")
        with pytest.raises(TemplateError, match="--chat-template"):
            ensure_think_preserving_template(tok)
        # ...but a good template file can be named; a stripping one is refused.
        good, bad = tmp_path / "good.jinja", tmp_path / "bad.jinja"
        good.write_text(LVR_CHATML_TEMPLATE)
        bad.write_text(STRIPPING_TEMPLATE)
        assert ensure_think_preserving_template(tok, good).source == f"file:{good}"
        with pytest.raises(TemplateError, match="drops the <think>"):
            ensure_think_preserving_template(tok, bad)
    finally:
        tok.chat_template = original


# -- labels from the collated batch -----------------------------------------------------

def _assistant_spans(ids: list[int], tok) -> list[tuple[int, int]]:
    """[start, end) of each assistant reply: after '<|im_start|>assistant\\n' through its '<|im_end|>'."""
    start_id, end_id = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok.encode("assistant\n", add_special_tokens=False)
    spans = []
    for i, t in enumerate(ids):
        if t == start_id and ids[i + 1: i + 1 + len(header)] == header:
            begin = i + 1 + len(header)
            spans.append((begin, ids.index(end_id, begin) + 1))
    return spans


def _build(model: Path, data: Path, out: Path, **overrides):
    from lvr.train.sft import SftSettings, build_trainer

    settings = SftSettings(data=str(data), model=str(model), output=str(out), cpu=True,
                           gradient_checkpointing=False, **overrides)
    return build_trainer(settings)


def test_collated_batch_labels_exactly_the_assistant_turns(qwen_model, tmp_path):
    """Real Qwen tokenizer, stock-like template: only assistant tokens carry labels, earlier <think> is kept."""
    records = [trajectory(i, long_prompt=True) for i in range(3)]
    data = write_jsonl(tmp_path / "t.jsonl", records)
    run = _build(qwen_model, data, tmp_path / "out", batch_size=3)
    assert run.template.source == "lvr-chatml" and run.template.changed
    tok = run.tokenizer
    batch = next(iter(run.trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    assert len(ids) == 3
    by_text = {r["messages"][-1]["content"]: r["messages"] for r in records}
    for row_ids, row_labels in zip(ids, labels):
        spans = _assistant_spans(row_ids, tok)
        labelled = [i for i, lab in enumerate(row_labels) if lab != -100]
        # Exactly the assistant spans carry labels, each label its own token.
        assert labelled == [i for a, b in spans for i in range(a, b)]
        assert all(row_labels[i] == row_ids[i] for i in labelled)
        replies = [tok.decode(row_ids[a:b]) for a, b in spans]
        messages = next(msgs for text, msgs in by_text.items() if replies[-1] == text + "<|im_end|>")
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        assert replies == [c + "<|im_end|>" for c in assistant]
        # System, question, and tool results are all in the input, none of it in the labels.
        unlabelled = tok.decode([t for t, lab in zip(row_ids, row_labels) if lab == -100])
        labelled_text = tok.decode([row_ids[i] for i in labelled])
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] in unlabelled and m["content"] not in labelled_text
        assert "get_caption: caption of medium clip" in unlabelled
        assert "get_caption: caption of" not in labelled_text
        # The FIRST turn's reasoning survives in the input ids (the stock-like template dropped it).
        first_think = assistant[0].split("</think>")[0] + "</think>"
        assert first_think in tok.decode(row_ids) and first_think in labelled_text
    # The stock-like template really would have dropped it.
    stock = tok.apply_chat_template(records[0]["messages"], chat_template=STRIPPING_TEMPLATE, tokenize=False)
    assert records[0]["messages"][2]["content"].split("</think>")[0] not in stock


def test_prompt_completion_labels_only_the_completion(qwen_model, tmp_path):
    """Per-turn samples: earlier turns (with their <think>) are context, the completion alone is learned."""
    messages = trajectory(1)["messages"]
    sample = {"prompt": messages[:6], "completion": [messages[6]]}  # context up to turn 2's result; turn 3
    data = write_jsonl(tmp_path / "pc.jsonl", [sample])
    run = _build(qwen_model, data, tmp_path / "out")
    assert run.data.format == "prompt-completion"
    batch = next(iter(run.trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = run.tokenizer
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert learned == messages[6]["content"] + "<|im_end|>"
    whole = tok.decode(ids)
    assert messages[2]["content"] in whole and messages[4]["content"] in whole  # earlier <think> kept


# -- usage errors -------------------------------------------------------------------------

def _bad_data(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = json.dumps(trajectory(0))
    leak = trajectory(1)
    leak["messages"][3]["content"] += "\n" + leak["hints"][0]["text"]
    files = {
        "empty": ("", "no records"),
        "bad_line": (good + "\n" + good + "\n{not json\n", ":3: not JSON"),
        "unknown": ('{"text": "hello"}\n', ":1: not a training record"),
        "none_accepted": (json.dumps(trajectory(0, accepted=False)) + "\n", "none accepted"),
        "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: messages: has no assistant"),
        "bad_role": ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "role 'robot'"),
        "mixed": (good + '\n{"prompt": [{"role": "user", "content": "q"}], "completion": '
                         '[{"role": "assistant", "content": "a"}]}\n', ":2: a prompt-completion record"),
        "hint_leak": (json.dumps(leak) + "\n", ":1: hint text leaked"),
    }
    out = {}
    for name, (text, message) in files.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        out[name] = (path, message)
    return out


def test_usage_errors_are_one_line_with_exit_2(tmp_path, small_model):
    cases = [(["missing.jsonl", "--model", small_model], "no such data file")]
    cases += [([path, "--model", small_model], message) for path, message in _bad_data(tmp_path).values()]
    good = write_jsonl(tmp_path / "good.jsonl", [trajectory(0)])
    cases += [
        ([good, "--model", tmp_path / "no-such-model"], "no such model folder"),
        ([good, "--model", tmp_path], "no config.json"),
        ([good, "--model", small_model, "--bf16", "maybe"], "--bf16 must be"),
        ([good, "--model", small_model, "--warmup-ratio", "1.5"], "--warmup-ratio"),
        ([good, "--model", small_model, "--scheduler", "zigzag"], "unknown --scheduler"),
    ]
    for args, message in cases:
        proc = run_lvr("sft", *args, "-o", tmp_path / "out", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "out").exists()


def test_dry_run_takes_the_shipped_config_and_flags_override(tmp_path, trajectories):
    proc = run_lvr("sft", trajectories, "--config", REPO / "configs" / "sft_qwen3_8b.yaml", "-o", tmp_path / "o",
                   "--dry-run", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    s = shown["settings"]
    assert s["model"] == "Qwen/Qwen3-8B" and s["lora"] is False
    assert (s["lr"], s["scheduler"], s["warmup_ratio"], s["max_length"], s["bf16"]) == (1e-5, "cosine", 0.1,
                                                                                           24576, "auto")
    assert s["epochs"] == 2  # the flag wins over the file's 3
    assert shown["data"] == {"format": "trajectory", "records": 8, "samples": 7, "skipped": 1}


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
             for name in ("zero3", "fsdp", "cpu_2proc")}
    assert kinds["zero3"].distributed_type == "DEEPSPEED" and kinds["zero3"].deepspeed_config["zero_stage"] == 3
    assert kinds["zero3"].deepspeed_config["zero3_save_16bit_model"] is True
    assert kinds["fsdp"].distributed_type == "FSDP"
    assert kinds["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert kinds["cpu_2proc"].num_processes == 2


# -- training runs ----------------------------------------------------------------------

def test_sft_fits_and_the_output_loads_for_ask(small_model, trajectories, tmp_path):
    """50 steps halve the loss; OUT holds a checkpoint with the fixed template that TransformersChat runs."""
    import asyncio

    from transformers import AutoTokenizer

    from lvr.prep.models.base import GenerationOptions
    from lvr.prep.models.transformers_backend import TransformersChat

    config = tmp_path / "sft.yaml"
    config.write_text("sft:\n  lr: 1.0e-4\n  batch_size: 2\n  warmup_ratio: 0.05\n  save_steps: 25\n")
    out = tmp_path / "navigator"
    started = time.time()
    proc = run_lvr("sft", trajectories, "--model", small_model, "-o", out, "--config", config,
                   "--max-steps", "50", "--lr", "1e-2", "--logging-steps", "1", "--cpu",
                   "--no-gradient-checkpointing")
    elapsed = time.time() - started
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "lvr_sft.json").read_text())
    assert record["schema"] == "lvr.sft/1" and record["steps"] == 50 and record["layout"] == "full"
    assert record["settings"]["lr"] == 1e-2 and record["settings"]["batch_size"] == 2  # flag over file, file
    assert record["settings"]["warmup_ratio"] == 0.05 and record["settings"]["bf16_resolved"] is False
    assert record["data"] == {"path": str(trajectories), "format": "trajectory", "records": 8, "samples": 7,
                              "skipped": 1, "cut_at_max_length": 0}
    assert record["template"]["source"] == "lvr-chatml" and record["template"]["changed"]
    losses = [p["loss"] for p in record["losses"]]
    assert len(losses) == 50 and [p["step"] for p in record["losses"]] == list(range(1, 51))
    assert losses[-1] < losses[0] / 2, losses
    print(f"\nfitting: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 50 steps, {elapsed:.1f} s wall")
    # The closing summary names samples, steps, first and last loss, seconds.
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("lvr sft: 7 samples (1 skipped), 50 steps, loss ") and " s; full model in " in summary
    assert "lvr sft: step 50/50 loss" in proc.stderr

    # The saved template keeps earlier <think> and is not the model's stripping one.
    assert (out / "chat_template.jinja").read_text() == LVR_CHATML_TEMPLATE
    tok = AutoTokenizer.from_pretrained(out)
    assert template_keeps_think(tok) and not template_keeps_think(tok, STRIPPING_TEMPLATE)
    messages = trajectory(0)["messages"]
    prompt = tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert messages[2]["content"] in prompt and prompt.endswith("<|im_start|>assistant\n")

    # It loads the way `lvr ask --backend transformers --model OUT` loads it, and generates.
    chat = TransformersChat(str(out), device="cpu")
    seen = {}
    chat.inspect = lambda request: seen.update(request)
    reply = asyncio.run(chat.complete(messages[:4], GenerationOptions(max_tokens=24)))
    assert reply.text.strip()
    turn = parse_turn(reply.text, 4)  # random-weight model: anything, but it must parse without raising
    assert turn.kind in ("tool", "answer", "invalid")
    # The model learned the turn format from its assistant-only loss.
    assert reply.text.lstrip().startswith("<think>"), reply.text


@pytest.mark.slow  # trains in two processes
def test_two_processes_lora_merge_and_reload(small_model, trajectories, tmp_path):
    """accelerate launch, 2 CPU processes over gloo, LoRA merged into a full checkpoint that reloads."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    proc = run_lvr_in_two_processes("sft", trajectories, "--model", small_model, "-o", out, "--max-steps", "3",
                                    "--lr", "5e-2", "--lora", "--lora-r", "4", "--lora-targets", "q_proj,v_proj", *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_sft.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 3
    assert record["layout"] == "merged" and record["adapter"] == "adapter"
    assert record["settings"]["lora_targets"] == ["q_proj", "v_proj"]
    assert proc.stderr.count("lvr sft: 7 samples (1 skipped), 3 steps") == 1  # the main process alone reports
    assert (out / "adapter" / "adapter_config.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(small_model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # the adapter changed it
    assert torch.equal(merged.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       base.state_dict()["model.layers.0.mlp.up_proj.weight"])  # not a target
    again = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    assert torch.allclose(again.state_dict()[name], merged.state_dict()[name], atol=1e-6)
    assert (out / "chat_template.jinja").read_text() == LVR_CHATML_TEMPLATE


def test_a_killed_run_resumes(small_model, trajectories, tmp_path):
    out = tmp_path / "resumable"
    proc = kill_lvr_at_first_checkpoint("sft", trajectories, "--model", small_model, "-o", out, "--lr", "1e-3",
                                        "--save-steps", "2", "--max-steps", "400", "--logging-steps", "1", *FAST,
                                        out=out)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    from lvr.train.sft import last_checkpoint

    resume_from = last_checkpoint(out)
    assert resume_from is not None
    done = int(Path(resume_from).name.split("-")[1])
    assert not (out / "lvr_sft.json").exists()

    # Rerunning without --resume refuses to clobber the checkpoints; with it, training continues.
    proc = run_lvr("sft", trajectories, "--model", small_model, "-o", out, "--max-steps", str(done + 2), *FAST)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = run_lvr("sft", trajectories, "--model", small_model, "-o", out, "--lr", "1e-3", "--save-steps", "2",
                   "--max-steps", str(done + 2), "--logging-steps", "1", "--resume", "--cpu",
                   "--no-gradient-checkpointing")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {resume_from}" in proc.stderr
    record = json.loads((out / "lvr_sft.json").read_text())
    assert record["resumed_from"] == resume_from and record["steps"] == done + 2
    steps = [p["step"] for p in record["losses"]]
    assert steps == list(range(1, done + 3))  # the curve from the checkpoint, then the new steps
    logged = [int(line.split()[3].split("/")[0]) for line in proc.stderr.splitlines()
              if line.startswith("lvr sft: step ")]
    assert logged == [done + 1, done + 2]  # only the remaining steps ran

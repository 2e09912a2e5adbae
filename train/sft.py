"""Supervised fine-tuning of the navigator with TRL's SFTTrainer (docs/architecture.md §2.6).

Full fine-tuning or LoRA, loss on assistant turns only, and a chat template that
keeps the `<think>` text of earlier turns (see `chat_template`). The defaults
follow LongVideo-R1: lr 1e-5, cosine schedule, warmup 0.1, 3 epochs, bf16 where the
GPU has it, sequences cut at 24k tokens.

Data (JSONL, one sample per line; the first record decides the kind):

- TRL messages: ``{"messages": [{"role": ..., "content": ...}, ...]}``;
- TRL conversational prompt-completion: ``{"prompt": [...], "completion":
  [{"role": "assistant", ...}]}`` - the loss is on the completion only;
- `lvr.trajectory/1` records from `lvr synthesize`: the `messages` of records
  with ``accepted: true``; the others are skipped and counted.

The output folder is a plain Hugging Face checkpoint (weights, config, tokenizer,
the fixed chat template as chat_template.jinja) plus `lvr_sft.json`, the settings
and the loss curve; `lvr ask --backend transformers --model OUT` loads it. More
GPUs and nodes come through `accelerate launch` with the configs in configs/.

torch, transformers, TRL, PEFT and datasets are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .chat_template import TemplateError, TemplateFix, ensure_think_preserving_template, template_keeps_think
from ..prep.models.locate import looks_like_path

SCHEMA = "lvr.sft/1"
RECORD_FILE = "lvr_sft.json"
ADAPTER_DIR = "adapter"
ROLES = ("system", "user", "assistant", "tool")
BF16_CHOICES = {"auto": None, "true": True, "yes": True, "on": True, "1": True,
                "false": False, "no": False, "off": False, "0": False}
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay")


class SftError(ValueError):
    """A usage problem: bad data, a missing model, unusable settings. One line for the user."""


@dataclass
class SftSettings:
    """Everything `lvr sft` can be told. Defaults follow LongVideo-R1's SFT."""

    data: str
    model: str
    output: str
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    merge_lora: bool = True
    lr: float = 1e-5
    epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 24576
    bf16: str = "auto"
    gradient_checkpointing: bool = True
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: int = 1
    resume: bool = False
    report_to: str = "none"
    chat_template: str | None = None
    cpu: bool = False

    def check(self) -> None:
        """SftError naming the first unusable setting."""
        positive = {"--lr": self.lr, "--epochs": self.epochs, "--batch-size": self.batch_size,
                    "--grad-accum": self.grad_accum, "--max-length": self.max_length,
                    "--logging-steps": self.logging_steps, "--save-steps": self.save_steps,
                    "--save-total-limit": self.save_total_limit}
        if self.lora:
            positive.update({"--lora-r": self.lora_r, "--lora-alpha": self.lora_alpha})
        for flag, value in positive.items():
            if not value > 0:
                raise SftError(f"{flag} must be positive, not {value}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise SftError(f"--max-steps must be positive, or -1 to train for --epochs (not {self.max_steps})")
        if not 0 <= self.warmup_ratio < 1:
            raise SftError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise SftError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if self.weight_decay < 0:
            raise SftError(f"--weight-decay must not be negative, not {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise SftError(f"unknown --scheduler {self.scheduler!r} (use one of {', '.join(SCHEDULERS)})")
        if str(self.bf16).strip().lower() not in BF16_CHOICES:
            raise SftError(f"--bf16 must be auto, true or false, not {self.bf16!r}")
        if self.lora and not lora_target_modules(self.lora_targets):
            raise SftError("--lora-targets is empty (use all-linear or module names such as q_proj,v_proj)")


def lora_target_modules(spec: Any) -> str | list[str]:
    """'all-linear' or a list of module names, from 'q_proj,v_proj', a YAML list, or its text form."""
    if isinstance(spec, (list, tuple)):
        names = [str(s).strip() for s in spec]
    else:
        names = [s.strip(" []'\"") for s in re.split(r"[,\s]+", str(spec))]
    names = [n for n in names if n]
    if names == ["all-linear"]:
        return "all-linear"
    return names


# -- data ---------------------------------------------------------------------------------

@dataclass
class SftData:
    path: str
    format: str                       # "messages", "prompt-completion" or "trajectory"
    samples: list[dict] = field(default_factory=list)
    skipped: int = 0                  # trajectory records that were not accepted
    records: int = 0                  # records read

    def describe(self) -> str:
        extra = f", {self.skipped} not accepted and skipped" if self.skipped else ""
        return f"{len(self.samples)} samples ({self.format}{extra})"


def _content_text(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise SftError(f"{where}: content must be text (a string, or a list of text parts)")


def _clean_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SftError(f"{where}: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise SftError(f"{where}: message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise SftError(f"{where}: message {i} has role {role!r} (use {', '.join(ROLES)})")
        if "content" not in m or m["content"] is None:
            raise SftError(f"{where}: message {i} has no content")
        msg = {"role": role, "content": _content_text(m["content"], f"{where}: message {i}")}
        if isinstance(m.get("reasoning_content"), str) and role == "assistant":
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise SftError(f"{where}: has no assistant turn to learn from")
    return out


def _kind(record: dict) -> str:
    schema = record.get("schema")
    if isinstance(schema, str) and schema.startswith("lvr.trajectory/"):
        return "trajectory"
    if "prompt" in record or "completion" in record:
        return "prompt-completion"
    if "messages" in record:
        return "messages"
    return "unknown"


def _uniform(samples: list[dict]) -> list[dict]:
    """Give every message the same keys, so the samples form one Arrow table."""
    if not any("reasoning_content" in m for s in samples for msgs in s.values() for m in msgs):
        return samples
    for s in samples:
        for msgs in s.values():
            for m in msgs:
                m.setdefault("reasoning_content", None)
    return samples


def load_sft_data(path: "str | os.PathLike") -> SftData:
    """Read and check the training samples; SftError names the file, line and problem."""
    from ..prep.jsonl import RecordError, read_jsonl

    name = str(path)
    if name != "-" and not Path(name).is_file():
        raise SftError(f"{name}: no such data file" if not Path(name).exists() else f"{name}: not a file")
    data = SftData(path=name, format="")
    try:
        for lineno, rec in read_jsonl(name):
            where = f"{name}:{lineno}"
            data.records += 1
            kind = _kind(rec)
            if kind == "unknown":
                raise SftError(f"{where}: not a training record (expected messages, prompt/completion, "
                               "or an lvr.trajectory/1 record)")
            family = "prompt-completion" if kind == "prompt-completion" else "messages"
            if data.format and family != ("prompt-completion" if data.format == "prompt-completion" else "messages"):
                raise SftError(f"{where}: a {kind} record in a file of {data.format} records "
                               "(one file holds one kind)")
            data.format = data.format or kind
            if kind == "trajectory":
                if rec.get("accepted") is not True:
                    data.skipped += 1
                    continue
                messages = _clean_messages(rec.get("messages"), f"{where}: messages")
                for hint in rec.get("hints") or []:
                    text = hint.get("text") if isinstance(hint, dict) else None
                    if isinstance(text, str) and text.strip() and any(text.strip() in m["content"] for m in messages):
                        raise SftError(f"{where}: hint text leaked into messages (hints must never reach SFT)")
                data.samples.append({"messages": messages})
            elif kind == "messages":
                data.samples.append({"messages": _clean_messages(rec.get("messages"), f"{where}: messages")})
            else:
                prompt = _clean_messages(rec.get("prompt"), f"{where}: prompt", need_assistant=False)
                completion = _clean_messages(rec.get("completion"), f"{where}: completion")
                if any(m["role"] != "assistant" for m in completion):
                    raise SftError(f"{where}: completion must hold assistant messages only")
                data.samples.append({"prompt": prompt, "completion": completion})
    except RecordError as e:
        raise SftError(str(e)) from None
    if not data.records:
        raise SftError(f"{name}: no records (the data file is empty)")
    if not data.samples:
        raise SftError(f"{name}: no usable samples ({data.skipped} trajectory records, none accepted)")
    _uniform(data.samples)
    return data


# -- setting up ---------------------------------------------------------------------------

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def resolve_bf16(value: Any, *, cpu: bool = False) -> bool:
    """--bf16 auto|true|false -> bool; auto is on exactly when a CUDA GPU supports bf16."""
    choice = BF16_CHOICES.get(str(value).strip().lower(), "bad")
    if choice == "bad":
        raise SftError(f"--bf16 must be auto, true or false, not {value!r}")
    if choice is not None:
        return choice
    if cpu:
        return False
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def check_model(model: str) -> str:
    """The model as from_pretrained should get it; SftError for a local folder that is missing."""
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise SftError(f"--model {model}: not a model folder")
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise SftError(f"--model {model}: no config.json in this folder (not a Hugging Face checkpoint)")
        return expanded
    if looks_like_path(model):
        raise SftError(f"--model {model}: no such model folder")
    return model


def _checkpoints(output: Path) -> list[Path]:
    """checkpoint-N folders in output, newest (highest N) first."""
    if not output.is_dir():
        return []
    found = [p for p in output.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last, so a checkpoint without a readable one was cut off."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(output: "str | os.PathLike") -> str | None:
    """The newest complete checkpoint in output (a run killed while saving leaves a torn one behind)."""
    return next((str(p) for p in _checkpoints(Path(output)) if _complete(p)), None)


def _has_checkpoints(output: Path) -> bool:
    return bool(_checkpoints(output))


def _drop_torn_checkpoints(output: Path, keep: str | None) -> list[str]:
    """Delete checkpoints newer than `keep` that were cut off, so rotation never prefers them."""
    import shutil

    dropped = []
    newest_ok = int(Path(keep).name.split("-")[1]) if keep else -1
    for p in _checkpoints(output):
        if int(p.name.split("-")[1]) > newest_ok and not _complete(p):
            shutil.rmtree(p, ignore_errors=True)
            dropped.append(p.name)
    return dropped


@dataclass
class SftRun:
    """A trainer ready to train, and what was decided on the way."""

    settings: SftSettings
    data: SftData
    trainer: Any
    tokenizer: Any
    template: TemplateFix
    bf16: bool
    resume_from: str | None


def _progress_callback(log: Callable[[str], None]):
    """A TrainerCallback printing one line per logged step, on the main process only."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            lr = logs.get("learning_rate")
            log(f"lvr sft: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                + (f" lr {lr:.3g}" if isinstance(lr, (int, float)) else ""))

    return Progress()


def _quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        import logging

        logging.getLogger("trl").setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass


def check_output_folder(output_arg: str, resume: bool, *, error: type[Exception] = SftError) -> tuple[Path, str | None]:
    """(OUT, checkpoint to resume from) for sft, dpo and rl; `error` when OUT cannot be used.

    A folder holding an earlier run's checkpoints needs --resume, so no run is overwritten by accident.
    """
    output = Path(output_arg).expanduser()
    if output.exists() and not output.is_dir():
        raise error(f"-o {output_arg}: exists and is not a folder")
    if resume:
        return output, last_checkpoint(output)
    if _has_checkpoints(output):
        raise error(f"-o {output_arg}: holds checkpoints of an earlier run; pass --resume to continue it, "
                    "or choose another folder")
    return output, None


def load_training_tokenizer(model: str, shown: str, chat_template: str | None, *, need_masks: bool = True,
                            error: type[Exception] = SftError):
    """(tokenizer, TemplateFix) of a model to train: think-keeping template, a pad token.

    Shared by sft, dpo and rl. `need_masks=False` (rl: no assistant-only loss) also
    accepts the model's own template when it keeps <think> but lacks generation marks.
    Raises `error` with one line naming the model as the user gave it (`shown`).
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - one line naming the model
        raise error(f"--model {shown}: cannot load it ({_one_line(e)})") from None
    try:
        fix = ensure_think_preserving_template(tokenizer, chat_template)
    except TemplateError as e:
        current = tokenizer.chat_template
        if need_masks or chat_template is not None or not current or not template_keeps_think(tokenizer, current):
            raise error(f"--model {shown}: {e}") from None
        fix = TemplateFix(False, "model", "the model's chat template keeps <think>", current)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, fix


def build_trainer(settings: SftSettings, data: SftData | None = None, *,
                  log: Callable[[str], None] | None = None) -> SftRun:
    """Check everything, load the tokenizer, fix its template, and build the SFTTrainer (no training yet)."""
    settings.check()
    data = data if data is not None else load_sft_data(settings.data)
    model = check_model(settings.model)
    output, resume_from = check_output_folder(settings.output, settings.resume)
    if data.path == "-" and world_size() > 1:
        raise SftError("DATA '-' (stdin) cannot be shared by several processes; pass a file")

    _quiet_libraries()
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    bf16 = resolve_bf16(settings.bf16, cpu=settings.cpu)
    tokenizer, fix = load_training_tokenizer(model, settings.model, settings.chat_template)

    import datasets

    train_dataset = datasets.Dataset.from_list(data.samples)
    checkpointing = settings.gradient_checkpointing
    if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"):
        checkpointing = False  # FSDP checkpoints activations itself; doing both adds an all-gather
    model_kwargs: dict[str, Any] = {"dtype": "bfloat16" if (settings.lora and bf16) else "float32"}
    if world_size() > 1:
        model_kwargs["device_map"] = None  # every process holds (its shard of) the model; the launcher places it
    config = SFTConfig(
        output_dir=str(output),
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio,  # below 1: a fraction of the total steps
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        bf16=bf16,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        report_to=[r for r in re.split(r"[,\s]+", settings.report_to) if r and r != "none"],
        use_cpu=settings.cpu,
        assistant_only_loss=True,
        model_init_kwargs=model_kwargs,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # text-only: every trainable weight takes part in each step
    )
    peft_config = None
    if settings.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                 lora_dropout=settings.lora_dropout, task_type="CAUSAL_LM",
                                 target_modules=lora_target_modules(settings.lora_targets))
    callbacks = [_progress_callback(log)] if log else []
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return SftRun(settings, data, trainer, tokenizer, fix, bf16, resume_from)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- training and saving ------------------------------------------------------------------

def _loss_curve(log_history: list[dict]) -> list[dict]:
    curve = []
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            point = {"step": entry["step"], "loss": round(float(entry["loss"]), 6)}
            if "learning_rate" in entry:
                point["lr"] = float(entry["learning_rate"])
            if "epoch" in entry:
                point["epoch"] = round(float(entry["epoch"]), 4)
            curve.append(point)
    return curve


def _merge_lora(run: SftRun, output: Path, adapter_dir: Path) -> None:
    """Load the base model, apply the saved adapter, merge, and save a plain checkpoint into output."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if run.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(check_model(run.settings.model), dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(output))


def _count_cut(trainer, max_length: int) -> int:
    try:
        return sum(1 for n in (len(x) for x in trainer.train_dataset["input_ids"]) if n >= max_length)
    except Exception:  # noqa: BLE001 - a count for the record only
        return 0


def run_sft(settings: SftSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint and the fixed template into settings.output, and return the lvr_sft.json record."""
    from .. import __version__
    from ..prep.jsonl import write_atomic

    say = log or (lambda _m: None)
    started = time.time()
    run = build_trainer(settings, log=log)
    trainer, output = run.trainer, Path(settings.output).expanduser()
    main = trainer.is_world_process_zero()
    if main:
        say(f"lvr sft: {run.data.describe()}; template: {run.template.reason}; "
            f"{'LoRA' if settings.lora else 'full fine-tune'}, bf16 {'on' if run.bf16 else 'off'}, "
            f"{world_size()} process(es)")
    cut = _count_cut(trainer, settings.max_length)
    if cut and main:
        say(f"lvr sft: {cut} sample(s) reach --max-length {settings.max_length} and are cut there")
    if settings.resume and main:
        dropped = _drop_torn_checkpoints(output, run.resume_from)
        if dropped:
            say(f"lvr sft: removed unfinished checkpoint(s) {', '.join(dropped)}")
        say(f"lvr sft: resuming from {run.resume_from}" if run.resume_from
            else f"lvr sft: no finished checkpoint in {output}; starting afresh")
    trainer.accelerator.wait_for_everyone()
    train_started = time.time()
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    train_seconds = time.time() - train_started

    if settings.lora and settings.merge_lora:
        adapter_dir = output / ADAPTER_DIR
        trainer.save_model(str(adapter_dir))
        trainer.accelerator.wait_for_everyone()
        if main:
            _merge_lora(run, output, adapter_dir)
    else:
        trainer.save_model(str(output))  # adapters only for LoRA without merging; saves the tokenizer too
    if main:
        run.tokenizer.save_pretrained(str(output))  # the fixed template, as chat_template.jinja
    trainer.accelerator.wait_for_everyone()

    curve = _loss_curve(trainer.state.log_history)
    record = {
        "schema": SCHEMA,
        "model": settings.model,
        "output": str(output),
        "layout": ("merged" if settings.lora and settings.merge_lora else "adapter" if settings.lora else "full"),
        "adapter": ADAPTER_DIR if settings.lora and settings.merge_lora else ("." if settings.lora else None),
        "data": {"path": run.data.path, "format": run.data.format, "records": run.data.records,
                 "samples": len(run.data.samples), "skipped": run.data.skipped,
                 "cut_at_max_length": cut},
        "template": run.template.to_record(),
        "settings": {**asdict(settings), "bf16_resolved": run.bf16,
                     "lora_targets": lora_target_modules(settings.lora_targets) if settings.lora else None},
        "world_size": world_size(),
        "resumed_from": run.resume_from,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
        "losses": curve,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.time() - started, 2),
        "producer": {"tool": "lvr sft", "version": __version__},
    }
    if main:
        write_atomic(output / RECORD_FILE, json.dumps(record, indent=1) + "\n")
    return record


def summary_line(record: dict) -> str:
    data = record["data"]
    skipped = f" ({data['skipped']} skipped)" if data["skipped"] else ""
    loss = (f"loss {record['first_loss']:.4f} -> {record['last_loss']:.4f}"
            if record["first_loss"] is not None else "no loss logged")
    return (f"lvr sft: {data['samples']} samples{skipped}, {record['steps']} steps, {loss}, "
            f"{record['seconds']:.1f} s; {record['layout']} model in {record['output']}")

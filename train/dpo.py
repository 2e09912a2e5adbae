"""Preference training of the navigator with TRL's DPOTrainer (`lvr dpo`, LongVPO-style).

Input is turn-level preference pairs, as `lvr synthesize --export-pairs` writes
them: TRL's conversational preference form ``{"prompt": [...], "chosen":
[{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``, extra
keys ignored. Plain-text pairs (``prompt``/``chosen``/``rejected`` strings) work too.

Everything else is `lvr sft`'s (settings, model checks, LoRA with merging, resuming,
`accelerate launch`, the chat template that keeps earlier turns' `<think>`; see
`lvr.train.sft`), with DPO's own knobs: ``beta`` (0.1), the loss type, and
``precompute_ref``. The defaults are the usual DPO ones for a model of this size
(lr 5e-7, 1 epoch, cosine, warmup 0.1); LongVPO does not publish its own here.

The reference model is the starting checkpoint. By default a frozen copy of it
runs next to the policy on every step. With ``precompute_ref`` its log-probs of
every pair are computed once before training (TRL's
``precompute_ref_log_probs``), so no copy is kept in memory and each step runs the
policy alone: about half the forward passes. With LoRA the reference is the policy
with its adapter switched off, so no copy is ever loaded.

The output folder is a plain checkpoint that `lvr ask --backend transformers
--model OUT` loads, with the fixed chat template, plus `lvr_dpo.json`: the
settings, the data counts and the loss / reward-margin curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .chat_template import TemplateFix
from .sft import (ADAPTER_DIR, SftError, SftSettings, _clean_messages, _drop_torn_checkpoints, _merge_lora,
                  _quiet_libraries, _uniform, check_model, check_output_folder, load_training_tokenizer,
                  lora_target_modules, resolve_bf16, world_size)

SCHEMA = "lvr.dpo/1"
RECORD_FILE = "lvr_dpo.json"
DATA_DIR = ".lvr-dpo-data"       # pairs on disk while training with precomputed reference log-probs
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DpoError(SftError):
    """A usage problem: bad pairs, a missing model, unusable settings. One line for the user."""


@dataclass
class DpoSettings(SftSettings):
    """Everything `lvr dpo` can be told: `lvr sft`'s settings with DPO's defaults and knobs."""

    lr: float = 5e-7
    epochs: float = 1.0
    beta: float = 0.1
    loss_type: str = "sigmoid"
    precompute_ref: bool = False
    precompute_batch_size: int | None = None

    def check(self) -> None:
        try:
            super().check()
        except SftError as e:
            raise DpoError(str(e)) from None
        if not self.beta > 0:
            raise DpoError(f"--beta must be positive, not {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise DpoError(f"unknown --loss-type {self.loss_type!r} (use one of {', '.join(LOSS_TYPES)})")
        if self.precompute_batch_size is not None and not self.precompute_batch_size > 0:
            raise DpoError(f"--precompute-batch-size must be positive, not {self.precompute_batch_size}")


# -- data ---------------------------------------------------------------------------------

@dataclass
class PairData:
    path: str
    format: str = ""                   # "conversational" or "standard"
    samples: list[dict] = field(default_factory=list)
    records: int = 0
    identical: int = 0                 # chosen == rejected: no signal, left out
    sources: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        by = ", ".join(f"{n} {s}" for s, n in sorted(self.sources.items()))
        extra = f", {self.identical} with chosen == rejected left out" if self.identical else ""
        return f"{len(self.samples)} pairs ({self.format}{'; ' + by if by else ''}{extra})"


def _assistant_only(messages: Any, where: str) -> list[dict]:
    out = _clean_messages(messages, where, need_assistant=False)
    if any(m["role"] != "assistant" for m in out):
        raise DpoError(f"{where}: must hold assistant messages only")
    return out


def load_pairs(path: "str | os.PathLike") -> PairData:
    """Read and check the preference pairs; DpoError names the file, line and problem."""
    from ..prep.jsonl import RecordError, read_jsonl
    from .hints import HINT_PREFIX
    from .pairs import PAIR_SCHEMA

    name = str(path)
    if name != "-" and not Path(name).is_file():
        raise DpoError(f"{name}: no such pairs file" if not Path(name).exists() else f"{name}: not a file")
    data = PairData(path=name)
    try:
        _read_pairs(data, read_jsonl(name), HINT_PREFIX, PAIR_SCHEMA)
    except RecordError as e:
        raise DpoError(str(e)) from None
    except SftError as e:  # a message check shared with `lvr sft`
        raise (e if isinstance(e, DpoError) else DpoError(str(e))) from None
    if not data.records:
        raise DpoError(f"{name}: no records (the pairs file is empty)")
    if not data.samples:
        raise DpoError(f"{name}: no usable pairs (every one has chosen == rejected)")
    if data.format == "conversational":
        _uniform(data.samples)
    return data


def _read_pairs(data: PairData, lines, hint_prefix: str, pair_schema: str) -> None:
    """Check each (line number, record) and add its sample to data."""
    name = data.path
    for lineno, rec in lines:
        where = f"{name}:{lineno}"
        data.records += 1
        if str(rec.get("schema", "")).startswith("lvr.trajectory/"):
            raise DpoError(f"{where}: a trajectory, not a preference pair; make pairs with "
                           "`lvr synthesize --export-pairs TRAJECTORIES -o pairs.jsonl`")
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise DpoError(f"{where}: not a preference pair (no {', '.join(missing)}; expected prompt, "
                           "chosen and rejected)")
        kind = "standard" if isinstance(rec["prompt"], str) else "conversational"
        if data.format and kind != data.format:
            raise DpoError(f"{where}: a {kind} pair in a file of {data.format} pairs (one file holds one kind)")
        data.format = kind
        if kind == "standard":
            if not all(isinstance(rec[k], str) and rec[k] for k in ("chosen", "rejected")):
                raise DpoError(f"{where}: chosen and rejected must be non-empty text, like the prompt")
            sample = {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
            same = rec["chosen"].strip() == rec["rejected"].strip()
        else:
            prompt = _clean_messages(rec["prompt"], f"{where}: prompt", need_assistant=False)
            if prompt[-1]["role"] == "assistant":
                raise DpoError(f"{where}: prompt ends with an assistant message; it must end where the "
                               "next assistant turn is written (a user or tool message)")
            chosen = _assistant_only(rec["chosen"], f"{where}: chosen")
            rejected = _assistant_only(rec["rejected"], f"{where}: rejected")
            if rec.get("schema") == pair_schema and any(hint_prefix in m["content"] for m in prompt):
                raise DpoError(f"{where}: hint text in the prompt (hints must never reach training data)")
            sample = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            same = [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]
        if same:
            data.identical += 1
            continue
        data.sources[str(rec.get("source") or "pairs")] += 1
        data.samples.append(sample)


# -- setting up ---------------------------------------------------------------------------

@dataclass
class DpoRun:
    """A trainer ready to train, and what was decided on the way."""

    settings: DpoSettings
    data: PairData
    trainer: Any
    tokenizer: Any
    template: TemplateFix
    bf16: bool
    resume_from: str | None
    reference: str                     # "precomputed", "adapter-off" or "model-copy"
    dropped_long: int = 0              # pairs whose prompt alone reaches max_length (TRL drops them)
    cut: int = 0                       # pairs cut at max_length


def _progress_callback(log: Callable[[str], None]):
    """One line per logged step (loss, reward margin, accuracy), on the main process only."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            margin, acc = logs.get("rewards/margins"), logs.get("rewards/accuracies")
            log(f"lvr dpo: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                + (f" margin {margin:.4f}" if isinstance(margin, (int, float)) else "")
                + (f" acc {acc:.2f}" if isinstance(acc, (int, float)) else ""))

    return Progress()


def _dataset(samples: list[dict], output: Path, config, on_disk: bool):
    """The pairs as a datasets.Dataset; on disk in OUT when every process must find the same cache files.

    TRL caches precomputed reference log-probs next to the dataset's files and the
    other processes read them back, which an in-memory dataset (a random temporary
    file per process) cannot give them.
    """
    import datasets

    if not on_disk:
        return datasets.Dataset.from_list(samples)
    where = output / DATA_DIR
    with config.main_process_first(local=False, desc="writing the pairs"):
        if config.process_index == 0:
            shutil.rmtree(where, ignore_errors=True)
            datasets.Dataset.from_list(samples).save_to_disk(str(where))
    return datasets.load_from_disk(str(where))


@contextlib.contextmanager
def _quiet_precompute(quiet: bool):
    """TRL's precompute progress bar obeys TQDM_DISABLE, read when the bar is made; set it for that long only."""
    old = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if quiet:
            if old is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old


def build_trainer(settings: DpoSettings, data: PairData | None = None, *,
                  log: Callable[[str], None] | None = None) -> DpoRun:
    """Check everything, load the tokenizer, fix its template, and build the DPOTrainer (no training yet)."""
    settings.check()
    data = data if data is not None else load_pairs(settings.data)
    try:
        model = check_model(settings.model)
    except SftError as e:
        raise DpoError(str(e)) from None
    output, resume_from = check_output_folder(settings.output, settings.resume, error=DpoError)
    if data.path == "-" and world_size() > 1:
        raise DpoError("PAIRS '-' (stdin) cannot be shared by several processes; pass a file")

    _quiet_libraries()
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    bf16 = resolve_bf16(settings.bf16, cpu=settings.cpu)
    tokenizer, fix = load_training_tokenizer(model, settings.model, settings.chat_template, error=DpoError)

    checkpointing = settings.gradient_checkpointing
    if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"):
        checkpointing = False
    model_kwargs: dict[str, Any] = {"dtype": "bfloat16" if (settings.lora and bf16) else "float32"}
    if world_size() > 1:
        model_kwargs["device_map"] = None
    config = DPOConfig(
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
        truncation_mode="keep_start",
        beta=settings.beta,
        loss_type=[settings.loss_type],
        precompute_ref_log_probs=settings.precompute_ref,
        precompute_ref_batch_size=settings.precompute_batch_size,
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
        model_init_kwargs=model_kwargs,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    train_dataset = _dataset(data.samples, output, config, on_disk=settings.precompute_ref)
    peft_config = None
    if settings.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                 lora_dropout=settings.lora_dropout, task_type="CAUSAL_LM",
                                 target_modules=lora_target_modules(settings.lora_targets))
    callbacks = [_progress_callback(log)] if log else []
    with _quiet_precompute(log is None):  # TRL's bar while it scores the pairs with the reference
        trainer = DPOTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    reference = "precomputed" if settings.precompute_ref else ("adapter-off" if settings.lora else "model-copy")
    run = DpoRun(settings, data, trainer, tokenizer, fix, bf16, resume_from, reference)
    run.dropped_long = len(data.samples) - len(trainer.train_dataset)
    if not len(trainer.train_dataset):
        raise DpoError(f"every pair's prompt reaches --max-length {settings.max_length} tokens; raise it")
    try:
        ds = trainer.train_dataset
        run.cut = sum(1 for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
                      if len(p) + max(len(c), len(r)) > settings.max_length)
    except Exception:  # noqa: BLE001 - a count for the record only
        run.cut = 0
    return run


# -- training and saving ------------------------------------------------------------------

_CURVE_KEYS = {"rewards/margins": "margin", "rewards/accuracies": "accuracy", "rewards/chosen": "reward_chosen",
               "rewards/rejected": "reward_rejected", "logps/chosen": "logp_chosen",
               "logps/rejected": "logp_rejected", "learning_rate": "lr"}


def _curve(log_history: list[dict]) -> list[dict]:
    """Per logged step: loss, reward margin and accuracy, chosen/rejected rewards and log-probs, lr."""
    curve = []
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            point = {"step": entry["step"], "loss": round(float(entry["loss"]), 6)}
            for key, name in _CURVE_KEYS.items():
                if isinstance(entry.get(key), (int, float)):
                    point[name] = float(entry[key]) if name == "lr" else round(float(entry[key]), 6)
            if "logp_chosen" in point and "logp_rejected" in point:
                point["logp_margin"] = round(point["logp_chosen"] - point["logp_rejected"], 6)
            if "epoch" in entry:
                point["epoch"] = round(float(entry["epoch"]), 4)
            curve.append(point)
    return curve


def _ends(curve: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [p[key] for p in curve if key in p]
    return (values[0], values[-1]) if values else (None, None)


def run_dpo(settings: DpoSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint and the fixed template into settings.output, and return the lvr_dpo.json record."""
    from .. import __version__
    from ..prep.jsonl import write_atomic

    say = log or (lambda _m: None)
    started = time.time()
    run = build_trainer(settings, log=log)
    trainer, output = run.trainer, Path(settings.output).expanduser()
    main = trainer.is_world_process_zero()
    if main:
        say(f"lvr dpo: {run.data.describe()}; template: {run.template.reason}; "
            f"{'LoRA' if settings.lora else 'full fine-tune'}, beta {settings.beta}, reference {run.reference}, "
            f"bf16 {'on' if run.bf16 else 'off'}, {world_size()} process(es)")
        if run.dropped_long:
            say(f"lvr dpo: {run.dropped_long} pair(s) left out: the prompt alone reaches --max-length "
                f"{settings.max_length}")
        if run.cut:
            say(f"lvr dpo: {run.cut} pair(s) reach --max-length {settings.max_length} and are cut there")
    if settings.resume and main:
        dropped = _drop_torn_checkpoints(output, run.resume_from)
        if dropped:
            say(f"lvr dpo: removed unfinished checkpoint(s) {', '.join(dropped)}")
        say(f"lvr dpo: resuming from {run.resume_from}" if run.resume_from
            else f"lvr dpo: no finished checkpoint in {output}; starting afresh")
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
        trainer.save_model(str(output))
    if main:
        run.tokenizer.save_pretrained(str(output))  # the fixed template, as chat_template.jinja
        shutil.rmtree(output / DATA_DIR, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()

    curve = _curve(trainer.state.log_history)
    first_loss, last_loss = _ends(curve, "loss")
    first_margin, last_margin = _ends(curve, "margin")
    first_lm, last_lm = _ends(curve, "logp_margin")
    record = {
        "schema": SCHEMA,
        "model": settings.model,
        "output": str(output),
        "layout": ("merged" if settings.lora and settings.merge_lora else "adapter" if settings.lora else "full"),
        "adapter": ADAPTER_DIR if settings.lora and settings.merge_lora else ("." if settings.lora else None),
        "reference": run.reference,
        "data": {"path": run.data.path, "format": run.data.format, "records": run.data.records,
                 "pairs": len(run.data.samples), "identical_left_out": run.data.identical,
                 "sources": dict(run.data.sources), "prompt_too_long": run.dropped_long,
                 "cut_at_max_length": run.cut},
        "template": run.template.to_record(),
        "settings": {**asdict(settings), "bf16_resolved": run.bf16,
                     "lora_targets": lora_target_modules(settings.lora_targets) if settings.lora else None},
        "world_size": world_size(),
        "resumed_from": run.resume_from,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "first_loss": first_loss, "last_loss": last_loss,
        "first_margin": first_margin, "last_margin": last_margin,
        "first_logp_margin": first_lm, "last_logp_margin": last_lm,
        "curve": curve,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.time() - started, 2),
        "producer": {"tool": "lvr dpo", "version": __version__},
    }
    if main:
        write_atomic(output / RECORD_FILE, json.dumps(record, indent=1) + "\n")
    return record


def summary_line(record: dict) -> str:
    data = record["data"]
    loss = (f"loss {record['first_loss']:.4f} -> {record['last_loss']:.4f}"
            if record["first_loss"] is not None else "no loss logged")
    margin = (f", reward margin {record['first_margin']:.4f} -> {record['last_margin']:.4f}"
              if record["first_margin"] is not None else "")
    return (f"lvr dpo: {data['pairs']} pairs, {record['steps']} steps, {loss}{margin}, "
            f"{record['seconds']:.1f} s; {record['layout']} model in {record['output']}")

"""Supervised fine-tuning of the navigator with TRL's SFTTrainer (docs/architecture.md §2.6).

Full fine-tuning or LoRA, loss on assistant turns only, and a chat template that
keeps the `<think>` text of earlier turns (see `chat_template`). The defaults
follow LongVideo-R1: lr 1e-5, cosine schedule, warmup 0.1, 3 epochs, bf16 where the
GPU has it, sequences cut at 24k tokens.

Data (JSONL, one sample per line, or one JSON list; the first record decides the kind):

- TRL messages: ``{"messages": [{"role": ..., "content": ...}, ...]}``;
- TRL conversational prompt-completion: ``{"prompt": [...], "completion":
  [{"role": "assistant", ...}]}`` - the loss is on the completion only;
- `lvr.trajectory/1` records from `lvr synthesize`: the `messages` of records
  with ``accepted: true``; the others are skipped and counted;
- LLaMA-Factory SFT data, alpaca or sharegpt, as the LongVideo-R1 release ships
  it (`released_data.sft_messages`): each sample's own system prompt is kept.

The loss falls on every assistant turn of a conversation, or with
``mask_history`` (``--mask-history``, LLaMA-Factory's option of that name, which
the LongVideo-R1 recipe sets) on its last assistant turn only: the sample becomes
a prompt-completion pair whose prompt is everything before that turn.

The output folder is a plain Hugging Face checkpoint (weights, config, tokenizer,
the fixed chat template as chat_template.jinja) plus `lvr_sft.json`, the settings
and the loss curve; `lvr ask --backend transformers --model OUT` loads it. More
GPUs and nodes come through `accelerate launch` with the configs in configs/.

torch, transformers, TRL, PEFT and datasets are imported inside the functions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from ..prep.models.base import message_text
from ..prep.options import option
from ..prep.records import BadLine, RecordFileError, RecordSkip, json_records, read_text
from .released_data import SFT_LAYOUTS, sft_layout, sft_messages
from .trainer_kit import (TRAIN_PANEL, TrainingRun, TrainingSettings, check_positive, curve_ends, last_checkpoint, log_curve,
                          lora_config, lora_layout, lora_target_modules, prepare, progress_callbacks, run_record,
                          save_trained, train, training_arguments, without_printer, write_record)

__all__ = ["SftError", "SftSettings", "SftDataOptions", "SftData", "SftRun", "load_sft_data", "training_records",
           "clean_messages", "uniform_samples", "build_trainer", "run_sft", "summary_line", "last_checkpoint"]

LORA_PANEL = "LoRA"
SCHEMA = "lvr.sft/1"
RECORD_FILE = "lvr_sft.json"
TOOL = "lvr sft"
ROLES = ("system", "user", "assistant", "tool")


class SftError(ValueError):
    """A usage problem: bad data, a missing model, unusable settings. One line for the user."""


@dataclass(kw_only=True)
class SftSettings(TrainingSettings):
    """Everything `lvr sft` can be told. Defaults follow LongVideo-R1's SFT (see TrainingSettings)."""

    error_type: ClassVar[type[Exception]] = SftError

    data: str
    lora: bool = option(False, "--lora/--no-lora", panel=LORA_PANEL,
                        help="Train LoRA adapters instead of all weights (dpo: the reference is then the model "
                             "with its adapter off).")
    lora_r: int = option(16, "--lora-r", panel=LORA_PANEL, help="LoRA rank.")
    lora_alpha: int = option(32, "--lora-alpha", panel=LORA_PANEL, help="LoRA alpha.")
    lora_dropout: float = option(0.05, "--lora-dropout", panel=LORA_PANEL, help="LoRA dropout.")
    lora_targets: str = option("all-linear", "--lora-targets", metavar="NAMES", panel=LORA_PANEL,
                               help="Modules to adapt: all-linear, or names such as q_proj,k_proj,v_proj,o_proj.")
    merge_lora: bool = option(True, "--merge-lora/--no-merge-lora", panel=LORA_PANEL,
                              help="Save the merged full model in DIR (adapter in DIR/adapter), so `lvr ask` "
                                   "loads it; --no-merge-lora saves only the adapter in DIR.")
    max_length: int = option(24576, "--max-length", panel=TRAIN_PANEL,
                             help="Cut each sample at this many tokens (LongVideo-R1: 24k); dpo leaves out a pair "
                                  "whose prompt alone reaches it (counted).")
    mask_history: bool = False        # --mask-history comes from SftDataOptions (lvr sft only)

    def check(self) -> None:
        """error_type naming the first unusable setting."""
        super().check()
        error = self.error_type
        check_positive({"--max-length": self.max_length}, error)
        if self.lora:
            check_positive({"--lora-r": self.lora_r, "--lora-alpha": self.lora_alpha}, error)
        if not 0 <= self.lora_dropout < 1:
            raise error(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if self.lora and not lora_target_modules(self.lora_targets):
            raise error("--lora-targets is empty (use all-linear or module names such as q_proj,v_proj)")

    def record_extras(self) -> dict:
        return {"lora_targets": lora_target_modules(self.lora_targets) if self.lora else None}

    def bf16_weights(self, bf16: bool) -> bool:
        return self.lora and bf16  # the frozen base of LoRA need not be float32

    def peft_config(self):
        """PEFT's LoraConfig with --lora, else None (all weights train)."""
        if not self.lora:
            return None
        return lora_config(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)

    def method(self) -> str:
        return "LoRA" if self.lora else "full fine-tune"

    def merges_lora(self) -> bool:
        return self.lora and self.merge_lora

    def layout(self) -> dict:
        """The run record's `layout` and `adapter`."""
        return lora_layout(self.lora, self.merge_lora)


@dataclass(kw_only=True)
class SftDataOptions:
    """How `lvr sft` puts the loss on its conversations (not `lvr dpo`'s: a pair trains one turn already)."""

    mask_history: bool = option(False, "--mask-history/--no-mask-history", panel=TRAIN_PANEL,
                                help="Train on each conversation's last assistant turn only, as LLaMA-Factory's "
                                     "mask_history (the LongVideo-R1 SFT recipe); default: every assistant turn.")


# -- data ---------------------------------------------------------------------------------

LLAMAFACTORY_FORMATS = {layout: f"llamafactory-{layout}" for layout in SFT_LAYOUTS}


@dataclass
class SftData:
    path: str
    format: str                       # "messages", "prompt-completion", "trajectory" or a LLAMAFACTORY_FORMATS value
    samples: list[dict] = field(default_factory=list)
    skipped: int = 0                  # trajectory records that were not accepted
    records: int = 0                  # records read

    def describe(self) -> str:
        extra = f", {self.skipped} not accepted and skipped" if self.skipped else ""
        return f"{len(self.samples)} samples ({self.format}{extra})"


def _content_text(content: Any, where: str, error: type[Exception]) -> Any:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return message_text(content)
    raise error(f"{where}: content must be text (a string, or a list of text parts)")


def clean_messages(messages: Any, where: str, *, need_assistant: bool = True,
                   error: type[Exception] = SftError) -> list[dict]:
    """The messages with role, text content (and an assistant's reasoning_content) only; `error` names a bad one."""
    if not isinstance(messages, list) or not messages:
        raise error(f"{where}: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise error(f"{where}: message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise error(f"{where}: message {i} has role {role!r} (use {', '.join(ROLES)})")
        if "content" not in m or m["content"] is None:
            raise error(f"{where}: message {i} has no content")
        msg = {"role": role, "content": _content_text(m["content"], f"{where}: message {i}", error)}
        if isinstance(m.get("reasoning_content"), str) and role == "assistant":
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise error(f"{where}: has no assistant turn to learn from")
    return out


def _kind(record: dict) -> str:
    schema = record.get("schema")
    if isinstance(schema, str) and schema.startswith("lvr.trajectory/"):
        return "trajectory"
    if "prompt" in record or "completion" in record:
        return "prompt-completion"
    if "messages" in record:
        return "messages"
    layout = sft_layout(record)
    return LLAMAFACTORY_FORMATS[layout] if layout else "unknown"


def uniform_samples(samples: list[dict]) -> list[dict]:
    """Give every message the same keys, so the samples form one Arrow table."""
    if not any("reasoning_content" in m for s in samples for msgs in s.values() for m in msgs):
        return samples
    for s in samples:
        for msgs in s.values():
            for m in msgs:
                m.setdefault("reasoning_content", None)
    return samples


def training_records(path: "str | os.PathLike", kind: str, error: type[Exception]) -> Iterator[tuple[str, dict]]:
    """('FILE:LINE', record) of each record of a training JSONL ('-': stdin).

    `error` for a missing file, a line that is not a JSON object, or a file without records.
    """
    from ..prep.jsonl import RecordError, read_jsonl

    name = str(path)
    if name != "-" and not Path(name).is_file():
        raise error(f"{name}: no such {kind} file" if not Path(name).exists() else f"{name}: not a file")
    records = 0
    try:
        for lineno, rec in read_jsonl(name):
            records += 1
            yield f"{name}:{lineno}", rec
    except RecordError as e:
        raise error(str(e)) from None
    if not records:
        raise error(f"{name}: no records (the {kind} file is empty)")


def _starts_json_list(name: str) -> bool:
    """Whether a file's first character past whitespace (and a byte-order mark) is '['."""
    try:
        with open(name, encoding="utf-8", errors="replace") as f:
            while chunk := f.read(4096):
                text = chunk.lstrip("\ufeff \t\r\n")
                if text:
                    return text[0] == "["
    except OSError:
        pass  # training_records names the problem
    return False


def _sft_records(path: "str | os.PathLike") -> Iterator[tuple[str, dict]]:
    """`training_records`, and one JSON list too (LLaMA-Factory data files are; the release's is)."""
    name = str(path)
    if name == "-" or not _starts_json_list(name):
        yield from training_records(path, "data", SftError)
        return
    try:
        records = list(json_records(name, read_text(name)))
    except RecordFileError as e:
        raise SftError(str(e)) from None
    if not records:
        raise SftError(f"{name}: no records (the data file is empty)")
    for lineno, rec in records:
        if isinstance(rec, BadLine) or not isinstance(rec, dict):
            raise SftError(f"{name}:{lineno}: not a JSON object")
        yield f"{name}:{lineno}", rec


def _last_turn_only(messages: list[dict], where: str) -> dict:
    """mask_history: the conversation as a prompt-completion pair whose completion is its last turn."""
    if messages[-1]["role"] != "assistant":
        raise SftError(f"{where}: ends with a {messages[-1]['role']} message; --mask-history trains the last "
                       "message, which must be the assistant's")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def load_sft_data(path: "str | os.PathLike", *, mask_history: bool = False) -> SftData:
    """Read and check the training samples; SftError names the file, line and problem.

    `mask_history`: each conversation trains its last assistant turn only (a prompt-completion sample).
    """
    data = SftData(path=str(path), format="")

    def add(messages: list[dict], where: str) -> None:
        data.samples.append(_last_turn_only(messages, where) if mask_history else {"messages": messages})

    for where, rec in _sft_records(path):
        data.records += 1
        kind = _kind(rec)
        if kind == "unknown":
            raise SftError(f"{where}: not a training record (expected messages, prompt/completion, an "
                           "lvr.trajectory/1 record, or a LLaMA-Factory alpaca or sharegpt sample)")
        family = "prompt-completion" if kind == "prompt-completion" else "messages"
        if data.format and family != ("prompt-completion" if data.format == "prompt-completion" else "messages"):
            raise SftError(f"{where}: a {kind} record in a file of {data.format} records "
                           "(one file holds one kind)")
        data.format = data.format or kind
        if kind == "trajectory":
            if rec.get("accepted") is not True:
                data.skipped += 1
                continue
            messages = clean_messages(rec.get("messages"), f"{where}: messages")
            for hint in rec.get("hints") or []:
                text = hint.get("text") if isinstance(hint, dict) else None
                if isinstance(text, str) and text.strip() and any(text.strip() in m["content"] for m in messages):
                    raise SftError(f"{where}: hint text leaked into messages (hints must never reach SFT)")
            add(messages, where)
        elif kind == "messages":
            add(clean_messages(rec.get("messages"), f"{where}: messages"), where)
        elif kind in LLAMAFACTORY_FORMATS.values():
            try:
                add(clean_messages(sft_messages(rec), where), where)
            except RecordSkip as e:
                raise SftError(f"{where}: {e}") from None
        else:
            prompt = clean_messages(rec.get("prompt"), f"{where}: prompt", need_assistant=False)
            completion = clean_messages(rec.get("completion"), f"{where}: completion")
            if any(m["role"] != "assistant" for m in completion):
                raise SftError(f"{where}: completion must hold assistant messages only")
            data.samples.append({"prompt": prompt, "completion": completion})
    if not data.samples:
        raise SftError(f"{data.path}: no usable samples ({data.skipped} trajectory records, none accepted)")
    uniform_samples(data.samples)
    return data


# -- setting up ---------------------------------------------------------------------------

@dataclass
class SftRun(TrainingRun):
    """A trainer ready to train, and what was decided on the way."""

    settings: SftSettings
    data: SftData


def _step_details(logs: dict) -> str:
    lr = logs.get("learning_rate")
    return f"loss {logs['loss']:.4f}" + (f" lr {lr:.3g}" if isinstance(lr, (int, float)) else "")


def build_trainer(settings: SftSettings, data: SftData | None = None, *,
                  log: Callable[[str], None] | None = None) -> SftRun:
    """Check everything, load the tokenizer, fix its template, and build the SFTTrainer (no training yet)."""
    settings.check()
    if data is None:
        data = load_sft_data(settings.data, mask_history=settings.mask_history)
    run = prepare(SftRun, settings, data, data_arg="DATA")
    import datasets
    from trl import SFTConfig, SFTTrainer

    train_dataset = datasets.Dataset.from_list(run.data.samples)
    config = SFTConfig(**training_arguments(settings, run.output, run.bf16), max_length=settings.max_length,
                       assistant_only_loss=True,
                       ddp_find_unused_parameters=False)  # text-only: every trainable weight takes part in each step
    run.trainer = without_printer(SFTTrainer(
        model=run.model, args=config, train_dataset=train_dataset, processing_class=run.tokenizer,
        peft_config=settings.peft_config(), callbacks=progress_callbacks(log, TOOL, _step_details)))
    return run


# -- training and saving ------------------------------------------------------------------

LOSS_CURVE = {"loss": "loss", "learning_rate": "lr", "epoch": "epoch"}


def _count_cut(trainer, max_length: int) -> int:
    try:
        return sum(1 for n in (len(x) for x in trainer.train_dataset["input_ids"]) if n >= max_length)
    except Exception:  # noqa: BLE001 - a count for the record only
        return 0


def run_sft(settings: SftSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint and the fixed template into settings.output, and return the lvr_sft.json record."""
    started = time.time()
    run = build_trainer(settings, log=log)
    cut = _count_cut(run.trainer, settings.max_length)
    trained = train(run, log, TOOL, [settings.method()],
                    [f"{cut} sample(s) reach --max-length {settings.max_length} and are cut there"] if cut else [])
    save_trained(run, merge_lora=settings.merges_lora())  # for LoRA without merging, the adapter alone

    curve = log_curve(run.trainer.state.log_history, LOSS_CURVE)
    first_loss, last_loss = curve_ends(curve, "loss")
    record = run_record(
        run, trained, schema=SCHEMA, tool=TOOL, started=started, head=settings.layout(),
        data={"path": run.data.path, "format": run.data.format, "records": run.data.records,
              "samples": len(run.data.samples), "skipped": run.data.skipped, "cut_at_max_length": cut},
        results={"first_loss": first_loss, "last_loss": last_loss, "losses": curve})
    write_record(run, RECORD_FILE, record)
    return record


def summary_line(record: dict) -> str:
    data = record["data"]
    skipped = f" ({data['skipped']} skipped)" if data["skipped"] else ""
    loss = (f"loss {record['first_loss']:.4f} -> {record['last_loss']:.4f}"
            if record["first_loss"] is not None else "no loss logged")
    return (f"lvr sft: {data['samples']} samples{skipped}, {record['steps']} steps, {loss}, "
            f"{record['seconds']:.1f} s; {record['layout']} model in {record['output']}")

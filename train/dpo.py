"""Preference training of the navigator with TRL's DPOTrainer (`lvr dpo`, LongVPO-style).

Input is turn-level preference pairs, as `lvr synthesize --export-pairs` writes
them: TRL's conversational preference form ``{"prompt": [...], "chosen":
[{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``, extra
keys ignored. Plain-text pairs (``prompt``/``chosen``/``rejected`` strings) work too.

Everything else is `lvr sft`'s (settings, model checks, LoRA with merging, resuming,
`accelerate launch`, the chat template that keeps earlier turns' `<think>`; see
`lvr.train.sft` and `lvr.train.trainer_kit`), with DPO's own knobs: ``beta`` (0.1), the loss type, and
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
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from .sft import SftError, SftSettings, clean_messages, training_records, uniform_samples
from ..prep.options import option, override
from .trainer_kit import (LossTypeSettings, TrainingRun, TrainingSettings, curve_ends, log_curve, prepare, progress_callbacks, run_record, save_trained,
                          train, training_arguments, without_printer, write_record)

SCHEMA = "lvr.dpo/1"
RECORD_FILE = "lvr_dpo.json"
TOOL = "lvr dpo"
DATA_DIR = ".lvr-dpo-data"       # pairs on disk while training with precomputed reference log-probs
DPO_PANEL = "DPO"
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DpoError(SftError):
    """A usage problem: bad pairs, a missing model, unusable settings. One line for the user."""


@dataclass(kw_only=True)
class DpoSettings(SftSettings, LossTypeSettings):
    """Everything `lvr dpo` can be told: `lvr sft`'s settings with DPO's defaults and knobs."""

    error_type: ClassVar[type[Exception]] = DpoError

    lr: float = override(TrainingSettings, "lr", 5e-7)
    epochs: float = override(TrainingSettings, "epochs", 1.0)
    beta: float = option(0.1, "--beta", panel=DPO_PANEL,
                         help="How far the policy may move from the reference (higher: less).")
    precompute_ref: bool = option(False, "--precompute-ref/--no-precompute-ref", panel=DPO_PANEL,
                                  help="Compute the reference log-probs of every pair once before training: no "
                                       "reference copy in memory and about half the forward passes.")
    precompute_batch_size: int | None = option(None, "--precompute-batch-size", panel=DPO_PANEL,
                                               help="Pairs per batch while precomputing (default: --batch-size).")

    def check(self) -> None:
        super().check()
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
    out = clean_messages(messages, where, need_assistant=False, error=DpoError)
    if any(m["role"] != "assistant" for m in out):
        raise DpoError(f"{where}: must hold assistant messages only")
    return out


def load_pairs(path: "str | os.PathLike") -> PairData:
    """Read and check the preference pairs; DpoError names the file, line and problem."""
    from .hints import HINT_PREFIX
    from .pairs import PAIR_SCHEMA

    data = PairData(path=str(path))
    _read_pairs(data, training_records(path, "pairs", DpoError), HINT_PREFIX, PAIR_SCHEMA)
    if not data.samples:
        raise DpoError(f"{data.path}: no usable pairs (every one has chosen == rejected)")
    if data.format == "conversational":
        uniform_samples(data.samples)
    return data


def _read_pairs(data: PairData, lines, hint_prefix: str, pair_schema: str) -> None:
    """Check each ('FILE:LINE', record) and add its sample to data."""
    for where, rec in lines:
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
            prompt = clean_messages(rec["prompt"], f"{where}: prompt", need_assistant=False, error=DpoError)
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
class DpoRun(TrainingRun):
    """A trainer ready to train, and what was decided on the way."""

    settings: DpoSettings
    data: PairData
    reference: str = ""                # "precomputed", "adapter-off" or "model-copy"
    dropped_long: int = 0              # pairs whose prompt alone reaches max_length (TRL drops them)
    cut: int = 0                       # pairs cut at max_length


def step_details(logs: dict) -> str:
    """Loss, reward margin and accuracy of a logged step."""
    margin, acc = logs.get("rewards/margins"), logs.get("rewards/accuracies")
    return (f"loss {logs['loss']:.4f}" + (f" margin {margin:.4f}" if isinstance(margin, (int, float)) else "")
            + (f" acc {acc:.2f}" if isinstance(acc, (int, float)) else ""))


def preference_dataset(samples: list[dict], output: Path, config, on_disk: bool):
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
def quiet_precompute(quiet: bool):
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
    run = prepare(DpoRun, settings, data if data is not None else load_pairs(settings.data), data_arg="PAIRS")
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        beta=settings.beta,
        loss_type=[settings.loss_type],
        precompute_ref_log_probs=settings.precompute_ref,
        precompute_ref_batch_size=settings.precompute_batch_size,
        max_length=settings.max_length,
        truncation_mode="keep_start",
        ddp_find_unused_parameters=False,
        **training_arguments(settings, run.output, run.bf16),
    )
    train_dataset = preference_dataset(run.data.samples, run.output, config, on_disk=settings.precompute_ref)
    with quiet_precompute(log is None):  # TRL's bar while it scores the pairs with the reference
        run.trainer = without_printer(DPOTrainer(
            model=run.model, args=config, train_dataset=train_dataset, processing_class=run.tokenizer,
            peft_config=settings.peft_config(), callbacks=progress_callbacks(log, TOOL, step_details)))
    run.reference = "precomputed" if settings.precompute_ref else ("adapter-off" if settings.lora else "model-copy")
    ds = run.trainer.train_dataset
    run.dropped_long = len(run.data.samples) - len(ds)
    if not len(ds):
        raise DpoError(f"every pair's prompt reaches --max-length {settings.max_length} tokens; raise it")
    try:
        run.cut = sum(1 for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
                      if len(p) + max(len(c), len(r)) > settings.max_length)
    except Exception:  # noqa: BLE001 - a count for the record only
        run.cut = 0
    return run


# -- training and saving ------------------------------------------------------------------

CURVE_NAMES = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "accuracy",
               "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
               "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected", "learning_rate": "lr",
               "epoch": "epoch"}


def dpo_curve(log_history: list[dict]) -> list[dict]:
    """Per logged step: loss, reward margin and accuracy, chosen/rejected rewards and log-probs and their margin, lr."""
    curve = log_curve(log_history, CURVE_NAMES)
    for point in curve:
        if "logp_chosen" in point and "logp_rejected" in point:
            point["logp_margin"] = round(point["logp_chosen"] - point["logp_rejected"], 6)
    return curve


def run_dpo(settings: DpoSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint and the fixed template into settings.output, and return the lvr_dpo.json record."""
    started = time.time()
    run = build_trainer(settings, log=log)
    notes = []
    if run.dropped_long:
        notes.append(f"{run.dropped_long} pair(s) left out: the prompt alone reaches --max-length "
                     f"{settings.max_length}")
    if run.cut:
        notes.append(f"{run.cut} pair(s) reach --max-length {settings.max_length} and are cut there")
    trained = train(run, log, TOOL, [settings.method(), f"beta {settings.beta}", f"reference {run.reference}"], notes)
    save_trained(run, merge_lora=settings.merges_lora())
    if run.main:
        shutil.rmtree(run.output / DATA_DIR, ignore_errors=True)

    record = run_record(
        run, trained, schema=SCHEMA, tool=TOOL, started=started, head={**settings.layout(), "reference": run.reference},
        data={"path": run.data.path, "format": run.data.format, "records": run.data.records,
              "pairs": len(run.data.samples), "identical_left_out": run.data.identical,
              "sources": dict(run.data.sources), "prompt_too_long": run.dropped_long, "cut_at_max_length": run.cut},
        results=preference_results(run.trainer.state.log_history))
    write_record(run, RECORD_FILE, record)
    return record


def preference_results(log_history: list[dict]) -> dict:
    """A preference run's results for its record: the loss and margin curve, and its ends."""
    curve = dpo_curve(log_history)
    results = {}
    for name, key in (("loss", "loss"), ("margin", "margin"), ("logp_margin", "logp_margin")):
        results[f"first_{name}"], results[f"last_{name}"] = curve_ends(curve, key)
    return {**results, "curve": curve}


def loss_and_margin(record: dict) -> str:
    """'loss a -> b, reward margin c -> d' of a preference run's record."""
    loss = (f"loss {record['first_loss']:.4f} -> {record['last_loss']:.4f}"
            if record["first_loss"] is not None else "no loss logged")
    margin = (f", reward margin {record['first_margin']:.4f} -> {record['last_margin']:.4f}"
              if record["first_margin"] is not None else "")
    return loss + margin


def summary_line(record: dict) -> str:
    return (f"lvr dpo: {record['data']['pairs']} pairs, {record['steps']} steps, {loss_and_margin(record)}, "
            f"{record['seconds']:.1f} s; {record['layout']} model in {record['output']}")

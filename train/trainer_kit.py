"""What `lvr sft`, `lvr dpo` and `lvr rl` share: settings, processes, checkpoints, tokenizer, LoRA, the run.

- `TrainingSettings`: the settings every trainer has and their checks; `lr`,
  `epochs`, ... carry `lvr sft`'s defaults, which dpo and rl set again where theirs differ.
- processes: `world_size`, `is_main_process`, `main_log` (messages from rank 0 only);
- checkpoints: `check_output_folder` (resume, or refuse to overwrite an earlier run),
  `last_checkpoint`, `drop_torn_checkpoints`;
- the model: `check_model`, `resolve_bf16`, `load_training_tokenizer` (think-keeping
  chat template, a pad token), `training_arguments` (the TrainingArguments fields the
  three set alike, `report_to` parsed by `report_to_list`), LoRA (`lora_config`,
  `merge_adapter`);
- the run: `TrainingRun` (`prepare` checks and loads all but the trainer), `train`,
  `save_trained`, `log_curve`, `run_record`, `write_record`.

torch, transformers, TRL and PEFT are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from .chat_template import TemplateError, TemplateFix, ensure_think_preserving_template, template_keeps_think
from ..prep.models import MODEL_HELP
from ..prep.models.locate import looks_like_path
from ..prep.options import option

TRAIN_PANEL = "Training"
LOSS_TYPE_HELP = ("TRL's loss: for dpo sigmoid (DPO), ipo, hinge, robust, apo_zero, ...; for rl the aggregation "
                  "grpo (per sequence), dapo, bnpo, dr_grpo, ...")
SAVE_PANEL = "Saving and resuming"

ADAPTER_DIR = "adapter"
BF16_CHOICES = {"auto": None, "true": True, "yes": True, "on": True, "1": True,
                "false": False, "no": False, "off": False, "0": False}
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay")

Log = Callable[[str], None]


def _silent(_message: str) -> None:
    pass


# -- settings -----------------------------------------------------------------------------

def check_positive(values: Mapping[str, Any], error: type[Exception]) -> None:
    """`error` naming the first flag whose value is not above 0."""
    for flag, value in values.items():
        if not value > 0:
            raise error(f"{flag} must be positive, not {value}")


@dataclass(kw_only=True)
class TrainingSettings:
    """The settings of every trainer. Defaults are `lvr sft`'s; dpo and rl give their own where they differ.

    Keyword-only: each trainer adds its own fields (its data first) after these.
    """

    error_type: ClassVar[type[Exception]] = ValueError   # what check() and the kit raise for these settings

    model: str = option(MISSING, "--model", metavar="MODEL", help=MODEL_HELP)   # required
    output: str                        # OUT (-o): the checkpoint, its chat template, the run record
    lr: float = option(1e-5, "--lr", panel=TRAIN_PANEL, help="Peak learning rate.")
    epochs: float = option(3.0, "--epochs", panel=TRAIN_PANEL, help="Passes over the training data.")
    max_steps: int = option(-1, "--max-steps", panel=TRAIN_PANEL,
                            help="Stop after this many optimizer steps (overrides --epochs); -1: off.")
    warmup_ratio: float = option(0.1, "--warmup-ratio", panel=TRAIN_PANEL,
                                 help="Fraction of the steps spent warming the learning rate up.")
    scheduler: str = option("cosine", "--scheduler", panel=TRAIN_PANEL,
                            help="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ...")
    weight_decay: float = option(0.0, "--weight-decay", panel=TRAIN_PANEL, help="AdamW weight decay.")
    batch_size: int = option(1, "--batch-size", panel=TRAIN_PANEL,
                             help="Samples per device per step: sequences (sft), pairs of two sequences (dpo), "
                                  "rollouts per micro-step (rl).")
    grad_accum: int = option(1, "--grad-accum", panel=TRAIN_PANEL,
                             help="Gradient accumulation steps per optimizer step; processes x --batch-size x this "
                                  "samples per step (rl: a multiple of --num-generations).")
    bf16: str = option("auto", "--bf16", metavar="auto|true|false", panel=TRAIN_PANEL,
                       help="bf16 mixed precision; auto: on when the GPU supports it, off on CPU.")
    gradient_checkpointing: bool = option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                          panel=TRAIN_PANEL,
                                          help="Recompute activations in the backward pass to save memory.")
    seed: int = 42                     # --seed comes from SamplingOptions (one flag for every command)
    logging_steps: int = option(1, "--logging-steps", panel=SAVE_PANEL,
                                help="Log (and record) the loss every N steps.")
    save_steps: int = option(500, "--save-steps", panel=SAVE_PANEL,
                             help="Write a resumable checkpoint into DIR every N steps.")
    save_total_limit: int = option(1, "--save-total-limit", panel=SAVE_PANEL, help="Keep at most this many checkpoints.")
    resume: bool = option(False, "--resume", panel=SAVE_PANEL,
                          help="Continue from the last checkpoint in DIR (a killed run resumes).")
    report_to: str = option("none", "--report-to", panel=SAVE_PANEL,
                            help="Experiment trackers, comma-separated: none, tensorboard, wandb, ...")
    chat_template: str | None = option(None, "--chat-template", metavar="FILE", panel=TRAIN_PANEL,
                                       help="Jinja chat template to train with and save: it must keep earlier "
                                            "<think> text and mark assistant turns with {% generation %}. Default: "
                                            "the model's, fixed automatically when it drops earlier <think> text.")
    cpu: bool = option(False, "--cpu", panel=TRAIN_PANEL, help="Train on the CPU even with a GPU.")

    def check(self) -> None:
        """error_type naming the first unusable setting (subclasses add theirs after these)."""
        error = self.error_type
        check_positive({"--lr": self.lr, "--epochs": self.epochs, "--batch-size": self.batch_size,
                        "--grad-accum": self.grad_accum, "--logging-steps": self.logging_steps,
                        "--save-steps": self.save_steps, "--save-total-limit": self.save_total_limit}, error)
        if self.max_steps == 0 or self.max_steps < -1:
            raise error(f"--max-steps must be positive, or -1 to train for --epochs (not {self.max_steps})")
        if not 0 <= self.warmup_ratio < 1:
            raise error(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise error(f"--weight-decay must not be negative, not {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise error(f"unknown --scheduler {self.scheduler!r} (use one of {', '.join(SCHEDULERS)})")
        if str(self.bf16).strip().lower() not in BF16_CHOICES:
            raise error(f"--bf16 must be auto, true or false, not {self.bf16!r}")

    def record_extras(self) -> dict:
        """Resolved values the run record's settings carry besides the fields (none here)."""
        return {}

    def bf16_weights(self, bf16: bool) -> bool:
        """Whether the model loads in bf16 rather than float32 (only a frozen LoRA base may)."""
        return False


@dataclass(kw_only=True)
class LossTypeSettings:
    """`--loss-type`, which dpo and rl share with their own defaults (TRL names both `loss_type`)."""

    loss_type: str = option("sigmoid", "--loss-type", help=LOSS_TYPE_HELP)


# -- processes ----------------------------------------------------------------------------

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def main_log(log: Log | None) -> Log:
    """`log` on the main process (rank 0); nothing on the others, or without a log, so lines are not repeated."""
    return log if log is not None and is_main_process() else _silent


# -- checkpoints ----------------------------------------------------------------------------

def _checkpoints(output: Path) -> list[Path]:
    """checkpoint-N folders in output, newest (highest N) first."""
    if not output.is_dir():
        return []
    found = [p for p in output.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=_step, reverse=True)


def _step(checkpoint: "str | Path") -> int:
    return int(Path(checkpoint).name.split("-")[1])


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


def drop_torn_checkpoints(output: Path, keep: str | None) -> list[str]:
    """Delete checkpoints newer than `keep` that were cut off, so rotation never prefers them."""
    dropped = []
    newest_ok = _step(keep) if keep else -1
    for p in _checkpoints(output):
        if _step(p) > newest_ok and not _complete(p):
            shutil.rmtree(p, ignore_errors=True)
            dropped.append(p.name)
    return dropped


def check_output_folder(output_arg: str, resume: bool, *, error: type[Exception]) -> tuple[Path, str | None]:
    """(OUT, checkpoint to resume from); `error` when OUT cannot be used.

    A folder holding an earlier run's checkpoints needs --resume, so no run is overwritten by accident.
    """
    output = Path(output_arg).expanduser()
    if output.exists() and not output.is_dir():
        raise error(f"-o {output_arg}: exists and is not a folder")
    if resume:
        return output, last_checkpoint(output)
    if _checkpoints(output):
        raise error(f"-o {output_arg}: holds checkpoints of an earlier run; pass --resume to continue it, "
                    "or choose another folder")
    return output, None


# -- the model and its tokenizer --------------------------------------------------------------

def check_model(model: str, *, error: type[Exception]) -> str:
    """The model as from_pretrained should get it; `error` for a local folder that is missing."""
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise error(f"--model {model}: not a model folder")
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise error(f"--model {model}: no config.json in this folder (not a Hugging Face checkpoint)")
        return expanded
    if looks_like_path(model):
        raise error(f"--model {model}: no such model folder")
    return model


def resolve_bf16(value: Any, *, cpu: bool = False, error: type[Exception] = ValueError) -> bool:
    """--bf16 auto|true|false -> bool; auto is on exactly when a CUDA GPU supports bf16."""
    choice = BF16_CHOICES.get(str(value).strip().lower(), "bad")
    if choice == "bad":
        raise error(f"--bf16 must be auto, true or false, not {value!r}")
    if choice is not None:
        return choice
    if cpu:
        return False
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def quiet_libraries() -> None:
    """No progress bars, warnings or info logs from datasets, transformers and TRL: lvr prints its own lines."""
    import logging
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
    logging.getLogger("trl").setLevel(logging.WARNING)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_training_tokenizer(model: str, settings: TrainingSettings, *, need_masks: bool = True):
    """(tokenizer, TemplateFix) of `model` (as check_model gave it) to train: think-keeping template, a pad token.

    `need_masks=False` (rl: no assistant-only loss) also accepts the model's own
    template when it keeps <think> but lacks generation marks. Raises the settings'
    error_type with one line naming the model as the user gave it.
    """
    from transformers import AutoConfig, AutoTokenizer

    error, shown, chat_template = settings.error_type, settings.model, settings.chat_template
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


# -- TrainingArguments ------------------------------------------------------------------------

def report_to_list(report_to: str) -> list[str]:
    """--report-to 'wandb,tensorboard' (commas or spaces) -> the trackers; 'none' or '' -> none."""
    return [r for r in re.split(r"[,\s]+", str(report_to)) if r and r != "none"]


def gradient_checkpointing(wanted: bool) -> bool:
    """FSDP that checkpoints activations itself turns ours off: doing both adds an all-gather."""
    fsdp_does_it = (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
                    and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true")
    return wanted and not fsdp_does_it


def training_arguments(settings: TrainingSettings, output: Path, bf16: bool) -> dict[str, Any]:
    """The TrainingArguments fields sft, dpo and rl set alike, for their TRL config classes."""
    checkpointing = gradient_checkpointing(settings.gradient_checkpointing)
    model_kwargs: dict[str, Any] = {"dtype": "bfloat16" if settings.bf16_weights(bf16) else "float32"}
    if world_size() > 1:
        model_kwargs["device_map"] = None  # every process holds (its shard of) the model; the launcher places it
    return dict(
        output_dir=str(output),
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio,  # below 1: a fraction of the total steps
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
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
        report_to=report_to_list(settings.report_to),
        use_cpu=settings.cpu,
        model_init_kwargs=model_kwargs,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def progress_callbacks(log: Log | None, tool: str, details: Callable[[dict], str], *, marker: str = "loss") -> list:
    """Callbacks that print '<tool>: step N/M <details(logs)>' for each logged step with `marker`, from the
    main process alone; none without a log."""
    if log is None:
        return []
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and marker in logs:
                log(f"{tool}: step {state.global_step}/{state.max_steps} {details(logs)}")

    return [Progress()]


def without_printer(trainer):
    """The trainer without transformers' PrinterCallback, which prints every log dict (lvr prints its own line)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# -- LoRA -------------------------------------------------------------------------------------

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


def lora_config(*, r: int, alpha: int, dropout: float, targets: Any):
    """PEFT's LoraConfig for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=lora_target_modules(targets))


def lora_layout(lora: bool, merge: bool) -> dict:
    """The run record's `layout` (merged, adapter or full) and `adapter` folder (relative to OUT)."""
    merged = lora and merge
    return {"layout": "merged" if merged else "adapter" if lora else "full",
            "adapter": ADAPTER_DIR if merged else ("." if lora else None)}


def merge_adapter(model: str, adapter_dir: Path, output: Path, *, bf16: bool) -> None:
    """Load the base model (as check_model gave it), apply the saved adapter, merge, save a plain checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if bf16 else torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(output))


# -- the run ----------------------------------------------------------------------------------

@dataclass
class TrainingRun:
    """A trainer ready to train, and what was decided on the way (sft, dpo and rl add their own)."""

    settings: Any                      # a TrainingSettings
    data: Any                          # with .path, the data argument
    tokenizer: Any
    template: TemplateFix
    model: str                         # as from_pretrained gets it (check_model)
    output: Path
    bf16: bool
    resume_from: str | None
    trainer: Any = None                # set once built on the rest

    @property
    def main(self) -> bool:
        return self.trainer.is_world_process_zero()


R = TypeVar("R", bound=TrainingRun)


def prepare(run_class: type[R], settings: TrainingSettings, data: Any, *, data_arg: str,
            need_masks: bool = True) -> R:
    """A run_class without its trainer yet: model and OUT checked (before anything heavy loads), the
    libraries quieted, --bf16 resolved, the tokenizer loaded with a think-keeping template.

    `data_arg` names the data argument when it is '-' (stdin), which one process alone can read.
    """
    error = settings.error_type
    model = check_model(settings.model, error=error)
    output, resume_from = check_output_folder(settings.output, settings.resume, error=error)
    if data.path == "-" and world_size() > 1:
        raise error(f"{data_arg} '-' (stdin) cannot be shared by several processes; pass a file")
    quiet_libraries()
    bf16 = resolve_bf16(settings.bf16, cpu=settings.cpu, error=error)
    tokenizer, template = load_training_tokenizer(model, settings, need_masks=need_masks)
    return run_class(settings, data, tokenizer, template, model, output, bf16, resume_from)


@dataclass
class Trained:
    result: Any                        # the Trainer's TrainOutput
    seconds: float                     # in trainer.train


def train(run: TrainingRun, log: Log | None, tool: str, details: list[str], notes: list[str] = ()) -> Trained:
    """Say what is about to train, then train on every process, from run.resume_from.

    The main process says '<tool>: <data>; template: <why>; <details>, bf16 on|off, N
    process(es)', then '<tool>: <note>' for each note; a resumed run first loses its torn
    checkpoints, so rotation never keeps them.
    """
    say = main_log(log)
    say(f"{tool}: {run.data.describe()}; template: {run.template.reason}; "
        + ", ".join([*details, f"bf16 {'on' if run.bf16 else 'off'}", f"{world_size()} process(es)"]))
    for note in notes:
        say(f"{tool}: {note}")
    if run.settings.resume and run.main:
        dropped = drop_torn_checkpoints(run.output, run.resume_from)
        if dropped:
            say(f"{tool}: removed unfinished checkpoint(s) {', '.join(dropped)}")
        say(f"{tool}: resuming from {run.resume_from}" if run.resume_from
            else f"{tool}: no finished checkpoint in {run.output}; starting afresh")
    run.trainer.accelerator.wait_for_everyone()
    started = time.time()
    result = run.trainer.train(resume_from_checkpoint=run.resume_from)
    return Trained(result, time.time() - started)


def save_trained(run: TrainingRun, *, merge_lora: bool = False) -> None:
    """The trained model and the fixed chat template (chat_template.jinja) into OUT.

    With `merge_lora` the adapter goes to OUT/adapter and the merged full model to OUT;
    otherwise OUT gets what the trainer holds (the adapter alone for LoRA without merging).
    """
    trainer, output = run.trainer, run.output
    if merge_lora:
        adapter_dir = output / ADAPTER_DIR
        trainer.save_model(str(adapter_dir))
        trainer.accelerator.wait_for_everyone()
        if run.main:
            merge_adapter(run.model, adapter_dir, output, bf16=run.bf16)
    else:
        trainer.save_model(str(output))
    if run.main:
        run.tokenizer.save_pretrained(str(output))  # the fixed template, as chat_template.jinja
    trainer.accelerator.wait_for_everyone()


def _curve_value(key: str, value: Any) -> float:
    if key == "learning_rate":
        return float(value)
    return round(float(value), 4 if key == "epoch" else 6)


def log_curve(log_history: list[dict], names: Mapping[str, str], *, marker: str = "loss") -> list[dict]:
    """A point per logged step that has `marker`: its step, then each logged key of `names` under its name.

    Values are rounded to 6 places (epoch 4); the learning rate is kept whole.
    """
    curve = []
    for entry in log_history:
        if marker in entry and "step" in entry:
            point = {"step": entry["step"]}
            for key, name in names.items():
                if isinstance(entry.get(key), (int, float)):
                    point[name] = _curve_value(key, entry[key])
            curve.append(point)
    return curve


def curve_ends(curve: list[dict], key: str) -> tuple[float | None, float | None]:
    """The first and last value of `key` along the curve (None, None when it was never logged)."""
    values = [p[key] for p in curve if key in p]
    return (values[0], values[-1]) if values else (None, None)


def run_record(run: TrainingRun, trained: Trained, *, schema: str, tool: str, started: float, data: dict,
               head: dict | None = None, results: dict | None = None) -> dict:
    """The run record (lvr_<tool>.json): what every trainer writes, with its own `head`, `data` and `results`."""
    from .. import __version__

    state = run.trainer.state
    training_loss = trained.result.training_loss
    return {
        "schema": schema,
        "model": run.settings.model,
        "output": str(run.output),
        **(head or {}),
        "data": data,
        "template": run.template.to_record(),
        "settings": {**asdict(run.settings), "bf16_resolved": run.bf16, **run.settings.record_extras()},
        "world_size": world_size(),
        "resumed_from": run.resume_from,
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 4),
        "train_loss": float(training_loss) if training_loss is not None else None,
        **(results or {}),
        "train_seconds": round(trained.seconds, 2),
        "seconds": round(time.time() - started, 2),
        "producer": {"tool": tool, "version": __version__},
    }


def write_record(run: TrainingRun, name: str, record: dict) -> None:
    """OUT/name, whole or not at all, from the main process."""
    from ..prep.jsonl import write_atomic

    if run.main:
        write_atomic(run.output / name, json.dumps(record, indent=1, default=str) + "\n")

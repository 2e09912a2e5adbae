"""`lvr sft`: supervised fine-tuning of the navigator on trajectories (TRL SFTTrainer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_OK, ConfigOption, QuietOption, fail_usage, say

_TRAIN = "Training"
_LORA = "LoRA"
_SAVE = "Saving and resuming"


def sft_command(
    data: str = typer.Argument(..., metavar="DATA",
                               help="Training JSONL: TRL messages, TRL prompt/completion, or lvr.trajectory/1 "
                                    "records (accepted ones are used). '-' reads stdin (single process only)."),
    model: str = typer.Option(..., "--model", metavar="MODEL",
                              help="Model id or local folder to fine-tune (e.g. Qwen/Qwen3-8B)."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR",
                                help="Output folder: the checkpoint, its fixed chat template, lvr_sft.json."),
    lora: bool = typer.Option(False, "--lora/--no-lora", rich_help_panel=_LORA,
                              help="Train LoRA adapters instead of all weights."),
    lora_r: int = typer.Option(16, "--lora-r", rich_help_panel=_LORA, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", rich_help_panel=_LORA, help="LoRA alpha."),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", rich_help_panel=_LORA, help="LoRA dropout."),
    lora_targets: str = typer.Option("all-linear", "--lora-targets", metavar="NAMES", rich_help_panel=_LORA,
                                     help="Modules to adapt: all-linear, or names such as q_proj,k_proj,v_proj,o_proj."),
    merge_lora: bool = typer.Option(True, "--merge-lora/--no-merge-lora", rich_help_panel=_LORA,
                                    help="Save the merged full model in DIR (adapter in DIR/adapter), so "
                                         "`lvr ask` loads it; --no-merge-lora saves only the adapter in DIR."),
    lr: float = typer.Option(1e-5, "--lr", rich_help_panel=_TRAIN, help="Peak learning rate."),
    epochs: float = typer.Option(3.0, "--epochs", rich_help_panel=_TRAIN, help="Passes over the data."),
    max_steps: int = typer.Option(-1, "--max-steps", rich_help_panel=_TRAIN,
                                  help="Stop after this many optimizer steps (overrides --epochs); -1: off."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", rich_help_panel=_TRAIN,
                                       help="Fraction of the steps spent warming the learning rate up."),
    scheduler: str = typer.Option("cosine", "--scheduler", rich_help_panel=_TRAIN,
                                  help="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ..."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", rich_help_panel=_TRAIN, help="AdamW weight decay."),
    batch_size: int = typer.Option(1, "--batch-size", rich_help_panel=_TRAIN, help="Sequences per device per step."),
    grad_accum: int = typer.Option(1, "--grad-accum", rich_help_panel=_TRAIN,
                                   help="Gradient accumulation steps per optimizer step."),
    max_length: int = typer.Option(24576, "--max-length", rich_help_panel=_TRAIN,
                                   help="Cut samples at this many tokens (LongVideo-R1: 24k)."),
    bf16: str = typer.Option("auto", "--bf16", metavar="auto|true|false", rich_help_panel=_TRAIN,
                             help="bf16 mixed precision; auto: on when the GPU supports it, off on CPU."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                rich_help_panel=_TRAIN,
                                                help="Recompute activations in the backward pass to save memory."),
    seed: int = typer.Option(42, "--seed", rich_help_panel=_TRAIN, help="Random seed (data order, LoRA init)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", metavar="FILE", rich_help_panel=_TRAIN,
                                                 help="Jinja chat template to train with and save (must keep "
                                                      "earlier <think> text and mark assistant turns with "
                                                      "{% generation %}). Default: fixed automatically."),
    cpu: bool = typer.Option(False, "--cpu", rich_help_panel=_TRAIN, help="Train on the CPU even with a GPU."),
    logging_steps: int = typer.Option(1, "--logging-steps", rich_help_panel=_SAVE,
                                      help="Log (and record) the loss every N steps."),
    save_steps: int = typer.Option(500, "--save-steps", rich_help_panel=_SAVE,
                                   help="Write a resumable checkpoint into DIR every N steps."),
    save_total_limit: int = typer.Option(1, "--save-total-limit", rich_help_panel=_SAVE,
                                         help="Keep at most this many checkpoints."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=_SAVE,
                                help="Continue from the last checkpoint in DIR (a killed run resumes)."),
    report_to: str = typer.Option("none", "--report-to", rich_help_panel=_SAVE,
                                  help="Experiment tracker: none, tensorboard, wandb, ..."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Check the data and settings, print the resolved settings, and stop."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Fine-tune a navigator on trajectories: full weights or LoRA, loss on assistant turns only.

    DATA is JSONL: TRL messages ({"messages": [...]}), TRL prompt/completion
    ({"prompt": [...], "completion": [...]}, loss on the completion), or the
    lvr.trajectory/1 records of `lvr synthesize` (accepted ones; others are
    skipped and counted). The chat template must keep the <think> text of earlier
    turns; Qwen3's stock template drops it, so it is detected and replaced, and
    the fixed template is saved with the checkpoint.

    Defaults follow LongVideo-R1: lr 1e-5, cosine schedule, warmup 0.1, 3 epochs,
    bf16 when the GPU has it, 24k-token cutoff. DIR loads straight into
    `lvr ask --backend transformers --model DIR`; DIR/lvr_sft.json records the
    settings and the loss curve. Several GPUs or nodes: run it under
    `accelerate launch` with a config from configs/accelerate/.

    Exit status: 0 trained and saved, 2 usage error (data, model, settings).

    Examples:

      lvr sft trajectories.jsonl --model Qwen/Qwen3-8B -o navigator-sft

      lvr sft trajectories.jsonl --config configs/sft_qwen3_8b.yaml -o navigator-sft --epochs 2

      accelerate launch --config_file configs/accelerate/zero3.yaml -m lvr.cli sft trajectories.jsonl --config configs/sft_qwen3_8b.yaml -o navigator-sft

      lvr sft trajectories.jsonl --model Qwen/Qwen3-1.7B --lora --lora-r 32 -o navigator-lora

      lvr sft trajectories.jsonl --model Qwen/Qwen3-8B -o navigator-sft --resume

      lvr ask movie.mp4 "Who opens the door?" --backend transformers --model navigator-sft --caption-model ./qwen2.5-vl-7b
    """
    from ..train.sft import SftError, SftSettings, is_main_process, load_sft_data, run_sft, summary_line

    settings = SftSettings(
        data=data, model=model, output=str(output), lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=lora_targets, merge_lora=merge_lora, lr=lr, epochs=epochs,
        max_steps=max_steps, warmup_ratio=warmup_ratio, scheduler=scheduler, weight_decay=weight_decay,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, bf16=bf16,
        gradient_checkpointing=gradient_checkpointing, seed=seed, logging_steps=logging_steps,
        save_steps=save_steps, save_total_limit=save_total_limit, resume=resume, report_to=report_to,
        chat_template=str(chat_template) if chat_template else None, cpu=cpu)
    try:
        settings.check()
        if dry_run:
            loaded = load_sft_data(data)
            typer.echo(json.dumps({"settings": settings.__dict__, "data": {
                "format": loaded.format, "records": loaded.records, "samples": len(loaded.samples),
                "skipped": loaded.skipped}}, indent=1))
            raise typer.Exit(EXIT_OK)
        record = run_sft(settings, log=None if quiet else say)
    except SftError as e:
        raise fail_usage(str(e))
    if is_main_process():
        say(summary_line(record))
    raise typer.Exit(EXIT_OK)

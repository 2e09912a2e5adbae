"""`lvr dpo`: preference training of the navigator on turn-level pairs (TRL DPOTrainer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_OK, ConfigOption, QuietOption, fail_usage, say

_DPO = "DPO"
_TRAIN = "Training"
_LORA = "LoRA"
_SAVE = "Saving and resuming"


def dpo_command(
    pairs: str = typer.Argument(..., metavar="PAIRS",
                                help="Preference pairs JSONL ({\"prompt\": [...], \"chosen\": [...], \"rejected\": "
                                     "[...]}), e.g. from `lvr synthesize --export-pairs`. '-' reads stdin "
                                     "(single process only)."),
    model: str = typer.Option(..., "--model", metavar="SFT_CKPT",
                              help="The checkpoint to start from and to compare against (the reference), "
                                   "usually the output of `lvr sft`."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR",
                                help="Output folder: the checkpoint, its chat template, lvr_dpo.json."),
    beta: float = typer.Option(0.1, "--beta", rich_help_panel=_DPO,
                               help="How far the policy may move from the reference (higher: less)."),
    loss_type: str = typer.Option("sigmoid", "--loss-type", rich_help_panel=_DPO,
                                  help="TRL DPO loss: sigmoid (DPO), ipo, hinge, robust, apo_zero, ..."),
    precompute_ref: bool = typer.Option(False, "--precompute-ref/--no-precompute-ref", rich_help_panel=_DPO,
                                        help="Compute the reference log-probs of every pair once before training: "
                                             "no reference copy in memory and about half the forward passes."),
    precompute_batch_size: Optional[int] = typer.Option(None, "--precompute-batch-size", rich_help_panel=_DPO,
                                                        help="Pairs per batch while precomputing (default: "
                                                             "--batch-size)."),
    lora: bool = typer.Option(False, "--lora/--no-lora", rich_help_panel=_LORA,
                              help="Train LoRA adapters instead of all weights (the reference is then the "
                                   "model with its adapter off)."),
    lora_r: int = typer.Option(16, "--lora-r", rich_help_panel=_LORA, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", rich_help_panel=_LORA, help="LoRA alpha."),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", rich_help_panel=_LORA, help="LoRA dropout."),
    lora_targets: str = typer.Option("all-linear", "--lora-targets", metavar="NAMES", rich_help_panel=_LORA,
                                     help="Modules to adapt: all-linear, or names such as q_proj,k_proj,v_proj,o_proj."),
    merge_lora: bool = typer.Option(True, "--merge-lora/--no-merge-lora", rich_help_panel=_LORA,
                                    help="Save the merged full model in DIR (adapter in DIR/adapter), so "
                                         "`lvr ask` loads it; --no-merge-lora saves only the adapter in DIR."),
    lr: float = typer.Option(5e-7, "--lr", rich_help_panel=_TRAIN, help="Peak learning rate."),
    epochs: float = typer.Option(1.0, "--epochs", rich_help_panel=_TRAIN, help="Passes over the pairs."),
    max_steps: int = typer.Option(-1, "--max-steps", rich_help_panel=_TRAIN,
                                  help="Stop after this many optimizer steps (overrides --epochs); -1: off."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", rich_help_panel=_TRAIN,
                                       help="Fraction of the steps spent warming the learning rate up."),
    scheduler: str = typer.Option("cosine", "--scheduler", rich_help_panel=_TRAIN,
                                  help="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ..."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", rich_help_panel=_TRAIN, help="AdamW weight decay."),
    batch_size: int = typer.Option(1, "--batch-size", rich_help_panel=_TRAIN,
                                   help="Pairs per device per step (each pair is two sequences)."),
    grad_accum: int = typer.Option(1, "--grad-accum", rich_help_panel=_TRAIN,
                                   help="Gradient accumulation steps per optimizer step."),
    max_length: int = typer.Option(24576, "--max-length", rich_help_panel=_TRAIN,
                                   help="Cut prompt + turn at this many tokens; a pair whose prompt alone "
                                        "reaches it is left out (counted)."),
    bf16: str = typer.Option("auto", "--bf16", metavar="auto|true|false", rich_help_panel=_TRAIN,
                             help="bf16 mixed precision; auto: on when the GPU supports it, off on CPU."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                rich_help_panel=_TRAIN,
                                                help="Recompute activations in the backward pass to save memory."),
    seed: int = typer.Option(42, "--seed", rich_help_panel=_TRAIN, help="Random seed (data order, LoRA init)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", metavar="FILE", rich_help_panel=_TRAIN,
                                                 help="Jinja chat template to train with and save (as for "
                                                      "`lvr sft`). Default: the model's, fixed when it drops "
                                                      "earlier <think> text."),
    cpu: bool = typer.Option(False, "--cpu", rich_help_panel=_TRAIN, help="Train on the CPU even with a GPU."),
    logging_steps: int = typer.Option(1, "--logging-steps", rich_help_panel=_SAVE,
                                      help="Log (and record) loss and reward margin every N steps."),
    save_steps: int = typer.Option(500, "--save-steps", rich_help_panel=_SAVE,
                                   help="Write a resumable checkpoint into DIR every N steps."),
    save_total_limit: int = typer.Option(1, "--save-total-limit", rich_help_panel=_SAVE,
                                         help="Keep at most this many checkpoints."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=_SAVE,
                                help="Continue from the last checkpoint in DIR (a killed run resumes)."),
    report_to: str = typer.Option("none", "--report-to", rich_help_panel=_SAVE,
                                  help="Experiment tracker: none, tensorboard, wandb, ..."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Check the pairs and settings, print the resolved settings, and stop."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Preference-train a navigator (DPO) on turn-level pairs: full weights or LoRA.

    PAIRS is JSONL in TRL's conversational preference form: the conversation so
    far as "prompt", the accepted turn as "chosen", a wrong turn as "rejected".
    `lvr synthesize --export-pairs` makes them from trajectories: each turn the
    teacher got wrong and had dropped, and with --wrong-turns an LLM-written wrong
    turn for multi-segment questions (LongVPO). The reference model is --model
    itself. The chat template is checked and fixed as in `lvr sft` (earlier <think>
    text is kept) and saved with the checkpoint.

    Defaults: beta 0.1, lr 5e-7, 1 epoch, cosine schedule, warmup 0.1, bf16 when
    the GPU has it. --precompute-ref scores every pair with the reference once up
    front, so training keeps no reference copy and runs about half the forward
    passes. DIR loads straight into `lvr ask --backend transformers --model DIR`;
    DIR/lvr_dpo.json records the settings and the loss and reward-margin curve.
    Several GPUs or nodes: run it under `accelerate launch` with a config from
    configs/accelerate/.

    Exit status: 0 trained and saved, 2 usage error (pairs, model, settings).

    Examples:

      lvr synthesize --export-pairs trajectories.jsonl -o pairs.jsonl

      lvr dpo pairs.jsonl --model navigator-sft -o navigator-dpo --precompute-ref

      lvr dpo pairs.jsonl --config configs/dpo_qwen3_8b.yaml -o navigator-dpo --beta 0.2

      accelerate launch --config_file configs/accelerate/zero3.yaml -m lvr.cli dpo pairs.jsonl --config configs/dpo_qwen3_8b.yaml -o navigator-dpo

      lvr dpo pairs.jsonl --model navigator-sft --lora --lora-r 32 -o navigator-dpo-lora

      lvr dpo pairs.jsonl --model navigator-sft -o navigator-dpo --resume

      lvr ask movie.mp4 "Who opens the door?" --backend transformers --model navigator-dpo --caption-model ./qwen2.5-vl-7b
    """
    from ..train.dpo import DpoSettings, load_pairs, run_dpo, summary_line
    from ..train.sft import SftError, is_main_process

    settings = DpoSettings(
        data=pairs, model=model, output=str(output), lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=lora_targets, merge_lora=merge_lora, lr=lr, epochs=epochs,
        max_steps=max_steps, warmup_ratio=warmup_ratio, scheduler=scheduler, weight_decay=weight_decay,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, bf16=bf16,
        gradient_checkpointing=gradient_checkpointing, seed=seed, logging_steps=logging_steps,
        save_steps=save_steps, save_total_limit=save_total_limit, resume=resume, report_to=report_to,
        chat_template=str(chat_template) if chat_template else None, cpu=cpu, beta=beta, loss_type=loss_type,
        precompute_ref=precompute_ref, precompute_batch_size=precompute_batch_size)
    try:
        settings.check()
        if dry_run:
            loaded = load_pairs(pairs)
            typer.echo(json.dumps({"settings": settings.__dict__, "data": {
                "format": loaded.format, "records": loaded.records, "pairs": len(loaded.samples),
                "identical_left_out": loaded.identical, "sources": dict(loaded.sources)}}, indent=1))
            raise typer.Exit(EXIT_OK)
        record = run_dpo(settings, log=None if quiet else say)
    except SftError as e:
        raise fail_usage(str(e))
    if is_main_process():
        say(summary_line(record))
    raise typer.Exit(EXIT_OK)

"""`lvr dpo`: preference training of the navigator on turn-level pairs (TRL DPOTrainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..train.dpo import DpoSettings
from .common import ConfigOption, DryRunOption, QuietOption, RequiredOutputOption, run_trainer, say
from .model_options import TRAINING_SEED
from .options import Group, takes



@takes(training=Group(DpoSettings, build=dict), sampling=TRAINING_SEED)
def dpo_command(
    pairs: str = typer.Argument(..., metavar="PAIRS",
                                help="Preference pairs JSONL ({\"prompt\": [...], \"chosen\": [...], \"rejected\": "
                                     "[...]}), e.g. from `lvr synthesize --export-pairs`. '-' reads stdin "
                                     "(single process only)."),
    output: Path = RequiredOutputOption,
    dry_run: bool = DryRunOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    training=None, sampling=None,
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
    from ..train.dpo import load_pairs, run_dpo, summary_line

    def data_summary(settings) -> dict:
        loaded = load_pairs(settings.data)
        return {"format": loaded.format, "records": loaded.records, "pairs": len(loaded.samples),
                "identical_left_out": loaded.identical, "sources": dict(loaded.sources)}

    run_trainer(lambda: DpoSettings(data=pairs, output=str(output), seed=sampling.seed, **training),
                dry_run=dry_run, data_summary=data_summary,
                train=lambda settings: run_dpo(settings, log=None if quiet else say), summary=summary_line)

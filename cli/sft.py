"""`lvr sft`: supervised fine-tuning of the navigator on trajectories (TRL SFTTrainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..train.sft import SftDataOptions, SftSettings
from .common import ConfigOption, DryRunOption, QuietOption, RequiredOutputOption, run_trainer, say
from .model_options import LAUNCH, TRAINING_SEED, launching
from .options import Group, takes



@takes(training=Group(SftSettings, build=dict), sampling=TRAINING_SEED, data_options=Group(SftDataOptions),
       launch=LAUNCH)
def sft_command(
    data: str = typer.Argument(..., metavar="DATA",
                               help="Training data: JSONL of TRL messages, TRL prompt/completion or lvr.trajectory/1 "
                                    "records (accepted ones are used), or LLaMA-Factory alpaca/sharegpt JSON (the "
                                    "LongVideo-R1 release's). '-' reads stdin (single process only)."),
    output: Path = RequiredOutputOption,
    dry_run: bool = DryRunOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    training=None, sampling=None, data_options=None, launch=None,
) -> None:
    """Fine-tune a navigator on trajectories: full weights or LoRA, loss on assistant turns only.

    DATA is JSONL: TRL messages ({"messages": [...]}), TRL prompt/completion
    ({"prompt": [...], "completion": [...]}, loss on the completion), or the
    lvr.trajectory/1 records of `lvr synthesize` (accepted ones; others are
    skipped and counted); or LLaMA-Factory SFT data (a JSON list, alpaca or
    sharegpt), such as the LongVideo-R1 release's, each sample with its own
    system prompt. The loss is on every assistant turn, or with --mask-history
    on each conversation's last one (the LongVideo-R1 recipe).

    The chat template must keep the <think> text of earlier turns; Qwen3's
    stock template drops it, so it is detected and replaced, and the fixed
    template is saved with the checkpoint.

    Defaults follow LongVideo-R1: lr 1e-5, cosine schedule, warmup 0.1, 3 epochs,
    bf16 when the GPU has it, 24k-token cutoff. DIR loads straight into
    `lvr ask --backend transformers --model DIR`; DIR/lvr_sft.json records the
    settings and the loss curve. Several GPUs: --num-processes N (data
    parallel), or --accelerate-config with a config from configs/accelerate/
    (DeepSpeed ZeRO-3, FSDP, several nodes); the command starts `accelerate
    launch` itself. Running it under `accelerate launch -m lvr.cli sft` works too.

    Exit status: 0 trained and saved, 2 usage error (data, model, settings).

    Examples:

      lvr sft trajectories.jsonl --model Qwen/Qwen3-8B -o navigator-sft

      lvr sft trajectories.jsonl --config configs/sft_qwen3_8b.yaml -o navigator-sft --epochs 2

      lvr sft trajectories.jsonl --config configs/sft_qwen3_8b.yaml --accelerate-config configs/accelerate/zero3.yaml -o navigator-sft

      lvr sft trajectories.jsonl --model Qwen/Qwen3-1.7B --num-processes 4 -o navigator-sft

      lvr sft trajectories.jsonl --model Qwen/Qwen3-1.7B --lora --lora-r 32 -o navigator-lora

      lvr sft trajectories.jsonl --model Qwen/Qwen3-8B -o navigator-sft --resume

      lvr sft longvideor1-sft-qwen3-llamafactory.json --model Qwen/Qwen3-8B --mask-history -o navigator-sft

      lvr ask movie.mp4 "Who opens the door?" --backend transformers --model navigator-sft --caption-model ./qwen2.5-vl-7b
    """
    from ..train.sft import load_sft_data, run_sft, summary_line

    def data_summary(settings) -> dict:
        loaded = load_sft_data(settings.data, mask_history=settings.mask_history)
        return {"format": loaded.format, "records": loaded.records, "samples": len(loaded.samples),
                "skipped": loaded.skipped}

    run_trainer(launching(lambda: SftSettings(data=data, output=str(output), seed=sampling.seed,
                                              mask_history=data_options.mask_history, **training),
                          launch, dry_run=dry_run),
                dry_run=dry_run, data_summary=data_summary,
                train=lambda settings: run_sft(settings, log=None if quiet else say), summary=summary_line)

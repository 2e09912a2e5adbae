"""`lvr dpo`: preference training of the navigator on turn-level pairs (TRL DPOTrainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..train.dpo import DpoSettings
from ..train.vlm_dpo import VlmDpoOptions, text_only_flags
from .common import (CacheDirOption, ConfigOption, DryRunOption, QuietOption, RequiredOutputOption, fail_usage,
                     run_trainer, say)
from .model_options import LAUNCH, TRAINING_SEED, launching
from .options import Group, takes



@takes(training=Group(DpoSettings, build=dict), vlm=Group(VlmDpoOptions, build=dict), sampling=TRAINING_SEED,
       launch=LAUNCH)
def dpo_command(
    pairs: str = typer.Argument(..., metavar="PAIRS",
                                help="Preference pairs JSONL ({\"prompt\": [...], \"chosen\": [...], \"rejected\": "
                                     "[...]}), e.g. from `lvr synthesize --export-pairs`; with --vlm, lvr.vpo/1 "
                                     "triples from `lvr vpo`. '-' reads stdin (single process only)."),
    output: Path = RequiredOutputOption,
    cache_dir: Optional[Path] = CacheDirOption,
    dry_run: bool = DryRunOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    training=None, vlm=None, sampling=None, launch=None,
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
    Several GPUs: --num-processes N (data parallel), or --accelerate-config with a
    config from configs/accelerate/ (DeepSpeed ZeRO-3, FSDP, several nodes); the
    command starts `accelerate launch` itself. Running it under `accelerate launch
    -m lvr.cli dpo` works too.

    Exit status: 0 trained and saved, 2 usage error (pairs, model, settings).

    Examples:

      lvr synthesize --export-pairs trajectories.jsonl -o pairs.jsonl

      lvr dpo pairs.jsonl --model navigator-sft -o navigator-dpo --precompute-ref

      lvr dpo pairs.jsonl --config configs/dpo_qwen3_8b.yaml -o navigator-dpo --beta 0.2

      lvr dpo pairs.jsonl --config configs/dpo_qwen3_8b.yaml --accelerate-config configs/accelerate/zero3.yaml -o navigator-dpo

      lvr dpo pairs.jsonl --model navigator-sft --lora --lora-r 32 -o navigator-dpo-lora

      lvr dpo pairs.jsonl --model navigator-sft -o navigator-dpo --resume

      lvr ask movie.mp4 "Who opens the door?" --backend transformers --model navigator-dpo --caption-model ./qwen2.5-vl-7b

    With --vlm, a vision-language model (Qwen2.5-VL, Qwen3-VL) learns from `lvr
    vpo` triples (LongVPO): the policy sees every clip of the interleaved input,
    and the reference log-probs are computed once before training on the anchor
    clip(s) alone plus the question (--reference-context full: the whole input).
    DIR then serves as `lvr caption --backend transformers --model DIR`.

      lvr dpo --vlm vpo-stage1.jsonl --model Qwen/Qwen2.5-VL-7B-Instruct --cache-dir cache -o vlm-vpo1

      lvr dpo --vlm vpo-stage2.jsonl --model vlm-vpo1 --cache-dir cache --lora -o vlm-vpo2

      lvr dpo --vlm vpo-stage1.jsonl --model Qwen/Qwen2.5-VL-7B-Instruct --cache-dir cache --num-processes 8 -o vlm-vpo1
    """
    if vlm["vlm"]:
        _vlm_dpo(pairs, output, cache_dir, dry_run, quiet, training, vlm, sampling, launch)
    misplaced = text_only_flags(vlm)
    if misplaced:
        raise fail_usage(f"{', '.join(misplaced)} only appl{'ies' if len(misplaced) == 1 else 'y'} with --vlm")
    from ..train.dpo import load_pairs, run_dpo, summary_line

    def data_summary(settings) -> dict:
        loaded = load_pairs(settings.data)
        return {"format": loaded.format, "records": loaded.records, "pairs": len(loaded.samples),
                "identical_left_out": loaded.identical, "sources": dict(loaded.sources)}

    run_trainer(launching(lambda: DpoSettings(data=pairs, output=str(output), seed=sampling.seed, **training),
                          launch, dry_run=dry_run),
                dry_run=dry_run, data_summary=data_summary,
                train=lambda settings: run_dpo(settings, log=None if quiet else say), summary=summary_line)


def _vlm_dpo(pairs: str, output: Path, cache_dir: Optional[Path], dry_run: bool, quiet: bool, training: dict,
             vlm: dict, sampling, launch) -> None:
    """`lvr dpo --vlm`: the same run through the vision-language trainer."""
    from ..train.vlm_dpo import VlmDpoSettings, load_triples, run_vlm_dpo, summary_line

    def data_summary(settings) -> dict:
        loaded = load_triples(settings.data, settings.max_images)
        return {"format": "lvr.vpo/1", "records": loaded.records, "triples": len(loaded.samples),
                "identical_left_out": loaded.identical, "stages": {str(k): v for k, v in loaded.stages.items()},
                "max_images_per_input": loaded.images}

    run_trainer(launching(lambda: VlmDpoSettings(data=pairs, output=str(output), seed=sampling.seed,
                                                 cache_dir=str(cache_dir) if cache_dir else None, **training, **vlm),
                          launch, dry_run=dry_run),
                dry_run=dry_run, data_summary=data_summary,
                train=lambda settings: run_vlm_dpo(settings, log=None if quiet else say), summary=summary_line)

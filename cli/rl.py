"""`lvr rl`: multi-turn GRPO of the navigator over the caption tree (TRL GRPOTrainer, rollout_func)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..infer.agent import AgentOptions
from ..prep.models import SamplingOptions
from ..train.rl import ROLLOUT_PANEL, RlSettings
from .common import (CacheDirOption, ConfigOption, DryRunOption, FormatOption, NoSubtitlesOption, QuietOption,
                     RequiredOutputOption, VideoDirOption, fail_usage, run_trainer, say)
from .model_options import LAUNCH, RL_ROLES, launching
from .options import Group, takes

# Rollouts sample hotter than ask does; --seed is the one --seed, with the training default.
ROLLOUT_SAMPLING = Group(SamplingOptions, only=("max_tokens", "temperature", "seed"),
                         defaults={"temperature": 1.0, "seed": 42}, panel=ROLLOUT_PANEL)


@takes(training=Group(RlSettings, build=dict), sampling=ROLLOUT_SAMPLING,
       agent=Group(AgentOptions, only=("max_invalid",), panel=ROLLOUT_PANEL), roles=RL_ROLES, launch=LAUNCH)
def rl_command(
    qa: str = typer.Argument(..., metavar="QA.jsonl",
                             help="QA items, with clue intervals (or without: answer-only reward): native "
                                  "lvr.qa/1 JSONL, CG-Bench JSON, or the LongVideo-R1 RL rows; any of them may be "
                                  "parquet. A native file may also hold lvr.grounding/1 items, alone or mixed "
                                  "with QA items."),
    output: Path = RequiredOutputOption,
    video_dir: Optional[Path] = VideoDirOption,
    format: str = FormatOption,
    no_subtitles: bool = NoSubtitlesOption,
    cache_dir: Optional[Path] = CacheDirOption,
    dry_run: bool = DryRunOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    training=None, sampling=None, agent=None, roles=None, launch=None,
) -> None:
    """Train a navigator with multi-turn GRPO, through the same tools and protocol as `lvr ask`.

    Each QA item is one GRPO group: --num-generations rollouts of the `ask`
    loop over its video's caption tree. Every turn is sampled from the policy,
    stopped at </tool> or </answer>, the tool runs in the environment and its
    result is appended, up to --max-turns. Tool results, corrections and template
    tokens are masked out of the loss. The reward is
    w_answer*answer + w_localisation*F1 - w_repeat*repeat (+ w_center_distance*CD),
    every part logged per step with turns per rollout, the share of invalid
    turns and the KL. --reward reference computes the terms exactly as
    LongVideo-R1's own reward does; an item without clue intervals is scored by
    w_answer*answer alone under either rule.

    Grounding items (lvr.grounding/1) are asked as grounding queries, answered
    with an interval; their reward puts w_iou*IoU + w_interval_center_distance*
    CenDist of the answered interval (against the best target) in place of the
    answer term, beside the same localisation and repeat terms (--reward lvr
    only). --kl-timestamp-scale relaxes the KL on the answer's timestamp tokens.

    Captions come from the shared caption store; name the captioner that made
    them with --caption-model (and give it an endpoint, --caption-base-url, to
    caption nodes not yet stored), or take every caption from the released
    LongVideo-R1 caption files with --captions DIR, as the reference's RL does
    (no captioner; an item whose video has no file is skipped, and a rollout
    that reads a node its file lacks fails, named, and is not scored). Defaults
    follow LongVideo-R1: group 16, lr 1e-6, KL coefficient 1e-4 (low-variance
    k3), temperature 1.0, 15 turns. The -o folder loads into `lvr ask --backend
    transformers --model FOLDER`. Several GPUs: --num-processes N (data
    parallel), or --accelerate-config with a config from
    configs/accelerate/ (DeepSpeed ZeRO-3, several nodes); the command starts
    `accelerate launch` itself. Running it under `accelerate launch -m lvr.cli rl`
    works too.

    Exit status: 0 trained and saved, 2 usage error (data, model, settings).

    Examples:

      lvr rl qa.jsonl --model navigator-sft --video-dir videos/ --caption-model Qwen/Qwen2.5-VL-7B-Instruct --caption-base-url http://localhost:8001/v1 -o navigator-rl

      lvr rl cgbench.json --config configs/rl_qwen3_8b.yaml --video-dir cgbench/videos -o navigator-rl

      lvr rl cgbench.json --config configs/rl_qwen3_8b.yaml --accelerate-config configs/accelerate/zero3.yaml -o navigator-rl

      lvr rl qa.jsonl --config configs/rl_qwen3_8b.yaml --vllm colocate --kl-argument-scale 0.1 -o navigator-rl

      lvr rl qa_and_grounding.jsonl --model navigator-sft --caption-model M --kl-timestamp-scale 0.1 -o navigator-rl

      CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 lvr rl rl_data.parquet --config configs/rl_longvideo_r1.yaml --accelerate-config configs/accelerate/zero3_offload_6gpu.yaml -o navigator-rl

      lvr rl qa.jsonl --model navigator-sft --caption-model M --max-steps 2 --rollout-log rollouts.jsonl --dry-run

      lvr rl rl_data.parquet --config configs/rl_longvideo_r1.yaml --video-dir cgbench/videos --captions cgbench/captions -o navigator-rl

      lvr ask movie.mp4 "Who opens the door?" --backend transformers --model navigator-rl --caption-model ./qwen2.5-vl-7b
    """
    from ..prep.cache import resolve_cache_dir
    from ..train.rl import RlError, load_rl_data, run_rl, summary_line
    from ..train.launch import planned_processes
    from .model_options import rl_navigator_options

    caption, files = roles[0], roles[2]
    if not caption.model and files.captions is None:
        raise fail_usage("give --caption-model: the captioner whose captions are in the store (with "
                         "--caption-base-url to caption nodes not stored yet), or --captions DIR: the "
                         "LongVideo-R1 caption files")
    captions: dict = {}   # --captions: where they come from, once the folder is checked

    def make_settings() -> RlSettings:
        if files.captions is not None:
            captions.update(released_captions(files.captions))   # told before any model loads
        settings = RlSettings(qa=qa, output=str(output), video_dir=str(video_dir) if video_dir else None,
                              format=format, subtitles=not no_subtitles, temperature=sampling.temperature,
                              max_tokens=sampling.max_tokens, seed=sampling.seed, max_invalid=agent.max_invalid,
                              **training)
        # The processes it will train in (launched or not): --dry-run shows the --grad-accum a step will use.
        return settings.for_processes(planned_processes(launch))

    def data_summary(settings) -> dict:
        data = load_rl_data(settings)
        return {"items": len(data.items), "videos": len({str(i.video) for i in data.items}), "skipped": data.errors,
                **({"captions": captions} if captions else {})}

    def train(settings) -> dict:
        try:
            nav = rl_navigator_options(roles, model=settings.model, max_turns=settings.max_turns,
                                       max_invalid=settings.max_invalid, max_tokens=settings.max_tokens,
                                       temperature=settings.temperature, seed=settings.seed)
        except ValueError as e:
            raise RlError(str(e)) from None
        return run_rl(settings, nav, resolve_cache_dir(cache_dir), log=None if quiet else say)

    run_trainer(launching(make_settings, launch, dry_run=dry_run), dry_run=dry_run, data_summary=data_summary,
                train=train, summary=summary_line)


def released_captions(folder: Path) -> dict:
    """Where --captions DIR's captions come from (`ReleasedCaptioner.record`), after the checks `eval` makes of
    the folder (ValueError, one line)."""
    from ..prep.longvideo_r1 import checked_caption_folder, released_captions_record

    return released_captions_record(*checked_caption_folder(folder))
"""`lvr rl`: multi-turn GRPO of the navigator over the caption tree (TRL GRPOTrainer, rollout_func)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import EXIT_OK, CacheDirOption, ConfigOption, QuietOption, fail_usage, say
from .model_options import (CaptionApiKeyOption, CaptionBackendOption, CaptionBaseUrlOption, CaptionMaxTokensOption,
                            CaptionModelOption, CaptionPromptOption, CaptionSideOption, CaptionTemperatureOption,
                            ConcurrencyOption, DeviceOption, HighFramesOption, LowFramesOption, MaxRetriesOption,
                            MaxWidthOption, MediumFramesOption, MinWidthOption, QaApiKeyOption, QaBackendOption,
                            QaBaseUrlOption, QaMaxTokensOption, QaModelOption, QaSideOption, SegmentSecondsOption,
                            SystemPromptOption, TimeoutOption, navigator_options)

_DATA = "QA items"
_GRPO = "GRPO"
_REWARD = "Reward"
_ROLLOUT = "Rollouts"
_TRAIN = "Training"
_SAVE = "Saving and logging"


def rl_command(
    qa: str = typer.Argument(..., metavar="QA.jsonl",
                             help="QA items with clue intervals: native lvr.qa/1 JSONL or CG-Bench JSON."),
    model: str = typer.Option(..., "--model", metavar="MODEL",
                              help="The navigator to train: an `lvr sft` output folder or a model id."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR",
                                help="Output folder: the checkpoint, its chat template, lvr_rl.json."),
    video_dir: Optional[Path] = typer.Option(None, "--video-dir", metavar="DIR", rich_help_panel=_DATA,
                                             help="Where the items' videos are (default: the QA file's folder)."),
    fmt: str = typer.Option("auto", "--format", rich_help_panel=_DATA, help="auto, native or cgbench."),
    max_items: Optional[int] = typer.Option(None, "--max-items", min=1, rich_help_panel=_DATA,
                                            help="Only the first N items."),
    clue_gap: float = typer.Option(5.0, "--clue-gap", min=0.0, rich_help_panel=_DATA,
                                   help="Merge clue intervals less than this many seconds apart."),
    no_subtitles: bool = typer.Option(False, "--no-subtitles", rich_help_panel=_DATA,
                                      help="Do not show subtitles to the captioner."),
    num_generations: int = typer.Option(16, "--num-generations", "--group-size", rich_help_panel=_GRPO,
                                        help="Rollouts per question (the GRPO group)."),
    lr: float = typer.Option(1e-6, "--lr", rich_help_panel=_GRPO, help="Learning rate."),
    beta: float = typer.Option(1e-4, "--beta", "--kl-coef", rich_help_panel=_GRPO,
                               help="KL-loss coefficient (low-variance k3 estimator against the start model); "
                                    "0 drops the reference model."),
    loss_type: str = typer.Option("grpo", "--loss-type", rich_help_panel=_GRPO,
                                  help="TRL loss aggregation: grpo (per sequence), dapo, bnpo, dr_grpo, ..."),
    epsilon: float = typer.Option(0.2, "--epsilon", rich_help_panel=_GRPO, help="PPO clip range."),
    scale_rewards: str = typer.Option("group", "--scale-rewards", rich_help_panel=_GRPO,
                                      help="Divide advantages by the std of the group, the batch, or none."),
    num_iterations: int = typer.Option(1, "--num-iterations", rich_help_panel=_GRPO,
                                       help="Optimisation passes over each batch of rollouts."),
    kl_argument_scale: Optional[float] = typer.Option(
        None, "--kl-argument-scale", metavar="S", rich_help_panel=_GRPO,
        help="Token-aware KL (LongVTG-R1): scale the KL penalty on the tokens of tool-call node ids by S "
             "(0 frees them). Off by default."),
    w_answer: float = typer.Option(1.0, "--w-answer", rich_help_panel=_REWARD, help="Weight of answer correctness."),
    w_localisation: float = typer.Option(1.0, "--w-localisation", rich_help_panel=_REWARD,
                                         help="Weight of the localisation F1 of get_caption visits vs the clues."),
    w_repeat: float = typer.Option(0.2, "--w-repeat", rich_help_panel=_REWARD,
                                   help="Weight of the repeated-call penalty (subtracted)."),
    w_center_distance: float = typer.Option(0.0, "--w-center-distance", rich_help_panel=_REWARD,
                                            help="Weight of the LongVTG-R1 center-distance reward (off: 0)."),
    temperature: float = typer.Option(1.0, "--temperature", rich_help_panel=_ROLLOUT, help="Sampling temperature."),
    top_p: float = typer.Option(1.0, "--top-p", rich_help_panel=_ROLLOUT, help="Nucleus sampling."),
    max_turns: int = typer.Option(15, "--max-turns", rich_help_panel=_ROLLOUT,
                                  help="Model turns per rollout; the last one must answer."),
    max_invalid: int = typer.Option(3, "--max-invalid", rich_help_panel=_ROLLOUT,
                                    help="Invalid turns in a row (each corrected) before a rollout gives up."),
    max_tokens: int = typer.Option(2048, "--max-tokens", rich_help_panel=_ROLLOUT, help="Token limit per turn."),
    max_completion_length: int = typer.Option(24576, "--max-completion-length", rich_help_panel=_ROLLOUT,
                                              help="Token limit of a whole rollout after its prompt (turns and "
                                                   "tool results)."),
    vllm: str = typer.Option("auto", "--vllm", rich_help_panel=_ROLLOUT,
                             help="auto (colocate when vLLM is installed and a GPU is there), off (transformers "
                                  "generate on the policy) or colocate (TRL's vLLM engine in each process; "
                                  "needs pip install 'lvr[vllm]')."),
    vllm_gpu_memory_utilization: float = typer.Option(0.3, "--vllm-gpu-memory-utilization", rich_help_panel=_ROLLOUT,
                                                      help="GPU memory share of the colocated vLLM engine."),
    turn_batch: Optional[int] = typer.Option(None, "--turn-batch", rich_help_panel=_ROLLOUT,
                                             help="Most turns sampled in one generate call (default: all waiting)."),
    batch_size: int = typer.Option(4, "--batch-size", rich_help_panel=_TRAIN,
                                   help="Rollouts per device per micro-step."),
    grad_accum: int = typer.Option(4, "--grad-accum", rich_help_panel=_TRAIN,
                                   help="Micro-steps per optimizer step. batch x accum x processes rollouts per "
                                        "step, a multiple of --num-generations."),
    epochs: float = typer.Option(1.0, "--epochs", rich_help_panel=_TRAIN, help="Passes over the QA items."),
    max_steps: int = typer.Option(-1, "--max-steps", rich_help_panel=_TRAIN,
                                  help="Stop after this many optimizer steps (overrides --epochs); -1: off."),
    scheduler: str = typer.Option("constant", "--scheduler", rich_help_panel=_TRAIN, help="Learning-rate schedule."),
    warmup_ratio: float = typer.Option(0.0, "--warmup-ratio", rich_help_panel=_TRAIN,
                                       help="Fraction of the steps spent warming the learning rate up."),
    bf16: str = typer.Option("auto", "--bf16", metavar="auto|true|false", rich_help_panel=_TRAIN,
                             help="bf16 mixed precision; auto: on when the GPU supports it."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                rich_help_panel=_TRAIN, help="Recompute activations to save memory."),
    seed: int = typer.Option(42, "--seed", rich_help_panel=_TRAIN, help="Random seed (data order, sampling)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", metavar="FILE", rich_help_panel=_TRAIN,
                                                 help="Jinja chat template (must keep earlier <think> text). "
                                                      "Default: the model's, fixed as `lvr sft` fixes it."),
    cpu: bool = typer.Option(False, "--cpu", rich_help_panel=_TRAIN, help="Train on the CPU even with a GPU."),
    logging_steps: int = typer.Option(1, "--logging-steps", rich_help_panel=_SAVE, help="Log every N steps."),
    save_steps: int = typer.Option(500, "--save-steps", rich_help_panel=_SAVE,
                                   help="Write a resumable checkpoint into DIR every N steps."),
    save_total_limit: int = typer.Option(1, "--save-total-limit", rich_help_panel=_SAVE,
                                         help="Keep at most this many checkpoints."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=_SAVE,
                                help="Continue from the last checkpoint in DIR."),
    report_to: str = typer.Option("none", "--report-to", rich_help_panel=_SAVE,
                                  help="Experiment tracker: none, tensorboard, wandb, ..."),
    rollout_log: Optional[Path] = typer.Option(None, "--rollout-log", metavar="FILE", rich_help_panel=_SAVE,
                                               help="Append every rollout (turns, visits, reward parts, advantage, "
                                                    "token ids and the loss mask of the trained batch) as JSONL."),
    cache_dir: Optional[Path] = CacheDirOption,
    caption_backend: Optional[str] = CaptionBackendOption, caption_model: Optional[str] = CaptionModelOption,
    caption_base_url: List[str] = CaptionBaseUrlOption, caption_api_key: Optional[str] = CaptionApiKeyOption,
    qa_backend: Optional[str] = QaBackendOption, qa_model: Optional[str] = QaModelOption,
    qa_base_url: List[str] = QaBaseUrlOption, qa_api_key: Optional[str] = QaApiKeyOption,
    concurrency: int = ConcurrencyOption, timeout: float = TimeoutOption, max_retries: int = MaxRetriesOption,
    device: str = DeviceOption,
    system_prompt: Optional[Path] = SystemPromptOption, caption_system_prompt: Optional[Path] = CaptionPromptOption,
    min_width: int = MinWidthOption, max_width: int = MaxWidthOption, segment_seconds: float = SegmentSecondsOption,
    high_frames: int = HighFramesOption, medium_frames: int = MediumFramesOption, low_frames: int = LowFramesOption,
    caption_side: int = CaptionSideOption, qa_side: int = QaSideOption,
    caption_max_tokens: Optional[int] = CaptionMaxTokensOption,
    caption_temperature: float = CaptionTemperatureOption, qa_max_tokens: int = QaMaxTokensOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the data and settings, print them, and stop."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train a navigator with multi-turn GRPO, through the same tools and protocol as `lvr ask`.

    Each QA item is one GRPO group: --num-generations rollouts of the `ask`
    loop over its video's caption tree. Every turn is sampled from the policy,
    stopped at </tool> or </answer>, the tool runs in the environment and its
    result is appended, up to --max-turns. Tool results, corrections and template
    tokens are masked out of the loss. The reward is
    w_answer*answer + w_localisation*F1 - w_repeat*repeat (+ w_center_distance*CD),
    every part logged per step with turns per rollout, the share of invalid
    turns and the KL.

    Captions come from the shared caption store; name the captioner that made
    them with --caption-model (and give it an endpoint, --caption-base-url, to
    caption nodes not yet stored). Defaults follow LongVideo-R1: group 16, lr
    1e-6, KL coefficient 1e-4 (low-variance k3), temperature 1.0, 15 turns. DIR
    loads into `lvr ask --backend transformers --model DIR`. Several GPUs or
    nodes: run it under `accelerate launch` with a config from configs/accelerate/.

    Exit status: 0 trained and saved, 2 usage error (data, model, settings).

    Examples:

      lvr rl qa.jsonl --model navigator-sft --video-dir videos/ --caption-model Qwen/Qwen2.5-VL-7B-Instruct --caption-base-url http://localhost:8001/v1 -o navigator-rl

      lvr rl cgbench.json --config configs/rl_qwen3_8b.yaml --video-dir cgbench/videos -o navigator-rl

      accelerate launch --config_file configs/accelerate/zero3.yaml -m lvr.cli rl cgbench.json --config configs/rl_qwen3_8b.yaml -o navigator-rl

      lvr rl qa.jsonl --config configs/rl_qwen3_8b.yaml --vllm colocate --kl-argument-scale 0.1 -o navigator-rl

      lvr rl qa.jsonl --model navigator-sft --caption-model M --max-steps 2 --rollout-log rollouts.jsonl --dry-run

      lvr ask movie.mp4 "Who opens the door?" --backend transformers --model navigator-rl --caption-model ./qwen2.5-vl-7b
    """
    from ..prep.cache import resolve_cache_dir
    from ..train.rl import RlError, RlSettings, load_rl_data, run_rl, summary_line

    if not caption_model:
        raise fail_usage("give --caption-model: the captioner whose captions are in the store (with "
                         "--caption-base-url to caption nodes not stored yet)")
    settings = RlSettings(
        qa=qa, model=model, output=str(output), video_dir=str(video_dir) if video_dir else None, format=fmt,
        max_items=max_items, clue_gap=clue_gap, subtitles=not no_subtitles, num_generations=num_generations, lr=lr,
        beta=beta, loss_type=loss_type, epsilon=epsilon, scale_rewards=scale_rewards, num_iterations=num_iterations,
        temperature=temperature, top_p=top_p, max_turns=max_turns, max_invalid=max_invalid, max_tokens=max_tokens,
        max_completion_length=max_completion_length, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, scheduler=scheduler, warmup_ratio=warmup_ratio, w_answer=w_answer,
        w_localisation=w_localisation, w_repeat=w_repeat, w_center_distance=w_center_distance,
        kl_argument_scale=kl_argument_scale, vllm=vllm, vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
        turn_batch=turn_batch, bf16=bf16, gradient_checkpointing=gradient_checkpointing, seed=seed,
        logging_steps=logging_steps, save_steps=save_steps, save_total_limit=save_total_limit, resume=resume,
        report_to=report_to, rollout_log=str(rollout_log) if rollout_log else None,
        chat_template=str(chat_template) if chat_template else None, cpu=cpu)
    try:
        nav = navigator_options(
            backend="transformers", model=model, base_url=[], api_key=None,
            caption_backend=caption_backend, caption_model=caption_model, caption_base_url=caption_base_url,
            caption_api_key=caption_api_key, qa_backend=qa_backend, qa_model=qa_model, qa_base_url=qa_base_url,
            qa_api_key=qa_api_key, concurrency=concurrency, timeout=timeout, max_retries=max_retries,
            device=device, max_rounds=max_turns, max_invalid=max_invalid, max_tokens=max_tokens,
            temperature=temperature, seed=seed, system_prompt=system_prompt,
            caption_system_prompt=caption_system_prompt, min_width=min_width, max_width=max_width,
            segment_seconds=segment_seconds, high_frames=high_frames, medium_frames=medium_frames,
            low_frames=low_frames, caption_side=caption_side, qa_side=qa_side,
            caption_max_tokens=caption_max_tokens, caption_temperature=caption_temperature,
            qa_max_tokens=qa_max_tokens)
    except ValueError as e:
        raise fail_usage(str(e))
    try:
        settings.check()
        if dry_run:
            data = load_rl_data(settings)
            typer.echo(json.dumps({"settings": settings.__dict__, "data": {
                "items": len(data.items), "videos": len({str(i.video) for i in data.items}),
                "skipped": data.errors}}, indent=1))
            raise typer.Exit(EXIT_OK)
        record = run_rl(settings, nav, resolve_cache_dir(cache_dir), log=None if quiet else say)
    except RlError as e:
        raise fail_usage(str(e))
    if record["world_size"] == 1 or _is_main():
        say(summary_line(record))
    raise typer.Exit(EXIT_OK)


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0") or 0) == 0

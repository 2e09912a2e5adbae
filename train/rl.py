"""Multi-turn GRPO for the navigator (docs/architecture.md §2.8), on TRL's `GRPOTrainer` with a `rollout_func`.

Each training prompt is one QA item (video, question, options, answer, clue
intervals). For every prompt the trainer asks for, `RolloutFunction` runs the
`lvr ask` loop (`infer.agent.run_agent`) in the item's `VideoEnv` with a
`train.rollout.TokenRecordingModel`, and hands TRL the rollout's tokens:
`prompt_ids` (system prompt + question + high captions), `completion_ids`
(every sampled turn and, between them, the tool results), the sampling
`logprobs`, and `env_mask` (1 on sampled tokens, 0 on tool results, corrections
and template tokens), which TRL multiplies into the loss mask. The rollout's
answer, visits, clues and text are forwarded to the reward function, which scores it
with `train.rewards.rollout_reward` under the `--reward` rule (lvr's, or the reference's
number for number):

    R = w_ans·answer + w_loc·F1 − w_rep·repeat (+ w_cd·center_distance)

and, for an item without clue intervals, R = w_ans·answer alone. The file may
also hold grounding items (``lvr.grounding/1``, alone or mixed with QA items):
their rollouts are grounding queries answered with an interval, and their
reward puts the answered interval's terms in place of the answer term
(`train.rewards.grounding_reward`, the targets serving as clues):

    R = w_iou·IoU + w_icd·CenDist + w_loc·F1 − w_rep·repeat (+ w_cd·center_distance)

Defaults follow LongVideo-R1: group size 16, lr 1e-6, KL coefficient 1e-4 with
the low-variance k3 estimator (TRL's KL term is exactly k3:
exp(ref − logp) − (ref − logp) − 1, weighted by `beta`), temperature 1.0, at most
15 turns. Each logged step carries the mean reward, each reward part, turns per
rollout, the share of invalid turns, the KL, and TRL's own metrics.

Token-aware KL (options, LongVTG-R1): `kl_argument_scale=s` scales the KL
penalty on the tokens that spell a tool call's node id by s (0 removes it), and
`kl_timestamp_scale=s` on the tokens that spell the two times of a grounding
answer's interval (`train.rollout.timestamp_token_mask`). It is done by moving
those tokens' reference log-probs before the loss (see `LvrGRPOTrainer`): the
gradient of TRL's k3 term there becomes exactly s times the original at the
sampling policy, which is where GRPO with one iteration per batch evaluates it.

The output folder is a plain checkpoint (weights, config, tokenizer with the
think-keeping chat template) plus `lvr_rl.json`: `lvr ask --backend transformers
--model OUT` loads it. More GPUs and nodes come through `accelerate launch`
(DDP, DeepSpeed ZeRO, FSDP) with the configs in configs/accelerate/.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..infer.protocol import GROUNDING, QA
from .hints import CLUE_GAP_S
from .rewards import REWARD_RULES, RewardWeights, merge_clues, rollout_reward
from ..prep.options import option, override
from .trainer_kit import (SAVE_PANEL, LossTypeSettings, TrainingRun, TrainingSettings, check_positive, curve_ends, log_curve, prepare,
                          progress_callbacks, run_record, save_trained, train, training_arguments, without_printer,
                          world_size, write_record)

DATA_PANEL = "QA items"
GRPO_PANEL = "GRPO"
REWARD_PANEL = "Reward"
ROLLOUT_PANEL = "Rollouts"
SCHEMA = "lvr.rl/1"
ROLLOUT_SCHEMA = "lvr.rollout/1"
RECORD_FILE = "lvr_rl.json"
TOOL = "lvr rl"
VLLM_MODES = ("auto", "off", "colocate")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
REWARD_PARTS = ("answer", "localisation", "repeat", "center_distance", "iou", "interval_center_distance")


class RlError(ValueError):
    """A usage problem (data, model, settings): one line for the user."""


def resolve_vllm_mode(mode: str, *, cpu: bool = False) -> str:
    """`auto` is colocate when vLLM imports and a CUDA GPU is there, else off (transformers generate)."""
    if mode != "auto":
        return mode
    if cpu:
        return "off"
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "off"
    import torch

    return "colocate" if torch.cuda.is_available() else "off"


@dataclass(kw_only=True)
class RlSettings(TrainingSettings, LossTypeSettings):
    """Everything `lvr rl` can be told. Defaults follow LongVideo-R1's RL stage (see TrainingSettings)."""

    error_type: ClassVar[type[Exception]] = RlError

    qa: str
    video_dir: str | None = None
    format: str = "auto"
    max_items: int | None = option(None, "--max-items", min=1, panel=DATA_PANEL, help="Only the first N items.")
    clue_gap: float = option(CLUE_GAP_S, "--clue-gap", min=0.0, panel=DATA_PANEL,
                             help="Merge clue intervals less than this many seconds apart.")
    subtitles: bool = True
    # GRPO
    num_generations: int = option(16, "--num-generations", "--group-size", panel=GRPO_PANEL,
                                  help="Rollouts per question (the GRPO group).")
    lr: float = override(TrainingSettings, "lr", 1e-6)
    beta: float = option(1e-4, "--beta", "--kl-coef", panel=GRPO_PANEL,
                         help="KL-loss coefficient (low-variance k3 estimator against the start model); 0 drops the "
                              "reference model.")
    loss_type: str = override(LossTypeSettings, "loss_type", "grpo")
    epsilon: float = option(0.2, "--epsilon", panel=GRPO_PANEL, help="PPO clip range.")
    scale_rewards: str = option("group", "--scale-rewards", panel=GRPO_PANEL,
                                help="Divide advantages by the std of the group, the batch, or none.")
    num_iterations: int = option(1, "--num-iterations", panel=GRPO_PANEL,
                                 help="Optimisation passes over each batch of rollouts.")
    temperature: float = 1.0              # --temperature, --max-tokens, --seed: SamplingOptions; --max-invalid:
    top_p: float = option(1.0, "--top-p", panel=ROLLOUT_PANEL, help="Nucleus sampling.")  # AgentOptions
    max_turns: int = option(15, "--max-turns", panel=ROLLOUT_PANEL,
                            help="Model turns per rollout; the last one must answer.")
    max_invalid: int = 3
    max_tokens: int = 2048                # per turn
    max_completion_length: int = option(24576, "--max-completion-length", panel=ROLLOUT_PANEL,
                                        help="Token limit of a whole rollout after its prompt (turns and tool "
                                             "results).")
    batch_size: int = override(TrainingSettings, "batch_size", 4)      # completions per device per micro-step
    grad_accum: int = override(TrainingSettings, "grad_accum", 4)
    epochs: float = override(TrainingSettings, "epochs", 1.0)
    scheduler: str = override(TrainingSettings, "scheduler", "constant")
    warmup_ratio: float = override(TrainingSettings, "warmup_ratio", 0.0)
    warmup_steps: int | None = option(None, "--warmup-steps", min=0, panel=GRPO_PANEL,
                                      help="Warm the learning rate up over this many optimizer steps (instead of "
                                           "--warmup-ratio).")
    questions_per_step: int | None = option(None, "--questions-per-step", metavar="N", min=1, panel=GRPO_PANEL,
                                            help="QA items per optimizer step, each with --num-generations "
                                                 "rollouts: sets --grad-accum so that processes x --batch-size x "
                                                 "--grad-accum = N x --num-generations, on any number of GPUs.")
    max_grad_norm: float = 1.0
    # reward
    reward: str = option("lvr", "--reward", choices=REWARD_RULES, panel=REWARD_PANEL,
                         help="lvr: the terms from the executed visits, overlap against their union; reference: "
                              "LongVideo-R1's verl-tool reward exactly (overlap summed per visit, spans by equal "
                              "time division, every get_caption call in the text, clues merged when at most "
                              "--clue-gap apart). Items without clue intervals get the answer term alone either way.")
    w_answer: float = option(1.0, "--w-answer", panel=REWARD_PANEL, help="Weight of answer correctness.")
    w_localisation: float = option(1.0, "--w-localisation", panel=REWARD_PANEL,
                                   help="Weight of the localisation F1 of get_caption visits vs the clues.")
    w_repeat: float = option(0.2, "--w-repeat", panel=REWARD_PANEL,
                             help="Weight of the repeated-call penalty (subtracted).")
    w_center_distance: float = option(0.0, "--w-center-distance", panel=REWARD_PANEL,
                                      help="Weight of the LongVTG-R1 center-distance reward (off: 0).")
    w_iou: float = option(1.0, "--w-iou", panel=REWARD_PANEL,
                          help="Grounding items: weight of the temporal IoU of the answered interval with the "
                               "best-matching target (in place of the answer term).")
    w_interval_center_distance: float = option(1.0, "--w-interval-center-distance", panel=REWARD_PANEL,
                                               help="Grounding items: weight of the answered interval's "
                                                    "Center-Distance reward (LongVTG-R1's CenDist), 1 - |centre "
                                                    "distance to the nearest target| / duration.")
    kl_argument_scale: float | None = option(None, "--kl-argument-scale", metavar="S", panel=GRPO_PANEL,
                                             help="Token-aware KL (LongVTG-R1): scale the KL penalty on the tokens "
                                                  "of tool-call node ids by S (0 frees them). Off by default.")
    kl_timestamp_scale: float | None = option(None, "--kl-timestamp-scale", metavar="S", panel=GRPO_PANEL,
                                              help="Token-aware KL (LongVTG-R1): scale the KL penalty on the tokens "
                                                   "of the two times in a grounding answer's [start, end] by S (0 "
                                                   "frees them). Off by default.")
    # generation
    vllm: str = option("auto", "--vllm", panel=ROLLOUT_PANEL,
                       help="auto (colocate when vLLM is installed and a GPU is there), off (transformers generate "
                            "on the policy) or colocate (TRL's vLLM engine in each process; needs pip install "
                            "'lvr[vllm]').")
    vllm_gpu_memory_utilization: float = option(0.3, "--vllm-gpu-memory-utilization", panel=ROLLOUT_PANEL,
                                                help="GPU memory share of the colocated vLLM engine.")
    turn_batch: int | None = option(None, "--turn-batch", panel=ROLLOUT_PANEL,
                                    help="Most turns sampled in one generate call (default: all waiting).")
    # running (and the settings every trainer has: TrainingSettings)
    rollout_log: str | None = option(None, "--rollout-log", metavar="FILE", panel=SAVE_PANEL,
                                     help="Append every rollout (turns, visits, reward parts, advantage, token ids "
                                          "and the loss mask of the trained batch) as JSONL.")

    def weights(self) -> RewardWeights:
        return RewardWeights(answer=self.w_answer, localisation=self.w_localisation, repeat=self.w_repeat,
                             center_distance=self.w_center_distance, iou=self.w_iou,
                             interval_center_distance=self.w_interval_center_distance)

    def record_extras(self) -> dict:
        return {"reward_weights": self.weights().to_record(),
                "kl_estimator": "k3 (low-variance): exp(ref - logp) - (ref - logp) - 1"}

    def check(self) -> None:
        """RlError naming the first unusable setting."""
        super().check()
        check_positive({"--num-generations": self.num_generations, "--max-turns": self.max_turns,
                        "--max-tokens": self.max_tokens, "--max-completion-length": self.max_completion_length,
                        "--temperature": self.temperature, "--num-iterations": self.num_iterations}, RlError)
        if self.num_generations < 2:
            raise RlError(f"--num-generations must be at least 2 (GRPO compares rollouts within a group), "
                          f"not {self.num_generations}")
        if self.beta < 0:
            raise RlError(f"--beta must not be negative, not {self.beta}")
        if not 0 < self.top_p <= 1:
            raise RlError(f"--top-p must be in (0, 1], not {self.top_p}")
        if self.loss_type not in LOSS_TYPES:
            raise RlError(f"unknown --loss-type {self.loss_type!r} (use one of {', '.join(LOSS_TYPES)})")
        if self.scale_rewards not in SCALE_REWARDS:
            raise RlError(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, not {self.scale_rewards!r}")
        if self.vllm not in VLLM_MODES:
            raise RlError(f"--vllm must be auto, off or colocate, not {self.vllm!r} (multi-turn rollouts sample turn "
                          "by turn in each process, which TRL's vLLM server mode does not support)")
        for flag, scale in (("--kl-argument-scale", self.kl_argument_scale),
                            ("--kl-timestamp-scale", self.kl_timestamp_scale)):
            if scale is not None:
                if not 0 <= scale <= 1:
                    raise RlError(f"{flag} must be in [0, 1], not {scale}")
                if self.beta == 0:
                    raise RlError(f"{flag} needs a KL term (--beta above 0)")
        if self.max_tokens > self.max_completion_length:
            raise RlError(f"--max-tokens {self.max_tokens} is larger than --max-completion-length "
                          f"{self.max_completion_length}")
        if self.turn_batch is not None and self.turn_batch < 1:
            raise RlError(f"--turn-batch must be positive, not {self.turn_batch}")
        if self.max_invalid < 0:
            raise RlError(f"--max-invalid must not be negative, not {self.max_invalid}")
        if min(self.w_center_distance, self.w_answer, self.w_localisation, self.w_repeat, self.w_iou,
               self.w_interval_center_distance) < 0:
            raise RlError("reward weights must not be negative (the repeat weight is subtracted)")
        if self.clue_gap < 0:
            raise RlError(f"--clue-gap must not be negative, not {self.clue_gap}")
        if self.reward not in REWARD_RULES:
            raise RlError(f"--reward must be one of {', '.join(REWARD_RULES)}, not {self.reward!r}")
        if self.reward == "reference" and self.w_center_distance:
            raise RlError("--reward reference has no center-distance term; leave --w-center-distance at 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise RlError(f"--warmup-steps must not be negative, not {self.warmup_steps}")
        if self.questions_per_step is not None and self.questions_per_step < 1:
            raise RlError(f"--questions-per-step must be positive, not {self.questions_per_step}")

    def for_processes(self, world_size: int) -> "RlSettings":
        """These settings with --grad-accum derived from --questions-per-step (when set) for `world_size`
        processes; RlError when the rollouts of a step do not split evenly over them."""
        if self.questions_per_step is None or self.questions_per_step < 1 or self.batch_size < 1:
            return self  # check() names what is wrong
        rollouts = self.questions_per_step * self.num_generations
        per_micro_step = self.batch_size * world_size
        if rollouts % per_micro_step:
            raise RlError(f"--questions-per-step {self.questions_per_step} x --num-generations {self.num_generations} "
                          f"= {rollouts} rollouts per step, which {world_size} process(es) x --batch-size "
                          f"{self.batch_size} = {per_micro_step} per micro-step do not divide")
        return replace(self, grad_accum=rollouts // per_micro_step)

    def batch_check(self, world_size: int) -> None:
        """The generation batch must hold whole groups."""
        per_step = self.batch_size * self.grad_accum * world_size
        if per_step % self.num_generations:
            raise RlError(f"--batch-size {self.batch_size} x --grad-accum {self.grad_accum} x {world_size} "
                          f"process(es) = {per_step} rollouts per step, which is not a multiple of "
                          f"--num-generations {self.num_generations}")


# -- data ---------------------------------------------------------------------------------------

@dataclass
class RlItem:
    """A QA or grounding item ready for rollouts: its video file and merged clues (a grounding item's
    targets; none: answer-only reward)."""

    key: str                  # the prompt TRL carries for it (the item's qid)
    item: Any                 # train.qa_items.TrainingItem: a QAItem or a GroundingItem
    video: Path
    clues: list[tuple[float, float]]
    task: str = QA            # qa, or grounding (answered with an interval)


@dataclass
class RlData:
    path: str
    items: list[RlItem] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        videos = len({str(i.video) for i in self.items})
        bad = f", {len(self.errors)} skipped" if self.errors else ""
        grounding = sum(1 for i in self.items if i.task == GROUNDING)
        kinds = f" ({len(self.items) - grounding} QA, {grounding} grounding)" if grounding else ""
        return f"{len(self.items)} {'' if grounding else 'QA '}items{kinds} over {videos} videos{bad}"


def load_rl_data(settings: RlSettings) -> RlData:
    """Read the QA and grounding items and resolve their videos; RlError when nothing usable remains."""
    from ..infer.benchmarks import EvalFormatError, resolve_video
    from .qa_items import clue_intervals, item_task, load_training_items

    name = settings.qa
    if name == "-":
        raise RlError("QA '-' (stdin) is not supported by `lvr rl`: every process reads the file; pass a path")
    if not Path(name).is_file():
        raise RlError(f"{name}: no such QA file" if not Path(name).exists() else f"{name}: not a file")
    try:
        items, errors = load_training_items(name, settings.format)
    except EvalFormatError as e:
        raise RlError(str(e)) from None
    grounding = sum(1 for item in items if item_task(item) == GROUNDING)
    if grounding and settings.reward == "reference":
        raise RlError(f"{name}: {grounding} grounding items, which --reward reference cannot score "
                      f"(LongVideo-R1's reward has no grounding task); use --reward lvr")
    data = RlData(name, errors=list(errors))
    video_dir = Path(settings.video_dir) if settings.video_dir else Path(name).parent
    for item in items[: settings.max_items] if settings.max_items else items:
        try:
            video = resolve_video(item.video, video_dir)
        except (EvalFormatError, OSError) as e:
            data.errors.append(f"{item.qid}: {e}")
            continue
        data.items.append(RlItem(item.qid, item, video,
                                 merge_clues(settings.reward, clue_intervals(item), settings.clue_gap),
                                 item_task(item)))
    if not data.items:
        first = f" (first problem: {data.errors[0]})" if data.errors else ""
        raise RlError(f"{name}: no usable QA items{first}")
    return data


# -- rollouts ------------------------------------------------------------------------------------

class RolloutFunction:
    """TRL's `rollout_func(prompts, trainer)`: one multi-turn rollout per prompt, through `run_agent`.

    Holds the navigator session (trees, caption store, captioner, video_qa) on
    one background event loop for the whole run. `last` keeps the rollouts of the
    latest call, for the trainer's logging.
    """

    def __init__(self, settings: RlSettings, data: RlData, nav, cache_dir: Path, tokenizer,
                 *, log: Callable[[str], None] | None = None):
        from .rollout import LoopThread

        self.settings = settings
        self.items = {it.key: it for it in data.items}
        self.nav = nav
        self.cache_dir = Path(cache_dir)
        self.tokenizer = tokenizer
        self.log = log or (lambda _m: None)
        self.loop = LoopThread()
        self.navigator = None
        self.last: list[dict] = []
        self.last_records: list = []

    def _navigator(self):
        from ..infer.navigator import Navigator

        if self.navigator is None:
            self.navigator = Navigator(self.nav, self.cache_dir)
        return self.navigator

    def close(self) -> None:
        if self.navigator is not None:
            try:
                self.loop.run(self.navigator.aclose())
            except Exception:  # noqa: BLE001 - closing must not hide the real outcome
                pass
        self.loop.close()

    # The generation backend for this step, inside the contexts TRL itself uses for generation.
    def _generate_contexts(self, trainer):
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        if trainer.use_vllm:
            from .rollout import VLLMTurnGenerator

            return stack, VLLMTurnGenerator(trainer.vllm_generation, self.tokenizer,
                                            eos_token_ids=trainer.eos_token_ids)
        from trl.models.utils import unwrap_model_for_generation

        from .rollout import TransformersTurnGenerator

        model = stack.enter_context(unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            generation_kwargs=getattr(trainer, "generation_kwargs", None),
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs))
        stack.enter_context(torch.no_grad())
        dist = getattr(trainer, "_dist", None)
        if dist is not None:
            stack.enter_context(dist.summon_full_params(trainer.model_wrapped, recurse=False))
        # Generation runs in a worker thread, where grad mode and autocast must be set again.
        generator = TransformersTurnGenerator(model, self.tokenizer, trainer.generation_config,
                                              temperature=self.settings.temperature,
                                              eos_token_ids=trainer.eos_token_ids,
                                              pad_token_id=self.tokenizer.pad_token_id,
                                              autocast=trainer.accelerator.autocast)
        return stack, generator

    def preflight(self) -> None:
        """Fail at once: naming the URL when the captioner's (or video_qa's) endpoint cannot be reached,
        naming the folder when --captions holds no caption files."""
        from ..prep.caption_store import CaptionStoreError
        from ..prep.models.base import ModelError

        try:
            self.loop.run(self._preflight())
        except (ModelError, CaptionStoreError, ValueError) as e:
            raise RlError(str(e)) from None

    async def _preflight(self) -> None:
        await self._navigator().preflight()

    def prepare_trees(self, data: RlData) -> None:
        """Segment (or load from the cache) every item's video now, not in the middle of a step.

        Items whose video cannot be used are moved to `data.errors`.
        """
        from ..prep.probe import VideoError

        keep, bad = [], {}
        for it in data.items:
            key = str(it.video)
            if key not in bad:
                try:
                    self.loop.run(self._navigator().tree(it.video))
                except (VideoError, ValueError, OSError) as e:
                    # A VideoError, or a video with no --captions file, names the video already.
                    bad[key] = str(e) if str(e).startswith(f"{it.video}: ") else f"{it.video}: {e}"
            if key in bad:
                data.errors.append(f"{it.key}: {bad[key]}")
            else:
                keep.append(it)
        data.items = keep
        self.items = {it.key: it for it in keep}
        if not keep:
            raise RlError(f"{data.path}: no usable QA items (first problem: {data.errors[0]})")

    def __call__(self, prompts: list, trainer) -> dict:
        from .rollout import RolloutError, TurnBatcher

        started = time.perf_counter()
        stack, generator = self._generate_contexts(trainer)
        with stack:
            batcher = TurnBatcher(generator, max_batch=self.settings.turn_batch)
            try:
                records = self.loop.run(self._collect([str(p) for p in prompts], batcher))
            except RolloutError as e:
                raise RlError(str(e)) from None
        out = self._to_trl(records)
        errors = [(r["qid"], r["error"]) for r in out["rollout"] if r["error"]]
        if errors and len(errors) == len(out["rollout"]):
            raise RlError(f"every rollout of this step failed; the first ({errors[0][0]}): {errors[0][1]}")
        for qid, error in errors[:3]:
            self.log(f"lvr rl: a rollout of {qid} failed and is not scored: {error}")
        self.last = out["rollout"]
        self.last_records = records
        self._metrics(trainer, out["rollout"], batcher, time.perf_counter() - started)
        return out

    async def _collect(self, keys: list[str], batcher) -> list:
        navigator = self._navigator()
        results = await batcher.run([self._one(navigator, key, batcher) for key in keys])
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def _one(self, navigator, key: str, batcher):
        from ..infer.agent import AgentOptions, AgentResult, run_agent
        from ..infer.environment import VideoEnv
        from ..prep.models.base import ModelError
        from ..prep.probe import VideoError
        from .qa_items import item_options, item_query
        from .rollout import TokenRecordingModel

        it = self.items.get(key)
        if it is None:
            raise RlError(f"the trainer asked for an unknown item {key!r}")
        query, options = item_query(it.item), item_options(it.item)
        s = self.settings
        model = TokenRecordingModel(self.tokenizer, batcher, max_completion_tokens=s.max_completion_length)
        agent = AgentOptions(max_rounds=s.max_turns, max_invalid=s.max_invalid, max_tokens=s.max_tokens,
                             temperature=s.temperature, top_p=s.top_p, protocol=navigator.profile.name)
        try:
            nodes = await navigator.tree(it.video)
            env = VideoEnv(nodes, navigator.captioner(s.subtitles and it.item.extra.get("subtitles", True)),
                           navigator.video_qa(), navigator.profile)
        except (VideoError, ValueError, ModelError) as e:
            result = AgentResult(query, options, stopped="error", error=str(e), task=it.task)
            return it, None, model, result
        result = await run_agent(model, env, query, options, template=navigator.template, agent=agent, task=it.task)
        return it, env, model, result

    def _to_trl(self, records: list) -> dict:
        from .qa_items import item_options, item_query
        from .rollout import MASK_ENV

        eos = self.tokenizer.eos_token_id
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [],
                                "rollout": []}
        for it, env, model, result in records:
            rec = model.record
            prompt = list(rec.prompt_ids) or list(self.tokenizer(item_query(it.item), add_special_tokens=False)
                                                  ["input_ids"]) or [eos]
            completion, mask, logprobs = list(rec.completion_ids), list(rec.env_mask), list(rec.logprobs)
            if not rec.truncated and (not completion or completion[-1] != eos):
                # A finished rollout ends with the end-of-turn token (template text, not trained on).
                completion.append(eos)
                mask.append(MASK_ENV)
                logprobs.append(0.0)
            infra_error = result.error is not None and not rec.truncated
            out["prompt_ids"].append(prompt)
            out["completion_ids"].append(completion)
            out["logprobs"].append(logprobs)
            out["env_mask"].append(mask)
            grounding = it.task == GROUNDING
            out["rollout"].append({
                "qid": it.key, "task": it.task,
                "video_id": env.video_id if env else None,
                "answer": result.answer, "choice": result.choice,
                "options": list(item_options(it.item)), "reference": None if grounding else it.item.answer,
                **({"interval": list(result.interval) if result.interval is not None else None,
                    "targets": [list(t) for t in it.item.targets]} if grounding else {}),
                "visits": [v.to_record() for v in env.visits] if env else [],
                "clues": [list(c) for c in it.clues],
                "duration": env.duration if env else None,
                "width": env.k if env else None,
                "turns": len(result.turns),
                "invalid_turns": sum(1 for t in result.turns if t.breach),
                "tool_calls": len(env.visits) if env else 0,     # executed (rule-breaking calls are not)
                "stopped": result.stopped,
                "truncated": rec.truncated,
                "error": result.error if infra_error else None,
                "turn_texts": [t.text for t in result.turns],
                "results": [t.result for t in result.turns],
                "breaches": [t.breach for t in result.turns],
                "turn_spans": [list(s) for s in rec.turns],
            })
        return out

    def _metrics(self, trainer, rollouts: list[dict], batcher, seconds: float) -> None:
        log = getattr(trainer, "_log_metric", None)
        if log is None:
            return
        for r in rollouts:
            log("rollout/turns", float(r["turns"]))
            log("rollout/invalid_turn_share", r["invalid_turns"] / r["turns"] if r["turns"] else 0.0)
            log("rollout/tool_calls", float(r["tool_calls"]))
            log("rollout/answered", 1.0 if r["stopped"] == "answered" else 0.0)
            log("rollout/truncated", 1.0 if r["truncated"] else 0.0)
            log("rollout/errors", 1.0 if r["error"] else 0.0)
        log("rollout/seconds", seconds)
        log("rollout/turn_batches", float(len(batcher.batches)))


def make_reward_function(weights: RewardWeights, rule: str = "lvr"):
    """The TRL reward function: each rollout's reward under `rule`; each part it has logged as a metric."""

    def lvr_reward(prompts=None, completions=None, rollout=None, log_metric=None, **kwargs):
        rewards = []
        for r in rollout or []:
            if r.get("error"):
                r["reward"] = None
                rewards.append(None)  # unscorable: TRL gives it no advantage and leaves it out of the baseline
                continue
            parts = rollout_reward(rule, r, weights)
            r["reward"] = parts.to_record()
            rewards.append(parts.total)
            if log_metric is not None:
                for part in REWARD_PARTS:
                    if getattr(parts, part) is not None:  # an answer-only reward has no other parts
                        log_metric(f"rewards/{part}", float(getattr(parts, part)))
                log_metric("rewards/answer_only", 1.0 if parts.answer_only else 0.0)
        return rewards

    lvr_reward.__name__ = "lvr_reward"
    return lvr_reward


# -- the trainer -----------------------------------------------------------------------------------

def scaled_reference(ref, current, scale: float):
    """Reference log-probs ref' that scale the gradient of TRL's k3 KL term by `scale`.

    TRL adds beta·k3(d) per token with d = ref − logp, k3(d) = e^d − d − 1, whose
    gradient in logp is beta·(1 − e^d). With

        ref' = p + log(1 − s + s·e^(ref − p)),

    p being the policy's log-prob at sampling time, the gradient at logp = p is
    s·beta·(1 − e^(ref − p)): exactly s times the original. GRPO with one
    iteration per batch evaluates the loss at logp = p, so the penalty on these
    tokens is scaled by s; s = 0 removes it (ref' = p), s = 1 changes nothing.
    """
    import math

    import torch

    if scale <= 0:
        return current.clone()
    if scale >= 1:
        return ref
    d = (ref - current).float()
    moved = torch.logaddexp(torch.full_like(d, math.log1p(-scale)), d + math.log(scale))  # stable for large d
    return (current.float() + moved).to(ref.dtype)


def _trainer_class():
    """GRPOTrainer plus the token-aware KL and the rollout log (built lazily: TRL is heavy to import)."""
    import torch
    from trl import GRPOTrainer

    class LvrGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, lvr_rollouts: RolloutFunction, lvr_settings: RlSettings, **kwargs):
            self.lvr_rollouts = lvr_rollouts
            self.lvr_settings = lvr_settings
            self.lvr_last_batch: dict | None = None
            self._lvr_log_file = None
            super().__init__(*args, rollout_func=lvr_rollouts, **kwargs)

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            rollouts = self.lvr_rollouts.last
            self.lvr_last_batch = {k: output[k] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                           "completion_mask", "advantages") if k in output}
            if output.get("ref_per_token_logps") is not None:
                # Kept as TRL computed it, beside what the loss uses, so the token-aware shift can be checked.
                self.lvr_last_batch["trl_ref_per_token_logps"] = output["ref_per_token_logps"]
                output["ref_per_token_logps"] = self._token_aware_reference(output)
                self.lvr_last_batch["ref_per_token_logps"] = output["ref_per_token_logps"]
            if "tool_mask" in output:
                self.lvr_last_batch["tool_mask"] = output["tool_mask"]
            if self.lvr_settings.rollout_log:
                self._write_rollout_log(output, rollouts)
            return output

        def _token_aware_reference(self, output):
            """Reference log-probs that scale the KL penalty on node-id tokens by --kl-argument-scale and
            on a grounding answer's timestamp tokens by --kl-timestamp-scale (`scaled_reference`); the
            reference unchanged where neither is set."""
            from .rollout import argument_token_mask, timestamp_token_mask

            ref = output["ref_per_token_logps"]
            current = output.get("old_per_token_logps")
            if current is None:
                current = output.get("sampling_per_token_logps")
            if current is None:
                return ref
            self.lvr_last_batch["kl_current_logps"] = current
            s = self.lvr_settings
            for scale, token_mask, metric, tasks in (
                    (s.kl_argument_scale, argument_token_mask, "kl_argument_tokens", (QA, GROUNDING)),
                    (s.kl_timestamp_scale, timestamp_token_mask, "kl_timestamp_tokens", (GROUNDING,))):
                if scale is None:
                    continue
                marks = self._marked_tokens(ref, token_mask, tasks)   # node ids and times never share a token
                self._metrics["train"][metric].append(float(self.accelerator.gather(marks.sum()).sum().item()))
                ref = torch.where(marks, scaled_reference(ref, current, scale), ref)
            return ref

        def _marked_tokens(self, ref, token_mask, tasks):
            """Where `token_mask` marks a sampled turn's tokens in the batch, for rollouts of `tasks`."""
            marks = torch.zeros_like(ref, dtype=torch.bool)
            for row, (item, _env, model, _result) in enumerate(self.lvr_rollouts.last_records[: ref.shape[0]]):
                if item.task not in tasks:
                    continue
                record = model.record
                for start, end in record.turns:
                    for i, m in enumerate(token_mask(self.processing_class, record.completion_ids[start:end])):
                        if m and start + i < ref.shape[1]:
                            marks[row, start + i] = True
            return marks

        def _write_rollout_log(self, output, rollouts: list[dict]) -> None:
            from accelerate.utils import gather_object as gather

            completion_mask = output["completion_mask"]
            loss_mask = completion_mask * output["tool_mask"] if "tool_mask" in output else completion_mask
            lines = []
            for row, r in enumerate(rollouts):
                prompt = output["prompt_ids"][row][output["prompt_mask"][row].bool()].tolist()
                n = int(completion_mask[row].sum().item())
                line = {"schema": ROLLOUT_SCHEMA, "step": self.state.global_step, "process":
                        self.accelerator.process_index, **{k: v for k, v in r.items() if k != "visits"},
                        "visits": r["visits"], "advantage": float(output["advantages"][row].item()),
                        "prompt_ids": prompt,
                        "completion_ids": output["completion_ids"][row][:n].tolist(),
                        "loss_mask": loss_mask[row][:n].tolist()}
                if output.get("sampling_per_token_logps") is not None:
                    line["sampling_logprobs"] = [round(float(x), 5) for x in
                                                 output["sampling_per_token_logps"][row][:n].tolist()]
                lines.append(json.dumps(line, ensure_ascii=False))
            lines = gather(lines)
            if self.accelerator.is_main_process:
                if self._lvr_log_file is None:
                    Path(self.lvr_settings.rollout_log).parent.mkdir(parents=True, exist_ok=True)
                    self._lvr_log_file = open(self.lvr_settings.rollout_log, "a", encoding="utf-8")
                self._lvr_log_file.write("".join(x + "\n" for x in lines))
                self._lvr_log_file.flush()

    return LvrGRPOTrainer


def _step_details(logs: dict) -> str:
    """Reward and its parts, turns per rollout, the share of invalid turns, the KL."""
    parts = " ".join(f"{p} {logs[f'rewards/{p}']:.3f}" for p in REWARD_PARTS
                     if isinstance(logs.get(f"rewards/{p}"), (int, float)))
    kl = logs.get("kl")
    return (f"reward {logs['reward']:.3f} ({parts}) turns {logs.get('rollout/turns', 0):.1f} "
            f"invalid {100 * logs.get('rollout/invalid_turn_share', 0):.0f}%"
            + (f" kl {kl:.2e}" if isinstance(kl, (int, float)) else ""))


@dataclass
class RlRun(TrainingRun):
    settings: RlSettings
    data: RlData
    rollouts: RolloutFunction | None = None


def build_trainer(settings: RlSettings, nav, cache_dir: Path, *, log: Callable[[str], None] | None = None,
                  data: RlData | None = None) -> RlRun:
    """Check everything, load the tokenizer, and build the GRPO trainer (no training yet)."""
    settings.check()
    settings = settings.for_processes(world_size())
    settings.batch_check(world_size())
    vllm_mode = resolve_vllm_mode(settings.vllm, cpu=settings.cpu)
    if vllm_mode == "colocate":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RlError("--vllm colocate needs vLLM: pip install 'lvr[vllm]' (on a CUDA machine)") from None
    run = prepare(RlRun, settings, data if data is not None else load_rl_data(settings), data_arg="QA",
                  need_masks=False)  # no assistant-only loss: the env mask picks the trained tokens
    data, tokenizer = run.data, run.tokenizer
    tokenizer.padding_side = "left"
    import datasets
    from trl import GRPOConfig

    from ..infer.protocol import STOP_STRINGS

    vllm_kwargs: dict[str, Any] = {}
    if vllm_mode == "colocate":
        vllm_kwargs = dict(use_vllm=True, vllm_mode="colocate",
                           vllm_gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                           generation_kwargs={"stop": list(STOP_STRINGS), "include_stop_str_in_output": True,
                                              "max_tokens": settings.max_tokens})
    arguments = training_arguments(settings, run.output, run.bf16)
    if settings.warmup_steps is not None:
        arguments["warmup_steps"] = settings.warmup_steps
    config = GRPOConfig(
        **arguments,
        max_grad_norm=settings.max_grad_norm,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        beta=settings.beta,
        loss_type=settings.loss_type,
        epsilon=settings.epsilon,
        scale_rewards=settings.scale_rewards,
        num_iterations=settings.num_iterations,
        log_completions=False,
        **vllm_kwargs,
    )
    rollouts = run.rollouts = RolloutFunction(settings, data, nav, cache_dir, tokenizer, log=log)
    try:
        rollouts.preflight()
        with config.main_process_first(desc="video trees"):  # the main process segments, the others read the cache
            rollouts.prepare_trees(data)
    except BaseException:
        rollouts.close()
        raise
    train_dataset = datasets.Dataset.from_list([{"prompt": it.key} for it in data.items])
    trainer_cls = _trainer_class()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.16
    trainer = trainer_cls(model=run.model, reward_funcs=[make_reward_function(settings.weights(), settings.reward)],
                          args=config, train_dataset=train_dataset, processing_class=tokenizer,
                          callbacks=progress_callbacks(log, TOOL, _step_details, marker="reward"),
                          lvr_rollouts=rollouts, lvr_settings=settings)
    if getattr(trainer, "is_fsdp_enabled", False):
        rollouts.close()
        raise RlError("lvr rl cannot run under FSDP: its rollouts sample turn by turn in each process, and every "
                      "FSDP forward is a collective that the other processes would have to join; use DeepSpeed "
                      "ZeRO-3 (configs/accelerate/zero3.yaml) or plain DDP")
    run.trainer = without_printer(trainer)
    return run


# -- training and saving ------------------------------------------------------------------------

CURVE_KEYS = ("reward", "reward_std", *(f"rewards/{p}" for p in REWARD_PARTS), "rewards/answer_only",
              "rollout/turns", "rollout/invalid_turn_share", "rollout/tool_calls", "rollout/answered",
              "rollout/truncated", "rollout/errors", "kl", "kl_argument_tokens", "kl_timestamp_tokens", "entropy",
              "completions/mean_length", "loss", "learning_rate")


def reward_curve(log_history: list[dict]) -> list[dict]:
    """The logged steps, with the reward, its parts, turns, invalid share and KL."""
    return log_curve(log_history, {key: key for key in CURVE_KEYS}, marker="reward")


def run_rl(settings: RlSettings, nav, cache_dir: Path, *, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint (with its chat template) into settings.output, return the lvr_rl.json record."""
    started = time.time()
    run = build_trainer(settings, nav, cache_dir, log=log)
    trainer, settings = run.trainer, run.settings
    # The session's settings, as eval records them: with --captions, where the captions came from.
    navigator = run.rollouts._navigator().settings(settings.subtitles)
    generation = "vLLM colocate" if trainer.use_vllm else "transformers"
    details = [f"group {settings.num_generations}", f"lr {settings.lr:g}", f"beta {settings.beta:g}",
               f"max turns {settings.max_turns}", f"reward {settings.reward}", f"generation {generation}"]
    try:
        trained = train(run, log, TOOL, details, [f"skipped: {err}" for err in run.data.errors])
        save_trained(run)
    finally:
        run.rollouts.close()
        if trainer._lvr_log_file is not None:
            trainer._lvr_log_file.close()
    curve = reward_curve(trainer.state.log_history)
    first_reward, last_reward = curve_ends(curve, "reward")
    record = run_record(
        run, trained, schema=SCHEMA, tool=TOOL, started=started, head={"navigator": navigator},
        data={"path": run.data.path, "items": len(run.data.items), "skipped": run.data.errors},
        results={"first_reward": first_reward, "last_reward": last_reward, "curve": curve})
    write_record(run, RECORD_FILE, record)
    return record


def summary_line(record: dict) -> str:
    reward = (f"reward {record['first_reward']:.3f} -> {record['last_reward']:.3f}"
              if record["first_reward"] is not None else "no reward logged")
    return (f"lvr rl: {record['data']['items']} items, {record['steps']} steps, {reward}, "
            f"{record['seconds']:.1f} s; model in {record['output']}")

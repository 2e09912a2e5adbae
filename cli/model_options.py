"""The option groups that commands share (docs/architecture.md §5).

Each group is a settings dataclass whose fields carry their flags (prep/options.py);
cli/options.py turns them into Typer parameters. The navigator's options (ask,
eval, synthesize) are one bundle: the reasoning model, the captioner and the
video_qa model (each role falling back to the one before it), how they are
reached, how they sample, the agent loop and the tree.
"""

from __future__ import annotations

from ..infer.agent import AgentOptions
from ..infer.ground_then_answer import AnsweringOptions
from ..infer.navigator import CaptionFiles
from ..prep.models import ConnectionOptions, RoleOptions, SamplingOptions
from ..prep.transcribe import TranscribeOptions, TranscribeSwitch
from ..prep.tree import TreeOptions
from ..train.launch import LaunchSettings
from .options import Bundle, Group

MAIN_PANEL = "Reasoning model"
CAPTION_PANEL = "Caption model (defaults to the reasoning model's settings)"
QA_PANEL = "video_qa model (defaults to the caption model's settings)"
AGENT_PANEL = "Navigation"
TRANSCRIBE_PANEL = "Speech transcripts (--transcribe)"

MAIN_ROLE = Group(RoleOptions, defaults={"backend": "auto"}, panel=MAIN_PANEL)
CONNECTION = Group(ConnectionOptions, panel=MAIN_PANEL)
CAPTION_ROLE = Group(RoleOptions, prefix="caption", panel=CAPTION_PANEL)
QA_ROLE = Group(RoleOptions, prefix="qa", panel=QA_PANEL)
NAVIGATOR_SAMPLING = Group(SamplingOptions, panel=AGENT_PANEL)
CAPTION_SAMPLING = Group(SamplingOptions, prefix="caption", only=("max_tokens", "temperature", "system_prompt"),
                         defaults={"max_tokens": None}, panel=CAPTION_PANEL,
                         notes={"max_tokens": "Default: 600 for low nodes, 1200 for medium and high ones."})
QA_SAMPLING = Group(SamplingOptions, prefix="qa", only=("max_tokens", "system_prompt"),
                    defaults={"max_tokens": 512}, panel=QA_PANEL)
CAPTION_FILES = Group(CaptionFiles, panel=CAPTION_PANEL)
AGENT = Group(AgentOptions)
TREE = Group(TreeOptions)
# --transcribe: the speech model is a role of its own (--transcribe-model, --transcribe-base-url, ...).
TRANSCRIBE_SWITCH = Group(TranscribeSwitch, panel=TRANSCRIBE_PANEL)
TRANSCRIBE_ROLE = Group(RoleOptions, prefix="transcribe", panel=TRANSCRIBE_PANEL)
TRANSCRIBE_SETTINGS = Group(TranscribeOptions, panel=TRANSCRIBE_PANEL)
# `ask` answers about a fresh video while the user waits: keyframe sampling (see its help and
# bench/ask_cold_start.py) sends a long video's first request within seconds, not after a full decode.
ASK_TREE = Group(TreeOptions, defaults={"frame_sampling": "keyframe"})
# How a question is answered (--ground-then-answer): `ask` and `eval` take it; teacher trajectories
# and grounding queries are always navigated.
ANSWERING = Group(AnsweringOptions)


def transcription(switch: TranscribeSwitch, role: RoleOptions, settings: TranscribeOptions,
                  connection: ConnectionOptions, main=None):
    """--transcribe's Transcription (None without it; its cache_dir is the run's, set by the step).

    The speech model's backend, endpoints and key fall back to the main role's (`main`, a
    ModelSpec; none in segment) like the other roles', never its model: a speech model is
    another model. ModelError, VadUnavailable: a setting that cannot run, before any video.
    """
    from dataclasses import replace

    from ..prep.audio import VadUnavailable
    from ..prep.models import role_spec
    from ..prep.models.base import ModelError
    from ..prep.transcribe import Transcription

    if not switch.transcribe:
        return None
    spec = connection.spec(role) if main is None else \
        role_spec(main, role.backend, role.model, tuple(role.base_url), role.api_key)
    found = Transcription(replace(spec, model=role.model), settings)
    try:
        found.identity()   # fails now, not at the first video
    except (ModelError, VadUnavailable) as e:
        raise ValueError(str(e)) from None   # a usage error, one line
    return found


def navigator_options(main: RoleOptions, connection: ConnectionOptions, sampling: SamplingOptions,
                      caption: RoleOptions, caption_sampling: SamplingOptions, files: CaptionFiles, qa: RoleOptions,
                      qa_sampling: SamplingOptions, agent: AgentOptions, tree: TreeOptions,
                      switch: TranscribeSwitch = TranscribeSwitch(), speech: RoleOptions = RoleOptions(),
                      speech_settings: TranscribeOptions = TranscribeOptions(),
                      answering: AnsweringOptions = AnsweringOptions()):
    """The navigator bundle's groups -> NavigatorOptions."""
    from dataclasses import replace

    from ..infer.navigator import NavigatorOptions
    from ..prep.captioning import CaptionOptions
    from ..prep.models import resolve_roles

    roles = resolve_roles(connection.spec(main), caption, qa, captions_from_files=files.captions is not None)
    limit = caption_sampling.max_tokens
    captioning = CaptionOptions(temperature=caption_sampling.temperature) if limit is None else \
        CaptionOptions(max_tokens_low=limit, max_tokens_high=limit, temperature=caption_sampling.temperature)
    return NavigatorOptions(
        reasoning=roles.reasoning, caption=roles.caption, qa=roles.qa,
        agent=replace(agent, max_tokens=sampling.max_tokens, temperature=sampling.temperature, seed=sampling.seed),
        tree=tree, captioning=captioning, system_prompt_file=sampling.system_prompt,
        caption_prompt_file=caption_sampling.system_prompt, qa_prompt_file=qa_sampling.system_prompt,
        qa_max_tokens=qa_sampling.max_tokens, captions_dir=files.captions,
        transcription=transcription(switch, speech, speech_settings, connection, roles.reasoning),
        answering=answering)


TRANSCRIBE_GROUPS = (TRANSCRIBE_SWITCH, TRANSCRIBE_ROLE, TRANSCRIBE_SETTINGS)
NAVIGATOR = Bundle((MAIN_ROLE, CONNECTION, NAVIGATOR_SAMPLING, CAPTION_ROLE, CAPTION_SAMPLING, CAPTION_FILES, QA_ROLE,
                    QA_SAMPLING, AGENT, TREE, *TRANSCRIBE_GROUPS), build=navigator_options)
ASK_NAVIGATOR = Bundle(NAVIGATOR.groups[:9] + (ASK_TREE, *TRANSCRIBE_GROUPS), build=navigator_options)
# ... with the answering strategy, for `ask` and `eval` (`lvr ground` takes ASK_NAVIGATOR as it is).
ASK_QUESTION_NAVIGATOR = Bundle(ASK_NAVIGATOR.groups + (ANSWERING,), build=navigator_options)
EVAL_NAVIGATOR = Bundle(NAVIGATOR.groups + (ANSWERING,), build=navigator_options)


# `lvr rl` trains the reasoning model in process; it takes the other roles (or --captions, the caption
# files in place of a captioner), the tree, the prompt and the protocol.
RL_PROMPT = Group(SamplingOptions, only=("system_prompt",), panel=AGENT_PANEL)
RL_PROTOCOL = Group(AgentOptions, only=("protocol",), panel=AGENT_PANEL)
RL_ROLES = Bundle((CAPTION_ROLE, CAPTION_SAMPLING, CAPTION_FILES, QA_ROLE, QA_SAMPLING, CONNECTION, RL_PROMPT,
                   RL_PROTOCOL, TREE), build=lambda *groups: groups)


def rl_navigator_options(roles: tuple, *, model: str, max_turns: int, max_invalid: int, max_tokens: int,
                         temperature: float, seed: int | None):
    """NavigatorOptions for `lvr rl`'s rollouts: the policy in process, the other roles as given."""
    caption, caption_sampling, files, qa, qa_sampling, connection, prompt, protocol, tree = roles
    return navigator_options(
        RoleOptions(backend="transformers", model=model), connection,
        SamplingOptions(max_tokens=max_tokens, temperature=temperature, seed=seed, system_prompt=prompt.system_prompt),
        caption, caption_sampling, files, qa, qa_sampling,
        AgentOptions(max_rounds=max_turns, max_invalid=max_invalid, protocol=protocol.protocol), tree)


# The trainers' --seed is the one --seed, with the training default.
TRAINING_SEED = Group(SamplingOptions, only=("seed",), defaults={"seed": 42}, panel="Training")

# --num-processes and --accelerate-config: sft, dpo and rl start `accelerate launch` themselves.
LAUNCH = Group(LaunchSettings)


def launching(make_settings, launch: LaunchSettings, *, dry_run: bool):
    """`make_settings` for run_trainer (cli/common.py) that, once the settings are built and checked, runs
    the command again under `accelerate launch` when --num-processes or --accelerate-config ask for it and
    exits with the launcher's status; so a bad setting is told once, before any process starts. Never
    with --dry-run, nor inside a launched process (train/launch.py)."""
    import sys

    import typer
    from typer._click.globals import get_current_context  # typer vendors click

    from ..train.launch import relaunch_if_asked
    from .common import command_path, say

    def make():
        settings = make_settings()
        settings.check()
        if dry_run or not launch.wanted:
            return settings
        ctx = get_current_context()
        args = sys.argv[1:]  # the user's own words, passed on as typed
        if args[:1] != [ctx.info_name]:
            raise ValueError(f"cannot launch processes: the command line does not start with {ctx.info_name!r} "
                             f"(run `lvr {ctx.info_name} ...` or `python -m lvr.cli {ctx.info_name} ...`)")
        valued = {name for p in ctx.command.params
                  if p.param_type_name == "option" and not p.is_flag and not p.count
                  for name in p.opts + p.secondary_opts}
        status = relaunch_if_asked(launch, args, valued, log=lambda m: say(f"{command_path()}: {m}"))
        if status is not None:
            raise typer.Exit(status)
        return settings

    return make

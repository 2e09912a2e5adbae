"""`lvr vpo`: LongVPO preference triples for a vision-language model, from anchored questions and clips."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, OutputOption, QuietOption, fail_usage, say
from .model_options import CONNECTION, MAIN_ROLE
from .options import Group, takes
from .questions import WRITER_SAMPLING
from ..train.vpo_data import VPO_PANEL, VpoOptions

WRITER_PANEL = "Stage-2 writing model"


@takes(vpo=Group(VpoOptions, build=dict), main=MAIN_ROLE.with_panel(WRITER_PANEL),
       connection=CONNECTION.with_panel(WRITER_PANEL), sampling=WRITER_SAMPLING.with_panel(VPO_PANEL))
def vpo_command(
    qa: str = typer.Argument(..., metavar="QA.jsonl|-",
                             help="lvr.qa/1 questions from `lvr questions` (their anchors are the clips the "
                                  "answers come from); a file, or -."),
    output: Optional[Path] = OutputOption,
    cache_dir: Optional[Path] = CacheDirOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    vpo=None, main=None, connection=None, sampling=None,
) -> None:
    """Write LongVPO preference triples for training a vision-language model with `lvr dpo --vlm`.

    Stage 1 (--stage 1) takes each single-segment question and hides its anchor
    clip at a random position among --distractors other clips (far parts of the
    same video, and other videos), each clip shown with its video_qa frames and
    its own time labels. Chosen is the right option; rejected is the option a
    distractor clip supports, or else another option the question writer wrote.
    A distractor that looks too much like the anchor (--similarity, with
    --max-similarity) is left out, and the similarities are recorded. Stage 2
    (--stage 2) takes multi-segment questions (2-3 anchors) and has --model write,
    from the clips' captions, a chosen answer and a plausible one that rests on a
    wrong clip. Each triple is one lvr.vpo/1 record holding frame keys, not
    pixels; a rerun skips triples already written. At the end the anchors'
    positions over the whole output are tested for uniformity (chi-square).

    Exit status: 0 all done, 1 some questions failed (each named on stderr), 2 usage error.

    Examples:

      lvr segment videos/ --qa-frames -o nodes.jsonl

      lvr vpo qa.jsonl --nodes nodes.jsonl -o vpo-stage1.jsonl

      lvr vpo qa.jsonl --nodes nodes.jsonl --similarity vision --similarity-model Qwen/Qwen2.5-VL-7B-Instruct -o vpo-stage1.jsonl

      lvr vpo qa.jsonl --stage 2 --nodes nodes.jsonl --caption-records captions.jsonl --model Qwen/Qwen3-32B --base-url http://localhost:8000/v1 -o vpo-stage2.jsonl

      lvr dpo --vlm vpo-stage1.jsonl --model Qwen/Qwen2.5-VL-7B-Instruct -o vlm-vpo1
    """
    from ..prep.models.base import ModelError
    from ..train.vpo_data import VpoError, run_vpo

    try:
        options = VpoOptions(**vpo, seed=sampling.seed, temperature=sampling.temperature,
                             max_tokens=sampling.max_tokens, concurrency=connection.concurrency,
                             device=connection.device)
    except ValueError as e:
        raise fail_usage(str(e))
    model = connection.spec(main) if main.model else None
    log = (lambda msg: None) if quiet else (lambda msg: say(f"lvr vpo: {msg}"))
    try:
        summary = run_vpo(qa, output, options, model=model, cache_dir=cache_dir, log=log)
    except (VpoError, ModelError, OSError) as e:
        raise fail_usage(str(e))
    if quiet:
        for err in summary.failed:
            say(f"lvr vpo: error: {err}")
        for check in summary.positions:
            if not check["uniform"]:
                from ..train.vpo_data import describe_positions

                say(f"lvr vpo: anchor positions: {describe_positions(check)}")
    sources = ", ".join(f"{n} {s}" for s, n in sorted(summary.sources.items()))
    u = summary.usage
    tokens = (f"; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens in {u.requests} requests"
              if u.requests else "")
    say(f"lvr vpo: {summary.written} triples written (stage {options.stage}"
        + (f"; rejected: {sources}" if sources else "") + f"), {summary.skipped} already done, "
        f"{summary.excluded} look-alike distractors left out, {len(summary.failed)} failed, "
        f"{summary.not_this_stage} questions of the other stage{tokens}; {summary.seconds:.1f} s")
    raise typer.Exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)

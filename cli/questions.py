"""`lvr questions`: grounded multiple-choice questions (or grounding queries) from caption trees, filtered."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_OK, EXIT_SOME_FAILED, ConfigOption, OutputOption, QuietOption, fail_usage, say
from .model_options import CONNECTION, MAIN_ROLE
from ..infer.grounding import TaskOptions
from ..prep.models import SamplingOptions
from .options import Group, takes

QUESTIONS_PANEL = "Questions"
MODEL_PANEL = "Writing model"
FILTERS_PANEL = "Filters"
TASK = Group(TaskOptions, panel=QUESTIONS_PANEL, build=lambda v: v["task"])


# The writer samples (the filters use temperature 0); these are this command's defaults.
WRITER_SAMPLING = Group(SamplingOptions, only=("seed", "temperature", "max_tokens"),
                        defaults={"seed": 0, "temperature": 0.7, "max_tokens": 1024}, panel=QUESTIONS_PANEL)


@takes(main=MAIN_ROLE.with_panel(MODEL_PANEL), connection=CONNECTION.with_panel(MODEL_PANEL), sampling=WRITER_SAMPLING, task=TASK)
def questions_command(
    captions: str = typer.Argument(..., metavar="CAPTIONS.jsonl|-",
                                   help="lvr.caption/1 records from `lvr caption`, every level (a file, or -)."),
    output: Optional[Path] = OutputOption,
    rejected: Optional[Path] = typer.Option(None, "--rejected", metavar="FILE",
                                            help="Also write the dropped questions here, with the filter and "
                                                 "reason that dropped them (appends; a rerun skips them)."),
    video_root: Optional[Path] = typer.Option(None, "--video-root", metavar="DIR",
                                              help="Write each `video` relative to DIR (give the same DIR to "
                                                   "`lvr synthesize --video-dir`). Default: the videos' common "
                                                   "parent folder. Videos outside it are refused."),
    per_video: int = typer.Option(8, "--per-video", min=1, rich_help_panel=QUESTIONS_PANEL,
                                  help="Questions (or grounding queries) to keep per video."),
    multi_share: float = typer.Option(0.5, "--multi-share", min=0.0, max=1.0, rich_help_panel=QUESTIONS_PANEL,
                                      help="Share of them that are multi-segment (2-3 anchor leaves under "
                                           "different medium clips), or with --task grounding span queries "
                                           "(2-3 adjacent leaves); the rest are single-segment."),
    max_tries: int = typer.Option(3, "--max-tries", min=1, rich_help_panel=QUESTIONS_PANEL,
                                  help="Candidates tried per wanted question before a video is left short."),
    min_anchors: int = typer.Option(2, "--min-anchors", min=2, rich_help_panel=QUESTIONS_PANEL,
                                    help="Fewest anchor leaves of a multi-segment question or a span."),
    max_anchors: int = typer.Option(3, "--max-anchors", min=2, rich_help_panel=QUESTIONS_PANEL,
                                    help="Most anchor leaves of a multi-segment question or a span."),
    distractor_leaves: int = typer.Option(3, "--distractor-leaves", min=0, rich_help_panel=QUESTIONS_PANEL,
                                          help="Other leaves shown to the writer as sources of distractors "
                                               "(qa only)."),
    json_retries: int = typer.Option(2, "--json-retries", min=0, rich_help_panel=QUESTIONS_PANEL,
                                     help="Ask again this often when a reply is not the JSON asked for; "
                                          "then the question is named as failed."),
    specificity_k: int = typer.Option(4, "--specificity-k", min=0, rich_help_panel=FILTERS_PANEL,
                                      help="Specificity: check the question on this many lexically most "
                                           "similar non-anchor leaves (plus the anchors' look-alikes)."),
    lookalike_threshold: float = typer.Option(0.8, "--lookalike-threshold", min=0.01, max=1.0,
                                              rich_help_panel=FILTERS_PANEL,
                                              help="Leaves whose captions' TF-IDF cosine is at least this "
                                                   "are look-alikes."),
    leak_tries: int = typer.Option(1, "--leak-tries", min=1, rich_help_panel=FILTERS_PANEL,
                                   help="No leaks: drop a question the model answers right with no captions "
                                        "in each of this many tries (options rotated each try; qa only)."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    main=None, connection=None, sampling=None, task=None,
) -> None:
    """Write grounded multiple-choice questions from caption trees, for `lvr synthesize`.

    An LLM (any OpenAI-compatible model) writes single-segment questions
    anchored to one leaf clip, and multi-segment questions anchored to 2-3
    leaves under different medium clips, from the high and medium captions
    plus the anchors'. The clue intervals of each question are its anchors'
    spans. Every candidate is filtered, and each verdict and reason is kept
    in its record: look-alike leaves are never anchor and distractor of one
    question; the model must not answer it without captions (no leaks); it
    must answer it from the anchors' captions; a multi-segment question must
    need all its anchors; and no other leaf's caption alone may answer it
    (specificity, checked on the most similar leaves). Questions that pass
    are appended to -o as lvr.qa/1 records; a rerun skips finished questions.

    With --task grounding it writes grounding queries instead: each
    describes the moment of one leaf, or of a span of 2-3 adjacent leaves,
    and its target is exactly that span. They pass the look-alike,
    answerable and specificity filters (a query that another leaf would
    also fit, a look-alike above all, is dropped) and are appended as
    lvr.grounding/1 records (the native grounding file format).

    Exit status: 0 all done, 1 some videos or questions failed (each named on stderr), 2 usage error.

    Examples:

      lvr questions captions.jsonl --model Qwen/Qwen3-32B --base-url http://localhost:8000/v1 -o qa.jsonl

      lvr questions captions.jsonl --model gpt-5 --base-url https://api.openai.com/v1 --per-video 20 --multi-share 0.3 --rejected dropped.jsonl -o qa.jsonl

      lvr questions captions.jsonl --model M --base-url U --video-root ~/videos -o qa.jsonl && lvr synthesize qa.jsonl --video-dir ~/videos --model M --base-url U -o trajectories.jsonl

      lvr segment ~/videos/ | lvr caption - --model VLM --base-url U | lvr questions - --model M --base-url U -o qa.jsonl

      lvr questions captions.jsonl --task grounding --model M --base-url U --multi-share 0.3 --rejected dropped.jsonl -o grounding.jsonl
    """
    from ..prep.jsonl import RecordError
    from ..prep.models.base import ModelError
    from ..train.questions import TASK_NOUNS, QuestionOptions, QuestionsError, run_questions

    options = QuestionOptions(
        per_video=per_video, multi_share=multi_share, max_tries=max_tries, min_anchors=min_anchors,
        max_anchors=max_anchors, distractor_leaves=distractor_leaves, specificity_k=specificity_k,
        lookalike_threshold=lookalike_threshold, leak_tries=leak_tries, json_retries=json_retries,
        temperature=sampling.temperature, max_tokens=sampling.max_tokens, seed=sampling.seed, video_root=video_root,
        concurrency=connection.concurrency, task=task)
    spec = connection.spec(main)
    log = (lambda msg: None) if quiet else (lambda msg: say(f"lvr questions: {msg}"))
    try:
        summary = run_questions(captions, output, spec, options, rejected=rejected, log=log, progress=not quiet)
    except (QuestionsError, ModelError, RecordError, OSError) as e:
        raise fail_usage(str(e))
    if quiet:
        for err in summary.failed:
            say(f"lvr questions: error: {err}")
    dropped = ", ".join(f"{name} {n}" for name, n in sorted(summary.dropped.items()))
    u = summary.usage
    single, shared = options.kinds
    say(f"lvr questions: {sum(summary.written.values())} {TASK_NOUNS[options.task]} written "
        f"({summary.written[single]} single, {summary.written[shared]} {shared}), "
        f"{sum(summary.dropped.values())} dropped"
        + (f" ({dropped})" if dropped else "")
        + f", {summary.skipped} already done, {len(summary.failed)} failed; {summary.videos} videos; "
        f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens in {u.requests} requests; "
        f"{summary.seconds:.1f} s")
    raise typer.Exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)

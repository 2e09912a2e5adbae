"""`lvr eval`: answer a benchmark's questions and score them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, FormatOption, OutputOption, VideoDirOption, QuietOption, fail_usage,
                     say, say_error, tokens_phrase)
from ..infer.evaluate import EvalOptions, item_noun
from .model_options import EVAL_NAVIGATOR
from .options import Group, takes

DATA_PANEL = "Questions"
# The options EvalOptions declares as data; the command's own flags fill in the rest.
EVAL = Group(EvalOptions, only=("scoring", "task"), panel=DATA_PANEL, build=dict)


@takes(nav=EVAL_NAVIGATOR, settings=EVAL)
def eval_command(
    questions: str = typer.Argument(..., metavar="QUESTIONS|-",
                                    help="Questions with answers: native JSONL, LVBench, Video-MME (JSONL, a "
                                         "JSON list or parquet), MLVU dev, or the LongVideo-R1 flat evaluation "
                                         "lists (a file, an MLVU folder, or - for stdin); or grounding queries "
                                         "with target intervals: lvr.grounding/1, ActivityNet-Captions or "
                                         "Charades-STA JSON, CG-Bench (with --task grounding)."),
    output: Optional[Path] = OutputOption,
    summary: Optional[Path] = typer.Option(None, "--summary", metavar="FILE",
                                           help="Also write the summary record (JSON) here."),
    traces: Optional[Path] = typer.Option(None, "--traces", metavar="FILE",
                                          help="Append each question's full trace (lvr.trace/1 JSONL) here."),
    video_dir: Optional[Path] = VideoDirOption,
    format: str = FormatOption,
    subtitles: Optional[bool] = typer.Option(None, "--subtitles/--no-subtitles", rich_help_panel=DATA_PANEL,
                                             help="Show subtitles to the captioner. Video-MME requires "
                                                  "one of the two; others default to each record's setting."),
    videomme_duration: str = typer.Option("long", "--videomme-duration", rich_help_panel=DATA_PANEL,
                                          help="Video-MME subset: short, medium, long or all."),
    max_questions: Optional[int] = typer.Option(None, "--max-questions", min=1, rich_help_panel=DATA_PANEL,
                                                help="Only the first N questions."),
    question_concurrency: int = typer.Option(4, "--question-concurrency", min=1, rich_help_panel=DATA_PANEL,
                                             help="Questions answered at once."),
    cache_dir: Optional[Path] = CacheDirOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    nav=None, settings=None,
) -> None:
    """Answer a benchmark's questions (or grounding queries) by navigation, and score them.

    One lvr.eval/1 record per question is appended to the output as soon as
    it is answered, with the prediction, whether it is right, its accounting
    (rounds, captions made and reused, video_qa calls, tokens) and the exact
    settings. A rerun skips answered questions. The summary (accuracy overall
    and per category, mean rounds, caption calls against the K+K²+K³ an
    exhaustive method needs, tokens, time) covers the whole output file.
    --scoring reference scores as LongVideo-R1's eval/evaluation.py does (the
    answer text equal to the key, no answer counted as A); records and summary
    name the rule, and the summary gives the accuracy under both.

    A grounding file (told by the file, or --task grounding) holds queries answered with a
    time interval: each record has the interval, the targets and the IoU with the best
    target (0 without an answer), and the summary gives mIoU and R@0.3/0.5/0.7 overall and
    by video duration (<2min, 2-10min, 10-30min, >=30min).

    Exit status: 0 all answered, 1 some questions failed (each named on stderr), 2 usage error.

    Examples:

      lvr eval lvbench/video_info.meta.jsonl --video-dir lvbench/videos --base-url http://localhost:8000/v1 --model longvideo-r1 --caption-base-url http://localhost:8001/v1 --caption-model Qwen/Qwen2.5-VL-7B-Instruct -o lvbench.jsonl --summary lvbench.summary.json

      lvr eval videomme.jsonl --no-subtitles --video-dir videomme/data --config configs/vllm.yaml -o vmme.jsonl

      lvr eval MLVU/json --format mlvu --video-dir MLVU/video --min-width 3 --config configs/vllm.yaml -o mlvu.jsonl

      lvr eval lvbench.jsonl --scoring reference --video-dir lvbench/videos --config configs/vllm.yaml -o lvbench.jsonl

      lvr eval charades_sta_test.json --video-dir charades/videos --config configs/vllm.yaml -o charades.jsonl --summary charades.summary.json

      lvr eval cgbench.json --task grounding --video-dir cgbench/videos --config configs/vllm.yaml -o cg-grounding.jsonl

      lvr eval lvbench.json --captions lvbench/captions --video-dir lvbench/videos --base-url http://localhost:8000/v1 --model longvideor1 --qa-base-url http://localhost:8001/v1 --qa-model Qwen3-VL-32B -o lvbench.jsonl
    """
    from ..infer.benchmarks import EvalFormatError
    from ..infer.evaluate import run_eval
    from ..infer.protocol import GROUNDING
    from ..prep.cache import resolve_cache_dir
    from ..prep.models.base import ModelError
    from ..prep.progress import Reporter

    if videomme_duration not in ("short", "medium", "long", "all"):
        raise fail_usage(f"--videomme-duration takes short, medium, long or all, not {videomme_duration!r}")
    reporter = Reporter("lvr eval", enabled=not quiet)
    try:
        options = EvalOptions(format=format, subtitles=subtitles,
                              videomme_duration=None if videomme_duration == "all" else videomme_duration,
                              video_dir=video_dir, concurrency=question_concurrency, max_questions=max_questions,
                              **settings)
        result = run_eval(questions, output, nav, resolve_cache_dir(cache_dir), options, summary_path=summary,
                          traces_path=traces, log=reporter.line, reporter=reporter)
    except (ModelError, EvalFormatError, ValueError, OSError) as e:
        raise fail_usage(str(e))
    if quiet:
        for err in result.load_errors + result.failed:
            say_error(err)
    r = result.report
    counts = (f"{result.done} {item_noun(result.task)} answered now, {result.skipped} already done, "
              f"{len(result.failed)} failed, {len(result.load_errors)} bad records")
    if not r["questions"]:
        say(f"lvr eval: {counts}; nothing to score ({result.seconds:.1f} s).")
    else:
        scores = []
        if "accuracy" in r:
            scores.append(f"Accuracy ({r['scoring']} scoring) {r['correct']}/{r['tasks']['qa']} = {r['accuracy']:.1%}")
        if "grounding" in r:
            scores.append(f"Grounding {grounding_phrase(r['grounding'])} over {r['grounding']['count']} queries")
        say(f"lvr eval: {counts}. {'; '.join(scores)}; "
            f"{r['mean_rounds']:.1f} rounds and {r['mean_caption_calls']:.1f} caption calls per "
            f"{'query' if result.task == GROUNDING else 'question'} "
            f"(a full captioning would need {r['mean_exhaustive_captions']:.0f}); {tokens_phrase(r['tokens'])}; "
            f"{r['segment_seconds']:.1f} s segmenting; {result.seconds:.1f} s in all.")
    for category, c in r.get("per_category", {}).items():
        say(f"lvr eval:   {category}: {c['accuracy']:.1%} of {c['questions']}")
    for bucket, g in r.get("grounding", {}).get("by_duration", {}).items():
        say(f"lvr eval:   {bucket}: {grounding_phrase(g)} of {g['count']}")
    raise typer.Exit(EXIT_SOME_FAILED if (result.failed or result.load_errors) else EXIT_OK)


def grounding_phrase(scores: dict) -> str:
    """`mIoU 0.4639, R@0.3 66.7%, R@0.5 50.0%, R@0.7 33.3%` from a summary's grounding scores."""
    recall = ", ".join(f"{k} {v:.1%}" for k, v in scores.items() if k.startswith("R@"))
    return f"mIoU {scores['miou']:.4f}, {recall}"

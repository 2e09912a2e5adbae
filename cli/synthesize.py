"""`lvr synthesize`: teacher trajectories through the `ask` loop; lint them; export SFT data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..train.synthesize import DATA_PANEL, SynthesizeOptions
from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, DryRunOption, FormatOption,
                     NoSubtitlesOption, OutputOption, VideoDirOption,
                     QuietOption, fail_usage, naming, say, say_error)
from .model_options import NAVIGATOR
from .options import Group, takes

MODES_PANEL = "Other modes (instead of synthesizing)"


@takes(aliases={"teacher_model": "model"}, nav=NAVIGATOR,
       synthesis=Group(SynthesizeOptions, only=("accept_iou",), build=dict))
def synthesize_command(
    qa: Optional[str] = typer.Argument(None, metavar="QA.jsonl|-",
                                       help="QA items with clue intervals: native lvr.qa/1 JSONL, CG-Bench JSON, or the "
                                            "LongVideo-R1 RL rows; any of them may be parquet. A native file may also "
                                            "hold lvr.grounding/1 items, alone or mixed with QA items."),
    output: Optional[Path] = OutputOption,
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", hidden=True,
                                                help="The old name of --model (the teacher)."),
    video_dir: Optional[Path] = VideoDirOption,
    format: str = FormatOption,
    max_items: Optional[int] = typer.Option(None, "--max-items", min=1, rich_help_panel=DATA_PANEL,
                                            help="Only the first N items."),
    item_concurrency: int = typer.Option(4, "--item-concurrency", min=1, rich_help_panel=DATA_PANEL,
                                         help="Items worked on at once."),
    token_budget: Optional[int] = typer.Option(None, "--token-budget", min=1, rich_help_panel=DATA_PANEL,
                                               help="Stop starting new items once the teacher has used this "
                                                    "many tokens; items in flight finish and are written."),
    clue_gap: float = typer.Option(5.0, "--clue-gap", min=0.0, rich_help_panel=DATA_PANEL,
                                   help="Merge clue intervals less than this many seconds apart."),
    no_subtitles: bool = NoSubtitlesOption,
    price_prompt: Optional[float] = typer.Option(None, "--price-prompt", min=0.0, metavar="USD",
                                                 help="Teacher price per million prompt tokens, for the cost field."),
    price_completion: Optional[float] = typer.Option(None, "--price-completion", min=0.0, metavar="USD",
                                                     help="Teacher price per million completion tokens."),
    dry_run: bool = DryRunOption,
    lint: Optional[Path] = typer.Option(None, "--lint", metavar="FILE", rich_help_panel=MODES_PANEL,
                                        help="Check the trajectories in FILE (or the released LongVideo-R1 "
                                             "SFT data, a JSON list) against the protocol rules."),
    export_sft: Optional[Path] = typer.Option(None, "--export-sft", metavar="FILE", rich_help_panel=MODES_PANEL,
                                              help="Turn the accepted trajectories in FILE into SFT data at -o."),
    sft_format: str = typer.Option("trl", "--sft-format", rich_help_panel=MODES_PANEL,
                                   help="With --export-sft: trl (messages JSONL) or llamafactory "
                                        "(-o is a folder: sharegpt JSON plus dataset_info.json)."),
    per_turn: bool = typer.Option(False, "--per-turn", rich_help_panel=MODES_PANEL,
                                  help="With --export-sft: one sample per assistant turn."),
    export_pairs: Optional[Path] = typer.Option(None, "--export-pairs", metavar="FILE", rich_help_panel=MODES_PANEL,
                                                help="Turn the accepted trajectories in FILE into DPO preference "
                                                     "pairs at -o: each dropped wrong turn against the turn "
                                                     "accepted at the same point."),
    wrong_turns: bool = typer.Option(False, "--wrong-turns", rich_help_panel=MODES_PANEL,
                                     help="With --export-pairs: also have --model write a plausible but wrong "
                                          "turn as a rejected sample for multi-segment questions (LongVPO)."),
    wrong_turns_at: str = typer.Option("answer", "--wrong-turns-at", rich_help_panel=MODES_PANEL,
                                       help="With --wrong-turns: answer (the final turn) or all (every turn)."),
    cache_dir: Optional[Path] = CacheDirOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    nav=None, synthesis=None,
) -> None:
    """Have a teacher model write chain-of-thought tool trajectories over the caption tree.

    The teacher runs the same loop, tools and prompts as `lvr ask`. When it
    answers wrongly, that turn is dropped and a hint is shown: first the high
    clips that cover the clue, then the (high, medium) clips, then a nudge to
    verify with video_qa; after that the item is given up. Clue intervals less
    than --clue-gap seconds apart are merged. One lvr.trajectory/1 record per
    item is appended as soon as it ends; its `messages` are the clean
    conversation (no hint text), ready for SFT. A rerun skips finished items.

    Grounding items (lvr.grounding/1) are asked as grounding queries: the teacher
    answers with an interval, accepted when its IoU with the best-matching
    target is at least --accept-iou; otherwise the hints follow, built from the
    targets as a QA item's are from its clues.

    Exit status: 0 all items done, 1 some failed (each named on stderr) or lint found problems, 2 usage error.

    Examples:

      lvr synthesize cgbench.json --video-dir cgbench/videos --model gpt-5 --base-url https://api.openai.com/v1 --caption-base-url http://localhost:8001/v1 --caption-model Qwen/Qwen2.5-VL-7B-Instruct -o trajectories.jsonl

      lvr synthesize qa.jsonl --model M --base-url U --dry-run

      lvr synthesize qa.jsonl --config configs/vllm.yaml --token-budget 5000000 --max-items 500 -o trajectories.jsonl

      lvr synthesize --lint trajectories.jsonl

      lvr synthesize --lint longvideor1-sft-qwen3-llamafactory.json

      lvr synthesize --export-sft trajectories.jsonl --per-turn -o sft.jsonl

      lvr synthesize --export-sft trajectories.jsonl --sft-format llamafactory -o data/

      lvr synthesize --export-pairs trajectories.jsonl -o pairs.jsonl

      lvr synthesize --export-pairs trajectories.jsonl --wrong-turns --model M --base-url U -o pairs.jsonl
    """
    if lint is not None:
        raise typer.Exit(_lint(lint, quiet))
    if export_sft is not None:
        raise typer.Exit(_export(export_sft, output, sft_format, per_turn))
    if export_pairs is not None:
        model = None
        if wrong_turns:
            from ..prep.models.base import ModelError

            try:
                model = nav.reasoning.build()
            except ModelError as e:
                raise fail_usage(f"--wrong-turns: {e}")
        raise typer.Exit(_export_pairs(export_pairs, output, model, wrong_turns_at, nav.reasoning.concurrency,
                                       max_tokens=nav.agent.max_tokens, temperature=nav.agent.temperature,
                                       seed=nav.agent.seed))
    if qa is None:
        raise fail_usage("give a QA file (or --lint FILE / --export-sft FILE / --export-pairs FILE)")

    from ..infer.benchmarks import EvalFormatError, default_video_dir
    from ..prep.cache import resolve_cache_dir
    from ..prep.models.base import ModelError
    from ..prep.progress import Reporter
    from ..train.synthesize import estimate, load_items, run_synthesize

    reporter = Reporter("lvr synthesize", enabled=not quiet)
    try:
        options = SynthesizeOptions(format=format, video_dir=video_dir, concurrency=item_concurrency,
                                    max_items=max_items, token_budget=token_budget, clue_gap_s=clue_gap,
                                    subtitles=not no_subtitles, price_prompt_per_m=price_prompt,
                                    price_completion_per_m=price_completion, **synthesis)
        if dry_run:
            items, errors = load_items(qa, options)
            for err in errors:
                say_error(err)
            for line in estimate(items, default_video_dir(video_dir, qa), nav, options).lines():
                typer.echo(line)
            raise typer.Exit(EXIT_SOME_FAILED if errors else EXIT_OK)
        summary = run_synthesize(qa, output, nav, resolve_cache_dir(cache_dir), options, log=reporter.line,
                                 reporter=reporter)
    except (ModelError, EvalFormatError, ValueError, OSError) as e:
        raise fail_usage(str(e))
    if quiet:
        for err in summary.load_errors + summary.failed:
            say_error(err)
    t = summary.teacher
    say(f"lvr synthesize: {summary.written} trajectories written ({summary.accepted} accepted), "
        f"{summary.skipped} already done, {len(summary.failed)} failed, {len(summary.load_errors)} bad records; "
        f"the teacher used {t.prompt_tokens} prompt + {t.completion_tokens} completion tokens in {t.requests} "
        f"requests; {summary.seconds:.1f} s.")
    if summary.budget_stopped:
        say(f"lvr synthesize: token budget reached: {summary.not_started} items not started "
            f"(rerun with a larger --token-budget to go on)")
    raise typer.Exit(EXIT_SOME_FAILED if (summary.failed or summary.load_errors) else EXIT_OK)


def _lint(path: Path, quiet: bool) -> int:
    from ..train.lint import RELEASED_RULES, RULE_SETS, lint_file

    from ..infer.benchmarks import EvalFormatError

    try:
        report = lint_file(str(path))
    except (OSError, ValueError, EvalFormatError) as e:
        raise fail_usage(naming(path, str(e)))
    for line in report.lines():
        typer.echo(line)
    counts = ", ".join(f"{code} {n}" for code, n in sorted(report.counts().items())) or "no problems"
    what = "released SFT samples" if report.rules == RELEASED_RULES else "trajectories"
    say(f"lvr synthesize --lint: {report.records} {what}, {report.clean} clean; {counts}")
    say(f"lvr synthesize --lint: rules: {RULE_SETS[report.rules]}")
    if report.partial:
        say(f"lvr synthesize --lint: {report.partial_note()}")
    return EXIT_SOME_FAILED if report.issues else EXIT_OK


def _export(path: Path, output: Optional[Path], fmt: str, per_turn: bool) -> int:
    from ..prep.jsonl import RecordError, read_jsonl
    from ..train.sft_data import sft_samples, write_llamafactory, write_trl_jsonl

    if fmt not in ("trl", "llamafactory"):
        raise fail_usage(f"--sft-format takes trl or llamafactory, not {fmt!r}")
    if output is None:
        raise fail_usage("--export-sft needs -o (a file for trl, a folder for llamafactory)")
    try:
        records = [rec for _, rec in read_jsonl(str(path))]
    except (OSError, RecordError) as e:
        raise fail_usage(f"{path}: {e}")
    samples, stats = sft_samples(records, per_turn=per_turn)
    try:
        if fmt == "trl":
            write_trl_jsonl(samples, output)
            where = str(output)
        else:
            data, info = write_llamafactory(samples, output)
            where = f"{data} and {info}"
    except OSError as e:
        raise fail_usage(naming(output, str(e)))
    left_out = stats["skipped_invalid"] + stats["skipped_rejected"]
    why = "; ".join(f"{code} {n}" for code, n in stats["invalid"].items())
    say(f"lvr synthesize --export-sft: {len(samples)} {'per-turn ' if per_turn else ''}samples from "
        f"{stats['records'] - left_out} of {stats['records']} trajectories written to {where}"
        + (f"; {left_out} left out ({stats['skipped_rejected']} not accepted, {stats['skipped_invalid']} invalid"
           + (f": {why}" if why else "") + ")" if left_out else "") + ".")
    return EXIT_OK


def _export_pairs(path: Path, output: Optional[Path], model, at: str, concurrency: int, *, max_tokens: int,
                  temperature: float, seed: Optional[int]) -> int:
    from ..infer.protocol import STOP_STRINGS
    from ..prep.jsonl import RecordError, read_jsonl
    from ..prep.models.base import GenerationOptions, ModelError
    from ..train.pairs import SOURCE_DROPPED, SOURCE_WRONG, WRONG_TURN_AT, export_pairs

    if at not in WRONG_TURN_AT:
        raise fail_usage(f"--wrong-turns-at takes {' or '.join(WRONG_TURN_AT)}, not {at!r}")
    try:
        records = [rec for _, rec in read_jsonl(str(path))]
        summary = export_pairs(records, str(output) if output else None, model=model, at=at,
                               concurrency=concurrency,
                               generation=GenerationOptions(max_tokens=max_tokens, temperature=temperature,
                                                            stop=STOP_STRINGS, seed=seed))
    except (OSError, RecordError, ModelError) as e:
        raise fail_usage(f"{path}: {e}" if not isinstance(e, ModelError) else f"--wrong-turns: {e}")
    for failure in summary.failed:
        say(f"lvr synthesize --export-pairs: error: no wrong turn for {failure}")
    if summary.held_back:
        say(f"lvr synthesize --export-pairs: {len(summary.held_back)} trajectories not written for want of a wrong "
            f"turn ({', '.join(summary.held_back[:10])}{', ...' if len(summary.held_back) > 10 else ''}); "
            "rerun to try them again")
    stats = summary.stats
    made = f"{stats.pairs[SOURCE_DROPPED]} from dropped turns"
    if summary.wrong is not None:
        made += (f", {stats.pairs[SOURCE_WRONG]} LLM-written wrong turns for "
                 f"{summary.wrong.targets} turns of multi-segment questions")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped.items()))
    say(f"lvr synthesize --export-pairs: {summary.written} pairs written ({made}) from {stats.records} "
        f"trajectories ({stats.accepted} accepted"
        + (f", {summary.skipped_done} already in the output" if summary.skipped_done else "")
        + (f"; left out: {skipped}" if skipped else "") + f") -> {output or 'stdout'}")
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK

"""`lvr caption`: caption tree nodes with a vision-language model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer

from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, NoSubtitlesOption, OutputOption,
                     QuietOption, fail_usage, say)
from .model_options import CONNECTION, MAIN_ROLE
from .options import Group, takes
from ..prep.captioning import CaptionOptions
from ..prep.models import SamplingOptions

MODEL_PANEL = "Captioning model"
LEVELS = ("high", "medium", "low")


@takes(main=MAIN_ROLE.with_panel(MODEL_PANEL), connection=CONNECTION.with_panel(MODEL_PANEL),
       sampling=Group(SamplingOptions, only=("temperature", "system_prompt"), panel=MODEL_PANEL),
       limits=Group(CaptionOptions, panel=MODEL_PANEL))
def caption_command(
    nodes: str = typer.Argument(..., metavar="NODES.jsonl|-",
                                help="Node records from `lvr segment` (a file, or - for stdin)."),
    output: Optional[Path] = OutputOption,
    cache_dir: Optional[Path] = CacheDirOption,
    levels: List[str] = typer.Option(list(LEVELS), "--levels", metavar="LEVEL",
                                     help="Levels to caption: high, medium, low (repeat, or comma-separated)."),
    no_subtitles: bool = NoSubtitlesOption,
    import_longvideo_r1: Optional[Path] = typer.Option(
        None, "--import-longvideo-r1", metavar="DIR",
        help="First load LongVideo-R1 caption JSON files from DIR into the store, filed under this "
             "--model and prompt, so matching nodes need no request."),
    export_longvideo_r1: Optional[Path] = typer.Option(
        None, "--export-longvideo-r1", metavar="DIR",
        help="Afterwards write one LongVideo-R1 caption JSON per video to DIR."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    main=None, connection=None, sampling=None, limits=None,
) -> None:
    """Caption tree nodes with a vision-language model, through the shared caption store.

    Each node's sampled frames go to the model in order, each with its
    timestamp and the subtitle lines on screen. Captions are stored in one
    SQLite store under the cache directory, keyed by video, span, level,
    model, prompt hash and frame settings, so no step ever asks twice. One
    lvr.caption/1 record is appended per node; a rerun skips nodes already
    in the output.

    Exit status: 0 all nodes captioned, 1 some failed (each named on stderr), 2 usage error.

    Examples:

      lvr caption nodes.jsonl --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct -o captions.jsonl

      lvr segment movie.mp4 | lvr caption - --levels high --model ./my-qwen-vl --backend transformers

      lvr caption nodes.jsonl --model gpt-5 --base-url https://api.openai.com/v1 --concurrency 32 -o captions.jsonl

      lvr caption nodes.jsonl --model M --base-url U --export-longvideo-r1 captions_json/
    """
    from ..prep.cache import resolve_cache_dir
    from ..prep.caption_step import CaptionStepOptions, run_caption_step
    from ..prep.caption_store import CaptionStoreError
    from ..prep.captioning import CaptionError
    from ..prep.jsonl import RecordError
    from ..prep.models.base import ModelError

    chosen = tuple(dict.fromkeys(p.strip().lower() for item in levels for p in item.split(",") if p.strip()))
    bad = [lv for lv in chosen if lv not in LEVELS]
    if bad or not chosen:
        raise fail_usage(f"--levels takes high, medium and low, not {', '.join(bad) or 'nothing'}")
    options = CaptionStepOptions(
        model=connection.spec(main),
        caption=replace(limits, use_subtitles=not no_subtitles, temperature=sampling.temperature),
        levels=chosen, system_prompt_file=sampling.system_prompt,
        import_dir=import_longvideo_r1, export_dir=export_longvideo_r1,
    )
    log = (lambda msg: None) if quiet else (lambda msg: say(f"lvr caption: {msg}"))
    try:
        summary = run_caption_step(nodes, output, resolve_cache_dir(cache_dir), options,
                                   log=log, progress=not quiet)
    except (ModelError, CaptionError, CaptionStoreError, RecordError, ValueError) as e:
        raise fail_usage(str(e))  # a damaged store, a full disk, a locked output: one line
    if quiet:
        for err in summary.failed:
            say(f"lvr caption: error: {err}")
    say(f"lvr caption: {summary.made} captioned, {summary.cached} from the store, "
        f"{summary.skipped} already in the output, {len(summary.failed)} failed; "
        f"{summary.usage.prompt_tokens} prompt + {summary.usage.completion_tokens} completion tokens "
        f"in {summary.usage.requests} requests; {summary.seconds:.1f} s")
    raise typer.Exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)

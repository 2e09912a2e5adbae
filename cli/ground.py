"""`lvr ground`: find when something happens in a local video by navigating its caption tree."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, HtmlOption, NoSubtitlesOption,
                     OutputOption, QuietOption, TraceOption, VerboseOption, fail_usage, naming, navigation_summary, say,
                     say_error)
from .model_options import ASK_NAVIGATOR
from .options import takes


@takes(nav=ASK_NAVIGATOR)
def ground_command(
    video: Path = typer.Argument(..., metavar="VIDEO", help="A local video file."),
    query: str = typer.Argument(..., metavar="QUERY", help="What happens, in quotes: the moment to find."),
    clip: Optional[Path] = typer.Option(None, "--clip", metavar="OUT.mp4",
                                        help="Also cut the answered span out of the video into this file "
                                             "(re-encoded, frame-accurate, audio kept)."),
    output: Optional[Path] = OutputOption,
    trace: Optional[Path] = TraceOption,
    html: Optional[Path] = HtmlOption,
    cache_dir: Optional[Path] = CacheDirOption,
    no_subtitles: bool = NoSubtitlesOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    config: Optional[Path] = ConfigOption,
    nav=None,
) -> None:
    """Find when something happens in a local video: the answer is a time span.

    The same navigation as `lvr ask`, over the same cached tree and caption
    store: the reasoning model reads the K high-level captions, fetches medium
    and low captions or asks a vision model about a leaf, one tool per turn,
    and answers with the interval where the query happens.

    The interval goes to stdout as two numbers in square brackets, its start
    and end in seconds (e.g. `[754.5, 790]`), so scripts can read it; a
    summary (the span in clock time, rounds, captions made and reused, tokens,
    time) goes to stderr. --html draws the span on the page's timeline; --clip
    cuts it out.

    Exit status: 0 answered (and the clip written), 1 no answer or no clip, 2 usage error.

    Examples:

      lvr ground lecture.mp4 "the speaker writes the loss function on the board" --config configs/vllm.yaml

      lvr ground match.mkv "the second goal" --base-url http://localhost:8000/v1 --model Qwen/Qwen3-8B --caption-base-url http://localhost:8001/v1 --caption-model Qwen/Qwen2.5-VL-7B-Instruct --clip goal.mp4

      lvr ground meeting.mp4 "someone mentions the budget" --config configs/vllm.yaml --html trace.html -o answer.jsonl
    """
    from ..infer.ground import ground_record, ground_video
    from ..infer.navigator import stop_reason
    from ..infer.profiles import format_span
    from ..infer.protocol import format_interval
    from ..prep.cache import resolve_cache_dir
    from ..prep.jsonl import dumps, write_atomic
    from ..prep.models.base import ModelError
    from ..prep.progress import Reporter

    if not query.strip():
        raise fail_usage("the query is empty")
    if quiet and verbose:
        raise fail_usage("--quiet and --verbose cannot be used together")
    if clip is not None and video.exists() and clip.exists() and clip.samefile(video):
        raise fail_usage(f"{clip}: --clip would overwrite the video itself")
    try:
        grounded = ground_video(video, query, nav, resolve_cache_dir(cache_dir), subtitles=not no_subtitles,
                                trace_path=trace, html_path=html, clip_path=clip,
                                reporter=Reporter("lvr ground", enabled=not quiet, verbose=verbose))
        if output is not None:
            write_atomic(output, dumps(ground_record(grounded)) + "\n")
    except (ModelError, ValueError, OSError) as e:
        raise fail_usage(str(e))
    result, acc, interval = grounded.asked.result, grounded.trace["accounting"], grounded.interval
    if interval is not None:
        typer.echo(format_interval(*interval))
    if not quiet and acc:
        span = f"span {format_span(*interval)} ({interval[1] - interval[0]:.1f} s); " if interval else ""
        say(f"lvr ground: {span}{navigation_summary(acc)}")
    if interval is None:
        say_error(naming(video, stop_reason(result, nav.agent)))
        raise typer.Exit(EXIT_SOME_FAILED)
    if grounded.clip_error is not None:
        say_error(grounded.clip_error)
        raise typer.Exit(EXIT_SOME_FAILED)
    if grounded.clip is not None and not quiet:
        c = grounded.clip
        say(f"lvr ground: clip {c.path}: {c.duration:.2f} s ({format_span(c.start, c.end)}).")
    raise typer.Exit(EXIT_OK)


"""`lvr ask`: answer a question about a local video by navigating its caption tree."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, HtmlOption, NoSubtitlesOption,
                     OutputOption, QuietOption, TraceOption, VerboseOption, fail_usage, naming, navigation_summary, say,
                     say_error)
from .model_options import ASK_QUESTION_NAVIGATOR
from .options import takes


@takes(nav=ASK_QUESTION_NAVIGATOR)
def ask_command(
    video: Path = typer.Argument(..., metavar="VIDEO", help="A local video file."),
    question: str = typer.Argument(..., metavar="QUESTION", help="The question, in quotes."),
    option: List[str] = typer.Option([], "--option", "-O", metavar="TEXT",
                                     help='A multiple-choice option, e.g. "A. a red car" (repeat; '
                                          "letters are added when missing)."),
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
    """Answer a question about a local video by navigating its caption tree.

    The video is segmented once (cached under the cache directory). The
    reasoning model reads the K high-level captions, then fetches medium and
    low captions, or asks a vision model about a leaf's frames, one tool per
    turn, until it answers. Only the nodes it visits are ever captioned, and
    captions are kept in the shared store, so later questions reuse them.

    With --ground-then-answer the navigator first finds the span of the video
    that answers the question, and the video_qa model answers from up to
    --gta-frames frames of it.

    The answer goes to stdout; a summary (rounds, captions made and reused,
    tokens, time) goes to stderr. While it works, stderr shows progress: bars
    on a terminal, else one timestamped line per round (nohup, SLURM, CI).

    Exit status: 0 answered, 1 no answer (rounds ran out, or a model failed), 2 usage error.

    Examples:

      lvr ask movie.mp4 "What does the chef add last?" --base-url http://localhost:8000/v1 --model Qwen/Qwen3-8B --caption-base-url http://localhost:8001/v1 --caption-model Qwen/Qwen2.5-VL-7B-Instruct

      lvr ask talk.mkv "Which slide mentions the budget?" -O "A. the first" -O "B. the third" -O "C. the last" --model gpt-5 --base-url https://api.openai.com/v1 --html trace.html

      lvr ask clip.mp4 "Who enters the room?" --backend transformers --model ./my-navigator --caption-model ./qwen2.5-vl-3b --trace trace.jsonl

      lvr ask movie.mp4 "Where is the cat at the end?" --config configs/vllm.yaml --max-rounds 15

      lvr ask match.mp4 "Who scores the second goal?" --ground-then-answer --gta-frames 48 --config configs/vllm.yaml
    """
    from ..infer.ask import answer_record, ask_video
    from ..infer.navigator import stop_reason
    from ..infer.protocol import format_interval, normalise_options
    from ..prep.lettering import LETTERS
    from ..prep.cache import resolve_cache_dir
    from ..prep.jsonl import dumps, write_atomic
    from ..prep.models.base import ModelError
    from ..prep.progress import Reporter

    if not question.strip():
        raise fail_usage("the question is empty")
    if quiet and verbose:
        raise fail_usage("--quiet and --verbose cannot be used together")
    try:
        options = normalise_options(option)
        asked, trace = ask_video(video, question, options, nav, resolve_cache_dir(cache_dir),
                                 subtitles=not no_subtitles, trace_path=trace, html_path=html,
                                 reporter=Reporter("lvr ask", enabled=not quiet, verbose=verbose))
        if output is not None:
            write_atomic(output, dumps(answer_record(asked, trace)) + "\n")
    except (ModelError, ValueError, OSError) as e:
        raise fail_usage(str(e))
    result = asked.result
    acc = trace["accounting"]
    if result.answer is not None:
        chosen = options[LETTERS.index(result.choice)] if result.choice and result.choice in LETTERS[:len(options)] else None
        typer.echo(chosen or result.answer)
    if not quiet and acc:
        say(f"lvr ask: {navigation_summary(acc)}")
    stage = asked.answer_stage
    if not quiet and stage and stage.get("answer"):
        say(f"lvr ask: ground-then-answer: video_qa answered from {len(stage['frame_indices'])} frames of "
            f"{format_interval(*stage['interval'])} s.")
    if result.answer is None:
        say_error(naming(video, stop_reason(result, nav.agent)))
        raise typer.Exit(EXIT_SOME_FAILED)
    raise typer.Exit(EXIT_OK)

"""`lvr transcribe`: speech transcripts (and .srt files) for videos that have no subtitles."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, OutputOption, QuietOption, fail_usage, say
from .model_options import CONNECTION, MAIN_ROLE
from .options import Group, takes
from ..prep.transcribe import TranscribeOptions

MODEL_PANEL = "Speech model"


@takes(main=MAIN_ROLE.with_panel(MODEL_PANEL), connection=CONNECTION.with_panel(MODEL_PANEL),
       settings=Group(TranscribeOptions))
def transcribe_command(
    videos: List[str] = typer.Argument(..., metavar="VIDEO...",
                                       help="Video (or audio) files, directories (searched recursively) or globs."),
    output: Optional[Path] = OutputOption,
    cache_dir: Optional[Path] = CacheDirOption,
    srt: bool = typer.Option(False, "--srt", help="Also write <video name>.srt next to each video, where "
                                                  "`lvr segment` finds it; an existing file is never overwritten."),
    srt_dir: Optional[Path] = typer.Option(None, "--srt-dir", metavar="DIR",
                                           help="Write the .srt files into DIR instead (implies --srt)."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    main=None, connection=None, settings=None,
) -> None:
    """Transcribe the speech of videos with a Whisper-family model.

    Each video's first audio stream is decoded once to 16 kHz mono and heard
    in 30 s windows that overlap by 5 s; only windows where the VAD finds
    speech are sent, and the windows' segments are stitched so no word is
    lost or doubled at a border. One lvr.transcript/1 record (segments with
    start, end and text; language, model, settings) is appended per video.
    Transcripts are cached per video, model and settings under the cache
    directory, so a rerun transcribes nothing twice; a rerun over the same -o
    file skips videos already there. A video without audio gets an empty
    transcript and a note.

    Exit status: 0 all videos done, 1 some failed (each named on stderr), 2 usage error.

    Examples:

      lvr transcribe lecture.mp4 --base-url http://localhost:8000/v1 --model openai/whisper-large-v3 --srt

      lvr transcribe ~/videos/ -o transcripts.jsonl --srt-dir subs/ --backend transformers --model openai/whisper-small --device cuda

      lvr transcribe talk.mkv --model whisper-1 --base-url https://api.openai.com/v1 --language en -o talk.jsonl

      lvr transcribe clips/ --faster-whisper --model Systran/faster-whisper-small --srt
    """
    from ..prep.audio import VadUnavailable
    from ..prep.cache import resolve_cache_dir
    from ..prep.jsonl import RecordError
    from ..prep.models.base import ModelError
    from ..prep.progress import Reporter
    from ..prep.transcribe import transcribe_videos

    log = (lambda msg: None) if quiet else (lambda msg: say(f"lvr transcribe: {msg}"))
    try:
        summary = transcribe_videos(videos, output, connection.spec(main), settings, resolve_cache_dir(cache_dir),
                                    srt=srt, srt_dir=srt_dir, reporter=Reporter("lvr transcribe", enabled=not quiet),
                                    log=log)
    except (ModelError, VadUnavailable, RecordError, ValueError) as e:
        raise fail_usage(str(e))  # no model, a missing package, a locked output: one line
    if quiet:
        for err in summary.failed:  # errors are always named, even when quiet
            say(f"lvr transcribe: error: {err}")
    say(f"lvr transcribe: {summary.made} transcribed, {summary.cached} from the cache, {summary.skipped} already "
        f"in the output, {summary.no_audio} without audio, {len(summary.failed)} failed; "
        f"{summary.audio_seconds:.1f} s of audio, {summary.windows_heard} windows sent to the model; "
        f"{summary.seconds:.1f} s")
    raise typer.Exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)

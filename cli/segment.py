"""`lvr segment`: cut videos into the K / K² / K³ clip tree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer

from ..prep.segment import SegmentOptions
from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, NoSubtitlesOption, OutputOption,
                     QuietOption, fail_usage, say)
from .model_options import (CONNECTION, TRANSCRIBE_PANEL, TRANSCRIBE_ROLE, TRANSCRIBE_SETTINGS, TRANSCRIBE_SWITCH,
                            TREE, transcription)
from .options import Bundle, Group, takes

# The speech model is segment's only model: the connection settings are its own.
TRANSCRIPTION = Bundle((TRANSCRIBE_SWITCH, TRANSCRIBE_ROLE, TRANSCRIBE_SETTINGS, CONNECTION.with_panel(TRANSCRIBE_PANEL)),
                       build=transcription)


@takes(frames=Group(SegmentOptions, build=dict), tree=TREE, speech=TRANSCRIPTION)
def segment_command(
    videos: List[str] = typer.Argument(..., metavar="VIDEO...",
                                       help="Video files, directories (searched recursively) or globs."),
    output: Optional[Path] = OutputOption,
    cache_dir: Optional[Path] = CacheDirOption,
    subtitles: Optional[Path] = typer.Option(None, "--subtitles", metavar="FILE",
                                             help="Subtitle file (.srt/.vtt) for a single video. "
                                                  "Default: a sidecar next to the video, else an embedded text stream."),
    no_subtitles: bool = NoSubtitlesOption,
    clips: Optional[Path] = typer.Option(None, "--clips", metavar="DIR",
                                         help="Also write the K³ leaf clips under DIR/<video_id>/."),
    copy: bool = typer.Option(False, "--copy",
                              help="With --clips: stream copy (fast, cuts on keyframes; real cut points are recorded) "
                                   "instead of one exact re-encode pass."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    tree=None, frames=None, speech=None,
) -> None:
    """Cut videos into the hierarchical clip tree and store the frames it needs.

    Each video gets K high, K² medium and K³ low nodes. Every frame any node
    samples is decoded once, in one pass, into the frame store under the
    cache directory. One lvr.node/1 JSONL record is written per node; a video's
    records are written together, and a rerun over the same -o file skips
    videos already there. A sampled frame that does not decode is replaced by
    the nearest one of the same node that does (listed in the record's
    substituted_frames). With --transcribe, a video with no subtitles gets
    the transcript of its speech instead (made as `lvr transcribe` makes it,
    and cached with its transcripts); each record's subtitle lines say where
    they came from (source: subtitles or transcript).

    Exit status: 0 all videos done, 1 some failed (each named on stderr), 2 usage error.

    Examples:

      lvr segment movie.mp4 -o nodes.jsonl

      lvr segment ~/videos/ 'clips/*.avi' --qa-frames -o nodes.jsonl

      lvr segment talk.mkv --subtitles talk.en.srt --clips leaves/ -o talk.jsonl

      lvr segment lectures/ --transcribe --transcribe-model openai/whisper-large-v3 --transcribe-base-url http://localhost:8002/v1 -o nodes.jsonl

      lvr segment movie.mp4 --min-width 3 | jq -c 'select(.level == "high")'
    """
    from ..prep.cache import frames_dir, resolve_cache_dir
    from ..prep.frames import FrameStore
    from ..prep.jsonl import RecordError
    from ..prep.segment import segment_videos

    if subtitles is not None and len(videos) != 1:
        raise fail_usage("--subtitles names one file, so give exactly one video")
    if copy and clips is None:
        raise fail_usage("--copy only applies with --clips DIR")
    if speech is not None and no_subtitles:
        raise fail_usage("--transcribe gives subtitle lines to videos that have none; it does not go with "
                         "--no-subtitles")
    cache = resolve_cache_dir(cache_dir)
    options = SegmentOptions(tree=tree, subtitles=subtitles, use_subtitles=not no_subtitles, clips_dir=clips,
                             copy_clips=copy, transcription=replace(speech, cache_dir=cache) if speech else None,
                             **frames)
    store = FrameStore(frames_dir(cache))
    log = (lambda msg: None) if quiet else (lambda msg: say(f"lvr segment: {msg}"))
    try:
        summary = segment_videos(videos, options, store, output, log=log, progress=not quiet)
    except RecordError as e:  # the output itself is unusable (e.g. locked by another run)
        raise fail_usage(str(e))
    for err in summary.failed:
        if quiet:  # errors are always named, even when quiet
            say(f"lvr segment: error: {err}")
    say(f"lvr segment: {len(summary.done)} done, {len(summary.skipped)} skipped, "
        f"{len(summary.failed)} failed; {summary.nodes} nodes, "
        f"{summary.frames_written} frames stored, {summary.frames_cached} already cached, "
        f"{summary.frames_substituted} substituted (did not decode)")
    raise typer.Exit(EXIT_SOME_FAILED if summary.failed else EXIT_OK)

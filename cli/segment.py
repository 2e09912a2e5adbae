"""`lvr segment`: cut videos into the K / K² / K³ clip tree."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (EXIT_OK, EXIT_SOME_FAILED, CacheDirOption, ConfigOption, OutputOption,
                     QuietOption, fail_usage, say)

TREE_PANEL = "Tree shape"


def segment_command(
    videos: List[str] = typer.Argument(..., metavar="VIDEO...",
                                       help="Video files, directories (searched recursively) or globs."),
    output: Optional[Path] = OutputOption,
    cache_dir: Optional[Path] = CacheDirOption,
    qa_frames: bool = typer.Option(False, "--qa-frames/--no-qa-frames",
                                   help="Also store the frames video_qa sends for every leaf (16 at 1024 px)."),
    subtitles: Optional[Path] = typer.Option(None, "--subtitles", metavar="FILE",
                                             help="Subtitle file (.srt/.vtt) for a single video. "
                                                  "Default: a sidecar next to the video, else an embedded text stream."),
    no_subtitles: bool = typer.Option(False, "--no-subtitles", help="Ignore all subtitles."),
    clips: Optional[Path] = typer.Option(None, "--clips", metavar="DIR",
                                         help="Also write the K³ leaf clips under DIR/<video_id>/."),
    copy: bool = typer.Option(False, "--copy",
                              help="With --clips: stream copy (fast, cuts on keyframes; real cut points are recorded) "
                                   "instead of one exact re-encode pass."),
    jpeg_quality: int = typer.Option(90, "--jpeg-quality", min=1, max=100, help="JPEG quality of stored frames."),
    max_bad_frames: float = typer.Option(0.05, "--max-bad-frames", min=0.0, max=1.0, metavar="SHARE",
                                         help="Refuse a video when more than this share of its sampled frames "
                                              "do not decode (or of its frames cannot be read). Fewer are "
                                              "replaced by the nearest frame of the same node that decodes."),
    segment_seconds: float = typer.Option(16.0, "--segment-seconds", min=0.001, rich_help_panel=TREE_PANEL,
                                          help="K = clamp(round((duration / this) ** (1/3)), min, max)."),
    min_width: int = typer.Option(4, "--min-width", min=1, rich_help_panel=TREE_PANEL,
                                  help="Smallest K (MLVU used 3)."),
    max_width: int = typer.Option(8, "--max-width", min=1, rich_help_panel=TREE_PANEL, help="Largest K."),
    high_frames: int = typer.Option(128, "--high-frames", min=1, rich_help_panel=TREE_PANEL,
                                    help="Frames sampled per high node."),
    medium_frames: int = typer.Option(64, "--medium-frames", min=1, rich_help_panel=TREE_PANEL,
                                      help="Frames sampled per medium node."),
    low_frames: int = typer.Option(32, "--low-frames", min=1, rich_help_panel=TREE_PANEL,
                                   help="Frames sampled per low node."),
    qa_frame_count: int = typer.Option(16, "--qa-frame-count", min=1, rich_help_panel=TREE_PANEL,
                                       help="Frames video_qa sends per leaf."),
    caption_side: int = typer.Option(512, "--caption-side", min=1, rich_help_panel=TREE_PANEL,
                                     help="Longest image side at the low level; level s gets this/sqrt(s), s=1,2,4."),
    min_side: int = typer.Option(140, "--min-side", min=1, rich_help_panel=TREE_PANEL,
                                 help="Floor on the longest image side."),
    qa_side: int = typer.Option(1024, "--qa-side", min=1, rich_help_panel=TREE_PANEL,
                                help="Longest image side of video_qa frames."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Cut videos into the hierarchical clip tree and store the frames it needs.

    Each video gets K high, K² medium and K³ low nodes. Every frame any node
    samples is decoded once, in one pass, into the frame store under the
    cache directory. One lvr.node/1 JSONL record is written per node; a video's
    records are written together, and a rerun over the same -o file skips
    videos already there. A sampled frame that does not decode is replaced by
    the nearest one of the same node that does (listed in the record's
    substituted_frames).

    Exit status: 0 all videos done, 1 some failed (each named on stderr), 2 usage error.

    Examples:

      lvr segment movie.mp4 -o nodes.jsonl

      lvr segment ~/videos/ 'clips/*.avi' --qa-frames -o nodes.jsonl

      lvr segment talk.mkv --subtitles talk.en.srt --clips leaves/ -o talk.jsonl

      lvr segment movie.mp4 --min-width 3 | jq -c 'select(.level == "high")'
    """
    from ..prep.cache import frames_dir, resolve_cache_dir
    from ..prep.frames import FrameStore
    from ..prep.jsonl import RecordError
    from ..prep.segment import SegmentOptions, segment_videos
    from ..prep.tree import TreeOptions

    if subtitles is not None and len(videos) != 1:
        raise fail_usage("--subtitles names one file, so give exactly one video")
    if copy and clips is None:
        raise fail_usage("--copy only applies with --clips DIR")
    if min_width > max_width:
        raise fail_usage(f"--min-width {min_width} is larger than --max-width {max_width}")
    tree = TreeOptions(segment_seconds=segment_seconds, min_width=min_width, max_width=max_width,
                       high_frames=high_frames, medium_frames=medium_frames, low_frames=low_frames,
                       qa_frames=qa_frame_count, caption_side=caption_side, min_side=min_side,
                       qa_side=qa_side)
    options = SegmentOptions(tree=tree, qa_frames=qa_frames, subtitles=subtitles,
                             use_subtitles=not no_subtitles, clips_dir=clips, copy_clips=copy,
                             jpeg_quality=jpeg_quality, max_bad_frames=max_bad_frames)
    store = FrameStore(frames_dir(resolve_cache_dir(cache_dir)))
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

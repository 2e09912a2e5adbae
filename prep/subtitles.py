"""Subtitles for a video: sidecar .srt/.vtt files or the container's own text stream.

Subtitles are cheap, exact text about what is said on screen, so the tree
builder attaches them to clips. Everything here turns the many shapes that
subtitles come in into one sorted list of ``SubtitleLine`` on the video's
timeline, and answers "which lines fall in this clip" quickly.

Only the standard library is used; ffmpeg/ffprobe are called as programs (never
through a shell) for subtitles muxed into the container.
"""

from __future__ import annotations

import bisect
import html
import itertools
import json
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = [
    "SubtitleLine",
    "SubtitleError",
    "parse_srt",
    "parse_vtt",
    "read_subtitle_file",
    "find_sidecars",
    "read_embedded",
    "load_subtitles",
    "shift_lines",
    "lines_overlapping",
    "SubtitleTrack",
]

log = logging.getLogger(__name__)

SUBTITLE_EXTENSIONS = (".srt", ".vtt")

# Text codecs ffmpeg can decode and re-encode as SubRip. Bitmap codecs
# (dvd_subtitle, hdmv_pgs_subtitle, dvb_subtitle, xsub) carry pictures, not
# text, so they are never in this set and are skipped.
TEXT_SUBTITLE_CODECS = frozenset(
    {
        "subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text",
        "microdvd", "subviewer", "subviewer1", "mpl2", "pjs", "vplayer",
        "realtext", "sami", "jacosub", "stl",
    }
)

# Probing reads only the header; extraction has to demux the whole file, which
# for a multi-hour video on slow storage can take minutes.
FFPROBE_TIMEOUT_S = 60.0
FFMPEG_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SubtitleLine:
    start: float  # seconds on the video's timeline
    end: float  # seconds
    text: str  # cleaned, single-line text

    def to_record(self) -> dict:
        # Millisecond precision is all subtitle formats carry; rounding keeps
        # JSON output stable and free of float noise.
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


# Where a node's lines came from: a subtitle file or stream, or a speech transcript (`lvr transcribe`).
FROM_SUBTITLES = "subtitles"
FROM_TRANSCRIPT = "transcript"


@dataclass(frozen=True)
class SubtitleTrack:
    """A video's lines and where they came from; `transcript_id` names the transcript they are."""

    lines: Sequence[SubtitleLine] = ()
    source: str = FROM_SUBTITLES
    transcript_id: str | None = None

    def records(self, start: float, end: float) -> list[dict]:
        """The lines overlapping [start, end) as node record entries, each saying where it came from."""
        return [{**line.to_record(), "source": self.source} for line in lines_overlapping(self.lines, start, end)]


class SubtitleError(Exception):
    """A subtitle source could not be read; the message names the file and why."""


def _error(path, reason) -> SubtitleError:
    # One line, always: callers log these per video and multi-line ffmpeg
    # stderr would break log parsing.
    reason = " ".join(str(reason).split())
    return SubtitleError(f"{path}: {reason}")


# --------------------------------------------------------------------------
# Timestamps and text cleaning
# --------------------------------------------------------------------------

# Hours are optional (WebVTT allows mm:ss.ttt); the fraction may use "," (SRT)
# or "." (VTT, and many sloppy SRT files) and may be missing or short.
_TS = r"(?:(\d+):)?(\d+):(\d{1,2})(?:[.,](\d{1,3}))?"
# The lookahead stops "00:00:01,0000" from half-matching; anything after the
# second timestamp (VTT cue settings, SRT X1/Y1 coordinates) is ignored.
_TIMING_RE = re.compile(r"^\s*" + _TS + r"\s*-->\s*" + _TS + r"(?=\s|$)")


def _seconds(h, m, s, frac) -> float:
    value = int(h or 0) * 3600 + int(m) * 60 + int(s)
    if frac:
        # ".5" means half a second, not 5 ms.
        value += int(frac) / 10 ** len(frac)
    return float(value)


def _parse_timing(line: str) -> tuple[float, float] | None:
    m = _TIMING_RE.match(line)
    if m is None:
        return None
    g = m.groups()
    return _seconds(*g[0:4]), _seconds(*g[4:8])


# Ruby annotations (<rt>) are pronunciation hints, not the spoken text.
_RUBY_TEXT_RE = re.compile(r"<rt\b[^<>]*>.*?</rt\s*>", re.IGNORECASE | re.DOTALL)
# Markup tags must start with a letter (or be a VTT timestamp tag) so that a
# literal "a < b" or "<3" in dialogue survives.
_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>|<\d+(?::\d+)+(?:[.,]\d+)?>")
# ASS override blocks always begin with a backslash: {\an8}, {\i1}, {\pos(1,2)}.
_ASS_OVERRIDE_RE = re.compile(r"\{\\[^{}]*\}")
# ASS hard line break / hard space escapes.
_ASS_ESCAPE_RE = re.compile(r"\\[Nnh]")


def _clean_text(lines: Sequence[str], *, unescape: bool) -> str:
    text = "\n".join(lines)
    text = _RUBY_TEXT_RE.sub("", text)
    text = _ASS_OVERRIDE_RE.sub("", text)
    text = _ASS_ESCAPE_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    if unescape:
        # WebVTT escapes &, < and > as HTML entities; SRT has no escaping, so
        # a literal "&amp;" there is left alone.
        text = html.unescape(text)
    # str.split() also treats NBSP and other Unicode spaces as whitespace.
    return " ".join(text.split())


def _normalise_newlines(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _finish(cues: list[tuple[float, float, list[str]]], *, unescape: bool) -> list[SubtitleLine]:
    out = []
    for start, end, body in cues:
        if end < start:
            continue  # broken timing; there is no sensible place to put it
        text = _clean_text(body, unescape=unescape)
        if text:  # a cue with only markup shows nothing
            out.append(SubtitleLine(start, end, text))
    # Files are usually in order, but not always (e.g. merged tracks); the
    # overlap search relies on start order. sort() is stable for ties.
    out.sort(key=lambda line: (line.start, line.end))
    return out


# --------------------------------------------------------------------------
# SRT
# --------------------------------------------------------------------------

def _srt_cues(text: str) -> list[tuple[float, float, list[str]]]:
    """Cues as (start, end, raw text lines), found by timing line, not by index.

    Keying on the "-->" line rather than on blank-line blocks copes with
    missing index numbers, extra blank lines and missing blank lines alike.
    """
    lines = _normalise_newlines(text).split("\n")
    timings = [(i, t) for i, t in ((i, _parse_timing(l)) for i, l in enumerate(lines)) if t]
    cues = []
    for k, (i, (start, end)) in enumerate(timings):
        stop = timings[k + 1][0] if k + 1 < len(timings) else len(lines)
        body = lines[i + 1 : stop]
        while body and not body[-1].strip():
            body.pop()
        if k + 1 < len(timings) and body and body[-1].strip().isdigit():
            # The last line before the next timing line is normally the next
            # cue's index. Keep it only when it is the cue's sole text line
            # right under the timing (a cue that just says "42").
            if len(body) > 1:
                body.pop()
        cues.append((start, end, [b for b in body if b.strip()]))
    return cues


def parse_srt(text: str) -> list[SubtitleLine]:
    """Parse SubRip text into cleaned lines sorted by start time."""
    return _finish(_srt_cues(text), unescape=False)


# --------------------------------------------------------------------------
# WebVTT
# --------------------------------------------------------------------------

_VTT_SKIP_BLOCK_RE = re.compile(r"^(?:NOTE|STYLE|REGION)(?:\s|$)")


def _vtt_cues(text: str) -> list[tuple[float, float, list[str]]]:
    blocks = re.split(r"\n[ \t]*\n", _normalise_newlines(text))
    cues = []
    for block in blocks:
        lines = block.split("\n")
        timing_idx = [i for i, l in enumerate(lines) if "-->" in l and _parse_timing(l)]
        if not timing_idx:
            # Header ("WEBVTT ..."), NOTE comments, STYLE sheets, REGION
            # definitions (none may contain "-->"), or junk: nothing to show.
            continue
        # Lines before the first timing line are the header (when the blank
        # line after "WEBVTT" is missing) or the cue identifier: not text.
        # Several timing lines in one block means blank lines were lost;
        # split the block into one cue per timing line.
        for k, i in enumerate(timing_idx):
            stop = timing_idx[k + 1] if k + 1 < len(timing_idx) else len(lines)
            start, end = _parse_timing(lines[i])
            cues.append((start, end, [l for l in lines[i + 1 : stop] if l.strip()]))
    return cues


def parse_vtt(text: str) -> list[SubtitleLine]:
    """Parse WebVTT text into cleaned lines sorted by start time.

    A missing "WEBVTT" header is tolerated; NOTE, STYLE and REGION blocks,
    cue identifiers and cue settings are ignored.
    """
    return _finish(_vtt_cues(text), unescape=True)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")  # BOM picks the byte order
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Old subtitle files are mostly Windows-1252 / Latin-1. cp1252 gets curly
    # quotes right; latin-1 decodes any byte, so it is the last resort.
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _is_cueless_vtt(text: str, ext: str) -> bool:
    if ext != ".vtt" or not text.lstrip().startswith("WEBVTT"):
        return False
    blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text.strip())[1:]]
    return all(not b or _VTT_SKIP_BLOCK_RE.match(b) for b in blocks)


def read_subtitle_file(path) -> list[SubtitleLine]:
    """Read a .srt or .vtt file (by extension, case-insensitive).

    Raises SubtitleError when the file is missing or unreadable, has another
    extension, or has content but not a single cue timing line in it.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in SUBTITLE_EXTENSIONS:
        raise _error(p, f"unsupported subtitle extension {p.suffix!r} (expected .srt or .vtt)")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise _error(p, "file not found") from None
    except IsADirectoryError:
        raise _error(p, "is a directory, not a subtitle file") from None
    except OSError as exc:
        raise _error(p, f"cannot read: {exc.strerror or exc}") from None
    text = _normalise_newlines(_decode(data))
    cues = _srt_cues(text) if ext == ".srt" else _vtt_cues(text)
    if not cues:
        # An empty file, or a well-formed VTT file that has only its header
        # and NOTE/STYLE/REGION blocks, is a valid "no subtitles"; anything
        # else without a single timing line is not a subtitle file at all
        # (wrong format, binary, truncated).
        if text.strip() and not _is_cueless_vtt(text, ext):
            raise _error(p, f"no subtitle cues found in {ext[1:].upper()} file")
    return _finish(cues, unescape=(ext == ".vtt"))


def find_sidecars(video_path) -> list[Path]:
    """Subtitle files next to the video, best match first.

    ``movie.srt`` / ``movie.vtt`` come first, then tagged ones such as
    ``movie.en.srt`` or ``movie.forced.vtt``; each group is sorted by name.
    """
    video = Path(video_path)
    folder = video.parent
    stem = video.stem
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.name == video.name or entry.suffix.lower() not in SUBTITLE_EXTENSIONS:
            continue
        base = entry.name[: -len(entry.suffix)]
        if base == stem:
            rank = 0
        elif base.startswith(stem + "."):
            rank = 1
        else:
            continue
        if not entry.is_file():
            continue
        found.append((rank, entry.name.lower(), entry.name, entry))
    found.sort(key=lambda t: t[:3])
    return [t[3] for t in found]


# --------------------------------------------------------------------------
# Embedded streams
# --------------------------------------------------------------------------

def _run(cmd: list[str], video, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise _error(video, f"{cmd[0]} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise _error(video, f"{cmd[0]} timed out after {timeout:g} s") from None


def _stderr_reason(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode("utf-8", errors="replace").strip()
    first = err.splitlines()[0] if err else ""
    return f"exit code {proc.returncode}" + (f": {first}" if first else "")


def _text_stream_indices(probe: dict) -> list[int]:
    """Indices of text subtitle streams in container order, from ffprobe JSON."""
    out = []
    for stream in probe.get("streams") or []:
        if stream.get("codec_name") in TEXT_SUBTITLE_CODECS and isinstance(stream.get("index"), int):
            out.append(stream["index"])
    return out


def shift_lines(lines: list[SubtitleLine], offset: float) -> list[SubtitleLine]:
    """Lines timed from the container's start, on the video's timeline (first video frame at 0):
    `offset` (container start -> first video frame) is subtracted, lines that end before that
    frame are dropped and starts are clamped at 0."""
    if not offset:
        return list(lines)
    out = []
    for line in lines:
        start, end = line.start - offset, line.end - offset
        if end <= 0 < offset:
            continue  # entirely before the first video frame: never visible
        out.append(SubtitleLine(max(start, 0.0) if offset > 0 else start, end, line.text))
    return out


def _read_embedded(video_path, time_offset: float) -> tuple[list[SubtitleLine], int | None]:
    video = Path(video_path)
    if not video.is_file():
        raise _error(video, "video file not found")
    probe_cmd = [
        "ffprobe", "-v", "error", "-select_streams", "s",
        "-show_entries", "stream=index,codec_name", "-of", "json", str(video),
    ]
    proc = _run(probe_cmd, video, FFPROBE_TIMEOUT_S)
    if proc.returncode != 0:
        raise _error(video, f"ffprobe failed, {_stderr_reason(proc)}")
    try:
        probe = json.loads(proc.stdout.decode("utf-8", errors="replace") or "{}")
    except json.JSONDecodeError as exc:
        raise _error(video, f"ffprobe printed invalid JSON ({exc})") from None

    for index in _text_stream_indices(probe):
        # "-f srt" makes ffmpeg convert any text codec (mov_text, ASS, VTT...)
        # to SubRip, so one parser serves them all. "--" style tricks are not
        # needed: the path is one argv element and no shell is involved.
        cmd = [
            "ffmpeg", "-nostdin", "-v", "error", "-i", str(video),
            "-map", f"0:{index}", "-f", "srt", "-",
        ]
        proc = _run(cmd, video, FFMPEG_TIMEOUT_S)
        if proc.returncode != 0:
            raise _error(video, f"ffmpeg could not extract subtitle stream {index}, {_stderr_reason(proc)}")
        lines = parse_srt(proc.stdout.decode("utf-8", errors="replace"))
        if lines:
            return shift_lines(lines, time_offset), index
        # An empty track (placeholder, forced-only with nothing forced): try
        # the next text stream rather than give up.
    return [], None


def read_embedded(video_path, time_offset: float = 0.0) -> list[SubtitleLine]:
    """Lines of the first non-empty text subtitle stream muxed into the video.

    ffmpeg reports subtitle times from the container's start; ``time_offset``
    (seconds from the container start to the first video frame) is subtracted
    so the times match a timeline that starts at the first video frame. Lines
    that end before that frame are dropped and starts are clamped at 0.
    Returns [] when the container has no text subtitle stream.
    """
    return _read_embedded(video_path, time_offset)[0]


def load_subtitles(
    video_path, explicit=None, time_offset: float = 0.0
) -> tuple[list[SubtitleLine], str | None]:
    """Subtitles for a video from the best available source, and where they came from.

    Order: ``explicit`` file (errors raised), else the first sidecar that has
    any lines (a broken sidecar is logged and skipped), else the container's
    text stream. ``time_offset`` (container start -> first video frame) is
    applied to every source: players, and so subtitle authors, time sidecar
    files from the container start, just as ffmpeg does for muxed streams.
    Returns ``([], None)`` when nothing is found.
    """
    if explicit is not None:
        lines = shift_lines(read_subtitle_file(explicit), time_offset)
        return (lines, f"file:{Path(explicit).absolute()}") if lines else ([], None)

    for sidecar in find_sidecars(video_path):
        try:
            lines = shift_lines(read_subtitle_file(sidecar), time_offset)
        except SubtitleError as exc:
            log.warning("skipping sidecar subtitles: %s", exc)
            continue
        if lines:
            return lines, f"sidecar:{sidecar.absolute()}"

    lines, index = _read_embedded(video_path, time_offset)
    if not lines:
        return [], None
    return lines, f"embedded:stream {index}"


# --------------------------------------------------------------------------
# Overlap queries
# --------------------------------------------------------------------------

class _OverlapIndex:
    """Start times plus running maximum of end times, for two bisects per query.

    Starts are sorted, so ``bisect(starts, end)`` bounds the lines that begin
    before the query ends. Ends are not sorted (a long line can outlast short
    ones after it), but their running maximum is, so bisecting it finds the
    first line that could still be showing at the query start.
    """

    __slots__ = ("source", "snapshot", "lines", "starts", "max_ends")

    def __init__(self, lines: Sequence[SubtitleLine]):
        self.source = lines
        # A copy to detect in-place edits of the caller's list between calls.
        self.snapshot = list(lines)
        ordered = self.snapshot
        if any(a.start > b.start for a, b in zip(ordered, ordered[1:])):
            ordered = sorted(ordered, key=lambda line: line.start)  # tolerate unsorted input
        self.lines = ordered
        self.starts = [line.start for line in ordered]
        self.max_ends = list(itertools.accumulate((line.end for line in ordered), max))

    def valid_for(self, lines) -> bool:
        # Identity alone is not enough (the list may have been edited), and
        # list equality checks element identity first, so this is a fast
        # C-level pass rather than a rebuild.
        return lines is self.source and (isinstance(lines, tuple) or self.snapshot == lines)


# One cached index: the usual pattern is many clip queries against the same
# video's lines. Holding the list also keeps its id() from being reused.
_last_index: _OverlapIndex | None = None


def lines_overlapping(lines: Sequence[SubtitleLine], start: float, end: float) -> list[SubtitleLine]:
    """Lines with positive overlap with [start, end), in start order.

    A line qualifies when ``line.start < end and line.end > start``: a line
    that only touches the window at an endpoint does not. With start == end
    this returns the lines showing strictly around that instant.
    """
    global _last_index
    if not lines or start > end:
        return []
    index = _last_index
    if index is None or not index.valid_for(lines):
        index = _last_index = _OverlapIndex(lines)
    hi = bisect.bisect_left(index.starts, end)  # lines[:hi] start before `end`
    lo = bisect.bisect_right(index.max_ends, start)  # lines[:lo] all end by `start`
    return [line for line in index.lines[lo:hi] if line.end > start]

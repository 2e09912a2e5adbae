"""`lvr transcribe` as a library: speech transcripts for videos that have no subtitles.

For each video: find its first audio stream (none: an empty transcript and a note, not an
error), decode it once to 16 kHz mono (prep/audio.py), cut it into windows of
`chunk_seconds` that overlap by `chunk_overlap`, ask the VAD where there is speech, send
only windows with speech to the speech model (prep/models/asr.py), keep the segments that
lie where there is speech, and stitch the windows into one list of segments (`stitch`).

Transcripts are cached per video fingerprint, model and settings under
<cache>/transcripts/<video_id>/<transcript_id>.json, so nothing is transcribed twice; while a
video is being transcribed, each finished batch of windows is appended to a `.partial.jsonl`
next to it, so a killed run goes on from the last batch. One `lvr.transcript/1` record is
written per video (a rerun skips videos already in the output), and optionally a `.srt` that
`lvr segment` reads like any sidecar.

Times are seconds from the container's start, as in subtitle files. For the tree's timeline
(first video frame at 0) shift the lines the way subtitles are shifted (`time_offset`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from .. import __version__
from .audio import VAD_METHODS, AudioWindow, SpeechGate, audio_stream, audio_windows, read_audio
from .jsonl import JsonlWriter, RecordError, read_jsonl, write_atomic
from .models import ModelSpec
from .models.asr import SpeechModel, WindowTranscript, make_speech_model, most_common_language, speech_backend
from .models.base import ModelError
from .options import check_options, option
from .probe import VideoError, video_fingerprint
from .subtitles import SubtitleLine

if TYPE_CHECKING:
    from .progress import Reporter

TRANSCRIPT_SCHEMA = "lvr.transcript/1"
SOURCE_PREFIX = "transcript:"   # a transcript's `source`, beside subtitles' "sidecar:", "embedded:", "file:"
PANEL = "Transcription"
NO_AUDIO_NOTE = "no audio stream"
# Whisper's rule: a segment the model calls no speech is dropped unless it is confident in its words.
LOGPROB_FLOOR = -1.0
SPEECH_PAD_S = 0.3       # a segment must come this close to speech the VAD found (model timestamps drift)
SEAM_TOLERANCE_S = 0.05  # segments of two windows overlapping by less than this do not overlap


@dataclass(frozen=True)
class TranscribeOptions:
    """How speech becomes a transcript (the model itself: --model, --base-url, ... as elsewhere)."""

    language: str | None = option(None, "--language", metavar="CODE", panel=PANEL,
                                  help="The spoken language as a code (en, de, ...). Default: detected from the "
                                       "first speech and kept for the whole video.")
    chunk_seconds: float = option(30.0, "--chunk-seconds", min=2.0, max=30.0, panel=PANEL,
                                  help="Seconds of audio the model hears at once (Whisper hears 30).")
    chunk_overlap: float = option(5.0, "--chunk-overlap", min=0.0, metavar="SECONDS", panel=PANEL,
                                    help="Seconds each window shares with the next, so that words cut at one "
                                         "window's end are heard whole in the next; at most half a window.")
    vad: str = option("auto", "--vad", choices=VAD_METHODS, panel=PANEL,
                      help="Where to listen for speech: silero (Silero VAD: the silero-vad package, extra "
                           "`transcribe`), energy (a loudness gate: tells silence from sound, not music from speech), "
                           "none (everything), or auto (silero when installed, else energy). Windows without speech "
                           "are not sent, and text outside speech is dropped.")
    no_speech_threshold: float = option(0.6, "--no-speech-threshold", min=0.0, max=1.0, panel=PANEL,
                                        help="Drop a segment the model itself calls no speech with this probability "
                                             "or more (unless its average log-probability is above -1), where the "
                                             "backend reports it (verbose_json endpoints, faster-whisper).")
    asr_batch_size: int = option(8, "--asr-batch-size", min=1, panel=PANEL,
                                 help="In-process models: windows transcribed in one batch (endpoints send "
                                      "--concurrency at once instead).")
    faster_whisper: bool = option(False, "--faster-whisper/--no-faster-whisper", panel=PANEL,
                                  help="Run the model in process with faster-whisper (CTranslate2: the faster-whisper "
                                       "package, extra `faster-whisper`; the speech model is then a CTranslate2 Whisper, "
                                       "e.g. Systran/faster-whisper-small) instead of transformers.")

    def __post_init__(self) -> None:
        check_options(self)
        if self.chunk_overlap > self.chunk_seconds / 2:
            raise ValueError(f"--chunk-overlap must be at most half of --chunk-seconds ({self.chunk_seconds:g} s), "
                             f"not {self.chunk_overlap:g}")


# -- placing and stitching the model's segments ------------------------------------------

@dataclass(frozen=True)
class ChunkResult:
    """What one window contributes: its span and its segments, in seconds from the container's start."""

    start: float
    end: float
    segments: tuple[SubtitleLine, ...] = ()

    def to_record(self, index: int, language: str | None, heard: bool) -> dict:
        """A line of the partial file: one window done."""
        return {"index": index, "start": round(self.start, 3), "end": round(self.end, 3), "heard": heard,
                "language": language, "segments": [s.to_record() for s in self.segments]}

    @staticmethod
    def from_record(rec: dict) -> "ChunkResult":
        return ChunkResult(float(rec["start"]), float(rec["end"]),
                           tuple(SubtitleLine(float(s["start"]), float(s["end"]), str(s["text"]))
                                 for s in rec["segments"]))


def is_no_speech(no_speech_prob: float | None, avg_logprob: float | None, threshold: float) -> bool:
    """Whisper's rule for a segment the model itself calls no speech."""
    if no_speech_prob is None or no_speech_prob < threshold:
        return False
    return avg_logprob is None or avg_logprob < LOGPROB_FLOOR


def place_segments(window: AudioWindow, heard: WindowTranscript, speech: Sequence[tuple[float, float]], *,
                   no_speech_threshold: float, gated: bool) -> ChunkResult:
    """The window's segments on the container's timeline, kept inside the audio the window holds.

    A segment without an end runs to the window's end; times past the window's audio
    (models also stamp the padding up to 30 s) are cut off; empty text, segments the
    model calls no speech, and (when `gated`) segments away from any speech are dropped.
    """
    out = []
    for seg in heard.segments:
        text = " ".join(seg.text.split())
        if not text or is_no_speech(seg.no_speech_prob, seg.avg_logprob, no_speech_threshold):
            continue
        start = window.start + max(0.0, seg.start)
        end = window.end if seg.end is None else min(window.end, window.start + seg.end)
        if start >= window.end or end < start:
            continue
        if gated and not any(s < end + SPEECH_PAD_S and e > start - SPEECH_PAD_S for s, e in speech):
            continue
        out.append(SubtitleLine(start, end, text))
    out.sort(key=lambda s: (s.start, s.end))
    return ChunkResult(window.start, window.end, tuple(out))


def _overlaps(a: SubtitleLine, b: SubtitleLine) -> bool:
    return min(a.end, b.end) - max(a.start, b.start) > SEAM_TOLERANCE_S


def _seam_cost(cut: float, before: list[SubtitleLine], after: list[SubtitleLine]) -> int:
    """What cutting at `cut` costs: a segment running across the cut must be merged (1); a
    segment dropped that the other window did not hear at all loses words (2)."""
    cost = sum(1 for s in before + after if s.start < cut < s.end)
    cost += 2 * sum(1 for a in before if a.start >= cut and not any(_overlaps(a, b) for b in after))
    cost += 2 * sum(1 for b in after if b.end <= cut and not any(_overlaps(b, a) for a in before))
    return cost


def seam_cut(before: ChunkResult, after: ChunkResult) -> float:
    """Where, inside the overlap of two windows, the first window's segments give way to the second's.

    The cut goes where no segment of either window runs across it and every segment left
    out is heard by the other window too; among such places (or the least bad ones), the
    one nearest the middle of the overlap, where both windows hear best.
    """
    lo, hi = after.start, before.end
    middle = (lo + hi) / 2
    if hi <= lo:
        return middle
    near_a = [s for s in before.segments if s.end > lo]
    near_b = [s for s in after.segments if s.start < hi]
    points = sorted({lo, hi, middle, *(t for s in near_a + near_b for t in (s.start, s.end) if lo <= t <= hi)})
    candidates = points + [(x + y) / 2 for x, y in zip(points, points[1:])]
    return min(candidates, key=lambda c: (_seam_cost(c, near_a, near_b), abs(c - middle), c))


def _word(w: str) -> str:
    return re.sub(r"[^\w']", "", w.lower())


def merge_heard_twice(a: SubtitleLine, b: SubtitleLine) -> SubtitleLine | None:
    """One segment from the end of one window's segment and the start of the next window's, when
    their words overlap (the longest run of words both heard); None when they share none.

    Words after the run in `a` (cut off at its window's end) and before it in `b` (cut off at
    its window's start) are dropped: the other window heard them whole. A single shared word
    counts only when at most one word on either side is dropped for it.
    """
    wa, wb = a.text.split(), b.text.split()
    na, nb = [_word(w) for w in wa], [_word(w) for w in wb]
    best = None   # (length, i, -j): longest, then latest in a, then earliest in b
    for i in range(len(na)):
        for j in range(len(nb)):
            k = 0
            while i + k < len(na) and j + k < len(nb) and na[i + k] and na[i + k] == nb[j + k]:
                k += 1
            if k and (best is None or (k, i, -j) > best):
                best = (k, i, -j)
    if best is None:
        return None
    k, i, j = best[0], best[1], -best[2]
    if k < 2 and (len(na) - (i + k) > 1 or j > 1):
        return None
    return SubtitleLine(min(a.start, b.start), max(a.end, b.end), " ".join(wa[: i + k] + wb[j + k:]))


def stitch(chunks: Sequence[ChunkResult]) -> list[SubtitleLine]:
    """The windows' segments as one list: within each overlap the first window's segments up to
    the cut (`seam_cut`), the second's after it, and a segment both heard across the cut merged
    into one (`merge_heard_twice`), so no words are lost or doubled at a window border."""
    if not chunks:
        return []
    out = list(chunks[0].segments)
    for before, after in zip(chunks, chunks[1:]):
        cut = seam_cut(before, after)
        out = [s for s in out if s.start < cut]
        right = [s for s in after.segments if s.end > cut]
        while out and right and right[0].start < out[-1].end - SEAM_TOLERANCE_S:
            merged = merge_heard_twice(out[-1], right[0])
            if merged is None:
                break
            out[-1] = merged
            right.pop(0)
        out.extend(right)
    out.sort(key=lambda s: (s.start, s.end))
    return out


# -- .srt ---------------------------------------------------------------------------------

def srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def srt_text(lines: Iterable[SubtitleLine]) -> str:
    return "".join(f"{i}\n{srt_time(line.start)} --> {srt_time(line.end)}\n{line.text}\n\n"
                   for i, line in enumerate(lines, 1))


def srt_path(video: Path, srt_dir: Path | None) -> Path:
    """<stem>.srt next to the video (found by `lvr segment` as its sidecar), or in srt_dir."""
    return (srt_dir if srt_dir is not None else video.parent) / f"{video.stem}.srt"


def write_srt(video: Path, lines: list[SubtitleLine], srt_dir: Path | None) -> tuple[Path | None, str | None]:
    """Write the transcript's .srt; (path written or already there, a note when it was not written).

    A file that is already there with other contents (real subtitles, another model's
    transcript) is never overwritten.
    """
    if not lines:
        return None, "no speech, so no .srt"
    path = srt_path(video, srt_dir)
    text = srt_text(lines)
    if path.exists():
        try:
            same = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            return path, None
        return None, f"{path} exists and was kept (remove it, or write elsewhere with --srt-dir)"
    write_atomic(path, text)
    return path, None


# -- the cache ------------------------------------------------------------------------------

def transcripts_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "transcripts"


def transcript_settings(options: TranscribeOptions, vad_method: str) -> dict:
    """The settings that change a transcript (part of its identity); `vad_method` resolved (`resolve_vad`)."""
    o = options
    return {"language": o.language, "chunk_seconds": o.chunk_seconds, "chunk_overlap": o.chunk_overlap,
            "vad": vad_method, "no_speech_threshold": o.no_speech_threshold}


def transcript_id(video_id: str, model: str, backend: str, settings: dict) -> str:
    """The identity of a transcript: what was heard, by which model, how. Caption keys can carry it."""
    what = json.dumps({"video_id": video_id, "model": model, "backend": backend, "settings": settings},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(what.encode("utf-8")).hexdigest()[:16]


def cached_transcript_path(cache_dir: Path, video_id: str, key: str) -> Path:
    return transcripts_dir(cache_dir) / video_id / f"{key}.json"


def partial_path(cache_dir: Path, video_id: str, key: str) -> Path:
    return transcripts_dir(cache_dir) / video_id / f"{key}.partial.jsonl"


def _read_cached(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None   # absent, or damaged: made again
    return record if isinstance(record, dict) and record.get("schema") == TRANSCRIPT_SCHEMA else None


def _read_partial(path: Path) -> dict[int, "_Window"]:
    """The windows an earlier run finished, by index."""
    done: dict[int, _Window] = {}
    if not path.is_file():
        return done
    try:
        for _, rec in read_jsonl(path):
            index = int(rec["index"])
            done[index] = _Window(index, ChunkResult.from_record(rec), language=rec.get("language"),
                                  heard=bool(rec.get("heard")), resumed=True)
    except (RecordError, KeyError, TypeError, ValueError):
        pass  # a torn tail: JsonlWriter cuts it off, and those windows are heard again
    return done


# -- transcripts ----------------------------------------------------------------------------

@dataclass
class Transcript:
    """One video's transcript: its `lvr.transcript/1` record and its lines."""

    record: dict
    cached: bool = False

    @property
    def transcript_id(self) -> str:
        return self.record["transcript_id"]

    @property
    def source(self) -> str:
        return self.record["source"]

    @property
    def language(self) -> str | None:
        return self.record.get("language")

    @property
    def lines(self) -> list[SubtitleLine]:
        """The segments as subtitle lines, in seconds from the container's start (like a sidecar's)."""
        return [SubtitleLine(s["start"], s["end"], s["text"]) for s in self.record["segments"]]


@dataclass
class _Window:
    """A window read and gated: its result already (silent, or finished by an earlier run), or its
    audio and where the speech in it is, for the model to hear."""

    index: int
    result: ChunkResult | None
    audio: AudioWindow | None = None
    speech: list[tuple[float, float]] = field(default_factory=list)
    language: str | None = None
    heard: bool = False
    resumed: bool = False


def _read_batch(windows: Iterator[AudioWindow], done: dict[int, _Window], gate: SpeechGate,
                size: int) -> list[_Window]:
    """The next windows, up to `size` of them with speech to hear (runs in a worker thread)."""
    batch, to_hear = [], 0
    for window in windows:
        if window.index in done:
            batch.append(done[window.index])
            continue
        speech = gate.regions(window)
        if not speech:
            batch.append(_Window(window.index, ChunkResult(window.start, window.end)))
            continue
        batch.append(_Window(window.index, None, window, speech, heard=True))
        to_hear += 1
        if to_hear >= size:
            break
    return batch


class Transcriber:
    """Transcripts of videos by one model: each made once per video, model and settings (the
    cache), the model built and loaded the first time a video needs it.

    Use `await transcript(path)` from async code, or `transcript_for_video` for one video.
    """

    def __init__(self, spec: ModelSpec, options: TranscribeOptions, cache_dir: "str | os.PathLike", *,
                 reporter: "Reporter | None" = None, model: SpeechModel | None = None):
        self.spec = spec
        self.options = options
        self.cache_dir = Path(cache_dir)
        self.reporter = reporter
        self.backend = speech_backend(spec, faster_whisper=options.faster_whisper)  # a bad mix fails now
        self.gate = SpeechGate(options.vad)
        # Built now (cheap: a missing --model or package fails before any video); loaded on first need.
        self.model = model or make_speech_model(spec, faster_whisper=options.faster_whisper,
                                                batch_size=options.asr_batch_size)
        self.model_name = self.model.name
        self.load_failed = False
        self._loaded = False
        self._load_lock = asyncio.Lock()

    def settings(self) -> dict:
        """The settings that change a transcript (part of its identity)."""
        return transcript_settings(self.options, self.gate.method)

    def key(self, video_id: str) -> str:
        return transcript_id(video_id, self.model_name, self.backend, self.settings())

    async def loaded_model(self) -> SpeechModel:
        """The model, loaded (or its endpoint reached) the first time; a failure sets `load_failed`."""
        async with self._load_lock:
            if not self._loaded:
                try:
                    await self.model.load()
                except Exception:
                    self.load_failed = True
                    raise
                self._loaded = True
        return self.model

    async def aclose(self) -> None:
        await self.model.aclose()

    def _say(self, message: str) -> None:
        if self.reporter is not None:
            self.reporter.line(message)

    def _record(self, path: Path, video_id: str, key: str, *, segments: list[SubtitleLine], language: str | None,
                stream, duration: float, note: str | None, windows: dict) -> dict:
        return {"schema": TRANSCRIPT_SCHEMA, "video_id": video_id, "transcript_id": key, "path": str(path),
                "language": language, "model": self.model_name, "backend": self.backend,
                "settings": self.settings(), "source": SOURCE_PREFIX + self.model_name,
                "audio": stream.to_record() if stream is not None else None, "duration": round(duration, 3),
                "segments": [s.to_record() for s in segments], "windows": windows, "note": note}

    async def transcript(self, path: "str | os.PathLike", *, video_id: str | None = None) -> Transcript:
        """The video's transcript, from the cache or made now. VideoError for an unusable video;
        ModelError when the model cannot be had or its requests keep failing."""
        path = Path(path).absolute()
        if not path.is_file():
            raise VideoError(path, "no such file" if not path.exists() else "not a file")
        try:
            video_id = video_id or video_fingerprint(path)
        except OSError as e:
            raise VideoError(path, f"cannot read ({e.strerror})") from None
        key = self.key(video_id)
        cache = cached_transcript_path(self.cache_dir, video_id, key)
        cached = _read_cached(cache)
        if cached is not None:
            return Transcript({**cached, "path": str(path)}, cached=True)
        stream = audio_stream(path)
        if stream is None:
            self._say(f"note: {path}: {NO_AUDIO_NOTE}; its transcript is empty")
            record = self._record(path, video_id, key, segments=[], language=self.options.language, stream=None,
                                  duration=0.0, note=NO_AUDIO_NOTE, windows={"total": 0, "heard": 0})
        else:
            record = await self._transcribe_stream(path, video_id, key, stream)
        write_atomic(cache, json.dumps(record, ensure_ascii=False) + "\n")
        partial_path(self.cache_dir, video_id, key).unlink(missing_ok=True)
        return Transcript(record)

    async def _hear(self, todo: list[_Window], language: str | None) -> None:
        """The model hears the windows; their results are placed on the timeline."""
        if not todo:
            return
        results = await self.model.transcribe([w.audio.samples for w in todo], language)
        for window, heard in zip(todo, results):
            window.result = place_segments(window.audio, heard, window.speech,
                                           no_speech_threshold=self.options.no_speech_threshold,
                                           gated=self.gate.method != "none")
            window.language = heard.language

    async def _transcribe_stream(self, path: Path, video_id: str, key: str, stream) -> dict:
        """Decode, gate and hear the stream's windows batch by batch (the next batch is read while
        the model hears this one), each batch appended to the partial file; then stitch."""
        options = self.options
        partial = partial_path(self.cache_dir, video_id, key)
        done = _read_partial(partial)
        language = options.language or next((w.language for w in done.values() if w.language), None)
        detected = language is not None
        windows = audio_windows(read_audio(path, stream), options.chunk_seconds, options.chunk_overlap)
        read = functools.partial(_read_batch, windows, done, self.gate, self.model.batch)
        bar = self.reporter.bar(f"transcribing {path.name}", total=round(stream.duration or 0) or None,
                                unit="s", leave=False) if self.reporter is not None else None
        finished: list[_Window] = []
        try:
            with JsonlWriter(partial) as partial_out:
                batch = await asyncio.to_thread(read)
                while batch:
                    todo = [w for w in batch if w.result is None]
                    if todo:
                        await self.loaded_model()   # only a video with speech needs the model
                        if not detected:
                            language, detected = await self.model.detect_language(todo[0].audio.samples), True
                    reading = asyncio.ensure_future(asyncio.to_thread(read))
                    try:
                        await self._hear(todo, language)
                    except BaseException:
                        await asyncio.gather(reading, return_exceptions=True)  # let the reader finish first
                        raise
                    partial_out.write_unit([w.result.to_record(w.index, w.language, w.heard)
                                            for w in batch if not w.resumed])
                    finished += batch
                    if bar is not None:
                        bar.update(max(0, round(batch[-1].result.end) - bar.n))
                    batch = await reading
        finally:
            windows.close()
            if bar is not None:
                bar.close()
        chunks = [w.result for w in finished]
        reported = [WindowTranscript(language=w.language) for w in finished]
        return self._record(path, video_id, key, segments=stitch(chunks), stream=stream,
                            language=language or most_common_language(reported),
                            duration=chunks[-1].end if chunks else 0.0, note=None,
                            windows={"total": len(chunks), "heard": sum(w.heard for w in finished)})


def transcript_for_video(path: "str | os.PathLike", spec: ModelSpec, options: TranscribeOptions,
                         cache_dir: "str | os.PathLike", *, reporter: "Reporter | None" = None,
                         video_id: str | None = None) -> Transcript:
    """One video's transcript, from the cache or made now (loading the model only then).

    The integration point for steps that want speech as subtitles: `Transcript.lines` are
    SubtitleLines on the container's timeline and `Transcript.source` says they are a transcript.
    """
    async def run() -> Transcript:
        transcriber = Transcriber(spec, options, cache_dir, reporter=reporter)
        try:
            return await transcriber.transcript(path, video_id=video_id)
        finally:
            await transcriber.aclose()

    return asyncio.run(run())


# -- transcripts as subtitles (segment, ask and eval --transcribe) ---------------------------

@dataclass(frozen=True)
class TranscribeSwitch:
    """Whether steps that build trees transcribe the speech of videos that have no subtitles."""

    transcribe: bool = option(False, "--transcribe/--no-transcribe", panel=PANEL,
                              help="A video with no subtitles (no sidecar .srt/.vtt, no text stream) gets a "
                                   "transcript of its speech as its subtitle lines, made with --transcribe-model "
                                   "(as `lvr transcribe` makes it, and cached with its transcripts); a real "
                                   "subtitle file always wins.")


@dataclass(frozen=True)
class Transcription:
    """`--transcribe`: the speech model and settings that give a video without subtitles its lines.

    `cache_dir` holds the transcripts (the run's cache directory). One video at a time: each
    call loads the model only when that video's transcript is not cached yet.
    """

    spec: ModelSpec
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    cache_dir: Path | None = None

    def identity(self) -> dict:
        """What a transcript depends on besides the video (transcript_id's other inputs): trees
        and captions made from transcripts carry it. ModelError or VadUnavailable for a setting
        that cannot run, so a command can check it before any video."""
        from .audio import resolve_vad

        if not self.spec.model:
            raise ModelError("--transcribe needs --transcribe-model (a Whisper model: a name served at "
                             "--transcribe-base-url, or a Hugging Face id or local folder run in process)")
        return {"model": self.spec.model,
                "backend": speech_backend(self.spec, faster_whisper=self.options.faster_whisper),
                "settings": transcript_settings(self.options, resolve_vad(self.options.vad))}

    def transcript_of(self, path: "str | os.PathLike", video_id: str) -> Transcript:
        """The video's transcript (from the cache, or made now): its lines are on the container's timeline."""
        if self.cache_dir is None:
            raise ValueError("Transcription.cache_dir is not set")
        return transcript_for_video(path, self.spec, self.options, self.cache_dir, video_id=video_id)


# -- the batch -------------------------------------------------------------------------------

@dataclass
class TranscribeSummary:
    made: int = 0
    cached: int = 0
    skipped: int = 0
    no_audio: int = 0
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    windows_heard: int = 0
    windows: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)


def _producer(spec: ModelSpec, options: TranscribeOptions) -> dict:
    from dataclasses import asdict

    return {"tool": "lvr transcribe", "version": __version__,
            "options": {"model": spec.to_record(), "transcribe": asdict(options)}}


async def _transcribe_all(paths: list[Path], transcriber: Transcriber, writer: JsonlWriter, summary: TranscribeSummary,
                          *, srt: bool, srt_dir: Path | None, producer: dict, log) -> None:
    done = {(r.get("video_id"), r.get("transcript_id")) for r in writer.existing
            if r.get("schema") == TRANSCRIPT_SCHEMA}
    for path in paths:
        try:
            video_id = video_fingerprint(path) if path.is_file() else None
        except OSError:
            video_id = None
        if video_id is not None and (video_id, transcriber.key(video_id)) in done:
            summary.skipped += 1
            log(f"skip: {path} (already in the output)")
            continue
        started = time.perf_counter()
        try:
            transcript = await transcriber.transcript(path, video_id=video_id)
        except ModelError as e:
            if transcriber.load_failed:
                raise  # no model, no transcripts: one line for the whole batch
            summary.failed.append(f"{path}: {e}")
            log(f"error: {path}: {e}")
            continue
        except (VideoError, RecordError) as e:
            summary.failed.append(str(e))
            log(f"error: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one bad video must not end the batch
            err = VideoError(path, f"unexpected {type(e).__name__}: {e}")
            summary.failed.append(str(err))
            log(f"error: {err}")
            continue
        record = {**transcript.record, "cached": transcript.cached, "srt": None,
                  "seconds": round(time.perf_counter() - started, 3), "producer": producer}
        if srt or srt_dir is not None:
            written, note = write_srt(Path(path), transcript.lines, srt_dir)
            record["srt"] = str(written) if written is not None else None
            if note and transcript.record.get("note") is None:
                summary.notes.append(f"{path}: {note}")
                log(f"note: {path}: {note}")
        writer.write_unit([record])
        summary.records.append(record)
        summary.audio_seconds += record["duration"]
        summary.windows += record["windows"]["total"]
        if transcript.record.get("note") == NO_AUDIO_NOTE:
            summary.no_audio += 1
        if transcript.cached:
            summary.cached += 1
        else:
            summary.made += 1
            summary.windows_heard += record["windows"]["heard"]
        log(f"done: {path}: {len(record['segments'])} segments, language {record['language'] or 'unknown'}"
            f"{' (from the cache)' if transcript.cached else ''}")


def transcribe_videos(inputs: Iterable[str], output: "str | os.PathLike | None", spec: ModelSpec,
                      options: TranscribeOptions, cache_dir: "str | os.PathLike", *, srt: bool = False,
                      srt_dir: "str | os.PathLike | None" = None, reporter: "Reporter | None" = None,
                      log=lambda msg: None) -> TranscribeSummary:
    """Everything `lvr transcribe` does. Bad videos are in the summary and the batch goes on;
    a model that cannot be had raises ModelError (one line), as does a setting that cannot run
    here (VadUnavailable)."""
    from .segment import find_videos

    t0 = time.perf_counter()
    summary = TranscribeSummary()
    paths, errors = find_videos(inputs)
    for e in errors:
        summary.failed.append(str(e))
        log(f"error: {e}")
    transcriber = Transcriber(spec, options, cache_dir, reporter=reporter)

    async def run() -> None:
        try:
            with JsonlWriter(output) as writer:
                await _transcribe_all(paths, transcriber, writer, summary, srt=srt,
                                      srt_dir=Path(srt_dir) if srt_dir is not None else None,
                                      producer=_producer(spec, options), log=log)
        finally:
            await transcriber.aclose()

    asyncio.run(run())
    summary.seconds = time.perf_counter() - t0
    return summary

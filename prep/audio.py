"""A video's sound for speech recognition: 16 kHz mono float32, streamed in blocks.

The audio is decoded once, by one ffmpeg process whose output is read through a
pipe in blocks, so a two-hour track never sits in memory whole: memory holds one
block and one window (`audio_windows`), whatever the length. ffmpeg measured a
little faster than decoding with PyAV in this process (bench/transcribe.py), and it
decodes in a process of its own, beside the model.

Times are seconds from the container's start, the timeline players and subtitle
files use: `aresample=async=1:first_pts=0` pads a late-starting track and fills
gaps a damaged track leaves with silence, so sample n is at n / 16000 s.

Silence and music must not turn into invented text, so each window is first asked
where there is speech (`SpeechGate`): Silero VAD when the `silero-vad` package is
installed (`pip install 'lvr[transcribe]'`; it ships its weights and needs only
torch), else an energy gate, which tells silence from sound but not music from
speech.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import threading
import wave
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from .probe import VideoError

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE = 16000
BLOCK_S = 30.0                 # seconds of audio per pipe read
PIPE_BYTES = 1 << 20           # a larger pipe: fewer wake-ups per second of audio
VAD_METHODS = ("auto", "silero", "energy", "none")

# The energy gate: 30 ms frames louder than -45 dBFS are sound; sound closer than 0.3 s is
# one region, and regions shorter than 0.1 s are clicks.
ENERGY_FRAME_S = 0.03
ENERGY_THRESHOLD_DB = -45.0
REGION_GAP_S = 0.3
REGION_MIN_S = 0.1


@dataclass(frozen=True)
class AudioStream:
    """The audio stream a transcript is made from (the container's first)."""

    index: int                 # stream index in the container
    codec: str
    sample_rate: int
    channels: int
    duration: float | None     # seconds, as the container declares it (None: not declared)

    def to_record(self) -> dict:
        return {"index": self.index, "codec": self.codec, "sample_rate": self.sample_rate,
                "channels": self.channels,
                "duration": round(self.duration, 3) if self.duration is not None else None}


def audio_stream(path: "str | os.PathLike") -> AudioStream | None:
    """The container's first audio stream, from its header; None when it has none.

    Raises VideoError (one line) when the file cannot be opened.
    """
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises several error types
        raise VideoError(path, f"cannot open: {e}") from None
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        duration = None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000   # AV_TIME_BASE
        codec = stream.codec_context.name if stream.codec_context else "?"
        return AudioStream(index=stream.index, codec=codec, sample_rate=int(stream.sample_rate or 0),
                           channels=int(stream.channels or 0), duration=duration)
    finally:
        container.close()


def ffmpeg_audio_command(path: "str | os.PathLike", stream_index: int, sample_rate: int = SAMPLE_RATE) -> list[str]:
    """The ffmpeg command that writes one stream's sound as raw mono float32 to stdout."""
    return ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", f"0:{stream_index}",
            "-vn", "-sn", "-dn", "-af", "aresample=async=1:first_pts=0", "-ac", "1", "-ar", str(sample_rate),
            "-f", "f32le", "-"]


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass  # not Linux, or a lower limit: the default pipe works, a little slower


def read_audio(path: "str | os.PathLike", stream: AudioStream, *, sample_rate: int = SAMPLE_RATE,
               block_s: float = BLOCK_S) -> Iterator["np.ndarray"]:
    """The stream's sound as float32 mono blocks of `block_s` seconds (the last one shorter).

    Raises VideoError when ffmpeg fails. Closing the generator early stops ffmpeg.
    """
    import numpy as np

    block = max(1, round(block_s * sample_rate))
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty ffmpeg never blocks on it
        try:
            proc = subprocess.Popen(ffmpeg_audio_command(path, stream.index, sample_rate), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=errors)
        except FileNotFoundError:
            raise VideoError(path, "ffmpeg is not installed (install ffmpeg)") from None
        _grow_pipe(proc.stdout.fileno())
        try:
            while True:
                samples = np.empty(block, dtype=np.float32)
                got = proc.stdout.readinto(memoryview(samples).cast("B"))
                if not got:
                    break
                yield samples[: got // 4] if got < samples.nbytes else samples
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if code != 0:
            errors.seek(0)
            lines = errors.read().decode("utf-8", errors="replace").strip().splitlines()
            raise VideoError(path, f"ffmpeg could not decode the audio (exit code {code})"
                                   + (f": {lines[-1]}" if lines else ""))


@dataclass(frozen=True)
class AudioWindow:
    """One stretch of audio the model hears at once."""

    index: int
    start: float               # seconds from the container's start
    samples: "np.ndarray"      # float32 mono at `sample_rate`
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def end(self) -> float:
        return self.start + self.duration


def audio_windows(blocks: Iterable["np.ndarray"], window_s: float, overlap_s: float,
                  sample_rate: int = SAMPLE_RATE) -> Iterator[AudioWindow]:
    """Windows of `window_s` seconds, each starting `window_s - overlap_s` after the one before.

    The last window holds what is left (shorter); a tail that the previous window already
    covered whole gives none. Only one window and one block are in memory at a time.
    """
    import numpy as np

    size = max(1, round(window_s * sample_rate))
    overlap = min(size - 1, max(0, round(overlap_s * sample_rate)))
    hop = size - overlap
    pending = np.empty(0, dtype=np.float32)
    first = 0          # sample index of pending[0]
    index = 0
    for block in blocks:
        pending = np.concatenate([pending, block]) if len(pending) else block
        while len(pending) >= size:
            yield AudioWindow(index, first / sample_rate, pending[:size].copy(), sample_rate)
            index += 1
            pending, first = pending[hop:], first + hop
    if len(pending) > (overlap if index else 0):
        yield AudioWindow(index, first / sample_rate, pending.copy(), sample_rate)


def wav_bytes(samples: "np.ndarray", sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM mono WAV of float samples in [-1, 1]: what transcription endpoints take."""
    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


# -- where there is speech --------------------------------------------------------------

class VadUnavailable(Exception):
    """The VAD asked for cannot run here. One line saying what to install."""


def silero_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("silero_vad") is not None


def resolve_vad(method: str) -> str:
    """`auto` -> silero when the silero-vad package is installed, else energy."""
    if method not in VAD_METHODS:
        raise ValueError(f"--vad takes {', '.join(VAD_METHODS)}, not {method!r}")
    if method == "auto":
        return "silero" if silero_available() else "energy"
    if method == "silero" and not silero_available():
        raise VadUnavailable("--vad silero needs the silero-vad package: pip install 'lvr[transcribe]' "
                             "(or choose --vad energy)")
    return method


def _merge(regions: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in regions:
        if merged and start - merged[-1][1] < REGION_GAP_S:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [(s, e) for s, e in merged if e - s >= REGION_MIN_S]


def energy_regions(samples: "np.ndarray", sample_rate: int = SAMPLE_RATE) -> list[tuple[float, float]]:
    """Stretches louder than ENERGY_THRESHOLD_DB, in seconds from the start of `samples`."""
    import numpy as np

    frame = max(1, round(ENERGY_FRAME_S * sample_rate))
    n = len(samples) // frame
    if n == 0:
        return []
    frames = samples[: n * frame].astype(np.float64).reshape(n, frame)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    loud = 20.0 * np.log10(np.maximum(rms, 1e-10)) > ENERGY_THRESHOLD_DB
    regions, i = [], 0
    while i < n:
        if loud[i]:
            j = i
            while j < n and loud[j]:
                j += 1
            regions.append((i * frame / sample_rate, j * frame / sample_rate))
            i = j
        else:
            i += 1
    return _merge(regions)


class SpeechGate:
    """Where a window holds speech, by the resolved VAD method (`resolve_vad`).

    `none` answers "all of it", so the model hears every window.
    """

    _silero = None
    _silero_lock = threading.Lock()

    def __init__(self, method: str):
        self.method = resolve_vad(method)

    @classmethod
    def _silero_model(cls):
        with cls._silero_lock:  # one load per process; the model itself is small (2 MB)
            if cls._silero is None:
                from silero_vad import load_silero_vad

                cls._silero = load_silero_vad()
            return cls._silero

    def regions(self, window: AudioWindow) -> list[tuple[float, float]]:
        """Speech in the window, as (start, end) seconds from the container's start."""
        if self.method == "none":
            return [(window.start, window.end)] if len(window.samples) else []
        if self.method == "energy":
            found = energy_regions(window.samples, window.sample_rate)
        else:
            import torch
            from silero_vad import get_speech_timestamps

            model = self._silero_model()
            with self._silero_lock:  # the model keeps state between calls: one caller at a time
                stamps = get_speech_timestamps(torch.from_numpy(window.samples), model,
                                               sampling_rate=window.sample_rate, return_seconds=True)
            found = [(float(s["start"]), float(s["end"])) for s in stamps]
        return [(window.start + s, window.start + e) for s, e in found]

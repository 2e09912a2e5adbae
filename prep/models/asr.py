"""Speech models for `lvr transcribe`: the same families as the chat backends.

- ``openai``: an OpenAI-compatible ``/audio/transcriptions`` endpoint (vLLM serves Whisper there;
  so do OpenAI and ``transformers serve``), one multipart WAV upload per window, asking for
  ``verbose_json`` segments, with the chat client's retries, timeouts and base-URL rotation
  (`OpenAIEndpoint`);
- ``transformers``: a Whisper-family checkpoint in process, through transformers' ASR pipeline,
  several windows per forward pass, on ``--device``;
- faster-whisper (``--faster-whisper``, optional extra ``pip install 'lvr[faster-whisper]'``):
  a CTranslate2 Whisper in process.

`make_speech_model` is the one place a speech backend is chosen, from the same ModelSpec the
chat roles use. A backend hears windows of at most 30 s and reports segments with times from
the window's start; lvr/prep/transcribe.py places, filters and stitches them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from . import ModelSpec, resolve_backend
from .base import ModelError

if TYPE_CHECKING:
    import httpx
    import numpy as np

SAMPLE_RATE = 16000
TRANSCRIPTIONS_PATH = "/audio/transcriptions"
FASTER_WHISPER_MISSING = ("--faster-whisper needs the faster-whisper package: pip install 'lvr[faster-whisper]' "
                          "(or leave it off to run the model with transformers)")


@dataclass(frozen=True)
class HeardSegment:
    """One segment as a backend reports it, in seconds from the start of its window."""

    start: float
    end: float | None               # None: no end given (speech running on past the window)
    text: str
    no_speech_prob: float | None = None   # the model's own "this is not speech", where reported
    avg_logprob: float | None = None


@dataclass(frozen=True)
class WindowTranscript:
    segments: tuple[HeardSegment, ...] = ()
    language: str | None = None     # as the backend names it (a code, or a name such as "english")


class SpeechModel(Protocol):
    """What `lvr transcribe` needs of a speech backend."""

    name: str      # the model name recorded in transcripts
    batch: int     # windows worth handing over at once

    async def load(self) -> None:
        """Get ready (load weights, reach the endpoint); ModelError, one line, when it cannot."""

    async def detect_language(self, samples: "np.ndarray") -> str | None:
        """The language spoken in one window, where the backend can tell it apart from transcribing."""

    async def transcribe(self, windows: list["np.ndarray"], language: str | None) -> list[WindowTranscript]:
        ...

    async def aclose(self) -> None:
        ...


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def speech_backend(spec: ModelSpec, *, faster_whisper: bool = False) -> str:
    """openai, transformers or faster-whisper: the family that serves `spec`. ModelError for a bad mix."""
    kind = resolve_backend(spec.backend, list(spec.base_urls))
    if kind == "vllm":
        raise ModelError("the in-process vllm backend does not transcribe: serve the Whisper model with "
                         "`vllm serve MODEL` and pass --base-url http://HOST:8000/v1")
    if faster_whisper and kind == "openai":
        raise ModelError("--faster-whisper runs a model in process; it does not go with a base URL "
                         "(--backend openai or --base-url)")
    return "faster-whisper" if faster_whisper else kind


def make_speech_model(spec: ModelSpec, *, faster_whisper: bool = False, batch_size: int = 8) -> SpeechModel:
    """Build the speech model a step asked for. Raises ModelError with a one-line reason."""
    kind = speech_backend(spec, faster_whisper=faster_whisper)
    if not spec.model:
        raise ModelError(f"the {kind} backend needs --model (a Whisper model: a name served at --base-url, "
                         "or a Hugging Face id or local folder run in process)")
    if kind == "openai":
        return OpenAITranscriber(spec.model, list(spec.base_urls) or None, spec.api_key,
                                 concurrency=spec.concurrency, timeout_s=spec.timeout_s,
                                 max_retries=spec.max_retries)
    if kind == "faster-whisper":
        return FasterWhisper(spec.model, device=spec.device)
    return TransformersWhisper(spec.model, device=spec.device, batch_size=batch_size)


def most_common_language(results: list[WindowTranscript]) -> str | None:
    found = Counter(r.language for r in results if r.language)
    return found.most_common(1)[0][0] if found else None


# -- an OpenAI-compatible endpoint ------------------------------------------------------

def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def transcription_reply(response: "httpx.Response") -> WindowTranscript:
    """A /audio/transcriptions reply: verbose_json segments, or (a server that ignores
    response_format, as `transformers serve` does) its text as one segment running the whole
    window. Raises KeyError/TypeError/ValueError for a reply that is neither (retried)."""
    data = response.json()
    text = data["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    language = data.get("language") if isinstance(data.get("language"), str) else None
    raw = data.get("segments")
    if isinstance(raw, list) and raw:
        segments = []
        for seg in raw:
            start, end = _number(seg["start"]), _number(seg.get("end"))
            if start is None or not isinstance(seg["text"], str):
                raise TypeError("a segment without a start time or text")
            segments.append(HeardSegment(start, end, seg["text"], _number(seg.get("no_speech_prob")),
                                         _number(seg.get("avg_logprob"))))
        return WindowTranscript(tuple(segments), language)
    return WindowTranscript((HeardSegment(0.0, None, text),) if text.strip() else (), language)


class OpenAITranscriber:
    """Whisper behind OpenAI-compatible /audio/transcriptions endpoints: one WAV per window."""

    def __init__(self, model: str, base_urls: list[str] | str | None = None, api_key: str | None = None, *,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0):
        from .openai_backend import OpenAIEndpoint  # httpx, only when an endpoint is used

        self.endpoint = OpenAIEndpoint(model, base_urls, api_key, concurrency=concurrency, timeout_s=timeout_s,
                                       max_retries=max_retries, backoff_base_s=backoff_base_s,
                                       backoff_max_s=backoff_max_s)
        self.name = model
        # Twice what may be in flight: the semaphore always has a window queued while a batch's
        # slowest requests finish.
        self.batch = 2 * concurrency

    def __repr__(self) -> str:
        return self.endpoint.redact(f"OpenAITranscriber(model={self.name!r}, base_urls={self.endpoint.base_urls!r})")

    async def load(self) -> None:
        await self.endpoint.check_reachable()

    async def detect_language(self, samples: "np.ndarray") -> str | None:
        return None  # the first replies name it

    async def _one(self, samples: "np.ndarray", language: str | None) -> WindowTranscript:
        from ..audio import wav_bytes

        form = {"model": self.name, "response_format": "verbose_json", "temperature": "0"}
        if language:
            form["language"] = language
        files = {"file": ("audio.wav", wav_bytes(samples, SAMPLE_RATE), "audio/wav")}
        return await self.endpoint.post(TRANSCRIPTIONS_PATH, transcription_reply, data=form, files=files)

    async def transcribe(self, windows: list["np.ndarray"], language: str | None) -> list[WindowTranscript]:
        return list(await asyncio.gather(*(self._one(w, language) for w in windows)))

    async def aclose(self) -> None:
        await self.endpoint.aclose()


# -- in process: transformers -----------------------------------------------------------

@dataclass
class _Loaded:
    pipeline: object
    multilingual: bool
    language_of: dict = field(default_factory=dict)   # language token id -> code ("en")


class TransformersWhisper:
    """A Whisper-family checkpoint in process through transformers' ASR pipeline."""

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 8):
        self.name = model
        self.device = device
        self.batch = batch_size
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()

    def _load(self) -> _Loaded:
        with self._lock:
            if self._loaded is None:
                from transformers import pipeline

                from .transformers_backend import resolve_device_and_dtype

                device, dtype = resolve_device_and_dtype(self.device)
                try:
                    pipe = pipeline("automatic-speech-recognition", model=self.name, device=device, dtype=dtype)
                except Exception as e:  # noqa: BLE001 - any load failure is one line for the user
                    raise ModelError(f"--model {self.name}: cannot load it as a speech recognition model "
                                     f"({_one_line(e)})") from None
                gen = pipe.model.generation_config
                lang_to_id = getattr(gen, "lang_to_id", None) or {}
                self._loaded = _Loaded(pipe, bool(getattr(gen, "is_multilingual", False)) and bool(lang_to_id),
                                       {i: t.strip("<|>") for t, i in lang_to_id.items()})
            return self._loaded

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def _detect(self, samples: "np.ndarray") -> str | None:
        import torch

        loaded = self._load()
        if not loaded.multilingual:
            return None
        pipe = loaded.pipeline
        features = pipe.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = pipe.model.detect_language(features.to(pipe.model.device, pipe.model.dtype))
        return loaded.language_of.get(int(ids.reshape(-1)[0]))

    async def detect_language(self, samples: "np.ndarray") -> str | None:
        return await asyncio.to_thread(self._detect, samples)

    def _run(self, windows: list["np.ndarray"], language: str | None) -> list[WindowTranscript]:
        loaded = self._load()
        kwargs = {}
        if loaded.multilingual:  # English-only checkpoints take neither
            kwargs["generate_kwargs"] = {"task": "transcribe", **({"language": language} if language else {})}
        try:
            outputs = loaded.pipeline([{"raw": w, "sampling_rate": SAMPLE_RATE} for w in windows],
                                      batch_size=min(self.batch, len(windows)), return_timestamps=True, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"model {self.name!r} failed to transcribe: {type(e).__name__}: {_one_line(e)}") \
                from None
        return [WindowTranscript(tuple(HeardSegment(float(c["timestamp"][0] or 0.0),
                                                    None if c["timestamp"][1] is None else float(c["timestamp"][1]),
                                                    c["text"])
                                       for c in out.get("chunks") or []), language)
                for out in outputs]

    async def transcribe(self, windows: list["np.ndarray"], language: str | None) -> list[WindowTranscript]:
        return await asyncio.to_thread(self._run, windows, language)

    async def aclose(self) -> None:
        pass


# -- in process: faster-whisper ---------------------------------------------------------

class FasterWhisper:
    """A CTranslate2 Whisper in process through faster-whisper (optional extra)."""

    batch = 1

    def __init__(self, model: str, *, device: str = "auto"):
        import importlib.util

        if importlib.util.find_spec("faster_whisper") is None:
            raise ModelError(FASTER_WHISPER_MISSING)
        self.name = model
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                device, _, index = self.device.partition(":")
                try:
                    self._model = WhisperModel(self.name, device=device,
                                               device_index=int(index) if index else 0)
                except Exception as e:  # noqa: BLE001
                    raise ModelError(f"--model {self.name}: cannot load it with faster-whisper "
                                     f"({_one_line(e)})") from None
            return self._model

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    async def detect_language(self, samples: "np.ndarray") -> str | None:
        return None  # each window's transcription names it

    def _run(self, windows: list["np.ndarray"], language: str | None) -> list[WindowTranscript]:
        model = self._load()
        out = []
        for samples in windows:
            # lvr gates speech and stitches windows itself: no VAD and no carried-over text here.
            segments, info = model.transcribe(samples, language=language, vad_filter=False,
                                              condition_on_previous_text=False)
            out.append(WindowTranscript(tuple(HeardSegment(s.start, s.end, s.text, s.no_speech_prob, s.avg_logprob)
                                              for s in segments), info.language))
        return out

    async def transcribe(self, windows: list["np.ndarray"], language: str | None) -> list[WindowTranscript]:
        return await asyncio.to_thread(self._run, windows, language)

    async def aclose(self) -> None:
        pass

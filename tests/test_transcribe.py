"""`lvr transcribe`: audio extraction, speech gating, window stitching, the in-process Whisper path
(a tiny random Whisper built offline), the endpoint path (the in-test recording server and a real
`transformers serve`), the cache, .srt files read back by lvr's subtitle reader, and the edge
cases: no audio, silence, music, a two-hour track.

A random model's text is noise, so stitching is tested as a pure function on hand-made window
results; the model paths are tested for what they must guarantee whatever the text: where the
segments lie, what is sent, what is cached.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from fake_openai import FakeOpenAI, wav_seconds
from lvr_test_helpers import ServeProcess, load_jsonl, run_lvr
from synthetic_media import ffmpeg
from lvr.prep.audio import (SpeechGate, audio_stream, audio_windows, energy_regions, read_audio, silero_available,
                            wav_bytes)
from lvr.prep.models import ModelSpec
from lvr.prep.models.asr import HeardSegment, OpenAITranscriber, WindowTranscript
from lvr.prep.models.base import ModelError
from lvr.prep.subtitles import SubtitleLine, load_subtitles, read_subtitle_file
from lvr.prep.transcribe import (ChunkResult, TranscribeOptions, Transcriber, merge_heard_twice,
                                 place_segments, seam_cut, stitch)

SPEECH = ("Hello and welcome to the kitchen. Today we cook pasta with tomatoes and basil. "
          "Then we talk about the weather and the news of the day.")
FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05)


def has_flite() -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == ["flite"] for line in out.splitlines() if len(line.split()) > 1)


def make_talk_video(path: Path, seconds: float = 12.0) -> Path:
    """A grey video whose sound is synthetic speech (flite), then silence, to `seconds`."""
    if not has_flite():
        pytest.skip("this ffmpeg has no flite filter (Debian's ffmpeg has it)")
    ffmpeg("-f", "lavfi", "-i", f"flite=text='{SPEECH}':voice=slt",
           "-f", "lavfi", "-i", f"color=c=gray:s=160x90:r=10:d={seconds}",
           "-filter_complex", f"[0:a]apad=whole_dur={seconds}[a]", "-map", "1:v", "-map", "[a]",
           "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", "-t", str(seconds), str(path))
    return path


def audio_seconds(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=duration",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    return float(out.strip())


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    from tiny_whisper import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transcribe-media")


@pytest.fixture(scope="module")
def talk_video(media) -> Path:
    return make_talk_video(media / "talk.mp4")


@pytest.fixture(scope="module")
def whisper_model(tiny_whisper):
    """The tiny Whisper in process, loaded once for the module's library-level tests."""
    from lvr.prep.models.asr import TransformersWhisper

    model = TransformersWhisper(str(tiny_whisper), device="cpu", batch_size=4)
    asyncio.run(model.load())
    return model


def transcribe(path: Path, cache: Path, *, model=None, spec: ModelSpec | None = None, **options):
    async def run():
        transcriber = Transcriber(spec or ModelSpec(backend="transformers", model="unused"),
                                  TranscribeOptions(**options), cache, model=model)
        try:
            return await transcriber.transcript(path)
        finally:
            await transcriber.aclose()

    return asyncio.run(run())


# -- stitching, as a pure function ----------------------------------------------------------

def line(start: float, end: float, text: str) -> SubtitleLine:
    return SubtitleLine(start, end, text)


def words(lines: list[SubtitleLine]) -> list[str]:
    return " ".join(s.text for s in lines).split()


def test_a_segment_cut_at_a_window_end_is_kept_once_and_whole():
    # Window A (0-30 s) hears "see you tomorrow" cut off at its end; window B (25-55 s) hears it whole.
    # "right" (26-27 s) lies inside the overlap, and both heard it.
    a = ChunkResult(0, 30, (line(2, 8, "good morning everyone"), line(26, 27, "right"),
                            line(28, 30, "see you tom")))
    b = ChunkResult(25, 55, (line(26, 27, "right"), line(28, 32, "see you tomorrow"), line(40, 44, "bye now")))
    out = stitch([a, b])
    assert [s.text for s in out] == ["good morning everyone", "right", "see you tomorrow", "bye now"]
    assert out[2] == line(28, 32, "see you tomorrow")
    assert 25 < seam_cut(a, b) < 28


def test_a_segment_longer_than_the_overlap_is_merged_on_its_shared_words():
    # Speech from 20 to 35 s runs across the whole overlap (25-30 s): each window hears part of it.
    a = ChunkResult(0, 30, (line(20, 30, "the quick brown fox jumps"),))
    b = ChunkResult(25, 55, (line(25, 35, "brown fox jumps over the lazy dog"),))
    assert stitch([a, b]) == [line(20, 35, "the quick brown fox jumps over the lazy dog")]


def test_a_segment_cut_at_a_window_start_gives_way_to_the_whole_one():
    # "good evening friends" (23-27 s): A hears it whole; B, starting at 25 s, hears only its end.
    a = ChunkResult(0, 30, (line(23, 27, "good evening friends"),))
    b = ChunkResult(25, 55, (line(25, 27, "ning friends"), line(29, 31, "welcome back")))
    assert stitch([a, b]) == [line(23, 27, "good evening friends"), line(29, 31, "welcome back")]


def test_speech_only_one_window_heard_is_not_dropped():
    # The next window heard nothing (say the VAD skipped it): what A heard at its end stays.
    a = ChunkResult(0, 30, (line(10, 12, "first"), line(28, 30, "last words")))
    b = ChunkResult(25, 55, ())
    assert stitch([a, b]) == [line(10, 12, "first"), line(28, 30, "last words")]
    # ... and the same the other way round.
    c = ChunkResult(0, 30, ())
    d = ChunkResult(25, 55, (line(25, 27, "opening words"), line(40, 41, "later")))
    assert stitch([c, d]) == [line(25, 27, "opening words"), line(40, 41, "later")]


def test_three_windows_lose_and_double_no_word():
    spoken = [line(1, 4, "one two"), line(7.5, 9.5, "three four"), line(11, 13, "five six"),
              line(15.5, 17.5, "seven eight"), line(19, 23, "nine ten")]
    windows = [(0, 10), (8, 18), (16, 26)]

    def heard(lo, hi):  # what a window hears: whole segments inside it, cut ones clipped (words lost)
        out = []
        for s in spoken:
            if s.end <= lo or s.start >= hi:
                continue
            ws = s.text.split()
            if s.start < lo:
                ws = ws[1:]
            if s.end > hi:
                ws = ws[:-1]
            if ws:
                out.append(line(max(lo, s.start), min(hi, s.end), " ".join(ws)))
        return tuple(out)

    out = stitch([ChunkResult(lo, hi, heard(lo, hi)) for lo, hi in windows])
    assert words(out) == "one two three four five six seven eight nine ten".split()
    assert all(x.start <= y.start for x, y in zip(out, out[1:]))


def test_windows_without_overlap_are_joined_in_order():
    out = stitch([ChunkResult(0, 10, (line(1, 2, "a"),)), ChunkResult(10, 20, (line(12, 13, "b"),)),
                  ChunkResult(20, 25, ())])
    assert [s.text for s in out] == ["a", "b"]
    assert stitch([]) == []


def test_one_shared_word_merges_only_at_the_seam():
    # "the" is shared, but taking it would drop three words on one side: kept apart.
    assert merge_heard_twice(line(0, 5, "we saw the red car today"), line(4, 9, "the end came soon")) is None
    assert merge_heard_twice(line(0, 5, "we saw the"), line(4, 9, "the end")) == line(0, 9, "we saw the end")
    assert merge_heard_twice(line(0, 5, "alpha beta"), line(4, 9, "gamma delta")) is None


def test_an_srt_is_written_once_and_never_over_other_subtitles(tmp_path):
    from lvr.prep.transcribe import write_srt

    video = tmp_path / "film.mkv"
    lines = [line(1.5, 3.25, "first words"), line(3661.0, 3662.5, "an hour later")]
    assert write_srt(video, lines, None) == (tmp_path / "film.srt", None)
    assert (tmp_path / "film.srt").read_text() == ("1\n00:00:01,500 --> 00:00:03,250\nfirst words\n\n"
                                                  "2\n01:01:01,000 --> 01:01:02,500\nan hour later\n\n")
    assert write_srt(video, lines, None) == (tmp_path / "film.srt", None)       # the same text again: fine
    written, note = write_srt(video, lines[:1], None)                          # other text: kept as it is
    assert written is None and "exists and was kept" in note
    assert read_subtitle_file(tmp_path / "film.srt") == lines
    assert write_srt(video, lines, tmp_path / "subs") == (tmp_path / "subs" / "film.srt", None)
    assert write_srt(video, [], None) == (None, "no speech, so no .srt")


def test_settings_and_models_are_checked_before_any_video(tmp_path):
    with pytest.raises(ValueError, match="--chunk-overlap must be at most half of --chunk-seconds"):
        TranscribeOptions(chunk_seconds=10, chunk_overlap=6)
    with pytest.raises(ValueError, match="--vad takes"):
        TranscribeOptions(vad="loud")
    with pytest.raises(ModelError, match="needs --model"):
        Transcriber(ModelSpec(backend="transformers"), TranscribeOptions(vad="energy"), tmp_path)
    with pytest.raises(ModelError, match="does not transcribe"):
        Transcriber(ModelSpec(backend="vllm", model="m"), TranscribeOptions(vad="energy"), tmp_path)
    with pytest.raises(ModelError, match="does not go with a base URL"):
        Transcriber(ModelSpec(backend="auto", model="m", base_urls=("http://x/v1",)),
                    TranscribeOptions(vad="energy", faster_whisper=True), tmp_path)


# -- placing a window's segments -------------------------------------------------------------

def window_of(start: float, seconds: float):
    from lvr.prep.audio import AudioWindow

    return AudioWindow(0, start, np.zeros(round(seconds * 16000), dtype=np.float32))


def test_segments_are_placed_inside_the_window_and_where_there_is_speech():
    window = window_of(100.0, 20.0)     # 100 s to 120 s, of which speech from 101 to 110
    heard = WindowTranscript((
        HeardSegment(1.0, 4.0, "  kept   words "),
        HeardSegment(5.0, None, "no end given"),               # runs to the window's end
        HeardSegment(8.0, 29.5, "past the audio"),             # cut at 120 s
        HeardSegment(25.0, 29.0, "in the padding"),            # beyond the audio: dropped
        HeardSegment(6.0, 7.0, ""),                            # no text: dropped
        HeardSegment(2.0, 3.0, "the model says silence", no_speech_prob=0.9, avg_logprob=-1.5),
        HeardSegment(2.5, 3.5, "confident words", no_speech_prob=0.9, avg_logprob=-0.3),
        HeardSegment(15.0, 18.0, "where nobody speaks"),         # outside the speech the VAD found
    ))
    result = place_segments(window, heard, [(101.0, 110.0)], no_speech_threshold=0.6, gated=True)
    assert (result.start, result.end) == (100.0, 120.0)
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (101.0, 104.0, "kept words"), (102.5, 103.5, "confident words"), (105.0, 120.0, "no end given"),
        (108.0, 120.0, "past the audio")]
    ungated = place_segments(window, heard, [], no_speech_threshold=0.6, gated=False)
    assert "where nobody speaks" in [s.text for s in ungated.segments]


# -- audio -----------------------------------------------------------------------------------

def test_windows_cover_the_track_with_the_asked_overlap():
    blocks = [np.arange(n, dtype=np.float32) for n in (7000, 16000 * 3, 9000)]   # 4.0 s in odd blocks
    total = sum(len(b) for b in blocks)
    windows = list(audio_windows(iter(blocks), 1.5, 0.5))
    assert [w.start for w in windows] == [0.0, 1.0, 2.0, 3.0]
    assert [w.index for w in windows] == [0, 1, 2, 3]
    assert [len(w.samples) for w in windows] == [24000, 24000, 24000, total - 48000]
    joined = np.concatenate([windows[0].samples] + [w.samples[8000:] for w in windows[1:]])
    assert np.array_equal(joined, np.concatenate(blocks))
    # A tail the last full window already holds gives no window; a short track gives one.
    assert len(list(audio_windows(iter([np.zeros(40000, np.float32)]), 1.5, 0.5))) == 2
    assert [len(w.samples) for w in audio_windows(iter([np.zeros(100, np.float32)]), 1.5, 0.5)] == [100]


def test_audio_is_read_at_16k_mono_on_the_container_timeline(media):
    path = media / "late_tone.mkv"
    # 2 s of stereo 44.1 kHz tone whose stream starts 0.5 s after the video's.
    ffmpeg("-f", "lavfi", "-i", "color=c=black:s=64x64:r=10:d=3", "-itsoffset", "0.5", "-f", "lavfi",
           "-i", "sine=f=1000:sample_rate=44100:d=2,aformat=channel_layouts=stereo",
           "-c:v", "libx264", "-c:a", "pcm_s16le", str(path))
    stream = audio_stream(path)
    assert stream is not None and stream.channels == 2 and stream.sample_rate == 44100
    samples = np.concatenate(list(read_audio(path, stream, block_s=0.3)))
    assert abs(len(samples) / 16000 - 2.5) < 0.05
    loud = energy_regions(samples)
    assert len(loud) == 1 and abs(loud[0][0] - 0.5) < 0.05 and abs(loud[0][1] - 2.5) < 0.05


def test_wav_upload_holds_the_window(tmp_path):
    samples = np.sin(np.arange(16000 * 2) / 5).astype(np.float32) * 0.5
    data = wav_bytes(samples)
    assert wav_seconds(data) == 2.0
    (tmp_path / "x.wav").write_bytes(data)
    with wave.open(str(tmp_path / "x.wav")) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 16000, 2)
        back = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767.0
    assert np.abs(back - samples).max() < 1e-4


@pytest.mark.skipif(not silero_available(), reason="silero-vad is not installed (pip install -e .[dev])")
def test_silero_hears_speech_not_music_nor_noise(talk_video, media):
    stream = audio_stream(talk_video)
    window = next(audio_windows(read_audio(talk_video, stream), 30, 5))
    gate = SpeechGate("auto")
    assert gate.method == "silero"
    speech = gate.regions(window)
    assert speech and speech[0][0] < 1.0 and 5.0 < speech[-1][1] < 12.0
    music = media / "music.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=f=261.6:d=8", "-f", "lavfi", "-i", "sine=f=329.6:d=8", "-f", "lavfi",
           "-i", "sine=f=392:d=8", "-filter_complex", "amix=inputs=3,tremolo=f=2", str(music))
    noise = media / "noise.wav"
    ffmpeg("-f", "lavfi", "-i", "anoisesrc=d=8:c=pink:a=0.1", str(noise))
    for path in (music, noise):
        w = next(audio_windows(read_audio(path, audio_stream(path)), 30, 5))
        assert energy_regions(w.samples), path.name   # loud: the energy gate would let it through
        assert gate.regions(w) == [], path.name


# -- the in-process Whisper ----------------------------------------------------------------------

def check_segments(record: dict, seconds: float) -> None:
    segments = record["segments"]
    assert segments, "the tiny model said nothing at all"
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts)
    for s in segments:
        assert 0.0 <= s["start"] <= s["end"] <= seconds + 0.05, s
        assert s["text"].strip()


def test_transcribe_end_to_end(tiny_whisper, talk_video, tmp_path):
    video = tmp_path / "talk.mp4"
    shutil.copy(talk_video, video)
    cache, out = tmp_path / "cache", tmp_path / "transcripts.jsonl"
    flags = ["--backend", "transformers", "--model", tiny_whisper, "--device", "cpu", "--cache-dir", cache,
             "--chunk-seconds", "6", "--chunk-overlap", "2", "--vad", "energy", "--srt"]
    proc = run_lvr("transcribe", video, "-o", out, *flags)
    assert proc.returncode == 0, proc.stderr
    assert "1 transcribed, 0 from the cache" in proc.stderr
    [record] = load_jsonl(out)
    assert record["schema"] == "lvr.transcript/1" and record["path"] == str(video)
    assert record["model"] == str(tiny_whisper) and record["backend"] == "transformers"
    assert record["source"] == f"transcript:{tiny_whisper}"
    assert record["settings"] == {"language": None, "chunk_seconds": 6.0, "chunk_overlap": 2.0, "vad": "energy",
                                  "no_speech_threshold": 0.6}
    assert record["language"] in ("en", "de", "fr", "es", "it", "nl", "ja", "zh")   # detected, then kept
    assert record["windows"]["total"] == 3 and 1 <= record["windows"]["heard"] <= 3
    assert not record["cached"] and record["note"] is None
    check_segments(record, audio_seconds(video))

    # The .srt lands next to the video, lvr's subtitle reader reads back exactly the segments,
    # and `lvr segment` would take it as the video's sidecar.
    srt = tmp_path / "talk.srt"
    assert record["srt"] == str(srt)
    assert [s.to_record() for s in read_subtitle_file(srt)] == record["segments"]
    lines, source = load_subtitles(video)
    assert source == f"sidecar:{srt.absolute()}" and len(lines) == len(record["segments"])

    # A rerun into another output comes from the cache: the model is not even there any more.
    moved = tmp_path / "moved-model"
    shutil.move(tiny_whisper, moved)
    try:
        again = run_lvr("transcribe", video, "-o", tmp_path / "again.jsonl", *flags)
    finally:
        shutil.move(moved, tiny_whisper)
    assert again.returncode == 0, again.stderr
    assert "0 transcribed, 1 from the cache" in again.stderr and "0 windows sent" in again.stderr
    [cached] = load_jsonl(tmp_path / "again.jsonl")
    assert cached["cached"] and cached["segments"] == record["segments"]
    assert cached["transcript_id"] == record["transcript_id"]


def test_in_process_windows_give_timestamps_inside_the_audio(whisper_model, talk_video, tmp_path):
    transcript = transcribe(talk_video, tmp_path / "cache", model=whisper_model, chunk_seconds=5,
                            chunk_overlap=1.5, vad="none", language="en")
    record = transcript.record
    assert record["language"] == "en" and record["windows"]["heard"] == record["windows"]["total"] >= 3
    check_segments(record, audio_seconds(talk_video))
    assert transcript.lines == [SubtitleLine(s["start"], s["end"], s["text"]) for s in record["segments"]]
    # Another setting is another transcript.
    other = transcribe(talk_video, tmp_path / "cache", model=whisper_model, chunk_seconds=5,
                       chunk_overlap=1.5, vad="none", language="de")
    assert other.transcript_id != transcript.transcript_id and not other.cached
    assert transcribe(talk_video, tmp_path / "cache", model=whisper_model, chunk_seconds=5, chunk_overlap=1.5,
                      vad="none", language="en").cached


def test_a_video_without_audio_gets_an_empty_transcript_and_a_note(media, tmp_path):
    video = media / "mute.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=64x64:r=10:d=2", "-an", "-c:v", "libx264", str(video))
    out = tmp_path / "t.jsonl"
    proc = run_lvr("transcribe", video, "-o", out, "--backend", "transformers", "--model", tmp_path / "no-model",
                   "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    notes = [l for l in proc.stderr.splitlines() if "no audio stream" in l]
    assert len(notes) == 1 and str(video) in notes[0]
    [record] = load_jsonl(out)
    assert record["segments"] == [] and record["note"] == "no audio stream" and record["audio"] is None
    assert "1 without audio, 0 failed" in proc.stderr


@pytest.mark.parametrize("vad", ["energy", "auto"])
def test_a_silent_video_gives_no_text_and_asks_no_model(media, tmp_path, vad):
    video = media / "silent.mp4"
    if not video.exists():
        ffmpeg("-f", "lavfi", "-i", "color=c=black:s=64x64:r=10:d=20", "-f", "lavfi", "-i", "anullsrc=r=16000",
               "-t", "20", "-c:v", "libx264", "-c:a", "aac", str(video))
    # The model named does not exist: it is never loaded, since no window holds speech.
    transcript = transcribe(video, tmp_path / "cache", spec=ModelSpec(backend="transformers",
                                                                      model=str(tmp_path / "no-model")), vad=vad)
    assert transcript.record["segments"] == [] and transcript.record["windows"]["heard"] == 0
    assert transcript.record["windows"]["total"] == 1


def test_a_bad_model_is_one_line_and_exit_2(talk_video, tmp_path):
    proc = run_lvr("transcribe", talk_video, "--backend", "transformers", "--model", tmp_path / "no-model",
                   "--cache-dir", tmp_path / "cache", "--vad", "energy")
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "cannot load it as a speech recognition model" in errors[0]


def test_faster_whisper_is_an_optional_extra(talk_video, tmp_path):
    import importlib.util

    if importlib.util.find_spec("faster_whisper") is not None:
        pytest.skip("faster-whisper is installed here")
    proc = run_lvr("transcribe", talk_video, "--faster-whisper", "--model", "Systran/faster-whisper-tiny",
                   "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2
    assert "lvr transcribe: error: --faster-whisper needs the faster-whisper package" in proc.stderr


def test_faster_whisper_in_process(tiny_whisper, talk_video, tmp_path):
    pytest.importorskip("faster_whisper", reason="faster-whisper is not installed (pip install -e .[faster-whisper])")
    from ctranslate2.converters import TransformersConverter

    ct2 = tmp_path / "tiny-whisper-ct2"
    TransformersConverter(str(tiny_whisper), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(ct2), quantization="float32")
    transcript = transcribe(talk_video, tmp_path / "cache", spec=ModelSpec(model=str(ct2), device="cpu"),
                            faster_whisper=True, chunk_seconds=6, chunk_overlap=2, vad="none", language="en")
    assert transcript.record["backend"] == "faster-whisper" and transcript.record["windows"]["heard"] == 3
    check_segments(transcript.record, audio_seconds(talk_video))


# -- the endpoint path, against the recording server ---------------------------------------------

def endpoint(server: FakeOpenAI, **kw) -> tuple[ModelSpec, OpenAITranscriber]:
    spec = ModelSpec(backend="openai", model="fake-whisper", base_urls=(server.url,))
    return spec, OpenAITranscriber("fake-whisper", server.url, **{**FAST, **kw})


def test_endpoint_uploads_each_speech_window_and_places_its_segments(talk_video, tmp_path):
    with FakeOpenAI() as server:
        spec, model = endpoint(server, concurrency=2)
        transcript = transcribe(talk_video, tmp_path / "cache", model=model, spec=spec, chunk_seconds=6,
                                chunk_overlap=2, vad="none", language="en")
    sent = server.transcriptions
    assert len(sent) == 3
    for request in sent:
        assert request["fields"] == {"model": "fake-whisper", "response_format": "verbose_json",
                                     "temperature": "0", "language": "en"}
        assert request["filename"] == "audio.wav"
    assert sorted(wav_seconds(r["file"]) for r in sent)[-1] == 6.0
    # Three windows, each "speech" for its whole length, stitched without doubling a word.
    assert transcript.lines[0].start == 0.0 and transcript.lines[-1].end == pytest.approx(12.0, abs=0.05)
    assert words(transcript.lines) == ["speech"]
    assert transcript.language == "en"


def test_endpoint_500_then_success(talk_video, tmp_path):
    with FakeOpenAI() as server:
        server.faults += [("status", 500), ("status", 502)]
        spec, model = endpoint(server, concurrency=1)
        transcript = transcribe(talk_video, tmp_path / "cache", model=model, spec=spec, vad="none")
    assert len(server.transcriptions) == 3          # two failures, then the one window
    assert [s.text for s in transcript.lines] == ["speech"] and transcript.language == "english"


def test_endpoint_429_waits_as_told(talk_video, tmp_path):
    import time

    with FakeOpenAI() as server:
        server.faults.append(("status", 429, {"Retry-After": "1"}))
        spec = ModelSpec(backend="openai", model="fake-whisper", base_urls=(server.url,))
        model = OpenAITranscriber("fake-whisper", server.url, concurrency=1, backoff_base_s=0.01, backoff_max_s=5)
        started = time.monotonic()
        transcript = transcribe(talk_video, tmp_path / "cache", model=model, spec=spec, vad="none")
        assert time.monotonic() - started >= 0.95
    assert len(server.transcriptions) == 2 and [s.text for s in transcript.lines] == ["speech"]


def test_endpoint_hang_past_the_timeout_is_retried(talk_video, tmp_path):
    with FakeOpenAI() as server:
        server.faults.append(("hang", 3.0))
        spec, model = endpoint(server, concurrency=1, timeout_s=0.5)
        transcript = transcribe(talk_video, tmp_path / "cache", model=model, spec=spec, vad="none")
    assert len(server.transcriptions) == 2 and [s.text for s in transcript.lines] == ["speech"]


def test_endpoint_that_keeps_failing_fails_the_video_and_resumes_later(talk_video, tmp_path):
    cache = tmp_path / "cache"
    options = dict(chunk_seconds=4, chunk_overlap=1, vad="none", language="en", no_speech_threshold=0.6)
    with FakeOpenAI() as server:
        # Window 0 is answered (a hang of 0 s), then the endpoint fails twice: one retry, then given up.
        server.faults += [("hang", 0.0), ("status", 500), ("status", 500)]
        spec, model = endpoint(server, concurrency=1, max_retries=1)
        model.batch = 1    # one window per batch: window 0 is finished (and kept) before window 1 fails
        with pytest.raises(ModelError, match="HTTP 500 after 2 attempts"):
            transcribe(talk_video, cache, model=model, spec=spec, **options)
        first = len(server.transcriptions)
        assert first == 3                                            # window 0, then two tries at window 1
        [video_dir] = (cache / "transcripts").iterdir()
        [partial] = video_dir.glob("*.partial.jsonl")
        assert [json.loads(l)["index"] for l in partial.read_text().splitlines()] == [0]
        # The rerun asks only for the windows not heard yet (window 1 onwards: 4 windows in all).
        spec, model = endpoint(server, concurrency=1)
        transcript = transcribe(talk_video, cache, model=model, spec=spec, **options)
        assert len(server.transcriptions) - first == 3
    assert transcript.record["windows"] == {"total": 4, "heard": 4}
    assert not partial.exists() and words(transcript.lines) == ["speech"]


def test_endpoint_through_the_cli_with_two_urls(talk_video, tmp_path):
    with FakeOpenAI() as one, FakeOpenAI() as two:
        out = tmp_path / "t.jsonl"
        proc = run_lvr("transcribe", talk_video, "-o", out, "--base-url", one.url, "--base-url", two.url,
                       "--model", "fake-whisper", "--cache-dir", tmp_path / "cache", "--vad", "none",
                       "--chunk-seconds", "3", "--chunk-overlap", "0", "--srt-dir", tmp_path / "subs")
        assert proc.returncode == 0, proc.stderr
        assert one.transcriptions and two.transcriptions
        sent = len(one.transcriptions) + len(two.transcriptions)
    [record] = load_jsonl(out)
    assert sent == record["windows"]["total"] == 5    # 0-3, 3-6, 6-9, 9-12 s and the last few ms
    assert record["backend"] == "openai" and record["language"] == "english"
    assert read_subtitle_file(tmp_path / "subs" / "talk.srt") == [SubtitleLine(s["start"], s["end"], s["text"])
                                                                  for s in record["segments"]]


# -- two hours of audio: flat memory -------------------------------------------------------------

PEAK_RSS = """
import asyncio, resource, sys
from lvr.prep.models import ModelSpec
from lvr.prep.transcribe import TranscribeOptions, Transcriber

async def main():
    t = Transcriber(ModelSpec(backend="transformers", model="never-loaded"),
                    TranscribeOptions(vad="energy"), sys.argv[2])
    record = (await t.transcript(sys.argv[1])).record
    print(record["windows"]["total"], record["duration"], len(record["segments"]))

asyncio.run(main())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def peak_rss_mb(path: Path, cache: Path) -> tuple[list[str], int]:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(cache)], capture_output=True, text=True,
                          timeout=300, check=True)
    *first, peak = proc.stdout.split()
    return first, int(peak)


def test_a_two_hour_track_is_heard_in_windows_with_flat_memory(tmp_path):
    long, short = tmp_path / "two_hours.wav", tmp_path / "one_minute.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "7200", "-c:a", "pcm_mulaw", str(long))
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "60", "-c:a", "pcm_mulaw", str(short))
    (windows, duration, segments), peak_long = peak_rss_mb(long, tmp_path / "cache")
    assert (int(windows), float(duration), int(segments)) == (288, 7200.0, 0)
    _, peak_short = peak_rss_mb(short, tmp_path / "cache")
    print(f"peak RSS: two hours {peak_long} MB, one minute {peak_short} MB")
    # The whole track as float32 would be 460 MB: only a window and a block are ever held.
    assert peak_long - peak_short < 64, (peak_long, peak_short)


# -- a real server: `transformers serve` --------------------------------------------------------
#
# `transformers serve` answers POST /v1/audio/transcriptions with {"text": ...} alone: it ignores
# response_format (and language), so each window comes back as one segment running the window.
# It needs python-multipart, soundfile and soxr (in our `dev` extra) besides the serve extras.

SERVE_MODULES = ("fastapi", "uvicorn", "openai", "pydantic", "multipart", "soundfile", "soxr")


@pytest.fixture(scope="module")
def served_whisper(tmp_path_factory):
    """(base URL, model folder, a count of answered transcription requests) of `transformers serve`
    running a tiny Whisper offline on CPU; stopped afterwards."""
    for module in SERVE_MODULES:
        pytest.importorskip(module, reason="the `transformers serve` extras are not installed (pip install -e .[dev])")
    from tiny_whisper import build_tiny_whisper

    root = tmp_path_factory.mktemp("serve-whisper")
    server = ServeProcess(build_tiny_whisper(root / "tiny-whisper", words_only=True), root)
    try:
        server.wait_ready()
        yield server.url, Path(server.model), server.transcription_requests
    finally:
        server.stop()


def served_text(model_dir: Path, samples: np.ndarray) -> str:
    """What the server says for one window: its WAV as the server reads it, features, greedy decoding."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    with wave.open(io.BytesIO(wav_bytes(samples))) as w:
        heard = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    with torch.inference_mode():
        ids = model.generate(**processor(heard, sampling_rate=16000, return_tensors="pt"))
    return " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())


def test_transcribe_against_transformers_serve(served_whisper, talk_video, tmp_path):
    url, model_dir, answered = served_whisper
    out, cache = tmp_path / "t.jsonl", tmp_path / "cache"
    flags = ["--base-url", url, "--model", model_dir, "--api-key", "sk-local", "--cache-dir", cache,
             "--chunk-seconds", "6", "--chunk-overlap", "0", "--vad", "energy"]
    before = answered()
    proc = run_lvr("transcribe", talk_video, "-o", out, *flags)
    assert proc.returncode == 0, proc.stderr
    [record] = load_jsonl(out)
    # Speech (0.2 to about 8.7 s) reaches two windows; the last few ms of sound are silence.
    assert answered() - before == record["windows"]["heard"] == 2
    windows = list(audio_windows(read_audio(talk_video, audio_stream(talk_video)), 6, 0))
    expected = [(w.start, w.end, served_text(model_dir, w.samples)) for w in windows[:2]]
    assert all(text for _, _, text in expected)
    assert [(s["start"], s["end"], s["text"]) for s in record["segments"]] == \
        [(round(a, 3), round(b, 3), text) for a, b, text in expected]
    assert record["backend"] == "openai" and record["model"] == str(model_dir)

    again = run_lvr("transcribe", talk_video, "-o", tmp_path / "again.jsonl", *flags)
    assert again.returncode == 0 and "0 transcribed, 1 from the cache" in again.stderr
    assert answered() - before == 2

"""`--transcribe`: transcripts stand in for subtitles in segment (and ask/eval), reach the
captioner marked as a transcript, and are checked by doctor; against the recording server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, wav_seconds
from lvr_test_helpers import caption_reply, load_jsonl, run_lvr
from synthetic_media import ffmpeg

SPEECH = "Hello and welcome to the kitchen. Today we cook pasta with tomatoes and basil."
HEARD = "we cook pasta with basil"
WHISPER = "fake-whisper"
# A K=2 tree with few frames: 14 nodes, quick to segment and caption.
SMALL_TREE = ["--min-width", "2", "--max-width", "2", "--high-frames", "4", "--medium-frames", "4",
              "--low-frames", "2"]


def has_flite() -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == ["flite"] for line in out.splitlines() if len(line.split()) > 1)


def heard(request: dict) -> dict:
    """The speech model: one segment with HEARD over the first two seconds of each window."""
    seconds = wav_seconds(request["file"])
    return {"task": "transcribe", "language": "english", "duration": seconds, "text": HEARD,
            "segments": [{"id": 0, "start": 0.0, "end": min(2.0, seconds), "text": HEARD, "avg_logprob": -0.2,
                          "no_speech_prob": 0.01}]}


@pytest.fixture(scope="module")
def talk_video(tmp_path_factory) -> Path:
    """A grey 8 s video whose sound is synthetic speech (flite), then silence."""
    if not has_flite():
        pytest.skip("this ffmpeg has no flite filter (Debian's ffmpeg has it)")
    path = tmp_path_factory.mktemp("talk") / "talk.mp4"
    ffmpeg("-f", "lavfi", "-i", f"flite=text='{SPEECH}':voice=slt",
           "-f", "lavfi", "-i", "color=c=gray:s=160x90:r=10:d=8",
           "-filter_complex", "[0:a]apad=whole_dur=8[a]", "-map", "1:v", "-map", "[a]",
           "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", "-t", "8", str(path))
    return path


def transcribe_flags(server: FakeOpenAI) -> list[str]:
    return ["--transcribe", "--transcribe-model", WHISPER, "--transcribe-base-url", server.url,
            "--vad", "energy", "--chunk-seconds", "6", "--chunk-overlap", "0", "--max-retries", "0"]


def user_texts(body: dict) -> list[str]:
    return [p["text"] for p in body["messages"][1]["content"] if p["type"] == "text"]


def test_segment_transcribe_then_caption_sends_the_transcript_marked(talk_video, tmp_path):
    cache, nodes, captions = tmp_path / "cache", tmp_path / "nodes.jsonl", tmp_path / "captions.jsonl"
    with FakeOpenAI(reply=caption_reply, transcribe=heard) as server:
        proc = run_lvr("segment", talk_video, "-o", nodes, "--cache-dir", cache, *SMALL_TREE,
                       *transcribe_flags(server))
        assert proc.returncode == 0, proc.stderr
        sent = len(server.transcriptions)
        assert sent >= 1 and all(t["fields"]["model"] == WHISPER for t in server.transcriptions)
        records = load_jsonl(nodes)
        assert len(records) == 14
        lines = [line for rec in records for line in rec["subtitles"]]
        assert lines and all(line["source"] == "transcript" and line["text"] == HEARD for line in lines)
        [tid] = {rec["transcript_id"] for rec in records}
        assert records[0]["producer"]["options"]["transcription"]["model"] == WHISPER

        proc = run_lvr("caption", nodes, "-o", captions, "--cache-dir", cache, "--base-url", server.url,
                       "--model", "fake-model")
        assert proc.returncode == 0, proc.stderr
        assert len(server.requests) == 14
        with_lines = [b for b in server.requests if any(HEARD in t for t in user_texts(b))]
        assert with_lines, "no caption request carried the transcript"
        for body in with_lines:
            texts = user_texts(body)
            assert any(t.endswith(f"Transcript: {HEARD}") for t in texts)
            assert not any("Subtitles:" in t for t in texts)
            assert "speech transcribed from the audio" in texts[0]

        # A rerun transcribes nothing (the transcript cache) and captions nothing (the caption store).
        again = tmp_path / "again.jsonl"
        proc = run_lvr("segment", talk_video, "-o", again, "--cache-dir", cache, *SMALL_TREE,
                       *transcribe_flags(server))
        assert proc.returncode == 0, proc.stderr
        assert len(server.transcriptions) == sent
        assert [r["subtitles"] for r in load_jsonl(again)] == [r["subtitles"] for r in records]
        proc = run_lvr("caption", again, "-o", tmp_path / "captions2.jsonl", "--cache-dir", cache,
                       "--base-url", server.url, "--model", "fake-model")
        assert proc.returncode == 0 and len(server.requests) == 14
        assert tid == load_jsonl(again)[0]["transcript_id"]


def test_a_real_subtitle_file_wins_and_its_captions_are_others(talk_video, tmp_path):
    video = tmp_path / "talk.mp4"
    shutil.copy(talk_video, video)
    cache = tmp_path / "cache"
    with FakeOpenAI(reply=caption_reply, transcribe=heard) as server:
        # First with speech: a transcript, and captions made from it.
        spoken = tmp_path / "spoken.jsonl"
        assert run_lvr("segment", video, "-o", spoken, "--cache-dir", cache, *SMALL_TREE,
                       *transcribe_flags(server)).returncode == 0
        assert run_lvr("caption", spoken, "-o", tmp_path / "c1.jsonl", "--cache-dir", cache, "--base-url",
                       server.url, "--model", "fake-model").returncode == 0
        transcribed, captioned = len(server.transcriptions), len(server.requests)
        # Then a sidecar with the very same words: the sidecar wins, and nothing is transcribed.
        video.with_suffix(".srt").write_text(f"1\n00:00:00,000 --> 00:00:02,000\n{HEARD}\n\n"
                                             f"2\n00:00:06,000 --> 00:00:08,000\n{HEARD}\n\n")
        subbed = tmp_path / "subbed.jsonl"
        proc = run_lvr("segment", video, "-o", subbed, "--cache-dir", cache, *SMALL_TREE, *transcribe_flags(server))
        assert proc.returncode == 0, proc.stderr
        assert len(server.transcriptions) == transcribed
        records = load_jsonl(subbed)
        lines = [line for rec in records for line in rec["subtitles"]]
        assert lines and all(line["source"] == "subtitles" for line in lines)
        assert not any("transcript_id" in rec for rec in records)
        assert "transcription" in records[0]["producer"]["options"]
        # Nodes whose lines came from the subtitles are captioned anew, worded as subtitles.
        assert run_lvr("caption", subbed, "-o", tmp_path / "c2.jsonl", "--cache-dir", cache, "--base-url",
                       server.url, "--model", "fake-model").returncode == 0
        new = server.requests[captioned:]
        with_lines = [b for b in new if any(HEARD in t for t in user_texts(b))]
        assert with_lines and all(any(t.endswith(f"Subtitles: {HEARD}") for t in user_texts(b))
                                  for b in with_lines)


def test_transcribe_needs_a_model_and_subtitles(talk_video, tmp_path):
    proc = run_lvr("segment", talk_video, "--cache-dir", tmp_path / "cache", "--transcribe")
    assert proc.returncode == 2 and "--transcribe-model" in proc.stderr
    proc = run_lvr("segment", talk_video, "--cache-dir", tmp_path / "cache", "--transcribe", "--no-subtitles",
                   "--transcribe-model", WHISPER, "--transcribe-base-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2 and "--no-subtitles" in proc.stderr


def test_doctor_checks_the_speech_model(tmp_path):
    with FakeOpenAI(models=(WHISPER,)) as server:
        proc = run_lvr("doctor", "--transcribe-model", WHISPER, "--transcribe-base-url", server.url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"ok   transcribe endpoint {server.url} transcribes with '{WHISPER}'" in proc.stdout
        assert len(server.transcriptions) == 1 and wav_seconds(server.transcriptions[0]["file"]) == 1.0

        proc = run_lvr("doctor", "--transcribe-model", "whisper-missing", "--transcribe-base-url", server.url)
        assert proc.returncode == 1
        [fail] = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
        assert "whisper-missing" in fail and f"'{WHISPER}'" in fail
        assert len(server.transcriptions) == 1

    missing = tmp_path / "no-such-whisper"
    proc = run_lvr("doctor", "--transcribe-model", missing, "--transcribe-backend", "transformers")
    assert proc.returncode == 1
    [fail] = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert str(missing) in fail and "no such folder" in fail


def test_the_lazy_tree_takes_the_transcript_and_keys_its_cache_by_it(talk_video, tmp_path):
    """ask and eval plan trees lazily (load_or_plan): with --transcribe, another tree, with speech."""
    from lvr.prep.models import ModelSpec
    from lvr.prep.segment import SegmentOptions, load_or_plan, tree_cache_path
    from lvr.prep.transcribe import TranscribeOptions, Transcription
    from lvr.prep.tree import TreeOptions

    cache = tmp_path / "cache"
    tree = TreeOptions(min_width=2, max_width=2, high_frames=4, medium_frames=4, low_frames=2)
    with FakeOpenAI(transcribe=heard) as server:
        speech = Transcription(ModelSpec(backend="openai", model=WHISPER, base_urls=(server.url,), max_retries=0),
                               TranscribeOptions(vad="energy", chunk_seconds=6, chunk_overlap=0), cache)
        plain = SegmentOptions(tree=tree, qa_frames=True)
        spoken = SegmentOptions(tree=tree, qa_frames=True, transcription=speech)
        without = load_or_plan(talk_video, plain, cache)
        heard_tree = load_or_plan(talk_video, spoken, cache)
        sent = len(server.transcriptions)
        assert sent >= 1
        assert not any(rec["subtitles"] for rec in without)
        assert any(line["source"] == "transcript" for rec in heard_tree for line in rec["subtitles"])
        assert load_or_plan(talk_video, spoken, cache) == heard_tree and len(server.transcriptions) == sent
    video_id = without[0]["video_id"]
    assert tree_cache_path(cache, talk_video, video_id, plain.to_record()) != \
        tree_cache_path(cache, talk_video, video_id, spoken.to_record())


def test_ask_takes_the_transcribe_flags(talk_video, tmp_path):
    proc = run_lvr("ask", talk_video, "What is cooked?", "--cache-dir", tmp_path / "cache", "--model", "m",
                   "--base-url", "http://127.0.0.1:9/v1", "--transcribe")
    assert proc.returncode == 2 and "--transcribe-model" in proc.stderr


def test_eval_without_subtitles_transcribes_nothing(talk_video, tmp_path):
    """A question asked without subtitles is never shown a transcript: --transcribe costs it nothing."""
    import json

    shutil.copy(talk_video, tmp_path / "talk.mp4")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"schema": "lvr.question/1", "id": "q1", "video": "talk.mp4",
                                     "question": "What is cooked?", "options": ["A. pasta", "B. rice"],
                                     "answer": "A"}) + "\n")

    def reply(body: dict) -> str:
        return caption_reply(body) if body["model"] == "captioner" else "<think>Pasta.</think><answer>A</answer>"

    def run(subtitles: str):
        return run_lvr("eval", questions, "--model", "nav", "--base-url", server.url, "--caption-model", "captioner",
                       "--cache-dir", tmp_path / "cache", "-o", tmp_path / f"{subtitles}.jsonl", *SMALL_TREE,
                       *transcribe_flags(server), f"--{subtitles}")

    with FakeOpenAI(reply=reply, transcribe=heard, models=("nav", "captioner", WHISPER)) as server:
        proc = run("no-subtitles")
        assert proc.returncode == 0, proc.stderr
        assert server.transcriptions == []
        [record] = load_jsonl(tmp_path / "no-subtitles.jsonl")
        assert record["correct"] is True and record["settings"]["subtitles"] is False
        # The same question with subtitles on: the video has none, so its speech is transcribed.
        proc = run("subtitles")
        assert proc.returncode == 0, proc.stderr
        assert len(server.transcriptions) >= 1

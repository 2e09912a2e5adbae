"""A first run that explains itself: each set-up mistake is one line, exit 2, before any decoding."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, prompt_image_count
from lvr_test_helpers import lvr_env, run_lvr


def lvr(*args, env=None) -> subprocess.CompletedProcess:
    return run_lvr(*args, timeout=120, env={**lvr_env(), **(env or {})})


@pytest.fixture(scope="module")
def qa_files(numbered_video, tmp_path_factory) -> dict[str, Path]:
    """The same one question as an eval file and a synthesize (lvr.qa/1) file."""
    root = tmp_path_factory.mktemp("first-run")
    base = {"video": numbered_video.name, "question": "Which number is shown first?",
            "options": ["A. 0", "B. 7"], "answer": "A"}
    ev, qa = root / "eval.jsonl", root / "qa.jsonl"
    ev.write_text(json.dumps({"schema": "lvr.question/1", "id": "q1", **base}) + "\n")
    qa.write_text(json.dumps({"schema": "lvr.qa/1", "id": "q1", **base, "clues": [[0.0, 2.0]]}) + "\n")
    return {"eval": ev, "synthesize": qa}


def command_line(command: str, video: Path, qa_files: dict[str, Path]) -> list:
    if command == "ask":
        return ["ask", video, "Which number is shown first?"]
    return [command, qa_files[command], "--video-dir", video.parent]


def assert_one_line_usage_error(proc: subprocess.CompletedProcess, command: str, cache: Path) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"lvr {command}: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cache / "frames").exists() and not (cache / "trees").exists(), "decoded before the error"
    return lines[0]


@pytest.mark.parametrize("command", ["ask", "eval", "synthesize"])
def test_no_model_names_every_way_to_give_one(command, numbered_video, qa_files, tmp_path):
    cache = tmp_path / "cache"
    proc = lvr(*command_line(command, numbered_video, qa_files), "--cache-dir", cache,
               env={"OPENAI_BASE_URL": ""})
    line = assert_one_line_usage_error(proc, command, cache)
    for way in ("OpenAI-compatible server", "--base-url URL --model NAME", "--backend transformers --model",
                "config.toml", "--config FILE"):
        assert way in line, line
    assert "the transformers backend needs" not in line


def test_a_base_url_without_a_model_asks_for_the_served_name(numbered_video, tmp_path):
    cache = tmp_path / "cache"
    with FakeOpenAI(models=("navigator",)) as server:
        proc = lvr("ask", numbered_video, "q?", "--base-url", server.url, "--cache-dir", cache)
        assert not server.requests
    line = assert_one_line_usage_error(proc, "ask", cache)
    assert "no --model" in line and "/models" in line


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 # a hub that refuses connections at once (loopback, nothing listens)
                                 {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_a_model_name_without_a_server_fails_at_once(env, numbered_video, tmp_path):
    cache = tmp_path / "cache"
    proc = lvr("ask", numbered_video, "q?", "--model", "foo-navigator", "--cache-dir", cache,
               env={"OPENAI_BASE_URL": "", "HF_HOME": str(tmp_path / "hf"), **env})
    line = assert_one_line_usage_error(proc, "ask", cache)
    assert "--model foo-navigator:" in line and "is --base-url URL missing?" in line
    assert "Retrying" not in proc.stderr


def test_a_missing_model_folder_is_named(numbered_video, tmp_path):
    cache = tmp_path / "cache"
    proc = lvr("ask", numbered_video, "q?", "--backend", "transformers", "--model", "./no/such/navigator",
               "--cache-dir", cache)
    line = assert_one_line_usage_error(proc, "ask", cache)
    assert "no such folder" in line and "no/such/navigator" in line


def test_a_text_only_endpoint_as_captioner_is_caught_with_one_small_image(numbered_video, tmp_path):
    """No --caption-model: the navigator's server would get 128-image caption requests."""
    cache = tmp_path / "cache"
    with FakeOpenAI(models=("navigator",), max_images=0) as server:  # refuses any image, like a text model
        proc = lvr("ask", numbered_video, "q?", "--base-url", server.url, "--model", "navigator",
                   "--cache-dir", cache)
        sent = list(server.requests)
    line = assert_one_line_usage_error(proc, "ask", cache)
    assert "--caption-model" in line and "navigator" in line and "vision-language" in line
    assert len(sent) == 1 and prompt_image_count(sent[0]) == 1


def test_a_vision_endpoint_for_every_role_passes_the_probe(numbered_video, tmp_path):
    """The same model for every role is fine when it takes images: the probe lets the run go on."""
    cache = tmp_path / "cache"

    def reply(body):
        if prompt_image_count(body):
            return "<caption>numbers on grey</caption>"
        return "<think>enough</think><answer>A</answer>"

    with FakeOpenAI(reply, models=("vlm",)) as server:
        proc = lvr("ask", numbered_video, "Which number is shown first?", "-O", "A. 0", "-O", "B. 7",
                   "--base-url", server.url, "--model", "vlm", "--cache-dir", cache)
        images = [prompt_image_count(b) for b in server.requests]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "A. 0"
    assert images[0] == 1 and max(images) > 1  # the probe first, then real caption requests


def _config_only(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_a_text_only_in_process_captioner_is_caught_from_its_config(numbered_video, tmp_path):
    navigator = _config_only(tmp_path / "navigator", "qwen3")
    cache = tmp_path / "cache"
    proc = lvr("ask", numbered_video, "q?", "--backend", "transformers", "--model", navigator,
               "--cache-dir", cache)
    line = assert_one_line_usage_error(proc, "ask", cache)
    assert "no --caption-model given" in line and "qwen3 is text-only" in line and "--caption-model" in line

    with FakeOpenAI(models=("navigator",)) as server:
        proc = lvr("ask", numbered_video, "q?", "--base-url", server.url, "--model", "navigator",
                   "--caption-backend", "transformers", "--caption-model", navigator, "--cache-dir", cache)
    line = assert_one_line_usage_error(proc, "ask", cache)
    assert f"--caption-model {navigator}: qwen3 is text-only" in line

"""`lvr doctor`: tools, OpenAI-compatible endpoints (against FakeOpenAI) and in-process models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, prompt_image_count
from lvr.infer.doctor import Check, check_local_model, check_tools, run_doctor
from lvr.prep.models import ModelSpec
from lvr_test_helpers import run_lvr
from tiny_models import build_tiny_qwen3, build_tiny_qwen_vl

VL = "Qwen/Qwen2.5-VL-7B-Instruct"
SECRET = "sk-test-SECRET-doctor-0123456789"


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    e["HF_HUB_OFFLINE"] = "1"
    return e


def doctor(*args, timeout=120) -> subprocess.CompletedProcess:
    return run_lvr("doctor", *args, timeout=timeout, env=env())


def lines_with(proc: subprocess.CompletedProcess, *words: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if all(w in line for w in words)]


def fix_after(proc: subprocess.CompletedProcess, line: str) -> str:
    out = proc.stdout.splitlines()
    nxt = out[out.index(line) + 1]
    assert nxt.startswith("     fix: "), proc.stdout
    return nxt


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("doctor-vl"), vocab="small")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("doctor-qwen3"), vocab="small")


# -- tools -------------------------------------------------------------------


def test_tools_pass_here():
    checks = check_tools()
    by_name = {c.name: c for c in checks}
    assert {"ffmpeg", "ffprobe"} <= set(by_name)
    assert all(c.ok and not c.skipped for c in checks), [c.lines() for c in checks]
    assert by_name["ffmpeg"].detail.startswith("ffmpeg version ")
    assert by_name["ffprobe"].detail.startswith("ffprobe version ")
    assert "Copyright" not in by_name["ffmpeg"].detail


def test_tools_missing_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    checks = check_tools()
    assert [c.name for c in checks] == ["ffmpeg", "ffprobe"]
    for c in checks:
        assert not c.ok and "not found on PATH" in c.detail
        assert "apt-get install -y ffmpeg" in c.fix


def test_check_lines_format():
    assert Check("ffmpeg", True, "ffmpeg version 5").lines() == ["ok   ffmpeg: ffmpeg version 5"]
    assert Check("x", False, "broken", "do y").lines() == ["FAIL x: broken", "     fix: do y"]
    assert Check("x", True, "not tried", skipped=True).lines() == ["skip x: not tried"]


# -- endpoints through the CLI ------------------------------------------------


def test_all_ok_exit_0_and_requests_sent():
    with FakeOpenAI(models=[VL], strict_models=True) as server:
        proc = doctor("--base-url", server.url, "--model", VL)
        bodies = list(server.requests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert lines_with(proc, "ok   ffmpeg: ffmpeg version")
    for what in ("reachable", f"serves model '{VL}'", "text request", "takes 16 images in one request"):
        assert lines_with(proc, "ok   main endpoint", server.url, what), (what, proc.stdout)
    assert "0 failed" in proc.stdout.splitlines()[-1]
    # One tiny text request, then one with 16 images.
    assert len(bodies) == 2
    assert bodies[0]["max_tokens"] == 1 and prompt_image_count(bodies[0]) == 0
    assert prompt_image_count(bodies[1]) == 16 and bodies[1]["model"] == VL
    no_traceback(proc)


def test_wrong_model_lists_served_names():
    with FakeOpenAI(models=[VL, "other-model"], strict_models=True) as server:
        proc = doctor("--base-url", server.url, "--model", "Qwen/Qwen2.5-VL-7B")
        images_sent = sum(prompt_image_count(b) for b in server.requests)
    assert proc.returncode == 1
    [line] = lines_with(proc, "FAIL main endpoint", "serves model 'Qwen/Qwen2.5-VL-7B'")
    assert VL in line and "other-model" in line
    assert f"--model {VL}" in fix_after(proc, line)
    assert lines_with(proc, "skip", "takes 16 images")
    assert images_sent == 0
    no_traceback(proc)


def test_image_cap_suggests_limit_mm_per_prompt():
    with FakeOpenAI(models=[VL], max_images=4) as server:
        proc = doctor("--base-url", server.url, "--model", VL)
        small = doctor("--base-url", server.url, "--model", VL, "--images", "4")
    assert proc.returncode == 1
    [line] = lines_with(proc, "FAIL main endpoint", "takes 16 images")
    assert "At most 4 image(s)" in line
    fix = fix_after(proc, line)
    assert "--limit-mm-per-prompt" in fix and '{"image": 128}' in fix
    assert lines_with(proc, "ok   main endpoint", "text request")
    # Within the server's limit it passes.
    assert small.returncode == 0, small.stdout
    assert lines_with(small, "ok   main endpoint", "takes 4 images")


def test_text_only_skips_the_image_check():
    with FakeOpenAI(models=["navigator"], max_images=0) as server:
        proc = doctor("--base-url", server.url, "--model", "navigator", "--text-only")
        bodies = list(server.requests)
        without = doctor("--base-url", server.url, "--model", "navigator")
    assert proc.returncode == 0, proc.stdout
    assert not lines_with(proc, "images")
    assert len(bodies) == 1 and prompt_image_count(bodies[0]) == 0
    # Without --text-only a model that takes no images fails, and the fix mentions --text-only.
    assert without.returncode == 1
    [line] = lines_with(without, "FAIL", "takes 16 images")
    fix = fix_after(without, line)
    assert "takes no images" in fix and "--text-only" in fix


def test_unreachable_url_is_one_clear_line():
    url = dead_url()
    port = url.rsplit(":", 1)[1].split("/")[0]
    proc = doctor("--base-url", url, "--model", VL, "--timeout", "5")
    assert proc.returncode == 1
    [line] = lines_with(proc, "FAIL main endpoint", url, "reachable")
    fix = fix_after(proc, line)
    assert f"nothing listens on port {port}" in fix and f"vllm serve {VL} --port {port}" in fix
    assert lines_with(proc, "skip main endpoint", url, "not tried")
    no_traceback(proc)


def test_api_key_never_printed():
    with FakeOpenAI(models=[VL], api_key="sk-the-right-key-42") as server:
        wrong = doctor("--base-url", server.url, "--model", VL, "--api-key", SECRET)
        right = doctor("--base-url", server.url, "--model", VL, "--api-key", "sk-the-right-key-42")
        missing = doctor("--base-url", server.url, "--model", VL)
    assert wrong.returncode == 1
    assert SECRET not in wrong.stdout + wrong.stderr
    [line] = lines_with(wrong, "FAIL main endpoint", "HTTP 401")
    assert "<redacted>" in line  # the server echoed the key back; it was cut out
    assert "--api-key" in fix_after(wrong, line) and "refused" in fix_after(wrong, line)
    assert right.returncode == 0, right.stdout
    assert "sk-the-right-key-42" not in right.stdout + right.stderr
    assert missing.returncode == 1
    [line] = lines_with(missing, "FAIL", "HTTP 401")
    assert "wants an API key" in fix_after(missing, line)


def test_two_base_urls_one_dead_reports_each():
    dead = dead_url()
    with FakeOpenAI(models=[VL]) as server:
        proc = doctor("--base-url", server.url, "--base-url", dead, "--model", VL, "--timeout", "5")
    assert proc.returncode == 1
    assert lines_with(proc, "ok   main endpoint", server.url, "reachable")
    assert lines_with(proc, "ok   main endpoint", server.url, "takes 16 images")
    assert lines_with(proc, "FAIL main endpoint", dead, "reachable")
    assert not lines_with(proc, "FAIL", server.url)
    no_traceback(proc)


def test_roles_on_one_endpoint_are_checked_once():
    with FakeOpenAI(models=[VL]) as server:
        proc = doctor("--base-url", server.url, "--model", VL, "--caption-model", VL, "--qa-model", VL,
                      "--text-only")
        bodies = list(server.requests)
    assert proc.returncode == 0, proc.stdout
    assert lines_with(proc, "ok   main+caption+qa endpoint", "takes 16 images")
    # --text-only is about the main model; the captioner still gets the image check, once.
    assert len(bodies) == 2 and prompt_image_count(bodies[1]) == 16


def test_roles_fall_back_to_the_main_endpoint_and_key():
    with FakeOpenAI(models=[VL, "navigator"], api_key="sk-shared-key-77", strict_models=True) as server, \
            FakeOpenAI(models=["qa-vl"], api_key="sk-shared-key-77") as qa_server:
        proc = doctor("--base-url", server.url, "--api-key", "sk-shared-key-77", "--model", "navigator",
                      "--text-only", "--caption-model", VL, "--qa-base-url", qa_server.url, "--qa-model", "qa-vl")
    assert proc.returncode == 0, proc.stdout
    assert lines_with(proc, "ok   main endpoint", server.url, "text request")
    assert not lines_with(proc, "main endpoint", "images")
    assert lines_with(proc, "ok   caption endpoint", server.url, "takes 16 images")
    assert lines_with(proc, "ok   qa endpoint", qa_server.url, "takes 16 images")


def test_bad_base_url_and_usage_errors():
    proc = doctor("--base-url", "localhost:8000", "--model", VL)
    assert proc.returncode == 1
    [line] = lines_with(proc, "FAIL main endpoint localhost:8000")
    assert "--base-url http://localhost:8000/v1" in fix_after(proc, line)
    usage = doctor("--backend", "nonsense", "--model", VL)
    assert usage.returncode == 2 and "--backend" in usage.stderr
    no_traceback(usage)


def test_quiet_prints_only_failures_and_config_file(tmp_path):
    with FakeOpenAI(models=[VL], max_images=2) as server:
        config = tmp_path / "run.yaml"
        config.write_text(f"model: {VL}\nbase_url: [{server.url}]\nconcurrency: 4\n")
        quiet_ok = doctor("--config", config, "--images", "2", "-q")
        quiet_fail = doctor("--config", config, "-q")
    assert quiet_ok.returncode == 0 and quiet_ok.stdout == ""
    assert quiet_fail.returncode == 1
    out = quiet_fail.stdout.splitlines()
    assert out[0].startswith("FAIL main endpoint") and "takes 16 images" in out[0]
    assert len(out) == 2 and out[1].startswith("     fix: ")


def test_no_model_checks_tools_only():
    proc = doctor()
    assert proc.returncode == 0
    assert lines_with(proc, "ok   ffprobe")
    assert lines_with(proc, "skip models: none given")


def test_doctor_in_main_help():
    proc = subprocess.run([sys.executable, "-m", "lvr.cli", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert "doctor" in proc.stdout.split("Commands")[-1]
    assert "lvr doctor --base-url" in proc.stdout


# -- in-process models ------------------------------------------------------


def test_transformers_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such-model"
    proc = doctor("--backend", "transformers", "--model", missing)
    assert proc.returncode == 1
    [line] = lines_with(proc, "FAIL main transformers model")
    assert f"no such folder: {missing}" in line
    assert "check the path" in fix_after(proc, line)
    no_traceback(proc)


def test_transformers_tiny_vl_folder_ok(tiny_vl):
    proc = doctor("--backend", "transformers", "--model", tiny_vl, "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines_with(proc, "ok   main transformers model", "local folder, qwen2_5_vl (vision-language)")
    assert lines_with(proc, "ok   main transformers model files", "chat template")
    assert lines_with(proc, "ok   main device: cpu")


def test_text_model_for_an_image_role(tiny_text, tiny_vl):
    spec = ModelSpec(backend="transformers", model=str(tiny_text), device="cpu")
    checks = check_local_model("qa", spec, vision=True)
    [bad] = [c for c in checks if not c.ok]
    assert bad.name == "qa transformers model takes images" and "text-only" in bad.detail
    assert "vision-language" in bad.fix
    # As a text navigator it is fine, next to a vision captioner.
    checks = run_doctor({"main": spec, "caption": ModelSpec(backend="transformers", model=str(tiny_vl),
                                                            device="cpu")},
                        vision_roles=["caption"], tools=False)
    assert all(c.ok for c in checks), [c.lines() for c in checks]
    assert any(c.name == "main transformers model files" for c in checks)


def test_incomplete_folder_names_what_is_missing(tiny_vl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_vl, broken)
    for name in ("chat_template.jinja", "preprocessor_config.json"):
        (broken / name).unlink()
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    checks = check_local_model("caption", ModelSpec(backend="transformers", model=str(broken), device="cpu"))
    [files] = [c for c in checks if c.name == "caption transformers model files"]
    assert not files.ok
    for what in ("weights", "chat template", "preprocessor_config.json"):
        assert what in files.detail


def test_hub_id_offline_is_a_clear_failure():
    checks = check_local_model("main", ModelSpec(backend="transformers", model="nobody/not-cached-model"))
    [bad] = [c for c in checks if not c.ok]
    assert "not in the Hugging Face cache" in bad.detail and "hf download" in bad.fix


def test_device_and_vllm_checks():
    import importlib.util

    import torch

    checks = check_local_model("main", ModelSpec(backend="vllm", model="/nonexistent/model", device="auto"))
    by_name = {c.name: c for c in checks}
    if importlib.util.find_spec("vllm") is None:
        assert not by_name["main vllm installed"].ok
        assert "pip install '.[vllm]'" in by_name["main vllm installed"].fix
    if not torch.cuda.is_available():
        assert not by_name["main device"].ok and "CUDA GPU" in by_name["main device"].detail
        [dev] = [c for c in check_local_model("main", ModelSpec(backend="transformers", model="/x/y",
                                                                device="cuda")) if c.name == "main device"]
        assert not dev.ok and "--device cpu" in dev.fix


def test_model_list_failure_falls_back_to_asking_the_model():
    with FakeOpenAI(models_status=500, strict_models=True) as server:
        ok = doctor("--base-url", server.url, "--model", "fake-model")
        wrong = doctor("--base-url", server.url, "--model", "fake-modle")
    assert ok.returncode == 0, ok.stdout
    assert lines_with(ok, "ok   main endpoint", "reachable: answers, though GET /models: HTTP 500")
    assert lines_with(ok, "ok   main endpoint", "serves model 'fake-model'", "answers under this name")
    assert lines_with(ok, "ok   main endpoint", "takes 16 images")
    assert wrong.returncode == 1
    [line] = lines_with(wrong, "FAIL main endpoint", "serves model 'fake-modle'")
    assert "model list is unknown" in line and "does not exist" in line
    assert "--model" in fix_after(wrong, line)


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_against_transformers_serve(tiny_text, tmp_path):
    """A real OpenAI-compatible server. Older `transformers serve` lists no local folder yet answers for it;
    newer ones list it in GET /models. Either way the model is found to be served."""
    import importlib.util
    import time

    import httpx

    serve = Path(sys.executable).parent / "transformers"
    if not serve.exists() or importlib.util.find_spec("fastapi") is None:
        pytest.skip("transformers serve is not available")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    (tmp_path / "hf").mkdir()
    server = subprocess.Popen([str(serve), "serve", str(tiny_text), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**env(), "HF_HUB_CACHE": str(tmp_path / "hf")})
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, "transformers serve exited"
            time.sleep(0.5)
        ok = doctor("--base-url", url, "--model", tiny_text, "--text-only", "--timeout", "120")
        wrong = doctor("--base-url", url, "--model", "wrong-name", "--text-only", "--timeout", "120")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert ok.returncode == 0, ok.stdout
    assert (lines_with(ok, "ok   main endpoint", "answers under this name")
            or lines_with(ok, "ok   main endpoint", "listed by GET /models"))
    assert lines_with(ok, "ok   main endpoint", "text request: answered")
    assert wrong.returncode == 1
    [line] = lines_with(wrong, "FAIL main endpoint", "serves model 'wrong-name'")
    assert "pinned to" in line


@pytest.mark.parametrize("role_flags", [
    # qa gives only a model: it takes the captioner's endpoint (doctor once took the main one)
    lambda main, cap: ["--caption-model", VL, "--caption-base-url", cap, "--qa-model", "qa-vl"],
    # qa gives nothing: it is the captioner
    lambda main, cap: ["--caption-model", VL, "--caption-base-url", cap],
    # caption gives only a model: it is served by the main endpoint, and qa follows it
    lambda main, cap: ["--caption-model", VL, "--qa-base-url", cap, "--qa-model", "qa-vl"],
], ids=["qa-model-only", "qa-from-caption", "caption-on-main"])
def test_doctor_and_ask_resolve_the_same_endpoint_for_each_role(role_flags, numbered_video, tmp_path):
    import json

    def reply(body):
        if prompt_image_count(body):
            return "<caption>grey frames</caption>"
        return "<think>the first option</think><answer>A</answer>"

    with FakeOpenAI(reply, models=["navigator", VL]) as main, FakeOpenAI(reply, models=[VL, "qa-vl"]) as cap:
        flags = ["--base-url", main.url, "--model", "navigator", *role_flags(main.url, cap.url)]
        checked = doctor(*flags, "--text-only")
        answer = tmp_path / "answer.jsonl"
        asked = run_lvr("ask", numbered_video, "Which?", "-O", "A. one", "-O", "B. two", *flags,
                        "--cache-dir", tmp_path / "c", "-o", answer, timeout=300, env=env())
    assert checked.returncode == 0, checked.stdout
    assert asked.returncode == 0, asked.stderr
    models = json.loads(answer.read_text())["settings"]["models"]
    by_role = {"main": models["reasoning"], "caption": models["caption"], "qa": models["qa"]}
    for line in checked.stdout.splitlines():
        if " endpoint http" in line and line.startswith("ok "):
            roles, url = line.split()[1], line.split()[3]
            for role in roles.split("+"):
                assert by_role[role]["base_urls"] == [url], (role, line)
    checked_roles = {r for line in checked.stdout.splitlines() if " endpoint http" in line
                     for r in line.split()[1].split("+")}
    assert {"main", "caption"} <= checked_roles

"""Plain helpers and constants shared by the test files; fixtures live in conftest.py.

Test files import shared code from here, synthetic_media, fake_openai and tiny_models, never
from each other (nor from conftest): a test file is free to change its own helpers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lvr.infer.protocol import DEFAULT_SYSTEM_PROMPT, first_user_message, system_prompt, tool_result_message
from lvr.train.hints import hint_text

REPO = Path(__file__).resolve().parents[1]
LVR = [sys.executable, "-m", "lvr.cli"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TWO_CPU_PROCESSES = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
# Long enough for the slowest default-run command (a few training steps on a busy CPU); only a
# hung run should ever reach it.
LVR_TIMEOUT_S = 600
# One torch thread per process: on small shared CPUs, tiny models train several times faster
# without torch's intra-op threads fighting each other and the other processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- running lvr ------------------------------------------------------------------------

def lvr_env() -> dict:
    """The environment of an `lvr` subprocess: this process's, read now (conftest points
    XDG_CONFIG_HOME away from the tester's own config at session start), with one thread."""
    return {**os.environ, **ONE_THREAD}


def run_lvr(*args, timeout: float = LVR_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    """`python -m lvr.cli ARGS`, output captured as text; `env=` replaces lvr_env()."""
    kw.setdefault("env", lvr_env())
    return subprocess.run([*LVR, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def run_lvr_in_two_processes(*args, timeout: float = LVR_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`accelerate launch` of `lvr ARGS` as two CPU processes over gloo."""
    return subprocess.run([*ACCELERATE, "--config_file", str(TWO_CPU_PROCESSES), "-m", "lvr.cli",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=lvr_env())


def kill_lvr_at_first_checkpoint(*args, out: Path, wait_s: float = 300) -> subprocess.Popen:
    """Start `lvr ARGS` (a training run writing to OUT) and SIGKILL its process group as soon
    as a checkpoint holds trainer_state.json; returns the ended process."""
    proc = subprocess.Popen([*LVR, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=lvr_env())
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline and proc.poll() is None:
            if any((c / "trainer_state.json").is_file() for c in out.glob("checkpoint-*")):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc


# -- records ------------------------------------------------------------------------------

def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- scripted models behind FakeOpenAI ------------------------------------------------------

def caption_reply(body: dict) -> str:
    """A captioner that echoes the first timestamp label, so each caption names its node."""
    parts = body["messages"][1]["content"]
    first = next(p["text"] for p in parts if p["type"] == "text" and p["text"].startswith("["))
    return f"<think>planning</think>Sure.<caption>Clip starting {first}</caption>"


def fresh_cache(segmented, tmp_path) -> Path:
    """A copy of the `segmented` fixture's cache (conftest) with an empty caption store."""
    _, cache = segmented
    dest = tmp_path / "cache"
    shutil.copytree(cache, dest)
    return dest


# `lvr ask` with three scripted models: a navigator that reads (2, 3), then (2, 3, 1), asks
# video_qa about (2, 3, 1) and answers B; a captioner that names each clip's level and span;
# a video_qa model with one reply.
ASK_SECRET = "sk-test-ask-SECRET-0987654321"
ASK_SCRIPT = [
    "<think>The second high clip looks promising; check its third medium clip.</think>\n"
    "<tool>get_caption((2, 3))</tool>",
    "<think>Now the first low clip inside it.</think><tool>get_caption((2, 3, 1))</tool>",
    '<think>Verify with the frames.</think><tool>video_qa((2, 3, 1), "What is in the hands?")</tool>',
    "<think>The frames confirm it.</think><answer>B</answer>",
]
QA_REPLY = "A white cup."


def caption_text(body: dict) -> str:
    """The scripted caption of the clip a caption request is about: 'A <level> clip from <start> to <end>.'"""
    intro = body["messages"][1]["content"][0]["text"]
    m = re.search(r"from a (\w+)-level clip of a video, from (\S+) to (\S+)\.(?:\s|$)", intro)
    return f"A {m.group(1)} clip from {m.group(2)} to {m.group(3)}."


def scripted(body: dict) -> str:
    """The reply of the scripted model ("navigator", "captioner" or "qa") that BODY is addressed to."""
    model = body["model"]
    if model == "captioner":
        return f"<caption>{caption_text(body)}</caption>"
    if model == "qa":
        return QA_REPLY
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return ASK_SCRIPT[min(turns, len(ASK_SCRIPT) - 1)]


def model_flags(url: str) -> list[str]:
    """`lvr ask` flags naming the three scripted models at URL."""
    return ["--base-url", url, "--model", "navigator", "--caption-model", "captioner", "--qa-model", "qa",
            "--api-key", ASK_SECRET]


# -- trajectories with dropped turns (preference pairs, DPO) ---------------------------------

TRAJECTORY_K = 4
TRAJECTORY_OPTIONS = ["A. a cup", "B. a book", "C. keys", "D. a hat"]


def trajectory(i: int = 0, *, answer: str = "B", wrong: tuple[str, str] = ("A", "C"),
               dropped_after: tuple[int, int] = (1, 2), category: str | None = None,
               accepted: bool = True, short: bool = False) -> dict:
    """An accepted trajectory: three kept turns (tool, tool, answer) and two dropped wrong answers.

    The hints are shown after the dropped turns, appended to the user message that the
    dropped turn answered; the clean messages hold no hint. `short`: a one-line system
    prompt, for fast training tests.
    """
    k, options = TRAJECTORY_K, TRAJECTORY_OPTIONS
    high = [((j,), 60.0 * (j - 1), 60.0 * j, f"Scene {j} of video {i}: a room with things.") for j in range(1, k + 1)]
    system = f"Navigate the caption tree (K={k})." if short else system_prompt(DEFAULT_SYSTEM_PROMPT, k)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": first_user_message(f"What does the man in video {i} pick up after the call "
                                                       f"and before leaving?", options, 240.0, high)},
        {"role": "assistant", "content": "<think>The call is in clip (2,); read its first medium clip.</think>\n"
                                         "<tool>get_caption((2, 1))</tool>"},
        {"role": "user", "content": tool_result_message("get_caption", (2, 1), 60.0, 75.0,
                                                        f"The phone rings; the man of video {i} stands up.")},
        {"role": "assistant", "content": "<think>The pick-up should follow in low clip 3.</think>\n"
                                         "<tool>get_caption((2, 1, 3))</tool>"},
        {"role": "user", "content": tool_result_message("get_caption", (2, 1, 3), 67.5, 71.25,
                                                        "He takes a book from the shelf and walks out.")},
        {"role": "assistant", "content": f"<think>He took a book, so {answer}.</think>\n<answer>{answer}</answer>"},
    ]
    hints = [{"level": 1, "after_turn": dropped_after[0], "ids": [[2]], "text": hint_text(1, [(2,)])},
             {"level": 2, "after_turn": dropped_after[1], "ids": [[2, 1]], "text": hint_text(2, [(2, 1)])}]
    dropped = [{"after_turn": a, "text": f"<think>Guessing it is {w}.</think>\n<answer>{w}</answer>", "answer": w,
                "hint_level": n} for n, (a, w) in enumerate(zip(dropped_after, wrong), 1)]
    return {"schema": "lvr.trajectory/1", "qid": f"q{i}", "video": "v.mp4", "video_id": f"vid{i}", "K": k,
            "duration": 240.0, "question": f"video {i}", "options": options, "answer": answer,
            "clues": [[68.0, 70.0]], "category": category, "accepted": accepted, "correct": accepted,
            "stopped": "answered", "attempts": 3, "messages": messages, "hints": hints, "dropped": dropped}


# -- trace pages in a real browser ------------------------------------------------------------

class PageElements(HTMLParser):
    """Every start tag with its attributes, plus the text inside <script> elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: (v or "") for k, v in attrs}))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def parse_page(page: str) -> PageElements:
    p = PageElements()
    p.feed(page)
    p.close()
    return p


def tree_boxes(p: PageElements) -> dict[str, dict]:
    """The attributes of each node box of a trace page's tree, by data-id ('2-3-1')."""
    return {a["data-id"]: a for t, a in p.tags if t == "div" and "node" in a.get("class", "").split()}


def chromium_or_skip() -> str:
    """The `chromium` executable; skips the test without one, fails it under LVR_REQUIRE_CHROMIUM."""
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("LVR_REQUIRE_CHROMIUM"):
            pytest.fail("LVR_REQUIRE_CHROMIUM is set but no `chromium` on PATH "
                        "(bash scripts/setup.sh --dev installs it)")
        pytest.skip("no `chromium` on PATH: install it (apt-get install chromium, or bash scripts/setup.sh --dev); "
                    "set LVR_REQUIRE_CHROMIUM=1 to make this a failure")
    return exe


def run_chromium(exe: str, profile: Path, *args: str) -> subprocess.Popen:
    """Headless Chromium with its own profile and no network."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def open_in_chromium(exe: str, page: Path, work: Path, *, screenshot: Path | None = None,
                     window: str = "1280,1200") -> PageElements:
    """Open a page offline in headless Chromium: its DOM after the page's own script ran, parsed, and,
    with `screenshot`, a PNG of it taken at the same time (each run with its own profile under `work`)."""
    url = page.as_uri()
    browsers = [run_chromium(exe, work / "profile-dom", "--virtual-time-budget=3000", "--dump-dom", url)]
    if screenshot is not None:
        browsers.append(run_chromium(exe, work / "profile-shot", "--virtual-time-budget=3000",
                                     f"--screenshot={screenshot}", f"--window-size={window}", url))
    try:
        outputs = [b.communicate(timeout=60) for b in browsers]
    finally:
        for browser in browsers:
            if browser.poll() is None:
                browser.kill()
                browser.wait()
    for browser, (_, err) in zip(browsers, outputs):
        assert browser.returncode == 0, err.decode("utf-8", "replace")[-2000:]
    if screenshot is not None:
        assert screenshot.is_file(), outputs[1][1].decode("utf-8", "replace")[-2000:]
    dom = outputs[0][0].decode("utf-8", "replace")
    assert "<body" in dom, outputs[0][1].decode("utf-8", "replace")[-2000:]
    return parse_page(dom)


# -- `transformers serve` -------------------------------------------------------------------

SERVE_START_TIMEOUT_S = 90


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def offline_env(home: Path) -> dict:
    """The environment of a server that must not reach the network: its own empty HF home, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HF_", "TRANSFORMERS_"))}
    (home / "hub").mkdir(parents=True, exist_ok=True)  # /v1/models scans an (empty) cache here
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


class ServeProcess:
    """`transformers serve` in its own process group, with its log in a file; it dies with us."""

    def __init__(self, model_dir: Path, workdir: Path):
        self.model = str(model_dir)  # a pinned server answers only to this exact name
        self.log_path = workdir / "serve.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                                "import sys; from transformers.cli.transformers import main; "
                                                "sys.argv[0] = 'transformers'; sys.exit(main())"]
        cmd += ["serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                "--trust-remote-code", "--log-level", "warning"]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=offline_env(workdir / "hf-home"), cwd=workdir,
                                     preexec_fn=_die_with_parent)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = SERVE_START_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"transformers serve not ready after {timeout_s} s:\n{self.log()[-4000:]}")

    def chat_requests(self) -> int:
        """POSTs to /v1/chat/completions answered 200 so far, from uvicorn's access log.

        Only answered ones: at temperature 1 the tiny model now and then writes what the
        server's own reply parser chokes on (a 500), and lvr then retries, as it should.
        """
        return self.log().count('"POST /v1/chat/completions HTTP/1.1" 200')

    def transcription_requests(self) -> int:
        """POSTs to /v1/audio/transcriptions answered 200 so far, from uvicorn's access log."""
        return self.log().count('"POST /v1/audio/transcriptions HTTP/1.1" 200')

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        self._log.close()

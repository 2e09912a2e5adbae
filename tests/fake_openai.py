"""A small OpenAI-compatible server for tests: records what it is sent and misbehaves on request.

    with FakeOpenAI(reply=lambda body: "yes") as server:
        model = OpenAIChat("fake-model", server.url)
        ...
        server.requests[0]["messages"]

Faults are queued in `server.faults` and consumed one per /chat/completions request
before normal replies:
    ("status", 500)                         an error status with an OpenAI-style error body
    ("status", 429, {"Retry-After": "1"})   ... with extra response headers
    ("status", 401, {}, "raw body text")    ... with a body of our choosing
    ("hang", 2.0)                           sleep, then reply normally (to a client that has given up)
    ("close",)                              send headers, half the body, then drop the connection
    ("json", {...})                         a 200 with this JSON body (for malformed replies)

Like vLLM, `strict_models=True` answers 404 to a model name not in `models`, and
`max_images=N` answers 400 "At most N image(s) may be provided in one prompt." to a
request with more images. With `api_key=KEY`, every request without
"Authorization: Bearer KEY" gets a 401 that echoes the key it was sent (as some servers do).
`models_status=500` makes GET /v1/models fail with that status (chat still works).

POST /v1/audio/transcriptions (multipart/form-data, as OpenAI, vLLM and `transformers serve`
take it) is answered too: each request's form fields and uploaded file are recorded in
`server.transcriptions` ({"fields": {...}, "file": bytes, "filename": str}), and the reply is
`transcribe(request)`, a verbose_json body (default: one segment "speech" running the whole
WAV). The same `faults` queue applies, one fault per transcription request.
"""

from __future__ import annotations

import io
import json
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

IMAGE_TOKENS = 10  # what one image counts for in the fake prompt_tokens


def prompt_token_count(body: dict) -> int:
    """Rough prompt tokens: words of text plus IMAGE_TOKENS per image."""
    total = 0
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    total += len(str(part.get("text", "")).split())
                elif part.get("type") == "image_url":
                    total += IMAGE_TOKENS
    return total


def prompt_image_count(body: dict) -> int:
    return sum(1 for message in body.get("messages", []) if isinstance(message.get("content"), list)
               for part in message["content"] if isinstance(part, dict) and part.get("type") == "image_url")


def wav_seconds(data: bytes) -> float:
    """The length of a WAV file's audio, in seconds."""
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnframes() / w.getframerate()


def whole_file_segment(request: dict) -> dict:
    """The default transcription: one segment, "speech", running the whole uploaded WAV."""
    seconds = wav_seconds(request["file"])
    return {"task": "transcribe", "language": "english", "duration": seconds, "text": "speech",
            "segments": [{"id": 0, "start": 0.0, "end": seconds, "text": "speech", "avg_logprob": -0.2,
                          "no_speech_prob": 0.01}]}


def parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes | None, str | None]:
    """(form fields, the uploaded file's bytes, its file name) of a multipart/form-data body."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    fields: dict[str, str] = {}
    upload, filename = None, None
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.partition(b"\r\n\r\n")
        data = data[:-2] if data.endswith(b"\r\n") else data
        disposition = next((line for line in head.decode().split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        params = dict(p.strip().split("=", 1) for p in disposition.split(";")[1:] if "=" in p)
        name = params.get("name", "").strip('"')
        if "filename" in params:
            upload, filename = data, params["filename"].strip('"')
        else:
            fields[name] = data.decode()
    return fields, upload, filename


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # a concurrency benchmark opens many connections at once
    allow_reuse_address = True


class FakeOpenAI:
    def __init__(self, reply: Callable[[dict], str] | str = "ok", *, latency_s: float = 0.0,
                 models: tuple[str, ...] | list[str] = ("fake-model",), max_images: int | None = None,
                 api_key: str | None = None, strict_models: bool = False, models_status: int = 200,
                 transcribe: Callable[[dict], dict] = whole_file_segment):
        self.reply = reply
        self.transcribe = transcribe
        self.transcriptions: list[dict] = []
        self.models_status = models_status
        self.strict_models = strict_models
        self.max_images = max_images
        self.api_key = api_key
        self.latency_s = latency_s
        self.models = list(models)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.faults: list = []
        self.active = 0  # /chat/completions requests being handled right now
        self.max_active = 0  # the most seen at once
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle --------------------------------------------------------

    def start(self) -> "FakeOpenAI":
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-openai")
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- behaviour --------------------------------------------------------

    def _next_fault(self):
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def _answer(self, body: dict) -> dict:
        text = self.reply(body) if callable(self.reply) else str(self.reply)
        words = text.split()
        finish = "stop"
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, words, finish = " ".join(words[:max_tokens]), words[:max_tokens], "length"
        prompt = prompt_token_count(body)
        return {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(words),
                      "total_tokens": prompt + len(words)},
        }

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real servers
            # Buffered writes and no Nagle: headers and body leave in one packet, so a
            # keep-alive client is not held up ~40 ms by delayed ACKs on every request.
            wbufsize = -1
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: Any, headers: dict | None = None) -> None:
                data = payload if isinstance(payload, bytes) else (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _refuse_key(self) -> bool:
                """Answer 401 when a key is required and not given; True when refused."""
                if fake.api_key is None:
                    return False
                given = self.headers.get("Authorization") or ""
                if given == f"Bearer {fake.api_key}":
                    return False
                sent = given.removeprefix("Bearer ") or "(none)"
                self._send(401, {"error": {"message": f"Incorrect API key provided: {sent}.",
                                           "type": "invalid_request_error", "code": "invalid_api_key"}})
                return True

            def do_GET(self) -> None:
                if self._refuse_key():
                    return
                if self.path.rstrip("/") == "/v1/models" and fake.models_status != 200:
                    self._send(fake.models_status, {"error": {"message": "fake model list failure"}})
                elif self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list",
                                     "data": [{"id": m, "object": "model"} for m in fake.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") == "/v1/audio/transcriptions":
                    self._transcription(raw)
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                if self._refuse_key():
                    return
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                try:
                    self._serve(body)
                except ConnectionError:
                    pass  # the client gave up (timeouts); nothing to tell it
                finally:
                    with fake._lock:
                        fake.active -= 1

            def _transcription(self, raw: bytes) -> None:
                if self._refuse_key():
                    return
                try:
                    fields, upload, filename = parse_multipart(self.headers.get("Content-Type") or "", raw)
                except (IndexError, ValueError, UnicodeDecodeError):
                    self._send(400, {"error": {"message": "body is not multipart/form-data"}})
                    return
                if upload is None:
                    self._send(400, {"error": {"message": "no file uploaded"}})
                    return
                request = {"fields": fields, "file": upload, "filename": filename}
                with fake._lock:
                    fake.transcriptions.append(request)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                try:
                    fault = fake._next_fault()
                    if fault is None:
                        self._send(200, fake.transcribe(request))
                    elif fault[0] == "status":
                        code = fault[1]
                        self._send(code, fault[3] if len(fault) > 3 else {
                            "error": {"message": f"fake error {code}", "type": "fake", "code": code}},
                            fault[2] if len(fault) > 2 else {})
                    elif fault[0] == "hang":
                        fake._stopping.wait(fault[1])
                        self._send(200, fake.transcribe(request))
                    elif fault[0] == "json":
                        self._send(200, fault[1])
                    else:
                        raise ValueError(f"fault {fault!r} is not one a transcription request takes")
                except ConnectionError:
                    pass  # the client gave up (timeouts); nothing to tell it

            def _serve(self, body: dict) -> None:
                if fake.latency_s:
                    fake._stopping.wait(fake.latency_s)
                fault = fake._next_fault()
                if fault is None and fake.strict_models and body.get("model") not in fake.models:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                               "type": "NotFoundError", "param": None, "code": 404}})
                    return
                if fault is None and fake.max_images is not None and prompt_image_count(body) > fake.max_images:
                    self._send(400, {"error": {
                        "message": f"At most {fake.max_images} image(s) may be provided in one prompt.",
                        "type": "BadRequestError", "param": None, "code": 400}})
                    return
                if fault is None:
                    self._send(200, fake._answer(body))
                    return
                kind = fault[0]
                if kind == "status":
                    code = fault[1]
                    headers = fault[2] if len(fault) > 2 else {}
                    payload = fault[3] if len(fault) > 3 else {
                        "error": {"message": f"fake error {code}", "type": "fake", "code": code}}
                    self._send(code, payload, headers)
                elif kind == "hang":
                    fake._stopping.wait(fault[1])
                    self._send(200, fake._answer(body))
                elif kind == "close":
                    data = json.dumps(fake._answer(body)).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif kind == "json":
                    self._send(200, fault[1])
                else:
                    raise ValueError(f"unknown fault {fault!r}")

        return Handler

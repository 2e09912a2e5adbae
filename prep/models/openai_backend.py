"""A chat model behind any OpenAI-compatible HTTP endpoint (vLLM, SGLang, llama.cpp, OpenAI).

Requests run concurrently (bounded by a semaphore), spread over one or more base
URLs, and are retried with exponential backoff and full jitter on timeouts,
dropped connections, 429 and 5xx. The API key never leaves the Authorization
header: every message we build passes through `redact`. All of that lives in
`OpenAIEndpoint`, which the chat client here and the transcription client
(asr.py, /audio/transcriptions) share.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import random
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import httpx

from .base import Completion, GenerationOptions, Message, ModelError, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_REDACTED = "<redacted>"
_MAX_DETAIL = 200
# httpcore's pool does work quadratic in its connection count on every request
# (encode/httpcore#1035), so high concurrency is spread over several small clients.
_CONNECTIONS_PER_CLIENT = 8


def _split_urls(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [u.strip().rstrip("/") for u in items if u and u.strip()]


def resolve_base_urls(base_urls: list[str] | str | None) -> list[str]:
    """The endpoints a client talks to: the given ones, else $OPENAI_BASE_URL, else OpenAI's.

    Comma-separated strings are split; blanks and trailing slashes are dropped.
    """
    return _split_urls(base_urls) or _split_urls(os.environ.get("OPENAI_BASE_URL")) or [DEFAULT_BASE_URL]


def _one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_openai_messages(messages: list[Message]) -> list[dict]:
    """Our message parts in the wire shape: images become base64 JPEG data URLs."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    data = base64.b64encode(part["jpeg"]).decode("ascii")
                    parts.append({"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}})
                else:
                    parts.append(part)  # text parts (and parts already in wire shape) go as they are
            message = {**message, "content": parts}
        out.append(message)
    return out


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _server_message(response: httpx.Response) -> str:
    """The server's own words about an error: OpenAI's {"error": {"message"}}, FastAPI's detail, or raw text."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return response.text
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return err if isinstance(err, str) else json.dumps(err)
    return json.dumps(body)


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may fix."""

    def __init__(self, kind: str, detail: str = "", *, retry_after: float | None = None, connect: bool = False):
        super().__init__(kind)
        self.kind = kind  # "HTTP 500", "ReadTimeout", ...
        self.detail = detail
        self.retry_after = retry_after
        self.connect = connect  # the request never reached a server


class OpenAIEndpoint:
    """What every client of OpenAI-compatible endpoints shares: several base URLs, a bound on
    requests in flight, retries with backoff, and an API key kept out of every message.

    A client (chat, transcription) calls `post` with its request and a parser of the reply.
    """

    def __init__(self, model: str, base_urls: list[str] | str | None = None, api_key: str | None = None, *,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        urls = resolve_base_urls(base_urls)
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base URL must start with http:// or https://: {_one_line(url)!r}")
        self.name = model
        self.base_urls = urls
        self._api_key = api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or None)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        # Per-URL state; only touched from the event loop that owns the client.
        self._in_flight = {u: 0 for u in urls}
        self._failures = {u: 0 for u in urls}
        self._down_until = {u: 0.0 for u in urls}
        self._rr = 0
        # Loop-bound objects, made lazily inside the running loop (see _ensure).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._clients: list[httpx.AsyncClient] = []
        self._client_load: list[int] = []

    def __repr__(self) -> str:
        return self.redact(f"{type(self).__name__}(model={self.name!r}, base_urls={self.base_urls!r})")

    __str__ = __repr__

    def redact(self, text: str) -> str:
        """Text with the API key cut out, should it ever show up (say, echoed by a server)."""
        text = str(text)
        if self._api_key:
            text = text.replace(self._api_key, _REDACTED)
        return text

    # -- plumbing ---------------------------------------------------------

    def _ensure(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # asyncio primitives and httpx pools belong to one loop; a new loop (a second
            # asyncio.run) gets fresh ones. The old client's loop is gone, so it is dropped.
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            shards = -(-self.concurrency // _CONNECTIONS_PER_CLIENT)
            per_client = -(-self.concurrency // shards) + len(self.base_urls)  # + room for list_models
            # keep-alive == max connections: the semaphore already bounds requests, so the
            # pool never queues and never evicts a connection it is about to hand out.
            limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
            tls = httpx.create_ssl_context()  # one for all clients: loading CA certificates is slow
            self._clients = [httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout_s),
                                               limits=limits, verify=tls)
                             for _ in range(shards)]
            self._client_load = [0] * shards
            self._sem = asyncio.Semaphore(self.concurrency)
            self._loop = loop
            self._in_flight = {u: 0 for u in self.base_urls}
        assert self._sem is not None
        return self._sem

    def _pick_client(self) -> int:
        return min(range(len(self._clients)), key=self._client_load.__getitem__)

    def _pick_url(self, avoid: set[str]) -> str:
        candidates = [u for u in self.base_urls if u not in avoid] or list(self.base_urls)
        now = time.monotonic()
        healthy = [u for u in candidates if self._down_until[u] <= now]
        candidates = healthy or candidates
        fewest = min(self._in_flight[u] for u in candidates)
        tied = [u for u in candidates if self._in_flight[u] == fewest]
        self._rr += 1
        return tied[self._rr % len(tied)]

    def _mark_failed(self, url: str) -> None:
        # A URL that keeps failing is skipped for a while, growing up to backoff_max_s,
        # so a dead replica does not cost every request a failed first attempt.
        self._failures[url] += 1
        cool = min(self.backoff_max_s, max(self.backoff_base_s, 0.05) * 2.0 ** min(self._failures[url] - 1, 30))
        self._down_until[url] = time.monotonic() + cool

    def _mark_ok(self, url: str) -> None:
        self._failures[url] = 0
        self._down_until[url] = 0.0

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after)
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(retry, 30)))

    # -- one attempt ------------------------------------------------------

    async def _attempt(self, client: httpx.AsyncClient, url: str, path: str, send: dict,
                       parse: Callable[[httpx.Response], T]) -> T:
        """One POST; returns the parsed reply or raises."""
        try:
            response = await client.post(f"{url}{path}", **send)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retryable(type(exc).__name__, str(exc), connect=True) from None
        except httpx.TimeoutException as exc:
            raise _Retryable(type(exc).__name__, f"no answer within {self.timeout_s:g} s") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retryable(type(exc).__name__, str(exc)) from None
        except httpx.HTTPError as exc:  # bad URL, local protocol misuse: retrying cannot help
            raise ModelError(self._error(url, type(exc).__name__, str(exc))) from None

        status = response.status_code
        if status == 429 or status >= 500:
            retry_after = _retry_after_seconds(response.headers.get("Retry-After")) if status in (429, 503) else None
            raise _Retryable(f"HTTP {status}", _server_message(response), retry_after=retry_after)
        if status != 200:
            raise ModelError(self._error(url, f"HTTP {status}", _server_message(response)))
        try:
            return parse(response)
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed response", response.text) from None

    def _error(self, url: str, kind: str, detail: str) -> str:
        # Redact before truncating, so a key cut in half at the limit cannot slip through.
        detail = _one_line(self.redact(detail)) if detail else ""
        head = _one_line(self.redact(f"model {self.name} at {url}: {kind}"), 400)
        return f"{head}: {detail}" if detail else head

    # -- public -----------------------------------------------------------

    async def post(self, path: str, parse: Callable[[httpx.Response], T], **send: Any) -> T:
        """POST to `path` under one of the base URLs (`send`: httpx's content=, data=, files=,
        headers=) and return `parse(reply)`, retrying timeouts, dropped connections, 429 and 5xx
        and replies `parse` cannot read (it raises ValueError, KeyError, IndexError or TypeError).
        Raises ModelError, one line, when no attempt succeeds."""
        sem = self._ensure()
        attempts = self.max_retries + 1
        tried: set[str] = set()
        for attempt in range(attempts):
            async with sem:
                url = self._pick_url(tried)
                shard = self._pick_client()
                self._in_flight[url] += 1
                self._client_load[shard] += 1
                try:
                    result = await self._attempt(self._clients[shard], url, path, send, parse)
                except _Retryable as failure:
                    failed = failure
                else:
                    failed = None
                finally:
                    self._in_flight[url] -= 1
                    self._client_load[shard] -= 1
            if failed is None:
                self._mark_ok(url)
                return result
            self._mark_failed(url)
            tried.add(url)
            others_left = len(tried) < len(self.base_urls)
            if not others_left:
                tried.clear()  # every URL had a go; start over rather than give up early
            if attempt + 1 >= attempts:
                raise ModelError(self._error(url, f"{failed.kind} after {attempts} attempts", failed.detail))
            # A refused connection never reached a server: try another URL at once if there is one.
            switch_now = failed.connect and others_left
            delay = 0.0 if switch_now else self._backoff(attempt, failed.retry_after)
            log.info("%s (retry %d/%d in %.2f s)", self._error(url, failed.kind, failed.detail),
                     attempt + 1, self.max_retries, delay)
            if delay > 0:
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    async def list_models(self) -> dict[str, list[str]]:
        """Model ids each base URL serves (GET {base}/models), for a preflight check."""
        self._ensure()
        client = self._clients[0]

        async def one(url: str) -> list[str]:
            try:
                response = await client.get(f"{url}/models")
            except httpx.HTTPError as exc:
                raise ModelError(self._error(url, f"GET /models: {type(exc).__name__}", str(exc))) from None
            if response.status_code != 200:
                raise ModelError(self._error(url, f"GET /models: HTTP {response.status_code}",
                                              _server_message(response)))
            try:
                return [str(m["id"]) for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise ModelError(self._error(url, "GET /models: malformed response", response.text)) from None

        results = await asyncio.gather(*(one(u) for u in self.base_urls), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:
            raise ModelError(" | ".join(errors))
        return dict(zip(self.base_urls, results))  # type: ignore[arg-type]

    async def check_reachable(self) -> None:
        """Fail fast, within one timeout, when no base URL can be reached at all.

        Only transport failures count: a server that answers GET /models with an
        error status is up, and some servers have no /models route.
        """
        self._ensure()
        client = self._clients[0]

        async def one(url: str) -> str | None:
            try:
                await client.get(f"{url}/models")
            except httpx.TransportError as exc:
                return self._error(url, f"cannot reach the server ({type(exc).__name__})", str(exc))
            return None

        errors = [e for e in await asyncio.gather(*(one(u) for u in self.base_urls)) if e]
        if len(errors) == len(self.base_urls):
            raise ModelError(" | ".join(errors))

    async def aclose(self) -> None:
        clients, self._clients, self._loop, self._sem = self._clients, [], None, None
        for client in clients:
            await client.aclose()


def _chat_reply(response: httpx.Response) -> tuple[dict, dict, dict]:
    """(response JSON, first choice, its message) of a /chat/completions reply."""
    data = response.json()
    choice = data["choices"][0]
    message = choice["message"]
    if not isinstance(choice, dict) or not isinstance(message, dict):
        raise TypeError
    return data, choice, message


class OpenAIChat(OpenAIEndpoint):
    """ChatModel over OpenAI-compatible /chat/completions endpoints."""

    def __init__(self, model: str, base_urls: list[str] | str | None = None, api_key: str | None = None, *,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, extra_body: dict | None = None):
        super().__init__(model, base_urls, api_key, concurrency=concurrency, timeout_s=timeout_s,
                         max_retries=max_retries, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s)
        self.extra_body = dict(extra_body or {})
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    def _payload(self, messages: list[Message], options: GenerationOptions) -> dict:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": to_openai_messages(messages),
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
        }
        if options.stop:
            body["stop"] = list(options.stop)
        if options.seed is not None:
            body["seed"] = options.seed
        for key, value in self.extra_body.items():
            # None drops a field a server refuses (e.g. max_tokens on newer OpenAI models).
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return body

    async def complete(self, messages: list[Message], options: GenerationOptions = GenerationOptions()) -> Completion:
        started = time.monotonic()
        body = json.dumps(self._payload(messages, options)).encode("utf-8")
        data, choice, message = await self.post("/chat/completions", _chat_reply, content=body,
                                                headers={"Content-Type": "application/json"})
        raw = data.get("usage")
        raw = raw if isinstance(raw, dict) else {}
        usage = Usage(prompt_tokens=int(raw.get("prompt_tokens") or 0),
                      completion_tokens=int(raw.get("completion_tokens") or 0), requests=1)
        with self._usage_lock:
            self.usage.add(usage)
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        reasoning = None
        if isinstance(message, dict):
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        return Completion(text=content or "", model=self.name, usage=usage,
                          seconds=time.monotonic() - started, finish_reason=choice.get("finish_reason"),
                          reasoning=reasoning if isinstance(reasoning, str) and reasoning.strip() else None)

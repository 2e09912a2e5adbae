"""OpenAIChat against the in-test FakeOpenAI server: wire shape, accounting, retries, routing, secrecy."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import socket
import time
from email.utils import formatdate

import pytest

from lvr.prep.models.base import ChatModel, GenerationOptions, ModelError, image_part, text_part
from lvr.prep.models.openai_backend import OpenAIChat, _retry_after_seconds
from fake_openai import IMAGE_TOKENS, FakeOpenAI

FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05)  # keep retry sleeps short unless a test needs them
KEY = "sk-test-0123456789abcdefSECRET"
JPEG_A = b"\xff\xd8\xff\xe0fake-jpeg-A\x00\x01\x02\xff\xd9"
JPEG_B = b"\xff\xd8\xff\xe0fake-jpeg-B" + bytes(range(256)) + b"\xff\xd9"


def run(coro):
    return asyncio.run(coro)


async def call(model: OpenAIChat, messages, options=GenerationOptions()):
    try:
        return await model.complete(messages, options)
    finally:
        await model.aclose()


def ask(text: str = "hello there") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def dead_url() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


# -- wire shape and accounting ---------------------------------------------


def test_payload_shape(server):
    model = OpenAIChat("fake-model", server.url)
    assert isinstance(model, ChatModel)
    messages = [
        {"role": "system", "content": "You watch videos."},
        {"role": "user", "content": [text_part("Frames:"), image_part(JPEG_A), image_part(JPEG_B),
                                     text_part("What happens?")]},
    ]
    options = GenerationOptions(max_tokens=77, temperature=0.3, top_p=0.9, stop=("</answer>",), seed=7)
    result = run(call(model, messages, options))
    assert result.text == "ok"
    body = server.requests[0]
    assert body["model"] == "fake-model"
    assert body["messages"][0] == {"role": "system", "content": "You watch videos."}
    parts = body["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "text"]
    assert parts[0] == {"type": "text", "text": "Frames:"}
    assert parts[3] == {"type": "text", "text": "What happens?"}
    for part, jpeg in ((parts[1], JPEG_A), (parts[2], JPEG_B)):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == jpeg
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
        77, 0.3, 0.9, ["</answer>"], 7)
    # No key configured: no Authorization header at all (local servers need none).
    assert "authorization" not in server.headers[0]
    # The caller's messages are left as they were.
    assert messages[1]["content"][1] == image_part(JPEG_A)


def test_default_options_leave_out_stop_and_seed(server):
    run(call(OpenAIChat("m", server.url), ask()))
    body = server.requests[0]
    assert "stop" not in body and "seed" not in body
    assert body["max_tokens"] == GenerationOptions().max_tokens


def test_extra_body_adds_and_drops_fields(server):
    model = OpenAIChat("m", server.url, extra_body={"max_tokens": None, "max_completion_tokens": 50,
                                                    "chat_template_kwargs": {"enable_thinking": False}})
    run(call(model, ask()))
    body = server.requests[0]
    assert "max_tokens" not in body
    assert body["max_completion_tokens"] == 50
    assert body["chat_template_kwargs"] == {"enable_thinking": False}


def test_usage_accounting():
    with FakeOpenAI(reply=lambda body: "one two three four five") as fake:
        model = OpenAIChat("fake-model", fake.url)

        async def go():
            a = await model.complete([{"role": "user", "content": [text_part("six words in this prompt here"),
                                                                   image_part(JPEG_A), image_part(JPEG_B)]}])
            b = await model.complete(ask("three more words"), GenerationOptions(max_tokens=2))
            await model.aclose()
            return a, b

        a, b = run(go())
    assert a.text == "one two three four five" and a.finish_reason == "stop"
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.requests) == (6 + 2 * IMAGE_TOKENS, 5, 1)
    assert a.model == "fake-model" and a.seconds > 0
    assert b.text == "one two" and b.finish_reason == "length"
    assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (3, 2)
    assert (model.usage.prompt_tokens, model.usage.completion_tokens, model.usage.requests) == (29, 7, 2)
    assert model.usage.total_tokens == 36


def test_missing_usage_and_null_content_are_tolerated(server):
    server.faults.append(("json", {"choices": [{"message": {"role": "assistant", "content": None},
                                                "finish_reason": "tool_calls"}]}))
    result = run(call(OpenAIChat("m", server.url), ask()))
    assert result.text == "" and result.finish_reason == "tool_calls"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.requests) == (0, 0, 1)


def test_list_models():
    with FakeOpenAI(models=("a", "b")) as one, FakeOpenAI(models=("c",)) as two:
        model = OpenAIChat("a", [one.url, two.url])

        async def go():
            try:
                return await model.list_models()
            finally:
                await model.aclose()

        assert run(go()) == {one.url: ["a", "b"], two.url: ["c"]}
        model = OpenAIChat("a", [one.url, dead_url()])
        with pytest.raises(ModelError, match="GET /models"):
            run(go())


def test_base_urls_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://a:1/v1/, http://b:2/v1")
    assert OpenAIChat("m").base_urls == ["http://a:1/v1", "http://b:2/v1"]
    assert OpenAIChat("m", "http://c:3/v1").base_urls == ["http://c:3/v1"]
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert OpenAIChat("m").base_urls == ["https://api.openai.com/v1"]
    with pytest.raises(ValueError):
        OpenAIChat("m", "localhost:8000/v1")


# The first loop ends without aclose(), so its pooled socket is only closed by the collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_reusable_across_event_loops(server):
    model = OpenAIChat("m", server.url)
    assert run(model.complete(ask())).text == "ok"
    assert run(call(model, ask())).text == "ok"  # a second asyncio.run gets a fresh client and semaphore
    assert model.usage.requests == 2
    gc.collect()


# -- retries -----------------------------------------------------------------


def test_500_twice_then_success(server):
    server.faults += [("status", 500), ("status", 502)]
    model = OpenAIChat("m", server.url, max_retries=5, **FAST)
    result = run(call(model, ask()))
    assert result.text == "ok"
    assert len(server.requests) == 3
    assert model.usage.requests == 1


def test_429_retry_after_is_honoured(server):
    server.faults.append(("status", 429, {"Retry-After": "1"}))
    model = OpenAIChat("m", server.url, backoff_base_s=0.01, backoff_max_s=5)
    started = time.monotonic()
    result = run(call(model, ask()))
    assert time.monotonic() - started >= 0.95
    assert result.seconds >= 0.95  # wall time counts the retries
    assert len(server.requests) == 2


def test_retry_after_is_capped(server):
    server.faults.append(("status", 503, {"Retry-After": "60"}))
    model = OpenAIChat("m", server.url, backoff_base_s=0.01, backoff_max_s=0.1)
    started = time.monotonic()
    run(call(model, ask()))
    assert time.monotonic() - started < 2


def test_retry_after_parsing():
    assert _retry_after_seconds("2") == 2.0
    assert _retry_after_seconds("-3") == 0.0
    assert _retry_after_seconds(None) is None and _retry_after_seconds("soon") is None
    later = _retry_after_seconds(formatdate(time.time() + 10, usegmt=True))
    assert 8 <= later <= 11
    assert _retry_after_seconds(formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_hang_past_timeout_then_success(server):
    server.faults.append(("hang", 3.0))
    model = OpenAIChat("m", server.url, timeout_s=0.5, **FAST)
    started = time.monotonic()
    result = run(call(model, ask()))
    elapsed = time.monotonic() - started
    assert result.text == "ok"
    assert 0.45 <= elapsed < 2.5
    assert len(server.requests) == 2


def test_connection_closed_mid_response_then_success(server):
    server.faults.append(("close",))
    model = OpenAIChat("m", server.url, **FAST)
    assert run(call(model, ask())).text == "ok"
    assert len(server.requests) == 2


def test_permanent_500_gives_up(server):
    server.faults += [("status", 500)] * 20
    model = OpenAIChat("m", server.url, max_retries=3, **FAST)
    with pytest.raises(ModelError) as info:
        run(call(model, ask()))
    message = str(info.value)
    assert len(server.requests) == 4
    assert f"model m at {server.url}: HTTP 500 after 4 attempts: fake error 500" == message
    assert "\n" not in message
    assert model.usage.requests == 0


def test_malformed_200_is_an_error(server):
    server.faults += [("json", {"object": "chat.completion"})] * 10
    model = OpenAIChat("m", server.url, max_retries=2, **FAST)
    with pytest.raises(ModelError, match="malformed response after 3 attempts"):
        run(call(model, ask()))
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(server, status):
    long_message = "the prompt has too many images " + "x" * 1000 + "\nsecond line"
    server.faults.append(("status", status, {}, {"error": {"message": long_message}}))
    model = OpenAIChat("m", server.url, **FAST)
    with pytest.raises(ModelError) as info:
        run(call(model, ask()))
    message = str(info.value)
    assert len(server.requests) == 1
    assert message.startswith(f"model m at {server.url}: HTTP {status}: the prompt has too many images")
    assert "\n" not in message and len(message) < 300


def test_plain_text_error_body(server):
    server.faults.append(("status", 400, {}, "Bad request: no such model"))
    with pytest.raises(ModelError, match="HTTP 400: Bad request: no such model"):
        run(call(OpenAIChat("m", server.url), ask()))


def test_unreachable_server_gives_up():
    model = OpenAIChat("m", dead_url(), max_retries=2, **FAST)
    with pytest.raises(ModelError, match="ConnectError after 3 attempts"):
        run(call(model, ask()))


# -- load spreading and concurrency -----------------------------------------


def test_two_urls_share_load():
    with FakeOpenAI(latency_s=0.05) as one, FakeOpenAI(latency_s=0.05) as two:
        model = OpenAIChat("m", [one.url, two.url], concurrency=8, **FAST)

        async def go():
            results = await asyncio.gather(*(model.complete(ask(f"q{i}")) for i in range(24)))
            await model.aclose()
            return results

        results = run(go())
    assert len(results) == 24 and all(r.text == "ok" for r in results)
    assert len(one.requests) + len(two.requests) == 24
    assert len(one.requests) >= 6 and len(two.requests) >= 6


def test_failed_request_moves_to_another_url():
    with FakeOpenAI() as one, FakeOpenAI() as two:
        one.faults += [("status", 500)] * 5
        two.faults += [("status", 500)] * 5
        model = OpenAIChat("m", [one.url, two.url], max_retries=1, **FAST)
        with pytest.raises(ModelError):
            run(call(model, ask()))
        # The retry went to the URL that had not been tried yet.
        assert (len(one.requests), len(two.requests)) == (1, 1)


def test_dead_url_is_routed_around():
    with FakeOpenAI() as live:
        model = OpenAIChat("m", [dead_url(), live.url], max_retries=2, **FAST)

        async def go():
            results = []
            for i in range(5):  # one after another, so each picks a URL afresh
                results.append(await model.complete(ask(f"q{i}")))
            results += await asyncio.gather(*(model.complete(ask(f"p{i}")) for i in range(10)))
            await model.aclose()
            return results

        started = time.monotonic()
        results = run(go())
    assert all(r.text == "ok" for r in results)
    assert len(live.requests) == 15
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("concurrency", [3, 20])  # 20 spreads over several HTTP clients
def test_concurrency_is_bounded(concurrency):
    with FakeOpenAI(latency_s=0.15) as fake:
        model = OpenAIChat("m", fake.url, concurrency=concurrency)

        async def go():
            await asyncio.gather(*(model.complete(ask()) for _ in range(4 * concurrency)))
            await model.aclose()

        run(go())
    assert len(fake.requests) == 4 * concurrency
    assert fake.max_active == concurrency


# -- the API key stays secret -----------------------------------------------


def test_api_key_is_sent_but_never_shown(server, caplog):
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log too; none of it may hold the key
    echo = f"Incorrect API key provided: Bearer {KEY}. Check {KEY}"
    model = OpenAIChat("m", server.url, api_key=KEY, max_retries=1, **FAST)

    # A retried error, then a permanent one, both echoing the key back.
    server.faults += [("status", 500, {}, {"error": {"message": echo}})] * 2
    with pytest.raises(ModelError) as retried:
        run(call(model, ask()))
    server.faults.append(("status", 401, {}, {"error": {"message": echo}}))
    with pytest.raises(ModelError) as rejected:
        run(call(model, ask()))
    server.faults.append(("status", 401, {}, echo * 10))  # a raw body with the key past the truncation point
    with pytest.raises(ModelError) as raw:
        run(call(model, ask()))
    result = run(call(model, ask()))

    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    assert all(h["authorization"] == f"Bearer {KEY}" for h in server.headers)
    for err in (retried.value, rejected.value, raw.value):
        assert KEY not in str(err) and KEY not in repr(err)
        assert "<redacted>" in str(err)
    assert "HTTP 401" in str(rejected.value)
    assert KEY not in repr(model) and KEY not in str(model)
    assert repr(model) == f"OpenAIChat(model='m', base_urls=['{server.url}'])"
    assert KEY not in repr(result)
    assert caplog.records, "expected retry log lines"
    assert KEY not in caplog.text
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_api_key_from_env_and_transport_errors(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = OpenAIChat("m", dead_url(), max_retries=1, **FAST)
    assert model.redact(f"x {KEY} y") == "x <redacted> y"
    with pytest.raises(ModelError) as info:
        run(call(model, ask()))
    assert KEY not in str(info.value) and KEY not in caplog.text
    with FakeOpenAI() as fake:
        model = OpenAIChat("m", fake.url)
        run(call(model, ask()))
        assert fake.headers[0]["authorization"] == f"Bearer {KEY}"

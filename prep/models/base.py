"""What every model backend speaks: chat messages in, text and token counts out.

Messages follow the OpenAI chat shape. A message's content is a string or a
list of parts; parts are {"type": "text", "text": str} or
{"type": "image", "jpeg": bytes} (raw JPEG bytes; each backend turns them into
what its model needs: base64 data URLs for HTTP, PIL images in process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]


class ModelError(Exception):
    """A request failed for good (after retries). One line, never holding an API key."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests

    def to_record(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "requests": self.requests}


@dataclass
class Completion:
    text: str
    model: str
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    finish_reason: str | None = None
    # Reasoning a server returned apart from the content (vLLM/SGLang reasoning parsers).
    reasoning: str | None = None


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@runtime_checkable
class ChatModel(Protocol):
    """A chat model. `complete` is safe to call concurrently from one event loop."""

    name: str  # the model name recorded in outputs

    async def complete(self, messages: list[Message], options: GenerationOptions = GenerationOptions()) -> Completion:
        ...

    async def aclose(self) -> None:
        ...


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(jpeg: bytes) -> dict:
    return {"type": "image", "jpeg": jpeg}


def message_text(content) -> str:
    """A message's text as a text-only chat template sees it: text parts joined by newlines,
    the way OpenAI-compatible servers (vLLM) hand a list of parts to such a template."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def text_messages(messages: list[Message]) -> list[Message]:
    """The conversation with every content as one text (training data, lint): see `message_text`."""
    return [{**m, "content": message_text(m.get("content"))} for m in messages]


def count_images(messages: list[Message]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") == "image")


def probe_images(n: int, side: int = 32) -> list[bytes]:
    """n small, distinct JPEGs for probing whether (and how many) images an endpoint takes."""
    import io

    from PIL import Image

    out = []
    for i in range(n):
        colour = ((i * 53) % 256, (i * 97 + 80) % 256, (i * 151 + 160) % 256)
        buf = io.BytesIO()
        Image.new("RGB", (side, side), colour).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out

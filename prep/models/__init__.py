"""Model backends shared by caption, ask, synthesize and rl.

`make_chat_model` is the one place a backend is chosen:

- ``openai``: any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, OpenAI);
- ``transformers``: an in-process Hugging Face model, on CPU or GPU;
- ``vllm``: an in-process vLLM engine (optional extra ``pip install .[vllm]``);
- ``auto``: ``openai`` when a base URL is given (flag or OPENAI_BASE_URL), else ``transformers``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .base import ChatModel, ModelError

BACKENDS = ("auto", "openai", "transformers", "vllm")


def resolve_backend(backend: str, base_urls: list[str] | None) -> str:
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "openai" if (base_urls or os.environ.get("OPENAI_BASE_URL")) else "transformers"


def make_chat_model(backend: str, model: str | None, *, base_urls: list[str] | None = None,
                    api_key: str | None = None, concurrency: int = 8, timeout_s: float = 120.0,
                    max_retries: int = 5, device: str = "auto") -> ChatModel:
    """Build the chat model a step asked for. Raises ModelError with a one-line reason."""
    kind = resolve_backend(backend, base_urls)
    if not model:
        raise ModelError(f"the {kind} backend needs --model")
    if kind == "openai":
        from .openai_backend import OpenAIChat

        return OpenAIChat(model, base_urls or None, api_key, concurrency=concurrency,
                          timeout_s=timeout_s, max_retries=max_retries)
    if kind == "transformers":
        from .transformers_backend import TransformersChat

        return TransformersChat(model, device=device)
    from .vllm_backend import VLLMChat

    return VLLMChat(model)


@dataclass(frozen=True)
class ModelSpec:
    """Which model a role uses. The API key is kept out of every record."""

    backend: str = "auto"
    model: str | None = None
    base_urls: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    device: str = "auto"

    def to_record(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        d["base_urls"] = list(self.base_urls)
        return d

    def build(self):
        return make_chat_model(self.backend, self.model, base_urls=list(self.base_urls),
                               api_key=self.api_key, concurrency=self.concurrency,
                               timeout_s=self.timeout_s, max_retries=self.max_retries,
                               device=self.device)

"""Model backends shared by caption, ask, synthesize and rl.

`make_chat_model` is the one place a backend is chosen:

- ``openai``: any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, OpenAI);
- ``transformers``: an in-process Hugging Face model, on CPU or GPU;
- ``vllm``: an in-process vLLM engine (optional extra ``pip install .[vllm]``);
- ``auto``: ``openai`` when a base URL is given (flag or OPENAI_BASE_URL), else ``transformers``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

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


# -- roles: the reasoning model, the captioner and the video_qa model ----------------

ROLE_FLAGS = {"reasoning": ("--model", "--base-url"), "caption": ("--caption-model", "--caption-base-url"),
              "qa": ("--qa-model", "--qa-base-url")}

NO_MODEL_HELP = (
    "no model given. Serve one behind an OpenAI-compatible server (vLLM, Ollama, llama.cpp server, the "
    "OpenAI API) and pass --base-url URL --model NAME; or run one in process with --backend transformers "
    "--model ID_OR_FOLDER; or set them once in a config file ($XDG_CONFIG_HOME/lvr/config.toml or "
    "--config FILE; examples in the repository's configs/)")


def role_spec(main: ModelSpec, backend: str | None, model: str | None, base_urls: tuple[str, ...],
              api_key: str | None) -> ModelSpec:
    """A secondary role's model: each field falls back to the role before it.

    The chain is reasoning -> caption -> qa: the captioner falls back to the
    reasoning model, the video_qa model to the captioner. A role's own URL
    with no backend of its own means an endpoint, whatever the main backend is.
    """
    return replace(main, backend=backend or (main.backend if not base_urls else "auto"),
                   model=model or main.model, base_urls=base_urls or main.base_urls,
                   api_key=api_key if api_key is not None else main.api_key)


@dataclass(frozen=True)
class Roles:
    reasoning: ModelSpec
    caption: ModelSpec
    qa: ModelSpec

    def items(self) -> list[tuple[str, ModelSpec]]:
        return [("reasoning", self.reasoning), ("caption", self.caption), ("qa", self.qa)]

    def owner(self, role: str) -> str:
        """The role whose flags chose this role's model (a fallen-back role names the one it copies)."""
        chain = ["reasoning", "caption", "qa"]
        specs = dict(self.items())
        i = chain.index(role)
        while i > 0 and specs[chain[i]] == specs[chain[i - 1]]:
            i -= 1
        return chain[i]


def resolve_roles(main: ModelSpec, caption: tuple = (None, None, (), None), qa: tuple = (None, None, (), None)) -> Roles:
    """The three roles from the main model's spec and each role's (backend, model, base URLs, key) flags."""
    caption_spec = role_spec(main, *caption)
    return Roles(main, caption_spec, role_spec(caption_spec, *qa))


def _role_name(role: str) -> str:
    return {"reasoning": "reasoning model", "caption": "captioner", "qa": "video_qa model"}[role]


def check_roles(roles: Roles) -> None:
    """Catch the common set-up mistakes before anything is decoded or sent. ModelError, one line.

    No model at all; an in-process model that is neither a folder, nor cached,
    nor on a reachable hub (most often a forgotten --base-url); and a text-only
    model in a role that sends images (captioner, video_qa).
    """
    from .locate import ModelNotFound, locate_model

    main = roles.reasoning
    if not main.model:
        if resolve_backend(main.backend, list(main.base_urls)) == "openai":
            raise ModelError(f"a base URL is given but no --model: name the model the server serves "
                             "(GET <base URL>/models lists them)")
        raise ModelError(NO_MODEL_HELP)
    located = {}
    for role, spec in roles.items():
        if resolve_backend(spec.backend, list(spec.base_urls)) == "openai" or spec in located:
            continue
        owner = roles.owner(role)
        model_flag, url_flag = ROLE_FLAGS[owner]
        try:
            located[spec] = locate_model(spec.model)
        except ModelNotFound as e:
            raise ModelError(f"{model_flag} {spec.model}: {e}. If the model is behind an OpenAI-compatible "
                             f"server, is {url_flag} URL missing?") from None
    for role in ("caption", "qa"):
        spec = getattr(roles, role)
        found = located.get(spec)
        if found is not None and found.takes_images is False:
            raise ModelError(text_only_message(roles, role, f"{found.model_type} is text-only"))


def text_only_message(roles: Roles, role: str, why: str) -> str:
    """The one wording for 'this role sends images but its model cannot take them'."""
    spec = getattr(roles, role)
    owner = roles.owner(role)
    flag = ROLE_FLAGS[role][0]
    if owner != role:
        return (f"the {_role_name(role)} would be {spec.model} (no {flag} given, so it falls back to the "
                f"{_role_name(owner)}), but {why}: pass --caption-model naming a vision-language model "
                "(e.g. Qwen/Qwen2.5-VL-7B-Instruct), with --caption-base-url if it is served elsewhere")
    return (f"{flag} {spec.model}: {why}, but the {_role_name(role)} sends images: name a vision-language "
            f"model with {flag}")

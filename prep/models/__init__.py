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
from pathlib import Path

from ..options import check_options, option
from .base import ChatModel, ModelError

BACKENDS = ("auto", "openai", "transformers", "vllm")
MODEL_PANEL = "Model"
MODEL_HELP = ("The model: a name served at the endpoint (--base-url), or a Hugging Face id or local folder run "
              "in process (sft, dpo, rl: the model to train).")


@dataclass(frozen=True)
class RoleOptions:
    """Which model one role uses, as the user gives it. Under a prefix for the other roles:
    --caption-model, --qa-base-url, ... (see `resolve_roles` for the fallback chain)."""

    backend: str | None = option(None, "--backend", choices=BACKENDS, panel=MODEL_PANEL,
                                 help="openai, transformers, vllm, or auto (openai when a base URL is set).")
    model: str | None = option(None, "--model", panel=MODEL_PANEL, help=MODEL_HELP)
    base_url: tuple[str, ...] = option((), "--base-url", metavar="URL", multiple=True, panel=MODEL_PANEL,
                                       help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1. Repeat "
                                            "to spread load over several. Default: $OPENAI_BASE_URL.")
    api_key: str | None = option(None, "--api-key", show_default=False, panel=MODEL_PANEL,
                                 help="API key (default: $OPENAI_API_KEY). Never logged, printed or recorded.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class SamplingOptions:
    """How a role's model writes its replies; under a prefix for the other roles (--caption-temperature)."""

    max_tokens: int | None = option(2048, "--max-tokens", min=1, panel=MODEL_PANEL,
                                    help="Reply token limit per request.")
    temperature: float = option(0.0, "--temperature", min=0.0, panel=MODEL_PANEL, help="Sampling temperature.")
    seed: int | None = option(None, "--seed", panel=MODEL_PANEL,
                              help="Random seed of sampling and of anything else the command draws (anchors and "
                                   "option order in questions; data order and initialisation in training).")
    system_prompt: Path | None = option(None, "--system-prompt", metavar="FILE", panel=MODEL_PANEL,
                                        help="Replace the system prompt with this file's text. The navigator's is a "
                                             "template: the tree width replaces {K}, or {width} with --protocol "
                                             "longvideo-r1 (which also fills {num_frame} and {num_words} in the "
                                             "captioner's, and sends each file byte for byte); a "
                                             "released checkpoint answers best with the prompt it was trained on.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class ConnectionOptions:
    """How the models are reached, shared by every role of a command."""

    concurrency: int = option(8, "--concurrency", min=1, panel=MODEL_PANEL,
                              help="Requests in flight at once, per endpoint.")
    timeout: float = option(120.0, "--timeout", min=0.1, panel=MODEL_PANEL,
                            help="Seconds to wait for a request before it is retried (or, in doctor, fails).")
    max_retries: int = option(5, "--max-retries", min=0, panel=MODEL_PANEL,
                              help="Retries on timeouts, dropped connections, 429 and 5xx.")
    device: str = option("auto", "--device", panel=MODEL_PANEL,
                         help="In-process backends: auto, cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        check_options(self)

    def spec(self, role: RoleOptions, *, default_backend: str = "auto") -> "ModelSpec":
        """The main role's ModelSpec from its flags and these connection settings."""
        return ModelSpec(backend=role.backend or default_backend, model=role.model, base_urls=tuple(role.base_url),
                         api_key=role.api_key, concurrency=self.concurrency, timeout_s=self.timeout,
                         max_retries=self.max_retries, device=self.device)


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
    caption: ModelSpec | None   # None: the captions come from files (`--captions`), no captioner
    qa: ModelSpec | None        # None: no video_qa model (see `resolve_roles`)

    def items(self) -> list[tuple[str, ModelSpec]]:
        """The roles that have a model."""
        return [(role, spec) for role, spec in (("reasoning", self.reasoning), ("caption", self.caption),
                                                ("qa", self.qa)) if spec is not None]

    def owner(self, role: str) -> str:
        """The role whose flags chose this role's model (a fallen-back role names the one it copies)."""
        chain = ["reasoning", "caption", "qa"]
        specs = {"reasoning": self.reasoning, "caption": self.caption, "qa": self.qa}
        i = chain.index(role)
        while i > 0 and specs[chain[i]] == specs[chain[i - 1]]:
            i -= 1
        return chain[i]


def resolve_roles(main: ModelSpec, caption: RoleOptions = RoleOptions(), qa: RoleOptions = RoleOptions(), *,
                  captions_from_files: bool = False) -> Roles:
    """The three roles from the main model's spec and the caption and qa roles' own flags.

    `captions_from_files` (`--captions`): there is no captioner, and the video_qa model, which is
    sent frames, never falls back to the navigator: it is the one the qa (or else the caption)
    flags name, or none at all.
    """
    caption_spec = role_spec(main, caption.backend, caption.model, tuple(caption.base_url), caption.api_key)
    qa_spec = role_spec(caption_spec, qa.backend, qa.model, tuple(qa.base_url), qa.api_key)
    if not captions_from_files:
        return Roles(main, caption_spec, qa_spec)
    named = any(role.model or role.base_url for role in (caption, qa))
    return Roles(main, None, qa_spec if named else None)


NO_QA_MODEL = ("no video_qa model: the captions come from --captions files, and video_qa sends a clip's frames "
               "to a vision model; name one with --qa-model (and --qa-base-url)")


class NoModel:
    """The model of a role that has none (`Roles` holds None for it): a name for the records, and a
    request fails with one line saying what to give."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    async def complete(self, messages, options=None):
        raise ModelError(self.why)

    async def aclose(self) -> None:
        pass


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
            raise ModelError("a base URL is given but no --model: name the model the server serves "
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

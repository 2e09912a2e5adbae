"""Model-role options shared by `ask`, `eval` and later steps (docs/architecture.md §5).

`--backend/--model/--base-url` pick the step's main model; the `--caption-*`
and `--qa-*` options pick the captioner and the video_qa model, each field
falling back to the main model's when not given.
"""

from __future__ import annotations

from typing import List, Optional

import typer

MAIN_PANEL = "Reasoning model"
CAPTION_PANEL = "Caption model (defaults to the reasoning model's settings)"
QA_PANEL = "video_qa model (defaults to the caption model's settings)"
AGENT_PANEL = "Navigation"


def _backend(flag: str, panel: str, default: Optional[str]):
    return typer.Option(default, flag, rich_help_panel=panel,
                        help="openai, transformers, vllm, or auto (openai when a base URL is set).")


def _model(flag: str, panel: str):
    return typer.Option(None, flag, rich_help_panel=panel,
                        help="Model name at the endpoint, or a model id/folder in process.")


def _base_url(flag: str, panel: str):
    return typer.Option([], flag, metavar="URL", rich_help_panel=panel,
                        help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1. Repeat to spread load.")


def _api_key(flag: str, panel: str):
    return typer.Option(None, flag, rich_help_panel=panel, show_default=False,
                        help="API key (default: $OPENAI_API_KEY). Never logged or recorded.")


BackendOption = _backend("--backend", MAIN_PANEL, "auto")
ModelOption = _model("--model", MAIN_PANEL)
BaseUrlOption: List[str] = _base_url("--base-url", MAIN_PANEL)
ApiKeyOption = _api_key("--api-key", MAIN_PANEL)
CaptionBackendOption = _backend("--caption-backend", CAPTION_PANEL, None)
CaptionModelOption = _model("--caption-model", CAPTION_PANEL)
CaptionBaseUrlOption: List[str] = _base_url("--caption-base-url", CAPTION_PANEL)
CaptionApiKeyOption = _api_key("--caption-api-key", CAPTION_PANEL)
QaBackendOption = _backend("--qa-backend", QA_PANEL, None)
QaModelOption = _model("--qa-model", QA_PANEL)
QaBaseUrlOption: List[str] = _base_url("--qa-base-url", QA_PANEL)
QaApiKeyOption = _api_key("--qa-api-key", QA_PANEL)

ConcurrencyOption = typer.Option(8, "--concurrency", min=1, rich_help_panel=MAIN_PANEL,
                                 help="Requests in flight at once, per endpoint.")
TimeoutOption = typer.Option(120.0, "--timeout", min=0.1, rich_help_panel=MAIN_PANEL,
                             help="Seconds before a request is retried.")
MaxRetriesOption = typer.Option(5, "--max-retries", min=0, rich_help_panel=MAIN_PANEL,
                                help="Retries on timeouts, dropped connections, 429 and 5xx.")
DeviceOption = typer.Option("auto", "--device", rich_help_panel=MAIN_PANEL,
                            help="In-process backends: auto, cpu, cuda, cuda:1, ...")

MaxRoundsOption = typer.Option(30, "--max-rounds", min=1, rich_help_panel=AGENT_PANEL,
                               help="Model turns per question; the last one must answer.")
MaxInvalidOption = typer.Option(3, "--max-invalid", min=0, rich_help_panel=AGENT_PANEL,
                                help="Invalid turns in a row (each corrected) before giving up.")
MaxTokensOption = typer.Option(2048, "--max-tokens", min=1, rich_help_panel=AGENT_PANEL,
                               help="Reply token limit per reasoning turn.")
TemperatureOption = typer.Option(0.0, "--temperature", min=0.0, rich_help_panel=AGENT_PANEL,
                                 help="Reasoning model sampling temperature.")
SeedOption = typer.Option(None, "--seed", rich_help_panel=AGENT_PANEL, help="Sampling seed.")
SystemPromptOption = typer.Option(None, "--system-prompt", metavar="FILE", rich_help_panel=AGENT_PANEL,
                                  help="Navigator system prompt template ({K} is filled in). A released "
                                       "checkpoint answers best with the prompt it was trained on.")
CaptionPromptOption = typer.Option(None, "--caption-system-prompt", metavar="FILE", rich_help_panel=CAPTION_PANEL,
                                   help="Replace the captioning system prompt with this file's text.")
MinWidthOption = typer.Option(4, "--min-width", min=1, rich_help_panel=AGENT_PANEL, help="Smallest tree width K.")
MaxWidthOption = typer.Option(8, "--max-width", min=1, rich_help_panel=AGENT_PANEL, help="Largest tree width K.")
SegmentSecondsOption = typer.Option(16.0, "--segment-seconds", min=0.001, rich_help_panel=AGENT_PANEL,
                                    help="K = clamp(round((duration / this) ** (1/3)), min, max).")

TREE_PANEL = "Frames (as in `lvr segment`)"
HighFramesOption = typer.Option(128, "--high-frames", min=1, rich_help_panel=TREE_PANEL,
                                help="Frames the captioner sees per high node.")
MediumFramesOption = typer.Option(64, "--medium-frames", min=1, rich_help_panel=TREE_PANEL,
                                  help="Frames the captioner sees per medium node.")
LowFramesOption = typer.Option(32, "--low-frames", min=1, rich_help_panel=TREE_PANEL,
                               help="Frames the captioner sees per low node.")
CaptionSideOption = typer.Option(512, "--caption-side", min=1, rich_help_panel=TREE_PANEL,
                                 help="Longest image side at the low level; level s gets this/sqrt(s), s=1,2,4.")
QaSideOption = typer.Option(1024, "--qa-side", min=1, rich_help_panel=TREE_PANEL,
                            help="Longest image side of the 16 video_qa frames.")
CaptionMaxTokensOption = typer.Option(None, "--caption-max-tokens", min=1, rich_help_panel=CAPTION_PANEL,
                                      help="Caption reply token limit (default 600 low, 1200 medium and high).")
CaptionTemperatureOption = typer.Option(0.0, "--caption-temperature", min=0.0, rich_help_panel=CAPTION_PANEL,
                                        help="Captioner sampling temperature.")
QaMaxTokensOption = typer.Option(512, "--qa-max-tokens", min=1, rich_help_panel=QA_PANEL,
                                 help="video_qa reply token limit.")


def navigator_options(*, backend, model, base_url, api_key, caption_backend, caption_model, caption_base_url,
                      caption_api_key, qa_backend, qa_model, qa_base_url, qa_api_key, concurrency, timeout,
                      max_retries, device, max_rounds, max_invalid, max_tokens, temperature, seed,
                      system_prompt, caption_system_prompt, min_width, max_width, segment_seconds,
                      high_frames=128, medium_frames=64, low_frames=32, caption_side=512, qa_side=1024,
                      caption_max_tokens=None, caption_temperature=0.0, qa_max_tokens=512):
    """The flags above -> NavigatorOptions (ValueError on a bad combination)."""
    from ..infer.agent import AgentOptions
    from ..infer.navigator import NavigatorOptions
    from ..prep.captioning import CaptionOptions
    from ..prep.models import ModelSpec, resolve_roles
    from ..prep.tree import TreeOptions

    if min_width > max_width:
        raise ValueError(f"--min-width {min_width} is larger than --max-width {max_width}")
    main = ModelSpec(backend=backend, model=model, base_urls=tuple(base_url), api_key=api_key,
                     concurrency=concurrency, timeout_s=timeout, max_retries=max_retries, device=device)
    roles = resolve_roles(main, (caption_backend, caption_model, tuple(caption_base_url), caption_api_key),
                          (qa_backend, qa_model, tuple(qa_base_url), qa_api_key))
    return NavigatorOptions(
        reasoning=roles.reasoning, caption=roles.caption, qa=roles.qa,
        agent=AgentOptions(max_rounds=max_rounds, max_invalid=max_invalid, max_tokens=max_tokens,
                           temperature=temperature, seed=seed),
        tree=TreeOptions(segment_seconds=segment_seconds, min_width=min_width, max_width=max_width,
                         high_frames=high_frames, medium_frames=medium_frames, low_frames=low_frames,
                         caption_side=caption_side, qa_side=qa_side),
        captioning=CaptionOptions(temperature=caption_temperature) if caption_max_tokens is None else
        CaptionOptions(max_tokens_low=caption_max_tokens, max_tokens_high=caption_max_tokens,
                       temperature=caption_temperature),
        system_prompt_file=system_prompt, caption_prompt_file=caption_system_prompt, qa_max_tokens=qa_max_tokens,
    )


def navigator_options_from(values: dict):
    """NavigatorOptions from a command's parameters (its `locals()`): the flags above, by name."""
    import inspect

    names = inspect.signature(navigator_options).parameters
    return navigator_options(**{name: values[name] for name in names if name in values})

"""`lvr doctor`: preflight checks of tools and models, with what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import EXIT_OK, EXIT_SOME_FAILED, ConfigOption, fail_usage

MODEL_PANEL = "Main model"
CAPTION_PANEL = "Captioning model (default: the main model)"
QA_PANEL = "video_qa model (default: the captioning model)"


def _role_options(prefix: str, panel: str, what: str):
    backend = typer.Option(None, f"--{prefix}-backend", rich_help_panel=panel,
                           help=f"Backend of the {what}: openai, transformers, vllm or auto.")
    model = typer.Option(None, f"--{prefix}-model", rich_help_panel=panel,
                         help=f"The {what}: a name at the endpoint, or a model id/folder in process.")
    base_url = typer.Option([], f"--{prefix}-base-url", metavar="URL", rich_help_panel=panel,
                            help=f"Endpoint of the {what} (repeat for several).")
    return backend, model, base_url


_CAP = _role_options("caption", CAPTION_PANEL, "captioner")
_QA = _role_options("qa", QA_PANEL, "video_qa model")


def doctor_command(
    backend: str = typer.Option("auto", "--backend", rich_help_panel=MODEL_PANEL,
                                help="openai, transformers, vllm, or auto (openai when a base URL is set)."),
    model: Optional[str] = typer.Option(None, "--model", rich_help_panel=MODEL_PANEL,
                                        help="Model name at the endpoint, or a model id/folder in process."),
    base_url: List[str] = typer.Option([], "--base-url", metavar="URL", rich_help_panel=MODEL_PANEL,
                                       help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1. "
                                            "Repeat for several; each is checked. Default: $OPENAI_BASE_URL."),
    api_key: Optional[str] = typer.Option(None, "--api-key", rich_help_panel=MODEL_PANEL, show_default=False,
                                          help="API key. Default: $OPENAI_API_KEY. Never printed."),
    device: str = typer.Option("auto", "--device", rich_help_panel=MODEL_PANEL,
                               help="In-process backends: auto, cpu, cuda, cuda:1, ..."),
    caption_backend: Optional[str] = _CAP[0],
    caption_model: Optional[str] = _CAP[1],
    caption_base_url: List[str] = _CAP[2],
    qa_backend: Optional[str] = _QA[0],
    qa_model: Optional[str] = _QA[1],
    qa_base_url: List[str] = _QA[2],
    images: int = typer.Option(16, "--images", min=1, metavar="N",
                               help="Images in the test request. video_qa sends 16; captioning sends "
                                    "32/64/128 for low/medium/high nodes."),
    text_only: bool = typer.Option(False, "--text-only",
                                   help="The main model is text-only (a navigator): skip its image check. "
                                        "Caption and video_qa models are always checked with images."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for each request."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only failed checks and their fixes."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Check that tools and models are ready, and say what to fix.

    Checks that ffmpeg and ffprobe run. For each model given, checks each
    endpoint separately: it answers GET /models, serves the named model,
    answers a one-token text request and, for vision models, accepts one
    request with --images small images (vLLM refuses more images than its
    --limit-mm-per-prompt allows). In-process models (transformers, vllm)
    are checked without loading weights: config, files, and device.

    The caption role falls back to the main backend, model, endpoint and
    key, and the video_qa role to the caption role's, exactly as in `lvr ask`;
    a role is checked when any of its options is given,
    and roles that resolve to the same model and endpoint are checked once.

    Prints one line per check (ok, FAIL with a fix: line, or skip).
    Exit status: 0 all checks passed, 1 some failed, 2 usage error.

    Examples:

      lvr doctor

      lvr doctor --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct --images 128

      lvr doctor --model ./navigator --text-only --qa-model Qwen/Qwen2.5-VL-7B-Instruct --qa-base-url http://gpu:8000/v1

      lvr doctor --config run.yaml
    """
    from ..prep.doctor import run_doctor
    from ..prep.models import BACKENDS, ModelSpec, resolve_roles

    for flag, value in (("--backend", backend), ("--caption-backend", caption_backend),
                        ("--qa-backend", qa_backend)):
        if value is not None and value not in BACKENDS:
            raise fail_usage(f"{flag} takes {', '.join(BACKENDS)}, not {value!r}")

    common = dict(api_key=api_key, timeout_s=timeout, max_retries=1, device=device, concurrency=1)
    # The same fallback chain as ask, eval and synthesize: caption <- main, qa <- caption.
    resolved = resolve_roles(ModelSpec(backend=backend, model=model, base_urls=tuple(base_url), **common),
                             (caption_backend, caption_model, tuple(caption_base_url), None),
                             (qa_backend, qa_model, tuple(qa_base_url), None))
    given = {"main": bool(model or base_url),
             "caption": bool(caption_backend or caption_model or caption_base_url),
             "qa": bool(qa_backend or qa_model or qa_base_url)}
    roles: dict[str, ModelSpec] = {role: spec for role, (_, spec) in zip(given, resolved.items()) if given[role]}
    vision_roles = [r for r in roles if r != "main" or not text_only]

    def show(check) -> None:
        if quiet and (check.ok or check.skipped):
            return
        for line in check.lines():
            typer.echo(line)

    checks = run_doctor(roles, images=images, vision_roles=vision_roles, on_check=show)
    failed = [c for c in checks if not c.ok]
    if not quiet:
        passed = sum(1 for c in checks if c.ok and not c.skipped)
        skipped = sum(1 for c in checks if c.skipped)
        typer.echo(f"lvr doctor: {passed} ok, {len(failed)} failed, {skipped} skipped")
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)

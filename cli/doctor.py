"""`lvr doctor`: preflight checks of tools and models, with what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..prep.models import ConnectionOptions, RoleOptions
from .common import EXIT_OK, EXIT_SOME_FAILED, ConfigOption, QuietOption
from .model_options import MAIN_ROLE, TRANSCRIBE_ROLE
from .options import Group, takes

MODEL_PANEL = "Main model"
CAPTION_PANEL = "Captioning model (default: the main model)"
QA_PANEL = "video_qa model (default: the captioning model)"
SPEECH_PANEL = "Speech model (--transcribe; endpoint and key default to the main model's)"
# A preflight should answer quickly: 30 s per request instead of a run's 120 s.
DOCTOR_CONNECTION = Group(ConnectionOptions, only=("timeout", "device"), defaults={"timeout": 30.0}, panel=MODEL_PANEL)


@takes(main=MAIN_ROLE.with_panel(MODEL_PANEL), connection=DOCTOR_CONNECTION,
       caption=Group(RoleOptions, prefix="caption", exclude=("api_key",), panel=CAPTION_PANEL),
       qa=Group(RoleOptions, prefix="qa", exclude=("api_key",), panel=QA_PANEL),
       speech=Group(RoleOptions, prefix=TRANSCRIBE_ROLE.prefix, exclude=("api_key",), panel=SPEECH_PANEL))
def doctor_command(
    images: int = typer.Option(16, "--images", min=1, metavar="N",
                               help="Images in the test request. video_qa sends 16; captioning sends "
                                    "32/64/128 for low/medium/high nodes."),
    text_only: bool = typer.Option(False, "--text-only",
                                   help="The main model is text-only (a navigator): skip its image check. "
                                        "Caption and video_qa models are always checked with images."),
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
    main=None, connection=None, caption=None, qa=None, speech=None,
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
    A speech model (--transcribe-model, for --transcribe) is checked when
    given: its endpoint lists it and answers a one-second silent WAV, or, in
    process, its config and processor load.

    Prints one line per check (ok, FAIL with a fix: line, or skip).
    Exit status: 0 all checks passed, 1 some failed, 2 usage error.

    Examples:

      lvr doctor

      lvr doctor --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct --images 128

      lvr doctor --model ./navigator --text-only --qa-model Qwen/Qwen2.5-VL-7B-Instruct --qa-base-url http://gpu:8000/v1

      lvr doctor --transcribe-model openai/whisper-large-v3 --transcribe-base-url http://localhost:8002/v1

      lvr doctor --config run.yaml
    """
    from ..infer.doctor import run_doctor
    from dataclasses import replace

    from ..prep.models import ModelSpec, resolve_roles, role_spec

    common = dict(timeout_s=connection.timeout, max_retries=1, device=connection.device, concurrency=1)
    # The same fallback chain as ask, eval and synthesize: caption <- main, qa <- caption.
    resolved = resolve_roles(ModelSpec(backend=main.backend or "auto", model=main.model,
                                       base_urls=tuple(main.base_url), api_key=main.api_key, **common),
                             caption, qa)
    given = {"main": bool(main.model or main.base_url),
             "caption": bool(caption.backend or caption.model or caption.base_url),
             "qa": bool(qa.backend or qa.model or qa.base_url)}
    roles: dict[str, ModelSpec] = {role: spec for role, (_, spec) in zip(given, resolved.items()) if given[role]}
    speech_spec = None
    if speech.backend or speech.model or speech.base_url:   # never the main model: a speech model is another
        speech_spec = replace(role_spec(resolved.reasoning, speech.backend, speech.model, tuple(speech.base_url),
                                        None), model=speech.model)
    vision_roles = [r for r in roles if r != "main" or not text_only]

    def show(check) -> None:
        if quiet and (check.ok or check.skipped):
            return
        for line in check.lines():
            typer.echo(line)

    checks = run_doctor(roles, images=images, vision_roles=vision_roles, on_check=show, speech=speech_spec)
    failed = [c for c in checks if not c.ok]
    if not quiet:
        passed = sum(1 for c in checks if c.ok and not c.skipped)
        skipped = sum(1 for c in checks if c.skipped)
        typer.echo(f"lvr doctor: {passed} ok, {len(failed)} failed, {skipped} skipped")
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)

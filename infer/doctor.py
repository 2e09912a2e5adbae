"""Preflight checks: tools on PATH, and that each configured model can be reached and used.

Every check yields a `Check` with a one-line detail and, when it fails, a one-line
fix. Endpoints are probed one base URL at a time: GET /models, a one-token text
request, and a request with many small images (vLLM's --limit-mm-per-prompt is the
usual failure). In-process backends are checked lightly: the model's config,
files and the device, without loading weights. A speech model (--transcribe-model) is
checked the same way: its endpoint lists it and answers a one-second silent WAV, or its
config and processor load.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from ..prep.models import ModelSpec, resolve_backend
from ..prep.models.base import GenerationOptions, ModelError, image_part, probe_images, text_part

FFMPEG_FIX = ("install ffmpeg (it brings ffprobe): apt-get install -y ffmpeg, brew install ffmpeg, "
              "or conda install -c conda-forge ffmpeg")
LIMIT_MM_FIX = ("restart vLLM with --limit-mm-per-prompt '{\"image\": 128}' "
                "(medium/high nodes send up to 64/128 frames)")
IMAGE_SIDE = 64
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]"}
_MIN_SECRET = 4  # shorter "keys" are not secrets, and redacting them would mangle text


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("ok" if self.ok else "FAIL")

    def lines(self) -> list[str]:
        out = [f"{self.status:<4} {self.name}: {self.detail}"]
        if self.fix and not self.ok:
            out.append(f"     fix: {self.fix}")
        return out


def _skip(name: str, why: str) -> Check:
    return Check(name, ok=True, detail=why, skipped=True)


def _first_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "") if items else "none"


def _model_flag(role: str, what: str = "model") -> str:
    first = role.split("+")[0]
    return f"--{what}" if first == "main" else f"--{first}-{what}"


# -- tools -------------------------------------------------------------------


def check_tools(tools: Iterable[str] = ("ffmpeg", "ffprobe")) -> list[Check]:
    """Each tool is on PATH and runs; ffmpeg also has the libx264 encoder (for segment --clips)."""
    checks = []
    for tool in tools:
        path = shutil.which(tool)
        if not path:
            checks.append(Check(tool, False, "not found on PATH", FFMPEG_FIX))
            continue
        try:
            proc = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            checks.append(Check(tool, False, f"{path} -version failed: {_first_line(e)}", FFMPEG_FIX))
            continue
        if proc.returncode != 0 or not proc.stdout.strip():
            why = _first_line(proc.stderr) or f"exit status {proc.returncode}"
            checks.append(Check(tool, False, f"{path} -version failed: {why}", FFMPEG_FIX))
            continue
        version = proc.stdout.strip().splitlines()[0].split(" Copyright")[0]
        checks.append(Check(tool, True, f"{version} ({path})"))
        if tool == "ffmpeg":
            checks.append(_check_x264(path))
    return checks


def _check_x264(path: str) -> Check:
    name = "ffmpeg encoder libx264"
    try:
        proc = subprocess.run([path, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, False, f"ffmpeg -encoders failed: {_first_line(e)}", FFMPEG_FIX)
    if re.search(r"\blibx264\b", proc.stdout):
        return Check(name, True, "present (lvr segment --clips re-encodes with it)")
    return Check(name, False, "this ffmpeg has no libx264 encoder, which lvr segment --clips needs",
                 "install an ffmpeg built with libx264 (distribution and conda-forge builds are)")


# -- OpenAI-compatible endpoints --------------------------------------------


def _strip_prefix(message: str, model: str, url: str) -> str:
    """A ModelError without its 'model M at URL: ' head (the check's name says that)."""
    head = f"model {model} at {url}: "
    return message[len(head):] if message.startswith(head) else message


def _key_fix(key_sent: bool) -> str:
    if key_sent:
        return "the server refused the API key that was sent: check --api-key or OPENAI_API_KEY"
    return "the server wants an API key: pass --api-key or set OPENAI_API_KEY"


def _serve_hint(model: str | None, port: int | None, vision: bool) -> str:
    cmd = f"vllm serve {shlex.quote(model) if model else 'MODEL'} --port {port or 8000}"
    if vision:
        cmd += " --limit-mm-per-prompt '{\"image\": 128}'"
    return cmd


def _reach_fix(error: str, url: str, spec: ModelSpec, vision: bool, key_sent: bool) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    low = error.lower()
    if "http 401" in low or "http 403" in low:
        return _key_fix(key_sent)
    if "http 404" in low:
        if not url.endswith("/v1"):
            return f"no {url}/models here: OpenAI-compatible servers answer under /v1; try --base-url {url}/v1"
        return "no /models route at this URL: check that it is the API root of an OpenAI-compatible server"
    if "name or service not known" in low or "nodename nor servname" in low or "getaddrinfo" in low:
        return f"the host name {host!r} does not resolve: check the URL"
    if "ssl" in low or "certificate" in low:
        return "the TLS handshake failed: check http:// versus https:// in the URL"
    if "connecttimeout" in low:
        return (f"{host}:{port} did not accept a connection within {spec.timeout_s:g} s: "
                "check the address, a firewall, and that the server is up")
    if "timeout" in low:
        return (f"the server took the connection but sent nothing within {spec.timeout_s:g} s; it may still "
                "be loading the model: retry, or raise --timeout")
    if "connecterror" in low or "refused" in low or "connection attempts failed" in low:
        if host in _LOCAL_HOSTS:
            return f"nothing listens on port {port}: start the server, e.g. {_serve_hint(spec.model, port, vision)}"
        return (f"cannot connect to {host}:{port}: check the URL and that the server is up there "
                f"(e.g. {_serve_hint(spec.model, port, vision)} on that machine)")
    if "malformed" in low:
        return "this does not answer like an OpenAI-compatible API: check the URL"
    if re.search(r"http 5\d\d", low):
        return "the server failed on GET /models: see its log"
    return "check the URL and the server's log"


def _request_fix(error: str, spec: ModelSpec, key_sent: bool) -> str:
    low = error.lower()
    if "http 401" in low or "http 403" in low:
        return _key_fix(key_sent)
    if any(s in low for s in ("maximum context length", "max_model_len", "context length", "too long",
                              "max-model-len")):
        return "the request does not fit the model's context: restart vLLM with a larger --max-model-len"
    if "http 404" in low:
        return "the server has no /chat/completions for this model: check the URL and the model name"
    if "max_tokens" in low and ("unsupported" in low or "not supported" in low):
        return "this API rejects max_tokens (newer OpenAI models): lvr needs an endpoint that accepts it"
    if "timeout" in low:
        return (f"no reply within {spec.timeout_s:g} s: the server may be busy or still loading; "
                "retry, or raise --timeout")
    if re.search(r"http 5\d\d", low):
        return "the server failed on this request: see its log"
    return "see the server's log for the reason"


def _image_fix(error: str, role: str, spec: ModelSpec, key_sent: bool) -> str:
    low = error.lower()
    text_only = " (or pass --text-only if the main model is a text-only navigator)" if "main" in role.split("+") \
        else ""
    if re.search(r"at most 0 image", low):
        return ("the model takes no images, or vLLM was started with an image limit of 0: serve a "
                f"vision-language model for this role, or {LIMIT_MM_FIX}{text_only}")
    if "context length" in low or "max_model_len" in low:
        return _request_fix(error, spec, key_sent)
    if any(s in low for s in ("limit_mm_per_prompt", "limit-mm-per-prompt", "at most", "may be provided",
                              "too many image")):
        return LIMIT_MM_FIX
    if "image" in low and any(s in low for s in ("not support", "multimodal", "multi-modal", "vision", "unsupported")):
        return f"the model at this endpoint does not take images: serve a vision-language model{text_only}"
    return _request_fix(error, spec, key_sent)


def _key_sent(spec: ModelSpec) -> bool:
    return bool(spec.api_key if spec.api_key is not None else os.environ.get("OPENAI_API_KEY"))


async def check_endpoint(role: str, spec: ModelSpec, *, images: int = 16, vision: bool = True) -> list[Check]:
    """Check each of the spec's base URLs on its own: reachable, serves the model, text, images."""
    from ..prep.models.openai_backend import OpenAIChat

    bad = [u.strip() for u in spec.base_urls if u.strip() and not u.strip().startswith(("http://", "https://"))]
    if bad:
        example = bad[0].rstrip("/")
        example = f"http://{example}" + ("" if example.endswith("/v1") else "/v1")
        return [Check(f"{role} endpoint {u}", False, "a base URL must start with http:// or https://",
                      f"write it like {_model_flag(role, 'base-url')} {example}") for u in bad]
    probe = OpenAIChat(spec.model or "-", list(spec.base_urls) or None, spec.api_key)
    results = await asyncio.gather(*(_check_url(role, spec, url, images, vision) for url in probe.base_urls))
    return [c for r in results for c in r]


def _answered(error: str, url: str) -> bool:
    """GET /models failed, but the server answered in a way that says nothing about chat requests."""
    m = re.search(r"HTTP (\d{3})", error)
    if m is None:
        return "malformed" in error
    status = int(m.group(1))
    return status not in (401, 403) and not (status == 404 and not url.endswith("/v1"))


async def _check_url(role: str, spec: ModelSpec, url: str, images: int, vision: bool) -> list[Check]:
    from ..prep.models.openai_backend import OpenAIChat

    model = spec.model or ""
    chat = OpenAIChat(model or "-", [url], spec.api_key, concurrency=1, timeout_s=spec.timeout_s,
                      max_retries=min(spec.max_retries, 1), backoff_base_s=0.2, backoff_max_s=1.0)
    key_sent = _key_sent(spec)
    where = f"{role} endpoint {url}"
    names = {"reach": f"{where} reachable", "serves": f"{where} serves model {model!r}",
             "text": f"{where} text request", "images": f"{where} takes {images} images in one request"}
    checks: list[Check] = []
    try:
        served: list[str] | None
        try:
            served = (await chat.list_models())[url]
        except ModelError as e:
            error = _strip_prefix(chat.redact(str(e)), chat.name, url)
            if not (model and _answered(error, url)):
                checks.append(Check(names["reach"], False, error, _reach_fix(error, url, spec, vision, key_sent)))
                if model:
                    what = "model, text and image checks" if vision else "model and text checks"
                    checks.append(_skip(f"{where} {what}", "not tried (GET /models failed)"))
                return checks
            # The server is there; lvr never needs the list, so go on and ask the model itself.
            served = None
            checks.append(Check(names["reach"], True, f"answers, though {error}"))
        else:
            checks.append(Check(names["reach"], True, f"GET /models lists {len(served)} model(s)"))
        if not model:
            checks.append(_skip(f"{where} model", f"no model named; served here: {_names(served or [])}"))
            return checks

        text_error = None
        try:
            reply = await chat.complete([{"role": "user", "content": "Reply with OK."}],
                                        GenerationOptions(max_tokens=1, temperature=0.0))
        except ModelError as e:
            text_error = _strip_prefix(chat.redact(str(e)), chat.name, url)

        listed = served is not None and model in served
        if listed:
            checks.append(Check(names["serves"], True, "listed by GET /models"))
        elif text_error is None:
            # Some servers (llama.cpp, `transformers serve` of a folder) answer under names they do not list.
            shown = "GET /models failed" if served is None else f"not listed by GET /models ({_names(served)})"
            checks.append(Check(names["serves"], True, f"{shown}, but answers under this name"))
        elif _model_unknown(text_error):
            flag = _model_flag(role)
            close = difflib.get_close_matches(model, served or [], n=1, cutoff=0.5)
            pick = close[0] if close else (served[0] if served and len(served) == 1 else None)
            if pick:
                fix = f"pass {flag} {shlex.quote(pick)}"
            elif served:
                fix = f"pass {flag} with one of the served names"
            else:
                fix = f"pass {flag} with the name the server was started with"
            fix += " (vLLM serves a model under its path, or under --served-model-name)"
            listing = "the model list is unknown" if served is None else \
                f"not among the models served here: {_names(served)}"
            checks.append(Check(names["serves"], False,
                                f"{listing}; a request under this name failed: {_first_line(text_error, 160)}", fix))
            checks.append(_skip(names["text"], "not tried (model not served)"))
            if vision:
                checks.append(_skip(names["images"], "not tried (model not served)"))
            return checks
        else:
            shown = "GET /models failed" if served is None else f"not listed by GET /models ({_names(served)})"
            checks.append(_skip(names["serves"], f"{shown}; see the text request"))

        if text_error is None:
            checks.append(Check(names["text"], True, f"answered in {reply.seconds:.2f} s"))
        else:
            checks.append(Check(names["text"], False, text_error, _request_fix(text_error, spec, key_sent)))
        if not vision:
            return checks
        if text_error is not None:
            checks.append(_skip(names["images"], "not tried (the text request failed)"))
            return checks
        content = [text_part(f"Here are {images} small test images. Reply with OK.")]
        content += [image_part(j) for j in probe_images(images, IMAGE_SIDE)]
        try:
            reply = await chat.complete([{"role": "user", "content": content}],
                                        GenerationOptions(max_tokens=1, temperature=0.0))
        except ModelError as e:
            error = _strip_prefix(chat.redact(str(e)), chat.name, url)
            checks.append(Check(names["images"], False, error, _image_fix(error, role, spec, key_sent)))
        else:
            checks.append(Check(names["images"], True,
                                f"{images} images of {IMAGE_SIDE}x{IMAGE_SIDE} px answered in {reply.seconds:.2f} s"))
        return checks
    finally:
        await chat.aclose()


def _model_unknown(error: str) -> bool:
    """A chat error that is about the model name (vLLM: 404 "The model `x` does not exist.")."""
    low = error.lower()
    if "http 404" in low or "pinned to" in low:  # `transformers serve MODEL` names the one it serves
        return True
    return "model" in low and any(s in low for s in ("does not exist", "not found", "unknown", "no such",
                                                     "not served", "invalid model"))


# -- in-process backends ----------------------------------------------------


def _files_check(name: str, folder: Path, vision: bool) -> Check:
    """Weights (all shards), tokenizer, chat template, and an image processor for vision models."""
    missing = []
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            missing.append(f"a readable {index.name}")
            continue
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            missing.append(f"weight shards {', '.join(absent[:4])}" + (" ..." if len(absent) > 4 else ""))
    if not weights:
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                 "tokenizer.model")):
        missing.append("tokenizer files")
    template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if not template and (folder / "tokenizer_config.json").is_file():
        try:
            template = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            pass
    if not template:
        missing.append("a chat template")
    if vision and not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json (the image processor)")
    if missing:
        return Check(name, False, f"missing {'; '.join(missing)}",
                     "the checkpoint is incomplete: copy the missing files from the original model")
    return Check(name, True, f"{len(weights)} weight file(s), tokenizer, chat template")


def _hf_model_checks(role: str, kind: str, model: str, vision: bool) -> list[Check]:
    from ..prep.models.locate import ModelNotFound, locate_model

    name = f"{role} {kind} model {model!r}"
    try:
        found = locate_model(model)
    except ModelNotFound as e:
        reason = str(e)
        if reason.startswith(("no such folder", "no config.json")):
            fix = ("check the path, or put the checkpoint there (e.g. hf download ORG/NAME --local-dir DIR)"
                   if reason.startswith("no such folder") else
                   "pass the folder of a Hugging Face checkpoint (the one holding config.json)")
        elif "is a file" in reason:
            fix = "pass the folder that holds config.json"
        elif "does not load" in reason:
            fix = "check the checkpoint is complete; a newer transformers may be needed for this model"
        elif "not on the Hugging Face hub" in reason:
            fix = "check the id; for a gated or private model log in (hf auth login) or set HF_TOKEN"
        else:
            fix = (f"download it where there is network (hf download {model} --local-dir DIR) "
                   f"and pass {_model_flag(role)} DIR")
        return [Check(name, False, reason, fix)]
    checks = [Check(name, True, found.describe() + ("; the first run downloads it" if found.where == "hub" else ""))]
    if found.where == "folder":
        checks.append(_files_check(f"{role} {kind} model files", Path(os.path.expanduser(model)),
                                   bool(found.takes_images)))
    if vision and found.takes_images is False:
        text_only = "; or pass --text-only if the main model is a text-only navigator" \
            if "main" in role.split("+") else ""
        checks.append(Check(f"{role} {kind} model takes images", False,
                            f"{found.model_type} is text-only, but this role sends images",
                            f"choose a vision-language checkpoint (Qwen2.5-VL, Qwen3-VL, ...){text_only}"))
    return checks


def _device_check(role: str, device: str, need_gpu: bool) -> Check:
    name = f"{role} device"
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return Check(name, False, f"torch does not import ({type(e).__name__})", "pip install torch")
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    build = f"torch {torch.__version__}" + (", a CPU-only build" if torch.version.cuda is None else "")
    gpu_fix = f"run on a machine with a CUDA GPU, or serve the model there and pass {_model_flag(role, 'base-url')}"
    if device == "auto":
        if cuda:
            return Check(name, True, f"cuda ({count} GPU(s), {torch.cuda.get_device_name(0)})")
        if need_gpu:
            return Check(name, False, f"vllm needs a CUDA GPU and none is visible ({build})", gpu_fix)
        return Check(name, True, f"cpu (no CUDA GPU visible, {build}); fine for tiny models, slow for real ones")
    if device.startswith("cuda"):
        if not cuda:
            return Check(name, False, f"{device} was asked for, but torch sees no CUDA GPU ({build})",
                         "pass --device cpu, or install a CUDA build of torch on a GPU machine")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= count):
            return Check(name, False, f"{device}: there are {count} GPU(s)",
                         f"pass --device cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}")
        return Check(name, True, f"{device} ({torch.cuda.get_device_name(int(index or 0))})")
    if need_gpu:
        return Check(name, False, f"vllm runs on CUDA GPUs, not {device!r}", gpu_fix)
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return Check(name, False, f"{device!r} is not a device torch knows", "pass --device auto, cpu, cuda or cuda:N")
    return Check(name, True, device)


def _vllm_check(role: str) -> Check:
    name = f"{role} vllm installed"
    try:
        import vllm
    except ImportError:
        return Check(name, False, "vllm is not installed", "pip install '.[vllm]' (a CUDA build)")
    except Exception as e:  # noqa: BLE001 - a broken install raises all sorts
        return Check(name, False, f"import vllm failed: {type(e).__name__}: {_first_line(e, 160)}",
                     "reinstall vllm to match torch and CUDA: pip install '.[vllm]'")
    return Check(name, True, f"vllm {getattr(vllm, '__version__', '?')}")


def check_local_model(role: str, spec: ModelSpec, *, vision: bool = True) -> list[Check]:
    """The transformers or vllm backend: the model resolves, its files are there, the device exists."""
    kind = resolve_backend(spec.backend, list(spec.base_urls))
    checks = [_vllm_check(role)] if kind == "vllm" else []
    if not spec.model:
        checks.append(Check(f"{role} {kind} model", False, "no model given",
                            f"pass {_model_flag(role)} with a model id or a local folder"))
    else:
        checks += _hf_model_checks(role, kind, spec.model, vision)
    checks.append(_device_check(role, spec.device, need_gpu=(kind == "vllm")))
    return checks


# -- the speech model (--transcribe-model) --------------------------------------

SPEECH_SERVE_FIX = "serve a Whisper model there (vllm serve openai/whisper-large-v3 answers /v1/audio/transcriptions)"


async def check_speech_endpoint(role: str, spec: ModelSpec) -> list[Check]:
    """Each base URL: GET /models lists the model, and a one-second silent WAV sent to
    /audio/transcriptions is answered."""
    import numpy as np

    from ..prep.audio import SAMPLE_RATE
    from ..prep.models.asr import OpenAITranscriber
    from ..prep.models.openai_backend import resolve_base_urls

    checks: list[Check] = []
    for url in resolve_base_urls(list(spec.base_urls)):
        where = f"{role} endpoint {url}"
        heard = OpenAITranscriber(spec.model or "-", [url], spec.api_key, concurrency=1, timeout_s=spec.timeout_s,
                                  max_retries=min(spec.max_retries, 1), backoff_base_s=0.2, backoff_max_s=1.0)
        try:
            try:
                served = (await heard.endpoint.list_models())[url]
            except ModelError as e:
                error = _strip_prefix(heard.endpoint.redact(str(e)), heard.name, url)
                checks.append(Check(f"{where} reachable", False, error,
                                    _reach_fix(error, url, spec, False, _key_sent(spec))))
                continue
            if not spec.model:
                checks.append(Check(f"{where} speech model", False, f"no model named; served here: {_names(served)}",
                                    f"pass {_model_flag(role)} with one of them"))
                continue
            if spec.model not in served:
                checks.append(Check(f"{where} serves model {spec.model!r}", False,
                                    f"not among the models served here: {_names(served)}",
                                    f"pass {_model_flag(role)} with one of the served names"))
                continue
            try:
                started = asyncio.get_running_loop().time()
                await heard.transcribe([np.zeros(SAMPLE_RATE, np.float32)], None)
                seconds = asyncio.get_running_loop().time() - started
            except ModelError as e:
                error = _strip_prefix(heard.endpoint.redact(str(e)), heard.name, url)
                checks.append(Check(f"{where} transcribes with {spec.model!r}", False,
                                    f"a one-second silent WAV failed: {_first_line(error, 160)}", SPEECH_SERVE_FIX))
                continue
            checks.append(Check(f"{where} transcribes with {spec.model!r}", True,
                                f"listed by GET /models; a one-second silent WAV answered in {seconds:.2f} s"))
        finally:
            await heard.aclose()
    return checks


def check_local_speech_model(role: str, spec: ModelSpec) -> list[Check]:
    """An in-process speech model: it is found, its config and processor load (no weights), the device exists."""
    from ..prep.models.locate import ModelNotFound, locate_model

    name = f"{role} transformers model {spec.model!r}"
    if not spec.model:
        return [Check(f"{role} model", False, "no model given", f"pass {_model_flag(role)} with a Whisper model")]
    try:
        found = locate_model(spec.model)
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(os.path.expanduser(spec.model))
        AutoProcessor.from_pretrained(os.path.expanduser(spec.model))
    except ModelNotFound as e:
        return [Check(name, False, str(e), f"pass {_model_flag(role)} with a Whisper-family model folder or "
                                            "Hugging Face id (hf download ORG/NAME --local-dir DIR where there is "
                                            "network)")]
    except Exception as e:  # noqa: BLE001 - any load failure is one line
        return [Check(name, False, f"its config or processor does not load: {_first_line(e, 160)}",
                      "pass a speech recognition checkpoint (Whisper family) with its processor files")]
    return [Check(name, True, f"{found.describe()}; config ({config.model_type}) and processor load"),
            _device_check(role, spec.device, need_gpu=False)]


# -- everything --------------------------------------------------------------


def _resolved_urls(spec: ModelSpec) -> tuple[str, ...]:
    from ..prep.models.openai_backend import resolve_base_urls

    return tuple(resolve_base_urls(list(spec.base_urls)))


def run_doctor(roles: dict[str, ModelSpec], *, images: int = 16, vision_roles: Iterable[str] | None = None,
               tools: bool = True, on_check: Callable[[Check], None] | None = None,
               speech: ModelSpec | None = None) -> list[Check]:
    """Tools first, then each distinct (backend, base URLs, model) once, named by the roles sharing it,
    then the speech model (`speech`: --transcribe-model) when one is given.

    A group gets the image check when any of its roles is in `vision_roles` (default: all).
    `on_check` sees each check as soon as its group is done, in order.
    """
    vision_set = set(roles if vision_roles is None else vision_roles)
    keys = [s.api_key for s in (*roles.values(), speech) if s is not None and s.api_key]
    secrets = set(keys) | {os.environ.get("OPENAI_API_KEY") or ""}
    secrets = {s for s in secrets if len(s) >= _MIN_SECRET}
    results: list[Check] = []

    def emit(check: Check) -> None:
        for secret in secrets:
            check.name, check.detail, check.fix = (t.replace(secret, "<redacted>")
                                                   for t in (check.name, check.detail, check.fix))
        results.append(check)
        if on_check is not None:
            on_check(check)

    if tools:
        for check in check_tools():
            emit(check)

    groups: dict[tuple, list[str]] = {}
    for role, spec in roles.items():
        try:
            kind = resolve_backend(spec.backend, list(spec.base_urls))
        except ModelError as e:
            emit(Check(f"{role} backend", False, str(e), "use --backend openai, transformers, vllm or auto"))
            continue
        urls = _resolved_urls(spec) if kind == "openai" else ()
        groups.setdefault((kind, urls, spec.model), []).append(role)
    if not roles and speech is None:
        emit(_skip("models", "none given: pass --model (and --base-url), --caption-model or --qa-model to check one"))

    async def one(kind: str, label: str, spec: ModelSpec, vision: bool) -> list[Check]:
        try:
            if kind == "openai":
                return await check_endpoint(label, spec, images=images, vision=vision)
            return await asyncio.to_thread(check_local_model, label, spec, vision=vision)
        except Exception as e:  # noqa: BLE001 - a preflight reports, it does not crash
            return [Check(f"{label} {kind} model", False, f"unexpected {type(e).__name__}: {_first_line(e)}",
                          "please report this")]

    async def run_all() -> None:
        tasks = []
        for (kind, _urls, _model), names in groups.items():
            label = "+".join(names)
            vision = any(n in vision_set for n in names)
            tasks.append(asyncio.ensure_future(one(kind, label, roles[names[0]], vision)))
        for task in tasks:
            for check in await task:
                emit(check)

    if groups:
        asyncio.run(run_all())
    if speech is not None:
        for check in _speech_checks(speech):
            emit(check)
    return results


def _speech_checks(spec: ModelSpec) -> list[Check]:
    role = "transcribe"
    try:
        kind = resolve_backend(spec.backend, list(spec.base_urls))
    except ModelError as e:
        return [Check(f"{role} backend", False, str(e), "use --transcribe-backend openai, transformers or auto")]
    try:
        if kind == "openai":
            return asyncio.run(check_speech_endpoint(role, spec))
        if kind == "vllm":
            return [Check(f"{role} backend", False, "the in-process vllm backend does not transcribe",
                          "serve the model with `vllm serve MODEL` and pass --transcribe-base-url")]
        return check_local_speech_model(role, spec)
    except Exception as e:  # noqa: BLE001 - a preflight reports, it does not crash
        return [Check(f"{role} {kind} model", False, f"unexpected {type(e).__name__}: {_first_line(e)}",
                      "please report this")]

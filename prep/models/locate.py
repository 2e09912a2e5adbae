"""Where an in-process model comes from, and whether it takes images, without loading weights.

One home for three questions that `doctor`, `ask`, `eval`, `synthesize` and
`rl` all ask before a run: is `--model X` a local folder, a model in the
Hugging Face cache, or something the hub must provide; is it a
vision-language model; and, when none of that holds, why not, in one line.
The hub is asked once, with a short timeout and no retries, so a missing
`--base-url` is reported at once instead of after a download loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .base import ModelError

HUB_TIMEOUT_S = 10.0


class ModelNotFound(ModelError):
    """The model is neither a local folder, nor cached, nor (reachably) on the hub."""


@dataclass(frozen=True)
class LocatedModel:
    where: str                 # "folder", "cache" or "hub"
    model_type: str | None     # config.json's model_type, when known
    takes_images: bool | None  # None when the type is unknown

    def describe(self) -> str:
        kind = {True: "vision-language", False: "text-only"}.get(self.takes_images, "type unknown")
        where = {"folder": "local folder", "cache": "in the Hugging Face cache",
                 "hub": "on the Hugging Face hub"}[self.where]
        return f"{where}, {self.model_type or 'model type unknown'} ({kind})"


def looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name" has exactly one slash)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def takes_images(model_type: str | None, auto_map: dict | None = None) -> bool | None:
    """True for vision-language model types, False for text-only ones, None when unknown."""
    if not model_type:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in (auto_map or {})


def config_takes_images(config) -> bool:
    return bool(takes_images(getattr(config, "model_type", None), getattr(config, "auto_map", None)))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def _from_config(where: str, config) -> LocatedModel:
    model_type = getattr(config, "model_type", None)
    return LocatedModel(where, model_type, takes_images(model_type, getattr(config, "auto_map", None)))


def locate_model(model: str, *, hub_timeout_s: float = HUB_TIMEOUT_S) -> LocatedModel:
    """Find `model` (a folder or a hub id) without loading weights. Raises ModelNotFound (one line)."""
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not path.is_dir():
            raise ModelNotFound(f"{path} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"no config.json in {path}")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - any load failure is one line
            raise ModelNotFound(f"{path}/config.json does not load ({type(e).__name__}: {_first_line(e)})") from None
        return _from_config("folder", config)
    if looks_like_path(model):
        raise ModelNotFound(f"no such folder: {path.absolute()}")

    from transformers import AutoConfig

    try:
        return _from_config("cache", AutoConfig.from_pretrained(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or unreadable): ask the hub
        pass
    if hub_offline():
        raise ModelNotFound("not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    try:
        import huggingface_hub

        info = huggingface_hub.model_info(model, timeout=hub_timeout_s)
    except Exception as e:  # noqa: BLE001
        kind = type(e).__name__
        if "NotFound" in kind or "Gated" in kind:
            raise ModelNotFound(f"not a local folder and not on the Hugging Face hub ({kind})") from None
        raise ModelNotFound("not a local folder, not in the Hugging Face cache, and the hub cannot be "
                            f"reached ({kind})") from None
    model_type = (getattr(info, "config", None) or {}).get("model_type")
    return LocatedModel("hub", model_type, takes_images(model_type))

"""How alike two clips look, judged from their frames: the visual filter of `lvr vpo`.

A distractor clip whose frames look too much like the anchor's would make a preference
triple ambiguous (the "wrong" clip shows the right answer too), so `lvr vpo` leaves it
out. Two measures of how alike two frames are, chosen by option:

- ``pixel`` (CPU, no model): each frame becomes a 32x32 grayscale thumbnail with values
  in [0, 1]; two frames' similarity is 1 minus the mean absolute difference of their
  thumbnails (1: the same picture; a frame differing in a sixteenth of its area by full
  contrast scores about 0.95);
- ``vision``: each frame's embedding from the vision tower of a vision-language model
  (the model's image features, mean-pooled over the image's tokens, L2-normalised);
  two frames' similarity is the cosine of their embeddings.

Two clips' similarity is the same for both measures: for each frame of the anchor, the
best match among the other clip's frames, averaged over the anchor's frames. A clip that
repeats the anchor's content scores near 1 even when its frames are ordered or sampled
differently, and one shared frame (a title card, a black frame) does not make two clips
look alike.
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

MEASURES = ("pixel", "vision")
# Distractors at or above these are left out, unless --max-similarity says otherwise.
DEFAULT_MAX_SIMILARITY = {"pixel": 0.92, "vision": 0.95}
THUMBNAIL_SIDE = 32


def clip_similarity(frame_similarities) -> float:
    """Anchor frames (rows) x other clip's frames (columns) -> the mean over rows of each row's best match."""
    return float(frame_similarities.max(axis=1).mean())


def _decode(jpeg: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        return im.convert("RGB")


def thumbnail(jpeg: bytes):
    """A frame as a flat float32 vector: its grayscale 32x32 thumbnail (area-averaged), values in [0, 1]."""
    import numpy as np
    from PIL import Image

    small = _decode(jpeg).convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


class PixelMeasure:
    """The ``pixel`` measure: thumbnails compared by mean absolute difference."""

    name = "pixel"
    model = None

    def frame_features(self, frames: Sequence[bytes]):
        import numpy as np

        return np.stack([thumbnail(f) for f in frames])

    def frame_similarities(self, a, b):
        import numpy as np

        return 1.0 - np.abs(a[:, None, :] - b[None, :, :]).mean(axis=2)


class VisionMeasure:
    """The ``vision`` measure: mean-pooled image features of a vision-language model's vision tower."""

    name = "vision"

    def __init__(self, model: str, *, device: str = "auto", batch: int = 16):
        self.model = model
        self._device = device
        self._batch = batch
        self._loaded: tuple | None = None

    def _load(self):
        if self._loaded is None:
            import os

            import transformers
            from transformers import AutoConfig, AutoModelForImageTextToText

            from ..prep.models.locate import config_takes_images
            from ..prep.models.transformers_backend import load_processor, resolve_device_and_dtype

            name = os.path.expanduser(self.model)
            config = AutoConfig.from_pretrained(name)
            if not config_takes_images(config):
                raise ValueError(f"--similarity-model {self.model}: a text-only model has no vision tower")
            device, dtype = resolve_device_and_dtype(self._device, "auto")
            transformers.logging.disable_progress_bar()  # lvr prints its own lines
            vlm = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
            self._loaded = (vlm, load_processor(name, config).image_processor, device)
        return self._loaded

    def frame_features(self, frames: Sequence[bytes]):
        import numpy as np
        import torch

        vlm, image_processor, device = self._load()
        out = []
        for i in range(0, len(frames), self._batch):
            images = [_decode(f) for f in frames[i:i + self._batch]]
            inputs = image_processor(images=images, return_tensors="pt")
            with torch.no_grad():
                features = vlm.get_image_features(inputs["pixel_values"].to(device),
                                                  inputs["image_grid_thw"].to(device))
            per_image = getattr(features, "pooler_output", features)  # one (tokens, hidden) tensor per image
            for tokens in per_image:
                pooled = tokens.float().mean(dim=0)
                out.append((pooled / pooled.norm().clamp_min(1e-12)).cpu().numpy())
        return np.stack(out)

    def frame_similarities(self, a, b):
        return a @ b.T


def make_measure(name: str, model: str | None = None, *, device: str = "auto"):
    """The measure named by --similarity (`model` is the vision-language model for ``vision``)."""
    if name == "pixel":
        return PixelMeasure()
    if name == "vision":
        if not model:
            raise ValueError("--similarity vision needs --similarity-model (a vision-language model)")
        return VisionMeasure(model, device=device)
    raise ValueError(f"--similarity takes {', '.join(MEASURES)}, not {name!r}")


class ClipLooks:
    """Frame features of clips, computed once per clip, and the similarity of two clips."""

    def __init__(self, measure, read_frames: Callable[[object], list[bytes]]):
        self.measure = measure
        self._read = read_frames          # clip key -> its frames' JPEG bytes
        self._features: dict = {}

    def features(self, key):
        if key not in self._features:
            self._features[key] = self.measure.frame_features(self._read(key))
        return self._features[key]

    def similarity(self, anchor, other) -> float:
        """How much `other` looks like `anchor` (not symmetric: every anchor frame looks for its match)."""
        return clip_similarity(self.measure.frame_similarities(self.features(anchor), self.features(other)))

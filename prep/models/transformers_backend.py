"""An in-process Hugging Face chat model (CPU or GPU): the default when no endpoint is set.

Vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) load through
AutoModelForImageTextToText with their processor; text-only ones through
AutoModelForCausalLM with just the tokenizer. torch and transformers are imported
on first use so that importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import threading
import time
from typing import Any, Callable

from .base import Completion, GenerationOptions, Message, ModelError, Usage, message_text
from .locate import config_takes_images, looks_like_path

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, Any]:
    """("cuda"|"cpu"|..., torch dtype): GPU in bf16 where supported, else CPU in float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32  # CPU half precision is slow and lossy
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, {', '.join(sorted(set(_DTYPES)))})")
    return device, getattr(torch, _DTYPES[dtype])


def _without_video_processor(cls: type) -> type:
    """`cls` minus its video processor, whose classes all need torchvision.

    ProcessorMixin takes its sub-processors from the __init__ signature, so a subclass
    whose __init__ has no video_processor is built from an image processor and a
    tokenizer alone. Video then goes in as a list of frames (images).
    """
    class ImageOnlyProcessor(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer,
                             chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = cls.__name__
    return ImageOnlyProcessor


def _read_json(model: str, filename: str) -> dict:
    from transformers.utils import cached_file

    path = cached_file(model, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_processor(model: str, config, *, trust_remote_code: bool = False):
    """The checkpoint's multimodal processor: AutoProcessor, or else assembled by hand.

    AutoProcessor fails for the Qwen-VL families without torchvision (their video
    processors need it), so then, and whenever AutoProcessor fails, the family's
    processor class (from the config's model_type, or the folder's processor_class)
    is built from the saved image processor, which falls back to its PIL variant,
    and the tokenizer.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    model_type = getattr(config, "model_type", None)
    name = PROCESSOR_MAPPING_NAMES.get(model_type) or _read_json(model, "preprocessor_config.json").get(
        "processor_class")
    cls = getattr(transformers, name, None) if name else None
    # Trying AutoProcessor when it must fail would load the tokenizer twice (seconds).
    doomed = cls is not None and "video_processor" in cls.get_attributes() and not is_torchvision_available()
    if not doomed:
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            if hasattr(processor, "image_processor"):
                return processor
        except Exception:  # noqa: BLE001 - any failure sends us to the manual route below
            pass
    if cls is None:
        raise ModelError(f"no processor class known for model type {model_type!r}")
    image_processor = AutoImageProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    # Real checkpoints keep the processor's template in chat_template.json or .jinja;
    # the tokenizer loads the latter itself.
    template = tokenizer.chat_template or _read_json(model, "chat_template.json").get("chat_template")
    return _without_video_processor(cls)(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=template)


def _decode_image(jpeg: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("RGB")


class _Loaded:
    def __init__(self, model, processor, tokenizer, vision: bool):
        self.model = model
        self.processor = processor  # the tokenizer itself for text-only models
        self.tokenizer = tokenizer
        self.vision = vision


class TransformersChat:
    """A ChatModel running a Hugging Face checkpoint in this process.

    Generation runs in a worker thread, at most `max_concurrency` at a time (one by
    default: a single model rarely gains from parallel generate calls).
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", max_concurrency: int = 1,
                 trust_remote_code: bool = False, chat_template_kwargs: dict | None = None):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        self.name = str(model)
        self.usage = Usage()
        # Called in the worker thread just before generate, for tests and debugging.
        self.inspect: Callable[[dict], None] | None = None
        self._device = device
        self._dtype = dtype
        self._trust_remote_code = trust_remote_code
        self._template_kwargs = dict(chat_template_kwargs or {})
        self._max_concurrency = max_concurrency
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()
        self._usage_lock = threading.Lock()
        # The thread semaphore is the real limit; the asyncio one keeps waiting
        # requests out of the shared thread pool. It belongs to one event loop.
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._gate: asyncio.Semaphore | None = None
        self._gate_loop: asyncio.AbstractEventLoop | None = None

    # -- loading -----------------------------------------------------------------

    def load(self) -> None:
        """Load the model now (it otherwise loads on first use). Raises ModelError."""
        self._ensure_loaded()

    def get_tokenizer(self):
        """The model's tokenizer (loading the model if needed), e.g. to count prompt tokens."""
        return self._ensure_loaded().tokenizer

    def _ensure_loaded(self) -> _Loaded:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._load_lock:
            if self._loaded is None:
                try:
                    self._loaded = self._load()
                except ModelError as e:
                    raise ModelError(f"transformers model {self.name!r}: {e}") from None
                except Exception as e:  # noqa: BLE001 - every load failure becomes one line naming the model
                    raise ModelError(f"cannot load transformers model {self.name!r}: "
                                     f"{type(e).__name__}: {_one_line(e)}") from None
            return self._loaded

    def _load(self) -> _Loaded:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        if looks_like_path(self.name) and not os.path.exists(os.path.expanduser(self.name)):
            raise ModelError("no such model folder")
        device, dtype = resolve_device_and_dtype(self._device, self._dtype)
        remote = self._trust_remote_code
        name = os.path.expanduser(self.name)
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote)
        vision = config_takes_images(config)
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        # device_map places weights straight onto the GPU instead of via host memory.
        model = auto.from_pretrained(name, config=config, dtype=dtype, trust_remote_code=remote,
                                     device_map=device if device != "cpu" else None)
        if device == "cpu":
            model = model.to(device)
        model.eval()
        if vision:
            processor = load_processor(name, config, trust_remote_code=remote)
            tokenizer = processor.tokenizer
        else:
            tokenizer = processor = AutoTokenizer.from_pretrained(name, trust_remote_code=remote)
        if tokenizer.chat_template is None and getattr(processor, "chat_template", None) is None:
            raise ModelError("the checkpoint has no chat template")
        return _Loaded(model, processor, tokenizer, vision)

    # -- requests ----------------------------------------------------------------

    def _convert(self, messages: list[Message], vision: bool) -> tuple[list[dict], list]:
        """Our messages -> chat-template messages plus the decoded images, in order."""
        conversation, images = [], []
        for message in messages:
            content = message.get("content")
            if content is None:
                content = ""
            if isinstance(content, str):
                parts = [{"type": "text", "text": content}] if vision else content
            else:
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        parts.append({"type": "text", "text": part.get("text", "")})
                    elif kind == "image":
                        if not vision:
                            raise ModelError(f"model {self.name!r} is text-only and cannot take images")
                        try:
                            images.append(_decode_image(part["jpeg"]))
                        except Exception as e:  # noqa: BLE001
                            raise ModelError(f"image {len(images) + 1} is not a readable JPEG: {_one_line(e)}") \
                                from None
                        parts.append({"type": "image"})
                    else:
                        raise ModelError(f"unsupported message part type {kind!r}")
                if not vision:  # text-only templates expect a plain string
                    parts = message_text(parts)
            role = message.get("role")
            if not isinstance(role, str):
                raise ModelError(f"message without a role: {str(message)[:80]}")
            conversation.append({"role": role, "content": parts})
        return conversation, images

    def _generate(self, messages: list[Message], options: GenerationOptions) -> Completion:
        import torch
        from transformers import StoppingCriteriaList

        loaded = self._ensure_loaded()
        started = time.perf_counter()
        conversation, images = self._convert(messages, loaded.vision)
        processor, tokenizer, model = loaded.processor, loaded.tokenizer, loaded.model
        try:
            text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                 **self._template_kwargs)
            if loaded.vision:
                inputs = processor(text=[text], images=images or None, return_tensors="pt",
                                   add_special_tokens=False)
            else:
                inputs = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"model {self.name!r} could not prepare the prompt: {type(e).__name__}: "
                             f"{_one_line(e)}") from None
        if self.inspect is not None:
            self.inspect({"text": text, "images": images, "inputs": inputs})
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        prompt_len = inputs["input_ids"].shape[1]

        config = copy.deepcopy(model.generation_config)
        config.max_new_tokens = max(1, options.max_tokens)
        if options.temperature > 0:
            # The checkpoint's other defaults (top_k, repetition_penalty) stay, as vLLM keeps them.
            config.do_sample = True
            config.temperature = options.temperature
            config.top_p = options.top_p
        else:
            # Greedy: clear the checkpoint's sampling defaults so generate does not warn.
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        stopping = StoppingCriteriaList([_StopOnStrings(tokenizer, options.stop, prompt_len)] if options.stop else [])
        try:
            with torch.inference_mode():
                if options.seed is not None and options.temperature > 0:
                    torch.manual_seed(options.seed)
                output = model.generate(**inputs, generation_config=config, stopping_criteria=stopping)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"model {self.name!r} failed to generate: {type(e).__name__}: {_one_line(e)}") \
                from None
        new_ids = output[0, prompt_len:].tolist()
        completion = tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "length" if len(new_ids) >= config.max_new_tokens else "stop"
        cut = _cut_at_stop(completion, options.stop)
        if cut is not None:
            completion, finish = cut, "stop"
        eos = config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if new_ids and new_ids[-1] in eos:
            finish = "stop"
        usage = Usage(prompt_tokens=prompt_len, completion_tokens=len(new_ids), requests=1)
        with self._usage_lock:
            self.usage.add(usage)
        return Completion(text=completion, model=self.name, usage=usage,
                          seconds=time.perf_counter() - started, finish_reason=finish)

    def _generate_in_slot(self, messages: list[Message], options: GenerationOptions) -> Completion:
        with self._slots:
            return self._generate(messages, options)

    def _async_gate(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._gate_loop is not loop:
            self._gate = asyncio.Semaphore(self._max_concurrency)
            self._gate_loop = loop
        return self._gate

    async def complete(self, messages: list[Message], options: GenerationOptions = GenerationOptions()) -> Completion:
        async with self._async_gate():
            return await asyncio.to_thread(self._generate_in_slot, messages, options)

    async def aclose(self) -> None:
        """Drop the model (a later request loads it again) and free GPU memory."""
        with self._load_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is not None:
            del loaded
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _cut_at_stop(text: str, stops) -> str | None:
    """`text` up to its first stop string, or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else None


class _StopOnStrings:
    """Stops generate once the new text contains a stop string.

    Decodes only a tail of the new tokens each step: a stop string of n characters
    that just completed lies within the last n tokens (every token decodes to at least
    one character; a few spare tokens cover split multi-byte characters).
    """

    def __init__(self, tokenizer, stops, prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.window = max((len(s) for s in self.stops), default=1) + 4

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids:
            new = row[self.prompt_len:]
            tail = self.tokenizer.decode(new[-self.window:].tolist(), skip_special_tokens=False)
            done.append(any(s in tail for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

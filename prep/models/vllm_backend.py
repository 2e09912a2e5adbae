"""In-process vLLM engine (optional extra: ``pip install .[vllm]``).

Imported only when ``--backend vllm`` is chosen; the test suite never needs it.
Images travel as base64 data URLs in OpenAI-style chat messages, which
``LLM.chat`` accepts, so this shares the message shape of the HTTP backend.
"""

from __future__ import annotations

import asyncio
import threading
import time

from .base import Completion, GenerationOptions, Message, ModelError, Usage
from .openai_backend import to_openai_messages

MAX_IMAGES_PER_PROMPT = 128  # a high node sends 128 frames


class VLLMChat:
    def __init__(self, model: str, *, max_images: int = MAX_IMAGES_PER_PROMPT, **engine_args):
        self.name = model
        self.usage = Usage()
        self._engine_args = {"limit_mm_per_prompt": {"image": max_images}, **engine_args}
        self._llm = None
        self._lock = threading.Lock()

    def _engine(self):
        with self._lock:
            if self._llm is None:
                try:
                    from vllm import LLM
                except ImportError:
                    raise ModelError("the vllm backend needs the optional extra: pip install '.[vllm]'") from None
                try:
                    self._llm = LLM(model=self.name, **self._engine_args)
                except Exception as e:
                    raise ModelError(f"vllm could not load {self.name}: {str(e).splitlines()[0]}") from None
            return self._llm

    def _generate(self, messages: list[Message], options: GenerationOptions) -> Completion:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature,
                                top_p=options.top_p, stop=list(options.stop) or None, seed=options.seed)
        out = self._engine().chat([to_openai_messages(messages)], params, use_tqdm=False)[0]
        usage = Usage(len(out.prompt_token_ids or []), len(out.outputs[0].token_ids), 1)
        self.usage.add(usage)
        return Completion(out.outputs[0].text, self.name, usage, time.perf_counter() - t0,
                          out.outputs[0].finish_reason)

    async def complete(self, messages: list[Message], options: GenerationOptions = GenerationOptions()) -> Completion:
        return await asyncio.to_thread(self._generate, messages, options)

    async def aclose(self) -> None:
        self._llm = None

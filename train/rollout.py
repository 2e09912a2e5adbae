"""Multi-turn RL rollouts through THE agent loop, recording every token the policy saw and wrote.

A rollout is `infer.agent.run_agent` over one question's `VideoEnv`, exactly as
`lvr ask` runs it, with one difference: the reasoning model is a
`TokenRecordingModel`. That ChatModel owns the rollout's running token
sequence, so the tokens the policy is trained on are the tokens it sampled from:

- the first `complete` renders the chat template over the first messages
  (system + question with the high captions) with the generation prompt: these
  are the prompt ids;
- each later `complete` renders the conversation again, takes the text after the
  previous assistant turn's content (the end of that turn, the tool result or
  correction as a user turn, and the next generation prompt), tokenizes it and
  appends it with mask 0: environment text, no loss;
- then the next turn is sampled from the whole running sequence, stopping at
  `</tool>`/`</answer>` (the protocol's stop strings) or end of turn, and its
  tokens are appended with mask 1 together with their sampling log-probs
  (log-softmax of logits / temperature, as TRL computes them for the loss).

Turns of many rollouts are batched: a `TurnBatcher` collects the pending
`complete` calls of all rollouts of a step and samples them in one batched
`generate`, while rollouts waiting on a tool (a lazy caption) join the next
batch. Everything in a step runs on one event loop kept in a background thread,
so the models, stores and HTTP clients of the environment stay bound to it.

Generation backends (`TurnGenerator`):

- `TransformersTurnGenerator`: `generate` on the trainer's own (unwrapped) model,
  CPU or GPU, with per-row stop strings and per-row token limits;
- `VLLMTurnGenerator`: TRL's colocated vLLM engine (`use_vllm=True`,
  `vllm_mode="colocate"`), with the stop strings in its sampling parameters.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..infer.protocol import STOP_STRINGS, Breach, call_node_span, parse_interval
from ..prep.models.base import Completion, GenerationOptions, Message, ModelError, Usage, message_text
from ..prep import tags
from ..prep.tags import ANSWER, strip_think

MASK_MODEL, MASK_ENV = 1, 0


class RolloutError(Exception):
    """A rollout cannot be recorded faithfully (e.g. a chat template that rewrites earlier turns)."""


# -- generation backends ------------------------------------------------------------------

@dataclass
class Generated:
    """One sampled turn: its tokens, their sampling log-probs, and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    finish: str              # "stop" (a stop string), "eos" (end of turn) or "length"


@dataclass(frozen=True)
class TurnRequest:
    ids: list[int]           # the whole running sequence so far
    max_new_tokens: int


class TurnGenerator(Protocol):
    def generate(self, requests: Sequence[TurnRequest]) -> list[Generated]:
        ...


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """`text` up to and including its first stop string, or None when none occurs."""
    hits = [(i, s) for s in stops if s for i in [text.find(s)] if i >= 0]
    if not hits:
        return None
    i, s = min(hits)
    return text[: i + len(s)]


class _RowStops:
    """Stopping criteria for a batch: per row, a stop string in the new text or the row's own token limit.

    Remembers where each row finished (`done_at`, new tokens), so rows that stopped
    early are cut there and the padding generate adds after them is dropped.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int, limits: Sequence[int]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.limits = list(limits)
        self.done_at: list[int | None] = [None] * len(limits)
        self.window = max((len(s) for s in self.stops), default=1) + 4

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        n_new = input_ids.shape[1] - self.prompt_len
        done = []
        for row, ids in enumerate(input_ids):
            if self.done_at[row] is None:
                tail = self.tokenizer.decode(ids[self.prompt_len:][-self.window:].tolist(),
                                             skip_special_tokens=False) if self.stops else ""
                if any(s in tail for s in self.stops) or n_new >= self.limits[row]:
                    self.done_at[row] = n_new
            done.append(self.done_at[row] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _logprob_recorder(temperature: float):
    """A LogitsProcessor recording log-softmax(logits / T) of each sampled token.

    generate runs custom processors after its own non-sampling processors and before
    the sampling warpers (temperature, top-k, top-p), so the recorded values are
    what TRL recomputes for the loss: log_softmax(logits / temperature).
    """
    import torch
    from transformers import LogitsProcessor

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.previous = None
            self.steps: list[torch.Tensor] = []

        def __call__(self, input_ids, scores):
            if self.previous is not None:
                self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
            self.previous = torch.log_softmax(scores.float() / temperature, dim=-1)
            return scores

        def finish(self, sequences) -> "torch.Tensor":
            if self.previous is not None:
                self.steps.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
                self.previous = None
            return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(sequences.shape[0], 0)

    return Recorder()


class TransformersTurnGenerator:
    """Samples turns with a Hugging Face model in this process (the trainer's policy, unwrapped)."""

    def __init__(self, model, tokenizer, generation_config, *, temperature: float,
                 stops: Sequence[str] = STOP_STRINGS, eos_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                 autocast: Callable[[], Any] | None = None):
        if temperature <= 0:
            raise ValueError("RL rollouts sample: temperature must be above 0")
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.temperature = temperature
        self.stops = tuple(stops)
        self.eos = set(eos_token_ids)
        self.pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        self.autocast = autocast

    def generate(self, requests: Sequence[TurnRequest]) -> list[Generated]:
        import copy

        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if not requests:
            return []
        device = self.model.device
        width = max(len(r.ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):  # left padding, as generate expects
            ids[row, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[row, width - len(r.ids):] = 1
        limits = [max(1, r.max_new_tokens) for r in requests]
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max(limits)
        config.do_sample = True
        config.temperature = self.temperature
        stops = _RowStops(self.tokenizer, self.stops, width, limits)
        recorder = _logprob_recorder(self.temperature)
        import contextlib

        with torch.no_grad(), (self.autocast() if self.autocast else contextlib.nullcontext()):
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=config, logits_processor=LogitsProcessorList([recorder]),
                                      stopping_criteria=StoppingCriteriaList([stops]))
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        logprobs = recorder.finish(sequences).cpu()
        new = sequences[:, width:].cpu()
        results = []
        for row in range(len(requests)):
            tokens = new[row].tolist()
            end, finish = len(tokens), "length"
            if stops.done_at[row] is not None:
                end = stops.done_at[row]
                finish = "length" if end >= limits[row] else "stop"
            for i, t in enumerate(tokens[:end]):
                if t in self.eos:
                    end, finish = i + 1, "eos"
                    break
            end = min(end, limits[row])
            if finish == "length" and end and cut_at_stop(self.tokenizer.decode(tokens[:end]), self.stops):
                finish = "stop"  # the limit and a stop string fell on the same token
            results.append(Generated(tokens[:end], [float(x) for x in logprobs[row, :end].tolist()], finish))
        return results


class VLLMTurnGenerator:
    """Samples turns with TRL's colocated vLLM engine (`GRPOConfig(use_vllm=True, vllm_mode="colocate")`).

    The stop strings, the per-turn token limit and `include_stop_str_in_output`
    go in through `GRPOConfig.generation_kwargs` (see `train.rl`); TRL syncs the
    policy weights into vLLM before each step's rollouts. Rows are cut to their
    own remaining budget afterwards.
    """

    def __init__(self, vllm_generation, tokenizer, *, stops: Sequence[str] = STOP_STRINGS,
                 eos_token_ids: Sequence[int] = ()):
        self.vllm = vllm_generation
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.eos = set(eos_token_ids)

    def generate(self, requests: Sequence[TurnRequest]) -> list[Generated]:
        if not requests:
            return []
        _, completions, logprobs, _ = self.vllm.generate(prompts=[list(r.ids) for r in requests], images=None,
                                                         num_generations=1)
        results = []
        for r, tokens, lps in zip(requests, completions, logprobs):
            tokens = list(tokens)
            lps = [float(lp[0]) if isinstance(lp, (list, tuple)) else float(lp) for lp in (lps or [])]
            lps = (lps + [0.0] * len(tokens))[: len(tokens)]
            end, finish = len(tokens), "length"
            for i, t in enumerate(tokens):
                if t in self.eos:
                    end, finish = i + 1, "eos"
                    break
            if finish != "eos" and cut_at_stop(self.tokenizer.decode(tokens), self.stops):
                finish = "stop"
            if end > r.max_new_tokens:
                end, finish = r.max_new_tokens, "length"
            results.append(Generated(tokens[:end], lps[:end], finish))
        return results


# -- batching the turns of concurrent rollouts -----------------------------------------------

class TurnBatcher:
    """Runs rollouts concurrently and samples their pending turns in batches.

    A batch is sampled as soon as every unfinished rollout is waiting for a turn,
    or when no new request has arrived for `wait_s` (some rollouts are busy with
    a tool, e.g. a caption being made); those join a later batch.
    """

    def __init__(self, generator: TurnGenerator, *, max_batch: int | None = None, wait_s: float = 0.05):
        self.generator = generator
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.batches: list[int] = []          # sizes of the batches sampled, for the log
        self._pending: list[tuple[TurnRequest, asyncio.Future]] = []
        self._active = 0
        self._wake: asyncio.Event | None = None

    async def generate(self, request: TurnRequest) -> Generated:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((request, fut))
        self._wake.set()
        return await fut

    async def run(self, coros: Sequence) -> list:
        """Run the rollout coroutines to the end; their results (or exceptions) in order."""
        self._wake = asyncio.Event()
        self._active = len(coros)

        async def wrapped(coro):
            try:
                return await coro
            finally:
                self._active -= 1
                self._wake.set()

        tasks = [asyncio.create_task(wrapped(c)) for c in coros]
        try:
            while self._active > 0 or self._pending:
                await self._settle()
                if self._pending:
                    await self._flush()
        finally:
            for fut in (f for _, f in self._pending if not f.done()):
                fut.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    async def _settle(self) -> None:
        while True:
            if self._pending and len(self._pending) >= self._active:
                return
            if not self._pending and self._active == 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.wait_s if self._pending else None)
            except asyncio.TimeoutError:
                if self._pending:
                    return

    async def _flush(self) -> None:
        take = len(self._pending) if not self.max_batch else min(self.max_batch, len(self._pending))
        batch, self._pending = self._pending[:take], self._pending[take:]
        self.batches.append(len(batch))
        try:
            results = await asyncio.to_thread(self.generator.generate, [r for r, _ in batch])
        except Exception as e:  # noqa: BLE001 - every waiting rollout gets the failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(ModelError(f"generation failed: {type(e).__name__}: {e}"))
            return
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)


# -- the recording chat model ------------------------------------------------------------------

@dataclass
class TokenRecord:
    """The running token sequence of one rollout."""

    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)       # 1 sampled by the policy, 0 environment/template
    logprobs: list[float] = field(default_factory=list)     # sampling log-probs; 0.0 on environment tokens
    turns: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each sampled turn in completion_ids
    truncated: bool = False                                  # ran out of completion budget


class TokenRecordingModel:
    """A ChatModel for one rollout that samples from, and records, the running token sequence.

    `run_agent` calls `complete(messages)` once per turn with the whole
    conversation; only the text that is new since the previous assistant turn is
    tokenized and appended (masked), then the next turn is sampled (unmasked).
    """

    def __init__(self, tokenizer, batcher: TurnBatcher, *, max_completion_tokens: int, name: str = "policy",
                 template_kwargs: dict | None = None, stops: Sequence[str] = STOP_STRINGS):
        self.name = name
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.max_completion_tokens = max_completion_tokens
        self.template_kwargs = dict(template_kwargs or {})
        self.stops = tuple(stops)
        self.record = TokenRecord()
        self.usage = Usage()
        self._eos_text = {tokenizer.decode([t]) for t in _eos_ids(tokenizer)}

    # The chat template, rendered to text (the same rendering `lvr ask --backend transformers` does).
    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        conversation = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=generation_prompt, **self.template_kwargs)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def environment_text(self, messages: list[Message]) -> str:
        """The text between the previous assistant turn's content and the next generation.

        That is the end of the assistant turn (e.g. ``<|im_end|>\\n``), the tool
        result or correction as a user turn, and the generation prompt.
        """
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        head = self.render(messages[: last + 1], False)
        content = message_text(messages[last].get("content"))
        pos, anchor = head.rfind(content), content
        action = strip_think(content)
        if pos < 0 and action != content:  # templates that re-format the reasoning keep the action verbatim
            anchor = action.strip()
            pos = head.rfind(anchor) if anchor else -1
        if pos < 0:
            raise RolloutError("the chat template rewrites the assistant's turn, so the rollout's tokens cannot "
                               "match the conversation; use a template that renders assistant content verbatim "
                               "(`lvr sft` saves one with its checkpoints)")
        cut = pos + len(anchor)
        full = self.render(messages, True)
        if not full.startswith(head[:cut]):
            raise RolloutError("the chat template renders earlier turns differently once new turns follow; "
                               "multi-turn rollouts need an append-only template")
        return full[cut:]

    async def complete(self, messages: list[Message], options: GenerationOptions = GenerationOptions()) -> Completion:
        started = time.perf_counter()
        rec = self.record
        if not rec.prompt_ids and not rec.completion_ids:
            rec.prompt_ids = self.encode(self.render(messages, True))
        else:
            text = self.environment_text(messages)
            last = rec.completion_ids[-1] if rec.completion_ids else None
            if last is not None and last in _eos_ids(self.tokenizer):
                # The policy already closed its turn with the end-of-turn token the template adds.
                for eos in self._eos_text:
                    if eos and text.startswith(eos):
                        text = text[len(eos):]
                        break
            env = self.encode(text)
            if len(rec.completion_ids) + len(env) >= self.max_completion_tokens:
                rec.truncated = True
                raise ModelError(f"the rollout used up its {self.max_completion_tokens}-token completion budget")
            rec.completion_ids += env
            rec.env_mask += [MASK_ENV] * len(env)
            rec.logprobs += [0.0] * len(env)
        budget = self.max_completion_tokens - len(rec.completion_ids)
        max_new = min(options.max_tokens, budget)
        if max_new <= 0:
            rec.truncated = True
            raise ModelError(f"the rollout used up its {self.max_completion_tokens}-token completion budget")
        sequence = rec.prompt_ids + rec.completion_ids
        out = await self.batcher.generate(TurnRequest(sequence, max_new))
        start = len(rec.completion_ids)
        rec.completion_ids += out.tokens
        rec.env_mask += [MASK_MODEL] * len(out.tokens)
        rec.logprobs += list(out.logprobs)
        rec.turns.append((start, len(rec.completion_ids)))
        if out.finish == "length" and len(rec.completion_ids) >= self.max_completion_tokens:
            rec.truncated = True
        text = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
        text = cut_at_stop(text, self.stops) or text
        usage = Usage(prompt_tokens=len(sequence), completion_tokens=len(out.tokens), requests=1)
        self.usage.add(usage)
        return Completion(text=text, model=self.name, usage=usage, seconds=time.perf_counter() - started,
                          finish_reason="length" if out.finish == "length" else "stop")

    async def aclose(self) -> None:
        pass


def _eos_ids(tokenizer) -> set[int]:
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# -- one event loop for the whole run ------------------------------------------------------------

class LoopThread:
    """An asyncio event loop in a daemon thread; `run(coro)` runs a coroutine there and waits.

    The trainer calls the rollout function synchronously, step after step; the
    environment's models, stores and HTTP clients must stay on one loop.
    """

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="lvr-rollouts")
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


# -- tool-argument and timestamp tokens (token-aware KL) -----------------------------------------

def argument_token_mask(tokenizer, tokens: Sequence[int]) -> list[int]:
    """1 for the tokens of a sampled turn that spell the node id of its tool call, else 0.

    The node id is found by the protocol's own parser (`call_node_span`). The call
    sits at the end of the turn (generation stops at the tool's closing tag), so
    only a short tail is decoded (`tokens_over`), and tokens overlapping the
    ``(h, m[, l])`` tuple are marked.
    """
    full = tokenizer.decode(list(tokens), skip_special_tokens=False) if tokens else ""
    span = call_node_span(full)
    return tokens_over(tokenizer, tokens, full, [span] if span else [])


# The numbers of an interval answer; the protocol's syntax (`parse_interval`) allows no others in it.
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def timestamp_spans(text: str) -> list[tuple[int, int]]:
    """Where the two times of a turn's interval answer stand in `text`: (start, end) offsets.

    The last ``<answer>`` block outside the reasoning counts, and only when it reads as an
    interval in the protocol's syntax (`parse_interval`; reversed or outside the video is still
    an interval's wording); [] otherwise. E.g. ``<answer>[12.5, 30s]</answer>``: the spans of
    ``12.5`` and ``30``.
    """
    spans = tags.block_spans(ANSWER, tags.blank_think(text))
    if not spans:
        return []
    start, end = spans[-1]
    if parse_interval(text[start:end], None) == Breach.MALFORMED_INTERVAL:
        return []
    return [m.span() for m in _NUMBER.finditer(text, start, end)]


def timestamp_token_mask(tokenizer, tokens: Sequence[int]) -> list[int]:
    """1 for the tokens of a sampled turn that spell the times of its interval answer, else 0.

    The times are found in the decoded text (`timestamp_spans`) and every token whose
    characters overlap them is marked, so a token that merges a digit with a bracket, a
    comma or a space (``[12``, ``5,``) counts while the brackets, comma and tags alone do not.
    """
    full = tokenizer.decode(list(tokens), skip_special_tokens=False) if tokens else ""
    return tokens_over(tokenizer, tokens, full, timestamp_spans(full))


def tokens_over(tokenizer, tokens: Sequence[int], full: str, spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap one of `spans` (offsets into `full`, the decoded
    tokens), else 0.

    Each token's character span is measured from the end of the text (decoding ever longer
    suffixes), so only the tail that holds the spans is decoded: actions end a turn.
    """
    mask = [0] * len(tokens)
    if not spans:
        return mask
    first = min(lo for lo, _ in spans)
    ends = len(full)
    for i in range(len(tokens) - 1, -1, -1):
        begin = len(full) - len(tokenizer.decode(list(tokens[i:]), skip_special_tokens=False))
        if any(begin < hi and ends > lo for lo, hi in spans):
            mask[i] = 1
        ends = begin
        if begin <= first:
            break
    return mask

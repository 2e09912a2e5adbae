"""Asking the question model for JSON and reading its replies (never evaluated, only parsed).

A reply that is not the JSON asked for is asked again with a correction saying why,
a few times; then the question fails. The writer's reply becomes a `Draft`, a
filter's reply the option letter it chose (or None for "none"); for grounding, the
writer's reply becomes the query text and a filter's reply a yes or no.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..prep.lettering import chosen_letter, split_label
from ..prep.models.base import GenerationOptions, ModelError, Usage
from ..prep.tags import strip_think
from ..prep.tree import NodeId
from . import question_prompts as prompts

N_OPTIONS = 4   # options of every question: the answer and three distractors


class ReplyError(ValueError):
    """A model reply is not the JSON object asked for; the text says why (shown to the model)."""


class QuestionFailed(Exception):
    """A question could not be made (the model failed or kept replying unusably)."""


_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.S)


def parse_json_reply(text: str) -> dict:
    """The JSON object in a model reply, read with json.loads only (never evaluated).

    Tolerates reasoning (`strip_think`: an unclosed <think> hides everything after
    it), code fences and prose around one object. Raises ReplyError otherwise.
    """
    body = strip_think(text).strip()
    if not body:
        raise ReplyError("the reply is empty")
    candidates = [body]
    candidates += [m.group(1).strip() for m in _FENCE_RE.finditer(body)]
    i, j = body.find("{"), body.rfind("}")
    if 0 <= i < j:
        candidates.append(body[i:j + 1])
    for cand in candidates:
        try:
            value = json.loads(cand)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
        raise ReplyError(f"the reply is JSON but not an object (a {type(value).__name__})")
    raise ReplyError("the reply is not a JSON object")


def parse_clip_id(value: Any, k: int) -> NodeId | None:
    """[1, 2, 3], "(1, 2, 3)", "clip (1,2,3)" -> (1, 2, 3); None for null or anything else."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        nums = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        if len(nums) != len(value):
            return None
    elif isinstance(value, str):
        nums = [int(x) for x in re.findall(r"\d{1,4}", value)]
    else:
        return None
    if len(nums) == 3 and all(1 <= n <= k for n in nums):
        return tuple(nums)
    return None


def _option_text(value: Any, what: str) -> str:
    """An option's text as the writer gave it, without a letter label it may have put in front."""
    if not isinstance(value, str) or not value.strip():
        raise ReplyError(f"{what} must be a non-empty string")
    text = " ".join(value.split())
    label = split_label(text)
    text = label[1] if label else text
    if not text:
        raise ReplyError(f"{what} is empty")
    return text


@dataclass
class Draft:
    question: str
    answer: str
    distractors: list[tuple[str, NodeId | None]]   # (text, the leaf it was declared from)


def check_draft(obj: dict, k: int) -> Draft:
    """The writer's JSON -> Draft, or ReplyError saying what is wrong."""
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ReplyError("'question' must be a non-empty string")
    answer = _option_text(obj.get("answer"), "'answer'")
    raw = obj.get("distractors")
    if not isinstance(raw, list) or len(raw) < N_OPTIONS - 1:
        raise ReplyError(f"'distractors' must be a list of {N_OPTIONS - 1} objects")
    distractors = []
    for n, d in enumerate(raw[:N_OPTIONS - 1], 1):
        if isinstance(d, str):
            distractors.append((_option_text(d, f"distractor {n}"), None))
        elif isinstance(d, dict):
            distractors.append((_option_text(d.get("text"), f"distractor {n} 'text'"),
                                parse_clip_id(d.get("from_clip"), k)))
        else:
            raise ReplyError(f"distractor {n} must be an object with 'text' and 'from_clip'")
    texts = [answer.casefold()] + [t.casefold() for t, _ in distractors]
    if len(set(texts)) != len(texts):
        raise ReplyError("the answer and the three distractors must all differ")
    return Draft(" ".join(question.split()), answer, distractors)


def check_choice(obj: dict, options: Sequence[str]) -> str | None:
    """A filter's JSON -> the option letter it chose, None for "none", or ReplyError."""
    value = obj.get("answer")
    if value is None or (isinstance(value, str) and (
            value.strip().lower().strip(".") in ("", "n/a", "unknown", "cannot tell")
            or value.strip().lower().startswith("none"))):
        return None
    if not isinstance(value, str):
        raise ReplyError("'answer' must be an option letter or \"none\"")
    letter = chosen_letter(value, list(options))
    if letter is None:
        raise ReplyError(f"'answer' {value!r} names no single option; give a letter or \"none\"")
    return letter


# A time (00:12, 1:02:03) or a clip id ((1, 2, 3)): a grounding query that says where its moment is gives it away.
_WHERE_RE = re.compile(r"\b\d{1,2}:\d{2}\b|\(\s*\d+\s*,\s*\d+\s*(,\s*\d+\s*)?\)")


def check_query(obj: dict) -> str:
    """The grounding writer's JSON -> the query text (whitespace collapsed), or ReplyError."""
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ReplyError("'query' must be a non-empty string")
    query = " ".join(query.split())
    if _WHERE_RE.search(query):
        raise ReplyError("'query' must not give times or clip ids; describe what happens")
    return query


def check_fits(obj: dict) -> bool:
    """A grounding filter's JSON -> True for "yes", False for "no", or ReplyError."""
    value = obj.get("answer")
    if isinstance(value, bool):
        return value
    word = value.strip().lower().strip(".!") if isinstance(value, str) else None
    if word not in ("yes", "no"):
        raise ReplyError("'answer' must be \"yes\" or \"no\"")
    return word == "yes"


class JsonAsker:
    """One chat model asked for JSON replies; its requests are added to the `usage` given."""

    def __init__(self, chat, *, max_tokens: int, json_retries: int):
        self.chat = chat
        self.max_tokens = max_tokens
        self.json_retries = json_retries

    async def ask_json(self, messages: list[dict], check: Callable[[dict], Any], usage: Usage, *,
                       temperature: float = 0.0, seed: int | None = None, what: str = "reply") -> Any:
        """Ask until `check(parse_json_reply(reply))` passes; retried with a correction message."""
        messages = list(messages)
        reason = ""
        for attempt in range(self.json_retries + 1):
            gen = GenerationOptions(max_tokens=self.max_tokens, temperature=temperature,
                                    seed=None if seed is None else seed + attempt)
            try:
                reply = await self.chat.complete(messages, gen)
            except ModelError as e:
                raise QuestionFailed(f"{what}: {e}") from None
            usage.add(reply.usage)
            try:
                return check(parse_json_reply(reply.text))
            except ReplyError as e:
                reason = str(e)
                messages += [{"role": "assistant", "content": reply.text or ""},
                             prompts.correction_message(reason)]
        raise QuestionFailed(f"{what}: no usable JSON after {self.json_retries + 1} tries ({reason})")

    async def choose(self, messages: list[dict], options: Sequence[str], usage: Usage, what: str) -> str | None:
        """The option letter the model picks, or None for "none"."""
        return await self.ask_json(messages, lambda obj: check_choice(obj, options), usage, what=what)

    async def fits(self, messages: list[dict], usage: Usage, what: str) -> bool:
        """Whether the model says the query fits the clips (yes or no)."""
        return await self.ask_json(messages, check_fits, usage, what=what)

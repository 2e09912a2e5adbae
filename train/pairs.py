"""Turn-level preference pairs from teacher trajectories (`lvr synthesize --export-pairs`).

`lvr synthesize` already makes negatives: a wrong answer turn is dropped and a
hint shown before the teacher tries again. Each dropped turn becomes a pair:

- ``prompt``: the clean conversation the dropped turn was written after, i.e.
  ``messages`` up to and including the user message that follows the first
  ``after_turn`` kept assistant turns. Hints are never part of it: the clean
  messages hold none, and every pair is checked for hint text and the hint marker.
- ``chosen``: the next kept assistant turn, the one written at the same point of
  the conversation after the hint (a right answer, or the step toward it).
- ``rejected``: the dropped turn's text.

A teacher wrong twice in a row and then right gives two pairs with the same prompt
and chosen turn. For multi-segment questions (``category: "multi"``, from
`lvr questions`), `make_wrong_turns` also asks an LLM for a plausible but wrong turn
(LongVPO's stage-2 dispreferred responses): by default at the final answer, or at
every kept turn. A reply is used only when the protocol parser accepts it, it is
not the chosen turn, and an answer turn picks a wrong option; otherwise the model is
told why and asked again, a few times at most.

Records are TRL's conversational preference form plus metadata::

    {"schema": "lvr.pair/1", "qid": ..., "source": "dropped_turn" | "llm_wrong_turn",
     "prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}],
     "turn": <1-based kept assistant turn that chosen is>, ...}

Only accepted trajectories are used, and (as for SFT) only those the lint passes.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..infer.protocol import (STOP_STRINGS, answer_matches, complete_stopped_turn, extract_choice, format_id,
                              merge_reasoning, parse_turn)
from ..prep.lettering import LETTERS
from ..prep.models.base import ChatModel, GenerationOptions, ModelError, Usage
from .hints import HINT_PREFIX
from .lint import FATAL_CODES, TRAJECTORY_SCHEMA, hint_leaks, lint_trajectory

__all__ = ["PAIR_SCHEMA", "SOURCE_DROPPED", "SOURCE_WRONG", "MULTI_CATEGORY", "WRONG_TURN_SYSTEM", "WRONG_TURN_AT",
           "assistant_index", "record_dropped_pairs", "dropped_pairs", "is_multi", "wrong_turn_targets",
           "wrong_turn_request", "check_wrong_turn", "make_wrong_turns", "export_pairs", "PairStats",
           "WrongTurnStats", "ExportSummary"]

PAIR_SCHEMA = "lvr.pair/1"
SOURCE_DROPPED = "dropped_turn"
SOURCE_WRONG = "llm_wrong_turn"
MULTI_CATEGORY = "multi"
WRONG_TURN_ATTEMPTS = 3
WRONG_TURN_AT = ("answer", "all")


# -- dropped turns ----------------------------------------------------------------------------

def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _clean(messages: list[dict]) -> list[dict]:
    return [_message(m["role"], m["content"]) for m in messages]


def assistant_index(messages: list[dict], turn: int) -> int | None:
    """Index in `messages` of the `turn`-th (1-based) assistant message, or None."""
    n = 0
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            n += 1
            if n == turn:
                return i
    return None


def _hint_free(record: dict, pair: dict) -> bool:
    """No hint text of the record, nor the hint marker, in any message of the pair."""
    probe = {"hints": record.get("hints"), "messages": pair["prompt"] + pair["chosen"] + pair["rejected"]}
    return not hint_leaks(probe)


def _usable(record: Any, stats: "PairStats", skip_invalid: bool) -> bool:
    """An accepted, well-formed trajectory (lint-clean unless skip_invalid is off); counted in stats."""
    stats.records += 1
    if not isinstance(record, dict) or record.get("schema") != TRAJECTORY_SCHEMA:
        stats.skipped["not_a_trajectory"] += 1
        return False
    if record.get("accepted") is not True:
        stats.skipped["not_accepted"] += 1
        return False
    stats.accepted += 1
    codes = {i.code for i in lint_trajectory(record, stats.records)}
    if codes & FATAL_CODES or (skip_invalid and codes):
        stats.skipped["lint"] += 1
        stats.lint.update(codes)
        return False
    return True


@dataclass
class PairStats:
    records: int = 0
    accepted: int = 0
    pairs: Counter = field(default_factory=Counter)        # source -> pairs made
    skipped: Counter = field(default_factory=Counter)      # reason -> records or turns left out
    lint: Counter = field(default_factory=Counter)         # lint code -> records refused for it

    def to_record(self) -> dict:
        return {"records": self.records, "accepted": self.accepted, "pairs": dict(self.pairs),
                "skipped": dict(sorted(self.skipped.items())), "lint": dict(sorted(self.lint.items()))}


def _pair(record: dict, source: str, prompt: list[dict], chosen: str, rejected: str, turn: int,
          **extra) -> dict:
    return {"schema": PAIR_SCHEMA, "qid": record.get("qid"), "source": source,
            "prompt": prompt, "chosen": [_message("assistant", chosen)],
            "rejected": [_message("assistant", rejected)],
            "turn": turn, "video_id": record.get("video_id"), "K": record.get("K"),
            "category": record.get("category"), **extra}


def record_dropped_pairs(record: dict, stats: PairStats) -> list[dict]:
    """The pairs of one usable trajectory's dropped turns (see the module docstring)."""
    messages = _clean(record["messages"])
    k = record["K"]
    out: list[dict] = []
    seen: set[tuple[int, str]] = set()
    for d in record.get("dropped") or []:
        after = d.get("after_turn") if isinstance(d, dict) else None
        text = d.get("text") if isinstance(d, dict) else None
        if not isinstance(after, int) or isinstance(after, bool) or after < 0 or not isinstance(text, str):
            stats.skipped["bad_dropped_turn"] += 1
            continue
        at = assistant_index(messages, after + 1)
        if at is None or at == 0 or messages[at - 1]["role"] != "user":
            stats.skipped["no_turn_after_dropped"] += 1
            continue
        if parse_turn(text, k).kind == "invalid":
            stats.skipped["dropped_turn_invalid"] += 1
            continue
        chosen = messages[at]["content"]
        if " ".join(text.split()) == " ".join(chosen.split()):
            stats.skipped["same_as_chosen"] += 1
            continue
        if (after, text) in seen:
            stats.skipped["duplicate"] += 1
            continue
        seen.add((after, text))
        pair = _pair(record, SOURCE_DROPPED, messages[:at], chosen, text, after + 1,
                     rejected_answer=d.get("answer"), hint_level=d.get("hint_level"))
        if not _hint_free(record, pair):
            stats.skipped["hint_in_pair"] += 1
            continue
        out.append(pair)
    stats.pairs[SOURCE_DROPPED] += len(out)
    return out


def dropped_pairs(records: Iterable[dict], *, skip_invalid: bool = True) -> tuple[list[dict], PairStats]:
    """Pairs from every dropped turn of the accepted trajectories, and what was left out and why."""
    stats = PairStats()
    out: list[dict] = []
    for record in records:
        if _usable(record, stats, skip_invalid):
            out.extend(record_dropped_pairs(record, stats))
    return out, stats


# -- LLM-written wrong turns ------------------------------------------------------------------

WRONG_TURN_SYSTEM = """\
You write negative examples for preference training of a video-question agent. The agent \
cannot watch the video: it reads captions of a tree of clips and calls tools, one per turn, \
and every one of its turns is <think>reasoning</think> followed by exactly one \
<tool>...</tool> or <answer>...</answer>.

You are shown the agent's conversation so far and its correct next turn. Write a plausible \
but wrong next turn in the same format, reasoning to the wrong conclusion. It must read like \
a genuine attempt: refer to the captions, stay on topic, and make a subtle mistake, such as \
mixing up the order of events across clips, crediting a detail to the wrong clip, or \
overlooking one of the segments the question needs. Never say that it is wrong. Reply with \
the turn only: no preamble, no code fences."""


def _transcript(prompt: list[dict]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)


def wrong_turn_request(prompt: list[dict], chosen: str, *, kind: str, options: list[str],
                       answer: str) -> list[dict]:
    """The messages asking for a wrong turn at one point of a conversation (the one prompt, defined here)."""
    if kind == "answer":
        if options:
            wrong = [x for x in LETTERS[: len(options)] if x != answer.strip().upper()]
            task = (f"The correct answer is {answer}. Write a wrong final turn: reason across the clips to a "
                    f"wrong conclusion and end with <answer>X</answer>, where X is one of {', '.join(wrong)}.")
        else:
            task = (f"The correct answer is {answer!r}. Write a wrong final turn: reason across the clips to "
                    "a wrong conclusion and end with a different <answer>...</answer>.")
    else:
        task = ("Write a wrong next step: reason your way to a plausible but wrong clip and call a tool on it "
                "(not the call of the correct turn), or answer too early with a wrong option.")
    user = (f"The conversation so far:\n\n{_transcript(prompt)}\n\n---\n\nThe correct next turn:\n{chosen}\n\n"
            f"---\n\n{task}")
    return [_message("system", WRONG_TURN_SYSTEM), _message("user", user)]


def _captioned(prompt: list[dict], k: int) -> set[tuple[int, ...]]:
    leaves = set()
    for m in prompt:
        if m["role"] == "assistant":
            call = parse_turn(m["content"], k).call
            if call is not None and call.tool == "get_caption" and len(call.node) == 3:
                leaves.add(call.node)
    return leaves


_FENCE_RE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?\s*```\s*$", re.S)


def _unfence(text: str) -> str:
    m = _FENCE_RE.match(text)
    return m.group(1).strip() if m else text.strip()


def check_wrong_turn(text: str, *, chosen: str, prompt: list[dict], k: int, options: list[str],
                     answer: str, kind: str) -> str | None:
    """Why `text` cannot be a rejected turn at this point, or None when it can."""
    parsed = parse_turn(text, k)
    if parsed.kind == "invalid":
        return f"it breaks the turn format ({parsed.message})"
    if " ".join(text.split()) == " ".join(chosen.split()):
        return "it is the correct turn itself"
    if HINT_PREFIX in text:
        return f"it contains {HINT_PREFIX!r}"
    if parsed.answer is not None:
        choice = extract_choice(parsed.answer, options) if options else None
        if options and choice is None:
            return "its answer picks none of the options"
        if answer_matches(parsed.answer, choice, options, answer):
            return f"its answer {choice or parsed.answer!r} is the correct one; the answer must be wrong"
        return None
    if kind == "answer":
        return "it calls a tool; this turn must give a (wrong) final answer"
    call = parsed.call
    chosen_call = parse_turn(chosen, k).call
    if chosen_call is not None and call == chosen_call:
        return f"it makes the same call as the correct turn ({call.render()})"
    if call.tool == "video_qa" and call.node not in _captioned(prompt, k):
        return (f"video_qa on {format_id(call.node)} comes before that clip's caption was read; "
                "call get_caption on it first or pick another clip")
    return None


def wrong_turn_targets(record: dict, at: str = "answer") -> list[tuple[int, int]]:
    """(message index, 1-based turn) of the kept assistant turns to write wrong turns for."""
    if at not in WRONG_TURN_AT:
        raise ValueError(f"wrong turns go at 'answer' or 'all', not {at!r}")
    turns = [i for i, m in enumerate(record["messages"]) if m.get("role") == "assistant"]
    targets = [(i, t) for t, i in enumerate(turns, 1)]
    return targets[-1:] if at == "answer" else targets


@dataclass
class WrongTurnStats:
    targets: int = 0
    made: int = 0
    attempts: int = 0
    refused: Counter = field(default_factory=Counter)    # first words of each refusal reason -> count
    failed: list[str] = field(default_factory=list)      # "qid turn N: reason", one per target given up
    usage: Usage = field(default_factory=Usage)

    def to_record(self) -> dict:
        return {"targets": self.targets, "made": self.made, "attempts": self.attempts,
                "refused": dict(self.refused), "failed": list(self.failed), "usage": self.usage.to_record()}


async def _wrong_turn(model: ChatModel, record: dict, index: int, turn: int, kind: str,
                      generation: GenerationOptions, attempts: int, stats: WrongTurnStats) -> dict | None:
    messages = _clean(record["messages"])
    prompt, chosen = messages[:index], messages[index]["content"]
    options = [str(o) for o in record.get("options") or []]
    answer, k = str(record.get("answer")), record["K"]
    request = wrong_turn_request(prompt, chosen, kind=kind, options=options, answer=answer)
    reason = "no reply"
    for _ in range(attempts):
        stats.attempts += 1
        try:
            reply = await model.complete(request, generation)
        except ModelError as e:
            reason = f"model error: {e}"
            break
        stats.usage.add(reply.usage)
        text = complete_stopped_turn(_unfence(merge_reasoning(reply.text, reply.reasoning)))
        reason = check_wrong_turn(text, chosen=chosen, prompt=prompt, k=k, options=options, answer=answer,
                                  kind=kind)
        if reason is None:
            pair = _pair(record, SOURCE_WRONG, prompt, chosen, text, turn, model=getattr(model, "name", None))
            if _hint_free(record, pair):
                return pair
            reason = "hint text in the pair"
        stats.refused[reason.split(" (")[0].split(";")[0]] += 1
        request = request + [_message("assistant", text),
                             _message("user", f"That turn cannot be used: {reason}. Write the turn again, "
                                              "following the instructions above. Reply with the turn only.")]
    stats.failed.append(f"{record.get('qid')} turn {turn}: {reason}")
    return None


def is_multi(record: dict) -> bool:
    category = record.get("category")
    return isinstance(category, str) and category.strip().lower() == MULTI_CATEGORY


async def make_wrong_turns(records: Iterable[dict], model: ChatModel, *, at: str = "answer",
                           attempts: int = WRONG_TURN_ATTEMPTS, concurrency: int = 8,
                           generation: GenerationOptions | None = None,
                           on_record: Callable[[dict, list[dict], bool], None] | None = None
                           ) -> tuple[list[dict], WrongTurnStats]:
    """Ask `model` for a plausible but wrong turn at each target of each multi-segment trajectory.

    `records` should be usable (accepted, lint-clean) trajectories; those whose
    category is not "multi" are passed over. Each reply is checked with
    `check_wrong_turn`; a refused one is sent back with the reason, up to `attempts`
    replies per target. `on_record(record, pairs, complete)` is called as each record finishes;
    `complete` is false when some target got no usable wrong turn.
    """
    if at not in WRONG_TURN_AT:
        raise ValueError(f"wrong turns go at 'answer' or 'all', not {at!r}")
    generation = generation or GenerationOptions(max_tokens=1024, temperature=0.7, stop=STOP_STRINGS)
    stats = WrongTurnStats()
    gate = asyncio.Semaphore(max(1, concurrency))
    out: list[dict] = []

    async def one_target(record: dict, index: int, turn: int, kind: str) -> dict | None:
        async with gate:
            return await _wrong_turn(model, record, index, turn, kind, generation, attempts, stats)

    async def one_record(record: dict) -> None:
        targets = wrong_turn_targets(record, at)
        stats.targets += len(targets)
        kinds = ["answer" if parse_turn(record["messages"][i]["content"], record["K"]).answer is not None
                 else "tool" for i, _ in targets]
        got = await asyncio.gather(*(one_target(record, i, t, kind) for (i, t), kind in zip(targets, kinds)))
        pairs = [p for p in got if p is not None]
        stats.made += len(pairs)
        out.extend(pairs)
        if on_record is not None:
            on_record(record, pairs, len(pairs) == len(targets))

    await asyncio.gather(*(one_record(r) for r in records if is_multi(r)))
    return out, stats


# -- the export -------------------------------------------------------------------------------

@dataclass
class ExportSummary:
    stats: PairStats
    wrong: WrongTurnStats | None = None
    written: int = 0
    skipped_done: int = 0          # trajectories whose pairs were already in the output
    held_back: list[str] = field(default_factory=list)   # qids not written: a wrong turn is missing

    @property
    def failed(self) -> list[str]:
        return list(self.wrong.failed) if self.wrong else []


def export_pairs(records: list[dict], output: "str | None", *, model: ChatModel | None = None,
                 at: str = "answer", attempts: int = WRONG_TURN_ATTEMPTS, concurrency: int = 8,
                 generation: GenerationOptions | None = None, skip_invalid: bool = True,
                 preflight: bool = True) -> ExportSummary:
    """Append the pairs of each trajectory to `output` (stdout for None or '-'), one write per trajectory.

    Trajectories whose qid already has pairs in `output` are skipped, so a killed
    run (wrong turns cost LLM calls) resumes where it stopped. With `model`,
    multi-segment trajectories also get LLM-written wrong turns; a trajectory for
    which one could not be had is not written at all (`held_back`), so a rerun
    tries it again.
    """
    from ..prep.jsonl import JsonlWriter

    stats = PairStats()
    summary = ExportSummary(stats)
    with JsonlWriter(output) as writer:
        done = {r.get("qid") for r in writer.existing if r.get("schema") == PAIR_SCHEMA}
        usable = []
        for record in records:
            if not _usable(record, stats, skip_invalid):
                continue
            if record.get("qid") in done:
                summary.skipped_done += 1
                continue
            usable.append(record)
        dropped = {id(r): record_dropped_pairs(r, stats) for r in usable}

        def write(record: dict, wrong: list[dict], complete: bool = True) -> None:
            unit = dropped.pop(id(record)) + wrong
            if not complete:
                summary.held_back.append(str(record.get("qid")))
                return
            writer.write_unit(unit)
            summary.written += len(unit)

        # Trajectories that need no model call are written first, so nothing waits on the LLM.
        for record in usable:
            if model is None or not is_multi(record):
                write(record, [])
        if model is not None:
            pending = [r for r in usable if id(r) in dropped]   # the multi-segment ones

            async def run() -> WrongTurnStats:
                try:
                    if not pending:
                        return WrongTurnStats()
                    if preflight and hasattr(model, "check_reachable"):
                        await model.check_reachable()
                    _, wrong = await make_wrong_turns(pending, model, at=at, attempts=attempts,
                                                      concurrency=concurrency, generation=generation,
                                                      on_record=write)
                    return wrong
                finally:
                    await model.aclose()

            summary.wrong = asyncio.run(run())
            stats.pairs[SOURCE_WRONG] += summary.wrong.made
    return summary

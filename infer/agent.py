"""The agent loop: a reasoning model navigates a VideoEnv turn by turn until it answers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..prep.models.base import ChatModel, GenerationOptions, Message, ModelError
from ..prep.options import check_options, option
from ..prep.progress import shorten
from ..prep.tree import node_count
from .environment import EnvError, RoleUsage, VideoEnv
from .profiles import LVR, PROTOCOLS, Profile, profile_named
from .protocol import (GROUNDING, QA, STOP_STRINGS, TASKS, Breach, ParsedTurn, complete_stopped_turn,
                       extract_choice, merge_reasoning, parse_task_turn)


AGENT_PANEL = "Navigation"


@dataclass(frozen=True)
class AgentOptions:
    max_rounds: int = option(30, "--max-rounds", min=1, panel=AGENT_PANEL,
                             help="Model turns per question; the last one must answer.")
    max_invalid: int = option(3, "--max-invalid", min=0, panel=AGENT_PANEL,
                              help="Invalid turns in a row (each corrected) before giving up.")
    protocol: str = option(LVR, "--protocol", choices=PROTOCOLS, panel=AGENT_PANEL,
                           help="Message layout: lvr (its own), or longvideo-r1 (the released LongVideo-R1 "
                                "checkpoints' layout, with system prompts from --system-prompt, "
                                "--qa-system-prompt and --caption-system-prompt files).")
    # The reasoning model's sampling (flags from prep.models.SamplingOptions).
    max_tokens: int = 2048        # per turn
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_options(self)

    def generation(self) -> GenerationOptions:
        return GenerationOptions(max_tokens=self.max_tokens, temperature=self.temperature,
                                 top_p=self.top_p, stop=STOP_STRINGS, seed=self.seed)

    @property
    def profile(self) -> Profile:
        return profile_named(self.protocol)


class Stop:
    ANSWERED = "answered"
    MAX_ROUNDS = "max_rounds"
    INVALID = "invalid"
    ERROR = "error"
    GAVE_UP = "gave_up"       # a reviewer rejected an answer and had no hint left


@dataclass(frozen=True)
class Verdict:
    """A reviewer's judgement of an answer turn (teacher synthesis uses one; `ask` has none)."""

    accept: bool
    hint: str | None = None     # when not accepted: drop the turn, show this, and go on; None gives up
    level: int = 0
    ids: tuple = ()             # node ids the hint names


@dataclass
class Hint:
    level: int
    text: str
    after_turn: int             # kept assistant turns before it
    message_index: int          # the user message it was appended to
    ids: tuple = ()


Review = Callable[["AgentResult", "Turn"], Awaitable[Verdict]]
OnTurn = Callable[["Turn"], None]


@dataclass
class Turn:
    round: int
    text: str                       # the assistant turn as it went into the conversation
    parsed: ParsedTurn
    result: str | None = None       # the tool result or correction the model read next
    breach: str | None = None       # parser or environment rule breach
    seconds: float = 0.0
    dropped: bool = False           # a rejected answer, left out of the conversation

    def to_record(self) -> dict:
        p = self.parsed
        call = p.call
        return {
            "round": self.round, "text": self.text, "think": p.think,
            "action": {"kind": "invalid" if self.breach else p.kind,
                       "tool": call.tool if call else None,
                       "node": list(call.node) if call else None,
                       "query": call.query if call else None,
                       "call": call.render() if call else None,
                       "answer": p.answer, "error": self.breach,
                       "interval": list(p.interval) if p.interval is not None else None},
            "result": self.result, "seconds": round(self.seconds, 3), "dropped": self.dropped,
        }

    def action(self) -> str:
        """What the model did, in a few words: the call, the answer, or the rule it broke."""
        p = self.parsed
        if p.answer is not None:
            return f"answer {shorten(p.answer, 60)}" + (" (rejected)" if self.dropped else "")
        if p.call is not None:
            return p.call.render()
        return f"invalid ({self.breach})"

    def outcome(self) -> str:
        """What came of it, in a few words: the size of the tool result, or the breach."""
        if self.parsed.call is None:
            return ""
        if self.breach:
            return f"invalid ({self.breach})"
        return f"{len(self.result.split())} words" if self.result is not None else "failed"

    def summary(self) -> str:
        """One progress line: `get_caption((2, 1)) -> 412 words, 4.1 s`."""
        outcome = self.outcome()
        return f"{self.action()}{f' -> {outcome}' if outcome else ''}, {self.seconds:.1f} s"


@dataclass
class AgentResult:
    question: str
    options: tuple[str, ...]
    answer: str | None = None
    choice: str | None = None           # the option letter, for multiple choice
    stopped: str = Stop.MAX_ROUNDS
    error: str | None = None
    turns: list[Turn] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    reasoning: RoleUsage = field(default_factory=RoleUsage)
    seconds: float = 0.0
    hints: list[Hint] = field(default_factory=list)
    protocol: str = LVR                 # the profile the messages are laid out in
    task: str = QA                      # qa, or grounding: answered with an interval
    interval: tuple[float, float] | None = None     # a grounding answer, in seconds

    def clean_messages(self) -> list[Message]:
        """The conversation without hint text: what `ask` would have sent and received."""
        messages = [dict(m) for m in self.messages]
        profile = profile_named(self.protocol)
        for hint in self.hints:
            m = messages[hint.message_index]
            m["content"] = profile.remove_text(m["content"], hint.text)
        return messages

    def accounting(self, env: VideoEnv) -> dict:
        """Rounds, caption calls made vs served from the store, video_qa calls, tokens per role."""
        return {
            "rounds": len(self.turns),
            "invalid_turns": sum(1 for t in self.turns if t.breach),
            "caption_calls": {"made": env.caption_made, "cached": env.caption_cached,
                              "total": env.caption_made + env.caption_cached},
            "exhaustive_captions": node_count(env.k),
            "get_caption_calls": sum(1 for v in env.visits if v.tool == "get_caption"),
            "video_qa_calls": sum(1 for v in env.visits if v.tool == "video_qa"),
            "models": {"reasoning": self.reasoning.to_record(), "caption": env.caption_usage.to_record(),
                       "qa": env.qa_usage.to_record()},
            "seconds": round(self.seconds, 3),
        }


async def run_agent(model: ChatModel, env: VideoEnv, question: str, options: tuple[str, ...] | list[str] = (),
                    *, template: str, agent: AgentOptions = AgentOptions(), task: str = QA,
                    review: Review | None = None, on_turn: OnTurn | None = None) -> AgentResult:
    """Navigate until the model answers, runs out of rounds, or keeps breaking the rules.

    `task` is what the question asks for: ``qa`` (text or an option letter) or ``grounding``
    (a time interval, in `result.interval`; an answer that is not a usable interval is
    corrected like any other breach). The tools, the loop and the environment are the same.

    Model and tool failures end the run with `stopped="error"` and a one-line
    `error`; everything up to then stays in the result. With `review`, an
    answer it rejects is dropped from the conversation and its hint appended
    to the last user message, and the loop goes on (teacher synthesis).
    `on_turn(turn)` is called as each turn ends, with its result (progress).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    started = time.perf_counter()
    options = tuple(options)
    profile = agent.profile
    grounding = task == GROUNDING
    result = AgentResult(question, options, reasoning=RoleUsage(model.name), protocol=profile.name, task=task)
    try:
        high = await env.high_captions()
    except EnvError as e:
        result.stopped, result.error = Stop.ERROR, str(e)
        result.seconds = time.perf_counter() - started
        return result
    messages: list[Message] = [
        {"role": "system", "content": profile.system_message(template, env.k, grounding)},
        {"role": "user", "content": profile.first_user_content(question, options, env.duration, high, grounding)},
    ]
    result.messages = messages
    invalid_in_a_row = 0
    for rnd in range(1, agent.max_rounds + 1):
        last = rnd == agent.max_rounds
        if last:
            profile.add_last_round(messages)
        turn_started = time.perf_counter()
        try:
            reply = await model.complete(messages, agent.generation())
        except ModelError as e:
            result.stopped, result.error = Stop.ERROR, f"reasoning model: {e}"
            break
        result.reasoning.add(reply.usage, reply.seconds)
        text = complete_stopped_turn(merge_reasoning(reply.text, reply.reasoning))
        parsed = parse_task_turn(text, env.k, task, env.duration)
        turn = Turn(rnd, text, parsed, breach=parsed.breach)
        result.turns.append(turn)
        messages.append({"role": "assistant", "content": text})

        if parsed.answer is not None:
            result.answer, result.interval = parsed.answer, parsed.interval
            result.choice = None if grounding else extract_choice(parsed.answer, options)
            result.stopped = Stop.ANSWERED
            verdict = await review(result, turn) if review is not None else Verdict(True)
            if not verdict.accept:
                turn.dropped = True
                messages.pop()
                if verdict.hint is None or last:
                    result.stopped = Stop.GAVE_UP
                else:
                    result.stopped, result.answer, result.choice, result.interval = Stop.MAX_ROUNDS, None, None, None
                    kept = sum(1 for t in result.turns if not t.dropped)
                    index = len(messages) - 1
                    result.hints.append(Hint(verdict.level, verdict.hint, kept, index, verdict.ids))
                    messages[index] = {**messages[index],
                                       "content": profile.append_text(messages[index]["content"], verdict.hint)}
                    turn.seconds = time.perf_counter() - turn_started
                    if on_turn is not None:
                        on_turn(turn)
                    continue
        elif last:
            turn.breach = turn.breach or Breach.TOOL_ON_LAST_ROUND
            result.stopped = Stop.MAX_ROUNDS
        elif parsed.call is not None:
            try:
                outcome = await env.call(parsed.call)
            except EnvError as e:
                result.stopped, result.error = Stop.ERROR, str(e)
            else:
                turn.result, turn.breach = outcome.text, outcome.breach
        else:
            turn.result = parsed.message
        turn.seconds = time.perf_counter() - turn_started
        if on_turn is not None:
            on_turn(turn)
        if result.stopped in (Stop.ANSWERED, Stop.ERROR, Stop.GAVE_UP) or last:
            break
        invalid_in_a_row = invalid_in_a_row + 1 if turn.breach else 0
        if turn.breach and invalid_in_a_row > agent.max_invalid:
            result.stopped = Stop.INVALID
            break
        messages.append({"role": "user", "content": turn.result})
    result.seconds = time.perf_counter() - started
    return result


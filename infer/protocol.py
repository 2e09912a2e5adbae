"""The navigator's text protocol, defined once: prompts, tags, the tool-call parser, messages.

Every turn of the reasoning model is ``<think>...</think>`` followed by exactly
one ``<tool>...</tool>`` or ``<answer>...</answer>``. Tools are:

    get_caption((h, m))            a medium caption
    get_caption((h, m, l))         a low caption
    video_qa((h, m, l), "query")   ask a vision model about a leaf's frames

`parse_turn` reads tool arguments as literals with its own small grammar: it
never evaluates anything and never raises. Every breach of the rules maps to a
`Breach` code and one corrective message, all in `CORRECTIONS` below, so the
same wording reaches the model from `ask`, `eval`, `synthesize` and `rl`.

Tags and reasoning are read by the rules of `lvr.prep.tags`: an unclosed
``<think>`` is reasoning to the end of the reply, so no action is ever taken
from inside reasoning. Option letters are `lvr.prep.lettering`'s.

Answer kinds. A question answers with free text or an option letter (read by
`extract_choice`). A grounding question ("when does this happen?") answers with
a time interval in seconds, in exactly one syntax (`format_interval` writes it,
`parse_interval` reads it)::

    <answer>[start, end]</answer>        e.g. [12.5, 30] or [ 12.5s , 30s ]

Two numbers in square brackets, separated by a comma: digits with an optional
decimal point and decimals (``12``, ``12.5``; at most 7 integer digits and 6
decimals), an optional leading minus (so a negative time reads as outside the
video, not as unreadable) and an optional trailing ``s``; whitespace is allowed
around every part, nothing else is. The interval kind is only used when a caller
asks for it (`parse_grounding_turn`); `parse_turn` reads every answer as text.
A grounding answer breaks the rules when it is unreadable, reversed
(start > end) or outside the video (start < 0 or end > duration); a point
(start = end) is an interval.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..prep import tags
from ..prep.captioning import format_time
from ..prep.lettering import chosen_letter, normalize_options
from ..prep.records import read_prompt_file
from ..prep.tags import ANSWER, THINK, TOOL
# Wording lives with the protocol profiles; lvr's own, the id format and the clock format are found here too.
from .profiles import DEFAULT_SYSTEM_PROMPT, LAST_ROUND_NOTICE, LVR_PROFILE, format_id, format_span


# Generation stops after a finished action, so a model cannot invent its own tool results.
STOP_STRINGS = (tags.closing(TOOL), tags.closing(ANSWER))
TOOLS = ("get_caption", "video_qa")


# -- lvr's own profile (every profile's strings live in infer/profiles.py) -------------------

def load_system_prompt(path: "str | Path | None") -> str:
    """The system prompt template ({K} is filled in per video); ValueError if the file is unusable."""
    return read_prompt_file(path, DEFAULT_SYSTEM_PROMPT)


def system_prompt(template: str, k: int) -> str:
    return LVR_PROFILE.system_message(template, k)


def first_user_message(question: str, options: list[str] | tuple[str, ...], duration: float,
                       high: list[tuple[tuple[int, ...], float, float, str]]) -> str:
    """Question, options, duration and the K high captions with their spans."""
    return LVR_PROFILE.first_user_content(question, options, duration, high)


def tool_result_message(tool: str, node_id, start: float, end: float, text: str, query: str | None = None) -> str:
    """What the model reads back after a tool call: the tool, the node, its span, the result."""
    return LVR_PROFILE.tool_result(tool, node_id, start, end, text, query)


# -- rule breaches ----------------------------------------------------------------------

class Breach:
    """Codes for rule breaches; each has one corrective message in CORRECTIONS."""

    NO_ACTION = "no_action"
    NO_THINK = "no_think"
    TWO_ACTIONS = "two_actions"
    UNKNOWN_TOOL = "unknown_tool"
    MALFORMED_CALL = "malformed_call"
    CODE_IN_ARGUMENTS = "code_in_arguments"
    WRONG_DEPTH = "wrong_depth"
    OUT_OF_RANGE = "out_of_range"
    EMPTY_QUERY = "empty_query"
    EMPTY_ANSWER = "empty_answer"
    QA_BEFORE_CAPTION = "qa_before_caption"
    TOOL_ON_LAST_ROUND = "tool_on_last_round"
    # grounding answers (the interval answer kind)
    MALFORMED_INTERVAL = "malformed_interval"
    REVERSED_INTERVAL = "reversed_interval"
    INTERVAL_OUTSIDE_VIDEO = "interval_outside_video"


_FORMAT_REMINDER = ("Reply with <think>your reasoning</think> followed by exactly one "
                    "<tool>...</tool> or <answer>...</answer>.")

CORRECTIONS = {
    Breach.NO_ACTION: "Your reply has no tool call and no answer. " + _FORMAT_REMINDER,
    Breach.NO_THINK: "Your reply has no <think></think> reasoning before the action. " + _FORMAT_REMINDER,
    Breach.TWO_ACTIONS: ("Your reply has more than one action. Use exactly one tool call or one answer "
                         "per turn; you will see the result before your next turn."),
    Breach.UNKNOWN_TOOL: ("There is no tool called {name}. The tools are get_caption((h, m)), "
                          "get_caption((h, m, l)) and video_qa((h, m, l), \"question\")."),
    Breach.MALFORMED_CALL: ("The tool call {call} could not be read. Write it exactly like "
                            "get_caption((2, 3)) or video_qa((2, 3, 1), \"What is on the table?\")."),
    Breach.CODE_IN_ARGUMENTS: ("Tool arguments must be plain literals: a tuple of whole numbers and, for "
                               "video_qa, one quoted question. Expressions and code are never run."),
    Breach.WRONG_DEPTH: "{detail}",
    Breach.OUT_OF_RANGE: "The clip {node} does not exist: every index must be a whole number from 1 to {K}.",
    Breach.EMPTY_QUERY: "video_qa needs a question in quotes, e.g. video_qa((2, 3, 1), \"Who is speaking?\").",
    Breach.EMPTY_ANSWER: "Your <answer></answer> is empty. Give your final answer inside the tags.",
    Breach.QA_BEFORE_CAPTION: ("You may use video_qa on {node} only after reading its caption. "
                               "Call get_caption({node}) first."),
    Breach.TOOL_ON_LAST_ROUND: LAST_ROUND_NOTICE,
    Breach.MALFORMED_INTERVAL: ("The answer {answer} is not a time interval. Answer with the start and end "
                                "in seconds, exactly like <answer>[12.5, 30]</answer>."),
    Breach.REVERSED_INTERVAL: ("The interval {answer} ends before it starts. Write the earlier time first, "
                               "like <answer>[12.5, 30]</answer>."),
    Breach.INTERVAL_OUTSIDE_VIDEO: ("The interval {answer} is outside the video: times must lie between 0 and "
                                    "{duration} seconds."),
}


def correction(code: str, **details) -> str:
    return CORRECTIONS[code].format(**details)


# -- parsing a turn ---------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    tool: str
    node: tuple[int, ...]
    query: str | None = None

    def render(self) -> str:
        """The canonical text of the call."""
        if self.tool == "video_qa":
            q = (self.query or "").replace("\\", "\\\\").replace('"', '\\"')
            return f'video_qa({format_id(self.node)}, "{q}")'
        return f"get_caption({format_id(self.node)})"


@dataclass(frozen=True)
class ParsedTurn:
    """One model turn. Exactly one of `call`, `answer` and `breach` is set."""

    think: str | None
    call: ToolCall | None = None
    answer: str | None = None
    breach: str | None = None
    message: str | None = None     # the corrective message when breach is set
    interval: tuple[float, float] | None = None    # a grounding answer, read (`parse_grounding_turn`)

    @property
    def kind(self) -> str:
        return "tool" if self.call else "answer" if self.answer is not None else "invalid"


_MAX_TURN_CHARS = 200_000       # longer replies are judged on their head only
_MAX_INDEX_DIGITS = 6
_CALL_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*;?\s*$", re.S)
_NAME_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)")
_INT_RE = re.compile(rf"\d{{1,{_MAX_INDEX_DIGITS}}}")
# Things that only appear in code, never in a tuple of numbers and a quoted question.
_CODE_RE = re.compile(r"__|\bimport\b|\blambda\b|\beval\b|\bexec\b|\bos\.|\bsys\.|;|`")
_CALL_IN_ARGS_RE = re.compile(r"[A-Za-z_]\w*\s*\(")


def complete_stopped_turn(text: str) -> str:
    """Put back the closing tag that a stop string cut off (backends drop the stop text)."""
    lowered = text.lower()
    opened = max((TOOL, ANSWER), key=lambda name: lowered.rfind(tags.opening(name)))
    if lowered.rfind(tags.opening(opened)) > lowered.rfind(tags.closing(opened)):
        return text.rstrip() + tags.closing(opened)
    return text


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _read_keyword(s: str, i: int) -> int:
    """Skip an optional `name=` before an argument (models often write node=(1, 2))."""
    m = re.match(r"[A-Za-z_]\w*\s*=\s*", s[i:])
    return i + m.end() if m else i


def _read_tuple(s: str, i: int) -> tuple[tuple[int, ...], int] | None:
    """(1, 2, 3) or [1, 2, 3] at s[i:], as ints; None if it is anything else."""
    if i >= len(s) or s[i] not in "([":
        return None
    close = ")" if s[i] == "(" else "]"
    i += 1
    values: list[int] = []
    while True:
        i = _skip_ws(s, i)
        if i < len(s) and s[i] == close and values:
            return tuple(values), i + 1
        m = _INT_RE.match(s, i)
        if not m or (m.end() < len(s) and s[m.end()].isdigit()):
            return None
        values.append(int(m.group()))
        i = _skip_ws(s, m.end())
        if i < len(s) and s[i] == ",":
            i += 1
        elif i < len(s) and s[i] == close:
            return tuple(values), i + 1
        else:
            return None


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def _read_string(s: str, i: int) -> tuple[str, int] | None:
    """A single- or double-quoted string at s[i:], with simple escapes; None otherwise."""
    if i >= len(s) or s[i] not in "\"'":
        return None
    quote, out, i = s[i], [], i + 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(_ESCAPES.get(s[i + 1], "\\" + s[i + 1]))
            i += 2
        elif c == quote:
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return None


def _parse_arguments(args: str) -> tuple[tuple[int, ...], str | None] | None:
    """`(1, 2)` or `(1, 2, 3), "query"`: the node and the optional query; None if unreadable."""
    i = _read_keyword(args, _skip_ws(args, 0))
    got = _read_tuple(args, i)
    if got is None:
        return None
    node, i = got
    i = _skip_ws(args, i)
    query = None
    if i < len(args) and args[i] == ",":
        i = _read_keyword(args, _skip_ws(args, i + 1))
        if _skip_ws(args, i) < len(args):
            got_q = _read_string(args, _skip_ws(args, i))
            if got_q is None:
                return None
            query, i = got_q
            i = _skip_ws(args, i)
            if i < len(args) and args[i] == ",":
                i = _skip_ws(args, i + 1)
    return (node, query) if i == len(args) else None


def parse_call(text: str, k: int) -> ToolCall | tuple[str, str]:
    """A tool call's text -> ToolCall, or (breach code, corrective message)."""
    shown = " ".join(text.split())[:120]
    m = _CALL_RE.match(text)
    if not m:
        name = _NAME_RE.match(text)
        if _CODE_RE.search(text):
            return Breach.CODE_IN_ARGUMENTS, correction(Breach.CODE_IN_ARGUMENTS)
        if name and name.group(1) not in TOOLS and "(" not in text[: name.end() + 1]:
            return Breach.UNKNOWN_TOOL, correction(Breach.UNKNOWN_TOOL, name=name.group(1)[:60])
        if _CALL_IN_ARGS_RE.search(text):
            return Breach.CODE_IN_ARGUMENTS, correction(Breach.CODE_IN_ARGUMENTS)
        return Breach.MALFORMED_CALL, correction(Breach.MALFORMED_CALL, call=shown)
    name, args = m.group(1), m.group(2)
    if _CODE_RE.search(text):
        return Breach.CODE_IN_ARGUMENTS, correction(Breach.CODE_IN_ARGUMENTS)
    if name not in TOOLS:
        return Breach.UNKNOWN_TOOL, correction(Breach.UNKNOWN_TOOL, name=name[:60])
    parsed = _parse_arguments(args)
    if parsed is None:
        code = Breach.CODE_IN_ARGUMENTS if _CALL_IN_ARGS_RE.search(args) else Breach.MALFORMED_CALL
        return code, correction(code, call=shown)
    node, query = parsed
    if name == "get_caption":
        if query is not None:
            return Breach.MALFORMED_CALL, correction(Breach.MALFORMED_CALL, call=shown)
        if len(node) == 1:
            return Breach.WRONG_DEPTH, correction(
                Breach.WRONG_DEPTH, detail="High-level captions are already in the first message. "
                                           "get_caption takes a medium clip (h, m) or a low clip (h, m, l).")
        if len(node) > 3:
            return Breach.WRONG_DEPTH, correction(
                Breach.WRONG_DEPTH, detail=f"{format_id(node)} is too deep: the tree has three levels, "
                                           "so get_caption takes (h, m) or (h, m, l).")
    else:
        if len(node) != 3:
            return Breach.WRONG_DEPTH, correction(
                Breach.WRONG_DEPTH, detail=f"video_qa works on low clips only, named (h, m, l); "
                                           f"{format_id(node)} is not one.")
        if not query or not query.strip():
            return Breach.EMPTY_QUERY, correction(Breach.EMPTY_QUERY)
    if any(not 1 <= i <= k for i in node):
        return Breach.OUT_OF_RANGE, correction(Breach.OUT_OF_RANGE, node=format_id(node), K=k)
    return ToolCall(name, node, query.strip() if query else None)


def call_node_span(text: str) -> tuple[int, int] | None:
    """Where the node id of a turn's tool call stands in `text`: (start, end) offsets of e.g. ``(2, 3)``.

    The last ``<tool>`` block outside the reasoning counts, read with `parse_call`'s
    grammar; None when there is no such block or its node id cannot be read.
    """
    spans = tags.block_spans(TOOL, tags.blank_think(text))
    if not spans:
        return None
    start, end = spans[-1]
    m = _CALL_RE.match(text[start:end])
    if not m:
        return None
    args, offset = m.group(2), start + m.start(2)
    i = _read_keyword(args, _skip_ws(args, 0))
    got = _read_tuple(args, i)
    return (offset + i, offset + got[1]) if got else None


def parse_turn(text: str, k: int) -> ParsedTurn:
    """Judge one model turn against the protocol. Never raises, never evaluates."""
    text = (text or "")[:_MAX_TURN_CHARS]
    think = tags.extract(THINK, text)
    # Actions are looked for outside the reasoning, so a think that mentions <tool> is fine.
    rest = tags.strip_think(text)
    tools = tags.blocks(TOOL, rest)
    answers = tags.blocks(ANSWER, rest)

    def breach(code: str, message: str | None = None) -> ParsedTurn:
        return ParsedTurn(think, breach=code, message=message or correction(code))

    if len(tools) + len(answers) > 1:
        return breach(Breach.TWO_ACTIONS)
    if not tools and not answers:
        return breach(Breach.NO_ACTION)
    if think is None or not think:
        return breach(Breach.NO_THINK)
    if answers:
        answer = answers[0].strip()
        return ParsedTurn(think, answer=answer) if answer else breach(Breach.EMPTY_ANSWER)
    got = parse_call(tools[0].strip(), k)
    if isinstance(got, ToolCall):
        return ParsedTurn(think, call=got)
    return breach(*got)


# -- the interval answer kind (grounding) -----------------------------------------------

# The tasks a question can be: answered with text or a letter, or with a time interval.
QA, GROUNDING = "qa", "grounding"
TASKS = (QA, GROUNDING)

_SECONDS = r"(-?\d{1,7}(?:\.\d{1,6})?)\s*s?"
_INTERVAL_RE = re.compile(rf"\[\s*{_SECONDS}\s*,\s*{_SECONDS}\s*\]", re.ASCII)
_MAX_INTERVAL_CHARS = 200   # longer answers are never one interval (and are not scanned)
_MAX_SHOWN_ANSWER = 80      # characters of a bad answer quoted back in a correction


def format_interval(start: float, end: float) -> str:
    """The canonical text of an interval answer, e.g. ``[12.5, 30]`` (up to 6 decimals, as
    `parse_interval` reads them)."""
    return f"[{_format_seconds(start)}, {_format_seconds(end)}]"


def _format_seconds(t: float) -> str:
    text = f"{float(t):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _usable_duration(duration) -> float | None:
    """The duration as a positive finite float; None when it is missing or unusable."""
    try:
        d = float(duration)
    except (TypeError, ValueError):
        return None
    return d if 0 < d < float("inf") else None


def parse_interval(text: str | None, duration: float | None) -> tuple[float, float] | str:
    """A grounding answer's text -> (start, end) in seconds, or a `Breach` code.

    The syntax is the module docstring's. The codes: MALFORMED_INTERVAL (not that
    syntax), REVERSED_INTERVAL (start > end), INTERVAL_OUTSIDE_VIDEO (start < 0 or,
    when `duration` is a positive number, end > duration). Never raises.
    """
    text = "" if text is None else str(text).strip()
    m = _INTERVAL_RE.fullmatch(text) if len(text) <= _MAX_INTERVAL_CHARS else None
    if not m:
        return Breach.MALFORMED_INTERVAL
    start, end = float(m.group(1)) + 0.0, float(m.group(2)) + 0.0     # + 0.0 turns -0.0 into 0.0
    if start > end:
        return Breach.REVERSED_INTERVAL
    limit = _usable_duration(duration)
    if start < 0 or (limit is not None and end > limit):
        return Breach.INTERVAL_OUTSIDE_VIDEO
    return start, end


def interval_correction(code: str, answer: str | None, duration: float | None) -> str:
    """The corrective message for a grounding answer's breach, quoting the answer."""
    shown = " ".join((answer or "").split())
    if len(shown) > _MAX_SHOWN_ANSWER:
        shown = shown[:_MAX_SHOWN_ANSWER] + "..."
    limit = _usable_duration(duration)
    return correction(code, answer=shown or "(empty)",
                      duration=_format_seconds(limit) if limit is not None else "the video's length in")


def parse_grounding_turn(text: str, k: int, duration: float | None) -> ParsedTurn:
    """`parse_turn` for a grounding question: tool calls as ever, and an answer must be an
    interval (`parse_interval`), returned in `interval` beside its text. Never raises."""
    parsed = parse_turn(text, k)
    if parsed.answer is None:
        return parsed
    got = parse_interval(parsed.answer, duration)
    if isinstance(got, str):
        return ParsedTurn(parsed.think, breach=got, message=interval_correction(got, parsed.answer, duration))
    return ParsedTurn(parsed.think, answer=parsed.answer, interval=got)


def answer_limit(duration: float) -> float:
    """The latest end a grounding answer may give: the duration as the first message shows it
    (to 0.1 s), rounded up, so an answer that ends at the shown length is not outside the video."""
    return math.ceil(round(float(duration) * 10, 6)) / 10


def parse_task_turn(text: str, k: int, task: str, duration: float) -> ParsedTurn:
    """One turn read for its task: `parse_turn` for a question, `parse_grounding_turn` for a grounding
    query, whose interval is then clipped to the video's real length. Never raises."""
    if task != GROUNDING:
        return parse_turn(text, k)
    parsed = parse_grounding_turn(text, k, answer_limit(duration))
    if parsed.interval is None:
        return parsed
    start, end = (min(t, float(duration)) for t in parsed.interval)
    return replace(parsed, interval=(start, end))


# -- answers ----------------------------------------------------------------------------

# The option letter an answer picks ("B", "(B)", "The answer is B", the option's text ...).
extract_choice = chosen_letter


def _normal_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(answer: str | None, choice: str | None, options, reference: str) -> bool:
    """Multiple choice: the chosen letter is the reference letter. Open: the same words,
    ignoring case and punctuation."""
    if options:
        return choice is not None and choice == reference.strip().upper()
    return answer is not None and _normal_text(answer) == _normal_text(reference)


def normalise_options(options) -> tuple[str, ...]:
    """`lvr ask --option`: ['a cat', 'B. a dog'] -> ('A. a cat', 'B. a dog'); letters are added where
    missing. ValueError for an empty option or more than 26."""
    return normalize_options(list(options or ()), fill=True)


def merge_reasoning(text: str, reasoning: str | None) -> str:
    """Put reasoning that a server split off (a reasoning parser) back into <think> tags."""
    if reasoning and not tags.blocks(THINK, text):
        return f"{tags.wrap(THINK, reasoning.strip())}\n{(text or '').lstrip()}"
    return text or ""

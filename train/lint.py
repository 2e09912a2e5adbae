"""`lvr synthesize --lint FILE`: check trajectories, or the released SFT data, against the protocol rules.

Every assistant turn of a trajectory's ``messages`` is judged by the same parser
the agent uses (`lvr.infer.protocol.parse_turn`), so a turn that lint passes is
one that `ask` would have accepted. On top of that, whole-conversation rules:

- roles run system, user, then assistant/user alternating, ending on assistant; a profile
  that sends the last-round notice as a user message of its own (``longvideo-r1``) has it
  right after the last user message, so there two user messages follow each other;
- ``video_qa`` on a leaf only after a ``get_caption`` of that leaf in an earlier turn;
- the last assistant turn is an answer, and no answer comes before it;
- an accepted record's final answer is right (`lvr.infer.protocol.answer_matches`; for a grounding
  record, an interval whose IoU with its best target reaches the record's `accept_iou`);
- no hint text, nor the hint marker, anywhere in the messages (hints must never
  reach SFT data).

Each problem is a `LintIssue` with the file line, the qid and the assistant turn
(1-based), and a code: a `lvr.infer.protocol.Breach` code for a turn the parser
refuses, or one of the codes below.

A JSON list of LLaMA-Factory samples (the released LongVideo-R1 SFT data, read by
`lvr.train.released_data.sft_messages`, as ``lvr sft`` reads it) is linted by the rules
that apply to its samples (`RELEASED_RULES`): they are per-turn fragments in the
``longvideo-r1`` layout with no trajectory fields, so a sample may end on a tool call,
the tree width K is the number of high-level captions in its first user turn, and the
answer and qid rules are skipped. A sample whose first user turn has no high-level
captions starts mid-episode: its ids are not range-checked and its video_qa calls not
checked against earlier captions (counted in `LintReport.partial`). Issues name the
line of the sample's ``{`` and its index in the list.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

from ..infer.benchmarks import EvalFormatError
from ..infer.profiles import LONGVIDEO_R1_PROFILE, PROFILES, Profile
from ..prep.records import RecordFileError, RecordSkip, json_records, read_text
from ..infer.protocol import (GROUNDING, Breach, ParsedTurn, answer_limit, answer_matches, correction, extract_choice,
                              format_id, parse_interval, parse_turn)
from .hints import HINT_PREFIX
from .released_data import sft_layout, sft_messages

__all__ = ["HINT_PREFIX", "LintFileError", "TRAJECTORY_SCHEMA", "FATAL_CODES", "TRAJECTORY_RULES", "RELEASED_RULES",
           "RULE_SETS", "LintIssue", "LintReport", "hint_leaks", "lint_trajectory", "lint_records",
           "lint_released_sample", "lint_released", "lint_file"]

TRAJECTORY_SCHEMA = "lvr.trajectory/1"

# The rule sets, by what the file holds.
TRAJECTORY_RULES = TRAJECTORY_SCHEMA
RELEASED_RULES = "released-sft"
RULE_SETS = {
    TRAJECTORY_RULES: "lvr.trajectory/1 records: every rule",
    RELEASED_RULES: ("released LongVideo-R1 SFT samples (longvideo-r1 layout): turn format, ids within the K "
                     "of the high-level captions, roles, video_qa after its leaf's caption, no answer before "
                     "the last turn, no hint marker; a sample may end on a tool call; the answer and qid "
                     "rules are skipped (the samples carry neither)"),
}


# Codes beyond the parser's Breach codes.
NOT_JSON = "not_json"            # the line is not a JSON object
BAD_SCHEMA = "bad_schema"        # not an lvr.trajectory/1 record
BAD_RECORD = "bad_record"        # a field the checks need is missing or malformed (K, messages ...)
BAD_ROLES = "bad_roles"          # roles do not run system, user, assistant, user, ..., assistant
NO_ANSWER = "no_answer"          # the conversation does not end with an answer turn
ANSWER_BEFORE_END = "answer_before_end"   # an answer turn that is not the last assistant turn
WRONG_ANSWER = "wrong_answer"    # accepted, but the final answer does not pick the right option
HINT_LEAK = "hint_leak"          # hint text or the hint marker inside the messages
DUPLICATE_QID = "duplicate_qid"  # a qid already seen earlier in the file

# A record with one of these cannot become a training sample at all, whatever the options.
FATAL_CODES = frozenset({NOT_JSON, BAD_SCHEMA, BAD_RECORD, BAD_ROLES, NO_ANSWER, HINT_LEAK})


class LintFileError(EvalFormatError, ValueError):
    """The trajectory file cannot be read at all (missing, a directory, not UTF-8). One line."""


@dataclass
class LintIssue:
    line: int
    qid: str | None
    turn: int | None     # 1-based assistant turn, when the issue belongs to one
    code: str
    detail: str
    sample: int | None = None   # a released sample's index in the JSON list (from 0)

    def where(self) -> str:
        """``qid turn N`` / ``sample[i] turn N``: what the issue belongs to, after its file:line."""
        owner = f"sample[{self.sample}]" if self.sample is not None else self.qid or ""
        return " ".join(x for x in (owner, f"turn {self.turn}" if self.turn else "") if x)

    def to_record(self) -> dict:
        record = {"line": self.line, "qid": self.qid, "turn": self.turn, "code": self.code, "detail": self.detail}
        return record if self.sample is None else {**record, "sample": self.sample}


@dataclass
class LintReport:
    records: int = 0             # non-blank lines read
    clean: int = 0               # linted records without issues
    issues: list[LintIssue] = field(default_factory=list)
    rejected: int = 0            # records with accepted != true
    rejected_skipped: int = 0    # of those, not linted (include_rejected=False)
    path: str = "-"
    rules: str = TRAJECTORY_RULES   # a key of RULE_SETS
    partial: int = 0             # released samples that start mid-episode (K unknown)

    @property
    def noun(self) -> str:
        return "samples" if self.rules == RELEASED_RULES else "records"

    @property
    def ok(self) -> bool:
        return not self.issues

    def counts(self) -> dict[str, int]:
        """Issues per code, most frequent first."""
        return dict(sorted(Counter(i.code for i in self.issues).items(), key=lambda kv: (-kv[1], kv[0])))

    def offending_lines(self) -> list[int]:
        return sorted({i.line for i in self.issues})

    def lines(self) -> list[str]:
        """One line per issue: ``file:line: qid turn N: code: detail`` (``sample[i]`` for a released sample)."""
        out = []
        for i in self.issues:
            where = i.where()
            out.append(f"{self.path}:{i.line}: {where + ': ' if where else ''}{i.code}: {i.detail}")
        return out

    def partial_note(self) -> str | None:
        if not self.partial:
            return None
        return (f"{self.partial} sample(s) start mid-episode (no high-level captions in the first user turn): "
                "their ids are not range-checked, nor their video_qa calls against earlier captions")

    def summary(self) -> str:
        linted = self.records - self.rejected_skipped
        text = (f"{self.path}: {self.records} {self.noun}, {linted} linted, {self.clean} clean, "
                f"{len(self.issues)} issues on {len(self.offending_lines())} lines")
        if self.rejected_skipped:
            text += f"; {self.rejected_skipped} rejected not linted (--include-rejected to lint them)"
        text += f"\n  rules: {RULE_SETS[self.rules]}"
        if self.partial:
            text += f"\n  {self.partial_note()}"
        if self.issues:
            text += "\n  " + ", ".join(f"{code}: {n}" for code, n in self.counts().items())
            text += "\n  lines: " + ", ".join(map(str, self.offending_lines()))
        return text

    def to_record(self) -> dict:
        return {"path": self.path, "rules": self.rules, "records": self.records, "clean": self.clean,
                "rejected": self.rejected, "rejected_skipped": self.rejected_skipped, "partial": self.partial,
                "counts": self.counts(),
                "offending_lines": self.offending_lines(), "issues": [i.to_record() for i in self.issues]}


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _hint_texts(rec: dict) -> list[str]:
    hints = rec.get("hints")
    texts = []
    for h in hints if isinstance(hints, list) else []:
        t = h.get("text") if isinstance(h, dict) else None
        if isinstance(t, str) and t.strip():
            texts.append(t.strip())
    return texts


def _leaks(messages: list, texts: list[str]) -> list[tuple[int, str]]:
    """(message index, what leaked) for every message holding one of `texts` or the hint marker."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, str):
            continue
        found = next((t for t in texts if t in content), None)
        if found is not None:
            out.append((i, f"hint text {_short(found, 60)!r}"))
        elif HINT_PREFIX in content:
            out.append((i, f"hint marker {HINT_PREFIX!r}"))
    return out


def hint_leaks(rec: dict) -> list[tuple[int, str]]:
    """(message index, what leaked) for every message holding a hint text or the hint marker."""
    messages = rec.get("messages")
    return _leaks(messages if isinstance(messages, list) else [], _hint_texts(rec))


def _k(rec: dict) -> int | None:
    k = rec.get("K")
    return k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else None


def _record_profile(rec: dict) -> Profile | None:
    settings = rec.get("settings")
    protocol = settings.get("protocol") if isinstance(settings, dict) else None
    return PROFILES.get(protocol) if isinstance(protocol, str) else None


def _last_round_notice(profile: Profile | None, messages: list[dict]) -> int | None:
    """The index of the last-round notice when the profile sends it as a user message of its
    own, right after the last user message (and before the final assistant turn); None otherwise."""
    if profile is None or not profile.last_round_alone:
        return None
    i = len(messages) - 2 if messages[-1]["role"] == "assistant" else len(messages) - 1
    if (i >= 2 and messages[i]["role"] == messages[i - 1]["role"] == "user"
            and messages[i]["content"] == profile.last_round):
        return i
    return None


@dataclass
class _Turns:
    """What the turn rules saw, for the rules about the conversation's end."""

    roles: list[str]
    assistant: list[tuple[int, str]]       # (message index, text) of each assistant turn
    last: ParsedTurn | None = None         # the last assistant turn, parsed


def _lint_messages(messages: list[dict], add, *, k: int | None, profile: Profile | None, hint_texts: list[str],
                   system_required: bool, qa_order: bool) -> _Turns:
    """The rules every conversation follows: roles, no hints, each assistant turn through the
    parser, video_qa after its leaf's caption (`qa_order`), no answer before the last turn.

    `add(code, detail, turn=None)` takes each issue. `k` None: the ids are not range-checked.
    """
    # Roles: [system], user, then assistant/user alternating (a last-round notice of its own aside).
    roles = [m["role"] for m in messages]
    notice = _last_round_notice(profile, messages)
    alternating = [i for i in range(len(roles)) if i != notice]
    first = 0 if system_required or roles[0] == "system" else 1
    for n, i in enumerate(alternating, first):
        role = roles[i]
        want = "system" if n == 0 else "user" if n % 2 else "assistant"
        if role != want:
            add(BAD_ROLES, f"messages[{i}] is {role!r} where {want!r} belongs "
                           f"(roles: {', '.join(roles[:8])}{', ...' if len(roles) > 8 else ''})")
            break

    # Hints must never be in the conversation.
    turn_of = {}
    n = 0
    for i, role in enumerate(roles):
        if role == "assistant":
            n += 1
            turn_of[i] = n
    for i, what in _leaks(messages, hint_texts):
        add(HINT_LEAK, f"{what} in messages[{i}] ({roles[i]})", turn_of.get(i))

    # Each assistant turn against the parser, and the tree rules across turns.
    turns = _Turns(roles, [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"])
    captioned: set[tuple[int, ...]] = set()
    for t, (i, text) in enumerate(turns.assistant, 1):
        parsed = parse_turn(text, k if k is not None else 1_000_000)
        turns.last = parsed
        if parsed.breach:
            add(parsed.breach, parsed.message or parsed.breach, t)
            continue
        call = parsed.call
        if call is not None:
            if call.tool == "get_caption" and len(call.node) == 3:
                captioned.add(call.node)
            elif call.tool == "video_qa" and qa_order and call.node not in captioned:
                add(Breach.QA_BEFORE_CAPTION,
                    correction(Breach.QA_BEFORE_CAPTION, node=format_id(call.node)), t)
        elif t < len(turns.assistant):
            add(ANSWER_BEFORE_END, f"turn {t} answers {_short(parsed.answer, 40)!r} but the conversation "
                                   f"goes on for {len(turns.assistant) - t} more assistant turn(s)", t)
    return turns


def lint_trajectory(rec: dict, line: int) -> list[LintIssue]:
    """Every rule breach in one trajectory record (accepted or not)."""
    qid = rec.get("qid") if isinstance(rec.get("qid"), str) else (
        str(rec["qid"]) if isinstance(rec.get("qid"), int) else None)
    issues: list[LintIssue] = []

    def add(code: str, detail: str, turn: int | None = None) -> None:
        issues.append(LintIssue(line, qid, turn, code, detail))

    schema = rec.get("schema")
    if schema != TRAJECTORY_SCHEMA:
        add(BAD_SCHEMA, f"schema {schema!r} is not {TRAJECTORY_SCHEMA!r}")
        return issues
    k = _k(rec)
    if k is None:
        add(BAD_RECORD, f"'K' must be a whole number >= 1, got {json.dumps(rec.get('K'), default=str)}")
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        add(BAD_RECORD, "'messages' must be a non-empty list")
        return issues
    if any(not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str)
           for m in messages):
        bad = next(i for i, m in enumerate(messages)
                   if not isinstance(m, dict) or not isinstance(m.get("content"), str)
                   or not isinstance(m.get("role"), str))
        add(BAD_RECORD, f"messages[{bad}] needs a string 'role' and a string 'content'")
        return issues

    turns = _lint_messages(messages, add, k=k, profile=_record_profile(rec), hint_texts=_hint_texts(rec),
                           system_required=True, qa_order=True)
    roles, assistant, last_parsed = turns.roles, turns.assistant, turns.last
    if not assistant:
        add(NO_ANSWER, "no assistant turn")
    elif roles[-1] != "assistant":
        add(NO_ANSWER, f"the conversation ends with a {roles[-1]} message, not an answer")
    elif last_parsed is not None and last_parsed.answer is None and not last_parsed.breach:
        add(NO_ANSWER, f"the last assistant turn is a tool call ({last_parsed.call.render()}), not an answer",
            len(assistant))
    elif last_parsed is not None and last_parsed.breach and "<answer>" not in assistant[-1][1].lower():
        # A last turn with an <answer> that breaks a format rule is reported by its breach alone.
        add(NO_ANSWER, "the last assistant turn has no <answer>", len(assistant))

    # An accepted record must end on the right answer, judged as synthesis judges it.
    if rec.get("task") == GROUNDING:
        if rec.get("accepted") is True and last_parsed is not None and last_parsed.answer is not None:
            wrong = _wrong_interval(rec, last_parsed.answer)
            if wrong:
                add(WRONG_ANSWER, wrong, len(assistant))
    elif (rec.get("accepted") is True and last_parsed is not None and last_parsed.answer is not None
            and isinstance(rec.get("answer"), str)):
        options = [str(o) for o in rec.get("options") or []] if isinstance(rec.get("options"), list) else []
        choice = extract_choice(last_parsed.answer, options) if options else None
        if not answer_matches(last_parsed.answer, choice, options, rec["answer"]):
            picked = f"picks {choice or 'no option'}" if options else "does not match"
            add(WRONG_ANSWER, f"accepted, but the final answer {_short(last_parsed.answer, 40)!r} {picked}, "
                              f"not {_short(rec['answer'], 40)!r}", len(assistant))
    return issues


def _wrong_interval(rec: dict, answer: str) -> str | None:
    """Why an accepted grounding record's final answer is not right: not an interval of the video, or
    its IoU with the best target below the record's `accept_iou`; None when it is right."""
    from ..infer.grounding import best_iou

    duration = rec.get("duration")
    got = parse_interval(answer, answer_limit(duration) if isinstance(duration, (int, float)) and duration > 0
                         else None)
    if isinstance(got, str):
        return f"accepted, but the final answer {_short(answer, 40)!r} is not a usable interval ({got})"
    try:
        targets = [(float(s), float(e)) for s, e in rec.get("targets") or []]
        threshold = float(rec.get("accept_iou"))
        iou = best_iou(got, targets)
    except (TypeError, ValueError):
        return "accepted, but the record has no usable 'targets' and 'accept_iou' to judge its interval by"
    if iou < threshold:
        return f"accepted, but the final answer {_short(answer, 40)!r} has IoU {iou:.3f} < accept_iou {threshold:g}"
    return None


def lint_released_sample(rec, line: int, index: int) -> tuple[list[LintIssue], bool]:
    """Every rule breach in one released SFT sample (`RELEASED_RULES`), and whether the sample holds
    its episode from the first turn (its first user turn has the high-level captions)."""
    issues: list[LintIssue] = []

    def add(code: str, detail: str, turn: int | None = None) -> None:
        issues.append(LintIssue(line, None, turn, code, detail, sample=index))

    if not isinstance(rec, dict):
        add(NOT_JSON, "not a JSON object")
        return issues, True
    try:
        messages = sft_messages(rec)   # as `lvr sft` reads it: roles alternate, ending on the assistant
    except RecordSkip as e:
        add(BAD_RECORD, str(e))
        return issues, True
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    k = LONGVIDEO_R1_PROFILE.high_caption_count(first_user) or None
    _lint_messages(messages, add, k=k, profile=LONGVIDEO_R1_PROFILE, hint_texts=[], system_required=False,
                   qa_order=k is not None)
    return issues, k is not None


def lint_records(lines: Iterable[str], *, include_rejected: bool = False, path: str = "-") -> LintReport:
    """Lint JSONL text, one record per line (blank lines skipped)."""
    report = LintReport(path=path)
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        report.records += 1
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            report.issues.append(LintIssue(lineno, None, None, NOT_JSON, f"not JSON ({e.msg})"))
            continue
        if not isinstance(rec, dict):
            report.issues.append(LintIssue(lineno, None, None, NOT_JSON, "not a JSON object"))
            continue
        if rec.get("accepted") is not True:
            report.rejected += 1
            if not include_rejected:
                report.rejected_skipped += 1
                continue
        issues = lint_trajectory(rec, lineno)
        qid = rec.get("qid")
        if isinstance(qid, (str, int)) and not isinstance(qid, bool):
            first = seen.setdefault(str(qid), lineno)
            if first != lineno:
                issues.append(LintIssue(lineno, str(qid), None, DUPLICATE_QID, f"qid first seen on line {first}"))
        report.issues.extend(issues)
        if not issues:
            report.clean += 1
    return report


def lint_released(records: Iterable[tuple[int, object]], *, path: str = "-") -> LintReport:
    """Lint the (line, sample) pairs of a released SFT JSON list by `RELEASED_RULES`."""
    report = LintReport(path=path, rules=RELEASED_RULES)
    for index, (lineno, rec) in enumerate(records):
        report.records += 1
        issues, whole = lint_released_sample(rec, lineno, index)
        report.partial += not whole
        report.issues.extend(issues)
        if not issues:
            report.clean += 1
    return report


def _released_samples(name: str, text: str) -> list[tuple[int, object]]:
    """The (line, record) pairs of a JSON list of LLaMA-Factory samples (LintFileError otherwise)."""
    try:
        records = list(json_records(name, text))
    except RecordFileError as e:
        raise LintFileError(str(e)) from None
    if not any(sft_layout(rec) for _, rec in records):
        raise LintFileError(f"{name}: a JSON list with no LLaMA-Factory SFT sample in it ('conversations', or "
                            "'instruction' and 'output'); --lint reads lvr.trajectory/1 JSONL or the released "
                            "SFT data")
    return records


def lint_file(path_or_dash: "str | Path", *, include_rejected: bool = False,
              stdin: IO[str] | None = None) -> LintReport:
    """Lint a trajectory JSONL file, or a JSON list of released SFT samples (``-`` reads stdin).
    Raises LintFileError when it cannot be read."""
    name = str(path_or_dash)
    if name != "-" and Path(name).is_dir():
        raise LintFileError(f"{name}: is a directory; give a trajectory JSONL file or a released SFT file")
    try:
        text = read_text(name, stdin)
    except EvalFormatError as e:
        raise LintFileError(str(e)) from None
    if text.lstrip().startswith("["):   # LLaMA-Factory data is one JSON list; trajectories are JSONL
        return lint_released(_released_samples(name, text), path=name)
    return lint_records(text.split("\n"), include_rejected=include_rejected, path=name)

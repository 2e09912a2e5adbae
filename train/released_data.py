"""The LongVideo-R1 release's training data, read for lvr: the one home of what its layouts mean.

Facts from the public reference repository ``qiujihao19/LongVideo-R1`` (read, not copied),
described for users in docs/released_formats.md:

**SFT data** (``longvideor1-sft-qwen3-llamafactory.json`` and the qwen2.5 version): LLaMA-Factory
training data, one JSON list of samples. The reference's ``LLaMA-Factory/data/dataset_info.json``
declares this file with LLaMA-Factory's alpaca columns, so a sample is::

    {"system": "...", "history": [["user turn", "assistant turn"], ...],
     "instruction": "last user turn", "input": "", "output": "the assistant turn to learn"}

LLaMA-Factory turns it into system, the history pairs, then ``instruction`` and ``input`` joined
by a newline (each only when non-empty), then ``output``. Its sharegpt layout is read too (what
``lvr synthesize --export-sft --sft-format llamafactory`` writes)::

    {"system": "...", "conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}

human and gpt turns alternating, human first, ending on gpt (a leading ``system`` turn is the
system prompt, as LLaMA-Factory reads it). Tool results are human turns in the reference's
layout; ``observation`` and ``function_call`` turns are refused rather than re-worded, because
LLaMA-Factory's templates wrap them in markup the navigator never reads. Every sample carries
the training system prompt (the navigator prompt with the tree width K filled in), which
`extract_system_prompts` writes out byte for byte for ``--system-prompt``.

The reference trains it with ``mask_history: true`` (``LLaMA-Factory/examples/train_full/
qwen3.yaml``): the loss is on each sample's last assistant turn only (LLaMA-Factory's
``SupervisedDatasetProcessor``; without it, every assistant turn is trained). ``lvr sft
--mask-history`` does the same (train/sft.py).

**RL data** (verl rows, parquet or JSON, written by ``verl-tool/examples/data_preprocess/
longvideor1_cgbenchdata.py`` and ``..._videommedata.py``)::

    {"data_source": "videocaption_cgbench",
     "prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
     "ability": "get_caption", "reward_model": {"style": "rule", "ground_truth": "B"},
     "extra_info": {"index": 0, "video_uid": "...", "split": "rl_data", "width": 4, "duration": 1834.2,
                    "fps": 30.0, "clue_intervals": [[120.5, 131.0]], "data_source": ...}}

The user turn is the question, its lettered option lines, then a line giving the duration
(``The total duration of the video is ...``) and the high-level captions; lvr keeps the
question and options and builds its own first turn from its own tree. The Video-MME split
(``videocaption_videomme``) has no ``clue_intervals``: its reward is the answer alone.
`rl_row` reads a row; ``lvr rl`` gets it through the QA loader (train/qa_items.py,
format ``longvideo-r1``).

Bad records are `RecordSkip`s, which the callers name as ``file:line: reason``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..infer.benchmarks import split_question_options
from ..prep.lettering import split_label
from ..prep.records import (BadLine, RecordFileError, RecordSkip, json_records, parquet_records, read_text,
                            scalar_text, text_field)

__all__ = ["SFT_LAYOUTS", "sft_layout", "sft_messages", "released_records", "high_caption_count",
           "RlRow", "is_rl_row", "rl_row", "SystemPrompt", "Extracted", "collect_system_prompts",
           "prompt_file_names", "width_template", "extract_system_prompts"]

SFT_LAYOUTS = ("alpaca", "sharegpt")

# LLaMA-Factory's default sharegpt tags, and the role names of the OpenAI layout it also reads.
_USER_TAGS = {"human", "user"}
_ASSISTANT_TAGS = {"gpt", "assistant"}
_SYSTEM_TAG = "system"

def _duration_line() -> "re.Pattern[str]":
    """The line of an RL prompt's user turn that ends the question and its options: the start of the
    `longvideo-r1` profile's duration sentence, up to its first field."""
    from ..infer.profiles import LONGVIDEO_R1_PROFILE

    return re.compile("^" + re.escape(LONGVIDEO_R1_PROFILE.duration.split("{", 1)[0]), re.M)


# ---------------------------------------------------------------- reading files

def released_records(name: str) -> list[tuple[int, Any]]:
    """(line or row number, record) of a released file: a JSON list, JSONL, or parquet (RL data).

    RecordFileError when the file cannot be read at all.
    """
    if Path(name).is_dir():
        raise RecordFileError(f"{name}: is a directory; give the data file")
    if Path(name).suffix.lower() == ".parquet":
        return list(parquet_records(name))
    return list(json_records(name, read_text(name)))


# ---------------------------------------------------------------- SFT samples

def sft_layout(rec: Any) -> str | None:
    """The LLaMA-Factory layout of an SFT record, "sharegpt" or "alpaca"; None for anything else."""
    if not isinstance(rec, dict):
        return None
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    return None


def _system(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordSkip("'system' must be a string")
    return value


def _turn_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordSkip(f"{where} must be non-empty text")
    return value


def _sharegpt(rec: dict) -> tuple[str | None, list[dict]]:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordSkip("'conversations' must be a non-empty list of {from, value} turns")
    system = _system(rec.get("system"))
    first = turns[0]
    skip = 0
    if isinstance(first, dict) and first.get("from", first.get("role")) == _SYSTEM_TAG:
        system, skip = _turn_text(first.get("value", first.get("content")), "conversations[0].value"), 1
    messages = []
    for i, turn in enumerate(turns[skip:], skip):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordSkip(f"{where} is not an object")
        tag = turn.get("from", turn.get("role"))
        role = "user" if tag in _USER_TAGS else "assistant" if tag in _ASSISTANT_TAGS else None
        if role is None:
            raise RecordSkip(f"{where}: 'from' is {tag!r}; the LongVideo-R1 layout has human and gpt turns only "
                             "(tool results are human turns)")
        want = "user" if (i - skip) % 2 == 0 else "assistant"
        if role != want:
            raise RecordSkip(f"{where} is a {tag} turn where a {'human' if want == 'user' else 'gpt'} turn belongs "
                             "(human and gpt alternate, human first)")
        messages.append({"role": role, "content": _turn_text(turn.get("value", turn.get("content")),
                                                             f"{where}.value")})
    if len(messages) % 2:
        raise RecordSkip(f"{len(messages)} turns: the last must be a gpt turn to learn from")
    return system, messages


def _alpaca(rec: dict) -> tuple[str | None, list[dict]]:
    messages = []
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RecordSkip("'history' must be a list of [user turn, assistant turn] pairs")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RecordSkip(f"history[{i}] must be a [user turn, assistant turn] pair")
            messages.append({"role": "user", "content": _turn_text(pair[0], f"history[{i}][0]")})
            messages.append({"role": "assistant", "content": _turn_text(pair[1], f"history[{i}][1]")})
    parts = []
    for key in ("instruction", "input"):
        value = rec.get(key)
        if value is not None and not isinstance(value, str):
            raise RecordSkip(f"{key!r} must be a string")
        if value:  # LLaMA-Factory joins the non-empty ones with a newline
            parts.append(value)
    if not "".join(parts).strip():
        raise RecordSkip("'instruction' and 'input' are empty: no user turn")
    messages.append({"role": "user", "content": "\n".join(parts)})
    messages.append({"role": "assistant", "content": _turn_text(rec.get("output"), "'output'")})
    return _system(rec.get("system")), messages


def sft_messages(rec: Any) -> list[dict]:
    """A released SFT sample as chat messages: the system prompt (when the sample has one), then
    user and assistant turns alternating, ending on the assistant. Texts are kept as written.

    RecordSkip names what is wrong with the sample.
    """
    layout = sft_layout(rec)
    if layout is None:
        raise RecordSkip("not a LLaMA-Factory SFT sample (needs 'conversations', or 'instruction' and 'output')")
    system, messages = _sharegpt(rec) if layout == "sharegpt" else _alpaca(rec)
    return ([{"role": "system", "content": system}] if system else []) + messages


def high_caption_count(text: str) -> int | None:
    """The tree width K of a reference first user turn (its number of high-level captions, read
    with the `longvideo-r1` profile's layout), or None when it has none."""
    from ..infer.profiles import LONGVIDEO_R1_PROFILE

    return LONGVIDEO_R1_PROFILE.high_caption_count(text) or None


# ---------------------------------------------------------------- RL rows

def is_rl_row(rec: Any) -> bool:
    return isinstance(rec, dict) and "extra_info" in rec and ("prompt" in rec or "reward_model" in rec)


@dataclass(frozen=True)
class RlRow:
    """What lvr takes from one verl row; values as written (the QA loader checks and letters them)."""

    video: str                        # extra_info.video_uid: the video file is <uid>.mp4
    question: str
    options: tuple[str, ...]          # the lettered option lines of the user turn
    answer: str                       # reward_model.ground_truth (the letter)
    clues: Any                        # extra_info.clue_intervals; None in the Video-MME split
    qid: str | None                   # "<split>-<index>" when the row carries its index
    system: str | None                # the system prompt of the row's prompt
    extra: dict = field(default_factory=dict)


def _content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, list):  # the OpenAI parts layout
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise RecordSkip(f"{where}: 'content' must be text")
    return content


def rl_row(rec: dict) -> RlRow:
    """Read one verl row of the released RL data. RecordSkip names what is wrong."""
    info = rec.get("extra_info")
    if not isinstance(info, dict):
        raise RecordSkip("'extra_info' must be an object (video_uid, width, duration, clue_intervals)")
    try:
        video = text_field(info, "video_uid")
    except RecordSkip as e:
        raise RecordSkip(f"extra_info: {e}") from None
    prompt = rec.get("prompt")
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise RecordSkip("'prompt' must be a list of {role, content} messages")
    users = [i for i, m in enumerate(prompt) if m.get("role") == "user"]
    if not users:
        raise RecordSkip("'prompt' has no user message")
    text = _content(prompt[users[0]], f"prompt[{users[0]}]")
    cut = _duration_line().search(text)
    if cut is None:
        raise RecordSkip(f"prompt[{users[0]}]: no '{_duration_line().pattern[1:].replace(chr(92), '')}...' line, "
                         "so the question cannot be told from the captions")
    head = text[: cut.start()].strip()
    if not head:
        raise RecordSkip(f"prompt[{users[0]}]: the question is empty")
    question, options = head, ()  # no line lettered A: an open question
    if any(split_label(line, "A") for line in head.split("\n")):
        try:
            question, options = split_question_options(head, any_label=True)
        except ValueError as e:
            raise RecordSkip(f"prompt[{users[0]}]: {e}") from None
    reward = rec.get("reward_model")
    if not isinstance(reward, dict) or reward.get("ground_truth") is None:
        raise RecordSkip("'reward_model' must be an object with 'ground_truth'")
    answer = scalar_text(reward["ground_truth"], "reward_model.ground_truth").strip()
    if not answer:
        raise RecordSkip("reward_model.ground_truth is empty")
    systems = [i for i, m in enumerate(prompt) if m.get("role") == "system"]
    system = _content(prompt[systems[0]], f"prompt[{systems[0]}]") if systems else None
    index, split = info.get("index"), info.get("split")
    qid = None
    if isinstance(index, int) and not isinstance(index, bool):
        qid = f"{split}-{index}" if isinstance(split, str) and split else str(index)
    extra = {k: info[k] for k in ("width", "duration", "fps", "split", "index") if info.get(k) is not None}
    for key in ("data_source", "ability"):
        if rec.get(key) is not None:
            extra[key] = rec[key]
    return RlRow(video, question, options, answer, info.get("clue_intervals"), qid, system, extra)


# ---------------------------------------------------------------- system prompts

@dataclass
class SystemPrompt:
    """One distinct system prompt of a released file and the samples that carry it."""

    text: str
    first: str                                   # "file:line" of the first sample carrying it
    samples: int = 0
    widths: set[int] = field(default_factory=set)   # the tree widths K of those samples

    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _prompt_and_width(rec: Any) -> tuple[str | None, int | None]:
    """A record's system prompt and tree width (SFT sample or RL row); RecordSkip when it is neither."""
    if is_rl_row(rec):
        row = rl_row(rec)
        width = row.extra.get("width")
        return row.system, width if isinstance(width, int) and not isinstance(width, bool) else None
    messages = sft_messages(rec)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return system, high_caption_count(first_user)


def collect_system_prompts(name: str) -> tuple[list[SystemPrompt], list[str], int]:
    """The distinct system prompts of a released SFT (or RL) file, in order of first appearance.

    Returns (prompts, errors as "file:line: reason", samples without a system prompt).
    RecordFileError when the file cannot be read at all.
    """
    found: dict[str, SystemPrompt] = {}
    errors: list[str] = []
    without = 0
    for lineno, rec in released_records(name):
        where = f"{name}:{lineno}"
        if isinstance(rec, BadLine):
            errors.append(f"{where}: {rec.reason}")
            continue
        try:
            system, width = _prompt_and_width(rec)
        except RecordSkip as e:
            errors.append(f"{where}: {e}")
            continue
        if not system:
            without += 1
            continue
        prompt = found.setdefault(system, SystemPrompt(system, where))
        prompt.samples += 1
        if width is not None:
            prompt.widths.add(width)
    return list(found.values()), errors, without


def prompt_file_names(prompts: list[SystemPrompt]) -> list[str]:
    """A file name per prompt that says which samples carry it: ``system-K4.txt`` (the tree widths
    of its samples), ``system.txt`` when none is known, ``-2``, ``-3`` ... for prompts that share them."""
    names, seen = [], {}
    for p in prompts:
        base = "system" + "".join(f"-K{k}" for k in sorted(p.widths))
        seen[base] = seen.get(base, 0) + 1
        names.append(f"{base}.txt" if seen[base] == 1 else f"{base}-{seen[base]}.txt")
    return names


TEMPLATE_FILE = "system-template.txt"
_NUMBERS = re.compile(r"(\d+)")


def width_template(prompts: list[SystemPrompt]) -> str | None:
    """One navigator prompt template for every width: the prompts of two widths compared, the
    `longvideo-r1` profile's width field (``{width}``) where their widths are written, the rest as
    written. None unless it gives back every prompt of a single width byte for byte (filled as the
    profile fills it, which is how ``ask --protocol longvideo-r1`` sends it).
    """
    from ..infer.profiles import LONGVIDEO_R1_PROFILE as profile

    single = [(next(iter(p.widths)), p.text) for p in prompts if len(p.widths) == 1]
    other = next(((k, t) for k, t in single[1:] if k != single[0][0]), None) if single else None
    if other is None:
        return None
    (k1, t1), (k2, t2) = single[0], other
    a, b = _NUMBERS.split(t1), _NUMBERS.split(t2)   # odd positions hold the numbers
    if len(a) != len(b):
        return None
    parts = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x == y:
            parts.append(x)
        elif i % 2 and (x, y) == (str(k1), str(k2)):
            parts.append(profile.width_field)
        else:
            return None
    template = "".join(parts)
    return template if all(profile.system_message(template, k) == t for k, t in single) else None


@dataclass
class Extracted:
    written: list[tuple[Path, SystemPrompt]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    without: int = 0                 # samples that carry no system prompt
    template: Path | None = None     # TEMPLATE_FILE, when the prompts differ only in their width


def extract_system_prompts(name: str, out_dir: "str | os.PathLike") -> Extracted:
    """Write each distinct system prompt of a released file into ``out_dir``, byte for byte (UTF-8,
    nothing added or stripped), one whole file each, and `TEMPLATE_FILE` when they differ only in the
    width K written in them (`width_template`). Bad records are in `errors`; the rest go on.

    RecordFileError when the file cannot be read at all.
    """
    from ..prep.jsonl import write_atomic

    prompts, errors, without = collect_system_prompts(name)
    result = Extracted(errors=errors, without=without)
    for file_name, prompt in zip(prompt_file_names(prompts), prompts):
        path = Path(out_dir) / file_name
        write_atomic(path, prompt.text.encode("utf-8"))
        result.written.append((path, prompt))
    template = width_template(prompts)
    if template is not None:
        result.template = Path(out_dir) / TEMPLATE_FILE
        write_atomic(result.template, template.encode("utf-8"))
    return result

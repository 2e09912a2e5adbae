"""SFT data from teacher trajectories: TRL messages JSONL and LLaMA-Factory sharegpt JSON.

Only accepted trajectories (``"accepted": true``) become samples. A sample is the
record's clean ``messages`` as they stand: the system prompt with K filled in and
the first user turn are exactly what `ask` sends (the synthesizer runs the same
loop), tool results are ``user`` turns, and hints are never present: a record
whose messages hold a hint text or the hint marker is refused, as is one whose
roles are broken or that does not end on an answer (see `lvr.train.lint`). With
``skip_invalid`` (the default) a record with any other lint issue, such as a turn
that broke the protocol and drew a correction, is left out as well.

Two sample shapes:

- whole trajectory: ``{"messages": [system, user, assistant, user, ..., assistant]}``
  (TRL's conversational language-modelling form; with ``assistant_only_loss`` the
  loss falls on every assistant turn).
- ``per_turn``: one sample per assistant turn i, ``{"prompt": messages before
  turn i, "completion": [turn i]}`` (TRL's conversational prompt-completion form,
  so the loss falls on turn i only). This is LongVideo-R1's expansion of 5.6K
  trajectories into 33K turn samples. Earlier turns stay in the prompt verbatim,
  ``<think>`` included.

LLaMA-Factory (sharegpt, per its data/README and its ``SharegptDatasetConverter``):
``{"conversations": [{"from": "human"|"gpt", "value": ...}, ...], "system": ...}``
with human turns at even positions (0, 2, ...) and gpt turns at odd ones, an even
number of turns, the system prompt in its own column, and a ``dataset_info.json``
entry naming the file, ``"formatting": "sharegpt"``, the columns and the tags.
Tool results are written as ``human`` turns, not ``observation``: LLaMA-Factory's
templates wrap observation turns in their own tool-response markup, so the model
would be trained on text that `ask` never sends.

sharegpt has no per-message loss switch. A whole trajectory trains on every gpt
turn (LLaMA-Factory's default). A per-turn sample is the conversation up to and
including gpt turn i; to put the loss on that last turn only, train with
``mask_history: true``. Check that the chosen template keeps earlier turns'
``<think>`` under ``mask_history`` (LLaMA-Factory drops history thoughts for
reasoning templates unless the template preserves thinking); if it does not,
export whole trajectories instead.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from ..prep.jsonl import dumps, write_atomic
from .lint import FATAL_CODES, TRAJECTORY_SCHEMA, lint_trajectory

__all__ = ["LLAMAFACTORY_TAGS", "DEFAULT_DATASET_NAME", "sft_samples", "sample_messages", "to_sharegpt",
           "llamafactory_entry", "write_trl_jsonl", "write_llamafactory", "validate_llamafactory"]

DEFAULT_DATASET_NAME = "lvr_trajectories"
LLAMAFACTORY_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
_ROLE_TO_TAG = {"user": "human", "assistant": "gpt"}


# ---------------------------------------------------------------- samples

def _clean_messages(messages: list[dict]) -> list[dict]:
    """Role and content only (no reasoning fields, names or metadata)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sft_samples(records: Iterable[dict], *, per_turn: bool = False,
                skip_invalid: bool = True) -> tuple[list[dict], dict]:
    """Chat samples from trajectory records, and what happened to each record.

    stats: ``records`` read, ``accepted``, ``skipped_rejected`` (not accepted),
    ``skipped_invalid`` (accepted but refused), ``samples`` written, and
    ``invalid``: lint code -> number of refused records that had it.
    """
    samples: list[dict] = []
    stats: dict[str, Any] = {"records": 0, "accepted": 0, "skipped_rejected": 0, "skipped_invalid": 0,
                             "samples": 0, "invalid": {}}
    invalid: Counter[str] = Counter()
    for n, rec in enumerate(records, 1):
        stats["records"] += 1
        if not isinstance(rec, dict) or rec.get("schema") != TRAJECTORY_SCHEMA:
            stats["skipped_invalid"] += 1
            invalid["bad_schema"] += 1
            continue
        if rec.get("accepted") is not True:
            stats["skipped_rejected"] += 1
            continue
        stats["accepted"] += 1
        issues = lint_trajectory(rec, n)
        codes = {i.code for i in issues}
        if codes & FATAL_CODES or (skip_invalid and codes):
            stats["skipped_invalid"] += 1
            invalid.update(codes)
            continue
        messages = _clean_messages(rec["messages"])
        if per_turn:
            for j, m in enumerate(messages):
                if m["role"] == "assistant":
                    samples.append({"prompt": messages[:j], "completion": [m]})
        else:
            samples.append({"messages": messages})
    stats["samples"] = len(samples)
    stats["invalid"] = dict(sorted(invalid.items()))
    return samples, stats


def sample_messages(sample: dict) -> list[dict]:
    """The whole conversation of a sample of either shape."""
    if "messages" in sample:
        return list(sample["messages"])
    return list(sample["prompt"]) + list(sample["completion"])


# ---------------------------------------------------------------- TRL

def write_trl_jsonl(samples: Iterable[dict], path: "str | Path") -> int:
    """One sample per line, written atomically (``-`` writes stdout). Returns the count."""
    lines = [dumps(s) + "\n" for s in samples]
    if str(path) == "-":
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
    else:
        write_atomic(path, "".join(lines))
    return len(lines)


# ---------------------------------------------------------------- LLaMA-Factory

def to_sharegpt(sample: dict) -> dict:
    """A sample as a sharegpt record: ``{"conversations": [...], "system": ...}``."""
    messages = sample_messages(sample)
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    conversations = []
    for m in messages:
        tag = _ROLE_TO_TAG.get(m["role"])
        if tag is None:
            raise ValueError(f"role {m['role']!r} has no sharegpt tag (only user and assistant after the system)")
        conversations.append({"from": tag, "value": m["content"]})
    return {"conversations": conversations, "system": system}


def llamafactory_entry(file_name: str) -> dict:
    """The dataset_info.json entry for an exported file."""
    return {"file_name": file_name, "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": dict(LLAMAFACTORY_TAGS)}


def write_llamafactory(samples: Iterable[dict], out_dir: "str | Path",
                       dataset_name: str = DEFAULT_DATASET_NAME) -> tuple[Path, Path]:
    """Write ``<out_dir>/<dataset_name>.json`` and add its entry to ``<out_dir>/dataset_info.json``.

    Other entries of an existing dataset_info.json are kept. Both files are
    written atomically. Returns (data path, dataset_info path).
    """
    if not dataset_name or "/" in dataset_name or "\\" in dataset_name:
        raise ValueError(f"dataset name {dataset_name!r} must be a plain name")
    out = Path(out_dir)
    data_path = out / f"{dataset_name}.json"
    info_path = out / "dataset_info.json"
    records = [to_sharegpt(s) for s in samples]
    info: dict = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{info_path}: cannot update it ({e})") from None
        if not isinstance(info, dict):
            raise ValueError(f"{info_path}: not a JSON object; cannot update it")
    info[dataset_name] = llamafactory_entry(data_path.name)
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    write_atomic(data_path, f"[\n{body}\n]\n" if records else "[]\n")
    write_atomic(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return data_path, info_path


# The keys LLaMA-Factory's data/README documents for a dataset_info.json entry.
_ENTRY_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name",
               "file_sha1", "subset", "split", "folder", "num_samples", "ranking", "formatting", "columns", "tags"}
_COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
                "audios", "chosen", "rejected", "kto_tag"}
_TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


def validate_llamafactory(data: Any, info: Any, dataset_name: str | None = None, *,
                          file_name: str | None = None, max_errors: int = 50) -> list[str]:
    """Check an export against what LLaMA-Factory's sharegpt loader requires; [] when it passes.

    ``info`` is the dataset_info.json object; ``dataset_name`` picks its entry
    (optional when there is only one). ``file_name``, when given, must be the
    entry's file_name. Per sample: only declared columns, the messages column a
    list of ``{role_tag, content_tag}`` objects with non-empty string content,
    user/observation tags at even positions and assistant/function tags at odd
    ones (after an optional leading system-tag message), an even count ending
    on the assistant, and a string in the system column when one is declared.
    """
    errors: list[str] = []

    def err(msg: str) -> None:
        errors.append(msg)

    if not isinstance(info, dict) or not info:
        return ["dataset_info: must be a non-empty JSON object of dataset entries"]
    if dataset_name is None:
        if len(info) != 1:
            return [f"dataset_info: {len(info)} entries; name the one to check"]
        dataset_name = next(iter(info))
    entry = info.get(dataset_name)
    if not isinstance(entry, dict):
        return [f"dataset_info: no entry {dataset_name!r}"]
    where = f"dataset_info[{dataset_name!r}]"
    for key in sorted(set(entry) - _ENTRY_KEYS):
        err(f"{where}: unknown key {key!r}")
    for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if key in entry:
            err(f"{where}: {key!r} would make LLaMA-Factory load from there instead of 'file_name'")
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        err(f"{where}: 'file_name' must name the data file")
    elif file_name is not None and entry["file_name"] != file_name:
        err(f"{where}: file_name {entry['file_name']!r} is not the data file {file_name!r}")
    if entry.get("formatting") != "sharegpt":
        err(f"{where}: 'formatting' must be 'sharegpt', got {entry.get('formatting')!r}")
    if entry.get("ranking", False) is not False:
        err(f"{where}: 'ranking' must be false for SFT data")
    columns = entry.get("columns")
    tags = entry.get("tags")
    for group, name, known in ((columns, "columns", _COLUMN_KEYS), (tags, "tags", set(_TAG_DEFAULTS))):
        if group is None:
            continue
        if not isinstance(group, dict):
            err(f"{where}: {name!r} must be an object")
            continue
        for key in sorted(set(group) - known):
            err(f"{where}: unknown {name[:-1]} key {key!r}")
        for key, value in group.items():
            if not isinstance(value, str) or not value:
                err(f"{where}: {name}.{key} must be a non-empty string")
    if errors:
        return errors
    # LLaMA-Factory (DatasetAttr.join) keeps its defaults only when "columns" / "tags" is
    # absent altogether; a key missing from a given object becomes None.
    col = {"messages": "conversations"} if columns is None else dict(columns)
    t = dict(_TAG_DEFAULTS) if tags is None else dict(tags)
    for key in ("role_tag", "content_tag", "user_tag", "assistant_tag"):
        if not t.get(key):
            err(f"{where}: tags.{key} is missing (a 'tags' object replaces all the defaults)")
    if not col.get("messages"):
        err(f"{where}: columns.messages is missing (a 'columns' object replaces all the defaults)")
    if errors:
        return errors
    if t["user_tag"] == t["assistant_tag"]:
        return [f"{where}: user_tag and assistant_tag are both {t['user_tag']!r}"]
    messages_col = col["messages"]
    system_col = col.get("system")
    declared = set(col.values())
    odd = tuple(x for x in (t["user_tag"], t.get("observation_tag")) if x)
    even = tuple(x for x in (t["assistant_tag"], t.get("function_tag")) if x)
    rt, ct, system_tag = t["role_tag"], t["content_tag"], t.get("system_tag")

    if not isinstance(data, list):
        return errors + ["data: must be a JSON list of samples"]
    if not data:
        err("data: no samples")
    for j, sample in enumerate(data):
        if len(errors) >= max_errors:
            errors.append(f"... stopped after {max_errors} errors")
            break
        here = f"data[{j}]"
        if not isinstance(sample, dict):
            err(f"{here}: not an object")
            continue
        for key in sorted(set(sample) - declared):
            err(f"{here}: key {key!r} is not a declared column")
        if system_col is not None and not isinstance(sample.get(system_col), str):
            err(f"{here}: column {system_col!r} must be a string")
        msgs = sample.get(messages_col)
        if not isinstance(msgs, list) or not msgs:
            err(f"{here}: {messages_col!r} must be a non-empty list")
            continue
        if any(not isinstance(m, dict) for m in msgs):
            err(f"{here}: every {messages_col!r} item must be an object")
            continue
        if system_tag and msgs[0].get(rt) == system_tag:
            msgs = msgs[1:]
        for i, m in enumerate(msgs):
            if set(m) != {rt, ct}:
                err(f"{here}.{messages_col}[{i}]: keys must be {rt!r} and {ct!r}, got {sorted(m)}")
                break
            if not isinstance(m[ct], str) or not m[ct].strip():
                err(f"{here}.{messages_col}[{i}]: {ct!r} must be a non-empty string")
                break
            allowed = odd if i % 2 == 0 else even
            if m[rt] not in allowed:
                err(f"{here}.{messages_col}[{i}]: {rt!r} is {m[rt]!r}; position {i} takes "
                    f"{' or '.join(repr(a) for a in allowed)}")
                break
        else:
            if len(msgs) % 2:
                err(f"{here}: {len(msgs)} turns; sharegpt SFT needs an even number ending on {t['assistant_tag']!r}")
    return errors

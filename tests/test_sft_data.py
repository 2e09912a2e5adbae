"""SFT samples from trajectories: what `ask` sends, no hints, per-turn expansion, TRL and LLaMA-Factory exports."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from lvr.infer.agent import AgentOptions, run_agent
from lvr.infer.environment import ToolOutcome
from lvr.infer.protocol import (DEFAULT_SYSTEM_PROMPT, LAST_ROUND_NOTICE, first_user_message, system_prompt,
                                tool_result_message)
from lvr.prep.models.base import Completion
from lvr.train.lint import HINT_PREFIX
from lvr.train.sft_data import (LLAMAFACTORY_TAGS, llamafactory_entry, sft_samples, to_sharegpt,
                                validate_llamafactory, write_llamafactory, write_trl_jsonl)

K = 4
DURATION = 400.0
QUESTION = "What does the man pick up after the phone rings?"
OPTIONS = ("A. a cup", "B. a book", "C. keys", "D. a hat")
HIGH = [((h,), (h - 1) * 100.0, h * 100.0 - 0.5, f"High clip {h}: a kitchen, scene {h}.") for h in range(1, K + 1)]
HINT = f"{HINT_PREFIX} the evidence lies in high clip (3,)."
SPANS = {(3, 2): (225.0, 249.5), (3, 2, 1): (225.0, 231.0)}
CAPTIONS = {(3, 2): "A phone rings; a man walks to the table.",
            (3, 2, 1): "The man reaches for something small and shiny."}

TEACHER_TURNS = [
    "<think>The phone is in clip 3.</think>\n<tool>get_caption((3, 2))</tool>",
    "<think>Closer.</think>\n<tool>get_caption((3, 2, 1))</tool>",
    '<think>Verify with the frames.</think>\n<tool>video_qa((3, 2, 1), "What does he pick up?")</tool>',
    "<think>He picks up keys.</think>\n<answer>C</answer>",
]


class ScriptedModel:
    """Replies from a script and records exactly the messages each request carried."""

    name = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[list[dict]] = []

    async def complete(self, messages, options=None):
        self.requests.append(copy.deepcopy(messages))
        return Completion(self.replies.pop(0), self.name)


class FakeEnv:
    """The part of VideoEnv the agent loop uses: high captions, K, duration, tool calls."""

    k = K
    duration = DURATION

    async def high_captions(self):
        return HIGH

    async def call(self, call):
        start, end = SPANS[call.node]
        text = "A set of keys." if call.tool == "video_qa" else CAPTIONS[call.node]
        return ToolOutcome(tool_result_message(call.tool, call.node, start, end, text, query=call.query))


def run_ask(turns=TEACHER_TURNS, max_rounds=30):
    model = ScriptedModel(turns)
    result = asyncio.run(run_agent(model, FakeEnv(), QUESTION, OPTIONS, template=DEFAULT_SYSTEM_PROMPT,
                                   agent=AgentOptions(max_rounds=max_rounds)))
    return result, model


def record(messages, *, qid="q1", accepted=True, hints=True, **extra):
    rec = {"schema": "lvr.trajectory/1", "qid": qid, "video": "v.mp4", "video_id": "abc", "K": K,
           "duration": DURATION, "question": QUESTION, "options": list(OPTIONS), "answer": "C",
           "clues": [[226.0, 230.0]], "accepted": accepted, "correct": accepted, "stopped": "answered",
           "attempts": 2, "messages": copy.deepcopy(messages),
           "hints": [{"level": 1, "after_turn": 1, "ids": [[3]], "text": HINT}] if hints else [],
           "dropped": [{"after_turn": 1, "text": "<think>Guess.</think><answer>A</answer>", "answer": "A",
                        "hint_level": 1}]}
    rec.update(extra)
    return rec


@pytest.fixture(scope="module")
def asked():
    result, model = run_ask()
    assert result.stopped == "answered" and result.choice == "C"
    return result, model


def test_system_and_first_user_turn_are_what_ask_sends(asked):
    result, model = asked
    samples, stats = sft_samples([record(result.messages)])
    assert stats == {"records": 1, "accepted": 1, "skipped_rejected": 0, "skipped_invalid": 0, "samples": 1,
                     "invalid": {}}
    messages = samples[0]["messages"]
    assert messages == result.messages
    assert messages[0] == {"role": "system", "content": system_prompt(DEFAULT_SYSTEM_PROMPT, K)}
    assert messages[1] == {"role": "user", "content": first_user_message(QUESTION, OPTIONS, DURATION, HIGH)}
    assert messages[:2] == model.requests[0][:2]
    # Tool results are user turns naming the tool, the node and its span.
    assert messages[3] == {"role": "user", "content": tool_result_message("get_caption", (3, 2), 225.0, 249.5,
                                                                          CAPTIONS[(3, 2)])}
    assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "user"] * 3 + ["assistant"]


def test_per_turn_samples_are_exactly_the_requests_of_each_round(asked):
    result, model = asked
    samples, stats = sft_samples([record(result.messages)], per_turn=True)
    assert stats["samples"] == len(samples) == len(TEACHER_TURNS) == len(model.requests)
    for i, sample in enumerate(samples):
        assert set(sample) == {"prompt", "completion"}
        assert sample["prompt"] == model.requests[i]          # what the model was sent in round i+1
        assert sample["completion"] == [{"role": "assistant", "content": TEACHER_TURNS[i]}]
    # Earlier turns keep their <think> inside later prompts.
    assert "<think>The phone is in clip 3.</think>" in samples[-1]["prompt"][2]["content"]


def test_the_last_round_notice_stays_as_ask_sent_it():
    result, model = run_ask(max_rounds=4)
    assert result.stopped == "answered" and LAST_ROUND_NOTICE in model.requests[-1][-1]["content"]
    samples, _ = sft_samples([record(result.messages)], per_turn=True)
    assert samples[-1]["prompt"] == model.requests[-1]


def test_hints_never_reach_a_sample(asked):
    result, _ = asked
    clean = record(result.messages)
    leaked = record(result.messages, qid="q2")
    leaked["messages"][3]["content"] += "\n\n" + HINT            # a hint appended to a tool result
    in_model_turn = record(result.messages, qid="q3")
    in_model_turn["messages"][4]["content"] = in_model_turn["messages"][4]["content"].replace(
        "<think>Closer.", f"<think>{HINT} Closer.")
    for skip_invalid in (True, False):
        samples, stats = sft_samples([clean, leaked, in_model_turn], skip_invalid=skip_invalid)
        assert len(samples) == 1 and stats["skipped_invalid"] == 2 and stats["invalid"] == {"hint_leak": 2}
        dumped = json.dumps(samples)
        assert HINT not in dumped and HINT_PREFIX not in dumped
    # The hint text is in the record (hints, dropped turns), but only messages are exported.
    samples, _ = sft_samples([clean], per_turn=True)
    assert HINT not in json.dumps(samples) and "Guess." not in json.dumps(samples)


def test_rejected_and_invalid_records_are_skipped(asked):
    result, _ = asked
    broken = record(result.messages, qid="bad")
    broken["messages"][4]["content"] = "<tool>get_caption((3, 2, 1))</tool>"       # no <think>
    records = [record(result.messages, accepted=False, qid="r"), broken, record(result.messages, qid="ok"),
               {"schema": "lvr.question/1"}, record(result.messages[:-1], qid="noanswer")]
    samples, stats = sft_samples(records)
    assert len(samples) == 1
    assert stats == {"records": 5, "accepted": 3, "skipped_rejected": 1, "skipped_invalid": 3, "samples": 1,
                     "invalid": {"bad_schema": 1, "no_answer": 1, "no_think": 1, "qa_before_caption": 1}}
    # skip_invalid=False keeps trajectories with breach turns, never broken ones.
    samples, stats = sft_samples(records, skip_invalid=False, per_turn=True)
    assert stats["skipped_invalid"] == 2 and len(samples) == 8


def test_trl_jsonl_export(asked, tmp_path):
    result, _ = asked
    rec = record(result.messages)
    rec["messages"][2]["reasoning_content"] = "split-off reasoning"      # extra keys are dropped
    for per_turn in (False, True):
        samples, _ = sft_samples([rec], per_turn=per_turn)
        path = tmp_path / f"trl-{per_turn}.jsonl"
        assert write_trl_jsonl(samples, path) == len(samples)
        back = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert back == samples
        assert not list(tmp_path.glob(".*.tmp"))
    from trl.data_utils import is_conversational
    full, _ = sft_samples([rec])
    turns, _ = sft_samples([rec], per_turn=True)
    assert is_conversational(full[0]) and is_conversational(turns[0])
    assert "reasoning_content" not in json.dumps(full)


# ---------------------------------------------------------------- LLaMA-Factory

def test_llamafactory_export_validates(asked, tmp_path):
    result, _ = asked
    samples, _ = sft_samples([record(result.messages), record(result.messages, qid="q2")])
    data_path, info_path = write_llamafactory(samples, tmp_path / "lf")
    assert data_path == tmp_path / "lf" / "lvr_trajectories.json"
    assert info_path == tmp_path / "lf" / "dataset_info.json"
    data = json.loads(data_path.read_text(encoding="utf-8"))
    info = json.loads(info_path.read_text(encoding="utf-8"))
    assert info == {"lvr_trajectories": {
        "file_name": "lvr_trajectories.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}
    assert validate_llamafactory(data, info, file_name=data_path.name) == []
    first = data[0]
    assert first["system"] == system_prompt(DEFAULT_SYSTEM_PROMPT, K)
    assert first["conversations"][0] == {"from": "human",
                                         "value": first_user_message(QUESTION, OPTIONS, DURATION, HIGH)}
    assert [c["from"] for c in first["conversations"]] == ["human", "gpt"] * 4
    assert [c["value"] for c in first["conversations"][1::2]] == TEACHER_TURNS


def test_llamafactory_per_turn_export(asked, tmp_path):
    result, model = asked
    samples, _ = sft_samples([record(result.messages)], per_turn=True)
    data_path, info_path = write_llamafactory(samples, tmp_path, "lvr_turns")
    data = json.loads(data_path.read_text(encoding="utf-8"))
    info = json.loads(info_path.read_text(encoding="utf-8"))
    assert validate_llamafactory(data, info, "lvr_turns") == []
    assert len(data) == 4
    for i, sample in enumerate(data):   # conversation up to and including gpt turn i
        assert len(sample["conversations"]) == 2 * (i + 1)
        assert sample["conversations"][-1] == {"from": "gpt", "value": TEACHER_TURNS[i]}
        assert [c["value"] for c in sample["conversations"][:-1]] == [m["content"] for m in model.requests[i][1:]]


def test_lvr_sft_reads_its_own_llamafactory_export_back(asked, tmp_path):
    """The sharegpt export loads into `lvr sft` as the conversation it came from, system prompt included."""
    from lvr.train.sft import load_sft_data

    result, _ = asked
    samples, _ = sft_samples([record(result.messages)], per_turn=True)
    data_path, _ = write_llamafactory(samples, tmp_path)
    data = load_sft_data(data_path)
    assert data.format == "llamafactory-sharegpt"
    assert [s["messages"] for s in data.samples] == [s["prompt"] + s["completion"] for s in samples]
    masked = load_sft_data(data_path, mask_history=True)
    assert masked.samples == samples  # --mask-history: each per-turn sample trains its own turn


def test_dataset_info_keeps_other_entries(asked, tmp_path):
    result, _ = asked
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_en": {"file_name": "alpaca.json"}}))
    samples, _ = sft_samples([record(result.messages)])
    _, info_path = write_llamafactory(samples, tmp_path)
    info = json.loads(info_path.read_text())
    assert set(info) == {"alpaca_en", "lvr_trajectories"}
    assert validate_llamafactory([], info)[0].startswith("dataset_info: 2 entries")
    (tmp_path / "dataset_info.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        write_llamafactory(samples, tmp_path)


def good_export():
    result, _ = run_ask()
    samples, _ = sft_samples([record(result.messages)])
    return [to_sharegpt(s) for s in samples], {"lvr": llamafactory_entry("lvr.json")}


def breaks(mutate):
    data, info = good_export()
    mutate(data, info)
    return validate_llamafactory(data, info)


@pytest.mark.parametrize("mutate, message", [
    (lambda d, i: d[0]["conversations"].pop(), "7 turns; sharegpt SFT needs an even number"),
    (lambda d, i: d[0]["conversations"].pop(0), "position 0 takes 'human'"),
    (lambda d, i: d[0]["conversations"].__setitem__(1, {"from": "human", "value": "x"}),
     "conversations[1]: 'from' is 'human'; position 1 takes 'gpt'"),
    (lambda d, i: d[0]["conversations"].__setitem__(2, {"from": "user", "value": "x"}),
     "conversations[2]: 'from' is 'user'"),
    (lambda d, i: d[0]["conversations"][3].__setitem__("value", ""), "'value' must be a non-empty string"),
    (lambda d, i: d[0]["conversations"][3].__setitem__("role", "gpt"), "keys must be 'from' and 'value'"),
    (lambda d, i: d[0].__setitem__("system", None), "column 'system' must be a string"),
    (lambda d, i: d[0].pop("system"), "column 'system' must be a string"),
    (lambda d, i: d[0].__setitem__("qid", "q1"), "key 'qid' is not a declared column"),
    (lambda d, i: d[0].__setitem__("conversations", []), "'conversations' must be a non-empty list"),
    (lambda d, i: d.__setitem__(0, "text"), "data[0]: not an object"),
    (lambda d, i: d.clear(), "data: no samples"),
    (lambda d, i: i["lvr"].__setitem__("formatting", "alpaca"), "'formatting' must be 'sharegpt'"),
    (lambda d, i: i["lvr"].pop("file_name"), "'file_name' must name the data file"),
    (lambda d, i: i["lvr"]["columns"].__setitem__("messages", "messages"), "'messages' must be a non-empty list"),
    (lambda d, i: i["lvr"]["columns"].__setitem__("message", "x"), "unknown column key 'message'"),
    (lambda d, i: i["lvr"]["tags"].__setitem__("user_tag", "user"),
     "'from' is 'human'; position 0 takes 'user'"),
    (lambda d, i: i["lvr"]["tags"].__setitem__("assistant", "gpt"), "unknown tag key 'assistant'"),
    (lambda d, i: i["lvr"]["tags"].__setitem__("assistant_tag", "human"), "user_tag and assistant_tag are both"),
    (lambda d, i: i["lvr"].__setitem__("ranking", True), "'ranking' must be false"),
    (lambda d, i: i["lvr"].__setitem__("formating", "sharegpt"), "unknown key 'formating'"),
    (lambda d, i: i["lvr"].__setitem__("hf_hub_url", "x/y"), "'hf_hub_url' would make LLaMA-Factory load"),
    # A "columns" or "tags" object replaces LLaMA-Factory's defaults wholesale.
    (lambda d, i: i["lvr"]["columns"].pop("messages"), "columns.messages is missing"),
    (lambda d, i: i["lvr"]["tags"].pop("role_tag"), "tags.role_tag is missing"),
    (lambda d, i: i["lvr"]["tags"].__setitem__("observation_tag", 3), "tags.observation_tag must be a non-empty"),
])
def test_validation_catches_broken_exports(mutate, message):
    errors = breaks(mutate)
    assert errors and any(message in e for e in errors), errors


def test_validation_follows_the_declared_tags():
    data, info = good_export()
    # The same data in the OpenAI-style tags LLaMA-Factory also documents.
    for sample in data:
        sample["messages"] = [{"role": "system", "content": sample.pop("system")}] + [
            {"role": {"human": "user", "gpt": "assistant"}[c["from"]], "content": c["value"]}
            for c in sample.pop("conversations")]
    info = {"lvr": {"file_name": "lvr.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "system_tag": "system"}}}
    assert validate_llamafactory(data, info) == []
    assert validate_llamafactory(data, info, "other") == ["dataset_info: no entry 'other'"]
    assert validate_llamafactory(data, {}) == ["dataset_info: must be a non-empty JSON object of dataset entries"]
    assert LLAMAFACTORY_TAGS["user_tag"] == "human"
    # Without "columns" and "tags", LLaMA-Factory's defaults apply (conversations, from/value, human/gpt).
    data, _ = good_export()
    for sample in data:
        sample.pop("system")
    assert validate_llamafactory(data, {"lvr": {"file_name": "lvr.json", "formatting": "sharegpt"}}) == []


def test_file_name_must_match_and_errors_are_capped():
    data, info = good_export()
    assert "is not the data file 'other.json'" in validate_llamafactory(data, info, file_name="other.json")[0]
    many = data * 80
    for s in many:
        s["extra"] = 1
    errors = validate_llamafactory(many, info, max_errors=10)
    assert len(errors) == 11 and errors[-1] == "... stopped after 10 errors"

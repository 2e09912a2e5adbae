"""Preference pairs from trajectories (`lvr synthesize --export-pairs`), and LLM-written wrong turns.

A dropped turn was written at the same point of the conversation as the next kept
assistant turn: after `after_turn` kept turns and the user message that follows the
last of them. The hint shown after it is in neither the prompt nor the pair.
"""

from __future__ import annotations

import asyncio
import json

from fake_openai import FakeOpenAI
from lvr.infer.protocol import parse_turn
from lvr.train.hints import HINT_PREFIX
from lvr.train.pairs import (PAIR_SCHEMA, SOURCE_DROPPED, SOURCE_WRONG, WRONG_TURN_SYSTEM, check_wrong_turn,
                             dropped_pairs, make_wrong_turns, wrong_turn_request)
from lvr_test_helpers import TRAJECTORY_K as K
from lvr_test_helpers import TRAJECTORY_OPTIONS as OPTIONS
from lvr_test_helpers import run_lvr, trajectory, write_jsonl


def no_hint(pair: dict, record: dict) -> bool:
    text = json.dumps(pair)
    return HINT_PREFIX not in text and all(h["text"] not in text for h in record["hints"])


# -- pairs from dropped turns -----------------------------------------------------------

def test_each_dropped_turn_pairs_with_the_turn_kept_at_the_same_point():
    rec = trajectory()
    msgs = rec["messages"]
    pairs, stats = dropped_pairs([rec])
    assert len(pairs) == 2 and stats.pairs == {SOURCE_DROPPED: 2}
    first, second = pairs
    # Dropped after 1 kept turn: written after [system, question, turn 1, its result], like kept turn 2.
    assert first["prompt"] == msgs[:4]
    assert first["chosen"] == [{"role": "assistant", "content": msgs[4]["content"]}]
    assert first["rejected"] == [{"role": "assistant", "content": rec["dropped"][0]["text"]}]
    # Dropped after 2 kept turns: written where the final answer was.
    assert second["prompt"] == msgs[:6]
    assert second["chosen"] == [{"role": "assistant", "content": msgs[6]["content"]}]
    assert second["rejected"] == [{"role": "assistant", "content": rec["dropped"][1]["text"]}]
    for pair, turn, level in ((first, 2, 1), (second, 3, 2)):
        assert pair["schema"] == PAIR_SCHEMA and pair["qid"] == "q0" and pair["source"] == SOURCE_DROPPED
        assert pair["turn"] == turn and pair["hint_level"] == level and pair["K"] == K
        assert pair["prompt"][-1]["role"] == "user" and no_hint(pair, rec)


def test_wrong_twice_in_a_row_gives_two_pairs_with_one_prompt():
    rec = trajectory(dropped_after=(2, 2))
    pairs, _ = dropped_pairs([rec])
    assert len(pairs) == 2
    assert pairs[0]["prompt"] == pairs[1]["prompt"] == rec["messages"][:6]
    assert pairs[0]["chosen"] == pairs[1]["chosen"] == [{"role": "assistant", "content": rec["messages"][6]["content"]}]
    assert [p["rejected"][0]["content"] for p in pairs] == [d["text"] for d in rec["dropped"]]


def test_records_that_cannot_give_pairs_are_left_out_and_counted():
    leak = trajectory(1)
    leak["messages"][3]["content"] += "\n\n" + leak["hints"][0]["text"]   # a hint left in the conversation
    wrong_end = trajectory(2, answer="B")
    wrong_end["answer"] = "D"                                               # accepted, yet ends on a wrong answer
    bad_dropped = trajectory(3)
    bad_dropped["dropped"][0]["after_turn"] = 7                            # no kept turn follows it
    bad_dropped["dropped"][1]["text"] = "I think A."                       # not a protocol turn
    same = trajectory(4)
    same["dropped"][1]["text"] = same["messages"][6]["content"]
    records = [trajectory(0), trajectory(5, accepted=False), {"schema": "other"}, leak, wrong_end, bad_dropped,
               same]
    pairs, stats = dropped_pairs(records)
    assert sorted({p["qid"] for p in pairs}) == ["q0", "q4"] and len(pairs) == 3
    assert stats.records == 7 and stats.accepted == 5
    assert stats.skipped == {"not_accepted": 1, "not_a_trajectory": 1, "lint": 2, "no_turn_after_dropped": 1,
                             "dropped_turn_invalid": 1, "same_as_chosen": 1}
    assert stats.lint["hint_leak"] == 1 and stats.lint["wrong_answer"] == 1
    assert all(no_hint(p, next(r for r in records if r.get("qid") == p["qid"])) for p in pairs)


# -- LLM-written wrong turns --------------------------------------------------------------

VALID_WRONG = ("<think>The call comes first, then he leaves; in clip (2, 1, 3) he picks up a hat on the way "
               "out.</think>\n<answer>D</answer>")


def scripted(*replies):
    """A fake LLM that gives these replies in order (the last one from then on)."""
    seen = []

    def reply(body):
        seen.append(body)
        return replies[min(len(seen), len(replies)) - 1]

    return reply


def wrong_turns(records, server, **kw):
    from lvr.prep.models.openai_backend import OpenAIChat

    async def go():
        model = OpenAIChat("writer", server.url, max_retries=0)
        try:
            return await make_wrong_turns(records, model, **kw)
        finally:
            await model.aclose()

    return asyncio.run(go())


def test_a_wrong_turn_is_checked_and_asked_again_until_it_is_usable():
    multi = trajectory(7, category="multi")
    single = trajectory(8, category="single")
    bad_format = "The answer is D."                                  # no <think>, no <answer>
    right_answer = "<think>He picks up a book after the call.</think>\n<answer>B</answer>"
    with FakeOpenAI(scripted(bad_format, right_answer, VALID_WRONG)) as server:
        pairs, stats = wrong_turns([multi, single], server)
        sent = list(server.requests)
    # Only the multi-segment question, once per refused reply, then the usable one.
    assert len(sent) == 3 and stats.targets == 1 and stats.made == 1 and stats.attempts == 3
    assert not stats.failed and sum(stats.refused.values()) == 2
    (pair,) = pairs
    msgs = multi["messages"]
    assert pair["source"] == SOURCE_WRONG and pair["qid"] == "q7" and pair["model"] == "writer"
    assert pair["prompt"] == msgs[:6] and pair["turn"] == 3
    assert pair["chosen"] == [{"role": "assistant", "content": msgs[6]["content"]}]
    assert pair["rejected"] == [{"role": "assistant", "content": VALID_WRONG}]
    assert no_hint(pair, multi)
    # The request: the one prompt, the conversation so far, the correct turn, the wrong options.
    first = sent[0]["messages"]
    assert first[0] == {"role": "system", "content": WRONG_TURN_SYSTEM}
    assert msgs[5]["content"] in first[1]["content"] and msgs[6]["content"] in first[1]["content"]
    assert "one of A, C, D" in first[1]["content"] and HINT_PREFIX not in json.dumps(first)
    # Each retry carries the refused reply and why it was refused.
    assert sent[1]["messages"][-2] == {"role": "assistant", "content": bad_format}
    assert "breaks the turn format" in sent[1]["messages"][-1]["content"]
    assert sent[2]["messages"][-2]["content"] == right_answer
    assert "is the correct one" in sent[2]["messages"][-1]["content"]


def test_a_model_that_never_writes_a_usable_turn_is_reported():
    multi = trajectory(9, category="multi")
    with FakeOpenAI(scripted(multi["messages"][6]["content"])) as server:     # always the correct turn itself
        pairs, stats = wrong_turns([multi], server, attempts=2)
        assert len(server.requests) == 2
    assert pairs == [] and stats.made == 0 and len(stats.failed) == 1
    assert stats.failed[0].startswith("q9 turn 3: it is the correct turn itself")


def test_wrong_turns_at_every_turn_check_tool_calls():
    multi = trajectory(10, category="multi")
    msgs = multi["messages"]

    def reply(body):
        correct = body["messages"][1]["content"].split("The correct next turn:\n", 1)[1]
        if "<answer>" in correct:
            return VALID_WRONG
        if "(2, 1, 3)" in correct:
            return "<think>The book must be elsewhere: low clip 1.</think>\n<tool>get_caption((2, 1, 1))</tool>"
        return "<think>The call is surely in clip (3,).</think>\n<tool>get_caption((3, 2))</tool>"

    with FakeOpenAI(reply) as server:
        pairs, stats = wrong_turns([multi], server, at="all")
    assert stats.targets == 3 and [p["turn"] for p in sorted(pairs, key=lambda p: p["turn"])] == [1, 2, 3]
    by_turn = {p["turn"]: p for p in pairs}
    assert by_turn[1]["prompt"] == msgs[:2] and by_turn[2]["prompt"] == msgs[:4]
    assert "get_caption((3, 2))" in by_turn[1]["rejected"][0]["content"]

    # The checks themselves, at the second turn (the correct call is get_caption((2, 1, 3))).
    def why(text):
        return check_wrong_turn(text, chosen=msgs[4]["content"], prompt=msgs[:4], k=K, options=OPTIONS,
                                answer="B", kind="tool")

    assert why("<think>x</think><tool>get_caption((2, 1, 3))</tool>").startswith("it makes the same call")
    assert why('<think>x</think><tool>video_qa((2, 1, 2), "what?")</tool>').startswith("video_qa on (2, 1, 2)")
    assert why("<think>x</think><tool>get_caption((9, 1))</tool>").startswith("it breaks the turn format")
    assert why("<think>Too early, but B.</think><answer>B</answer>").startswith("its answer 'B' is the correct")
    assert why("<think>Too early: D.</think><answer>D</answer>") is None
    assert why("<think>Clip 2 instead.</think><tool>get_caption((2, 1, 2))</tool>") is None
    assert why("<think>x</think><answer>E</answer>") == "its answer picks none of the options"
    # An answer turn must stay an answer turn.
    request = wrong_turn_request(msgs[:6], msgs[6]["content"], kind="answer", options=OPTIONS, answer="B")
    assert "one of A, C, D" in request[1]["content"]
    assert check_wrong_turn("<think>x</think><tool>get_caption((2, 2))</tool>", chosen=msgs[6]["content"],
                            prompt=msgs[:6], k=K, options=OPTIONS, answer="B", kind="answer").startswith("it calls")
    assert parse_turn(VALID_WRONG, K).answer == "D"


# -- the command --------------------------------------------------------------------------

def test_export_pairs_command_with_wrong_turns_and_resume(tmp_path):
    traj = write_jsonl(tmp_path / "traj.jsonl", [trajectory(0), trajectory(1, category="multi"),
                                                  trajectory(2, accepted=False)])
    out = tmp_path / "pairs.jsonl"
    proc = run_lvr("synthesize", "--export-pairs", traj, "-o", out)
    assert proc.returncode == 0, proc.stderr
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(p["qid"], p["source"]) for p in pairs] == [("q0", SOURCE_DROPPED)] * 2 + [("q1", SOURCE_DROPPED)] * 2
    assert "4 pairs written (4 from dropped turns) from 3 trajectories (2 accepted; left out: not_accepted 1)" \
        in proc.stderr

    # Wrong turns for the multi-segment question, into a new file; a rerun skips what is there.
    out2 = tmp_path / "pairs2.jsonl"
    with FakeOpenAI(scripted("no format", VALID_WRONG), models=("writer",)) as server:
        proc = run_lvr("synthesize", "--export-pairs", traj, "--wrong-turns", "--model", "writer", "--base-url",
                       server.url, "-o", out2)
        assert proc.returncode == 0, proc.stderr
        assert len(server.requests) == 2
        again = run_lvr("synthesize", "--export-pairs", traj, "--wrong-turns", "--model", "writer", "--base-url",
                        server.url, "-o", out2)
        assert again.returncode == 0, again.stderr
        assert len(server.requests) == 2 and "2 already in the output" in again.stderr
    pairs = [json.loads(x) for x in out2.read_text().splitlines()]
    assert sorted((p["qid"], p["source"]) for p in pairs) == [("q0", SOURCE_DROPPED)] * 2 + [
        ("q1", SOURCE_DROPPED)] * 2 + [("q1", SOURCE_WRONG)]
    assert "1 LLM-written wrong turns for 1 turns of multi-segment questions" in proc.stderr

    # Usage errors: one line, exit 2.
    for args, message in ((["--wrong-turns"], "needs --model"), (["--wrong-turns-at", "middle"], "answer or all")):
        proc = run_lvr("synthesize", "--export-pairs", traj, *args, "-o", tmp_path / "x.jsonl")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # An LLM that never writes a usable wrong turn: exit 1, and that trajectory is held back whole, so a
    # rerun with a better model completes it.
    out3 = tmp_path / "pairs3.jsonl"
    with FakeOpenAI("never a turn", models=("writer",)) as server:
        proc = run_lvr("synthesize", "--export-pairs", traj, "--wrong-turns", "--model", "writer", "--base-url",
                       server.url, "-o", out3)
    assert proc.returncode == 1 and "error: no wrong turn for q1 turn 3: it breaks the turn format" in proc.stderr
    assert "1 trajectories not written for want of a wrong turn (q1)" in proc.stderr
    assert [json.loads(x)["qid"] for x in out3.read_text().splitlines()] == ["q0", "q0"]
    with FakeOpenAI(VALID_WRONG, models=("writer",)) as server:
        proc = run_lvr("synthesize", "--export-pairs", traj, "--wrong-turns", "--model", "writer", "--base-url",
                       server.url, "-o", out3)
        assert proc.returncode == 0 and len(server.requests) == 1, proc.stderr
    assert sorted(json.loads(x)["source"] for x in out3.read_text().splitlines()[2:]) == [SOURCE_DROPPED] * 2 + [
        SOURCE_WRONG]


# -- end to end: a teacher wrong twice in a row, then right --------------------------------

TEACHER = [
    "<think>Start with the first medium clip.</think><tool>get_caption((1, 1))</tool>",
    "<think>It must be A.</think><answer>A</answer>",
    "<think>Then C.</think><answer>C</answer>",
    "<think>With the medium hint, B fits.</think><answer>B</answer>",
]


def teacher(body: dict) -> str:
    if body["model"] == "captioner":
        return "<caption>Numbers on screen.</caption>"
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    hints = sum(m["content"].count(HINT_PREFIX) for m in body["messages"] if m["role"] == "user")
    return TEACHER[turns + hints]


def test_synthesize_wrong_twice_then_right_gives_two_pairs(numbered_video, tmp_path):
    (tmp_path / "numbers.mp4").write_bytes(numbered_video.read_bytes())
    item = {"schema": "lvr.qa/1", "id": "item1", "video": "numbers.mp4", "question": "Which number?",
            "options": ["A. one", "B. two", "C. three"], "answer": "B", "clues": [[3.2, 4.4]]}
    write_jsonl(tmp_path / "qa.jsonl", [item])
    traj, out = tmp_path / "traj.jsonl", tmp_path / "pairs.jsonl"
    with FakeOpenAI(teacher, models=("teacher", "captioner")) as server:
        proc = run_lvr("synthesize", "qa.jsonl", "--teacher-model", "teacher", "--base-url", server.url,
                       "--caption-model", "captioner", "--cache-dir", tmp_path / "cache", "-o", traj, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(x) for x in traj.read_text().splitlines()]
    assert rec["accepted"] and [d["after_turn"] for d in rec["dropped"]] == [1, 1]
    proc = run_lvr("synthesize", "--export-pairs", traj, "-o", out)
    assert proc.returncode == 0, proc.stderr
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(pairs) == 2
    assert pairs[0]["prompt"] == pairs[1]["prompt"] == rec["messages"][:4]
    assert [p["rejected"][0]["content"] for p in pairs] == [TEACHER[1], TEACHER[2]]
    assert all(p["chosen"][0]["content"] == TEACHER[3] for p in pairs)
    assert HINT_PREFIX not in out.read_text() and all(h["text"] not in out.read_text() for h in rec["hints"])

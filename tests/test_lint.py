"""`lvr synthesize --lint`: every planted rule breach is found, with its line number and counts, in
trajectories and in the released LongVideo-R1 SFT data (built with test_released_data's fixture builders)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lvr_test_helpers import run_lvr
from test_released_data import SYSTEM_K5, alpaca_samples, first_turn, sharegpt_sample, write_json_list

from lvr.infer.benchmarks import EvalFormatError
from lvr.infer.profiles import LONGVIDEO_R1, LONGVIDEO_R1_PROFILE
from lvr.infer.protocol import (DEFAULT_SYSTEM_PROMPT, Breach, first_user_message, system_prompt,
                                tool_result_message)
from lvr.prep.models.base import text_messages
from lvr.train.lint import (HINT_PREFIX, LintFileError, LintReport, lint_file, lint_records, lint_released_sample,
                            lint_trajectory)

K = 4
DURATION = 400.0
QUESTION = "What does the man pick up after the phone rings?"
OPTIONS = ["A. a cup", "B. a book", "C. keys", "D. a hat"]
HIGH = [((h,), (h - 1) * 100.0, h * 100.0 - 0.5, f"High clip {h}: a kitchen, scene {h}.") for h in range(1, K + 1)]
HINT = f"{HINT_PREFIX} the evidence lies in high clip (3,)."


def caption_result(node, text):
    return tool_result_message("get_caption", node, 200.0, 225.0, text)


GOOD_TURNS = [
    ("<think>The phone is in clip 3.</think>\n<tool>get_caption((3, 2))</tool>",
     caption_result((3, 2), "A phone rings; a man walks to the table.")),
    ("<think>Closer.</think>\n<tool>get_caption((3, 2, 1))</tool>",
     caption_result((3, 2, 1), "The man reaches for something small and shiny.")),
    ('<think>Verify with the frames.</think>\n<tool>video_qa((3, 2, 1), "What does he pick up?")</tool>',
     tool_result_message("video_qa", (3, 2, 1), 200.0, 203.1, "A set of keys.", query="What does he pick up?")),
    ("<think>He picks up keys.</think>\n<answer>C</answer>", None),
]


def trajectory(turns=GOOD_TURNS, *, qid="q1", accepted=True, hints=True, answer="C", **extra):
    messages = [{"role": "system", "content": system_prompt(DEFAULT_SYSTEM_PROMPT, K)},
                {"role": "user", "content": first_user_message(QUESTION, OPTIONS, DURATION, HIGH)}]
    for text, result in turns:
        messages.append({"role": "assistant", "content": text})
        if result is not None:
            messages.append({"role": "user", "content": result})
    rec = {"schema": "lvr.trajectory/1", "qid": qid, "video": "v.mp4", "video_id": "abc", "K": K,
           "duration": DURATION, "question": QUESTION, "options": OPTIONS, "answer": answer,
           "clues": [[205.0, 210.0]], "accepted": accepted, "correct": accepted, "stopped": "answered",
           "attempts": 2, "messages": messages,
           "hints": [{"level": 1, "after_turn": 1, "ids": [[3]], "text": HINT}] if hints else [],
           "dropped": []}
    rec.update(extra)
    return rec


def replace_turn(n, text, result="KEEP"):
    """GOOD_TURNS with assistant turn n (1-based) replaced."""
    turns = list(GOOD_TURNS)
    turns[n - 1] = (text, turns[n - 1][1] if result == "KEEP" else result)
    return turns


def codes(issues):
    return sorted(i.code for i in issues)


def test_clean_trajectory_has_no_issues():
    assert lint_trajectory(trajectory(), 1) == []


@pytest.mark.parametrize("turns, code, turn", [
    (replace_turn(2, "<tool>get_caption((3, 2, 1))</tool>"), Breach.NO_THINK, 2),
    (replace_turn(1, "<think>Two.</think><tool>get_caption((3, 2))</tool><tool>get_caption((3, 3))</tool>"),
     Breach.TWO_ACTIONS, 1),
    (replace_turn(1, "<think>Far.</think><tool>get_caption((5, 1))</tool>"), Breach.OUT_OF_RANGE, 1),
    (replace_turn(1, "<think>Zero.</think><tool>get_caption((0, 1))</tool>"), Breach.OUT_OF_RANGE, 1),
    (replace_turn(1, "<think>Nothing.</think> I am not sure."), Breach.NO_ACTION, 1),
    (replace_turn(1, "<think>Hm.</think><tool>search((3, 2))</tool>"), Breach.UNKNOWN_TOOL, 1),
    (replace_turn(1, "<think>Hm.</think><tool>get_caption((3,))</tool>"), Breach.WRONG_DEPTH, 1),
    (replace_turn(1, "<think>Hm.</think><tool>get_caption(__import__('os'))</tool>"), Breach.CODE_IN_ARGUMENTS, 1),
    (replace_turn(2, "<think>Skip the caption.</think><tool>get_caption((3, 2))</tool>"),
     Breach.QA_BEFORE_CAPTION, 3),
    (replace_turn(4, "<think>Done.</think><answer>   </answer>"), Breach.EMPTY_ANSWER, 4),
])
def test_each_protocol_breach_is_found(turns, code, turn):
    issues = lint_trajectory(trajectory(turns), 7)
    assert code in codes(issues)
    hit = next(i for i in issues if i.code == code)
    assert (hit.line, hit.qid, hit.turn) == (7, "q1", turn)
    assert hit.detail


def test_video_qa_needs_the_caption_of_that_leaf_in_an_earlier_turn():
    # The caption of a sibling leaf does not count.
    turns = replace_turn(2, "<think>Sibling.</think>\n<tool>get_caption((3, 2, 2))</tool>")
    assert codes(lint_trajectory(trajectory(turns), 1)) == [Breach.QA_BEFORE_CAPTION]
    # A caption fetched after the video_qa does not count either.
    turns = [GOOD_TURNS[0], GOOD_TURNS[2], GOOD_TURNS[1], GOOD_TURNS[3]]
    issues = lint_trajectory(trajectory(turns), 1)
    assert [(i.code, i.turn) for i in issues] == [(Breach.QA_BEFORE_CAPTION, 2)]


def test_no_answer():
    ends_on_tool = trajectory(GOOD_TURNS[:3])   # last result present, no final turn
    issues = lint_trajectory(ends_on_tool, 3)
    assert codes(issues) == ["no_answer"]
    cut = trajectory([GOOD_TURNS[0], (GOOD_TURNS[1][0], None)])   # ends on a tool call
    issues = lint_trajectory(cut, 3)
    assert [(i.code, i.turn) for i in issues] == [("no_answer", 2)]
    # An answer whose format is broken is reported by its breach, not as a missing answer.
    assert codes(lint_trajectory(trajectory(replace_turn(4, "<answer>C</answer>")), 1)) == [Breach.NO_THINK]


def test_answer_before_the_end_and_wrong_answer():
    early = [GOOD_TURNS[0], ("<think>Guess.</think><answer>A</answer>", "Wrong."), *GOOD_TURNS[1:]]
    assert codes(lint_trajectory(trajectory(early), 1)) == ["answer_before_end"]
    wrong = replace_turn(4, "<think>A cup.</think><answer>A</answer>")
    assert codes(lint_trajectory(trajectory(wrong), 1)) == ["wrong_answer"]
    assert lint_trajectory(trajectory(wrong, accepted=False), 1) == []   # rejected: allowed to be wrong
    # Open questions: the same words, ignoring case and punctuation.
    open_turns = replace_turn(4, "<think>Keys.</think><answer>A set of keys.</answer>")
    assert lint_trajectory(trajectory(open_turns, options=[], answer="a set of keys"), 1) == []
    assert codes(lint_trajectory(trajectory(open_turns, options=[], answer="a cup"), 1)) == ["wrong_answer"]


def test_an_accepted_grounding_record_must_end_on_an_interval_that_reaches_its_accept_iou():
    def grounding(answer, **extra):
        turns = replace_turn(4, f"<think>There.</think><answer>{answer}</answer>")
        fields = dict(task="grounding", options=[], answer=None, targets=[[200.0, 204.0]], accept_iou=0.5)
        return trajectory(turns, **{**fields, **extra})

    assert lint_trajectory(grounding("[200, 203]"), 1) == []                  # IoU 3/4
    low = lint_trajectory(grounding("[200, 210]"), 1)                           # IoU 4/10
    assert codes(low) == ["wrong_answer"] and "IoU 0.400 < accept_iou 0.5" in low[0].detail
    assert lint_trajectory(grounding("[200, 210]", accepted=False), 1) == []   # rejected: allowed to miss
    assert lint_trajectory(grounding("[200, 210]", accept_iou=0.4), 1) == []
    assert "not a usable interval (reversed_interval)" in lint_trajectory(grounding("[204, 200]"), 1)[0].detail
    assert "not a usable interval" in lint_trajectory(grounding("[390, 400.2]"), 1)[0].detail   # past 400 s
    assert "no usable 'targets'" in lint_trajectory(grounding("[200, 203]", accept_iou=None), 1)[0].detail


def test_hint_text_or_marker_anywhere_is_a_leak():
    leak = replace_turn(4, f"<think>{HINT} So keys.</think><answer>C</answer>")
    issues = lint_trajectory(trajectory(leak), 2)
    assert [(i.code, i.turn) for i in issues] == [("hint_leak", 4)]
    # In a user turn (a tool result with the hint appended): no assistant turn number.
    rec = trajectory()
    rec["messages"][3]["content"] += "\n\n" + HINT
    issues = lint_trajectory(rec, 2)
    assert [(i.code, i.turn) for i in issues] == [("hint_leak", None)]
    assert "messages[3] (user)" in issues[0].detail
    # The marker alone is enough, even when the record lists no hints.
    rec = trajectory(replace_turn(1, f"<think>{HINT_PREFIX} clip 3.</think><tool>get_caption((3, 2))</tool>"),
                     hints=False)
    assert codes(lint_trajectory(rec, 1)) == ["hint_leak"]


def test_roles_and_record_shape():
    rec = trajectory()
    rec["messages"].insert(3, {"role": "user", "content": "extra"})
    assert "bad_roles" in codes(lint_trajectory(rec, 1))
    rec = trajectory()
    rec["messages"][0]["role"] = "user"
    assert "bad_roles" in codes(lint_trajectory(rec, 1))
    assert codes(lint_trajectory(trajectory(schema="lvr.question/1"), 1)) == ["bad_schema"]
    assert codes(lint_trajectory(trajectory(K="6"), 1)) == ["bad_record"]
    assert codes(lint_trajectory(trajectory(messages="nope"), 1)) == ["bad_record"]
    rec = trajectory()
    rec["messages"][2]["content"] = [{"type": "text", "text": "x"}]
    assert codes(lint_trajectory(rec, 1)) == ["bad_record"]


def longvideo_r1_trajectory(settings=None, **extra):
    """GOOD_TURNS as the longvideo-r1 profile lays them out, the answer in the last round: the
    last-round notice is a user message of its own after the video_qa result."""
    profile = LONGVIDEO_R1_PROFILE
    messages = [{"role": "system", "content": profile.system_message("Navigate a tree of width {width}.", K)},
                {"role": "user", "content": profile.first_user_content(QUESTION, OPTIONS, DURATION, HIGH)}]
    results = [("get_caption", (3, 2), None, "A phone rings."), ("get_caption", (3, 2, 1), None, "A hand."),
               ("video_qa", (3, 2, 1), "What does he pick up?", "A set of keys.")]
    for (text, _), (tool, node, query, result) in zip(GOOD_TURNS, results):
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": profile.tool_result(tool, node, 200.0, 203.1, result, query)})
    profile.add_last_round(messages)
    messages.append({"role": "assistant", "content": GOOD_TURNS[-1][0]})
    settings = {"protocol": LONGVIDEO_R1} if settings is None else settings
    return trajectory(messages=text_messages(messages), settings=settings, **extra)


def test_longvideo_r1_last_round_notice_is_its_own_user_message():
    rec = longvideo_r1_trajectory()
    roles = [m["role"] for m in rec["messages"]]
    assert roles[-3:] == ["user", "user", "assistant"]
    assert rec["messages"][-2]["content"] == LONGVIDEO_R1_PROFILE.last_round
    assert lint_trajectory(rec, 1) == []
    # A rejected record that gave up on the last round ends on the notice: no answer, roles fine.
    gave_up = longvideo_r1_trajectory(accepted=False)
    gave_up["messages"].pop()
    assert codes(lint_trajectory(gave_up, 1)) == ["no_answer"]


def with_notice(settings=None, *, text=None, move_to=None, extra_user=False):
    """A longvideo-r1 trajectory with its notice changed: other settings, other text, moved, or doubled."""
    rec = longvideo_r1_trajectory(settings)
    messages = rec["messages"]
    if text is not None:
        messages[-2]["content"] = text
    if move_to is not None:
        messages.insert(move_to, messages.pop(-2))
    if extra_user:
        messages.insert(-2, {"role": "user", "content": "extra"})
    return rec


@pytest.mark.parametrize("rec", [
    # The lvr profile appends the notice to the last user message; a record without a protocol is lvr's.
    with_notice({"protocol": "lvr"}),
    with_notice({}),
    with_notice(text="Answer now."),                  # other text in the notice's place
    with_notice(move_to=3),                           # the notice before an earlier assistant turn
    with_notice(extra_user=True),                     # three user messages in a row
], ids=["lvr", "no-protocol", "other-text", "moved", "three-users"])
def test_two_user_messages_are_bad_roles_unless_the_profile_sends_the_notice_so(rec):
    assert "bad_roles" in codes(lint_trajectory(rec, 1))


def write_planted(path: Path) -> dict[str, list[int]]:
    """One planted error per line; returns code -> the lines that carry it."""
    lines = [
        json.dumps(trajectory(qid="ok-1")),                                                          # 1
        json.dumps(trajectory(replace_turn(1, "<tool>get_caption((3, 2))</tool>"), qid="think")),     # 2
        json.dumps(trajectory(replace_turn(1, "<think>x</think><tool>get_caption((3, 2))</tool>"
                                              "<tool>get_caption((3, 3))</tool>"), qid="two")),        # 3
        "",                                                                                          # 4 blank
        json.dumps(trajectory(replace_turn(1, "<think>x</think><tool>get_caption((9, 1))</tool>"),
                              qid="range")),                                                         # 5
        json.dumps(trajectory(replace_turn(2, "<think>x</think><tool>get_caption((3, 2))</tool>"),
                              qid="qa")),                                                            # 6
        json.dumps(trajectory(GOOD_TURNS[:3], qid="noanswer")),                                      # 7
        json.dumps(trajectory(replace_turn(4, f"<think>{HINT}</think><answer>C</answer>"), qid="hint")),  # 8
        '{"schema": "lvr.trajectory/1", "qid": "broken", ',                                          # 9
        json.dumps(trajectory(replace_turn(1, "<tool>get_caption((3, 2))</tool>"), qid="rejected",
                              accepted=False)),                                                      # 10
        json.dumps(trajectory(qid="ok-1")),                                                          # 11 dup
        json.dumps(trajectory(qid="ok-2")),                                                          # 12
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"no_think": [2], "two_actions": [3], "out_of_range": [5], "qa_before_caption": [6],
            "no_answer": [7], "hint_leak": [8], "not_json": [9], "duplicate_qid": [11]}


def test_lint_finds_each_planted_error_in_a_file(tmp_path):
    path = tmp_path / "traj.jsonl"
    planted = write_planted(path)
    report = lint_file(path)
    assert isinstance(report, LintReport)
    assert report.counts() == {code: len(lines) for code, lines in planted.items()}
    for code, lines in planted.items():
        assert sorted(i.line for i in report.issues if i.code == code) == lines, code
    assert report.offending_lines() == sorted(x for lines in planted.values() for x in lines)
    assert (report.records, report.rejected, report.rejected_skipped) == (11, 1, 1)
    assert report.clean == 2           # lines 1 and 12
    text = report.lines()
    assert f"{path}:2: think turn 1: no_think: " in "\n".join(text)
    assert any(t.startswith(f"{path}:9: not_json: not JSON") for t in text)
    assert any(t.startswith(f"{path}:8: hint turn 4: hint_leak:") for t in text)
    summary = report.summary()
    assert "11 records" in summary and "2 clean" in summary and "lines: 2, 3, 5, 6, 7, 8, 9, 11" in summary
    assert "1 rejected not linted" in summary
    assert json.loads(json.dumps(report.to_record()))["counts"]["no_think"] == 1


def test_rejected_records_are_linted_on_request(tmp_path):
    path = tmp_path / "traj.jsonl"
    write_planted(path)
    report = lint_file(path, include_rejected=True)
    assert [i.line for i in report.issues if i.code == "no_think"] == [2, 10]
    assert report.rejected_skipped == 0 and report.rejected == 1


def test_stdin_and_unreadable(tmp_path):
    text = json.dumps(trajectory()) + "\nnot json\n"
    report = lint_file("-", stdin=io.StringIO(text))
    assert report.path == "-" and report.counts() == {"not_json": 1}
    assert report.lines() == ["-:2: not_json: not JSON (Expecting value)"]
    assert lint_records([json.dumps(trajectory())]).ok
    with pytest.raises(EvalFormatError, match="cannot open"):
        lint_file(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="is a directory"):     # LintFileError is both
        lint_file(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(LintFileError, match="not UTF-8"):
        lint_file(tmp_path / "latin1.jsonl")


def test_hint_marker_is_the_one_hints_use():
    from lvr.train import hints
    assert hints.HINT_PREFIX == HINT_PREFIX


# -- the released LongVideo-R1 SFT data -------------------------------------------------------------

SYSTEM = "Navigate a caption tree of width 4."


def released(question, *, turns, k=4):
    """A sharegpt sample in the release's layout: the first turn, then (assistant turn, tool result)
    pairs; a pair whose result is None ends the sample (a fragment may end on a tool call)."""
    conversations = [{"from": "human", "value": first_turn(question, k)}]
    for text, result in turns:
        conversations.append({"from": "gpt", "value": text})
        if result is not None:
            conversations.append({"from": "human", "value": result})
    return {"system": SYSTEM, "conversations": conversations}


def qa_result(text):
    return LONGVIDEO_R1_PROFILE.tool_result("video_qa", (2, 3, 1), 5.0, 5.3, text, "What is held?")


CAPTION_MEDIUM = LONGVIDEO_R1_PROFILE.tool_result("get_caption", (2, 3), 5.0, 6.0, "A hand.")
CAPTION_LOW = LONGVIDEO_R1_PROFILE.tool_result("get_caption", (2, 3, 1), 5.0, 5.3, "A key.")
VERIFIED = [("<think>Clip 2.</think><tool>get_caption((2, 3))</tool>", CAPTION_MEDIUM),
            ("<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>", CAPTION_LOW),
            ('<think>Check.</think><tool>video_qa((2, 3, 1), "What is held?")</tool>', qa_result("A key.")),
            ("<think>A key.</think><answer>B</answer>", None)]


def test_released_sft_file_lints_clean_end_to_end(tmp_path):
    """Both LLaMA-Factory layouts, per-turn fragments ending on tool calls, a video_qa after its
    leaf's caption, and a K=5 sample whose ids go up to 5: all clean through `lvr synthesize --lint`."""
    path = write_json_list(tmp_path / "longvideor1-sft-qwen3-llamafactory.json", [
        *alpaca_samples("q1"),                                        # lines 2-4; the first two end on a tool call
        sharegpt_sample("q2", SYSTEM_K5, k=5),                        # line 5
        released("q3", turns=VERIFIED),                               # line 6
        released("q4", k=5, turns=[("<think>Last.</think><tool>get_caption((5, 5, 5))</tool>", None)]),  # line 7
    ])
    report = lint_file(path)
    assert (report.rules, report.records, report.clean, report.issues, report.partial) == (
        "released-sft", 6, 6, [], 0)
    proc = run_lvr("synthesize", "--lint", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "lvr synthesize --lint: 6 released SFT samples, 6 clean; no problems" in proc.stderr
    assert "rules: released LongVideo-R1 SFT samples" in proc.stderr
    assert "answer and qid rules are skipped" in proc.stderr


def test_released_samples_with_problems_are_named_by_file_line_and_index(tmp_path):
    bad_call = released("q2", turns=[("<think>Clip 2.</think><tool>get_caption((2 3))</tool>", None)])
    path = write_json_list(tmp_path / "sft.json", [*alpaca_samples("q1"), bad_call, [1, 2], {"instruction": "q"}])
    proc = run_lvr("synthesize", "--lint", path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:5: sample[3] turn 1: malformed_call: The tool call get_caption((2 3))")
    assert lines[1] == f"{path}:6: sample[4]: not_json: not a JSON object"
    assert lines[2].startswith(f"{path}:7: sample[5]: bad_record: not a LLaMA-Factory SFT sample")
    assert "lvr synthesize --lint: 6 released SFT samples, 3 clean; bad_record 1, malformed_call 1, not_json 1" \
        in proc.stderr


def at(sample: dict, n: int, text: str) -> dict:
    """The sample with its n-th gpt turn (1-based) replaced."""
    conversations = [dict(t) for t in sample["conversations"]]
    gpt = [i for i, t in enumerate(conversations) if t["from"] == "gpt"]
    conversations[gpt[n - 1]]["value"] = text
    return {**sample, "conversations": conversations}


@pytest.mark.parametrize("sample, code, turn", [
    # K is the number of high-level captions of the sample's first turn: 4 here, so 5 is out of range.
    (released("q", turns=[("<think>Far.</think><tool>get_caption((5, 1))</tool>", None)]), Breach.OUT_OF_RANGE, 1),
    (at(released("q", turns=VERIFIED), 2, "<think>Sibling.</think><tool>get_caption((2, 3, 2))</tool>"),
     Breach.QA_BEFORE_CAPTION, 3),
    (at(released("q", turns=VERIFIED), 1, "<think>Guess.</think><answer>A</answer>"), "answer_before_end", 1),
    (at(released("q", turns=VERIFIED), 4, "<think>Done.</think>"), Breach.NO_ACTION, 4),
    (at(released("q", turns=VERIFIED), 1, f"<think>{HINT}</think><tool>get_caption((2, 3))</tool>"), "hint_leak", 1),
    ({"system": SYSTEM, "conversations": [{"from": "gpt", "value": "<think>x</think><answer>B</answer>"}]},
     "bad_record", None),
], ids=["out-of-range", "qa-before-caption", "answer-before-end", "no-action", "hint", "roles"])
def test_each_turn_rule_applies_to_released_samples(sample, code, turn):
    issues, _ = lint_released_sample(sample, 9, 3)
    assert code in codes(issues)
    hit = next(i for i in issues if i.code == code)
    assert (hit.line, hit.sample, hit.qid, hit.turn) == (9, 3, None, turn) and hit.detail


def test_a_released_sample_without_the_first_turn_is_linted_as_a_fragment(tmp_path):
    """No high-level captions: K is unknown and the earlier captions unseen, so neither the id range
    nor the video_qa order can be judged; the report counts such samples."""
    mid = {"system": SYSTEM, "instruction": CAPTION_LOW, "input": "",
           "output": '<think>Check.</think><tool>video_qa((9, 3, 1), "What is held?")</tool>'}
    report = lint_file(write_json_list(tmp_path / "sft.json", [mid]))
    assert (report.issues, report.clean, report.partial) == ([], 1, 1)
    assert "1 sample(s) start mid-episode" in report.summary()


def test_a_json_list_that_is_not_sft_data_is_refused_whole(tmp_path):
    path = write_json_list(tmp_path / "rows.json", [{"question": "q"}, 3])
    with pytest.raises(LintFileError, match="no LLaMA-Factory SFT sample"):
        lint_file(path)
    (tmp_path / "cut.json").write_text('[\n{"conversations": []},\n{"instruction": ', encoding="utf-8")
    with pytest.raises(LintFileError, match=r"cut\.json:3: not JSON"):
        lint_file(tmp_path / "cut.json")
    proc = run_lvr("synthesize", "--lint", path)
    assert proc.returncode == 2 and proc.stderr.count(str(path)) == 1

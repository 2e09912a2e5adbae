"""QA items for trajectory synthesis: the native lvr.qa/1 format and the CG-Bench adapter."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvr.train.qa_items import QA_FORMATS, QAFormatError, QAItem, load_qa_items, validate_clues


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def native(**over):
    rec = {"schema": "lvr.qa/1", "id": "q1", "video": "talks/keynote.mp4", "question": "What is announced last?",
           "options": ["A phone", "A watch", "A laptop", "A tablet"], "answer": "C",
           "clues": [[3130.0, 3160.5], [3290, 3300]], "category": "recall"}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


# A CG-Bench cgbench_mini.json excerpt: a JSON list; the field names are CG-Bench's own.
CGBENCH = """[
  {
    "qid": 1001,
    "video_uid": "c1f0a3b2",
    "question": "What color is the car that stops at the gate?",
    "choices": ["Red", "Blue", "White", "Black", "Silver"],
    "right_answer": "B",
    "answer": "Blue",
    "clue_intervals": [[120.5, 131.0], [133.0, 140.0]],
    "duration": 1834.2,
    "domain": "Life Record",
    "sub_category": "Object Attribute"
  },
  {
    "qid": 1002,
    "video_uid": "c1f0a3b2",
    "question": "How many people enter the house?",
    "choices": ["1", "2", "3", "4"],
    "answer": "3",
    "clue_intervals": [[600, 640]],
    "duration": 1834.2,
    "domain": "Life Record",
    "sub_category": "Counting"
  }
]
"""


def test_native_fields(tmp_path):
    items, errors = load_qa_items(jsonl(tmp_path / "qa.jsonl", native(),
                                        native(id=None, options=None, answer="The CEO", clues=[[1, 2]],
                                               category=["a", "b"], extra={"note": 1})))
    assert errors == []
    a, b = items
    assert a == QAItem("q1", "talks/keynote.mp4", "What is announced last?",
                       ("A. A phone", "B. A watch", "C. A laptop", "D. A tablet"), "C",
                       ((3130.0, 3160.5), (3290.0, 3300.0)), "recall", "native", {})
    assert all(isinstance(x, float) for pair in a.clues for x in pair)
    assert b.qid == "talks/keynote.mp4#2" and b.options == () and b.answer == "The CEO"
    assert b.category == "a, b" and b.extra == {"note": 1} and not b.is_multiple_choice


def test_answers_are_read_like_eval_answers(tmp_path):
    items, errors = load_qa_items(jsonl(tmp_path / "qa.jsonl",
                                        native(id="t", answer="a laptop"), native(id="p", answer="(C)"),
                                        native(id="l", options=["A. x", "B. y"], answer="B. y")))
    assert errors == [] and [i.answer for i in items] == ["C", "C", "B"]


def test_round_trip_through_to_record(tmp_path):
    items, _ = load_qa_items(jsonl(tmp_path / "a.jsonl", native(extra={"k": [1, 2]})))
    again, errors = load_qa_items(jsonl(tmp_path / "b.jsonl", items[0].to_record()))
    assert errors == [] and again == items
    assert items[0].to_record()["schema"] == "lvr.qa/1"


def test_question_records_are_accepted_with_or_without_clues(tmp_path):
    rec = native(schema="lvr.question/1", subtitles=True)
    items, errors = load_qa_items(jsonl(tmp_path / "q.jsonl", rec, native(schema="lvr.question/1", id="q2",
                                                                            clues=...)))
    assert errors == []
    assert [i.qid for i in items] == ["q1", "q2"] and items[0].extra == {"subtitles": True}
    assert items[0].clues == ((3130.0, 3160.5), (3290.0, 3300.0)) and items[1].clues == ()


@pytest.mark.parametrize("clues, reason", [
    (..., "missing 'clues'"),
    (None, "missing 'clues'"),
    ([], "'clues' is empty"),
])
def test_items_without_clues_load_but_required_clues_refuse_them(tmp_path, clues, reason):
    # `lvr rl` scores a clue-free item by its answer alone; where clues are required, none is an error.
    items, errors = load_qa_items(jsonl(tmp_path / "qa.jsonl", native(id="free", clues=clues)))
    assert errors == [] and [(i.qid, i.clues) for i in items] == [("free", ())]
    with pytest.raises(ValueError, match=reason):
        validate_clues(None if clues is ... else clues, required=True)
    assert validate_clues(None if clues is ... else clues, required=False) == ()


@pytest.mark.parametrize("clues, reason", [
    ("0-10", "'clues' must be a list of [start, end] pairs"),
    ([10, 20], "must be a list of [start, end] pairs, e.g. [[10, 20]]"),
    ([[10, 20, 30]], "clues[0] must be a [start, end] pair"),
    ([[5, 1]], "clues[0]: start 5 is not before end 1"),
    ([[3, 3]], "clues[0]: start 3 is not before end 3"),
    ([[0, 1], [-2, 4]], "clues[1]: start -2 is negative"),
    ([["1", 2]], "clues[0] start must be a number of seconds"),
    ([[True, 2]], "clues[0] start must be a number of seconds"),
    ([[0, 1e400]], "clues[0] end must be finite"),
    ([[0, None]], "clues[0] end must be a number of seconds"),
])
def test_clue_validation_names_the_bad_record(tmp_path, clues, reason):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(native(id="ok")) + "\n" + json.dumps(native(id="bad", clues=clues))
                    .replace("1e+400", "1e400") + "\n", encoding="utf-8")
    items, errors = load_qa_items(path)
    assert [i.qid for i in items] == ["ok"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: ") and reason in errors[0], errors


def test_bad_records_are_named_and_skipped(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl",
                 native(id="a"),
                 "{not json",
                 "[1, 2]",
                 native(id="b", video=...),
                 native(id="c", answer="E"),
                 native(id="a"),
                 native(id="d", schema="lvr.other/1"),
                 native(id="e", extra=[1]),
                 native(id="f"))
    items, errors = load_qa_items(path)
    assert [i.qid for i in items] == ["a", "f"]
    p = str(path)
    assert errors == [
        f"{p}:2: not JSON (Expecting property name enclosed in double quotes)",
        f"{p}:3: not a JSON object",
        f"{p}:4: missing 'video'",
        f"{p}:5: answer 'E' is not one of the options A-D",
        f"{p}:6: duplicate id 'a' (first at {p}:1)",
        f"{p}:7: schema 'lvr.other/1' is neither 'lvr.qa/1' nor 'lvr.question/1'",
        f"{p}:8: 'extra' must be a JSON object",
    ]


def test_cgbench_json_list(tmp_path):
    path = tmp_path / "cgbench_mini.json"
    path.write_text(CGBENCH, encoding="utf-8")
    items, errors = load_qa_items(path)
    assert errors == []
    a, b = items
    assert (a.qid, a.video, a.source) == ("1001", "c1f0a3b2", "cgbench")
    assert a.options == ("A. Red", "B. Blue", "C. White", "D. Black", "E. Silver")
    assert a.answer == "B" and a.clues == ((120.5, 131.0), (133.0, 140.0))
    assert a.category == "Object Attribute"
    assert a.extra == {"duration": 1834.2, "domain": "Life Record", "answer_text": "Blue",
                       "sub_category": "Object Attribute"}
    # No right_answer: the answer text is mapped to its letter ("3" is option C).
    assert b.answer == "C" and b.clues == ((600.0, 640.0),)
    assert load_qa_items(path, "cgbench") == (items, [])


def test_cgbench_errors_name_the_line_of_the_record(tmp_path):
    data = json.loads(CGBENCH)
    data[0]["clue_intervals"] = [[140.0, 131.0]]
    data[1]["right_answer"] = "F"
    path = tmp_path / "cg.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    items, errors = load_qa_items(path)
    assert items == []
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
    assert starts[0] == 2
    assert errors == [f"{path}:2: clue_intervals[0]: start 140 is not before end 131",
                      f"{path}:{starts[1]}: answer 'F' is not one of the options A-D"]


def test_cgbench_as_jsonl_and_stdin(tmp_path):
    data = json.loads(CGBENCH)
    text = "".join(json.dumps(r) + "\n" for r in data)
    items, errors = load_qa_items("-", stdin=io.StringIO(text))
    assert errors == [] and [i.qid for i in items] == ["1001", "1002"]
    # A CG-Bench record read as native is refused, not guessed.
    items, errors = load_qa_items(jsonl(tmp_path / "x.jsonl", data[0]), "native")
    assert items == [] and "missing 'video'" in errors[0]


def test_unreadable_files_raise(tmp_path):
    with pytest.raises(QAFormatError, match="cannot open"):
        load_qa_items(tmp_path / "missing.jsonl")
    with pytest.raises(QAFormatError, match="unknown QA format"):
        load_qa_items(tmp_path / "x.jsonl", "lvbench")
    with pytest.raises(QAFormatError, match="is a directory"):
        load_qa_items(tmp_path)
    with pytest.raises(QAFormatError, match="cannot tell the QA format"):
        load_qa_items(jsonl(tmp_path / "y.jsonl", {"foo": 1}))
    (tmp_path / "bad.json").write_text("[{\"a\": 1},", encoding="utf-8")
    with pytest.raises(QAFormatError, match="not JSON"):
        load_qa_items(tmp_path / "bad.json")
    assert load_qa_items(jsonl(tmp_path / "empty.jsonl")) == ([], [])
    assert QA_FORMATS == ("auto", "native", "cgbench", "longvideo-r1")


# ---------------------------------------------------------------- properties

seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
pairs = st.tuples(seconds, seconds).filter(lambda p: p[0] < p[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(pairs, min_size=1, max_size=6))
def test_valid_clues_are_kept_exactly(clues):
    assert validate_clues([list(p) for p in clues]) == tuple(clues)


@settings(max_examples=200, deadline=None)
@given(st.lists(pairs, max_size=4), st.tuples(seconds, seconds).filter(lambda p: p[0] >= p[1]),
       st.lists(pairs, max_size=4))
def test_any_backwards_pair_is_refused(before, bad, after):
    with pytest.raises(ValueError, match=rf"clues\[{len(before)}\]: start .* is not before end"):
        validate_clues([list(p) for p in [*before, bad, *after]])


text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(str.strip)


@settings(max_examples=100, deadline=None)
@given(qid=text, video=text, question=text, options=st.lists(text, min_size=0, max_size=5),
       clues=st.lists(pairs, min_size=1, max_size=3), data=st.data())
def test_records_round_trip(tmp_path_factory, qid, video, question, options, clues, data):
    opts = tuple(f"{'ABCDE'[i]}. {o.strip()}" for i, o in enumerate(options))
    answer = data.draw(st.sampled_from("ABCDE"[: len(opts)])) if opts else data.draw(text).strip()
    item = QAItem(qid.strip(), video.strip(), question.strip(), opts, answer, tuple(clues), None, "native", {})
    path = tmp_path_factory.mktemp("rt") / "qa.jsonl"
    path.write_text(json.dumps(item.to_record()) + "\n", encoding="utf-8")
    items, errors = load_qa_items(path, "native")
    assert errors == [] and items == [item]
    assert all(math.isfinite(x) for c in items[0].clues for x in c)


def test_the_examples_in_the_docs_load():
    import re
    doc = (Path(__file__).resolve().parents[1] / "docs" / "qa_format.md").read_text(encoding="utf-8")
    native_block, cgbench_block = re.findall(r"```json\n(.*?)```", doc, re.S)
    items, errors = load_qa_items("-", stdin=io.StringIO(native_block))
    assert errors == [] and [i.answer for i in items] == ["C", "B", "Fourier's law"]
    items, errors = load_qa_items("-", stdin=io.StringIO(cgbench_block))
    assert errors == [] and items[0].source == "cgbench" and items[0].answer == "B"

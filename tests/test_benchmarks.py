"""Question files for `lvr eval`: native format, LVBench, Video-MME and MLVU adapters, video resolution."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvr.infer.benchmarks import (
    EVAL_FORMATS,
    EvalFormatError,
    EvalItem,
    VideoNotFoundError,
    detect_format,
    load_eval_items,
    normalize_options,
    resolve_item_video,
    resolve_video,
    split_question_options,
)


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------- sample files

LVBENCH_VIDEO_1 = {
    "key": "sPGVcOEUd6k",
    "type": "documentary",
    "video_info": {"duration_minutes": 71.23, "fps": 29.97,
                   "resolution": {"width": 1280, "height": 720}},
    "qa": [
        {"uid": 1,
         "question": "What year appears in the caption at the start of the video?\n"
                     "(A) 1636\n(B) 1366\n(C) 1363\n(D) 1633",
         "answer": "A",
         "question_type": ["key information retrieval"],
         "time_reference": "00:15-00:19"},
        {"uid": 2,
         "question": "Why does the narrator return to the harbour after the storm?\n"
                     "(A) To repair the ship\n(B) To meet the mayor\n"
                     "(C) To record the damage to the fishing fleet\n(D) To leave the island",
         "answer": "C",
         "question_type": ["reasoning", "event understanding"],
         "time_reference": "41:02-43:40"},
    ],
}
LVBENCH_VIDEO_2 = {
    "key": "Cm73ma6Ibcs",
    "type": "sport",
    "video_info": {"duration_minutes": 103.5, "fps": 25.0,
                   "resolution": {"width": 1920, "height": 1080}},
    "qa": [
        {"uid": 3,
         "question": "What is the score when the first red card is shown?\n"
                     "(A) 0-0\n(B) 1-0\n(C) 1-1\n(D) 2-1",
         "answer": "B",
         "question_type": ["temporal grounding"],
         "time_reference": "1:12:07-1:12:30"},
        # a broken question: its options are missing
        {"uid": 4, "question": "Who scores the final goal?", "answer": "D",
         "question_type": ["entity recognition"], "time_reference": "1:40:00-1:41:10"},
    ],
}


def videomme_row(n: int, duration: str, video_id: str, **over) -> dict:
    row = {
        "video_id": f"{n:03d}",
        "duration": duration,
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": f"https://www.youtube.com/watch?v={video_id}",
        "videoID": video_id,
        "question_id": f"{n:03d}-1",
        "task_type": "Counting Problem",
        "question": "When the German Christmas tree is first decorated with apples, candles and "
                    "berries, which kind of decoration is most numerous?",
        "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are equally many."],
        "answer": "C",
    }
    row.update(over)
    return row


VIDEOMME_ROWS = [
    videomme_row(1, "short", "fFjv93ACGo8"),
    videomme_row(301, "medium", "Zz8aM-kN0f4", task_type="Temporal Reasoning", answer="A"),
    videomme_row(601, "long", "4Ifb2AoP8lA", domain="Film & Television", sub_category="Movie & TV Show",
                 task_type="Action Reasoning", answer="D", question_id="601-1"),
    videomme_row(601, "long", "4Ifb2AoP8lA", domain="Film & Television", sub_category="Movie & TV Show",
                 task_type="Object Recognition", answer="B", question_id="601-2"),
]

MLVU_PLOTQA = [
    {"video": "movie101_66.mp4", "duration": 246,
     "question": "What color is the main male character's coat in the video?",
     "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"},
    {"video": "movie101_41.mp4", "duration": 713,
     "question": "Why does the woman in the red dress leave the party early?",
     "candidates": ["She feels ill", "She is called to the hospital", "She argues with the host",
                    "She misses the last train"],
     "answer": "She is called to the hospital", "question_type": "plotQA"},
]
MLVU_COUNT = [
    {"video": "count_103.mp4", "duration": 382,
     "question": "Throughout this video, how many times does the man jump into the pool?",
     "candidates": ["3", "5", "2", "6"], "answer": "2", "question_type": "count"},
    # the answer is not among the candidates
    {"video": "count_104.mp4", "duration": 401,
     "question": "How many times does the dog fetch the ball?",
     "candidates": ["1", "4", "7", "8"], "answer": "5", "question_type": "count"},
]
MLVU_SUMMARY = [
    {"video": "summary_12.mp4", "duration": 1520,
     "question": "Please summarize this video, including its main content.",
     "answer": "A chef travels across Sicily, cooking with local fishermen and farmers.",
     "question_type": "summary"},
]


# ---------------------------------------------------------------- native

def test_native_fields(tmp_path):
    path = jsonl(tmp_path / "q.jsonl",
                 {"schema": "lvr.question/1", "id": "q1", "video": "talks/keynote.mp4",
                  "question": "What product is announced last?",
                  "options": ["A. A phone", "B. A watch", "C. A laptop", "D. A tablet"],
                  "answer": "C", "category": "recall", "subtitles": True,
                  "extra": {"time_reference": "52:10-55:00"}},
                 {"schema": "lvr.question/1", "video": "talks/keynote.mp4",
                  "question": "Who speaks first?", "options": ["The CEO", "A designer", "An engineer"],
                  "answer": "a designer"},
                 {"video": "talks/keynote.mp4", "question": "Summarise the keynote in one sentence.",
                  "answer": "New devices are announced."})
    items, errors = load_eval_items(path)
    assert errors == []
    a, b, c = items
    assert a == EvalItem(qid="q1", video="talks/keynote.mp4", question="What product is announced last?",
                         options=("A. A phone", "B. A watch", "C. A laptop", "D. A tablet"), answer="C",
                         category="recall", subtitles=True, source="native",
                         extra={"time_reference": "52:10-55:00"})
    # letters added; the answer given as option text (any case) becomes its letter; id derived
    assert b.options == ("A. The CEO", "B. A designer", "C. An engineer")
    assert b.answer == "B" and b.qid == "talks/keynote.mp4#2" and b.subtitles is False
    assert b.category is None and b.extra == {}
    # an open question: no options, the answer is reference text
    assert c.options == () and c.answer == "New devices are announced." and c.qid == "talks/keynote.mp4#3"
    assert detect_format(path) == "native"


def test_native_record_round_trip(tmp_path):
    item = EvalItem("7", "a b/c.mkv", "Q?", ("A. x", "B. y"), "B", "cat", True, "lvbench",
                    {"question_types": ["reasoning"], "n": 2})
    rec = item.to_record()
    assert rec["schema"] == "lvr.question/1" and rec["options"] == ["A. x", "B. y"]
    json.dumps(rec)
    items, errors = load_eval_items(jsonl(tmp_path / "q.jsonl", rec))
    assert errors == [] and items == [item]


def test_bad_records_are_named_and_skipped(tmp_path):
    good = {"schema": "lvr.question/1", "id": "ok", "video": "v.mp4", "question": "Q?",
            "options": ["x", "y"], "answer": "A"}
    path = jsonl(tmp_path / "q.jsonl",
                 good,
                 '{"video": "v.mp4", "question": ',                        # 2: torn JSON
                 ["not", "an", "object"],                                  # 3
                 {**good, "id": "e4", "question": ""},                     # 4: empty question
                 {**good, "id": "e5", "answer": "E"},                      # 5: answer out of range
                 {**good, "id": "e6", "subtitles": "yes"},                 # 6: subtitles not bool
                 {**good, "id": "e7", "schema": "lvr.question/9"},         # 7: unknown schema version
                 {**good, "id": "e8", "options": ["A. x", "y"]},           # 8: partly lettered
                 {**good, "id": "ok"},                                     # 9: duplicate id
                 {**good, "id": "ok2"})
    items, errors = load_eval_items(path)
    assert [i.qid for i in items] == ["ok", "ok2"]
    assert [e.split(": ")[0] for e in errors] == [f"{path}:{n}" for n in range(2, 10)]
    assert "not JSON" in errors[0]
    assert "not a JSON object" in errors[1]
    assert "'question' is empty" in errors[2]
    assert "'E'" in errors[3] and "A-B" in errors[3]
    assert "subtitles" in errors[4]
    assert "lvr.question/9" in errors[5]
    assert "lettered only in part" in errors[6]
    assert errors[7] == f"{path}:9: duplicate id 'ok' (first at {path}:1)"
    assert all("\n" not in e for e in errors)


def test_unreadable_files_raise(tmp_path):
    with pytest.raises(EvalFormatError, match="cannot open"):
        load_eval_items(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EvalFormatError, match="not UTF-8"):
        load_eval_items(tmp_path / "bin.jsonl")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"video": "a.mp4", "question": "q", "answer": "x"},\n  {"video": \n]\n')
    with pytest.raises(EvalFormatError, match=rf"{broken}:4: not JSON"):
        load_eval_items(broken)
    with pytest.raises(EvalFormatError, match="cannot tell the question format"):
        load_eval_items(jsonl(tmp_path / "odd.jsonl", {"foo": 1}))
    with pytest.raises(EvalFormatError, match="unknown question format"):
        load_eval_items(jsonl(tmp_path / "ok.jsonl", {"foo": 1}), "csv")
    assert load_eval_items(jsonl(tmp_path / "empty.jsonl")) == ([], [])


def test_stdin(tmp_path):
    text = json.dumps({"video": "v", "question": "Q?", "answer": "yes"}) + "\n"
    items, errors = load_eval_items("-", stdin=io.StringIO(text))
    assert errors == [] and items[0].qid == "v#1" and items[0].answer == "yes"


# ---------------------------------------------------------------- LVBench

def test_lvbench(tmp_path):
    path = jsonl(tmp_path / "video_info.meta.jsonl", LVBENCH_VIDEO_1, LVBENCH_VIDEO_2)
    assert detect_format(path) == "lvbench"
    items, errors = load_eval_items(path)
    assert [i.qid for i in items] == ["1", "2", "3"]
    first, second, third = items
    assert first.video == "sPGVcOEUd6k" and first.source == "lvbench"
    assert first.question == "What year appears in the caption at the start of the video?"
    assert first.options == ("A. 1636", "B. 1366", "C. 1363", "D. 1633")
    assert first.answer == "A" and first.category == "key information retrieval"
    assert first.subtitles is False
    assert first.extra == {"video_type": "documentary", "video_info": LVBENCH_VIDEO_1["video_info"],
                           "question_types": ["key information retrieval"], "time_reference": "00:15-00:19"}
    assert second.options[2] == "C. To record the damage to the fishing fleet" and second.answer == "C"
    assert second.category == "reasoning, event understanding"
    assert second.extra["question_types"] == ["reasoning", "event understanding"]
    assert third.video == "Cm73ma6Ibcs" and third.extra["time_reference"] == "1:12:07-1:12:30"
    assert errors == [f"{path}:2: qa[1]: question: no '(A) ...' option lines in the question text"]


def test_split_question_options():
    q, opts = split_question_options("Which?\n(A) one\n(B) two\n  still two\n(C) three\n")
    assert q == "Which?" and opts == ("A. one", "B. two still two", "C. three")
    q, opts = split_question_options("Line one\nline two\r\n(A) x\r\n(B) y")
    assert q == "Line one\nline two" and opts == ("A. x", "B. y")
    with pytest.raises(ValueError, match="out of order"):
        split_question_options("Q\n(A) x\n(C) y")
    with pytest.raises(ValueError, match="fewer than two"):
        split_question_options("Q\n(A) x")


def test_split_question_options_in_any_label_style():
    """The LongVideo-R1 flat files and RL prompts: any letter style, from the last line lettered A."""
    q, opts = split_question_options("A. Lincoln spoke\nwhen?\nA) at dawn\nB) at noon\n  or later", any_label=True)
    assert q == "A. Lincoln spoke\nwhen?" and opts == ("A. at dawn", "B. at noon or later")
    q, opts = split_question_options("Which?\n[A] x\n[B] y\n[C] z", any_label=True)
    assert q == "Which?" and opts == ("A. x", "B. y", "C. z")
    with pytest.raises(ValueError, match="no option line lettered A"):
        split_question_options("Which one?\n(B) y", any_label=True)
    with pytest.raises(ValueError, match="question text is empty"):
        split_question_options("A. x\nB. y", any_label=True)


def test_lvbench_bad_answer_and_missing_uid(tmp_path):
    video = {"key": "abc", "type": "tv", "qa": [
        {"question": "Q1?\n(A) a\n(B) b", "answer": "B", "question_type": ["reasoning"]},
        {"question": "Q2?\n(A) a\n(B) b", "answer": "Z", "question_type": ["reasoning"]},
    ]}
    items, errors = load_eval_items(jsonl(tmp_path / "meta.jsonl", video), "lvbench")
    assert [(i.qid, i.answer) for i in items] == [("abc#1", "B")]
    assert len(errors) == 1 and ":1: qa[1]: answer 'Z'" in errors[0]


# ---------------------------------------------------------------- Video-MME

def test_videomme_needs_subtitles_choice(tmp_path):
    path = jsonl(tmp_path / "videomme.jsonl", *VIDEOMME_ROWS)
    assert detect_format(path) == "videomme"
    with pytest.raises(EvalFormatError, match="Video-MME needs --subtitles or --no-subtitles"):
        load_eval_items(path)
    with pytest.raises(EvalFormatError, match="Video-MME needs"):
        load_eval_items(path, "videomme")


@pytest.mark.parametrize("subtitles", [True, False])
def test_videomme_long_with_subtitles_choice(tmp_path, subtitles):
    path = jsonl(tmp_path / "videomme.jsonl", *VIDEOMME_ROWS)
    items, errors = load_eval_items(path, subtitles=subtitles)
    assert errors == []
    assert [i.qid for i in items] == ["601-1", "601-2"]  # only "long" by default
    item = items[0]
    assert item.video == "4Ifb2AoP8lA" and item.source == "videomme"
    assert item.question.startswith("When the German Christmas tree")
    assert item.options == ("A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are equally many.")
    assert item.answer == "D" and item.category == "Action Reasoning"
    assert all(i.subtitles is subtitles for i in items)
    assert item.extra == {"duration": "long", "domain": "Film & Television", "sub_category": "Movie & TV Show",
                          "video_id": "601", "url": "https://www.youtube.com/watch?v=4Ifb2AoP8lA"}


def test_videomme_duration_filter_and_json_list(tmp_path):
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(VIDEOMME_ROWS, indent=2))
    items, errors = load_eval_items(path, subtitles=False, videomme_duration=None)
    assert errors == [] and [i.qid for i in items] == ["001-1", "301-1", "601-1", "601-2"]
    items, _ = load_eval_items(path, subtitles=False, videomme_duration="short")
    assert [(i.qid, i.video, i.answer) for i in items] == [("001-1", "fFjv93ACGo8", "C")]
    with pytest.raises(EvalFormatError, match="duration"):
        load_eval_items(path, subtitles=False, videomme_duration="huge")


def test_videomme_bad_rows(tmp_path):
    rows = [VIDEOMME_ROWS[2], {**VIDEOMME_ROWS[3], "answer": "E"},
            {k: v for k, v in VIDEOMME_ROWS[3].items() if k != "duration"},
            {**VIDEOMME_ROWS[3], "question_id": "601-1"}]
    path = tmp_path / "videomme.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    items, errors = load_eval_items(path, subtitles=True)
    assert [i.qid for i in items] == ["601-1"]
    assert [e.split(": ")[0] for e in errors] == [f"{path}:{n}" for n in (3, 4, 5)]
    assert "answer 'E'" in errors[0] and "duration" in errors[1] and "duplicate id '601-1'" in errors[2]


def test_videomme_parquet_needs_pyarrow(tmp_path):
    path = tmp_path / "test-00000-of-00001.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(EvalFormatError, match="pyarrow"):
            load_eval_items(path, subtitles=False)
        return
    pq.write_table(pa.Table.from_pylist(VIDEOMME_ROWS), path)
    items, errors = load_eval_items(path, subtitles=False)
    assert errors == [] and [i.qid for i in items] == ["601-1", "601-2"]


# ---------------------------------------------------------------- MLVU

def write_mlvu(root: Path) -> Path:
    json_dir = root / "json"
    json_dir.mkdir(parents=True)
    (json_dir / "1_plotQA.json").write_text(json.dumps(MLVU_PLOTQA, indent=4))
    (json_dir / "4_count.json").write_text(json.dumps(MLVU_COUNT, indent=4))
    (json_dir / "9_summary.json").write_text(json.dumps(MLVU_SUMMARY, indent=4))
    (json_dir / "README.txt").write_text("not a question file")
    return json_dir


def test_mlvu_single_file(tmp_path):
    json_dir = write_mlvu(tmp_path / "MLVU")
    path = json_dir / "1_plotQA.json"
    assert detect_format(path) == "mlvu"
    items, errors = load_eval_items(path)
    assert errors == []
    a, b = items
    assert a == EvalItem(qid="1_plotQA/movie101_66.mp4#1", video="movie101_66.mp4",
                         question="What color is the main male character's coat in the video?",
                         options=("A. Yellow", "B. Red", "C. Green", "D. Blue"), answer="A",
                         category="plotQA", subtitles=False, source="mlvu",
                         extra={"task": "1_plotQA", "video_subdir": "1_plotQA", "duration": 246})
    assert b.answer == "B" and b.options[1] == "B. She is called to the hospital"


def test_mlvu_directory(tmp_path):
    root = tmp_path / "MLVU"
    json_dir = write_mlvu(root)
    for target in (json_dir, root):  # the json/ folder, or the MLVU root holding it
        assert detect_format(target) == "mlvu"
        items, errors = load_eval_items(target)
        assert [i.qid for i in items] == ["1_plotQA/movie101_66.mp4#1", "1_plotQA/movie101_41.mp4#1",
                                          "4_count/count_103.mp4#1", "9_summary/summary_12.mp4#1"]
        count = items[2]
        assert count.options == ("A. 3", "B. 5", "C. 2", "D. 6") and count.answer == "C"
        assert count.category == "count" and count.extra["video_subdir"] == "4_count"
        summary = items[3]
        assert summary.options == () and summary.answer.startswith("A chef travels")
        assert summary.category == "summary"
        # the bad record is named by its file and the line its object starts on
        assert errors == [f"{json_dir / '4_count.json'}:15: answer '5' is not exactly one of the candidates"]
    with pytest.raises(EvalFormatError, match="directory"):
        load_eval_items(json_dir, "native")


def test_mlvu_task_from_question_type_when_file_is_renamed(tmp_path):
    path = tmp_path / "plot.json"
    path.write_text(json.dumps(MLVU_PLOTQA[:1] + [{**MLVU_PLOTQA[1], "question_type": "findNeedle"}]))
    items, errors = load_eval_items(path, subtitles=True)
    assert errors == []
    assert [i.extra["video_subdir"] for i in items] == ["1_plotQA", "2_needle"]
    assert all(i.subtitles for i in items)


def test_mlvu_video_in_task_folder(tmp_path):
    root = tmp_path / "MLVU"
    json_dir = write_mlvu(root)
    (root / "video" / "1_plotQA").mkdir(parents=True)
    video = root / "video" / "1_plotQA" / "movie101_66.mp4"
    video.write_bytes(b"\0")
    items, _ = load_eval_items(json_dir / "1_plotQA.json")
    assert resolve_item_video(items[0], root / "video") == video.resolve()
    with pytest.raises(VideoNotFoundError):
        resolve_item_video(items[1], root / "video")


# ---------------------------------------------------------------- auto detection

def test_auto_detects_each_format(tmp_path):
    assert detect_format(jsonl(tmp_path / "a.jsonl", LVBENCH_VIDEO_1)) == "lvbench"
    assert detect_format(jsonl(tmp_path / "b.jsonl", VIDEOMME_ROWS[0])) == "videomme"
    assert detect_format(jsonl(tmp_path / "c.jsonl", MLVU_SUMMARY[0])) == "mlvu"
    assert detect_format(jsonl(tmp_path / "d.jsonl", {"video": "v", "question": "q"})) == "native"
    # a leading bad line does not hide the format
    assert detect_format(jsonl(tmp_path / "e.jsonl", "oops", MLVU_PLOTQA[0])) == "mlvu"
    assert detect_format(jsonl(tmp_path / "f.jsonl", {"key": "k", "question": "q\n(A) x\n(B) y"})) == "longvideo-r1"
    assert set(EVAL_FORMATS) == {"auto", "native", "lvbench", "videomme", "mlvu", "longvideo-r1"}


# ---------------------------------------------------------------- resolve_video

@pytest.fixture
def video_dir(tmp_path):
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    (d / "abc.mp4").write_bytes(b"\0")
    (d / "fFjv93ACGo8.mkv").write_bytes(b"\0")
    (d / "sub" / "clip.webm").write_bytes(b"\0")
    return d


def test_resolve_video_finds_files(video_dir):
    assert resolve_video("abc", video_dir) == (video_dir / "abc.mp4").resolve()
    assert resolve_video("abc.mp4", video_dir) == (video_dir / "abc.mp4").resolve()
    assert resolve_video("fFjv93ACGo8", video_dir) == (video_dir / "fFjv93ACGo8.mkv").resolve()
    assert resolve_video("sub/clip.webm", video_dir) == (video_dir / "sub" / "clip.webm").resolve()
    assert resolve_video("clip", video_dir, subdirs=["sub"]) == (video_dir / "sub" / "clip.webm").resolve()
    assert resolve_video("./abc.mp4", str(video_dir)) == (video_dir / "abc.mp4").resolve()


def test_resolve_video_inside_links_are_fine(video_dir, tmp_path):
    os.symlink(video_dir / "abc.mp4", video_dir / "alias.mp4")
    assert resolve_video("alias", video_dir) == (video_dir / "abc.mp4").resolve()
    linked_dir = tmp_path / "videos-link"
    os.symlink(video_dir, linked_dir)
    assert resolve_video("abc", linked_dir) == (video_dir / "abc.mp4").resolve()


@pytest.mark.parametrize("value", ["../x.mp4", "/etc/passwd", "sub/../../x.mp4", "..", "",
                                   "C:\\videos\\x.mp4", "\\\\server\\share\\x.mp4", "a\0b"])
def test_resolve_video_rejects_unsafe_values(video_dir, value):
    (video_dir.parent / "x.mp4").write_bytes(b"\0")
    with pytest.raises(EvalFormatError) as e:
        resolve_video(value, video_dir)
    assert not isinstance(e.value, VideoNotFoundError)
    assert "\n" not in str(e.value)


def test_resolve_video_rejects_symlink_escape(video_dir, tmp_path):
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"\0")
    os.symlink(secret, video_dir / "leak.mp4")
    os.symlink(tmp_path, video_dir / "up")
    for value in ("leak", "leak.mp4", "up/secret.mp4", "up/secret"):
        with pytest.raises(EvalFormatError, match="outside"):
            resolve_video(value, video_dir)
    with pytest.raises(EvalFormatError):
        resolve_video("x", video_dir, subdirs=["../elsewhere"])


def test_resolve_video_not_found(video_dir, tmp_path):
    with pytest.raises(VideoNotFoundError) as e:
        resolve_video("nope", video_dir)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, EvalFormatError)
    msg = str(e.value)
    assert "'nope'" in msg and str(video_dir) in msg and "nope.mp4" in msg and "\n" not in msg
    with pytest.raises(VideoNotFoundError, match="does not exist"):
        resolve_video("abc", tmp_path / "no-such-dir")
    (video_dir / "dir.mp4").mkdir()
    with pytest.raises(VideoNotFoundError):
        resolve_video("dir.mp4", video_dir)


# ---------------------------------------------------------------- properties

option_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ,'-", min_size=1, max_size=30).filter(
    lambda s: s.strip() != "")
label_styles = st.sampled_from(["{L}. {t}", "({L}) {t}", "{L}) {t}", "{L}: {t}", "[{L}] {t}", "{L}.{t}"])


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(option_text, min_size=1, max_size=26), style=label_styles,
       pick=st.integers(min_value=0, max_value=25))
def test_option_letters_round_trip(texts, style, pick):
    plain = normalize_options(texts)
    assert plain == tuple(f"{chr(65 + i)}. {t.strip()}" for i, t in enumerate(texts))
    labelled = [style.format(L=chr(65 + i), t=t) for i, t in enumerate(texts)]
    assert normalize_options(labelled) == plain
    assert normalize_options(plain) == plain  # idempotent
    # an answer given as letter, label or option text maps back to the same letter
    i = pick % len(texts)
    item = EvalItem("q", "v", "Q?", plain, chr(65 + i))
    answers = (chr(65 + i), chr(97 + i), f"({chr(65 + i)})", plain[i])
    lines = "".join(json.dumps({**item.to_record(), "id": f"q{n}", "answer": a}) + "\n"
                    for n, a in enumerate(answers))
    items, errors = load_eval_items("-", stdin=io.StringIO(lines))
    assert errors == [] and [x.answer for x in items] == [chr(65 + i)] * len(answers)

"""The LongVideo-R1 release's files in lvr: SFT data, its system prompts, RL rows, flat eval files, caption trees.

Every fixture is written here from the layouts docs/released_formats.md describes (read from the
reference repository's code), never copied from the release: the SFT file as LLaMA-Factory alpaca
and sharegpt JSON, the RL rows as verl parquet and JSON, a flat LVBench evaluation list, and a caption
tree JSON. Each goes through the real command on tiny models: `lvr sft`, `lvr protocol extract`,
`lvr rl` and `lvr eval`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr_test_helpers import run_lvr
from tiny_models import STRIPPING_TEMPLATE

from lvr.infer.benchmarks import detect_format, load_eval_items
from lvr.train.qa_items import load_qa_items
from lvr.train.released_data import SystemPrompt, high_caption_count, prompt_file_names, sft_messages
from lvr.train.sft import SftError, load_sft_data

FAST = ["--cpu", "--no-gradient-checkpointing", "-q"]

# Our own system prompts (the reference's prose is not ours to ship), with the tree width written
# in as the release's samples have it. Leading and trailing whitespace and a non-ASCII character
# check that extraction is byte for byte.
SYSTEM_K4 = "\nNavigate the caption tree of width 4 → think in <think></think>, then call one tool or answer.  \n"
SYSTEM_K5 = SYSTEM_K4.replace("width 4", "width 5")
OPTIONS = ["A. one", "B. two", "C. three", "D. four"]
TURNS = ["<think>Clip 2 fits.</think><tool>get_caption((2, 3))</tool>",
         "<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>",
         "<think>Seen it.</think><answer>B</answer>"]
RESULTS = ["Medium-level Caption from tool get_caption((2,3,)). From 5.0 to 6.0:<caption>A hand.</caption>",
           "Low-level Caption from tool get_caption((2,3,1)). From 5.0 to 5.3:<caption>A key.</caption>"]


def first_turn(question: str, k: int = 4, duration: float = 12.0) -> str:
    """The reference's first user turn: question and lettered options, the duration line, the K
    high-level captions with their time ranges."""
    step = duration / k
    high = [f"High-level Caption {h} from {(h - 1) * step:.1f} to {h * step:.1f}:<caption>Scene {h}.</caption>"
            for h in range(1, k + 1)]
    return "\n".join([question, *OPTIONS, "", f"The total duration of the video is {duration} seconds.", "",
                      *high])


def user_turns(question: str, k: int = 4) -> list[str]:
    return [first_turn(question, k), *RESULTS]


def alpaca_samples(question: str, system: str = SYSTEM_K4, k: int = 4) -> list[dict]:
    """One trajectory as the release ships it: a sample per assistant turn, earlier turns in `history`."""
    users = user_turns(question, k)
    return [{"instruction": users[i], "input": "", "output": TURNS[i], "system": system,
             "history": [[users[j], TURNS[j]] for j in range(i)]} for i in range(len(TURNS))]


def sharegpt_sample(question: str, system: str = SYSTEM_K4, k: int = 4) -> dict:
    conversations = []
    for user, turn in zip(user_turns(question, k), TURNS):
        conversations += [{"from": "human", "value": user}, {"from": "gpt", "value": turn}]
    return {"conversations": conversations, "system": system}


def write_json_list(path: Path, records: list) -> Path:
    """A JSON list with one record per line after '[' (so record n starts on line n + 1)."""
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n",
                    encoding="utf-8")
    return path


def expected_messages(question: str, system: str = SYSTEM_K4) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for user, turn in zip(user_turns(question), TURNS):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": turn}]
    return messages


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("released") / "tiny-qwen3", vocab="small",
                            chat_template=STRIPPING_TEMPLATE)


# -- SFT samples ------------------------------------------------------------------------------------

def test_alpaca_and_sharegpt_samples_read_as_the_same_conversation():
    whole = expected_messages("Which number?")
    assert sft_messages(sharegpt_sample("Which number?")) == whole
    samples = alpaca_samples("Which number?")
    assert [sft_messages(s) for s in samples] == [whole[:3], whole[:5], whole]
    # input joins the instruction with a newline, as LLaMA-Factory does; a system turn may lead.
    assert sft_messages({"instruction": "a", "input": "b", "output": "c"}) == [
        {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}]
    leading = {"conversations": [{"from": "system", "value": SYSTEM_K5}, {"from": "human", "value": "q"},
                                 {"from": "gpt", "value": "a"}]}
    assert sft_messages(leading)[0] == {"role": "system", "content": SYSTEM_K5}
    assert high_caption_count(first_turn("q", k=5)) == 5 and high_caption_count("no captions") is None


BAD_SFT = [
    ({"conversations": [{"from": "human", "value": "q"}]}, "the last must be a gpt turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "conversations[0] is a gpt turn where a human turn belongs"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}]},
     "'from' is 'observation'"),
    ({"instruction": "q", "output": "", "system": SYSTEM_K4}, "'output' must be non-empty text"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0] must be a [user turn"),
    ({"instruction": "q", "output": "a", "system": 7}, "'system' must be a string"),
]


@pytest.mark.parametrize("record, reason", BAD_SFT)
def test_a_malformed_sample_is_named_by_file_and_line(tmp_path, record, reason):
    path = write_json_list(tmp_path / "sft.json", [*alpaca_samples("q1"), record])
    with pytest.raises(SftError) as e:
        load_sft_data(path)
    assert str(e.value).startswith(f"{path}:5: ") and reason in str(e.value)


def test_the_released_file_loads_whole_or_last_turn_only(tmp_path):
    path = write_json_list(tmp_path / "sft.json", alpaca_samples("q1") + alpaca_samples("q2"))
    data = load_sft_data(path)
    assert data.format == "llamafactory-alpaca" and data.records == 6
    assert data.samples[2] == {"messages": expected_messages("q1")}
    masked = load_sft_data(path, mask_history=True)
    whole = expected_messages("q2")
    assert masked.samples[5] == {"prompt": whole[:-1], "completion": whole[-1:]}
    assert [s["completion"][0]["content"] for s in masked.samples] == TURNS * 2
    shared = load_sft_data(write_json_list(tmp_path / "sharegpt.json", [sharegpt_sample("q1")]))
    assert shared.format == "llamafactory-sharegpt" and shared.samples == [{"messages": expected_messages("q1")}]


def _learned(run) -> list[str]:
    """The text each collated row is trained on."""
    batch = next(iter(run.trainer.get_train_dataloader()))
    return [run.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
            for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]


def test_mask_history_trains_the_last_assistant_turn_only(small_model, tmp_path):
    """LLaMA-Factory's mask_history: the last assistant turn carries the loss; without it, every one does."""
    from lvr.train.sft import SftSettings, build_trainer

    data = write_json_list(tmp_path / "sft.json", [alpaca_samples("q1")[-1]])

    def learned(mask_history: bool) -> str:
        settings = SftSettings(data=str(data), model=str(small_model), output=str(tmp_path / f"o{mask_history}"),
                               cpu=True, gradient_checkpointing=False, mask_history=mask_history)
        [text] = _learned(build_trainer(settings))
        return text

    assert learned(True) == TURNS[-1] + "<|im_end|>"
    assert learned(False) == "".join(t + "<|im_end|>" for t in TURNS)


def test_sft_trains_on_the_released_file(small_model, tmp_path):
    data = write_json_list(tmp_path / "longvideor1-sft-qwen3-llamafactory.json",
                           alpaca_samples("q1") + alpaca_samples("q2", SYSTEM_K5, k=5))
    out = tmp_path / "navigator"
    proc = run_lvr("sft", data, "--model", small_model, "-o", out, "--mask-history", "--max-steps", "2",
                   "--batch-size", "2", "--max-length", "1024", "--save-steps", "1000", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "lvr_sft.json").read_text())
    assert record["data"]["format"] == "llamafactory-alpaca" and record["data"]["samples"] == 6
    assert record["settings"]["mask_history"] is True and record["steps"] == 2
    assert (out / "chat_template.jinja").is_file()


# -- system prompts ---------------------------------------------------------------------------------

def test_protocol_extract_writes_each_system_prompt_byte_for_byte(tmp_path):
    data = write_json_list(tmp_path / "sft.json", [*alpaca_samples("q1"), sharegpt_sample("q2", SYSTEM_K5, k=5),
                                                   *alpaca_samples("q3")])
    out = tmp_path / "prompts"
    proc = run_lvr("protocol", "extract", data, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["system-K4.txt", "system-K5.txt", "system-template.txt"]
    assert (out / "system-K4.txt").read_bytes() == SYSTEM_K4.encode("utf-8")
    assert (out / "system-K5.txt").read_bytes() == SYSTEM_K5.encode("utf-8")
    # The prompts differ only where the width is written: one template gives each back.
    assert (out / "system-template.txt").read_bytes() == SYSTEM_K4.replace("width 4", "width {width}").encode("utf-8")
    assert f"{out / 'system-template.txt'}: one template for every width" in proc.stderr
    assert f"{out / 'system-K4.txt'}: the system prompt of 6 sample(s) (K=4; first at {data}:2)" in proc.stderr
    assert f"{out / 'system-K5.txt'}: the system prompt of 1 sample(s) (K=5; first at {data}:5)" in proc.stderr


def test_extract_names_bad_records_and_writes_the_rest(tmp_path):
    data = write_json_list(tmp_path / "sft.json", [alpaca_samples("q1")[0], {"conversations": "nope"}, [1, 2],
                                                   {"instruction": "q", "output": "a"}])
    proc = run_lvr("protocol", "extract", data, "-o", tmp_path / "prompts")
    assert proc.returncode == 1
    assert f"lvr protocol: error: {data}:3: 'conversations' must be a non-empty list" in proc.stderr
    assert "1 sample(s) without one; 2 record(s) could not be read" in proc.stderr
    assert (tmp_path / "prompts" / "system-K4.txt").read_bytes() == SYSTEM_K4.encode("utf-8")
    none = run_lvr("protocol", "extract", write_json_list(tmp_path / "plain.json", [{"instruction": "q",
                                                                                    "output": "a"}]),
                   "-o", tmp_path / "none")
    assert none.returncode == 1 and "no sample carries a system prompt" in none.stderr
    usage = run_lvr("protocol", "import", data, "-o", tmp_path / "x")
    assert usage.returncode == 2 and "ACTION must be extract" in usage.stderr
    missing = run_lvr("protocol", "extract", tmp_path / "missing.json", "-o", tmp_path / "x")
    assert missing.returncode == 2 and "missing.json: cannot open" in missing.stderr


def test_a_template_only_when_the_prompts_differ_in_their_width_alone():
    from lvr.train.released_data import width_template

    def prompts(*texts_and_widths):
        return [SystemPrompt(t, "f:1", 1, {k}) for t, k in texts_and_widths]

    assert width_template(prompts(("Tree of 4; ids 1..4; 3 levels.", 4), ("Tree of 6; ids 1..6; 3 levels.", 6),
                                  ("Tree of 5; ids 1..5; 3 levels.", 5))) == "Tree of {width}; ids 1..{width}; 3 levels."
    assert width_template(prompts(("Tree of 4.", 4), ("A tree of 5.", 5))) is None       # other words differ
    assert width_template(prompts(("Tree of 4; 7 levels.", 4), ("Tree of 5; 8 levels.", 5))) is None
    assert width_template(prompts(("Tree of 4.", 4), ("Tree of 5.", 5), ("Tree of 6!", 6))) is None
    assert width_template(prompts(("Tree of 4.", 4), ("Tree of 4!", 4))) is None        # one width only


def test_prompts_sharing_a_width_get_numbered_names():
    names = prompt_file_names([SystemPrompt("a", "f:1", 3, {4}), SystemPrompt("b", "f:9", 1, {4}),
                               SystemPrompt("c", "f:12", 1, set()), SystemPrompt("d", "f:14", 2, {4, 5})])
    assert names == ["system-K4.txt", "system-K4-2.txt", "system.txt", "system-K4-K5.txt"]


# -- RL rows ----------------------------------------------------------------------------------------

def rl_row(index: int, question: str, *, clues=((3.0, 6.0),), video: str = "numbers", answer: str = "B") -> dict:
    """A verl row of the released RL data (CG-Bench split; no clue_intervals: the Video-MME split)."""
    info = {"index": index, "need_tools_kwargs": True, "video_uid": video, "split": "rl_data", "width": 4,
            "duration": 12.0, "fps": 10.0, "data_source": "videocaption_cgbench"}
    if clues is not None:
        info["clue_intervals"] = [list(c) for c in clues]
    high = "\n".join(f"High-level Caption {h} from {3.0 * (h - 1)} to {3.0 * h}:<caption>Scene {h}.</caption>"
                     for h in range(1, 5))
    # The question and its option lines, then the duration line and the high-level captions.
    user = f"{question}\n" + "\n".join(OPTIONS) + "\n" + "\n\n" + \
        f"The total duration of the video is 12.0 seconds.\n\n{high}\n\n"
    return {"data_source": info["data_source"] if clues is not None else "videocaption_videomme",
            "prompt": [{"role": "system", "content": SYSTEM_K4}, {"role": "user", "content": user}],
            "ability": "get_caption", "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": info, "metadata": None}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_rl_rows_load_as_qa_items(tmp_path, kind):
    rows = [rl_row(0, "Where is the key?"), rl_row(1, "Which scene\nhas the key?", clues=None, answer="C")]
    path = (write_json_list(tmp_path / "rl.json", rows) if kind == "json"
            else write_parquet(tmp_path / "rl.parquet", rows))
    items, errors = load_qa_items(path)
    assert errors == []
    first, second = items
    assert (first.qid, first.video, first.question, first.options, first.answer, first.clues) == (
        "rl_data-0", "numbers", "Where is the key?", tuple(OPTIONS), "B", ((3.0, 6.0),))
    assert first.source == "longvideo-r1"
    assert first.extra == {"width": 4, "duration": 12.0, "fps": 10.0, "split": "rl_data", "index": 0,
                           "data_source": "videocaption_cgbench", "ability": "get_caption"}
    assert (second.question, second.answer, second.clues) == ("Which scene\nhas the key?", "C", ())
    assert second.extra["data_source"] == "videocaption_videomme"


def test_extract_reads_the_rl_rows_system_prompt(tmp_path):
    from lvr.train.released_data import extract_system_prompts

    rows = [rl_row(0, "Where?"), rl_row(1, "Which?", clues=None)]
    result = extract_system_prompts(str(write_parquet(tmp_path / "rl.parquet", rows)), tmp_path / "prompts")
    assert result.errors == [] and [(p.name, pr.samples, pr.widths) for p, pr in result.written] == [
        ("system-K4.txt", 2, {4})]
    assert (tmp_path / "prompts" / "system-K4.txt").read_bytes() == SYSTEM_K4.encode("utf-8")


def test_bad_rl_rows_are_named_by_line_or_row(tmp_path):
    good = rl_row(0, "Where?")
    no_video = rl_row(1, "Where?")
    del no_video["extra_info"]["video_uid"]
    no_duration_line = rl_row(2, "Where?")
    no_duration_line["prompt"][1]["content"] = "Where?\nA. x\nB. y"
    bad_answer = rl_row(3, "Where?", answer="E")
    rows = [good, no_video, no_duration_line, bad_answer]
    items, errors = load_qa_items(write_json_list(tmp_path / "rl.json", rows))
    assert [i.qid for i in items] == ["rl_data-0"]
    path = tmp_path / "rl.json"
    assert errors[0] == f"{path}:3: extra_info: missing 'video_uid'"
    assert errors[1].startswith(f"{path}:4: prompt[1]: no 'The total duration of the video is ...' line")
    assert errors[2].startswith(f"{path}:5: answer 'E' is not one of the options")
    parquet = write_parquet(tmp_path / "rl.parquet", [good, bad_answer])
    items, errors = load_qa_items(parquet)
    assert len(items) == 1 and errors[0].startswith(f"{parquet}:2: answer 'E'")


@pytest.fixture(scope="module")
def world(numbered_video, tmp_path_factory) -> dict:
    """A folder with the numbered video (12 s, K = 4) and the RL rows about it, as JSON and parquet."""
    root = tmp_path_factory.mktemp("released-rl")
    shutil.copy(numbered_video, root / "numbers.mp4")
    rows = [rl_row(i, f"Question {i}: where is the key?") for i in range(2)]
    return {"root": root, "json": write_json_list(root / "rl_data.json", rows),
            "parquet": write_parquet(root / "rl_data.parquet", rows)}


def fake_caption(body: dict) -> str:
    return "<caption>Numbers count up.</caption>"


def rl_one_step(world: dict, data: Path, model: Path, out: Path) -> dict:
    log = out.parent / f"{out.name}.rollouts.jsonl"
    with FakeOpenAI(fake_caption, models=("captioner",)) as server:
        proc = run_lvr("rl", data, "--model", model, "-o", out, "--caption-model", "captioner",
                       "--caption-base-url", server.url, "--cache-dir", world["root"] / "cache",
                       "--num-generations", "2", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1",
                       "--max-turns", "2", "--max-tokens", "16", "--max-completion-length", "200",
                       "--rollout-log", log, *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_rl.json").read_text())
    assert record["steps"] == 1
    rollouts = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rollouts) == 2 and len({r["qid"] for r in rollouts}) == 1
    for r in rollouts:
        assert r["qid"] in ("rl_data-0", "rl_data-1") and r["options"] == OPTIONS and r["reference"] == "B"
        assert r["clues"] == [[3.0, 6.0]] and r["width"] == 4
    return record


def test_rl_takes_one_step_on_the_released_parquet(world, small_model, tmp_path):
    rl_one_step(world, world["parquet"], small_model, tmp_path / "rl-parquet")


def test_rl_takes_one_step_on_the_released_json(world, small_model, tmp_path):
    rl_one_step(world, world["json"], small_model, tmp_path / "rl-json")


# -- the flat evaluation files ----------------------------------------------------------------------

FLAT = [
    {"key": "sPGVcOEUd6k", "uid": 7, "question": "What year is shown?\n(A) 1636\n(B) 1366\n(C) 1363\n(D) 1633",
     "answer": "A", "question_type": ["key information retrieval"], "time_reference": "00:15-00:19"},
    {"videoID": "4Ifb2AoP8lA", "question_id": "601-1", "question": "Who speaks?",
     "options": ["A. A man", "B. A woman", "C. A child", "D. Nobody"], "answer": "D", "task_type": "Counting",
     "duration": "long"},
    {"video_name": "movie101_66.mp4", "question": "What color is the coat?\nA. Yellow\nB. Red", "answer": "B"},
]


def test_flat_eval_entries_load(tmp_path):
    path = write_json_list(tmp_path / "lvbench.json", FLAT)
    assert detect_format(path) == "longvideo-r1"
    items, errors = load_eval_items(path)
    assert errors == []
    lv, vmme, mlvu = items
    assert (lv.qid, lv.video, lv.question, lv.options, lv.answer, lv.category) == (
        "7", "sPGVcOEUd6k", "What year is shown?", ("A. 1636", "B. 1366", "C. 1363", "D. 1633"), "A",
        "key information retrieval")
    assert lv.extra == {"benchmark": "lvbench", "question_text": FLAT[0]["question"], "time_reference": "00:15-00:19"}
    assert lv.source == "longvideo-r1"
    assert (vmme.qid, vmme.video, vmme.answer, vmme.category, vmme.extra["benchmark"]) == (
        "601-1", "4Ifb2AoP8lA", "D", "Counting", "videomme")
    assert (mlvu.qid, mlvu.video, mlvu.options, mlvu.answer) == (
        "movie101_66.mp4#1", "movie101_66.mp4", ("A. Yellow", "B. Red"), "B")
    # The reference's Video-MME file is Video-MME rows: auto reads it as videomme, --format reads it flat.
    vmme_path = write_json_list(tmp_path / "videomme_long.json", [FLAT[1]])
    assert detect_format(vmme_path) == "videomme"
    items, errors = load_eval_items(vmme_path, "longvideo-r1")
    assert errors == [] and items[0].source == "longvideo-r1" and items[0].subtitles is False


def test_bad_flat_entries_are_named_by_file_and_line(tmp_path):
    rows = [FLAT[0], {"question": "no video"}, {"key": "k", "question": "no options here", "answer": "A"},
            {**FLAT[0], "answer": "F", "uid": 8}, FLAT[0]]
    path = write_json_list(tmp_path / "flat.json", rows)
    items, errors = load_eval_items(path, "longvideo-r1")
    assert [i.qid for i in items] == ["7"]
    assert errors == [f"{path}:3: missing the video: 'key' (LVBench), 'videoID' (Video-MME) or 'video_name' (MLVU)",
                      f"{path}:4: question: no option line lettered A in the question text",
                      f"{path}:5: answer 'F' is not one of the options A-D",
                      f"{path}:6: duplicate id '7' (first at {path}:2)"]


# -- caption trees feed eval ------------------------------------------------------------------------

def caption_tree(nodes: list[dict], video_name: str) -> dict:
    """The release's caption JSON of one video, built from our node records: per level, each node's
    1-based position in tree order, its level, the tagged caption, its frame times and frame ids."""
    k = nodes[0]["K"]
    levels: list[list[dict]] = [[], [], []]
    for node in sorted(nodes, key=lambda n: (len(n["id"]), n["id"])):
        ids = node["id"]
        position = 0
        for i in ids:
            position = position * k + (i - 1)
        levels[len(ids) - 1].append({
            "segment_id": position + 1, "level": node["level"],
            "caption": f"<caption>Released caption of {node['level']} clip {tuple(ids)}.</caption>",
            "frame_time": node["frame_times"], "frame_ids": node["frame_indices"]})
    return {"video_name": video_name, "width": k, "captions": levels}


def navigator(body: dict) -> str:
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if turns == 0:
        return "<think>Clip 2 first.</think><tool>get_caption((2, 3))</tool>"
    return "<think>Seen it.</think><answer>A</answer>"


def test_released_captions_feed_eval_with_no_caption_request(numbered_video, tmp_path):
    """Caption trees imported into the store under a captioner's name answer every caption eval asks
    for: the flat LVBench file is scored and no request reaches the captioner."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(numbered_video, videos / "numbers.mp4")
    cache, nodes_file = tmp_path / "cache", tmp_path / "nodes.jsonl"
    assert run_lvr("segment", videos / "numbers.mp4", "-o", nodes_file, "--cache-dir", cache, "-q").returncode == 0
    nodes = [json.loads(x) for x in nodes_file.read_text().splitlines()]
    trees = tmp_path / "captions"
    trees.mkdir()
    (trees / "numbers.json").write_text(json.dumps(caption_tree(nodes, "numbers.mp4")))
    flat = write_json_list(tmp_path / "lvbench.json", [
        {"key": "numbers", "uid": n, "question": f"Q{n}: which?\n(A) odd\n(B) even", "answer": "A"}
        for n in (1, 2)])

    with FakeOpenAI(navigator, models=("navigator", "released")) as server:
        imported = run_lvr("caption", nodes_file, "--import-longvideo-r1", trees, "--model", "released",
                           "--base-url", server.url, "--cache-dir", cache, "-o", tmp_path / "captions.jsonl", "-q")
        assert imported.returncode == 0, imported.stderr
        out = tmp_path / "results.jsonl"
        proc = run_lvr("eval", flat, "--video-dir", videos, "--base-url", server.url, "--model", "navigator",
                       "--caption-model", "released", "--cache-dir", cache, "-o", out,
                       "--traces", tmp_path / "traces.jsonl", "-q")
        assert proc.returncode == 0, proc.stderr
        assert not [b for b in server.requests if b["model"] == "released"]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["qid"] for r in records) == ["1", "2"] and all(r["correct"] for r in records)
    assert all(r["source"] == "longvideo-r1" for r in records)
    for r in records:
        calls = r["accounting"]["caption_calls"]
        assert calls["made"] == 0 and calls["total"] == 5  # 4 high captions and (2, 3), all from the tree file
    trace = json.loads((tmp_path / "traces.jsonl").read_text().splitlines()[0])
    captions = {tuple(n["id"]): n["caption"] for n in trace["tree"] if n["caption"]}
    assert captions[(2, 3)] == "Released caption of medium clip (2, 3)."


# -- eval --captions: the caption trees in place of a captioner -------------------------------------

def navigator_with_qa(body: dict) -> str:
    """Medium, then low caption, then video_qa on that leaf, then the answer."""
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    script = ["<think>Clip 2 first.</think><tool>get_caption((2, 3))</tool>",
              "<think>Closer.</think><tool>get_caption((2, 3, 1))</tool>",
              '<think>Look.</think><tool>video_qa((2, 3, 1), "Which number is shown?")</tool>']
    return script[turns] if turns < len(script) else "<think>Seen it.</think><answer>A</answer>"


@pytest.fixture(scope="module")
def released(numbered_video, tmp_path_factory) -> dict:
    """Videos (numbers.mp4, and copies gappy.mp4, wide.mp4, nofile.mp4 and nohigh.mp4 of it), a caption
    folder with a whole tree for numbers, one lacking medium node (2, 3) for gappy, one of width 5 for
    wide (the video's K is 4), none for nofile and one lacking high node (2,) for nohigh, and flat
    LVBench files asking two questions about each."""
    root = tmp_path_factory.mktemp("released-captions")
    videos, captions = root / "videos", root / "captions"
    videos.mkdir()
    captions.mkdir()
    for name in ("numbers", "gappy", "wide", "nofile", "nohigh"):
        shutil.copy(numbered_video, videos / f"{name}.mp4")
    nodes_file = root / "nodes.jsonl"
    assert run_lvr("segment", videos / "numbers.mp4", "-o", nodes_file, "--cache-dir", root / "seg-cache",
                   "-q").returncode == 0
    nodes = [json.loads(x) for x in nodes_file.read_text().splitlines()]
    (captions / "numbers.json").write_text(json.dumps(caption_tree(nodes, "numbers.mp4")))
    gappy = caption_tree(nodes, "gappy.mp4")
    gappy["captions"][1] = [e for e in gappy["captions"][1] if e["segment_id"] != 7]   # (2, 3) with K = 4
    (captions / "gappy.json").write_text(json.dumps(gappy))
    (captions / "wide.json").write_text(json.dumps({**caption_tree(nodes, "wide.mp4"), "width": 5}))
    nohigh = caption_tree(nodes, "nohigh.mp4")
    nohigh["captions"][0] = [e for e in nohigh["captions"][0] if e["segment_id"] != 2]   # high (2,)
    (captions / "nohigh.json").write_text(json.dumps(nohigh))

    def flat(*names: str) -> Path:
        entries = [{"key": name, "uid": f"{name}-{n}", "question": f"Q{n}: which?\n(A) odd\n(B) even", "answer": "A"}
                   for name in names for n in (1, 2)]
        return write_json_list(root / f"{'-'.join(names)}.json", entries)

    return {"root": root, "videos": videos, "captions": captions, "flat": flat}


def eval_with_captions(released: dict, questions: Path, out: Path, reply, *extra) -> tuple:
    """`lvr eval --captions` against a server that serves the navigator alone (any other model: 404)."""
    with FakeOpenAI(reply, models=("navigator",), strict_models=True) as server:
        proc = run_lvr("eval", questions, "--video-dir", released["videos"], "--captions", released["captions"],
                       "--base-url", server.url, "--model", "navigator", "--cache-dir", out.parent / "cache",
                       "-o", out, "--traces", out.with_suffix(".traces.jsonl"), *extra, "-q")
    return proc, server.requests


def test_eval_takes_every_caption_from_the_folder_with_no_captioner(released, tmp_path):
    from lvr.prep.longvideo_r1 import folder_digest

    out = tmp_path / "results.jsonl"
    proc, requests = eval_with_captions(released, released["flat"]("numbers"), out, navigator)
    assert proc.returncode == 0, proc.stderr
    assert requests and {r["model"] for r in requests} == {"navigator"}
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["qid"] for r in records) == ["numbers-1", "numbers-2"] and all(r["correct"] for r in records)
    digest = folder_digest(released["captions"].glob("*.json"))
    for r in records:
        assert r["accounting"]["caption_calls"] == {**r["accounting"]["caption_calls"], "made": 0, "total": 5}
        settings = r["settings"]
        assert settings["captions"] == {"source": "longvideo-r1", "dir": str(released["captions"]),
                                        "sha256": digest, "model": "longvideo-r1-captions",
                                        "prompt_hash": f"imported:{digest[:16]}"}
        assert settings["caption_prompt_hash"] == f"imported:{digest[:16]}"
        assert settings["models"]["caption"] is None and settings["models"]["qa"] is None
    trace = json.loads(out.with_suffix(".traces.jsonl").read_text().splitlines()[0])
    captions = {tuple(n["id"]): n["caption"] for n in trace["tree"] if n["caption"]}
    assert captions[(2, 3)] == "Released caption of medium clip (2, 3)."
    assert captions[(1,)] == "Released caption of high clip (1,)."


def test_a_high_node_the_file_lacks_fails_before_any_frame_is_decoded(released, tmp_path):
    out = tmp_path / "results.jsonl"
    proc, requests = eval_with_captions(released, released["flat"]("nohigh"), out, navigator)
    assert proc.returncode == 1 and requests == []
    captions = released["captions"]
    assert (f"lvr eval: error: nohigh-1: {released['videos'] / 'nohigh.mp4'} node (2,) (high level), caption: "
            f"no caption for it in {captions / 'nohigh.json'} (segment_id 2 of the high list)" in proc.stderr)
    assert not [p for p in (tmp_path / "cache").rglob("*.jpg")]   # the captions are read, never made


def test_a_missing_node_or_file_fails_its_question_named(released, tmp_path):
    out = tmp_path / "results.jsonl"
    proc, requests = eval_with_captions(released, released["flat"]("numbers", "gappy", "wide", "nofile"), out,
                                        navigator)
    assert proc.returncode == 1
    assert {r["model"] for r in requests} == {"navigator"}
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["qid"] for r in records) == ["numbers-1", "numbers-2"]   # the batch went on
    captions = released["captions"]
    for n in (1, 2):
        assert (f"lvr eval: error: gappy-{n}: {released['videos'] / 'gappy.mp4'} node (2, 3) (medium level), "
                f"caption: no caption for it in {captions / 'gappy.json'} (segment_id 7 of the medium list)"
                in proc.stderr)
        assert (f"lvr eval: error: nofile-{n}: {released['videos'] / 'nofile.mp4'}: no caption file for it in "
                f"--captions {captions} (expected {captions / 'nofile.json'})" in proc.stderr)
        assert f"lvr eval: error: wide-{n}: {captions / 'wide.json'}: width 5, but video " in proc.stderr


def test_ask_answers_from_the_caption_folder(released, tmp_path):
    with FakeOpenAI(navigator, models=("navigator",), strict_models=True) as server:
        proc = run_lvr("ask", released["videos"] / "numbers.mp4", "Which?", "-O", "odd", "-O", "even",
                       "--captions", released["captions"], "--base-url", server.url, "--model", "navigator",
                       "--cache-dir", tmp_path / "cache", "-o", tmp_path / "answer.json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "A. odd" and {r["model"] for r in server.requests} == {"navigator"}
    record = json.loads((tmp_path / "answer.json").read_text())
    assert record["accounting"]["caption_calls"]["made"] == 0


def test_video_qa_needs_a_vision_model_of_its_own(released, tmp_path):
    questions = released["flat"]("numbers")
    out = tmp_path / "none" / "results.jsonl"
    proc, _ = eval_with_captions(released, questions, out, navigator_with_qa)
    assert proc.returncode == 1 and not (out.exists() and out.read_text())   # nothing answered
    assert (f"node (2, 3, 1) (low level), video_qa: no video_qa model: the captions come from --captions files, "
            f"and video_qa sends a clip's frames to a vision model; name one with --qa-model (and --qa-base-url)"
            in proc.stderr)
    with FakeOpenAI("<answer>The number 61.</answer>", models=("vision",), strict_models=True) as vision:
        out = tmp_path / "qa" / "results.jsonl"
        proc, requests = eval_with_captions(released, questions, out, navigator_with_qa,
                                            "--qa-model", "vision", "--qa-base-url", vision.url)
        assert proc.returncode == 0, proc.stderr
        assert len(vision.requests) == 2 and {r["model"] for r in requests} == {"navigator"}
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["correct"] and r["accounting"]["video_qa_calls"] == 1 for r in records)
    assert records[0]["settings"]["models"]["qa"]["model"] == "vision"


def test_a_folder_that_holds_no_caption_files_is_a_usage_error(released, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_lvr("eval", released["flat"]("numbers"), "--video-dir", released["videos"], "--captions", empty,
                   "--base-url", "http://127.0.0.1:9/v1", "--model", "navigator", "--cache-dir", tmp_path / "cache",
                   "-o", tmp_path / "out.jsonl", "-q")
    assert proc.returncode == 2 and f"--captions {empty}: no caption files (*.json) in it" in proc.stderr


def test_the_folder_digest_follows_names_and_contents(tmp_path):
    from lvr.prep.longvideo_r1 import folder_digest

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("[]")
    first = folder_digest(tmp_path.glob("*.json"))
    assert first == folder_digest(sorted(tmp_path.glob("*.json"), reverse=True))
    (tmp_path / "b.json").write_text("[ ]")
    second = folder_digest(tmp_path.glob("*.json"))
    (tmp_path / "b.json").rename(tmp_path / "c.json")
    assert len({first, second, folder_digest(tmp_path.glob("*.json"))}) == 3


def test_an_extracted_prompt_reaches_the_navigator_unchanged(released, tmp_path):
    """`lvr protocol extract` on the user's copy of the SFT data, then `ask --protocol longvideo-r1
    --system-prompt` that file: the navigator's system message is the samples' prompt, byte for byte
    (its leading and trailing whitespace included)."""
    data = write_json_list(tmp_path / "sft.json", [*alpaca_samples("q1"), sharegpt_sample("q2")])
    prompts = tmp_path / "prompts"
    assert run_lvr("protocol", "extract", data, "-o", prompts).returncode == 0
    with FakeOpenAI(navigator, models=("navigator",), strict_models=True) as server:
        proc = run_lvr("ask", released["videos"] / "numbers.mp4", "Which?", "-O", "odd", "-O", "even",
                       "--protocol", "longvideo-r1", "--system-prompt", prompts / "system-K4.txt",
                       "--captions", released["captions"], "--base-url", server.url, "--model", "navigator",
                       "--cache-dir", tmp_path / "cache", "-q")
    assert proc.returncode == 0, proc.stderr
    sent = [b["messages"][0] for b in server.requests]
    assert sent and all(m == {"role": "system", "content": SYSTEM_K4} for m in sent)

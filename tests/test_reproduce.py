"""docs/reproduce.md runs as written: every command of its `sh` blocks, on small files.

The test lays out a folder as the page's "What you need" section names it, with files written
here from the release's documented layouts (never copied from the release): a 12-second video
(K = 4) under each benchmark, caption trees for it, a flat LVBench list and a Video-MME (long)
list, LLaMA-Factory SFT samples, verl RL rows, and a reference checkout whose `constant.py` files
hold prompts of our own. Then it runs the page's commands in order, in that folder, changing only
what the list below says, and checks what each one wrote.

What is changed, and nothing else:
- `vllm serve` lines are not run; two fake OpenAI-compatible servers stand in for them, their
  URLs in place of the page's;
- `accelerate launch ... -m lvr.cli` runs as `lvr` (one process);
- the training commands get flags that shrink them to one step of a tiny model on the CPU.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr_test_helpers import LVR_TIMEOUT_S, lvr_env
from synthetic_media import make_frame_number_video
from tiny_models import STRIPPING_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reproduce.md"
NAVIGATOR_URL, VISION_URL = "http://localhost:8000/v1", "http://localhost:8001/v1"
LAUNCHER = re.compile(r"accelerate launch --config_file \S+ -m lvr\.cli ")

# Prompts of our own where the release's texts would be (`{width}` where the tree width goes).
SYSTEM = "Navigate a video of width {width}: think, then call one tool or answer.\n"
EVAL_SYSTEM = "The evaluation's navigator prompt, width {width}.\n"
QA_SYSTEM = "\nAnswer about these frames inside <answer></answer>.\n"
CAPTION_SYSTEM = "Describe the {num_frame} frames in {num_words} words, inside <caption></caption>.\n"
SUBTITLE = "Count along with me"
OPTIONS = ["A. odd", "B. even"]


def page_commands(text: str) -> list[str]:
    """The commands of the page's ```sh blocks, continuation lines joined, comments left out."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


# -- the folder ---------------------------------------------------------------------------------

def caption_tree(video_name: str, k: int = 4, duration: float = 12.0) -> dict:
    """A released caption tree: per level, every node in tree order with its tagged caption and
    the times and ids of (here, two of) its sampled frames."""
    levels = []
    for depth, level in enumerate(("high", "medium", "low"), 1):
        count = k ** depth
        step = duration / count
        levels.append([{"segment_id": i + 1, "level": level,
                        "caption": f"<caption>The {level} clip {i + 1} counts.</caption>",
                        "frame_time": [round(i * step, 1), round((i + 1) * step - 0.1, 1)],
                        "frame_ids": [int(i * step * 10), int((i + 1) * step * 10) - 1]} for i in range(count)])
    return {"video_name": video_name, "width": k, "captions": levels}


def sft_samples() -> list[dict]:
    """LLaMA-Factory alpaca samples as the release has them, of two tree widths."""
    samples = []
    for k in (4, 5):
        high = "\n".join(f"High-level Caption {h} from {h - 1}.0 to {h}.0:<caption>Scene {h}.</caption>"
                         for h in range(1, k + 1))
        first = f"Which?\n{OPTIONS[0]}\n{OPTIONS[1]}\n\nThe total duration of the video is {float(k)} seconds.\n\n{high}"
        samples.append({"system": SYSTEM.replace("{width}", str(k)), "history": [], "instruction": first,
                        "input": "", "output": "<think>Scene 1.</think><answer>A</answer>"})
    return samples


def rl_rows() -> list[dict]:
    """verl rows of the released RL data about the video `numbers`. The second says width 5, so
    the rows carry the RL prompt at two widths as the release's do (lvr takes K from the video)."""
    rows = []
    for i, k in enumerate((4, 5)):
        high = "\n".join(f"High-level Caption {h} from {h - 1}.0 to {h}.0:<caption>Scene {h}.</caption>"
                         for h in range(1, k + 1))
        user = f"Where is the key?\n{OPTIONS[0]}\n{OPTIONS[1]}\n\n\nThe total duration of the video is 12.0 seconds.\n\n{high}"
        rows.append({"data_source": "videocaption_cgbench",
                     "prompt": [{"role": "system", "content": SYSTEM.replace("{width}", str(k))},
                                {"role": "user", "content": user}],
                     "ability": "get_caption", "reward_model": {"style": "rule", "ground_truth": "A"},
                     "extra_info": {"index": i, "need_tools_kwargs": True, "video_uid": "numbers", "split": "rl_data",
                                    "clue_intervals": [[3.0, 6.0]], "width": k, "duration": 12.0, "fps": 10.0,
                                    "data_source": "videocaption_cgbench"}})
    return rows


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def lay_out(root: Path, video: Path) -> None:
    """The folder of the page's "What you need". Video-MME's video is another 12 s one: videos of
    one content share a tree in lvr's cache, subtitle lines included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for bench in ("lvbench", "videomme", "cgbench"):
        (root / bench / "videos").mkdir(parents=True)
        if bench != "videomme":
            shutil.copy(video, root / bench / "videos" / "numbers.mp4")
    make_frame_number_video(root / "videomme" / "videos" / "numbers.mp4", width=160, duration=12)
    for bench in ("lvbench", "videomme"):
        write_json(root / bench / "captions" / "numbers.json", caption_tree("numbers.mp4"))
    (root / "videomme" / "subtitle").mkdir()
    (root / "videomme" / "subtitle" / "numbers.srt").write_text(f"1\n00:00:05,000 --> 00:00:07,000\n{SUBTITLE}\n")
    write_json(root / "lvbench.json", [{"key": "numbers", "uid": n, "question": f"Q{n}: which?\n(A) odd\n(B) even",
                                        "answer": "A", "question_type": ["counting"]} for n in (1, 2)])
    write_json(root / "videomme_long.json", [{"videoID": "numbers", "question_id": f"601-{n}", "duration": "long",
                                              "question": f"Q{n}: which?", "options": OPTIONS, "answer": "A",
                                              "task_type": "Counting"} for n in (1, 2)])
    write_json(root / "longvideor1-sft-qwen3-llamafactory.json", sft_samples())
    (root / "rl_data").mkdir()
    pq.write_table(pa.Table.from_pylist(rl_rows()), root / "rl_data" / "rl_data.parquet")
    for part, names in (("eval", {"SYSTEM_PROMPT": EVAL_SYSTEM, "VIDEO_QA_SYSTEM_PROMPT": QA_SYSTEM}),
                        ("data", {"CAPTION_SYSTEM_PROMPT_LOW": CAPTION_SYSTEM})):
        (root / "LongVideo-R1" / part).mkdir(parents=True)
        (root / "LongVideo-R1" / part / "constant.py").write_text(
            "".join(f"{name} = {text!r}\n" for name, text in names.items()), encoding="utf-8")
    (root / "configs").symlink_to(ROOT / "configs")   # the page's relative config paths


# -- the servers --------------------------------------------------------------------------------

def navigator(body: dict) -> str:
    """Medium, then low caption, then video_qa on that leaf, then A."""
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    script = ["<think>Clip 2.</think><tool>get_caption((2,3))</tool>",
              "<think>Closer.</think><tool>get_caption((2,3,1))</tool>",
              '<think>Look.</think><tool>video_qa((2,3,1), "Which number is shown?")</tool>']
    return script[turns] if turns < len(script) else "<think>Odd.</think><answer>A</answer>"


def vision(body: dict) -> str:
    return "<caption>Numbers count up.</caption><answer>The number 61.</answer>"


def texts(body: dict) -> list[str]:
    return [p["text"] for m in body["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "text"]


def system(body: dict) -> str:
    return body["messages"][0]["content"]


# -- the run ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ran(numbered_video, tmp_path_factory) -> dict:
    """Every command of the page, run in order in the laid-out folder: (command, process, the
    requests each server got while it ran) per command, and the folder."""
    from tiny_models import build_tiny_qwen3

    root = tmp_path_factory.mktemp("reproduce")
    lay_out(root, numbered_video)
    tiny = build_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "tiny-qwen3", vocab="small",
                            chat_template=STRIPPING_TEMPLATE)
    env = {**lvr_env(), "PATH": f"{Path(sys.executable).parent}:{lvr_env()['PATH']}",
           "LVR_CACHE_DIR": str(root / "cache")}
    runs = []
    with FakeOpenAI(navigator, models=("longvideor1",), strict_models=True) as nav, \
            FakeOpenAI(vision, models=("Qwen3-VL-32B", "Qwen/Qwen3-VL-32B-Instruct"), strict_models=True) as vl:
        shrink = {
            "lvr sft ": ["--model", tiny, "--cpu", "--bf16", "false", "--no-gradient-checkpointing", "--max-steps", "1",
                         "--batch-size", "2", "--grad-accum", "1", "--max-length", "1024", "-q"],
            "lvr rl ": ["--cpu", "--bf16", "false", "--no-gradient-checkpointing", "--max-steps", "1",
                        "--num-generations", "2", "--batch-size", "2", "--questions-per-step", "1",
                        "--max-turns", "2", "--max-tokens", "16", "--max-completion-length", "200",
                        "--caption-base-url", vl.url, "--qa-base-url", vl.url, "-q"],
        }
        for command in page_commands(PAGE.read_text(encoding="utf-8")):
            if command.startswith("vllm serve "):
                continue
            line = LAUNCHER.sub("lvr ", command.replace(NAVIGATOR_URL, nav.url).replace(VISION_URL, vl.url))
            for kind, flags in shrink.items():
                if kind in line:
                    line += " " + shlex.join(map(str, flags))
            before = len(nav.requests), len(vl.requests)
            proc = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=LVR_TIMEOUT_S)
            runs.append((command, proc, nav.requests[before[0]:], vl.requests[before[1]:]))
    return {"root": root, "runs": runs}


def run_of(ran: dict, *words: str) -> tuple:
    """The one run whose command holds every word."""
    found = [r for r in ran["runs"] if all(w in r[0] for w in words)]
    assert len(found) == 1, (words, [r[0] for r in found])
    return found[0]


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_page_runs_every_kind_of_command_it_shows(ran):
    kinds = [re.match(r"(?:\S+=\S+ )?(\S+ \S+)", c).group(1) for c, *_ in ran["runs"]]
    assert kinds == ["lvr protocol", "python -c", "python -c", "python -c", "lvr eval", "cp videomme/subtitle/*.srt",
                     "lvr eval", "lvr eval", "accelerate launch", "lvr protocol", "accelerate launch"]
    for command, proc, *_ in ran["runs"]:
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"


def test_the_prompts_come_from_the_users_copies_byte_for_byte(ran):
    prompts = ran["root"] / "prompts"
    assert (prompts / "system-template.txt").read_text(encoding="utf-8") == SYSTEM
    assert (prompts / "system-K4.txt").read_text(encoding="utf-8") == SYSTEM.replace("{width}", "4")
    assert (prompts / "video_qa.txt").read_bytes() == QA_SYSTEM.encode()
    assert (prompts / "caption.txt").read_bytes() == CAPTION_SYSTEM.encode()
    assert (prompts / "system-eval.txt").read_bytes() == EVAL_SYSTEM.encode()
    assert (prompts / "rl" / "system-template.txt").read_text(encoding="utf-8") == SYSTEM


def check_scored(path: Path, summary: Path) -> list[dict]:
    answered = records(path)
    assert len(answered) == 2 and all(r["correct"] and r["prediction"] == "A" for r in answered)
    for r in answered:
        assert r["scoring"] == "reference" and r["settings"]["protocol"] == "longvideo-r1"
        assert r["settings"]["max_rounds"] == 30 and r["accounting"]["video_qa_calls"] == 1
    report = json.loads(summary.read_text())
    assert report["scoring"] == "reference" and report["accuracy"] == 1.0
    return answered


@pytest.mark.parametrize("bench, out", [("lvbench", "lvbench"), ("videomme", "videomme_long")])
def test_eval_with_the_released_captions_asks_no_captioner(ran, bench, out):
    command, _, nav_requests, vl_requests = run_of(ran, "lvr eval", f"--captions {bench}/captions")
    root = ran["root"]
    answered = check_scored(root / f"{out}.jsonl", root / f"{out}.summary.json")
    assert answered[0]["settings"]["captions"]["dir"] == f"{bench}/captions"
    assert answered[0]["settings"]["models"]["caption"] is None
    assert answered[0]["accounting"]["caption_calls"]["made"] == 0
    # The navigator got the extracted prompt with K written in; the vision model only video_qa.
    assert {system(b) for b in nav_requests} == {SYSTEM.replace("{width}", "4")}
    assert "High-level Caption 1 from" in "".join(texts(nav_requests[0]))
    assert len(vl_requests) == 2 and all(system(b) == QA_SYSTEM for b in vl_requests)
    assert all(any(t.startswith("Video frame at ") for t in texts(b)) for b in vl_requests)
    assert answered[0]["settings"]["subtitles"] is (bench == "videomme")


def test_eval_captioned_by_lvr_shows_the_subtitles(ran):
    _, _, nav_requests, vl_requests = run_of(ran, "lvr eval", "--caption-model Qwen3-VL-32B")
    root = ran["root"]
    answered = check_scored(root / "videomme_long.captioned.jsonl", root / "videomme_long.captioned.summary.json")
    assert answered[0]["settings"]["captions"] is None and answered[0]["settings"]["subtitles"] is True
    captions = [b for b in vl_requests if b["messages"][0]["content"] != QA_SYSTEM]
    assert captions and all(system(b).startswith("Describe the ") for b in captions)
    assert any(f"Subtitle: {SUBTITLE}." in t for b in captions for t in texts(b))
    assert {system(b) for b in nav_requests} == {SYSTEM.replace("{width}", "4")}


def test_the_recipes_train_on_the_released_data(ran):
    root = ran["root"]
    sft = json.loads((root / "navigator-sft" / "lvr_sft.json").read_text())
    assert sft["steps"] == 1 and sft["data"]["format"] == "llamafactory-alpaca"
    assert sft["settings"]["mask_history"] is True and sft["settings"]["lr"] == 1e-5
    _, proc, _, vl_requests = run_of(ran, "lvr.cli rl")
    rl = json.loads((root / "navigator-rl" / "lvr_rl.json").read_text())
    assert rl["steps"] == 1 and rl["settings"]["reward"] == "reference" and rl["settings"]["lr"] == 1e-6
    assert rl["navigator"]["protocol"] == "longvideo-r1"
    assert rl["navigator"]["models"]["caption"]["model"] == "Qwen/Qwen3-VL-32B-Instruct"
    assert vl_requests and all(b["model"] == "Qwen/Qwen3-VL-32B-Instruct" for b in vl_requests)

"""`lvr dpo --vlm`: LongVPO preference training of a vision-language model on `lvr vpo` triples.

Two frame-number videos (frame N shows N; the second shows 500 onwards) are segmented
with --qa-frames and given one question per leaf, as `lvr questions` writes them; `lvr
vpo` turns them into stage-1 triples (and, with a scripted writer, stage-2 ones). A tiny
random Qwen2.5-VL (one layer each for text and vision, built offline) is trained on CPU.
The key is always option B, so 20 steps can learn to prefer it.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from lvr_test_helpers import (kill_lvr_at_first_checkpoint, load_jsonl, run_lvr, run_lvr_in_two_processes,
                              write_jsonl)
from synthetic_media import make_frame_number_video

FAST = ["--cpu", "--no-gradient-checkpointing"]
STEPS = 20
KEY = "B"


@pytest.fixture(autouse=True)
def one_thread():
    """In-process work on one thread, as the subprocesses run (OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("vlm") / "tiny-vl", vocab="small")


def question(n: int, leaf: dict, *, category: str = "single", anchors: list | None = None) -> dict:
    return {"schema": "lvr.qa/1", "id": f"{leaf['video_id']}-{category[0]}{n}", "video_id": leaf["video_id"],
            "question": "What does the clip show?", "answer": KEY, "category": category,
            "options": ["A. a red card", "B. white stripes on grey", "C. a sleeping cat", "D. rain on a window"],
            "anchors": anchors or [leaf["id"]], "distractor_leaves": {},
            "filters": [{"name": "specificity", "verdict": "pass", "reason": "ok"}]}


def caption_records(nodes: list[dict]) -> list[dict]:
    """lvr.caption/1 records of every node, naming the frame numbers each node spans."""
    return [{"schema": "lvr.caption/1", "video_id": n["video_id"], "path": n["path"], "K": n["K"], "id": n["id"],
             "level": n["level"], "start": n["start"], "end": n["end"], "model": "captioner", "prompt_hash": "p",
             "caption": f"Stripes counting frames {n['frame_range'][0]} to {n['frame_range'][1] - 1}."}
            for n in nodes]


def writer(body: dict) -> str:
    """A scripted stage-2 writer: reasons from the named clips, and from the wrong clip for the rejected answer."""
    user = body["messages"][1]["content"]
    anchors = re.search(r"about clips ([\d, ]+);", user).group(1)
    wrong = re.search(r"rejected answer: clip (\d+)", user).group(1)
    answer = re.search(r"correct answer is ([A-D])", user).group(1)
    other = next(x for x in "ABCD" if x != answer)
    return json.dumps({"chosen": f"The stripes count on in clips {anchors}.\nAnswer: {answer}",
                       "rejected": f"Clip {wrong} shows the count going on.\nAnswer: {other}"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(cache, nodes file, stage-1 triples, stage-2 triples, both in one file)."""
    root = tmp_path_factory.mktemp("vlm-data")
    videos = root / "videos"
    videos.mkdir()
    make_frame_number_video(videos / "a.mp4", width=128, fps=10, duration=12)
    make_frame_number_video(videos / "b.mp4", width=128, fps=10, duration=62,
                            extra_filters="trim=start_frame=500,setpts=PTS-STARTPTS")
    cache, nodes = root / "cache", root / "nodes.jsonl"
    proc = run_lvr("segment", videos, "--qa-frames", "-o", nodes, "--cache-dir", cache, "-q")
    assert proc.returncode == 0, proc.stderr
    records = load_jsonl(nodes)
    leaves = [r for r in records if r["level"] == "low"]
    single = [question(n, leaf) for n, leaf in enumerate(leaves[::8], 1)]
    multi = [question(n, leaf, category="multi", anchors=[leaf["id"], [leaf["id"][0], leaf["id"][1] % 4 + 1, 2]])
             for n, leaf in enumerate(leaves[::16], 1)]
    qa = write_jsonl(root / "qa.jsonl", single + multi)
    captions = write_jsonl(root / "captions.jsonl", caption_records(records))
    stage1, stage2, both = root / "stage1.jsonl", root / "stage2.jsonl", root / "both.jsonl"
    proc = run_lvr("vpo", qa, "--nodes", nodes, "--cache-dir", cache, "-o", stage1, "-q")
    assert proc.returncode == 0, proc.stderr
    with FakeOpenAI(writer, models=("writer",)) as server:
        proc = run_lvr("vpo", qa, "--stage", "2", "--nodes", nodes, "--caption-records", captions, "--cache-dir", cache,
                       "--model", "writer", "--base-url", server.url, "-o", stage2, "-q")
    assert proc.returncode == 0, proc.stderr
    assert len(load_jsonl(stage1)) == len(single) == 16 and len(load_jsonl(stage2)) == len(multi) == 8
    both.write_text(stage1.read_text() + stage2.read_text())
    return cache, nodes, stage1, stage2, both


def settings(tiny_vl: Path, triples: Path, cache: Path, out: Path, **overrides):
    from lvr.train.vlm_dpo import VlmDpoSettings

    base = dict(data=str(triples), model=str(tiny_vl), output=str(out), cache_dir=str(cache), cpu=True,
                gradient_checkpointing=False, lr=1e-3, batch_size=2, max_steps=STEPS, warmup_ratio=0.1,
                logging_steps=1, vlm=True)
    return VlmDpoSettings(**{**base, **overrides})


def completion_logp(model, processor, prompt: list[dict], images: list, answer: str) -> float:
    """log p(answer | prompt) by one forward pass, summed over the answer's tokens (its end-of-turn included)."""
    import torch

    head = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    whole = processor.apply_chat_template(prompt + [turn], tokenize=False)
    assert whole.startswith(head)
    n = processor(text=[head], images=images, return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[whole], images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float()
    token_logps = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]]
    return float(token_logps[n - 1:].sum())


# -- Done when: anchor-only reference --------------------------------------------------------------------

def test_anchor_only_reference_equals_a_direct_forward_and_the_policy_sees_every_clip(tiny_vl, data, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from lvr.prep.models.transformers_backend import load_processor
    from lvr.train.vlm_dpo import build_trainer
    from lvr.train.vpo_data import triple_messages

    cache, _, stage1, _, _ = data
    run = build_trainer(settings(tiny_vl, stage1, cache, tmp_path / "out"))
    assert run.reference == "precomputed-anchor" and run.trainer.ref_model is None
    dataset = run.trainer.train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)

    model = AutoModelForImageTextToText.from_pretrained(tiny_vl).eval()
    processor = load_processor(str(tiny_vl), AutoConfig.from_pretrained(tiny_vl))
    for row in dataset.select(range(4)):
        record = json.loads(row["triple"])
        (n,) = record["anchor_clips"]
        prompt, frames = triple_messages(record, anchor_only=True)
        assert [f["key"] for f in frames] == record["clips"][n - 1]["frame_keys"]   # the anchor clip alone
        images = [Image.open(cache / "frames" / f["key"]).convert("RGB") for f in frames]
        for answer, column in ((record["chosen"], "ref_chosen_logps"), (record["rejected"], "ref_rejected_logps")):
            assert row[column] == pytest.approx(completion_logp(model, processor, prompt, images, answer), abs=1e-4)

    # The policy's batch holds the whole interleaved input: every frame of every clip, for chosen and rejected.
    rows = [dataset[i] for i in range(2)]
    batch = run.trainer.data_collator(rows)
    records = [json.loads(r["triple"]) for r in rows]
    frames_each = [sum(len(c["frame_keys"]) for c in r["clips"]) for r in records]
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    per_row = (batch["input_ids"] == start).sum(dim=1).tolist()
    assert per_row == frames_each * 2 and batch["image_grid_thw"].shape[0] == 2 * sum(frames_each)
    assert all(records[0]["clips"][0]["frame_keys"] for _ in rows) and len(records[0]["clips"]) == 4
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert all(f"Clip {i}:" in text for i in range(1, 5))
    assert batch["ref_chosen_logps"].tolist() == pytest.approx([r["ref_chosen_logps"] for r in rows])
    # The reference's batch holds the anchor clip alone.
    reference = run.trainer._reference_collator(rows)
    anchor_frames = [len(r["clips"][r["anchor_clips"][0] - 1]["frame_keys"]) for r in records]
    assert (reference["input_ids"] == start).sum(dim=1).tolist() == anchor_frames * 2


# -- Done when: training ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_vl, data, tmp_path_factory):
    """`lvr dpo --vlm` from the command line on the stage-1 triples: full fine-tune, settings from a config file."""
    cache, _, stage1, _, _ = data
    tmp = tmp_path_factory.mktemp("vlm-run")
    config = tmp / "dpo.yaml"
    config.write_text("dpo:\n  batch_size: 2\n  warmup_ratio: 0.1\n  max_images: 16\n")
    out = tmp / "vlm-dpo"
    proc = run_lvr("dpo", "--vlm", stage1, "--model", tiny_vl, "--cache-dir", cache, "-o", out, "--config", config,
                   "--lr", "1e-3", "--max-steps", STEPS, *FAST)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "lvr_dpo.json").read_text()), proc


def test_vlm_dpo_raises_the_margin_and_the_output_captions(trained, data, tmp_path):
    cache, nodes, stage1, _, _ = data
    out, record, proc = trained
    assert record["schema"] == "lvr.dpo/1" and record["vlm"] and record["steps"] == STEPS
    assert record["reference"] == "precomputed-anchor" and record["layout"] == "full"
    s = record["settings"]
    assert (s["lr"], s["batch_size"], s["max_images"], s["reference_context"]) == (1e-3, 2, 16, "anchor")
    assert record["data"] == {"path": str(stage1), "format": "lvr.vpo/1", "records": 16, "triples": 16,
                              "identical_left_out": 0, "stages": {"1": 16}, "max_images_per_input": 8}
    curve = record["curve"]
    assert [p["step"] for p in curve] == list(range(1, STEPS + 1))
    # The anchor-only reference is not the policy's full input: the margin does not start at exactly 0.
    assert curve[0]["margin"] != 0
    mean = lambda points, key: sum(p[key] for p in points) / len(points)  # noqa: E731
    head, tail = curve[:5], curve[-5:]
    assert mean(tail, "margin") > mean(head, "margin") + 0.2, curve
    assert mean(tail, "loss") < mean(head, "loss"), curve
    print(f"\nVLM DPO: reward margin {mean(head, 'margin'):.3f} -> {mean(tail, 'margin'):.3f}, loss "
          f"{mean(head, 'loss'):.3f} -> {mean(tail, 'loss'):.3f} in {STEPS} steps")
    assert "reference precomputed-anchor" in proc.stderr and "lvr dpo: step 20/20 loss" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lvr dpo: 16 triples, 20 steps, loss ")
    assert not (out / ".lvr-dpo-data").exists()

    # The checkpoint reloads with its processor and captions clips in `lvr caption` as a transformers backend
    # (sampling, so that a model this small says something rather than stop at once).
    captions = tmp_path / "captions.jsonl"
    proc = run_lvr("caption", nodes, "--backend", "transformers", "--model", out, "--device", "cpu", "--cache-dir",
                   cache, "--levels", "high", "--max-tokens-high", "8", "--temperature", "1", "-o", captions, "-q")
    assert proc.returncode == 0, proc.stderr
    recs = load_jsonl(captions)
    assert len(recs) == 8 and all(r["model"] == str(out) and r["level"] == "high" for r in recs)
    assert all(r["tokens"]["prompt_tokens"] > 100 and r["caption"] for r in recs)   # the frames went in


def test_full_context_reference_starts_at_a_zero_margin(tiny_vl, data, tmp_path):
    """--reference-context full scores the whole input: at step 1 the policy is the reference."""
    from lvr.train.vlm_dpo import run_vlm_dpo

    cache, _, stage1, _, _ = data
    record = run_vlm_dpo(settings(tiny_vl, stage1, cache, tmp_path / "full", reference_context="full", max_steps=2))
    assert record["reference"] == "precomputed-full" and record["curve"][0]["margin"] == 0


# -- Done when: stage 2, and the trainer kit's ways (LoRA, resume, usage errors, two processes) ---------------

def test_a_mix_of_stage1_and_stage2_triples_trains_with_lora(tiny_vl, data, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from lvr.prep.models.transformers_backend import load_processor
    from lvr.train.vlm_dpo import run_vlm_dpo

    cache, _, _, stage2, both = data
    triples = load_jsonl(stage2)
    assert all(t["rejected"].endswith(tuple(f"Answer: {x}" for x in "ACD")) for t in triples)
    out = tmp_path / "lora"
    record = run_vlm_dpo(settings(tiny_vl, both, cache, out, lora=True, lora_r=4, lora_targets="q_proj,v_proj",
                                  lr=5e-2, max_steps=4))
    assert record["data"]["stages"] == {"1": 16, "2": 8} and record["data"]["triples"] == 24
    assert record["layout"] == "merged" and record["reference"] == "precomputed-anchor" and record["steps"] == 4
    assert all(isinstance(p["loss"], float) for p in record["curve"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert load_processor(str(out), AutoConfig.from_pretrained(out)).image_processor is not None
    merged = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(tiny_vl)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed


def test_a_qwen3_vl_model_trains_and_measures_similarity_too(data, tmp_path):
    from transformers import AutoModelForImageTextToText

    from tiny_models import build_tiny_qwen3_vl

    from lvr.train.visual_similarity import VisionMeasure
    from lvr.train.vlm_dpo import run_vlm_dpo

    cache, _, _, _, both = data
    model = build_tiny_qwen3_vl(tmp_path / "tiny-qwen3-vl", vocab="small")
    record = run_vlm_dpo(settings(model, both, cache, tmp_path / "out", max_steps=2))
    assert record["steps"] == 2 and record["reference"] == "precomputed-anchor"
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "out")).__name__ == \
        "Qwen3VLForConditionalGeneration"
    triple = load_jsonl(both)[0]
    frames = [(cache / "frames" / key).read_bytes() for clip in triple["clips"][:2] for key in clip["frame_keys"]]
    measure = VisionMeasure(str(model), device="cpu")
    features = measure.frame_features(frames)
    similarities = measure.frame_similarities(features, features)
    assert features.shape == (len(frames), 32) and similarities.diagonal() == pytest.approx(1.0, abs=1e-5)


def test_usage_errors_and_dry_run(tiny_vl, data, tmp_path):
    from tiny_models import build_tiny_qwen3

    from lvr.train.dpo import DpoError
    from lvr.train.vlm_dpo import load_triples

    cache, _, stage1, _, _ = data
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**load_jsonl(stage1)[0], "anchor_clips": [9]}])
    for path, max_images, message in ((pairs, 64, f"{pairs}:1: not an lvr.vpo/1 record"),
                                      (bad, 64, f"{bad}:1: 'anchor_clips' must name clips by number"),
                                      (stage1, 3, "4 clips do not fit in --max-images 3")):
        with pytest.raises(DpoError, match=re.escape(message)):
            load_triples(path, max_images)
    with pytest.raises(DpoError, match="--reference-context takes anchor or full, not 'half'"):
        settings(tiny_vl, stage1, cache, tmp_path / "o", reference_context="half").check()

    text_model = build_tiny_qwen3(tmp_path / "qwen3", vocab="small")
    for args, message in (
        ([pairs, "--model", tiny_vl, "--reference-context", "full"], "--reference-context only applies with --vlm"),
        ([stage1, "--vlm", "--model", text_model, "--cpu"], "a text-only model; --vlm trains a vision-language"),
        ([stage1, "--vlm", "--model", tiny_vl, "--max-length", "60", "-q", *FAST],
         "tokens, over --max-length 60; lower --max-images or --image-side"),
    ):
        proc = run_lvr("dpo", *args, "--cache-dir", cache, "-o", tmp_path / "out", timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
    assert not (tmp_path / "out").exists()
    proc = run_lvr("dpo", "--vlm", stage1, "--model", tiny_vl, "-o", tmp_path / "o", "--dry-run", "--max-images", "4")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["settings"]["vlm"] and shown["settings"]["max_images"] == 4
    assert shown["data"] == {"format": "lvr.vpo/1", "records": 16, "triples": 16, "identical_left_out": 0,
                             "stages": {"1": 16}, "max_images_per_input": 4}


def test_a_killed_run_resumes(tiny_vl, data, tmp_path):
    from lvr.train.sft import last_checkpoint

    cache, _, stage1, _, _ = data
    out = tmp_path / "resumable"
    args = ["dpo", "--vlm", stage1, "--model", tiny_vl, "--cache-dir", cache, "-o", out, "--lr", "1e-3",
            "--save-steps", "2", *FAST]
    proc = kill_lvr_at_first_checkpoint(*args, "--max-steps", "400", "-q", out=out)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resume_from = last_checkpoint(out)
    assert resume_from is not None and not (out / "lvr_dpo.json").exists()
    done = int(Path(resume_from).name.split("-")[1])
    proc = run_lvr(*args, "--max-steps", str(done + 2), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {resume_from}" in proc.stderr
    record = json.loads((out / "lvr_dpo.json").read_text())
    assert record["resumed_from"] == resume_from and record["steps"] == done + 2
    assert [p["step"] for p in record["curve"]] == list(range(1, done + 3))


@pytest.mark.slow  # trains in two processes
def test_two_processes(tiny_vl, data, tmp_path):
    """accelerate launch, 2 CPU processes over gloo: the anchor-only reference is scored once, shared through OUT."""
    cache, _, _, _, both = data
    out = tmp_path / "two"
    proc = run_lvr_in_two_processes("dpo", "--vlm", both, "--model", tiny_vl, "--cache-dir", cache, "-o", out,
                                    "--max-steps", "3", "--lr", "1e-3", "-q", *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_dpo.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 3 and record["reference"] == "precomputed-anchor"
    assert proc.stderr.count("lvr dpo: 24 triples, 3 steps") == 1
    assert (out / "model.safetensors").is_file() and not (out / ".lvr-dpo-data").exists()

"""The LongVideo-R1 recipes (configs/*_longvideo_r1.yaml) load through `--config` and carry the reference's values.

The values are those of the reference's own files: LLaMA-Factory/examples/train_full/qwen3.yaml
(SFT) and verl-tool/examples/train/get_caption/train_7b_videoqa.sh (RL) in qiujihao19/LongVideo-R1.
Each run here is the real command with --dry-run, in process: it reads the config with the real
loader, builds and checks the settings, reads the data, and prints them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lvr_test_helpers import REPO

CONFIGS = REPO / "configs"


def dry_run(*args) -> dict:
    from typer.testing import CliRunner

    from lvr.cli.main import app

    result = CliRunner().invoke(app, [str(a) for a in args] + ["--dry-run"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sft_recipe(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Which clip?"},
                                             {"role": "assistant", "content": "<think>x</think><answer>A</answer>"}]})
                    + "\n")
    shown = dry_run("sft", data, "--config", CONFIGS / "sft_longvideo_r1.yaml", "-o", tmp_path / "out")
    s = shown["settings"]
    # per-device batch 8, gradient accumulation 4, lr 1e-5, cosine, warmup 0.1, 3 epochs, cutoff 24576
    assert (s["batch_size"], s["grad_accum"], s["lr"], s["scheduler"], s["warmup_ratio"], s["epochs"],
            s["max_length"]) == (8, 4, 1e-5, "cosine", 0.1, 3.0, 24576)
    assert (s["model"], s["lora"], s["mask_history"], s["bf16"], s["save_steps"]) == \
        ("Qwen/Qwen3-8B", False, True, "true", 128)
    assert shown["data"]["samples"] == 1


def test_sft_recipe_runs_under_zero3():
    """ZeRO-3 has no lvr setting: the recipe names the accelerate config, which is stage 3."""
    from accelerate.commands.config.config_args import load_config_from_file

    text = (CONFIGS / "sft_longvideo_r1.yaml").read_text()
    assert "--config_file configs/accelerate/zero3.yaml" in text
    zero3 = load_config_from_file(str(CONFIGS / "accelerate" / "zero3.yaml"))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3


def test_rl_recipe(numbered_video, tmp_path):
    from lvr.train.rl import RlSettings

    (tmp_path / "numbers.mp4").write_bytes(numbered_video.read_bytes())
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"schema": "lvr.qa/1", "id": "q1", "video": "numbers.mp4", "question": "Which?",
                              "options": ["A. x", "B. y"], "answer": "A", "clues": [[1, 2]]}) + "\n")
    shown = dry_run("rl", qa, "--config", CONFIGS / "rl_longvideo_r1.yaml", "-o", tmp_path / "out")
    s = shown["settings"]
    # batch 12, group 16, lr 1e-6, 10 warmup steps, KL 1e-4 low-variance, 2 epochs, 15 turns, response 12288
    assert (s["questions_per_step"], s["num_generations"], s["lr"], s["warmup_steps"], s["beta"], s["epochs"],
            s["max_turns"], s["max_completion_length"]) == (12, 16, 1e-6, 10, 1e-4, 2.0, 15, 12288)
    assert (s["scheduler"], s["reward"], s["temperature"], s["top_p"], s["max_tokens"]) == \
        ("constant_with_warmup", "reference", 1.0, 1.0, 8192)
    assert (s["w_answer"], s["w_localisation"], s["w_repeat"], s["clue_gap"]) == (1.0, 1.0, 0.2, 5.0)
    # one process here: all 12 x 16 rollouts of a step accumulate on it
    assert s["batch_size"] * s["grad_accum"] == 12 * 16
    assert shown["data"]["items"] == 1
    # 12 questions x 16 rollouts per optimizer step on the reference's 6 GPUs, or on 8
    settings = RlSettings(**{k: v for k, v in s.items()})
    assert settings.for_processes(6).grad_accum == 8 and settings.for_processes(8).grad_accum == 6
    assert "k3" in settings.record_extras()["kl_estimator"]  # TRL's KL term: the low-variance estimator


def test_rl_recipe_accelerate_config():
    """The reference's FSDP with parameter and optimizer offload on 6 GPUs -> ZeRO-3 with CPU offload, 6 processes."""
    from accelerate.commands.config.config_args import load_config_from_file

    assert "--config_file configs/accelerate/zero3_offload_6gpu.yaml" in (CONFIGS / "rl_longvideo_r1.yaml").read_text()
    config = load_config_from_file(str(CONFIGS / "accelerate" / "zero3_offload_6gpu.yaml"))
    assert config.distributed_type == "DEEPSPEED" and config.num_processes == 6
    ds = config.deepspeed_config
    assert (ds["zero_stage"], ds["offload_param_device"], ds["offload_optimizer_device"]) == (3, "cpu", "cpu")


@pytest.mark.parametrize("name, cited", [
    ("sft_longvideo_r1.yaml", ["LLaMA-Factory/examples/train_full/qwen3.yaml"]),
    ("rl_longvideo_r1.yaml", ["verl-tool/examples/train/get_caption/train_7b_videoqa.sh",
                              "verl-tool/verl/verl/utils/reward_score/longvideor1_score.py",
                              "verl-tool/verl_tool/trainer/config/ppo_trainer.yaml"]),
])
def test_recipes_cite_the_reference_files(name, cited):
    text = (CONFIGS / name).read_text()
    assert "qiujihao19/LongVideo-R1" in text
    for path in cited:
        assert path in text, path
    # the reference states these values: the recipe must not say otherwise
    assert not re.search(r"does not (give|state|say)|unknown|our choice", text, re.I)
    # every option line says where its value comes from
    for line in text.splitlines():
        if re.match(r"\s+\w+:\s*\S", line):
            assert "#" in line, line


def test_configs_readme_lists_the_recipes():
    readme = (CONFIGS / "README.md").read_text()
    for name in ("sft_longvideo_r1.yaml", "rl_longvideo_r1.yaml", "accelerate/zero3_offload_6gpu.yaml"):
        assert f"`{name}`" in readme, name

"""`train.trainer_kit`: what sft, dpo and rl share, checked once for all three (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvr.train.dpo import DpoError, DpoSettings
from lvr.train.rl import RlError, RlSettings
from lvr.train.sft import SftError, SftSettings
from lvr.train.trainer_kit import (ADAPTER_DIR, SCHEDULERS, check_model, check_output_folder, curve_ends,
                                   drop_torn_checkpoints, last_checkpoint, log_curve, lora_config, lora_layout,
                                   lora_target_modules, main_log, report_to_list, resolve_bf16, training_arguments)


def every_trainer(**fields) -> list:
    """Settings of sft, dpo and rl with the same `fields`."""
    return [SftSettings(data="d.jsonl", model="m", output="o", **fields),
            DpoSettings(data="p.jsonl", model="m", output="o", **fields),
            RlSettings(qa="qa.jsonl", model="m", output="o", **fields)]


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, trackers", [
    ("none", []), ("", []), ("wandb", ["wandb"]), ("wandb,tensorboard", ["wandb", "tensorboard"]),
    ("wandb, tensorboard", ["wandb", "tensorboard"]), ("wandb tensorboard", ["wandb", "tensorboard"]),
    ("none,wandb", ["wandb"]),
])
def test_report_to_is_parsed_alike_for_every_trainer(text, trackers):
    assert report_to_list(text) == trackers
    for settings in every_trainer(report_to=text):
        assert training_arguments(settings, Path("out"), False)["report_to"] == trackers, type(settings).__name__


def test_every_trainer_checks_the_scheduler_with_one_list():
    from transformers import SchedulerType

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}  # each one a schedule transformers has
    for name in SCHEDULERS:
        for settings in every_trainer(scheduler=name):
            settings.check()
    for settings, error in zip(every_trainer(scheduler="zigzag"), (SftError, DpoError, RlError)):
        with pytest.raises(error, match="unknown --scheduler 'zigzag'"):
            settings.check()


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0, "--lr must be positive"), ("epochs", -1, "--epochs must be positive"),
    ("batch_size", 0, "--batch-size must be positive"), ("grad_accum", 0, "--grad-accum must be positive"),
    ("save_steps", 0, "--save-steps must be positive"), ("max_steps", 0, "--max-steps must be positive"),
    ("warmup_ratio", 1.0, r"--warmup-ratio must be in \[0, 1\)"), ("weight_decay", -0.1, "--weight-decay"),
    ("bf16", "maybe", "--bf16 must be auto, true or false"),
])
def test_common_settings_are_checked_once_for_all(field, value, message):
    for settings, error in zip(every_trainer(**{field: value}), (SftError, DpoError, RlError)):
        with pytest.raises(error, match=message):
            settings.check()


def test_each_trainer_keeps_its_own_defaults():
    sft, dpo, rl = every_trainer()
    assert (sft.lr, sft.epochs, sft.scheduler, sft.warmup_ratio, sft.batch_size) == (1e-5, 3.0, "cosine", 0.1, 1)
    assert (dpo.lr, dpo.epochs, dpo.scheduler, dpo.warmup_ratio, dpo.batch_size) == (5e-7, 1.0, "cosine", 0.1, 1)
    assert (rl.lr, rl.epochs, rl.scheduler, rl.warmup_ratio, rl.batch_size, rl.grad_accum) == (1e-6, 1.0, "constant",
                                                                                              0.0, 4, 4)
    for settings in (sft, dpo, rl):
        settings.check()
        assert (settings.bf16, settings.seed, settings.save_steps, settings.report_to) == ("auto", 42, 500, "none")


def test_bf16_resolves_off_on_the_cpu():
    import torch

    assert resolve_bf16("auto", cpu=True) is False
    assert resolve_bf16(" TRUE ") is True and resolve_bf16("yes", cpu=True) is True
    assert resolve_bf16("off") is False and resolve_bf16("0") is False
    assert resolve_bf16("auto") is bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    with pytest.raises(RlError, match="--bf16 must be auto, true or false, not 'maybe'"):
        resolve_bf16("maybe", cpu=True, error=RlError)
    for settings in every_trainer(bf16="auto", cpu=True):
        assert training_arguments(settings, Path("out"), resolve_bf16(settings.bf16, cpu=settings.cpu))["bf16"] is False


def test_training_arguments_are_accepted_by_every_trl_config(tmp_path, monkeypatch):
    """The shared fields build SFTConfig, DPOConfig and GRPOConfig; FSDP's own checkpointing turns ours off."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    sft, dpo, rl = every_trainer(cpu=True, report_to="none", lr=3e-4, grad_accum=2)
    for config_class, settings in ((SFTConfig, sft), (DPOConfig, dpo), (GRPOConfig, rl)):
        extra = {"num_generations": 4, "per_device_train_batch_size": 4} if config_class is GRPOConfig else {}
        config = config_class(**{**training_arguments(settings, tmp_path, False), **extra})
        assert (config.learning_rate, config.gradient_accumulation_steps, config.seed) == (3e-4, 2, 42)
        assert config.lr_scheduler_type.value == settings.scheduler and config.report_to == []
        assert config.gradient_checkpointing is True
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = training_arguments(sft, tmp_path, True)
    assert args["gradient_checkpointing"] is False and args["gradient_checkpointing_kwargs"] is None
    assert args["model_init_kwargs"] == {"dtype": "float32", "device_map": None}  # full weights train in float32
    lora = SftSettings(data="d", model="m", output="o", lora=True)
    assert training_arguments(lora, tmp_path, True)["model_init_kwargs"]["dtype"] == "bfloat16"  # a frozen base
    assert training_arguments(lora, tmp_path, False)["model_init_kwargs"]["dtype"] == "float32"


# -- processes, model, checkpoints ----------------------------------------------------------------

def test_only_the_main_process_logs(monkeypatch):
    lines: list[str] = []
    monkeypatch.setenv("RANK", "1")
    main_log(lines.append)("from rank 1")
    monkeypatch.setenv("RANK", "0")
    main_log(lines.append)("from rank 0")
    main_log(None)("nowhere")
    assert lines == ["from rank 0"]


def test_check_model(tmp_path):
    assert check_model("Qwen/Qwen3-8B", error=SftError) == "Qwen/Qwen3-8B"  # a hub id is passed on
    with pytest.raises(RlError, match="no such model folder"):
        check_model(str(tmp_path / "nowhere"), error=RlError)
    with pytest.raises(DpoError, match="no config.json"):
        check_model(str(tmp_path), error=DpoError)
    (tmp_path / "config.json").write_text("{}")
    assert check_model(str(tmp_path), error=SftError) == str(tmp_path)


def _checkpoint(output: Path, step: int, *, complete: bool = True) -> Path:
    folder = output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) if complete else '{"glob')
    return folder


def test_output_folder_needs_resume_for_an_earlier_run(tmp_path):
    out = tmp_path / "out"
    assert check_output_folder(str(out), False, error=SftError) == (out, None)  # a new folder
    assert check_output_folder(str(out), True, error=SftError) == (out, None)   # --resume with nothing to resume
    _checkpoint(out, 2)
    _checkpoint(out, 10)
    _checkpoint(out, 12, complete=False)  # killed while saving
    with pytest.raises(RlError, match=r"holds checkpoints of an earlier run; pass --resume"):
        check_output_folder(str(out), False, error=RlError)
    assert check_output_folder(str(out), True, error=RlError) == (out, str(out / "checkpoint-10"))
    assert last_checkpoint(out) == str(out / "checkpoint-10")  # 10 beats 2 by number, not by name

    assert drop_torn_checkpoints(out, last_checkpoint(out)) == ["checkpoint-12"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-2"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DpoError, match="exists and is not a folder"):
        check_output_folder(str(a_file), True, error=DpoError)


# -- LoRA -------------------------------------------------------------------------------------

def test_lora_targets_and_config():
    assert lora_target_modules("all-linear") == "all-linear"
    assert lora_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert lora_target_modules("['q_proj', 'v_proj']") == ["q_proj", "v_proj"]  # a YAML list's text form
    assert lora_target_modules(["q_proj", " k_proj "]) == ["q_proj", "k_proj"]
    assert lora_target_modules("") == []

    config = lora_config(r=4, alpha=8, dropout=0.1, targets="q_proj,v_proj")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.task_type == "CAUSAL_LM"

    settings = SftSettings(data="d", model="m", output="o", lora=True, lora_r=8, lora_targets="all-linear")
    assert settings.peft_config().target_modules == "all-linear" and settings.peft_config().r == 8
    assert SftSettings(data="d", model="m", output="o").peft_config() is None
    with pytest.raises(DpoError, match="--lora-targets is empty"):
        DpoSettings(data="d", model="m", output="o", lora=True, lora_targets=" , ").check()

    assert lora_layout(True, True) == {"layout": "merged", "adapter": ADAPTER_DIR}
    assert lora_layout(True, False) == {"layout": "adapter", "adapter": "."}
    assert lora_layout(False, True) == {"layout": "full", "adapter": None}


# -- curves -------------------------------------------------------------------------------------

def test_log_curve_keeps_logged_steps_and_rounds():
    history = [{"loss": 0.69314718, "learning_rate": 1.23456789e-5, "epoch": 0.123456, "step": 1},
               {"eval_loss": 1.0, "step": 1},                                   # no loss: not a training step
               {"loss": 0.5, "rewards/margins": 0.1234567, "step": 2},
               {"train_runtime": 3.0, "step": 2}]
    curve = log_curve(history, {"loss": "loss", "rewards/margins": "margin", "learning_rate": "lr", "epoch": "epoch"})
    assert curve == [{"step": 1, "loss": 0.693147, "lr": 1.23456789e-5, "epoch": 0.1235},
                     {"step": 2, "loss": 0.5, "margin": 0.123457}]
    assert curve_ends(curve, "loss") == (0.693147, 0.5) and curve_ends(curve, "margin") == (0.123457, 0.123457)
    assert curve_ends(curve, "reward") == (None, None)
    assert log_curve(history, {"loss": "loss"}, marker="reward") == []


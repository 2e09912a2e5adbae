"""`--num-processes` and `--accelerate-config`: sft, dpo and rl start `accelerate launch` themselves (train/launch.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvr.prep.options import OptionError
from lvr.train.launch import (LAUNCHER_VARIABLES, MASK, LaunchSettings, launch_command, planned_processes,
                              shown, under_launcher, without_launch_flags)
from lvr_test_helpers import ONE_THREAD, lvr_env, run_lvr, trajectory, write_jsonl

VALUED = {"-o", "--output", "--model", "--lr", "--chat-template", "--base-url", "--api-key", "--caption-api-key"}
TRAINERS = ("sft", "dpo", "rl")


@pytest.fixture
def by_hand(monkeypatch):
    """This process as if started by hand: no launcher variables in the environment."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def accelerate_config(tmp_path) -> Path:
    path = tmp_path / "zero 3.yaml"
    path.write_text("distributed_type: DEEPSPEED\nnum_processes: 6\n")
    return path


# -- the argument list ---------------------------------------------------------------------------

def test_launch_flags_leave_in_every_form_and_every_other_word_stays_as_typed():
    args = ["sft", "my data.jsonl", "--num-processes", "2", "--model=Qwen/Qwen3 8B", "-o", "out dir",
            "--accelerate-config=cfg.yaml", "--base-url", "http://a/v1", "--base-url", "http://b/v1",
            "--num-processes=3", "--lr", "--num-processes",  # a value that looks like the flag is a value
            "--accelerate-config", "other.yaml", "--lora", "--report-to=none", "--", "--num-processes"]
    assert without_launch_flags(args, VALUED) == [
        "sft", "my data.jsonl", "--model=Qwen/Qwen3 8B", "-o", "out dir", "--base-url", "http://a/v1",
        "--base-url", "http://b/v1", "--lr", "--num-processes", "--lora", "--report-to=none", "--", "--num-processes"]


def test_the_launch_command_runs_lvr_under_accelerate(accelerate_config):
    args = ["dpo", "--vlm", "pairs.jsonl", "--num-processes", "4", "-o", "out"]
    plain = launch_command(LaunchSettings(num_processes=4), args, VALUED)
    assert plain[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert plain[-7:] == ["-m", "lvr.cli", "dpo", "--vlm", "pairs.jsonl", "-o", "out"]
    assert plain[plain.index("--num_processes") + 1] == "4" and "--multi_gpu" in plain
    assert plain[plain.index("--main_process_port") + 1] == "0"  # runs side by side each find a free port

    configured = launch_command(LaunchSettings(accelerate_config=str(accelerate_config)), args, VALUED)
    assert configured[3:5] == ["--config_file", str(accelerate_config)]
    assert "--num_processes" not in configured and "--multi_gpu" not in configured  # the config's own
    overridden = launch_command(LaunchSettings(num_processes=2, accelerate_config=str(accelerate_config)), args,
                                VALUED)
    assert overridden[3:7] == ["--config_file", str(accelerate_config), "--num_processes", "2"]


def test_the_echoed_command_masks_every_api_key():
    line = shown(["lvr", "rl", "--api-key", "sk-one", "--caption-api-key=sk-two", "--qa-api-key", "sk three",
                  "--model", "m"])
    assert "sk-" not in line and "three" not in line
    assert line.count(MASK) == 3 and "--model m" in line


# -- where this process runs -----------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_VARIABLES)
def test_a_launcher_is_told_from_its_variables(name):
    assert under_launcher({name: "0"}) == name
    assert under_launcher({name: ""}) is None
    assert under_launcher({"PATH": "/bin", "ACCELERATE_LOG_LEVEL": "info"}) is None


def test_the_process_count_comes_from_the_flag_the_config_or_the_launcher(by_hand, accelerate_config):
    assert not LaunchSettings().wanted and not LaunchSettings(num_processes=1).wanted
    assert LaunchSettings(num_processes=2).wanted and LaunchSettings(accelerate_config=str(accelerate_config)).wanted
    assert planned_processes(LaunchSettings()) == 1
    assert planned_processes(LaunchSettings(num_processes=3)) == 3
    assert planned_processes(LaunchSettings(accelerate_config=str(accelerate_config))) == 6
    assert planned_processes(LaunchSettings(num_processes=2, accelerate_config=str(accelerate_config))) == 2
    by_hand.setenv("WORLD_SIZE", "4")
    by_hand.setenv("LOCAL_RANK", "1")
    assert planned_processes(LaunchSettings(num_processes=2)) == 4  # inside a launch the flag is inert


def test_bad_launch_settings_are_option_errors(tmp_path):
    with pytest.raises(OptionError, match="--num-processes must be at least 1"):
        LaunchSettings(num_processes=0)
    with pytest.raises(OptionError, match="--accelerate-config .*missing.yaml: cannot read"):
        LaunchSettings(accelerate_config=str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(OptionError, match="list.yaml: must hold a mapping"):
        LaunchSettings(accelerate_config=str(tmp_path / "list.yaml"))


# -- through the command line ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("launch") / "trajectories.jsonl",
                       [trajectory(i, short=True) for i in range(4)])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("command", TRAINERS)
def test_bad_launch_flags_are_one_usage_error_line(command, tmp_path):
    base = [command, "data.jsonl", "--model", "m", "-o", tmp_path / "out"]
    proc = run_lvr(*base, "--num-processes", "0")
    assert proc.returncode == 2 and len(_error_lines(proc.stderr)) == 1, proc.stderr
    assert f"lvr {command}: error:" in proc.stderr and "--num-processes" in proc.stderr

    proc = run_lvr(*base, "--accelerate-config", tmp_path / "nope.yaml")
    assert proc.returncode == 2 and len(_error_lines(proc.stderr)) == 1, proc.stderr
    assert "--accelerate-config" in proc.stderr and "nope.yaml" in proc.stderr


def test_a_config_file_sets_the_launch_options(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"accelerate_config: {tmp_path / 'nope.yaml'}\n")
    proc = run_lvr("sft", "data.jsonl", "--model", "m", "-o", tmp_path / "out", "--config", config)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr, proc.stderr


def test_a_bad_setting_is_told_once_before_any_process_starts(trajectories, tmp_path):
    proc = run_lvr("sft", trajectories, "--model", "m", "-o", tmp_path / "out", "--num-processes", "2", "--lr", "-1")
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == ["lvr sft: error: --lr must be positive, not -1.0"]


def test_dry_run_launches_nothing(trajectories, tmp_path):
    proc = run_lvr("sft", trajectories, "--model", "m", "-o", tmp_path / "out", "--num-processes", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["data"]["samples"] == 4
    assert "launching" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_launched_process_does_not_launch_again(trajectories, tmp_path):
    """Under a launcher the flags are inert: the command trains in this process (here it stops at the
    missing model), and says the count it was asked for is not the launcher's."""
    env = {**lvr_env(), "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    proc = run_lvr("sft", trajectories, "--model", tmp_path / "no-model", "-o", tmp_path / "out",
                   "--num-processes", "2", env=env)
    assert proc.returncode == 2
    assert "launching" not in proc.stderr
    assert "--num-processes 2 ignored: already started by a launcher (LOCAL_RANK=0" in proc.stderr
    assert "no such model folder" in proc.stderr


# -- signals ---------------------------------------------------------------------------------------

# The launcher stand-in: it starts a worker, writes both pids, and waits; both restore Python's
# SIGINT handler, which a process started in the background may have inherited as ignored.
WORKER = "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); time.sleep(600)"
LAUNCHER = (
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    f"worker = subprocess.Popen([sys.executable, '-c', {WORKER!r}])\n"
    "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {worker.pid}')\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(600)\n"
)
PARENT = "import sys; from lvr.train.launch import run_launched; sys.exit(run_launched(sys.argv[1:]))"


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_until(done, what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _start_parent(*command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PARENT, *command], stdin=subprocess.DEVNULL,
                            env={**os.environ, **ONE_THREAD}, start_new_session=True)


def _launched_pids(tmp_path) -> tuple[subprocess.Popen, list[int]]:
    pids = tmp_path / "pids"
    parent = _start_parent(sys.executable, "-c", LAUNCHER, str(pids))
    _wait_until(pids.exists, "the launcher stand-in never wrote its pids")
    return parent, [int(p) for p in pids.read_text().split()]


def _end(parent: subprocess.Popen, pids: list[int]) -> None:
    """Leave nothing running that the test started."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if parent.poll() is None:
        parent.kill()
    parent.wait()


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@LINUX_ONLY
def test_the_launchers_exit_status_is_the_commands(tmp_path):
    parent = _start_parent(sys.executable, "-c", "import sys; sys.exit(3)")
    assert parent.wait(timeout=60) == 3


@LINUX_ONLY
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_command_stops_the_launcher_and_its_processes(tmp_path, signum):
    parent, pids = _launched_pids(tmp_path)
    try:
        os.kill(parent.pid, signum)
        assert parent.wait(timeout=60) == 128 + signum
        _wait_until(lambda: not any(map(_alive, pids)), "a launched process outlived the command")
    finally:
        _end(parent, pids)


@LINUX_ONLY
def test_the_launcher_stops_when_the_command_is_killed(tmp_path):
    parent, pids = _launched_pids(tmp_path)
    try:
        parent.kill()  # SIGKILL: nothing is passed on; the launcher still gets SIGTERM
        parent.wait(timeout=60)
        _wait_until(lambda: not _alive(pids[0]), "the launcher outlived the killed command")
    finally:
        _end(parent, pids)


# -- for real ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_launches_two_cpu_processes_itself(trajectories, tmp_path):
    """`lvr sft --num-processes 2` on the CPU: one accelerate launch, two processes over gloo, one report."""
    from tiny_models import STRIPPING_TEMPLATE, build_tiny_qwen3

    model = build_tiny_qwen3(tmp_path / "tiny qwen3", vocab="small", chat_template=STRIPPING_TEMPLATE)
    out = tmp_path / "out dir"
    proc = run_lvr("sft", trajectories, "--model", model, "-o", out, "--num-processes", "2", "--max-steps=2",
                   "--lr", "5e-2", "--cpu", "--no-gradient-checkpointing", "-q")
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "lvr_sft.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 2
    assert record["settings"]["lr"] == 5e-2
    assert proc.stderr.count("lvr sft: launching 2 processes: ") == 1
    assert proc.stderr.count("lvr sft: 4 samples, 2 steps") == 1  # the main process alone reports

"""Config files: the user config, --config, strict keys with a closest-key hint, and configs/ examples."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typer

from lvr.cli.main import COMMANDS, app
from lvr_test_helpers import lvr_env, run_lvr

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "configs").glob("*.*") if p.suffix in (".yaml", ".toml"))


def lvr(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return run_lvr(*args, timeout=120, env={**lvr_env(), **(env or {})}, cwd=cwd)


def parse(command: str, argv: list[str]) -> dict:
    """The parameters `lvr COMMAND argv` would run with (the command itself is not run)."""
    group = typer.main.get_command(app)
    cmd = group.commands[command]
    ctx = cmd.make_context(command, list(argv), parent=group.make_context("lvr", [command]))
    return ctx.params


def required_args(command: str) -> list[str]:
    group = typer.main.get_command(app)
    return ["x" for p in group.commands[command].params if p.param_type_name == "argument" and p.required]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads_for_every_command(example):
    from typer._click.exceptions import MissingParameter

    used = 0
    for command in COMMANDS:
        extra: list[str] = []
        for _ in range(5):  # fill options the command requires and the file does not set
            try:
                params = parse(command, required_args(command) + extra + ["--config", str(example)])
                break
            except MissingParameter as e:
                extra += [e.param.opts[0], "x"]
        else:
            pytest.fail(f"{command}: too many required options")
        used += any(params.get(k) not in (None, (), [], False) for k in ("model", "base_url"))
    assert used, f"{example.name} sets no model or endpoint for any command"


def test_vllm_example_gives_each_command_its_own_model():
    vllm = ROOT / "configs" / "vllm.yaml"
    ask = parse("ask", ["v.mp4", "q", "--config", str(vllm)])
    assert ask["model"] == "Qwen/Qwen3-8B" and ask["base_url"] == ("http://localhost:8000/v1",)
    assert ask["caption_model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert ask["caption_base_url"] == ("http://localhost:8001/v1",)  # written as a string
    caption = parse("caption", ["nodes.jsonl", "--config", str(vllm)])
    assert caption["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and caption["concurrency"] == 16
    synth = parse("synthesize", ["--config", str(vllm)])
    assert synth["model"] == "Qwen/Qwen3-8B"


def test_a_single_url_may_be_a_string_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_url: http://a:1/v1\nmodel: m\nmax_rounds: 7\n")
    params = parse("ask", ["v.mp4", "q", "--config", str(cfg)])
    assert params["base_url"] == ("http://a:1/v1",) and params["max_rounds"] == 7
    params = parse("ask", ["v.mp4", "q", "--config", str(cfg), "--max-rounds", "3", "--base-url", "http://b:2/v1"])
    assert params["base_url"] == ("http://b:2/v1",) and params["max_rounds"] == 3


def test_user_config_is_read_first_and_config_file_overrides_it(tmp_path, monkeypatch):
    home = tmp_path / "xdg"
    (home / "lvr").mkdir(parents=True)
    (home / "lvr" / "config.toml").write_text('caption_model = "vl"\nmax_rounds = 9\n[ask]\nmodel = "nav"\n')
    other = tmp_path / "run.yaml"
    other.write_text("max_rounds: 4\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    params = parse("ask", ["v.mp4", "q"])
    assert (params["model"], params["caption_model"], params["max_rounds"]) == ("nav", "vl", 9)
    params = parse("ask", ["v.mp4", "q", "--config", str(other)])
    assert (params["model"], params["max_rounds"]) == ("nav", 4)


@pytest.mark.parametrize("text, expected", [
    ("caption_modle: x\n", "unknown option 'caption_modle'; did you mean 'caption_model'?"),
    ("ask:\n  max_round: 3\n", "[ask]: unknown option 'max_round'; did you mean 'max_rounds'?"),
    ("completely_unrelated: 1\n", "unknown option 'completely_unrelated'"),
    ("ask: 3\n", "[ask] must be a table of options"),
])
def test_unknown_keys_are_errors_naming_the_closest_key(tmp_path, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    proc = lvr("ask", "video.mp4", "q", "--config", cfg)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvr ask: error: ") and expected in lines[0], proc.stderr
    assert str(cfg) in lines[0] and "Traceback" not in proc.stderr


def test_a_misspelled_key_in_the_user_config_names_that_file(tmp_path):
    home = tmp_path / "xdg"
    (home / "lvr").mkdir(parents=True)
    (home / "lvr" / "config.toml").write_text('base_ulr = "http://x/v1"\n')
    proc = lvr("segment", "nothing.mp4", env={"XDG_CONFIG_HOME": str(home)})
    assert proc.returncode == 2
    assert "lvr/config.toml: unknown option 'base_ulr'; did you mean 'base_url'?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_config_value_of_the_wrong_type_is_a_usage_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_rounds: many\n")
    proc = lvr("ask", "v.mp4", "q", "--config", cfg)
    assert proc.returncode == 2 and "--max-rounds" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_key_that_is_both_a_command_and_an_option(tmp_path):
    """`protocol` names a command and the --protocol option: a value is the option, a table the command's section."""
    from lvr_test_helpers import run_lvr

    config = tmp_path / "c.yaml"
    config.write_text("protocol: longvideo-r1\n")
    proc = run_lvr("ask", tmp_path / "none.mp4", "Q?", "--config", config, "--model", "m",
                   "--base-url", "http://127.0.0.1:9/v1")
    assert "must be a table" not in proc.stderr
    assert "--system-prompt" in proc.stderr  # the profile was chosen, and it needs the user's prompt file
    config.write_text("protocol: {}\n")
    proc = run_lvr("ask", tmp_path / "none.mp4", "Q?", "--config", config)
    assert "must be a table" not in proc.stderr

"""What every subcommand shares: config files, common options, exit codes.

`--config FILE` (YAML or TOML) is loaded before any other option and fills
the command's default map, so a config file can set any option and a flag given on
the command line still wins. Keys may be written with dashes or underscores,
at the top level (shared by all subcommands; keys a subcommand lacks are
ignored) or in a table named after the subcommand (checked strictly).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2

# Names of every subcommand, so a config table for another command is not
# mistaken for an option.
COMMAND_NAMES = ("segment", "caption", "ask", "eval", "synthesize", "sft", "rl",
                 "questions", "dpo", "doctor")


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise typer.BadParameter(f"{path}: cannot read ({e.strerror})", param_hint="--config")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # parse errors from either library
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise typer.BadParameter(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'} ({reason})",
                                 param_hint="--config")
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: must hold a mapping of option names to values",
                                 param_hint="--config")
    return data


def _norm(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager callback of --config: turn the file into defaults for this command."""
    if value is None:
        return value
    data = _read_config(Path(value))
    command = ctx.command
    names = {p.name for p in command.params if p.name and p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, val in data.items():
        k = _norm(key)
        if k in COMMAND_NAMES or isinstance(val, dict):
            continue
        if k in names:
            defaults[k] = val
    section = data.get(command.name) or data.get(ctx.info_name) or {}
    if not isinstance(section, dict):
        raise typer.BadParameter(f"{value}: [{command.name}] must be a table of options",
                                 param_hint="--config")
    for key, val in section.items():
        k = _norm(key)
        if k not in names:
            raise typer.BadParameter(f"{value}: unknown option {key!r} for `lvr {command.name}`",
                                     param_hint="--config")
        defaults[k] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOption = typer.Option(
    None, "--config", metavar="FILE", is_eager=True, callback=load_config,
    exists=False, dir_okay=False,
    help="YAML or TOML file setting any option (flags override it).",
)

OutputOption = typer.Option(
    None, "-o", "--output", metavar="FILE",
    help="Write records here (appends; a rerun skips finished work). Default: stdout.",
)

CacheDirOption = typer.Option(
    None, "--cache-dir", metavar="DIR",
    help="Frame and caption store. Default: $LVR_CACHE_DIR, $XDG_CACHE_HOME/lvr, ~/.cache/lvr.",
)

QuietOption = typer.Option(False, "-q", "--quiet", help="No progress bar or per-item log lines.")


def say(message: str) -> None:
    """A line for the user, on stderr (stdout carries records)."""
    print(message, file=sys.stderr, flush=True)


def fail_usage(message: str) -> "typer.Exit":
    say(f"Error: {message}")
    return typer.Exit(EXIT_USAGE)

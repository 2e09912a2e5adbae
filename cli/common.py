"""What every subcommand shares: config files, common options, exit codes.

The user config ($XDG_CONFIG_HOME/lvr/config.toml) and then `--config FILE`
(YAML or TOML) are loaded before any other option and fill the command's
default map, so a config file can set any option and a flag given on the
command line still wins. Keys may be written with dashes or underscores, at
the top level (shared by all subcommands: a key no command has is an error, a
key this command lacks is ignored) or in a table named after the subcommand
(checked strictly). Unknown keys name their closest valid key.

Every message for the user is one line on stderr; errors read
`lvr <command>: error: <what>: <why>` (see `error_line`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import typer

if TYPE_CHECKING:
    from typer._click import Command

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2

# Names of every subcommand, so a config table for another command is not
# mistaken for an option.
COMMAND_NAMES = ("segment", "caption", "ask", "ground", "eval", "synthesize", "sft", "rl",
                 "questions", "dpo", "doctor", "protocol", "vpo", "transcribe")


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


def user_config_path() -> Path:
    """The per-user config every command reads first: $XDG_CONFIG_HOME/lvr/config.toml."""
    import os

    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lvr" / "config.toml"


def _option_names_of_every_command() -> set[str]:
    import inspect

    from .main import COMMANDS  # the registry; imported late because main imports this module

    return {name for func in COMMANDS.values() for name in inspect.signature(func).parameters}


def _unknown_key(key: str, known: Iterable[str], where: str) -> "typer.BadParameter":
    import difflib

    close = difflib.get_close_matches(_norm(key), sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return typer.BadParameter(f"{where}: unknown option {key!r}{hint}", param_hint="--config")


def config_defaults(command: "Command", name: str, data: dict, source: Path) -> dict[str, Any]:
    """One config file's values for one command, checked strictly.

    Top-level keys apply to every command that has the option (and must be an
    option of some command); a table named after the command applies to it alone.
    A single value for a repeatable option (a URL as a string) becomes a list.
    """
    params = {p.name: p for p in command.params if p.name and p.name != "config"}
    everywhere = _option_names_of_every_command()
    defaults: dict[str, Any] = {}
    for key, val in data.items():
        k = _norm(key)
        if k in COMMAND_NAMES and (isinstance(val, dict) or k not in everywhere):
            if not isinstance(val, dict):
                raise typer.BadParameter(f"{source}: [{k}] must be a table of options", param_hint="--config")
            continue
        # A name that is both a command and an option ("protocol") is the option unless it holds a table.
        if k not in everywhere:
            raise _unknown_key(key, everywhere | set(COMMAND_NAMES), str(source))
        if k in params:
            defaults[k] = val
    section = data.get(name) or {}
    if not isinstance(section, dict):
        if name not in everywhere:
            raise typer.BadParameter(f"{source}: [{name}] must be a table of options", param_hint="--config")
        section = {}  # the option of the same name, read above
    for key, val in section.items():
        k = _norm(key)
        if k not in params:
            raise _unknown_key(key, params, f"{source}: [{name}]")
        defaults[k] = val
    for k, val in defaults.items():
        if getattr(params[k], "multiple", False) and isinstance(val, str):
            defaults[k] = [val]
    return defaults


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager callback of --config: the user config, then --config FILE, become this command's defaults."""
    name = ctx.command.name or ctx.info_name
    defaults: dict[str, Any] = {}
    user = user_config_path()
    for path in ([user] if user.is_file() else []) + ([Path(value)] if value is not None else []):
        defaults.update(config_defaults(ctx.command, name, _read_config(path), path))
    if defaults:
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOption = typer.Option(
    None, "--config", metavar="FILE", is_eager=True, callback=load_config,
    exists=False, dir_okay=False,
    help="YAML or TOML file setting any option (flags override it); read after "
         "$XDG_CONFIG_HOME/lvr/config.toml. Examples: configs/*.yaml.",
)

OUTPUT_HELP = ("Where the output goes: records (JSONL, appended; a rerun skips finished work; default: stdout), "
               "the answer record for ask and ground, the checkpoint folder for sft, dpo and rl.")
OutputOption = typer.Option(None, "-o", "--output", metavar="FILE", help=OUTPUT_HELP)
RequiredOutputOption = typer.Option(..., "-o", "--output", metavar="DIR", help=OUTPUT_HELP)

FormatOption = typer.Option("auto", "--format", metavar="FORMAT",
                            help="Input format: auto (told from the first record) or one by name: native, lvbench, "
                                 "videomme, mlvu (eval), activitynet (eval: ActivityNet-Captions and Charades-STA "
                                 "grounding JSON), cgbench (eval with --task grounding; synthesize, rl), or "
                                 "longvideo-r1: the LongVideo-R1 release's flat evaluation lists (eval) and RL rows "
                                 "(synthesize, rl). A file may also be parquet. See docs/eval_formats.md and "
                                 "docs/qa_format.md.")
VideoDirOption = typer.Option(None, "--video-dir", metavar="DIR",
                              help="Where the records' videos are (default: the input file's folder). Paths in "
                                   "records may not leave it.")
DryRunOption = typer.Option(False, "--dry-run",
                            help="Check the input and settings, print what would be done, and stop (synthesize: "
                                 "the requests and tokens it would need; training: the resolved settings).")

CacheDirOption = typer.Option(
    None, "--cache-dir", metavar="DIR",
    help="Frame and caption store. Default: $LVR_CACHE_DIR, $XDG_CACHE_HOME/lvr, ~/.cache/lvr.",
)

NoSubtitlesOption = typer.Option(False, "--no-subtitles",
                                 help="Ignore subtitles: none are attached to nodes or shown to the captioner.")

QuietOption = typer.Option(False, "-q", "--quiet",
                           help="Print less: no progress bars or per-item lines (doctor: only failed checks).")

# One video's navigation (ask, ground): its trace, its page, its rounds as they end.
TraceOption = typer.Option(None, "--trace", metavar="FILE",
                           help="Write the full conversation and every step (lvr.trace/1 JSONL).")
HtmlOption = typer.Option(None, "--html", metavar="FILE",
                          help="Write a self-contained page: the tree, the visited path, each turn.")
VerboseOption = typer.Option(False, "-v", "--verbose",
                             help="Show each round on stderr as it ends: the think text, the call, the result.")


def say(message: str) -> None:
    """A line for the user, on stderr (stdout carries records)."""
    print(message, file=sys.stderr, flush=True)


def command_path() -> str:
    """'lvr ask' for the running subcommand ('lvr' outside one)."""
    from typer._click.globals import get_current_context  # typer vendors click

    ctx = get_current_context(silent=True)
    return f"lvr {ctx.info_name}" if ctx is not None and ctx.parent is not None else "lvr"


def error_line(message: str) -> str:
    """The one shape of an error message: `lvr ask: error: movie.mp4: no such file`."""
    return f"{command_path()}: error: {message}"


def say_error(message: str) -> None:
    say(error_line(message))


def naming(path: "str | Path", message: str) -> str:
    """`path: message`, unless the message already starts by naming the path (say it once)."""
    return message if message.startswith(str(path)) else f"{path}: {message}"


def tokens_phrase(models: dict) -> str:
    """`reasoning 1242 + 4 tokens, caption 1928 + 8 tokens` from accounting's per-role usage."""
    used = [f"{role} {m['prompt_tokens']} + {m['completion_tokens']}" for role, m in models.items()
            if m.get("prompt_tokens") or m.get("completion_tokens")]
    return (", ".join(used) + " tokens (prompt + completion)") if used else "no tokens"


def navigation_summary(acc: dict) -> str:
    """One run's accounting in words: rounds, tool calls, captions made and reused, tokens, time."""
    from ..infer.progress import time_spent

    calls = acc["caption_calls"]
    return (f"{acc['rounds']} rounds ({acc['invalid_turns']} invalid) with "
            f"{acc['get_caption_calls']} get_caption and {acc['video_qa_calls']} video_qa calls; "
            f"captions: {calls['made']} made, {calls['cached']} from the store (a full captioning would need "
            f"{acc['exhaustive_captions']}); {tokens_phrase(acc['models'])}; {time_spent(acc)}.")


def fail_usage(message: str) -> "typer.Exit":
    say_error(message)
    return typer.Exit(EXIT_USAGE)


def run_trainer(make_settings, *, dry_run: bool, data_summary, train, summary) -> None:
    """What sft, dpo and rl do with their options: build and check the settings, print them and
    the data on --dry-run, or train; then the summary line from the main process. Exits.

    `data_summary(settings)`, `train(settings)` and `summary(record)` are the trainer's own parts.
    """
    import json

    from ..train.trainer_kit import is_main_process

    try:
        settings = make_settings()
    except (TypeError, ValueError) as e:
        raise fail_usage(str(e))
    # The usage errors of this trainer and of those it builds on (dpo reuses sft's data checks).
    usage_errors = tuple(k.error_type for k in type(settings).__mro__
                         if "error_type" in vars(k) and k.error_type is not ValueError)
    try:
        settings.check()
        if dry_run:
            typer.echo(json.dumps({"settings": settings.__dict__, "data": data_summary(settings)}, indent=1))
            raise typer.Exit(EXIT_OK)
        record = train(settings)
    except usage_errors as e:
        raise fail_usage(str(e))
    if is_main_process():
        say(summary(record))
    raise typer.Exit(EXIT_OK)

"""The `lvr` command: a registry of subcommands, one thin module each.

Subcommand modules are imported here but keep their heavy imports (numpy,
PyAV, torch) inside the command functions, so `lvr --help` starts fast.
"""

from __future__ import annotations

import typer

from .. import __version__
from . import (ask, caption, doctor, dpo, eval, ground, protocol, questions, rl, segment, sft, synthesize, transcribe,
               vpo)

app = typer.Typer(
    name="lvr",
    help=(
        "LongVideo-R1, end to end: cut long videos into a clip tree, caption it, "
        "and answer questions by navigating it.\n\n"
        "Every step reads and writes JSONL, so steps chain in a shell or a Makefile.\n\n"
        "Examples:\n\n"
        "  lvr segment movie.mp4 -o nodes.jsonl\n\n"
        "  lvr segment videos/ '*.mkv' --qa-frames -o nodes.jsonl\n\n"
        "  lvr caption nodes.jsonl --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct -o captions.jsonl\n\n"
        "  lvr ask movie.mp4 \"Who opens the door?\" --config configs/vllm.yaml --html trace.html\n\n"
        "  lvr synthesize qa.jsonl --teacher-model gpt-5 --base-url https://api.openai.com/v1 -o trajectories.jsonl\n\n"
        "  lvr doctor --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct\n\n"
        "  lvr segment --help"
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

# The registry: one entry per built subcommand.
COMMANDS = {
    "segment": segment.segment_command,
    "caption": caption.caption_command,
    "ask": ask.ask_command,
    "ground": ground.ground_command,
    "eval": eval.eval_command,
    "synthesize": synthesize.synthesize_command,
    "questions": questions.questions_command,
    "sft": sft.sft_command,
    "dpo": dpo.dpo_command,
    "rl": rl.rl_command,
    "doctor": doctor.doctor_command,
    "protocol": protocol.protocol_command,
    "vpo": vpo.vpo_command,
    "transcribe": transcribe.transcribe_command,
}
for _name, _func in COMMANDS.items():
    app.command(_name)(_func)


def run(args: list[str] | None = None) -> None:
    """The `lvr` entry point: usage errors become one line (`lvr ask: error: ...`), exit status 2."""
    import sys

    from typer._click import exceptions as click_errors  # typer vendors click

    try:
        code = app(args, prog_name="lvr", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx is not None else "lvr --help")
        sys.exit(0)
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "lvr"
        message = " ".join(e.format_message().split())
        print(f"{where}: error: {message} (see {where} --help)", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except click_errors.ClickException as e:
        print(f"lvr: error: {' '.join(e.format_message().split())}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except click_errors.Abort:
        print("lvr: aborted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lvr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """LongVideo-R1, end to end."""

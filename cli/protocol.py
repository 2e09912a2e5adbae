"""`lvr protocol`: the navigator's protocol texts; `extract` takes them from released training data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import EXIT_OK, EXIT_SOME_FAILED, ConfigOption, QuietOption, RequiredOutputOption, fail_usage, say, say_error

ACTIONS = ("extract",)


def protocol_command(
    action: str = typer.Argument(..., metavar="ACTION",
                                 help="extract: write the system prompts that DATA's samples carry into DIR."),
    data: str = typer.Argument(..., metavar="DATA",
                               help="The LongVideo-R1 release's SFT data (LLaMA-Factory JSON, alpaca or sharegpt), "
                                    "or its RL data (verl rows, JSON or parquet)."),
    output: Path = RequiredOutputOption,
    quiet: bool = QuietOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Take the navigator's system prompt from your copy of the released training data.

    A navigator checkpoint answers best with the exact system prompt it was
    trained on, and the LongVideo-R1 release's samples each carry theirs (with
    the tree width K written in). `extract` writes every distinct one into DIR,
    byte for byte, one file each, named after the tree widths of the samples
    that carry it (system-K4.txt, system-K5.txt, ...; -2, -3 ... when two
    prompts share them), and says which file holds which. When the prompts
    differ only in the width written in them, system-template.txt holds one
    template with {width} there instead, which `--protocol longvideo-r1
    --system-prompt` fills per video.

    Exit status: 0 written, 1 some records could not be read (each named as
    file:line) or no sample carries a system prompt, 2 usage error.

    Examples:

      lvr protocol extract longvideor1-sft-qwen3-llamafactory.json -o prompts/

      lvr protocol extract rl_data/rl_data.parquet -o prompts/rl/

      lvr ask movie.mp4 "Who opens the door?" --system-prompt prompts/system-template.txt --config configs/vllm.yaml
    """
    from ..prep.jsonl import OutputError
    from ..prep.records import RecordFileError
    from ..train.released_data import extract_system_prompts

    if action not in ACTIONS:
        raise fail_usage(f"ACTION must be {' or '.join(ACTIONS)}, not {action!r}")
    try:
        result = extract_system_prompts(data, output)
    except (RecordFileError, OutputError) as e:
        raise fail_usage(str(e))
    for err in result.errors:
        say_error(err)
    for path, prompt in result.written:
        widths = f"K={', '.join(map(str, sorted(prompt.widths)))}; " if prompt.widths else ""
        if not quiet:
            say(f"lvr protocol: {path}: the system prompt of {prompt.samples} sample(s) ({widths}first at "
                f"{prompt.first}), {len(prompt.text.encode('utf-8'))} bytes, sha256 {prompt.sha256()[:16]}")
    if result.template is not None and not quiet:
        say(f"lvr protocol: {result.template}: one template for every width, {{width}} where the width is "
            f"written; filled with a K above, it is that prompt byte for byte")
    if not result.written:
        say_error(f"{data}: no sample carries a system prompt; nothing written")
    elif not quiet:
        say(f"lvr protocol: {len(result.written)} system prompt(s) written to {output}"
            + (f"; {result.without} sample(s) without one" if result.without else "")
            + (f"; {len(result.errors)} record(s) could not be read" if result.errors else ""))
    raise typer.Exit(EXIT_SOME_FAILED if result.errors or not result.written else EXIT_OK)

"""`--num-processes` and `--accelerate-config`: `lvr sft`, `dpo` and `rl` start `accelerate launch` themselves.

A training command asked for several processes (or given an accelerate config) runs
itself again as

    python -m accelerate.commands.launch <launch arguments> -m lvr.cli <command> <its arguments>

and exits with the launcher's status. The arguments are the user's own words with the
launch flags taken out (`without_launch_flags`), never rebuilt from the parsed settings, so
every other argument reaches the processes exactly as typed. Inside a launched process the
flags are inert: a process that a launcher started (`under_launcher`) never launches again,
so `accelerate launch -m lvr.cli sft ...` by hand works as before.

The launcher runs in its own process group: SIGINT, SIGTERM and SIGHUP to this process are
passed on to that group (torchrun, in it, stops the training processes it started), and the
launcher gets SIGTERM should this process die without passing anything on (Linux).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

from ..prep.options import OptionError, check_options, option, option_fields

LAUNCH_PANEL = "Processes"
ACCELERATE = ("-m", "accelerate.commands.launch")
# What launched processes find in their environment: torchrun (and accelerate's multi-GPU,
# DeepSpeed and FSDP launchers, which use it) set the ranks; every `accelerate launch`, a
# single process too, sets ACCELERATE_MIXED_PRECISION.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MASK = "***"

Log = Callable[[str], None]


@dataclass(frozen=True)
class LaunchSettings:
    """How many processes a training command runs in, and with which accelerate set-up."""

    num_processes: int | None = option(
        None, "--num-processes", metavar="N", min=1, panel=LAUNCH_PANEL, show_default=False,
        help="Train in N processes (data parallel: one per GPU, or on the CPU over gloo without GPUs): the "
             "command starts `accelerate launch` itself and waits for it. Default: this process alone, or "
             "--accelerate-config's num_processes. Ignored in a process a launcher started.")
    accelerate_config: str | None = option(
        None, "--accelerate-config", metavar="FILE", panel=LAUNCH_PANEL,
        help="Launch with this accelerate config file (configs/accelerate/: DeepSpeed ZeRO-3, FSDP, several "
             "nodes); --num-processes overrides its num_processes. Default: plain data parallel on this machine.")

    def __post_init__(self):
        check_options(self)
        if self.accelerate_config is not None:
            read_accelerate_config(self.accelerate_config)

    @property
    def wanted(self) -> bool:
        """Whether these settings ask for a launcher: several processes, or an accelerate config."""
        return (self.num_processes or 1) > 1 or self.accelerate_config is not None


LAUNCH_FLAGS = frozenset(flag.long for _, flag in option_fields(LaunchSettings))


def read_accelerate_config(path: str) -> dict:
    """The config file as a mapping; OptionError naming it when it cannot be one (before any process starts)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # accelerate's JSON configs are YAML too
    except OSError as e:
        raise OptionError(f"--accelerate-config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise OptionError(f"--accelerate-config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--accelerate-config {path}: must hold a mapping of accelerate settings")
    return data


# -- where this process runs ------------------------------------------------------------------

def under_launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher variable this process was started with (`LOCAL_RANK`, ...); None when started by hand."""
    environ = os.environ if environ is None else environ
    return next((name for name in LAUNCHER_VARIABLES if environ.get(name)), None)


def planned_processes(settings: LaunchSettings) -> int:
    """How many processes the run trains in: the launcher's world size inside one, else the flags'."""
    from .trainer_kit import world_size

    if under_launcher():
        return world_size()
    if settings.num_processes is not None:
        return settings.num_processes
    if settings.accelerate_config is not None:
        return int(read_accelerate_config(settings.accelerate_config).get("num_processes") or 1)
    return 1


# -- the launch command -----------------------------------------------------------------------

def launcher_arguments(settings: LaunchSettings) -> list[str]:
    """`accelerate launch`'s own arguments for these settings."""
    if settings.accelerate_config is not None:
        count = [] if settings.num_processes is None else ["--num_processes", str(settings.num_processes)]
        return ["--config_file", settings.accelerate_config, *count]
    # Plain data parallel on this machine through torchrun: each process takes its GPU, or the CPU
    # and gloo without one (accelerate's --cpu would start a single process). Port 0 lets runs side
    # by side each find a free port; the rest are the values accelerate would otherwise warn it guessed.
    return ["--multi_gpu", "--num_processes", str(settings.num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def without_launch_flags(args: Sequence[str], valued: Collection[str]) -> list[str]:
    """ARGS without --num-processes and --accelerate-config (`--flag V` and `--flag=V`), the rest as typed.

    `valued`: the command's options that take a value; their value is kept whatever it looks like,
    as the command line parser reads it. After `--` every word is an argument.
    """
    kept: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            kept += args[i:]
            break
        if word.split("=", 1)[0] in LAUNCH_FLAGS:
            i += 1 if "=" in word else 2
            continue
        kept.append(word)
        if word in valued and i + 1 < len(args):
            kept.append(args[i + 1])
            i += 1
        i += 1
    return kept


def launch_command(settings: LaunchSettings, args: Sequence[str], valued: Collection[str]) -> list[str]:
    """The launcher's command line for `lvr ARGS` (ARGS starting with the command's name)."""
    return [sys.executable, *ACCELERATE, *launcher_arguments(settings), "-m", "lvr.cli",
            *without_launch_flags(args, valued)]


def shown(command: Sequence[str]) -> str:
    """The command as a shell line, with the value of every --api-key (--caption-api-key, ...) masked."""
    words = list(command)
    for i, word in enumerate(words):
        flag, eq, _ = word.partition("=")
        if flag.startswith("--") and flag.endswith("api-key"):
            if eq:
                words[i] = f"{flag}={MASK}"
            elif i + 1 < len(words):
                words[i + 1] = MASK
    return shlex.join(words)


# -- running it -------------------------------------------------------------------------------

def _launcher_setup() -> None:
    """In the launcher, before it runs: a process group of its own, and SIGTERM when we die (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_launched(command: Sequence[str]) -> int:
    """Run COMMAND in its own process group, passing SIGINT, SIGTERM and SIGHUP on to the whole group
    (torchrun then stops its training processes); its exit status, 128 + N when signal N stopped it."""
    # A process group not in the terminal's foreground stops when it reads the terminal: training reads
    # no stdin, and a tracker's login prompt then fails instead of hanging.
    stdin = subprocess.DEVNULL if os.isatty(0) else None
    proc = subprocess.Popen(list(command), stdin=stdin, preexec_fn=_launcher_setup)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code < 0:
        return 128 - code
    # torchrun exits 1 when a signal stopped it: say which signal, as a process killed by it would.
    return 128 + received[0] if code and received else code


def relaunch_if_asked(settings: LaunchSettings, args: Sequence[str], valued: Collection[str], log: Log) -> int | None:
    """Run `lvr ARGS` under `accelerate launch` when the settings ask for it: the launcher's exit status.

    None when this process trains itself: nothing asked, or already started by a launcher (where
    the flags are inert; the main process says so when they ask for another process count).
    """
    from .trainer_kit import is_main_process, world_size

    if not settings.wanted:
        return None
    launcher = under_launcher()
    if launcher is not None:
        if settings.num_processes not in (None, world_size()) and is_main_process():
            log(f"--num-processes {settings.num_processes} ignored: already started by a launcher "
                f"({launcher}={os.environ[launcher]}, {world_size()} process(es))")
        return None
    command = launch_command(settings, args, valued)
    count = planned_processes(settings)
    log(f"launching {count} process{'es' if count != 1 else ''}: {shown(command)}")
    return run_launched(command)

"""Options as data: the one home of every option's flag, default, help, range and check.

A settings dataclass declares each option as a field made by `option()`. The
field's name is the option's name everywhere (Python keyword, config-file
key); its metadata holds the flag and help the command line shows. The CLI
generates its flags from these fields (cli/options.py), config files fill the
same fields, and `check_options()` validates ranges and choices for every
caller, command line or library. See docs/architecture.md §5.

Commands that share an option share its field: a subclass may give it another
default (as TRL's configs do for the learning rate), never another meaning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

_KEY = "lvr_option"


@dataclass(frozen=True)
class Flag:
    """How one option looks on the command line."""

    names: tuple[str, ...]             # "--min-width"; "-q", "--quiet"; "--lora/--no-lora"
    help: str
    metavar: str | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    panel: str | None = None           # help-page section
    show_default: bool = True
    multiple: bool = False             # repeatable: the value is a tuple

    @property
    def long(self) -> str:
        """The long flag, for messages: `--min-width`."""
        return next(n.split("/")[0] for n in self.names if n.startswith("--"))


def option(default: Any = dataclasses.MISSING, *names: str, help: str, factory=None, **flag: Any):
    """A dataclass field that is also a command-line option.

        min_width: int = option(4, "--min-width", help="Smallest tree width K.", min=1)
    """
    metadata = {_KEY: Flag(tuple(names), help, **flag)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def override(base: type, name: str, default: Any):
    """The same option as `base.name` with this command's default (a subclass's declared override)."""
    original = next(f for f in dataclasses.fields(base) if f.name == name)
    return dataclasses.field(default=default, metadata=original.metadata)


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get(_KEY)


def option_fields(cls_or_obj) -> Iterator[tuple[dataclasses.Field, Flag]]:
    """The option fields of a settings dataclass, in declaration order."""
    for f in dataclasses.fields(cls_or_obj):
        flag = flag_of(f)
        if flag is not None:
            yield f, flag


class OptionError(ValueError):
    """An option value out of range or not among its choices; one line naming the flag."""


def check_value(flag: Flag, value: Any) -> None:
    if value is None or isinstance(value, bool):
        return
    values = value if flag.multiple and isinstance(value, (list, tuple)) else [value]
    for v in values:
        if flag.choices is not None and v not in flag.choices:
            raise OptionError(f"{flag.long} takes {', '.join(map(str, flag.choices))}, not {v!r}")
        if isinstance(v, (int, float)):
            if flag.min is not None and v < flag.min:
                raise OptionError(f"{flag.long} must be at least {flag.min:g}, not {v!r}")
            if flag.max is not None and v > flag.max:
                raise OptionError(f"{flag.long} must be at most {flag.max:g}, not {v!r}")


def check_options(obj) -> None:
    """Validate every option field of a settings object (call it from __post_init__)."""
    for f, flag in option_fields(obj):
        check_value(flag, getattr(obj, f.name))

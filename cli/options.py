"""Typer options generated from the settings dataclasses (prep/options.py).

A command names the groups it takes instead of re-declaring their flags:

    @takes(tree=Group(TreeOptions), roles=ROLES)
    def ask_command(video: Path = typer.Argument(...), ..., *, tree: TreeOptions, roles: Roles):
        ...

`takes` removes the group parameters from the signature Typer sees, puts one
generated parameter per option field in their place, and, on each call,
builds the group objects from those values before calling the command. So an
option's flag, default, help and range are written once, in its dataclass;
config files fill the same parameters (cli/common.py). Role groups (caption,
video_qa) reuse one dataclass under a flag prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, List, get_type_hints

import typer

from ..prep.options import Flag, OptionError, option_fields


@dataclass(frozen=True)
class Group:
    """Some or all option fields of one settings dataclass, under an optional prefix."""

    cls: type
    only: tuple[str, ...] | None = None        # field names to expose (default: all)
    exclude: tuple[str, ...] = ()
    prefix: str = ""                            # "caption" -> --caption-model, parameter caption_model
    panel: str | None = None                    # overrides the fields' own help panel
    defaults: dict = field(default_factory=dict)  # field name -> this command's default (declared, never silent)
    notes: dict = field(default_factory=dict)     # field name -> what that default means here, added to the help
    build: Callable[[dict], Any] | None = None  # values by field name -> object (default: cls(**values))

    def with_panel(self, panel: str) -> "Group":
        return dataclasses.replace(self, panel=panel)

    def fields(self) -> list[tuple[dataclasses.Field, Flag]]:
        out = []
        for f, flag in option_fields(self.cls):
            if (self.only is None or f.name in self.only) and f.name not in self.exclude:
                out.append((f, flag))
        return out

    def param_name(self, name: str) -> str:
        return f"{self.prefix}_{name}" if self.prefix else name

    def make(self, values: dict) -> Any:
        own = {f.name: values[self.param_name(f.name)] for f, _ in self.fields()}
        for f, flag in self.fields():
            if flag.multiple and own[f.name] is not None:
                own[f.name] = tuple(own[f.name])
        try:
            return self.build(own) if self.build else self.cls(**own)
        except OptionError as e:  # name the flag as this command spells it
            raise OptionError(str(e).replace("--", f"--{self.prefix}-", 1) if self.prefix else str(e)) from None


def _prefixed(flag: Flag, prefix: str) -> tuple[str, ...]:
    if not prefix:
        return flag.names
    return tuple(n.replace("--", f"--{prefix}-") for n in flag.names if n.startswith("--"))


def _annotation(f: dataclasses.Field, hints: dict, flag: Flag):
    kind = hints[f.name]
    if flag.multiple:
        return List[str]
    return kind


def _default(f: dataclasses.Field, group: Group):
    if f.name in group.defaults:
        return group.defaults[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ...


def typer_parameters(group: Group) -> list[inspect.Parameter]:
    """One keyword parameter with a typer.Option default per option field of the group."""
    hints = get_type_hints(group.cls)
    params = []
    for f, flag in group.fields():
        default = _default(f, group)
        if flag.multiple:
            default = list(default or [])
        note = group.notes.get(f.name)
        kwargs: dict[str, Any] = dict(help=f"{flag.help} {note}" if note else flag.help,
                                      show_default=flag.show_default, rich_help_panel=group.panel or flag.panel)
        if flag.metavar:
            kwargs["metavar"] = flag.metavar
        if flag.min is not None:
            kwargs["min"] = flag.min
        if flag.max is not None:
            kwargs["max"] = flag.max
        opt = typer.Option(default, *_prefixed(flag, group.prefix), **kwargs)
        params.append(inspect.Parameter(group.param_name(f.name), inspect.Parameter.KEYWORD_ONLY, default=opt,
                                        annotation=_annotation(f, hints, flag)))
    return params


@dataclass(frozen=True)
class Bundle:
    """Several groups built into one object (e.g. the navigator's options from roles, agent and tree)."""

    groups: tuple[Group, ...]
    build: Callable[..., Any]   # receives the built groups, in order

    def make(self, values: dict) -> Any:
        return self.build(*(g.make(values) for g in self.groups))


def takes(aliases: dict[str, str] | None = None, **groups: Group | Bundle):
    """Decorate a command: each keyword names a group (or bundle) the command receives built.

    `aliases` maps an old (hidden) parameter of the command to the generated one it stands for.
    """
    aliases = aliases or {}

    def decorate(command: Callable) -> Callable:
        sig = inspect.signature(command)
        hints = get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name not in groups]
        own_names = {p.name for p in own}
        generated: list[inspect.Parameter] = []
        for spec in groups.values():
            for group in (spec.groups if isinstance(spec, Bundle) else (spec,)):
                generated += typer_parameters(group)
        names = [p.name for p in own + generated]
        clash = {n for n in names if names.count(n) > 1}
        if clash:
            raise TypeError(f"{command.__name__}: options declared twice: {', '.join(sorted(clash))}")
        generated_names = {p.name for p in generated}
        # The command's own parameters first, then the generated ones; -q, -v and --config last.
        tail = [p for p in own if p.name in ("quiet", "verbose", "config")]
        head = [p for p in own if p not in tail]

        @functools.wraps(command)
        def run(**values):
            for old, new in aliases.items():
                value = values.get(old)
                if value is not None and values.get(new) in (None, (), []):
                    values[new] = value
            try:
                built = {key: spec.make(values) for key, spec in groups.items()}
            except ValueError as e:  # a range or a combination the flags alone cannot check
                raise typer.BadParameter(str(e)) from None
            kept = {n: v for n, v in values.items() if n not in generated_names and n in own_names}
            return command(**kept, **built)

        del run.__wrapped__  # Typer must read the signature below, not the command's own
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in head + generated + tail]
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.option_groups = groups
        return run

    return decorate

"""Options as data: every option shared by several commands is defined once (docs/architecture.md §5)."""

from __future__ import annotations

import collections

import pytest
import typer

from lvr.cli.main import COMMANDS, app


def _root_default(cls: type, name: str):
    """The default of a field where it was first declared (a subclass may override it with prep.options.override)."""
    for klass in reversed(cls.__mro__):
        fields = getattr(klass, "__dataclass_fields__", {})
        if name in fields:
            return fields[name].default
    raise KeyError(name)


def _declared_defaults() -> dict[tuple[str, str], object]:
    """(command, parameter) -> a default a command declares for a shared option: in its group's
    `defaults` (cli/options.Group) or by a settings subclass overriding a base field's default."""
    import dataclasses

    from lvr.cli.options import Bundle

    out = {}
    for name, func in COMMANDS.items():
        for spec in getattr(func, "option_groups", {}).values():
            for group in (spec.groups if isinstance(spec, Bundle) else (spec,)):
                for field, _ in group.fields():
                    if field.name in group.defaults:
                        out[(name, group.param_name(field.name))] = group.defaults[field.name]
                    elif field.default is not dataclasses.MISSING and \
                            field.default != _root_default(group.cls, field.name):
                        out[(name, group.param_name(field.name))] = field.default
    return out


def shared_options() -> dict[str, list[tuple[str, object]]]:
    group = typer.main.get_command(app)
    uses = collections.defaultdict(list)
    for name in COMMANDS:
        for p in group.commands[name].params:
            if p.param_type_name == "option":
                uses["/".join(p.opts + p.secondary_opts)].append((name, p))
    return {flag: u for flag, u in uses.items() if len(u) > 1}


def test_every_shared_option_has_one_name_help_and_default():
    declared = _declared_defaults()
    problems = []
    for flag, uses in sorted(shared_options().items()):
        names = {p.name for _, p in uses}
        helps = {p.help for _, p in uses}
        if len(names) > 1:
            problems.append(f"{flag}: parameter names {sorted(names)}")
        if len(helps) > 1:
            problems.append(f"{flag}: {len(helps)} different help texts in " + ", ".join(c for c, _ in uses))
        undeclared = {repr(p.default) for c, p in uses if (c, p.name) not in declared}
        if len(undeclared) > 1:
            problems.append(f"{flag}: defaults {sorted(undeclared)} differ without being declared")
    assert not problems, "\n".join(problems)


def test_declared_defaults_are_real_overrides_of_one_field():
    """A command may change a shared option's default only through its group, and it shows in its help."""
    group = typer.main.get_command(app)
    for (command, param), value in _declared_defaults().items():
        p = next(p for p in group.commands[command].params if p.name == param)
        assert p.default == value, (command, param)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_keys_are_parameter_names(command):
    """A config-file key is the parameter name, so it is the same word in every command."""
    group = typer.main.get_command(app)
    for p in group.commands[command].params:
        if p.param_type_name == "option":
            long = next((o for o in p.opts if o.startswith("--")), None)
            if long and not p.secondary_opts:
                assert long[2:].replace("-", "_") == p.name, (command, long, p.name)

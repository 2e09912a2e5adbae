"""No module reaches into another module's private names.

A name starting with ``_`` is private to its module. Code under cli/, prep/,
infer/ and train/ may not import one from another module (``from x import _y``)
nor read one off an imported project module (``x._y``): what two modules share
gets a public name in one home. The check parses the source with `ast`, so it
sees imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("cli", "prep", "infer", "train")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path, root: Path) -> str:
    """prep/models/base.py -> 'lvr.prep.models.base'; prep/__init__.py -> 'lvr.prep'."""
    rel = path.relative_to(root).with_suffix("")
    parts = ["lvr", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(module: str | None, level: int, importer: str, importer_is_package: bool) -> str | None:
    """The absolute name of an ImportFrom's module (None when it climbs out of lvr)."""
    if level == 0:
        return module
    base = importer.split(".")
    if not importer_is_package:
        base = base[:-1]
    if level - 1 > len(base) - 1:
        return None
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def package_dirs(root: Path) -> dict[str, Path]:
    # Installed as lvr.<layer> (pyproject's package-dir); the `lvr` package itself lives in lvr/.
    return {"lvr": root / "lvr", **{f"lvr.{layer}": root / layer for layer in LAYERS}}


def project_module_exists(name: str, root: Path) -> bool:
    """Whether `name` is a module or package of this project (lvr.*)."""
    parts = name.split(".")
    dirs = package_dirs(root)
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in dirs:
            target = dirs[head].joinpath(*parts[i:])
            return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()
    return False


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """Each private cross-module import or access in one file, as 'file:line: what'."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me, package = module_name(path, root), is_package(path)
    where = path.relative_to(root).as_posix()
    found: list[str] = []
    modules: set[str] = set()    # local names bound to project modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(node.module, node.level, me, package)
            shown = "." * node.level + (node.module or "")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {shown} import {alias.name}")
                elif source and source.startswith("lvr") and project_module_exists(f"{source}.{alias.name}", root):
                    modules.add(alias.asname or alias.name)
            if source and source.startswith("lvr") and any(_private(p) for p in source.split(".")):
                found.append(f"{where}:{node.lineno}: from {shown} import ... (a private module)")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lvr") and any(_private(p) for p in alias.name.split(".")):
                    found.append(f"{where}:{node.lineno}: import {alias.name} (a private module)")
                if alias.name.startswith("lvr.") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def source_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def test_no_private_names_cross_modules():
    files = source_files()
    assert len(files) > 20, "the layers' sources were not found"
    found = [v for path in files for v in violations(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from .benchmarks import EvalItem, _Skip\n", ["from .benchmarks import _Skip"]),
    ("def f():\n    from ..prep.models.openai_backend import _split_urls\n",
     ["from ..prep.models.openai_backend import _split_urls"]),
    ("from . import protocol\nx = protocol._TAG_RE\n", ["protocol._TAG_RE"]),
    ("from . import protocol as p\nx = p._TAG_RE\n", ["p._TAG_RE"]),
    ("from .. import __version__\nfrom .protocol import parse_turn\nclass A:\n    _x = 1\n", []),
    ("import re\nx = re._pattern_type\n", []),   # not a project module: not ours to judge
])
def test_the_check_catches_private_imports(tmp_path, source, expected):
    # A throwaway module inside a fake infer/ layer, so relative imports resolve as in the project.
    (tmp_path / "infer").mkdir()
    (tmp_path / "infer" / "__init__.py").write_text("")
    (tmp_path / "infer" / "protocol.py").write_text("")
    f = tmp_path / "infer" / "probe.py"
    f.write_text(source)
    got = violations(f, tmp_path)
    assert [g.split(": ", 1)[1] for g in got] == expected

"""The `lvr` command itself: help, start-up cost, and the README/CI contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_help_lists_built_commands_with_examples():
    from lvr.cli.main import COMMANDS

    proc = run("--help")
    assert proc.returncode == 0
    assert "Examples" in proc.stdout
    listed = proc.stdout.split("Commands")[-1]
    for name in COMMANDS:
        assert name in listed
        sub = run(name, "--help")
        assert sub.returncode == 0 and "Examples:" in sub.stdout and f"lvr {name} " in sub.stdout, name
    # Subcommands not built yet are absent, not stubs.
    names = set(re.findall(r"^│ (\w+) ", listed, flags=re.M))
    assert names == set(COMMANDS)


def test_segment_help_has_examples():
    proc = run("segment", "--help")
    assert proc.returncode == 0
    assert proc.stdout.count("lvr segment ") >= 3
    for flag in ("--output", "--cache-dir", "--config", "--clips", "--copy", "--qa-frames"):
        assert flag in proc.stdout


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("lvr ")


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom lvr.cli.main import app\n"
            "try:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'av', 'PIL') if m in sys.modules]\n"
            "print('HEAVY=' + ','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in proc.stdout or proc.stdout.strip().endswith("HEAVY="), proc.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b and "setup.sh" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    main_cmd = next(b.strip() for b in blocks if "lvr segment" in b and "setup.sh" in b)
    assert main_cmd.startswith("bash scripts/setup.sh")

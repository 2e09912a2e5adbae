"""The `lvr` command itself: help, start-up cost, the README/CI contract, and an end-to-end
test of every command in the default test run."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# The test that runs each command end to end as a subprocess, in the default (not `slow`) run:
# marking tests slow by cost (pyproject.toml) must never leave a command without one.
DEFAULT_END_TO_END = {
    "segment": "test_segment.py::test_sample_media_give_correct_trees",
    "caption": "test_caption.py::test_caption_end_to_end_sends_what_it_should",
    "ask": "test_ask.py::test_scripted_navigation_end_to_end",
    "ground": "test_ground.py::test_ground_end_to_end",
    "eval": "test_eval.py::test_eval_records_and_summary",
    "synthesize": "test_synthesize.py::test_wrong_twice_then_right",
    "questions": "test_questions.py::test_questions_end_to_end_then_synthesize",
    "sft": "test_sft.py::test_sft_fits_and_the_output_loads_for_ask",
    "dpo": "test_dpo.py::test_dpo_raises_the_margin_and_the_output_loads_for_ask",
    "rl": "test_rl.py::test_one_step_masks_tool_results_not_model_tokens",
    "doctor": "test_doctor.py::test_all_ok_exit_0_and_requests_sent",
    "protocol": "test_released_data.py::test_protocol_extract_writes_each_system_prompt_byte_for_byte",
    "vpo": "test_vpo_data.py::test_vpo_stage1_end_to_end",
    "transcribe": "test_transcribe.py::test_transcribe_end_to_end",
}

# Collects as a plain `pytest` run does (pyproject's addopts deselect `slow`) and prints each
# collected test with whether a skip mark stops it.
COLLECT = """
import json, sys
import pytest

class Collected:
    tests = {}

    def pytest_collection_finish(self, session):
        self.tests = {item.nodeid: any(m.name == "skip" or (m.name == "skipif" and any(m.args))
                                       for m in item.iter_markers()) for item in session.items}

collected = Collected()
pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[collected])
print("COLLECTED=" + json.dumps(collected.tests))
"""


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


def lvr_commands_run_by(test_file: Path, test: str) -> set[str]:
    """The commands that TEST runs with `run_lvr("<command>", ...)`, itself or through a function
    or fixture of its file (or of conftest.py) that it calls or requests."""
    functions = {f.name: f for path in (TESTS / "conftest.py", test_file)
                 for f in ast.parse(path.read_text()).body if isinstance(f, ast.FunctionDef)}
    commands, seen, todo = set(), set(), [test]
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        function = functions[name]
        todo += [a.arg for a in function.args.args]  # fixtures it requests
        for call in ast.walk(function):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                todo.append(call.func.id)
                first = call.args[0] if call.args else None
                if call.func.id == "run_lvr" and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    commands.add(first.value)
    return commands


def test_every_command_has_an_end_to_end_test_in_the_default_run():
    from lvr.cli.main import COMMANDS

    assert set(DEFAULT_END_TO_END) == set(COMMANDS)
    files = sorted({f"tests/{test.split('::')[0]}" for test in DEFAULT_END_TO_END.values()})
    proc = subprocess.run([sys.executable, "-c", COLLECT, *files], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    printed = [x for x in proc.stdout.splitlines() if x.startswith("COLLECTED=")]
    assert printed, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = json.loads(printed[-1].removeprefix("COLLECTED="))
    for command, test in DEFAULT_END_TO_END.items():
        node_id = f"tests/{test}"
        assert node_id in skipped, f"{test} is not in the default run (marked slow, renamed or broken)"
        assert not skipped[node_id], f"{test} carries a skip mark"
        file_name, name = test.split("::")
        assert command in lvr_commands_run_by(TESTS / file_name, name), f"{test} does not run `lvr {command}`"

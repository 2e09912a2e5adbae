"""The repository stands on its own: a copy of its files, with nothing beside it, runs the
README's main job, and no file points at a path outside the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "four_scenes.mp4"
MIN_FRAMES = 64  # the smallest tree (K=4) has 64 leaves, one frame each at least


def repo_files() -> list[str]:
    """The files a commit would hold now: tracked ones plus untracked ones git does not ignore.
    Outside a git checkout (a tarball, a copy) a throwaway git dir applies the .gitignore rules."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the repository's files")
    with tempfile.TemporaryDirectory() as scratch:
        if (REPO / ".git").exists():
            cmd = ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        else:
            subprocess.run(["git", "init", "-q", "--bare", scratch], check=True)
            cmd = ["git", f"--git-dir={scratch}", f"--work-tree={REPO}", "ls-files", "-z", "--others",
                   "--exclude-standard"]
        names = subprocess.run(cmd, check=True, capture_output=True, cwd=REPO).stdout.decode().split("\0")
    return sorted(n for n in set(names) if n and (REPO / n).is_file())


def main_job_command() -> str:
    """The README's main-job command: the first bash block after the Quick start's main-job sentence."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"^## Quick start\n.*?The main job.*?```bash\n(.*?)```", readme, re.S | re.M)
    assert found, "README.md: no ```bash block after 'The main job' in the Quick start section"
    block = found.group(1).strip()
    assert "\n" not in block, f"the main job should be one line, got:\n{block}"
    return block


def copy_repository(dst: Path) -> None:
    for name in repo_files():
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


def borrowing_venv(copy: Path) -> Path:
    """A .venv in the copy that sees this environment's packages through a .pth file, so
    setup.sh finds torch and the dependencies installed and only installs lvr itself, into
    the copy's own site-packages (this environment is read, never written)."""
    venv = copy / ".venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(purelib) / "_borrowed_site_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


def tripwires(folder: Path) -> Path:
    """apt-get and sudo that record being called and fail: setup must not reach them here."""
    folder.mkdir()
    calls = folder / "calls.log"
    for tool in ("apt-get", "sudo"):
        script = folder / tool
        script.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> '{calls}'\nexit 1\n")
        script.chmod(0o755)
    return calls


def where_lvr_imports_from(python: Path, cwd: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import lvr.prep.segment as m; print(m.__file__)"],
                         check=True, capture_output=True, text=True, cwd=cwd).stdout.strip()
    return Path(out).resolve().parents[1]


def test_readme_main_job_runs_in_a_bare_copy(tmp_path, tmp_path_factory):
    command = main_job_command()
    assert "examples/" in command  # the input ships with the repository
    copy = tmp_path / "lvr"  # the only entry in tmp_path: the copy has no sibling folders
    copy_repository(copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lvr"]
    venv = borrowing_venv(copy)
    work = tmp_path_factory.mktemp("main-job-tools")
    calls = tripwires(work / "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHON")}
    env.update(
        PATH=f"{work / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        LVR_CACHE_DIR=str(work / "cache"),
        # Offline: pip may only use what is installed. PIP_NO_BUILD_ISOLATION=0 means *no*
        # build isolation (pip reads negative options this way), so setuptools comes from here.
        PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    proc = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not calls.exists(), calls.read_text()
    # setup.sh is quiet when all is well: no setuptools notice box.
    assert "setup: ready" in proc.stderr
    assert "Editable installation" not in proc.stderr and "****" not in proc.stderr, proc.stderr

    records = [json.loads(line) for line in (copy / "nodes.jsonl").read_text().splitlines()]
    assert len(records) == 4 + 16 + 64 and {r["schema"] for r in records} == {"lvr.node/1"}
    assert {Path(r["path"]).resolve() for r in records} == {(copy / "examples" / SAMPLE.name).resolve()}
    assert records[0]["video"]["has_audio"] is True
    assert sum(1 for r in records if r["subtitles"]) > 64  # the sidecar .srt was attached
    frames = work / "cache" / "frames"
    assert all((frames / key).is_file() for r in records for key in r["frame_keys"])

    # lvr was installed into the copy's venv, from the copy; this environment's lvr is untouched.
    # (Asked from `work`: in tmp_path the copy's folder named lvr would shadow the package.)
    assert where_lvr_imports_from(venv / "bin" / "python", work) == copy.resolve()
    assert where_lvr_imports_from(Path(sys.executable), work) == REPO


# -- nothing points outside the repository --------------------------------------------

def _joined(*parts: str) -> str:
    """Patterns are assembled from parts so this file does not match itself."""
    return "".join(parts)


OUTSIDE_PATHS = [_joined("..", "/shared"), _joined("shared", "/media"), _joined("/wo", "rk/"),
                 _joined("/ho", "me/"), _joined("/ro", "ot/"), _joined("/Us", "ers/"), _joined("/mn", "t/")]
OUTSIDE_DOCUMENTS = [_joined("DESIGN", ".md")]  # the design notes live in docs/architecture.md


def text_files() -> dict[str, str]:
    out = {}
    for name in repo_files():
        data = (REPO / name).read_bytes()
        if b"\0" not in data[:8192]:
            out[name] = data.decode("utf-8", errors="replace")
    return out


def hits(patterns: list[str]) -> list[str]:
    return [f"{name}:{n}: {line.strip()}"
            for name, text in text_files().items()
            for n, line in enumerate(text.splitlines(), 1)
            if any(p in line for p in patterns)]


def test_no_file_refers_to_paths_outside_the_repository():
    assert hits(OUTSIDE_PATHS) == []


def test_no_file_cites_documents_outside_the_repository():
    assert hits(OUTSIDE_DOCUMENTS) == []


# -- the media tests and the README use ------------------------------------------------

def count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def test_sample_media_are_made_here(media_files, tmp_path_factory):
    """The clips the media tests use are built by the fixture, never looked up elsewhere."""
    assert len(media_files) == 6
    assert {p.suffix for p in media_files} == {".mp4", ".avi", ".mkv"}
    base = tmp_path_factory.getbasetemp().resolve()
    for path in media_files:
        assert path.resolve().is_relative_to(base), path
        assert count_frames(path) >= MIN_FRAMES, path


def test_example_video_is_what_its_readme_says():
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type:format=duration", "-of", "json",
         str(SAMPLE)], check=True, capture_output=True, text=True).stdout)
    assert sorted(s["codec_type"] for s in probe["streams"]) == ["audio", "video"]
    assert 20 <= float(probe["format"]["duration"]) <= 60
    assert SAMPLE.stat().st_size < 500_000
    assert SAMPLE.with_suffix(".srt").is_file()
    readme = (SAMPLE.parent / "README.md").read_text()
    assert "CC0" in readme and SAMPLE.name in readme


def test_example_video_command_remakes_it(tmp_path):
    """The ffmpeg command in examples/README.md makes a video like the committed one
    (the bytes differ between encoder versions; the shape and the pictures do not)."""
    import av
    import numpy as np

    block = re.search(r"```bash\n(ffmpeg .*?)```", (SAMPLE.parent / "README.md").read_text(), re.S).group(1)
    subprocess.run(["bash", "-c", block], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    remade = tmp_path / SAMPLE.name
    assert count_frames(remade) == count_frames(SAMPLE)

    def frames(path: Path, every: int = 30) -> list:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="gray").astype(np.float32)
                    for i, f in enumerate(container.decode(video=0)) if i % every == 0]

    for ours, theirs in zip(frames(SAMPLE), frames(remade), strict=True):
        assert ours.shape == theirs.shape and np.abs(ours - theirs).mean() < 8

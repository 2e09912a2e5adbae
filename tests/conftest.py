"""Shared fixtures: synthetic videos (made by synthetic_media.py) and the numbered video segmented.

Fixtures only: plain helpers and constants that tests import live in lvr_test_helpers.py and
synthetic_media.py, and no test file imports from another.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lvr_test_helpers import run_lvr
from synthetic_media import X264_WITH_B_FRAMES, ffmpeg, frame_number_filter, make_frame_number_video, make_sample_media


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def numbered_video(video_dir) -> Path:
    """12 s at 10 fps (120 frames), 320 px wide, frame N shows N; with audio."""
    path = video_dir / "numbered.mp4"
    if not path.exists():
        vf = frame_number_filter(320, 10, 12)
        ffmpeg("-f", "lavfi", "-i", vf, "-f", "lavfi", "-i", "sine=frequency=440:duration=12",
               *X264_WITH_B_FRAMES, "-c:a", "aac", "-shortest", str(path))
    return path


@pytest.fixture(scope="session")
def long_video(video_dir) -> Path:
    """20 minutes at 5 fps (6000 frames), 128 px wide, frame N shows N."""
    path = video_dir / "twenty_minutes.mp4"
    if not path.exists():
        make_frame_number_video(path, width=128, fps=5, duration=1200)
    return path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def segmented(numbered_video, tmp_path_factory):
    """`lvr segment` of the numbered video, with a sidecar subtitle file: (nodes file, cache).
    Tests that caption take a copy of the cache: lvr_test_helpers.fresh_cache."""
    root = tmp_path_factory.mktemp("captioning")
    video = root / "talk.mp4"
    shutil.copy(numbered_video, video)
    (root / "talk.srt").write_text("1\n00:00:00,500 --> 00:00:01,500\nWelcome to the kitchen\n")
    cache = root / "cache"
    nodes = root / "nodes.jsonl"
    proc = run_lvr("segment", video, "-o", nodes, "--cache-dir", cache, "-q")
    assert proc.returncode == 0, proc.stderr
    return nodes, cache


@pytest.fixture(scope="session")
def media_files(tmp_path_factory) -> list[Path]:
    """The sample clips of make_sample_media, made once per test session."""
    return make_sample_media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def street_clip(media_files) -> Path:
    """The plain case: 6 s of H.264 with AAC, 640x360 at 25 fps (150 frames)."""
    return next(p for p in media_files if p.name == "street_640x360.mp4")


@pytest.fixture(scope="session", autouse=True)
def _needs_ffmpeg():
    if not shutil.which("ffmpeg") or not shutil.which("ffprobe"):
        pytest.exit("ffmpeg and ffprobe are required (run scripts/setup.sh)", returncode=2)


@pytest.fixture(scope="session", autouse=True)
def _no_user_config(tmp_path_factory):
    """Commands read $XDG_CONFIG_HOME/lvr/config.toml: keep the tester's own out of every run."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old

"""Shared fixtures: synthetic videos made offline with ffmpeg's lavfi sources."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import os


def _media_dir() -> Path:
    """Real sample clips: $LVR_MEDIA_DIR, ../shared/media beside the checkout, or /work/shared/media."""
    candidates = [os.environ.get("LVR_MEDIA_DIR"),
                  Path(__file__).resolve().parents[2] / "shared" / "media", "/work/shared/media"]
    for c in candidates:
        if c and Path(c).is_dir() and any(Path(c).iterdir()):
            return Path(c)
    return Path(candidates[1])


MEDIA_DIR = _media_dir()
BITS = 16  # frame-number videos draw 16 bits, least significant on the left
# B-frames (some of them non-reference) exercise the decoder's frame skipping.
X264_WITH_B_FRAMES = ("-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-crf", "12",
                      "-g", "25", "-pix_fmt", "yuv420p")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=600)


def frame_number_filter(width: int, fps: float, duration: float) -> str:
    """A grey video whose frame N shows N in binary: column block b is white when bit b is set."""
    block = width // BITS
    return (f"color=c=gray:s={width}x{max(16, width * 9 // 16)}:r={fps}:d={duration},format=gray,"
            f"geq=lum='if(bitand(N\\,pow(2\\,floor(X/{block})))\\,235\\,16)'")


def make_frame_number_video(path: Path, *, width: int = 128, fps: float = 10, duration: float = 12,
                            extra_filters: str = "", extra_args: tuple[str, ...] = ()) -> Path:
    vf = frame_number_filter(width, fps, duration) + (f",{extra_filters}" if extra_filters else "")
    ffmpeg("-f", "lavfi", "-i", vf, *X264_WITH_B_FRAMES, *extra_args, str(path))
    return path


def read_frame_number(image) -> int:
    """Decode the number a frame-number picture shows (works on resized images)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = gray.shape
    value = 0
    for b in range(BITS):
        x = int((b + 0.5) * w / BITS)
        if gray[h // 4: 3 * h // 4, x].mean() > 128:
            value |= 1 << b
    return value


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


@pytest.fixture(scope="session")
def media_files() -> list[Path]:
    files = sorted(MEDIA_DIR.glob("*")) if MEDIA_DIR.is_dir() else []
    if not files:
        pytest.skip(f"no sample media in {MEDIA_DIR}")
    return files


@pytest.fixture(scope="session", autouse=True)
def _needs_ffmpeg():
    if not shutil.which("ffmpeg") or not shutil.which("ffprobe"):
        pytest.exit("ffmpeg and ffprobe are required (run scripts/setup.sh)", returncode=2)

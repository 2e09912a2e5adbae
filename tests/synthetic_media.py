"""Synthetic test media, made offline with ffmpeg's lavfi sources (the fixtures in conftest.py
make them once per session): frame-number videos whose pixels encode their own frame index,
and short clips shaped like real-world files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

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


# -- sample media: short clips shaped like real-world files -------------------------------
# Each is made offline from lavfi sources in well under a second and has at least 64 frames
# (the smallest tree, K=4, has 64 leaves). Between them they cover the containers, codecs,
# frame rates, sizes, rotation, audio and subtitle cases real collections hold.

X264 = ("-c:v", "libx264", "-preset", "veryfast", "-crf", "28", "-pix_fmt", "yuv420p")
AAC = ("-c:a", "aac", "-b:a", "48k")
SAMPLE_SUBTITLES = ("1\n00:00:00,500 --> 00:00:01,800\nThe kettle is on.\n\n"
                    "2\n00:00:02,200 --> 00:00:03,500\nTea will be ready soon.\n")
PHONE_ROTATION = 90  # the phone clip is stored landscape and shown portrait


def _lavfi(*sources: str) -> list[str]:
    return [arg for source in sources for arg in ("-f", "lavfi", "-i", source)]


def add_rotation(src: Path, dst: Path, degrees: int) -> Path:
    """Stream-copy src to dst with a display matrix, as phones write portrait video.
    ffmpeg >= 6 sets it with -display_rotation; older ones from the `rotate` tag."""
    try:
        ffmpeg("-display_rotation", str(degrees), "-i", str(src), "-c", "copy", str(dst))
    except subprocess.CalledProcessError:
        ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(dst))
    return dst


def make_sample_media(folder: Path) -> list[Path]:
    """Six clips: H.264+AAC 640x360 MP4; MPEG-4 Part 2+MP3 320x240 AVI (first frame pts > 0);
    NTSC 30000/1001 MP4; silent 224x224 MP4; a rotated phone MP4; an MKV with a subtitle stream."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: folder / name for name in (
        "street_640x360.mp4", "kitchen_320x240.avi", "living_room_ntsc.mp4",
        "tablet_224x224.mp4", "phone_portrait.mp4", "talk_subtitled.mkv")}
    ffmpeg(*_lavfi("testsrc2=s=640x360:r=25:d=6,hue=H=t/2", "sine=f=330:d=6"),
           *X264, *AAC, "-shortest", str(out["street_640x360.mp4"]))
    ffmpeg(*_lavfi("cellauto=s=320x240:r=30:rule=110:scroll=1", "anoisesrc=d=3:c=pink:a=0.05:r=22050"),
           "-t", "3", "-c:v", "mpeg4", "-bf", "2", "-q:v", "6", "-c:a", "libmp3lame", "-b:a", "48k",
           str(out["kitchen_320x240.avi"]))
    ffmpeg(*_lavfi("smptehdbars=s=480x270:r=30000/1001:d=4", "color=c=white:s=60x90:r=30000/1001",
                   "sine=f=440:d=4"),
           "-filter_complex", "[0][1]overlay=x='mod(t*240,480)':y=90:shortest=1",
           *X264, *AAC, "-shortest", str(out["living_room_ntsc.mp4"]))
    ffmpeg(*_lavfi("life=s=56x56:r=30:mold=10:ratio=0.3:seed=1:life_color=#e0c080:death_color=#203040,"
                   "scale=224:224:flags=neighbor"),
           "-t", "3", *X264, str(out["tablet_224x224.mp4"]))
    landscape = folder / "phone_landscape.tmp.mp4"
    ffmpeg(*_lavfi("testsrc2=s=480x270:r=30:d=3", "sine=f=550:d=3"), *X264, *AAC, "-shortest", str(landscape))
    add_rotation(landscape, out["phone_portrait.mp4"], PHONE_ROTATION)
    landscape.unlink()
    srt = folder / "talk_subtitles.tmp.srt"
    srt.write_text(SAMPLE_SUBTITLES)
    plasma = ("color=s=80x45:r=25:d=4,format=rgb24,geq=r='128+100*sin(X/7+T)':g='128+100*sin(Y/5+2*T)'"
              ":b='128+100*sin((X+Y)/9)',scale=320:180")
    ffmpeg(*_lavfi(plasma, "sine=f=220:d=4"), "-i", str(srt),
           "-map", "0", "-map", "1", "-map", "2", *X264, *AAC, "-c:s", "srt",
           "-metadata:s:s:0", "language=eng", "-t", "4", str(out["talk_subtitled.mkv"]))
    srt.unlink()
    return sorted(out.values())

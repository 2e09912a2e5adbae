"""Videos with a few frames that do not decode: damaged on purpose, decoded for real.

The damage is real: bytes of chosen H.264 packets are overwritten with garbage,
the libavcodec decoder rejects them, and those frames never come out (checked
below with a full decode before any test relies on it). Only non-reference
frames are damaged, except where a whole group of pictures is meant to go:
a broken reference frame would not come out either, but the frames predicted
from it would, concealed (copied from elsewhere) and with no error flag, which
no decoder-level check can tell from a good frame.
"""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from fake_openai import FakeOpenAI
from lvr.prep.frames import FrameStore
from lvr.prep.segment import nearest_decodable
from lvr.prep.tree import sample_indices
from lvr_test_helpers import load_jsonl, model_flags, run_lvr, scripted
from synthetic_media import ffmpeg, make_frame_number_video, read_frame_number

SPARSE = ("--high-frames", "8", "--medium-frames", "4", "--low-frames", "2")
SPARSE_COUNTS = {"high": 8, "medium": 4, "low": 2, "qa": 16}


def packets(path: Path) -> list[av.Packet]:
    """The video packets of a file, in presentation order."""
    with av.open(str(path)) as c:
        found = [p for p in c.demux(c.streams.video[0]) if p.size]
    return sorted(found, key=lambda p: p.pts)


def damage(src: Path, dst: Path, frames: list[int]) -> Path:
    """A copy of `src` whose packets for these frames (presentation order) are garbage after the
    first NAL header, so the decoder rejects them."""
    data = bytearray(src.read_bytes())
    pkts = packets(src)
    for i in frames:
        p = pkts[i]
        for b in range(p.pos + 5, p.pos + p.size):
            data[b] = (b * 37 + 11) & 0xFF
    dst.write_bytes(bytes(data))
    return dst


def decode_all(path: Path) -> dict[int, int]:
    """Frame index (presentation order) -> the number it shows, for the frames a full decode gives."""
    index = {p.pts: i for i, p in enumerate(packets(path))}
    shown = {}
    with av.open(str(path)) as c:
        for p in c.demux(c.streams.video[0]):
            try:
                shown.update((index[f.pts], read_frame_number(f.to_image())) for f in p.decode()
                             if not f.is_corrupt)
            except av.error.FFmpegError:
                pass
    return shown


def undecodable(path: Path) -> set[int]:
    """Frames (presentation order) that do not come out of a full decode."""
    return set(range(len(packets(path)))) - set(decode_all(path))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """12 s at 10 fps (120 frames, keyframes every 25 or at scene cuts), frame N shows N."""
    return make_frame_number_video(tmp_path_factory.mktemp("bad") / "clean.mp4", width=128)


def non_ref(clean: Path, wanted: list[int]) -> list[int]:
    """`wanted`, checked to be frames no other frame is predicted from (H.264 nal_ref_idc 0)."""
    pkts = packets(clean)
    for i in wanted:
        nal_header = bytes(pkts[i])[4]  # MP4 keeps NAL units behind a 4-byte length
        assert nal_header >> 5 & 3 == 0, f"frame {i} is a reference frame"
    return wanted


def errors_by_name(stderr: str) -> dict[str, str]:
    return {Path(line.split("error: ", 1)[1].split(": ", 1)[0]).name: line
            for line in stderr.splitlines() if "error: " in line}


def expected_substitute(wanted: int, start: int, stop: int, sampled: list[int], bad: set[int]) -> int:
    """The rule, written out: the nearest decodable frame of the node it does not show yet
    (ties: the earlier), else the nearest decodable one."""
    whole = [j for j in range(start, stop) if j not in bad]
    fresh = [j for j in whole if j not in sampled]
    return min(fresh or whole, key=lambda j: (abs(j - wanted), j))


def test_damaged_packets_really_do_not_decode(clean, tmp_path):
    assert undecodable(clean) == set()
    bad = damage(clean, tmp_path / "bad.mp4", non_ref(clean, [5, 17, 51]))
    # Those three never come out; every other frame comes out whole (nothing concealed).
    assert decode_all(bad) == {i: i for i in range(120) if i not in (5, 17, 51)}


def test_a_few_bad_frames_are_replaced_by_the_nearest_of_the_same_node(clean, tmp_path):
    bad_frames = non_ref(clean, [5, 17, 51])
    bad = damage(clean, tmp_path / "damaged.mp4", bad_frames)
    out, cache = tmp_path / "nodes.jsonl", tmp_path / "cache"
    proc = run_lvr("segment", bad, clean, "-o", out, "--cache-dir", cache, "--qa-frames", *SPARSE)
    assert proc.returncode == 0, proc.stderr
    done = next(line for line in proc.stderr.splitlines() if "done:" in line and "damaged.mp4" in line)
    assert "3 substituted" in done
    assert proc.stderr.strip().splitlines()[-1].endswith("3 substituted (did not decode)")

    records = [r for r in load_jsonl(out) if Path(r["path"]).name == "damaged.mp4"]
    store = FrameStore(cache / "frames")
    substituted = set()
    for r in records:
        for prefix in ("", "qa_"):
            if f"{prefix}frame_keys" not in r:
                continue
            start, stop = r["frame_range"]
            pairs = r[f"{prefix}substituted_frames"]
            used = r[f"{prefix}frame_indices"]
            wanted = sample_indices(start, stop, SPARSE_COUNTS["qa" if prefix else r["level"]])
            assert [w for w, _ in pairs] == [i for i in wanted if i in bad_frames], r["id"]
            assert used == sorted(dict(pairs).get(i, i) for i in wanted)
            for w, u in pairs:
                assert u == expected_substitute(w, start, stop, wanted, set(bad_frames)), (r["id"], w, u)
                substituted.add(w)
            # The records name the frames actually stored, and those are whole pictures of them.
            assert not set(used) & set(bad_frames)
            assert all(start <= i < stop for i in used)
            for key, index in zip(r[f"{prefix}frame_keys"], used):
                assert read_frame_number(store.image(key)) == index, (key, r["id"])
    assert substituted == set(bad_frames)
    # High node (1,) shows frames 0, 4, 8, 12, 17, ...: 17 became 16, the earlier of its free neighbours.
    high = next(r for r in records if r["id"] == [1])
    assert high["substituted_frames"] == [[17, 16]]


def test_too_much_missing_is_refused_and_the_batch_finishes(clean, tmp_path):
    many = damage(clean, tmp_path / "many.mp4", non_ref(clean, [3, 7, 11, 32, 40, 57, 71, 96]))
    few = damage(clean, tmp_path / "few.mp4", non_ref(clean, [5]))
    dead_start = damage(clean, tmp_path / "dead_start.mp4", [0])  # the first keyframe
    assert undecodable(dead_start) >= set(range(20))  # a whole first group of pictures

    out, cache = tmp_path / "nodes.jsonl", tmp_path / "cache"
    proc = run_lvr("segment", many, dead_start, few, "-o", out, "--cache-dir", cache)
    assert proc.returncode == 1
    reasons = errors_by_name(proc.stderr)
    assert set(reasons) == {"many.mp4", "dead_start.mp4"}, proc.stderr
    assert "8 of the 120 sampled frames do not decode (6.7%, max_bad_frames allows 5.0%)" in reasons["many.mp4"]
    assert "sampled frames do not decode" in reasons["dead_start.mp4"]
    assert {Path(r["path"]).name for r in load_jsonl(out)} == {"few.mp4"}

    # With no share limit, a node with nothing decodable is still refused.
    proc = run_lvr("segment", dead_start, "-o", tmp_path / "n2.jsonl", "--cache-dir", cache,
                   "--max-bad-frames", "1")
    assert proc.returncode == 1
    assert "no frame of node (1, 1) (0.00-0.80 s) decodes" in errors_by_name(proc.stderr)["dead_start.mp4"]

    # --max-bad-frames 0 refuses even one bad frame; a share outside 0..1 is a usage error.
    proc = run_lvr("segment", few, "-o", tmp_path / "n3.jsonl", "--cache-dir", cache, "--max-bad-frames", "0")
    assert proc.returncode == 1 and "1 of the 120 sampled frames do not decode" in proc.stderr
    assert run_lvr("segment", few, "--max-bad-frames", "1.5").returncode == 2


def test_a_header_listing_a_frame_more_than_the_file_holds(clean, tmp_path):
    faststart = tmp_path / "faststart.mp4"  # index first, so a lost tail leaves the index whole
    ffmpeg("-i", str(clean), "-c", "copy", "-movflags", "+faststart", str(faststart))
    last = max(packets(faststart), key=lambda p: p.pos)
    short_by_one = tmp_path / "short_by_one.mp4"
    short_by_one.write_bytes(faststart.read_bytes()[: last.pos])
    short_by_many = tmp_path / "short_by_many.mp4"
    tenth = sorted(p.pos for p in packets(faststart))[-12]
    short_by_many.write_bytes(faststart.read_bytes()[:tenth])

    out, cache = tmp_path / "nodes.jsonl", tmp_path / "cache"
    proc = run_lvr("segment", short_by_one, short_by_many, "-o", out, "--cache-dir", cache)
    assert proc.returncode == 1
    assert "1 frame(s) the header lists cannot be read" in proc.stderr
    assert "truncated: the header lists 120 frames but only 108 can be read" in \
        errors_by_name(proc.stderr)["short_by_many.mp4"]
    records = load_jsonl(out)
    assert {r["video"]["n_frames"] for r in records} == {119}
    store = FrameStore(cache / "frames")
    # Frame N shows N and starts at N / 10 s, wherever the lost frame was.
    for r in records:
        for key, t in zip(r["frame_keys"], r["frame_times"]):
            assert read_frame_number(store.image(key)) == round(t * 10), (key, r["id"])


def test_ask_answers_about_a_damaged_video(clean, tmp_path):
    bad = damage(clean, tmp_path / "damaged.mp4", non_ref(clean, [5, 17, 51]))
    cache = tmp_path / "cache"
    with FakeOpenAI(scripted, models=("navigator", "captioner", "qa")) as server:
        proc = run_lvr("ask", bad, "What is shown?", "-O", "A. one", "-O", "B. two",
                       *model_flags(server.url), "--cache-dir", cache, "--frame-sampling", "exact")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "B. two"
    (tree_file,) = (cache / "trees").glob("*/*.jsonl")
    records = load_jsonl(tree_file)
    assert {w for r in records for w, _ in r["substituted_frames"] + r.get("qa_substituted_frames", [])} \
        == {5, 17, 51}


def test_nearest_decodable_prefers_a_frame_the_node_does_not_show():
    ok = lambda j: j not in {10, 11, 12}  # noqa: E731
    assert nearest_decodable(11, 0, 30, {5, 11, 15}, ok) == 9       # 13 is as near; the earlier wins
    assert nearest_decodable(11, 0, 30, {5, 9, 11, 15}, ok) == 13
    assert nearest_decodable(11, 9, 14, {9, 11, 13}, ok) == 9        # all shown: the nearest anyway
    assert nearest_decodable(11, 10, 13, {11}, ok) is None           # nothing in the span decodes
    assert nearest_decodable(7, 0, 30, {7}, ok) == 7                 # decodes after all: itself

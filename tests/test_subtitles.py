"""Tests for lvr.prep.subtitles: parsers, file reading, sidecars, embedded streams, overlap."""

from __future__ import annotations

import random
import shutil
import subprocess
import time

import pytest

from lvr.prep import subtitles as st
from lvr.prep.subtitles import (
    SubtitleError,
    SubtitleLine,
    find_sidecars,
    lines_overlapping,
    load_subtitles,
    parse_srt,
    parse_vtt,
    read_embedded,
    read_subtitle_file,
)

HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="ffmpeg/ffprobe not installed")


def triples(lines):
    return [(round(l.start, 3), round(l.end, 3), l.text) for l in lines]


# ----------------------------------------------------------------------------
# SRT
# ----------------------------------------------------------------------------

def test_srt_basic_and_record():
    text = "1\n00:00:01,000 --> 00:00:02,500\nHello\nworld\n\n2\n00:01:02,250 --> 01:00:00,000\nBye\n"
    lines = parse_srt(text)
    assert triples(lines) == [(1.0, 2.5, "Hello world"), (62.25, 3600.0, "Bye")]
    assert lines[0].to_record() == {"start": 1.0, "end": 2.5, "text": "Hello world"}
    assert SubtitleLine(1 / 3, 2 / 3, "x").to_record() == {"start": 0.333, "end": 0.667, "text": "x"}


def test_srt_missing_indices_extra_blank_lines_and_dot_separator():
    text = (
        "\n\n00:00:01.000 --> 00:00:02.000\nNo index\n\n\n\n"
        "7\n00:00:03,000 --> 00:00:04,000\nWith index\n\n\n"
        "00:00:05,5 --> 00:00:06,25\nShort fraction\n"
    )
    assert triples(parse_srt(text)) == [
        (1.0, 2.0, "No index"),
        (3.0, 4.0, "With index"),
        (5.5, 6.25, "Short fraction"),
    ]


def test_srt_index_of_next_cue_is_not_text_even_without_blank_line():
    text = "1\n00:00:01,000 --> 00:00:02,000\nFirst\n2\n00:00:03,000 --> 00:00:04,000\nSecond\n"
    assert [l.text for l in parse_srt(text)] == ["First", "Second"]


def test_srt_cue_whose_only_text_is_a_number_is_kept():
    text = "00:00:01,000 --> 00:00:02,000\n42\n\n00:00:03,000 --> 00:00:04,000\nok\n"
    assert [l.text for l in parse_srt(text)] == ["42", "ok"]


def test_srt_drops_empty_and_backwards_cues_and_sorts():
    text = (
        "1\n00:00:09,000 --> 00:00:10,000\nlate\n\n"
        "2\n00:00:05,000 --> 00:00:04,000\nbackwards\n\n"
        "3\n00:00:01,000 --> 00:00:02,000\n<i></i> {\\an8}\n\n"
        "4\n00:00:03,000 --> 00:00:03,000\nzero length kept\n\n"
        "5\n00:00:02,000 --> 00:00:03,000\n\n"
    )
    assert triples(parse_srt(text)) == [(3.0, 3.0, "zero length kept"), (9.0, 10.0, "late")]


def test_srt_timing_with_coordinates_and_garbage_is_tolerated():
    text = (
        "garbage before\n"
        "1\n00:00:01,000 --> 00:00:02,000  X1:10 X2:20 Y1:5 Y2:9\nwith coords\n\n"
        "not a timing 00:00:01 -> 00:00:02\n"
    )
    lines = parse_srt(text)
    assert triples(lines) == [(1.0, 2.0, "with coords not a timing 00:00:01 -> 00:00:02")]


def test_tag_stripping():
    text = (
        "1\n00:00:01,000 --> 00:00:02,000\n"
        '{\\an8}<font color="#ffff00">Yellow</font>   <b>bold</b>\n'
        "<i>second</i>\tline{\\i1}x{\\i0}\n\n"
        "2\n00:00:03,000 --> 00:00:04,000\nASS\\Nbreak and\\hspace, a < b, <3, AT&amp;T kept\n"
    )
    assert [l.text for l in parse_srt(text)] == [
        "Yellow bold second linex",
        "ASS break and space, a < b, <3, AT&amp;T kept",
    ]


# ----------------------------------------------------------------------------
# VTT
# ----------------------------------------------------------------------------

VTT = """WEBVTT - Some title
Kind: captions
Language: en

NOTE This is a comment
that spans lines

STYLE
::cue { color: yellow }

REGION
id:fred width:40%

intro
00:01.000 --> 00:02.500 align:start position:10%
<v Bob>Hello</v> <c.yellow>there</c>

00:00:03.000 --> 00:00:04.000
<00:00:03.500>karaoke <b>word</b> &amp; &lt;tag&gt;&nbsp;x

2
01:00:00.000 --> 01:00:01.000 line:0
<ruby>漢<rt>kan</rt></ruby> ok
"""


def test_vtt_header_blocks_identifiers_settings_and_tags():
    assert triples(parse_vtt(VTT)) == [
        (1.0, 2.5, "Hello there"),
        (3.0, 4.0, "karaoke word & <tag> x"),
        (3600.0, 3601.0, "漢 ok"),
    ]


def test_vtt_tolerates_missing_header_and_missing_blank_after_header():
    assert triples(parse_vtt("00:01.000 --> 00:02.000\nno header\n")) == [(1.0, 2.0, "no header")]
    assert triples(parse_vtt("WEBVTT\n00:01.000 --> 00:02.000\nglued\n")) == [(1.0, 2.0, "glued")]


def test_vtt_drops_empty_cues():
    text = "WEBVTT\n\n00:01.000 --> 00:02.000\n<i> </i>\n\n00:03.000 --> 00:02.000\nbackwards\n"
    assert parse_vtt(text) == []


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

SRT_BODY = "1\n00:00:01,000 --> 00:00:02,000\nCaf\u00e9 \u00e0 la cr\u00e8me\n\n2\n00:00:03,000 --> 00:00:04,000\nline two\n"


def test_read_srt_with_bom_and_crlf(tmp_path):
    p = tmp_path / "a.srt"
    p.write_bytes(b"\xef\xbb\xbf" + SRT_BODY.replace("\n", "\r\n").encode("utf-8"))
    assert triples(read_subtitle_file(p)) == [(1.0, 2.0, "Café à la crème"), (3.0, 4.0, "line two")]


def test_read_vtt_with_bom_crlf_and_uppercase_extension(tmp_path):
    p = tmp_path / "a.VTT"
    p.write_bytes(b"\xef\xbb\xbfWEBVTT\r\n\r\n00:01.000 --> 00:02.000\r\nhi\r\n")
    assert triples(read_subtitle_file(str(p))) == [(1.0, 2.0, "hi")]


def test_read_latin1_file(tmp_path):
    p = tmp_path / "old.srt"
    p.write_bytes(SRT_BODY.encode("latin-1"))
    assert read_subtitle_file(p)[0].text == "Café à la crème"


def test_read_utf16_file(tmp_path):
    p = tmp_path / "wide.srt"
    p.write_bytes(SRT_BODY.encode("utf-16"))
    assert read_subtitle_file(p)[0].text == "Café à la crème"


def test_read_empty_and_header_only_files_give_no_lines(tmp_path):
    (tmp_path / "e.srt").write_bytes(b"")
    (tmp_path / "ws.srt").write_text("\n  \n")
    (tmp_path / "h.vtt").write_text("WEBVTT\n\nNOTE nothing yet\n")
    for name in ("e.srt", "ws.srt", "h.vtt"):
        assert read_subtitle_file(tmp_path / name) == []


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.srt", None, "file not found"),
        ("subs.ass", "[Script Info]\n", "unsupported subtitle extension"),
        ("junk.srt", "this is not\na subtitle file\n", "no subtitle cues found"),
        ("junk.vtt", "WEBVTT\n\nhello\n", "no subtitle cues found"),
    ],
)
def test_read_errors_name_the_file(tmp_path, name, content, reason):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(SubtitleError) as info:
        read_subtitle_file(p)
    msg = str(info.value)
    assert str(p) in msg and reason in msg
    assert "\n" not in msg


def test_read_directory_is_an_error(tmp_path):
    d = tmp_path / "dir.srt"
    d.mkdir()
    with pytest.raises(SubtitleError, match="dir.srt"):
        read_subtitle_file(d)


# ----------------------------------------------------------------------------
# Sidecars and load_subtitles with files
# ----------------------------------------------------------------------------

def test_find_sidecars_ordering(tmp_path):
    video = tmp_path / "movie.mp4"
    video.write_bytes(b"")
    names = [
        "movie.en.srt", "movie.vtt", "movie.SRT", "movie.fr.forced.VTT", "movie.de.vtt",
        "movie2.srt", "other.srt", "movie.txt", "movie.srt.bak", "amovie.srt", "movie.en.ass",
    ]
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / "movie.zz.srt").mkdir()  # directories are not sidecars
    found = [p.name for p in find_sidecars(video)]
    assert found == ["movie.SRT", "movie.vtt", "movie.de.vtt", "movie.en.srt", "movie.fr.forced.VTT"]
    assert all(p.parent == tmp_path for p in find_sidecars(video))


def test_find_sidecars_missing_folder_is_empty(tmp_path):
    assert find_sidecars(tmp_path / "nope" / "v.mp4") == []


def test_load_subtitles_prefers_explicit_then_sidecar(tmp_path, caplog):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really a video")
    (tmp_path / "clip.srt").write_text("garbage without cues")  # broken exact sidecar: skipped
    (tmp_path / "clip.en.vtt").write_text("WEBVTT\n\n00:05.000 --> 00:06.000\nside\n")
    explicit = tmp_path / "elsewhere.srt"
    explicit.write_text("00:00:02,000 --> 00:00:03,000\nexplicit b\n\n00:00:01,000 --> 00:00:02,000\nexplicit a\n")

    lines, source = load_subtitles(video, explicit=explicit)
    assert [l.text for l in lines] == ["explicit a", "explicit b"]  # sorted by start
    assert source == f"file:{explicit.absolute()}"

    lines, source = load_subtitles(video)
    assert triples(lines) == [(5.0, 6.0, "side")]
    assert source == f"sidecar:{(tmp_path / 'clip.en.vtt').absolute()}"
    assert "clip.srt" in caplog.text

    lines, _ = load_subtitles(video, time_offset=1.5)
    assert triples(lines) == [(3.5, 4.5, "side")]


def test_load_subtitles_explicit_errors_propagate(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    with pytest.raises(SubtitleError, match="nothere.srt"):
        load_subtitles(video, explicit=tmp_path / "nothere.srt")


def test_load_subtitles_on_non_video_raises_naming_it(tmp_path):
    if not HAVE_FFMPEG:
        pytest.skip("ffmpeg/ffprobe not installed")
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"definitely not an mp4")
    with pytest.raises(SubtitleError) as info:
        load_subtitles(bogus)
    assert str(bogus) in str(info.value) and "ffprobe failed" in str(info.value)


def test_read_embedded_missing_video(tmp_path):
    with pytest.raises(SubtitleError, match="gone.mkv: video file not found"):
        read_embedded(tmp_path / "gone.mkv")


def test_text_stream_selection_skips_bitmap_codecs():
    probe = {
        "streams": [
            {"index": 2, "codec_name": "hdmv_pgs_subtitle"},
            {"index": 3, "codec_name": "dvd_subtitle"},
            {"index": 4, "codec_name": "dvb_subtitle"},
            {"index": 5, "codec_name": "ass"},
            {"index": 6, "codec_name": "subrip"},
        ]
    }
    assert st._text_stream_indices(probe) == [5, 6]
    assert st._text_stream_indices({}) == []


def test_read_embedded_never_uses_a_shell(tmp_path, monkeypatch):
    video = tmp_path / "v; rm -rf x.mkv"
    video.write_bytes(b"")
    calls = []

    class Done:
        def __init__(self, stdout):
            self.returncode, self.stdout, self.stderr = 0, stdout, b""

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        if cmd[0] == "ffprobe":
            return Done(b'{"streams": [{"index": 0, "codec_name": "dvd_subtitle"}, {"index": 1, "codec_name": "subrip"}]}')
        return Done(b"1\n00:00:02,000 --> 00:00:03,000\nhi\n")

    monkeypatch.setattr(st.subprocess, "run", fake_run)
    lines, source = load_subtitles(video)
    assert source == "embedded:stream 1" and triples(lines) == [(2.0, 3.0, "hi")]
    for cmd, kw in calls:
        assert isinstance(cmd, list) and str(video) in cmd
        assert not kw.get("shell") and kw.get("timeout")
    assert calls[1][0][calls[1][0].index("-map") + 1] == "0:1"


# ----------------------------------------------------------------------------
# Embedded streams (real ffmpeg)
# ----------------------------------------------------------------------------

EMBED_SRT = (
    "1\n00:00:00,500 --> 00:00:01,200\n<i>Hello</i> there\n\n"
    "2\n00:00:01,500 --> 00:00:02,750\nSecond\nline\n"
)

ASS_SCRIPT = """[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
Dialogue: 0,0:00:00.40,0:00:01.00,Default,,0,0,0,,{\\an8}{\\i1}First{\\i0} ass\\Nline
Dialogue: 0,0:00:01.50,0:00:02.20,Default,,0,0,0,,Second {\\b1}bold{\\b0}
"""


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *map(str, args)], check=True, timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    if not HAVE_FFMPEG:
        pytest.skip("ffmpeg/ffprobe not installed")
    d = tmp_path_factory.mktemp("media")
    (d / "subs.srt").write_text(EMBED_SRT)
    (d / "subs.ass").write_text(ASS_SCRIPT)
    color = ["-f", "lavfi", "-i", "color=c=blue:s=64x48:d=3"]
    _ffmpeg(*color, "-i", d / "subs.srt", "-c:v", "libx264", "-preset", "ultrafast", "-c:s", "mov_text", d / "out.mp4")
    _ffmpeg(*color, "-i", d / "subs.ass", "-map", "0", "-map", "1",
            "-c:v", "libx264", "-preset", "ultrafast", "-c:s", "ass", d / "out.mkv")
    _ffmpeg("-i", d / "out.mp4", "-map", "0:v", "-c", "copy", d / "nosubs.mp4")
    return d


def assert_close(lines, expected, tol=0.05):
    assert [l.text for l in lines] == [t for _, _, t in expected]
    for line, (s, e, _) in zip(lines, expected):
        assert abs(line.start - s) <= tol and abs(line.end - e) <= tol


EXPECTED_MP4 = [(0.5, 1.2, "Hello there"), (1.5, 2.75, "Second line")]


@needs_ffmpeg
def test_read_embedded_mov_text(media):
    assert_close(read_embedded(media / "out.mp4"), EXPECTED_MP4)


@needs_ffmpeg
def test_read_embedded_time_offset(media):
    # The line straddling the first video frame starts at 0.
    assert_close(read_embedded(media / "out.mp4", time_offset=0.8), [(0.0, 0.4, "Hello there"), (0.7, 1.95, "Second line")])


def test_time_shift_drops_lines_before_first_frame_and_clamps():
    lines = [L(0.5, 1.2, "a"), L(1.5, 2.75, "b")]
    assert triples(st.shift_lines(lines, 1.3)) == [(0.2, 1.45, "b")]
    assert triples(st.shift_lines(lines, 1.2)) == [(0.3, 1.55, "b")]  # "a" would end exactly at 0
    assert triples(st.shift_lines(lines, 0.0)) == triples(lines)
    assert triples(st.shift_lines(lines, -1.0)) == [(1.5, 2.2, "a"), (2.5, 3.75, "b")]


@needs_ffmpeg
def test_load_subtitles_embedded(media):
    lines, source = load_subtitles(media / "out.mp4", time_offset=0.25)
    assert source == "embedded:stream 1"
    assert_close(lines, [(0.25, 0.95, "Hello there"), (1.25, 2.5, "Second line")])


@needs_ffmpeg
def test_read_embedded_ass_in_mkv(media):
    lines, source = load_subtitles(media / "out.mkv")
    assert source == "embedded:stream 1"
    assert_close(lines, [(0.4, 1.0, "First ass line"), (1.5, 2.2, "Second bold")])


@needs_ffmpeg
def test_no_subtitles_anywhere(media):
    assert read_embedded(media / "nosubs.mp4") == []
    assert load_subtitles(media / "nosubs.mp4") == ([], None)


# ----------------------------------------------------------------------------
# Overlap queries
# ----------------------------------------------------------------------------

def L(s, e, t="x"):
    return SubtitleLine(float(s), float(e), t)


def test_lines_overlapping_boundaries():
    lines = [L(0, 1, "a"), L(1, 2, "b"), L(2, 3, "c"), L(5, 6, "d")]
    texts = lambda s, e: [l.text for l in lines_overlapping(lines, s, e)]
    assert texts(1, 2) == ["b"]  # touching a at 1 and c at 2 is not overlap
    assert texts(0.999, 2.001) == ["a", "b", "c"]
    assert texts(3, 5) == []  # gap, touching both neighbours
    assert texts(-10, 0) == []
    assert texts(6, 10) == []
    assert texts(2.5, 5.5) == ["c", "d"]
    assert texts(1.5, 1.5) == ["b"]  # instant strictly inside b
    assert texts(1, 1) == []
    assert texts(3, 2) == []
    assert lines_overlapping([], 0, 10) == []


def test_lines_overlapping_long_line_spanning_later_short_ones():
    lines = [L(0, 100, "long"), L(10, 11, "s1"), L(50, 51, "s2"), L(99, 101, "s3")]
    assert [l.text for l in lines_overlapping(lines, 60, 70)] == ["long"]
    assert [l.text for l in lines_overlapping(lines, 100, 200)] == ["s3"]


def test_lines_overlapping_sees_list_edits_between_calls():
    lines = [L(0, 1, "a"), L(2, 3, "b")]
    assert [l.text for l in lines_overlapping(lines, 0, 10)] == ["a", "b"]
    lines[1] = L(2, 3, "changed")
    assert [l.text for l in lines_overlapping(lines, 0, 10)] == ["a", "changed"]
    lines.append(L(4, 5, "c"))
    assert [l.text for l in lines_overlapping(lines, 4.5, 10)] == ["c"]
    assert [l.text for l in lines_overlapping(tuple(lines), 0, 2.5)] == ["a", "changed"]


def test_lines_overlapping_matches_brute_force_and_is_fast():
    rng = random.Random(7)
    lines = []
    for _ in range(5000):
        s = rng.uniform(0, 10_000)
        lines.append(L(s, s + rng.choice([0.0, 0.5, 2.0, 7.0, 300.0]), f"{s:.3f}"))
    lines.sort(key=lambda l: l.start)
    queries = [(a, a + rng.choice([0.0, 1.0, 10.0, 500.0])) for a in (rng.uniform(-50, 10_050) for _ in range(3000))]
    t0 = time.perf_counter()
    got = [lines_overlapping(lines, a, b) for a, b in queries]
    elapsed = time.perf_counter() - t0
    for (a, b), res in zip(queries[:300], got):
        assert res == [l for l in lines if l.start < b and l.end > a]
    assert elapsed < 1.0, elapsed

"""LongVideo-R1 caption JSON: export, validated reading, import into the caption store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lvr.prep.caption_store import CaptionKey, CaptionStore
from lvr.prep.longvideo_r1 import (
    caption_text,
    captions_to_records,
    default_frame_settings,
    export_longvideo_r1,
    import_longvideo_r1,
    node_id_from_segment,
    read_longvideo_r1,
    safe_video_name,
    segment_id,
)
from lvr.prep.tree import Tree, TreeOptions

OPTS = TreeOptions()


def node_records(path: str, video_id: str, k: int = 4, n_frames: int = 448, fps: float = 29.97) -> list[dict]:
    """lvr.node/1 records for a synthetic video, shaped exactly like `lvr segment` writes them."""
    times = [i / fps for i in range(n_frames)]
    tree = Tree(k, times, n_frames / fps)
    out = []
    for node in tree.nodes():
        idx = tree.sampled_frames(node.id, OPTS)
        out.append({
            "schema": "lvr.node/1", "video_id": video_id, "path": path, "K": k,
            "level": node.level.label, "id": list(node.id),
            "start": round(node.start, 4), "end": round(node.end, 4),
            "frame_range": [node.start_frame, node.stop_frame],
            "image_side": OPTS.image_side(node.level),
            "frame_indices": idx, "frame_times": [round(times[i], 4) for i in idx],
            "subtitles": [{"start": 0.0, "end": 1.0, "text": "hi"}] if node.id[0] == 1 else [],
        })
    return out


def caption_for(rec: dict) -> str:
    i = "-".join(map(str, rec["id"]))
    return (f'Node {i}: a "quoted" café scene — 字幕 🎬\nsecond line with \\backslash\\, '
            f"tab\tand a literal </caption> inside")


def caption_records(nodes: list[dict], skip=lambda rec: False) -> list[dict]:
    return [{**{k: n[k] for k in ("video_id", "path", "K", "level", "id", "start", "end",
                                  "frame_indices", "frame_times")},
             "schema": "lvr.caption/1", "caption": caption_for(n), "model": "cap-model",
             "prompt_hash": "abc123"} for n in nodes if not skip(n)]


@pytest.fixture
def store(tmp_path):
    s = CaptionStore(tmp_path / "cache" / "captions.sqlite3")
    yield s
    s.close()


def test_segment_ids_follow_reference_positions():
    for k in range(3, 9):
        for depth in (1, 2, 3):
            ids = list(Tree(k, np.arange(k ** 3) / 10.0, k ** 3 / 10.0).ids(depth))
            segs = [segment_id(i, k) for i in ids]
            assert segs == list(range(1, k ** depth + 1))
            assert [node_id_from_segment(s, depth, k) for s in segs] == ids
    # the reference reader's index for (h, m, l): (h-1)*K*K + (m-1)*K + l - 1
    assert segment_id((2, 3, 4), 5) - 1 == 1 * 25 + 2 * 5 + 3


def test_export_import_export_is_lossless(tmp_path, store):
    a = node_records("/videos/Movie One.mp4", "vidA")
    b = node_records("/videos/other/clip.mkv", "vidB", n_frames=450)
    # video B lacks two low nodes: exported anyway, the gap reported
    recs = caption_records(a) + caption_records(b, skip=lambda n: n["id"] in ([1, 1, 1], [4, 4, 4]))
    first = export_longvideo_r1(recs, tmp_path / "out1")
    assert [p.name for p in first.paths] == ["Movie One.json", "clip.json"]
    assert len(first) == 2 and list(first) == first.paths and first[1] == first.paths[1]
    assert not first.errors
    assert first.videos[0].complete and first.videos[1].missing == [0, 0, 2] and first.missing == 2
    assert "missing 2 low" in first.lines()[1]

    data = json.loads(first.paths[0].read_text(encoding="utf-8"))
    assert data["video_name"] == "Movie One.mp4" and data["width"] == 4
    assert [len(level) for level in data["captions"]] == [4, 16, 64]
    for d, level in enumerate(data["captions"]):
        assert [e["segment_id"] for e in level] == list(range(1, 4 ** (d + 1) + 1))
        assert {e["level"] for e in level} == {("high", "medium", "low")[d]}
        assert all(list(e) == ["segment_id", "level", "caption", "frame_time", "frame_ids"] for e in level)
    by_id = {tuple(n["id"]): n for n in a}
    med = data["captions"][1][(2 - 1) * 4 + 3 - 1]            # how the reference reader finds (2, 3)
    assert med["frame_ids"] == by_id[(2, 3)]["frame_indices"]
    assert med["frame_time"] == [round(t, 1) for t in by_id[(2, 3)]["frame_times"]]
    assert med["caption"] == "<caption>" + caption_for(by_id[(2, 3)]) + "</caption>"
    assert read_longvideo_r1(first.paths[0])["captions"][1][6]["caption"] == med["caption"]

    summary = import_longvideo_r1(tmp_path / "out1", a + b, store, model="cap-model")
    assert (summary.files, summary.videos_matched, summary.stored) == (2, 2, 84 + 82)
    assert not summary.errors and not summary.unmatched and summary.span_mismatches == 0
    # the caption text comes back exactly, keyed by our node spans
    node = by_id[(3, 2, 1)]
    key = CaptionKey("vidA", "low", node["start"], node["end"], "cap-model", "imported",
                     default_frame_settings(node))
    assert store.get(key).caption == caption_for(node)
    assert store.get(key).node_id == (3, 2, 1)

    again = export_longvideo_r1(captions_to_records(a + b, store, model="cap-model"), tmp_path / "out2")
    for p1, p2 in zip(first.paths, again.paths):
        assert p1.name == p2.name and p1.read_bytes() == p2.read_bytes()

    rerun = import_longvideo_r1([p for p in first.paths], a + b, store, model="cap-model")
    assert (rerun.stored, rerun.already_present) == (0, 166)
    assert store.count() == 166


def reference_file(path: Path, video_name: str, k: int, n_frames: int, fps: float, captions, four=False) -> None:
    """A caption file laid out the way the reference script writes it (global split per level)."""
    levels = []
    for d, (name, frames) in enumerate((("high", 128), ("medium", 64), ("low", 32))):
        entries = []
        for idx, part in enumerate(np.array_split(range(n_frames), k ** (d + 1))):
            ids = np.linspace(part[0], part[-1], frames, dtype=int).tolist()
            entries.append({"segment_id": idx + 1, "level": name, "caption": captions(d, idx),
                            "frame_time": [round(i / fps, 1) for i in ids], "frame_ids": ids})
        levels.append(entries)
    data = {"video_name": video_name, "width": k, "captions": ([[]] if four else []) + levels}
    path.write_text(json.dumps(data))   # json.dump defaults, as the reference: ASCII escapes, spaces


def test_import_reference_layout(tmp_path, store):
    ref = tmp_path / "ref"
    ref.mkdir()

    def cap(d, idx):
        if (d, idx) == (2, 5):
            return "Sure, here it is: <caption>\n  The sixth leaf. </caption> hope it helps"
        if (d, idx) == (0, 0):
            return "<caption> This clip (video) opens on a kitchen — “quoted” </caption>"
        return f"<caption>level {d} segment {idx + 1}</caption>"

    reference_file(ref / "abc.json", "abc.mp4", 4, 448, 25.0, cap)
    reference_file(ref / "uneven.json", "uneven.mp4", 4, 450, 25.0, cap, four=True)
    reference_file(ref / "stranger.json", "stranger.mp4", 4, 448, 25.0, cap)
    nodes = (node_records("/data/abc.mp4", "vid-abc", fps=25.0)
             + node_records("/elsewhere/uneven.mp4", "vid-uneven", n_frames=450, fps=25.0))

    summary = import_longvideo_r1(ref, nodes, store, model="Qwen3-VL-32B")
    assert summary.files == 3 and summary.videos_matched == 2
    assert summary.unmatched == [str(ref / "stranger.json")]
    assert summary.stored == 2 * 84 and not summary.errors
    # even counts: the global and nested splits agree; 450 frames: some boundaries differ
    assert 0 < summary.span_mismatches < 84
    assert any("note:" in line for line in summary.lines())
    assert str(summary) == "3 files, 2 matched, 168 captions stored, 0 already present, 1 unmatched"

    by_id = {(n["video_id"], tuple(n["id"])): n for n in nodes}

    def stored(vid, node_id):
        n = by_id[(vid, node_id)]
        return store.get(CaptionKey(vid, n["level"], n["start"], n["end"], "Qwen3-VL-32B", "imported",
                                    default_frame_settings(n)))

    assert stored("vid-abc", (1,)).caption == "This clip (video) opens on a kitchen — “quoted”"
    leaf = stored("vid-abc", node_id_from_segment(6, 3, 4))
    assert leaf.caption == "The sixth leaf." and leaf.node_id == (1, 2, 2)
    assert leaf.meta["raw"].startswith("Sure, here it is") and leaf.meta["segment_id"] == 6
    assert stored("vid-uneven", (2, 3)).caption == "level 1 segment 7"
    assert stored("vid-abc", (4, 4, 4)).caption == "level 2 segment 64"


def test_import_reports_width_and_ambiguity(tmp_path, store):
    ref = tmp_path / "ref"
    ref.mkdir()
    reference_file(ref / "abc.json", "abc.mp4", 5, 125 * 4, 25.0, lambda d, i: "x")
    summary = import_longvideo_r1(ref / "abc.json", node_records("/v/abc.mp4", "vid1"), store, model="m")
    assert summary.videos_matched == 0 and summary.stored == 0
    assert len(summary.errors) == 1 and "width 5" in summary.errors[0] and "K=4" in summary.errors[0]

    twins = node_records("/a/abc.mp4", "vid1") + node_records("/b/abc.mp4", "vid2")
    reference_file(ref / "abc.json", "abc.mp4", 4, 448, 25.0, lambda d, i: "x")
    summary = import_longvideo_r1([ref / "abc.json"], twins, store, model="m")
    assert summary.stored == 0 and "matches 2 videos" in summary.errors[0]


def test_path_traversal_stays_inside_out_dir(tmp_path):
    out = tmp_path / "deep" / "out"
    nasty = ["../../etc/x", "..\\..\\evil.mp4", "/abs/../../..", "a/b/../../../c.mp4", "\x00bad:name?.mp4", ""]
    recs = []
    for i, path in enumerate(nasty):
        recs += caption_records(node_records(path, f"../../id{i}"), skip=lambda n: len(n["id"]) > 1)
    summary = export_longvideo_r1(recs, out)
    assert len(summary.paths) == len(nasty) and not summary.errors
    for p in summary.paths:
        assert p.parent.resolve() == out.resolve()
        assert not p.name.startswith(".")
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(summary.paths)
    assert {p.name for p in summary.paths} == {"x.json", "evil.json", "id2.json", "c.json",
                                               "_bad_name_.json", "id5.json"}
    assert json.loads((out / "x.json").read_text())["video_name"] == "x"
    assert safe_video_name("..") == "video" and safe_video_name("...", "..") == "video"


def test_export_reports_bad_records_and_name_clashes(tmp_path):
    a = caption_records(node_records("/one/same.mp4", "vid1"))
    b = caption_records(node_records("/two/same.mp4", "vid2"))
    bad = [dict(a[0], id=[9]), dict(a[1], level="low"), dict(a[2], caption=None), "not a record",
           dict(a[3], frame_times=[1.0])]
    summary = export_longvideo_r1(a + b + bad + [a[0]], tmp_path / "out")
    assert [p.name for p in summary.paths] == ["same.json"]
    joined = "\n".join(summary.errors)
    assert "already written for video vid1" in joined and "id must be" in joined
    assert "does not match id" in joined and "no caption text" in joined
    assert "not a JSON object" in joined and "one per frame index" in joined
    assert "appears again" in joined
    assert all("\n" not in e for e in summary.errors)


def test_caption_text_extraction():
    assert caption_text("<caption> a\nb </caption>") == "a\nb"
    assert caption_text("no tags at all ") == "no tags at all"
    assert caption_text("pre <caption>x</caption> post <caption>y</caption>") == "x"
    assert caption_text("<caption>keeps </caption> inside</caption>") == "keeps </caption> inside"


GOOD = {"video_name": "v.mp4", "width": 4,
        "captions": [[{"segment_id": 1, "level": "high", "caption": "<caption>c</caption>",
                       "frame_time": [0.0, 0.5], "frame_ids": [0, 12]}], [], []]}


def _with(path_in_doc, value):
    doc = json.loads(json.dumps(GOOD))
    target = doc
    for part in path_in_doc[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path_in_doc[-1]]
    else:
        target[path_in_doc[-1]] = value
    return json.dumps(doc).encode()


BAD_FILES = [
    (b"{not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "top level"),
    (_with(["width"], KeyError), "width: missing"),
    (_with(["width"], "4"), "width: must be a positive integer"),
    (_with(["video_name"], 7), "video_name: must be"),
    (_with(["captions"], [[], []]), "captions: must hold three lists"),
    (_with(["captions", 0, 0, "segment_id"], 0), "captions[0][0].segment_id"),
    (_with(["captions", 0, 0, "level"], "low"), "captions[0][0].level"),
    (_with(["captions", 0, 0, "caption"], ["x"]), "captions[0][0].caption"),
    (_with(["captions", 0, 0, "frame_ids"], [0, -1]), "captions[0][0].frame_ids"),
    (_with(["captions", 0, 0, "frame_time"], ["0.0", 1]), "captions[0][0].frame_time"),
    (_with(["captions", 0, 0, "frame_ids"], [0]), "1 frame_ids"),
    (_with(["captions", 0, 0, "frame_ids"], KeyError), "captions[0][0].frame_ids: missing"),
    (_with(["captions", 1], [{"x": 1}] * 17), "17 entries"),
    (_with(["captions", 0], GOOD["captions"][0] * 2), "appears twice"),
]


@pytest.mark.parametrize("content,field", BAD_FILES)
def test_bad_files_give_one_line_errors(tmp_path, content, field):
    path = tmp_path / "bad file.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_longvideo_r1(path)
    msg = str(err.value)
    assert msg.startswith(str(path) + ": ") and field in msg and "\n" not in msg


def test_reader_accepts_good_and_four_list_layout(tmp_path, store):
    path = tmp_path / "v.json"
    path.write_bytes(json.dumps(GOOD).encode())
    assert read_longvideo_r1(path) == GOOD
    doc = dict(GOOD, captions=[[]] + GOOD["captions"])
    path.write_text(json.dumps(doc))
    assert read_longvideo_r1(path) == GOOD
    with pytest.raises(ValueError, match="cannot read"):
        read_longvideo_r1(tmp_path / "missing.json")
    # a bad file among good ones is reported and the others still import
    (tmp_path / "broken.json").write_text("{")
    summary = import_longvideo_r1([tmp_path / "broken.json", path], node_records("/x/v.mp4", "vid"),
                                  store, model="m")
    assert summary.stored == 1 and summary.errors == [f"{tmp_path / 'broken.json'}: not JSON "
                                                      "(Expecting property name enclosed in double quotes "
                                                      "at line 1 column 2)"]

"""Import and export of the LongVideo-R1 release caption JSON (one file per video), and
`ReleasedCaptioner`, which serves a folder of them in place of a captioner (`--captions DIR`).

The layout follows the reference code, read from the public repository
``qiujihao19/LongVideo-R1``: ``data/videocaption_generation.py`` writes the
files; ``eval/evaluation.py`` and
``verl-tool/verl_tool/servers/tools/utils/caption_videoqa.py`` read them::

    {"video_name": "abc.mp4",            # the video's file name, extension included
     "width": 4,                         # the tree width K
     "captions": [[...high...], [...medium...], [...low...]]}

and each entry, in this key order::

    {"segment_id": 7,                    # int, 1-based position inside its level, in tree
                                         #   order: high h; medium (h-1)*K+m;
                                         #   low ((h-1)*K+(m-1))*K+l
     "level": "medium",                  # "high" | "medium" | "low"
     "caption": "<caption>...</caption>",  # the captioner's reply, tags kept
     "frame_time": [12.0, 12.5, ...],    # seconds of each sampled frame (the reference
                                         #   rounds i/avg_fps to 0.1 s)
     "frame_ids": [360, 375, ...]}       # the sampled frame indices, same length

Facts behind the choices here:

* The file is named ``<stem>.json`` after the video: readers open
  ``f"{video_id}.json"`` where the id is the benchmark's video key (the file
  stem). ``video_name`` keeps the extension.
* Readers index each level list by position
  (``medium[(h-1)*K + m-1]``), so a file is only usable by them when every
  node is present; `export_longvideo_r1` writes what it has and reports the
  gaps (`ExportSummary`). Readers print ``frame_time[0]`` and
  ``frame_time[-1]`` as the node's span.
* The reference keeps the whole reply in ``caption``, wrapped in
  ``<caption>`` tags (it adds them when the model forgot). Our records hold the
  bare text; export wraps it, import takes the text inside the tags
  (whitespace-trimmed, as the reference's extraction does). A reply with text
  outside the tags keeps its raw form in the store entry's meta.
* The reference's get_caption tool also accepts files with a leading empty
  fourth list; `read_longvideo_r1` accepts that too.
* The reference splits each level of frames globally, so a medium or low
  boundary can differ by one frame from our nested split. Import stores each
  caption under our node's span and counts such nodes (``span_mismatches``)
  by comparing the entry's first and last frame id with the node's frame range.

Paths and ids inside records are untrusted: the output name is reduced to a
plain file name, so nothing is ever written outside ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .caption_store import CaptionKey, CaptionStore
from .captioning import (CAPTION_SCHEMA, CaptionError, CaptionOptions, CaptionResult, Captioner, frame_settings,
                         node_label)
from .frames import FrameStore
from .models import NoModel
from .tags import CAPTION, caption_text, wrap

LEVEL_NAMES = ("high", "medium", "low")
ENTRY_KEYS = ("segment_id", "level", "caption", "frame_time", "frame_ids")
REFERENCE_TIME_DECIMALS = 1   # the reference writes round(i / fps, 1)
MAX_STEM_BYTES = 200          # leaves room for ".json" and a temp suffix under NAME_MAX


# -- ids ----------------------------------------------------------------------

def segment_id(node_id: Iterable[int], k: int) -> int:
    """1-based position of a node inside its level, in tree order."""
    flat = 0
    for i in node_id:
        flat = flat * k + (int(i) - 1)
    return flat + 1


def node_id_from_segment(seg: int, depth: int, k: int) -> tuple[int, ...]:
    """Inverse of `segment_id` for a node at `depth` (1 high, 2 medium, 3 low)."""
    rest, parts = seg - 1, []
    for _ in range(depth):
        rest, r = divmod(rest, k)
        parts.append(r + 1)
    return tuple(reversed(parts))


# -- captions and names -------------------------------------------------------

def wrap_caption(text: str) -> str:
    return wrap(CAPTION, text.strip())


_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def _basename(path: str) -> str:
    # Both separators: a record written on Windows must not smuggle "..\\".
    return re.split(r"[/\\]", path)[-1]


def safe_video_name(path: "str | None", video_id: str = "") -> str:
    """A plain file name for a video: never a path, never empty, never hidden."""
    for raw in (path, video_id, "video"):
        name = _UNSAFE_CHARS.sub("_", _basename(str(raw or ""))).strip().strip(".").strip()
        if name:
            break
    stem, suffix = _split_ext(name)
    while len(stem.encode("utf-8")) > MAX_STEM_BYTES:
        stem = stem[:-1]
    return stem + suffix


def _split_ext(name: str) -> tuple[str, str]:
    p = Path(name)
    return (p.stem, p.suffix) if p.stem else (name, "")


def json_name(video_name: str) -> str:
    """The caption file's name for a video: `<stem>.json`."""
    return _split_ext(safe_video_name(video_name))[0] + ".json"


def default_frame_settings(node: dict) -> str:
    """Frame settings a node was (or would be) captioned with, for the cache key (subtitles shown)."""
    return frame_settings(node)


def _atomic_write(path: Path, text: str) -> None:
    """Write a whole file or nothing: temp name in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


# -- export -------------------------------------------------------------------

@dataclass
class VideoExport:
    video_id: str
    video_name: str
    path: Path
    k: int
    written: list[int]     # entries per level [high, medium, low]
    missing: list[int]     # nodes per level with no caption record

    @property
    def complete(self) -> bool:
        return not any(self.missing)

    def describe(self) -> str:
        total = sum(self.written)
        line = f"{self.path.name}: K={self.k}, {total}/{total + sum(self.missing)} nodes"
        if not self.complete:
            gaps = ", ".join(f"{n} {lv}" for n, lv in zip(self.missing, LEVEL_NAMES) if n)
            line += (f" (missing {gaps}; reference readers index by position "
                     f"and need every node)")
        return line


@dataclass
class ExportSummary:
    """What `export_longvideo_r1` did. `paths` are the files written, in order."""

    videos: list[VideoExport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # skipped records and videos, one line each

    @property
    def paths(self) -> list[Path]:
        return [v.path for v in self.videos]

    @property
    def missing(self) -> int:
        return sum(sum(v.missing) for v in self.videos)

    def lines(self) -> list[str]:
        """Human-readable report: one line per video, then one per problem."""
        return [f"wrote {v.describe()}" for v in self.videos] + [f"error: {e}" for e in self.errors]

    # Also usable as the plain list of written paths (len, iteration, indexing).
    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __getitem__(self, i):
        return self.paths[i]


def _check_caption_record(rec) -> str | None:
    """Why a caption record cannot be exported, or None when it can."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("video_id"), str) or not rec["video_id"]:
        return "no video_id"
    k = rec.get("K")
    if not _is_int(k) or k < 1:
        return "K must be a positive integer"
    ids = rec.get("id")
    if (not isinstance(ids, list) or not 1 <= len(ids) <= 3
            or not all(_is_int(i) and 1 <= i <= k for i in ids)):
        return f"id must be 1 to 3 integers in 1..{k}"
    if "level" in rec and rec["level"] != LEVEL_NAMES[len(ids) - 1]:
        return f"level {rec['level']!r} does not match id {ids}"
    if not isinstance(rec.get("caption"), str):
        return "no caption text"
    fi, ft = rec.get("frame_indices", []), rec.get("frame_times", [])
    if not isinstance(fi, list) or not all(_is_int(i) and i >= 0 for i in fi):
        return "frame_indices must be a list of frame indices"
    if not isinstance(ft, list) or not all(_is_number(t) for t in ft) or len(ft) != len(fi):
        return "frame_times must be numbers, one per frame index"
    if rec.get("path") is not None and not isinstance(rec["path"], str):
        return "path must be a string"
    return None


def export_longvideo_r1(caption_records: Iterable[dict], out_dir: "str | os.PathLike", *,
                        time_decimals: int | None = REFERENCE_TIME_DECIMALS,
                        caption_tags: bool = True) -> ExportSummary:
    """Write one LongVideo-R1 caption file per video found in `caption_records`.

    Records (`lvr.caption/1`) are grouped by video_id; the file is
    `<out_dir>/<stem>.json` where the stem comes from the record's path
    (reduced to a safe file name). Nodes are written in tree order. Videos
    with missing nodes are still written; `ExportSummary` says what is missing.
    Bad records, and a second video whose name is already taken, are skipped
    and reported in `errors`. `time_decimals=None` keeps frame times as
    recorded; `caption_tags=False` writes bare caption text.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    summary = ExportSummary()
    videos: dict[str, dict] = {}
    for n, rec in enumerate(caption_records, 1):
        why = _check_caption_record(rec)
        vid = rec.get("video_id") if isinstance(rec, dict) else None
        if why is None:
            v = videos.setdefault(vid, {"path": rec.get("path"), "K": rec["K"], "nodes": {}})
            node_id = tuple(rec["id"])
            if rec["K"] != v["K"]:
                why = f"K={rec['K']} but earlier records of this video have K={v['K']}"
            elif node_id in v["nodes"]:
                why = f"node {node_id} appears again; kept the first"
            else:
                v["nodes"][node_id] = rec
        if why is not None:
            summary.errors.append(f"caption record {n} (video {vid!r}): {why}")

    taken: dict[str, str] = {}
    for vid, v in videos.items():
        name = safe_video_name(v["path"], vid)
        file_name = json_name(name)
        target = out / file_name
        # Defence in depth: the sanitised name must land directly in out_dir.
        if target.resolve().parent != root:
            summary.errors.append(f"video {vid}: unsafe output name {file_name!r}; skipped")
            continue
        other = taken.get(file_name.lower())
        if other is not None:
            summary.errors.append(f"video {vid} ({v['path']}): {file_name} is already written for "
                                  f"video {other}; skipped (rename one of the videos)")
            continue
        taken[file_name.lower()] = vid
        k = v["K"]
        levels: list[list[dict]] = [[], [], []]
        for node_id in sorted(v["nodes"]):
            rec = v["nodes"][node_id]
            times = rec.get("frame_times", [])
            if time_decimals is not None:
                times = [round(float(t), time_decimals) for t in times]
            levels[len(node_id) - 1].append({
                "segment_id": segment_id(node_id, k),
                "level": LEVEL_NAMES[len(node_id) - 1],
                "caption": wrap_caption(rec["caption"]) if caption_tags else rec["caption"],
                "frame_time": times,
                "frame_ids": list(rec.get("frame_indices", [])),
            })
        data = {"video_name": name, "width": k, "captions": levels}
        _atomic_write(target, json.dumps(data, ensure_ascii=False))
        summary.videos.append(VideoExport(
            vid, name, target, k, [len(x) for x in levels],
            [k ** (d + 1) - len(levels[d]) for d in range(3)]))
    return summary


# -- reading ------------------------------------------------------------------

def read_longvideo_r1(path: "str | os.PathLike") -> dict:
    """Parse and check one caption file. Raises a one-line ValueError naming the file and field.

    Returns {"video_name", "width", "captions": [high, medium, low]} with every
    entry holding exactly the five reference keys.
    """
    name = str(path)

    def bad(where: str, why: str) -> ValueError:
        return ValueError(f"{name}: {where}: {why}")

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{name}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: not a LongVideo-R1 caption file (top level is not a JSON object)")
    for key in ("video_name", "width", "captions"):
        if key not in data:
            raise bad(key, "missing")
    video_name = data["video_name"]
    if not isinstance(video_name, str) or not video_name.strip():
        raise bad("video_name", "must be a non-empty string")
    k = data["width"]
    if not _is_int(k) or k < 1:
        raise bad("width", f"must be a positive integer, got {k!r}")
    levels = data["captions"]
    if not isinstance(levels, list):
        raise bad("captions", "must be a list of three lists [high, medium, low]")
    offset = 0
    if len(levels) == 4 and levels[0] == []:
        levels, offset = levels[1:], 1   # layout the reference get_caption tool also accepts
    if len(levels) != 3:
        raise bad("captions", f"must hold three lists [high, medium, low], got {len(levels)}")
    out_levels = []
    for d, entries in enumerate(levels):
        where = f"captions[{d + offset}]"
        if not isinstance(entries, list):
            raise bad(where, f"must be a list of {LEVEL_NAMES[d]}-level entries")
        size = k ** (d + 1)
        if len(entries) > size:
            raise bad(where, f"{len(entries)} entries, but a K={k} tree has {size} {LEVEL_NAMES[d]} nodes")
        seen: set[int] = set()
        checked = []
        for i, e in enumerate(entries):
            at = f"{where}[{i}]"
            if not isinstance(e, dict):
                raise bad(at, "must be a JSON object")
            for key in ENTRY_KEYS:
                if key not in e:
                    raise bad(f"{at}.{key}", "missing")
            seg = e["segment_id"]
            if isinstance(seg, str) and seg.strip().isdigit():
                seg = int(seg)
            if not _is_int(seg) or not 1 <= seg <= size:
                raise bad(f"{at}.segment_id", f"must be an integer in 1..{size}, got {e['segment_id']!r}")
            if seg in seen:
                raise bad(f"{at}.segment_id", f"{seg} appears twice")
            seen.add(seg)
            level = e["level"]
            if not isinstance(level, str) or level.strip().lower() != LEVEL_NAMES[d]:
                raise bad(f"{at}.level", f"must be {LEVEL_NAMES[d]!r} in this list, got {level!r}")
            if not isinstance(e["caption"], str):
                raise bad(f"{at}.caption", "must be a string")
            times, ids = e["frame_time"], e["frame_ids"]
            if not isinstance(times, list) or not all(_is_number(t) for t in times):
                raise bad(f"{at}.frame_time", "must be a list of times in seconds")
            if not isinstance(ids, list) or not all(_is_int(x) and x >= 0 for x in ids):
                raise bad(f"{at}.frame_ids", "must be a list of frame indices (integers >= 0)")
            if len(times) != len(ids):
                raise bad(at, f"{len(times)} frame_time values but {len(ids)} frame_ids")
            checked.append({"segment_id": seg, "level": LEVEL_NAMES[d], "caption": e["caption"],
                            "frame_time": [float(t) for t in times], "frame_ids": list(ids)})
        out_levels.append(checked)
    return {"video_name": video_name, "width": k, "captions": out_levels}


# -- import -------------------------------------------------------------------

@dataclass
class ImportSummary:
    files: int = 0                  # caption files read
    videos_matched: int = 0         # files matched to a video of the node records
    stored: int = 0                 # captions newly put in the store
    already_present: int = 0        # captions the store already had (first writer wins)
    unmatched: list[str] = field(default_factory=list)   # files naming no known video
    errors: list[str] = field(default_factory=list)      # one line each
    span_mismatches: int = 0        # captions whose frames do not start/end on our node's frames

    def __str__(self) -> str:
        text = (f"{self.files} files, {self.videos_matched} matched, {self.stored} captions stored, "
                f"{self.already_present} already present")
        if self.unmatched:
            text += f", {len(self.unmatched)} unmatched"
        if self.errors:
            text += f", {len(self.errors)} errors"
        return text

    def lines(self) -> list[str]:
        """Human-readable report: totals, then one line per unmatched file and per error."""
        out = [f"{self.files} files, {self.videos_matched} matched; {self.stored} captions stored, "
               f"{self.already_present} already present"]
        if self.span_mismatches:
            out.append(f"note: {self.span_mismatches} captions were made from frames that start or end "
                       f"one or more frames off our node boundaries (the reference splits each level "
                       f"globally); stored under our node spans")
        out += [f"unmatched: {p} (no video with that name in the node records)" for p in self.unmatched]
        out += [f"error: {e}" for e in self.errors]
        return out


def _expand(json_paths) -> list[Path]:
    if isinstance(json_paths, (str, os.PathLike)):
        json_paths = [json_paths]
    out = []
    for p in json_paths:
        p = Path(p)
        out.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    return out


class _Videos:
    """Node records indexed by video and by the names a caption file may use."""

    def __init__(self, node_records: Iterable[dict]):
        self.videos: dict[str, dict] = {}
        self.by_name: dict[str, set[str]] = {}
        self.by_stem: dict[str, set[str]] = {}
        self.problems: list[str] = []
        for n, rec in enumerate(node_records, 1):
            try:
                vid, k, node_id = rec["video_id"], rec["K"], tuple(int(i) for i in rec["id"])
                float(rec["start"]), float(rec["end"])
            except (KeyError, TypeError, ValueError):
                self.problems.append(f"node record {n}: needs video_id, K, id, start and end; skipped")
                continue
            v = self.videos.setdefault(vid, {"path": rec.get("path"), "K": k, "nodes": {}})
            v["nodes"].setdefault(node_id, rec)
            path = str(rec.get("path") or "")
            for name in {_basename(path), safe_video_name(path, vid)}:
                if name:
                    self.by_name.setdefault(name, set()).add(vid)
                    self.by_stem.setdefault(_split_ext(name)[0], set()).add(vid)

    def match(self, video_name: str, file_stem: str) -> set[str]:
        base = _basename(video_name)
        for found in (self.by_name.get(base), self.by_name.get(safe_video_name(base)),
                      self.by_stem.get(_split_ext(base)[0]), self.by_stem.get(file_stem)):
            if found:
                return found
        return set()


def import_longvideo_r1(json_paths, node_records: Iterable[dict], store: CaptionStore, *,
                        model: str, prompt_hash: str = "imported",
                        frame_settings: Callable[[dict], str] | None = None) -> ImportSummary:
    """Put the captions of LongVideo-R1 caption files into the caption store.

    Each file is matched to a video of `node_records` (`lvr.node/1`) by
    name: `video_name` against the record path's file name, then stems, then
    the JSON file's own stem. The tree width must equal the video's K. Each
    caption is stored under CaptionKey(video_id, level, node start/end,
    model, prompt_hash, frame_settings(node) or `default_frame_settings`).
    `json_paths` may name files or folders of `*.json`. Bad files are
    reported in `errors` and the rest go on.
    """
    videos = _Videos(node_records)
    summary = ImportSummary(errors=list(videos.problems))
    settings_of = frame_settings or default_frame_settings
    for path in _expand(json_paths):
        summary.files += 1
        try:
            data = read_longvideo_r1(path)
        except ValueError as e:
            summary.errors.append(str(e))
            continue
        found = videos.match(data["video_name"], path.stem)
        if not found:
            summary.unmatched.append(str(path))
            continue
        k = data["width"]
        if len(found) > 1:
            same_k = {vid for vid in found if videos.videos[vid]["K"] == k}
            if len(same_k) != 1:
                summary.errors.append(f"{path}: video_name {data['video_name']!r} matches "
                                      f"{len(found)} videos ({', '.join(sorted(found))}); skipped")
                continue
            found = same_k
        vid = next(iter(found))
        video = videos.videos[vid]
        if video["K"] != k:
            summary.errors.append(f"{path}: width {k}, but video {vid} ({video['path']}) has "
                                  f"K={video['K']} in the node records; skipped")
            continue
        summary.videos_matched += 1
        no_node = 0
        for d, entries in enumerate(data["captions"]):
            for e in entries:
                node_id = node_id_from_segment(e["segment_id"], d + 1, k)
                node = video["nodes"].get(node_id)
                if node is None:
                    no_node += 1
                    continue
                rng = node.get("frame_range")
                ids = e["frame_ids"]
                if (isinstance(rng, list) and len(rng) == 2 and ids
                        and (ids[0] != rng[0] or ids[-1] != rng[1] - 1)):
                    summary.span_mismatches += 1
                text = caption_text(e["caption"])
                meta = {"source": "longvideo-r1", "file": str(path), "segment_id": e["segment_id"],
                        "frame_time": e["frame_time"], "frame_ids": ids,
                        "created_at": round(time.time(), 3)}
                if e["caption"] != wrap_caption(text):
                    meta["raw"] = e["caption"]   # keep text outside the tags, odd spacing
                key = CaptionKey(vid, LEVEL_NAMES[d], node["start"], node["end"], model,
                                 prompt_hash, settings_of(node))
                if store.put(key, node_id, text, meta):
                    summary.stored += 1
                else:
                    summary.already_present += 1
        if no_node:
            summary.errors.append(f"{path}: {no_node} captions name nodes that video {vid} has no "
                                  f"node record for; not stored")
    return summary


def captions_to_records(node_records: Iterable[dict], store: CaptionStore, *, model: str,
                        prompt_hash: str = "imported",
                        frame_settings: Callable[[dict], str] | None = None) -> Iterator[dict]:
    """`lvr.caption/1` records for the nodes whose caption is in the store.

    The inverse of `import_longvideo_r1` (with the same model, prompt_hash and
    frame_settings), so export(captions_to_records(import(files))) writes the
    files again. Node records are looked up one video at a time.
    """
    settings_of = frame_settings or default_frame_settings

    def flush(batch: list[dict]) -> Iterator[dict]:
        keys = [CaptionKey(n["video_id"], LEVEL_NAMES[len(n["id"]) - 1], n["start"], n["end"],
                           model, prompt_hash, settings_of(n)) for n in batch]
        found = store.get_many(keys)
        for node, key in zip(batch, keys):
            entry = found.get(key.digest())
            if entry is None:
                continue
            yield {
                "schema": CAPTION_SCHEMA, "video_id": node["video_id"], "path": node.get("path"),
                "K": node["K"], "level": key.level, "id": list(node["id"]),
                "start": key.start, "end": key.end,
                "frame_indices": list(node.get("frame_indices") or []),
                "frame_times": list(node.get("frame_times") or []),
                "image_side": node.get("image_side"),
                "caption": entry.caption, "model": model, "prompt_hash": prompt_hash,
                "frame_settings": key.frame_settings,
            }

    batch: list[dict] = []
    for node in node_records:
        if batch and node.get("video_id") != batch[-1].get("video_id"):
            yield from flush(batch)
            batch = []
        batch.append(node)
    if batch:
        yield from flush(batch)


# -- a caption folder in place of a captioner (`--captions DIR`) --------------

RELEASED_CAPTIONS_MODEL = "longvideo-r1-captions"   # the captioner's name in keys and records


def folder_digest(files: Iterable[Path]) -> str:
    """sha256 over the files' names and contents, in name order: what a run's captions were."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        h.update(path.name.encode("utf-8") + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def caption_file_names(video_name: str) -> list[str]:
    """The caption file names a video may have: `<stem>.json`, then the reference's own
    `<name up to the first dot>.json` (data/videocaption_generation.py) when that differs."""
    names = [json_name(video_name)]
    first = safe_video_name(video_name).split(".")[0]
    if first and f"{first}.json" not in names:
        names.append(f"{first}.json")
    return names


def released_frame_settings(file_name: str) -> str:
    """The frame settings part of a released caption's key: the file's text, whatever frames lvr
    would sample; named after the file, so two copies of one video keep their own files' captions."""
    return CaptionKey.settings(source="longvideo-r1", file=file_name)


def checked_caption_folder(folder: "str | os.PathLike") -> tuple[Path, str]:
    """`--captions DIR` checked: the folder and the content hash of its caption files (ValueError,
    one line naming the folder, when it is not a folder, holds no *.json or cannot be read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--captions {folder}: not a folder")
    files = list(folder.glob("*.json"))
    if not files:
        raise ValueError(f"--captions {folder}: no caption files (*.json) in it")
    try:
        return folder, folder_digest(files)
    except OSError as e:
        raise ValueError(f"--captions {folder}: cannot read {e.filename} ({e.strerror})") from None


def released_captions_record(folder: Path, digest: str) -> dict:
    """Where a run's captions came from, for its recorded settings: the folder and its content hash."""
    return {"source": "longvideo-r1", "dir": str(folder), "sha256": digest, "model": RELEASED_CAPTIONS_MODEL,
            "prompt_hash": f"imported:{digest[:16]}"}


class ReleasedCaptioner(Captioner):
    """Captions from a folder of LongVideo-R1 caption files, one `<video stem>.json` per video: no model.

    `load(nodes, video)` imports a video's file into the caption store when its tree loads
    (`import_longvideo_r1`), keyed by this folder's content hash, so a changed folder is never
    read through old entries; `get_or_make` then answers from the store, and a node the file has
    no caption for is a CaptionError naming the node and the file.
    """

    reads_files = True

    def __init__(self, folder: "str | os.PathLike", store: CaptionStore, frames: FrameStore):
        self.folder, self.digest = checked_caption_folder(folder)
        super().__init__(NoModel(RELEASED_CAPTIONS_MODEL, "captions come from files"), store, frames,
                         CaptionOptions(use_subtitles=False), system_prompt="")
        self.prompt_hash = self.record()["prompt_hash"]
        self._files: dict[str, Path] = {}   # a node record's path -> the caption file read for that video

    def record(self) -> dict:
        """Where the captions came from, for the recorded settings."""
        return released_captions_record(self.folder, self.digest)

    def key_for(self, node: dict) -> CaptionKey:
        file = self._files.get(str(node.get("path")))
        return CaptionKey(node["video_id"], node["level"], node["start"], node["end"], self.model.name,
                          self.prompt_hash, released_frame_settings(file.name if file else ""))

    def load(self, nodes: list[dict], video: "str | os.PathLike") -> None:
        """Import the video's caption file (once). ValueError naming the file expected, or what is wrong in it."""
        where = str(nodes[0].get("path"))
        if where in self._files:
            return
        candidates = [self.folder / name for name in caption_file_names(Path(video).name)]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ValueError(f"{video}: no caption file for it in --captions {self.folder} (expected {candidates[0]})")
        summary = import_longvideo_r1([path], nodes, self.store, model=self.model.name, prompt_hash=self.prompt_hash,
                                      frame_settings=lambda node: released_frame_settings(path.name))
        if summary.errors or not summary.videos_matched:
            raise ValueError("; ".join(summary.errors) or f"{path}: names no node of {video}")
        self._files[where] = path

    async def get_or_make(self, node: dict) -> CaptionResult:
        result = self.cached(node)
        if result is None:
            file = self._files.get(str(node.get("path")))
            what = f"no caption for it in {file}" if file else f"its video's caption file in {self.folder} was not read"
            raise CaptionError(f"{node_label(node, 'caption')}: {what} "
                               f"(segment_id {segment_id(node['id'], node['K'])} of the {node['level']} list)")
        return result

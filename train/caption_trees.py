"""`lvr caption` output read back as one complete caption tree per video.

`lvr questions` needs every node of a video's K / K² / K³ tree captioned; this module
turns lvr.caption/1 records into those trees, naming each bad record (``file:line``)
and each incomplete video, and names each video relative to a root for the output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

from ..infer.protocol import format_id, format_span
from ..prep.captioning import CAPTION_SCHEMA
from ..prep.jsonl import read_jsonl
from ..prep.tree import NodeId
from .question_prompts import Clip

LEVEL_DEPTH = {"high": 1, "medium": 2, "low": 3}


@dataclass
class CaptionTree:
    """One video's captions: every node of a complete K / K² / K³ tree."""

    video_id: str
    path: str | None
    k: int
    nodes: dict[NodeId, dict]                      # id -> {"start", "end", "caption"}
    captioners: list[dict] = field(default_factory=list)  # distinct {"model", "prompt_hash"}
    video: str = ""                                # the output `video` value

    @property
    def label(self) -> str:
        return self.path or self.video_id

    @property
    def leaves(self) -> list[NodeId]:
        return sorted(i for i in self.nodes if len(i) == 3)

    @property
    def duration(self) -> float:
        return max(n["end"] for n in self.nodes.values())

    def span(self, node_id: NodeId) -> tuple[float, float]:
        n = self.nodes[node_id]
        return n["start"], n["end"]

    def clip(self, node_id: NodeId) -> Clip:
        n = self.nodes[node_id]
        return node_id, n["start"], n["end"], n["caption"]

    def where(self, node_id: NodeId) -> str:
        return f"{format_id(node_id)} [{format_span(*self.span(node_id))}]"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_caption_record(rec: dict) -> tuple[str, NodeId, dict]:
    if rec.get("schema") != CAPTION_SCHEMA:
        raise ValueError(f"not an {CAPTION_SCHEMA} record (schema {rec.get('schema')!r}); "
                         f"give the output of `lvr caption`")
    vid = rec.get("video_id")
    if not isinstance(vid, str) or not vid:
        raise ValueError("missing 'video_id'")
    k = rec.get("K")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"bad 'K' {k!r}")
    node_id = rec.get("id")
    if (not isinstance(node_id, list) or not 1 <= len(node_id) <= 3
            or not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= k for i in node_id)):
        raise ValueError(f"bad node id {node_id!r} for K={k}")
    if LEVEL_DEPTH.get(rec.get("level")) != len(node_id):
        raise ValueError(f"level {rec.get('level')!r} does not match node id {node_id}")
    start, end = rec.get("start"), rec.get("end")
    if not (_number(start) and _number(end) and 0 <= start < end):
        raise ValueError(f"bad span {start!r}-{end!r}")
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("empty caption")
    return vid, tuple(node_id), {"start": float(start), "end": float(end), "caption": caption.strip(),
                                 "K": k, "path": rec.get("path"),
                                 "captioner": {"model": rec.get("model"), "prompt_hash": rec.get("prompt_hash")}}


def load_caption_trees(source: str, *, stdin: IO[str] | None = None) -> tuple[list[CaptionTree], list[str]]:
    """lvr.caption/1 records (a file or '-') -> complete trees, in first-seen order, and errors.

    A bad record is an error naming ``file:line`` and is skipped. A video whose tree
    is not complete (every high, medium and low node captioned, one K) is an error
    naming the video and is left out. When a node has several records, the last wins.
    Raises RecordError (prep/jsonl.py) when the file cannot be read at all.
    """
    errors: list[str] = []
    videos: dict[str, dict] = {}
    for lineno, rec in read_jsonl(source, stdin=stdin):
        try:
            vid, node_id, node = _check_caption_record(rec)
        except ValueError as e:
            errors.append(f"{source}:{lineno}: {e}")
            continue
        v = videos.setdefault(vid, {"nodes": {}, "ks": set(), "path": None, "captioners": []})
        v["nodes"][node_id] = node
        v["ks"].add(node["K"])
        v["path"] = v["path"] or node["path"]
        if node["captioner"] not in v["captioners"]:
            v["captioners"].append(node["captioner"])
    trees: list[CaptionTree] = []
    for vid, v in videos.items():
        label = v["path"] or vid
        if len(v["ks"]) != 1:
            errors.append(f"{label}: its caption records disagree on K ({sorted(v['ks'])})")
            continue
        (k,) = v["ks"]
        missing = []
        for level, depth in LEVEL_DEPTH.items():
            ids = _all_ids(k, depth)
            gone = [i for i in ids if i not in v["nodes"]]
            if gone:
                missing.append(f"{len(gone)} of {len(ids)} {level} captions (e.g. {format_id(gone[0])})")
        if missing:
            errors.append(f"{label}: the caption tree is incomplete: missing {', '.join(missing)}; "
                          f"caption every level with `lvr caption`")
            continue
        nodes = {i: {"start": n["start"], "end": n["end"], "caption": n["caption"]} for i, n in v["nodes"].items()}
        trees.append(CaptionTree(vid, v["path"], k, nodes, v["captioners"]))
    return trees, errors


def _all_ids(k: int, depth: int) -> list[NodeId]:
    ids: list[NodeId] = [()]
    for _ in range(depth):
        ids = [i + (j,) for i in ids for j in range(1, k + 1)]
    return ids


def assign_video_names(trees: Sequence[CaptionTree], root: "Path | None") -> tuple[Path | None, list[str]]:
    """Set each tree's `video` to its file's path relative to `root` (default: the common parent).

    Returns (root, errors); a video with no path, or outside the root, is an error.
    """
    errors = []
    paths = {t.video_id: Path(t.path).expanduser().resolve() for t in trees if t.path}
    if root is None:
        if not paths:
            return None, [f"{t.label}: its caption records carry no video path" for t in trees]
        root = Path(os.path.commonpath([str(p.parent) for p in paths.values()]))
    else:
        root = Path(root).expanduser().resolve()
    for t in trees:
        p = paths.get(t.video_id)
        if p is None:
            errors.append(f"{t.label}: its caption records carry no video path")
        elif not p.is_relative_to(root) or p == root:
            errors.append(f"{t.label}: the video is outside --video-root {root}")
        else:
            t.video = p.relative_to(root).as_posix()
    return root, errors

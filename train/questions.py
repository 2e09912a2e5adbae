"""`lvr questions` as a library: grounded multiple-choice questions from a caption tree.

After LongVPO: each question is anchored to specific leaves (low-level clips), whose
spans become its clue intervals, and filtered so that it really needs those leaves.

- **Single-segment** questions are written from one anchor leaf's caption.
- **Multi-segment** questions are written from 2-3 anchor leaves under different
  medium nodes, with the high captions and the anchors' medium captions as context.

The writer (any chat model) offers a few other leaves as sources of distractors. Our
code, not the model, puts the options in a seeded order, so answer letters are
balanced. Every candidate then goes through the filters, in this order, each recorded
with its verdict and reason (see docs/questions.md for the exact definitions):

1. ``lookalike``: no two anchors are near-duplicates, and no distractor comes from a
   near-duplicate of an anchor (TF-IDF cosine of the leaves' captions);
2. ``no_leak``: the model, given the question and options only, must not answer right;
3. ``answerable``: the model, given the anchors' captions only, must answer right;
4. ``needs_all_anchors`` (multi only): no single anchor's caption is enough;
5. ``specificity``: no non-anchor leaf's caption alone is enough, checked on the
   near-duplicates of the anchors and the top-k lexically most similar other leaves.

Questions that pass go to the output as ``lvr.qa/1`` records (what `lvr synthesize`
reads); dropped ones optionally to a rejected file. Each finished question is one
append, so a killed run loses nothing and a rerun skips questions already written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from ..infer.protocol import OPTION_LETTERS, extract_choice, format_id, format_span
from ..prep.jsonl import JsonlWriter, RecordError, read_jsonl
from ..prep.models.base import GenerationOptions, ModelError, Usage
from . import question_prompts as prompts
from .qa_items import QA_SCHEMA

CAPTION_SCHEMA = "lvr.caption/1"
SOURCE = "lvr questions"
KINDS = ("single", "multi")
FILTERS = ("lookalike", "no_leak", "answerable", "needs_all_anchors", "specificity")
N_OPTIONS = 4
LEVEL_DEPTH = {"high": 1, "medium": 2, "low": 3}

NodeId = tuple[int, ...]


class QuestionsError(Exception):
    """The run cannot start (bad input file, bad options). One line."""


@dataclass(frozen=True)
class QuestionOptions:
    per_video: int = 8              # questions to keep per video
    multi_share: float = 0.5        # of them, this share multi-segment (rounded)
    max_tries: int = 3              # candidates tried per wanted question, at most
    min_anchors: int = 2            # anchors of a multi-segment question
    max_anchors: int = 3
    distractor_leaves: int = 3      # other leaves offered to the writer as distractor sources
    specificity_k: int = 4          # top-k lexically similar non-anchor leaves checked
    lookalike_threshold: float = 0.8
    leak_tries: int = 1             # no-leak: dropped when right in every one of these blind tries
    json_retries: int = 2           # a reply that is not the JSON asked for is asked again this often
    temperature: float = 0.7        # the writer's; the filters always use 0
    max_tokens: int = 1024
    seed: int = 0
    video_root: Path | None = None  # `video` is written relative to it; default: the videos' common parent
    concurrency: int = 8            # questions in flight

    def validate(self) -> None:
        if self.per_video < 1:
            raise QuestionsError("--per-video must be at least 1")
        if not 0.0 <= self.multi_share <= 1.0:
            raise QuestionsError(f"--multi-share must be between 0 and 1, not {self.multi_share:g}")
        if not 2 <= self.min_anchors <= self.max_anchors:
            raise QuestionsError("multi-segment questions need 2 <= --min-anchors <= --max-anchors")
        if not 0.0 < self.lookalike_threshold <= 1.0:
            raise QuestionsError("--lookalike-threshold must be in (0, 1]")
        for name in ("max_tries", "leak_tries", "concurrency"):
            if getattr(self, name) < 1:
                raise QuestionsError(f"--{name.replace('_', '-')} must be at least 1")

    def wanted(self) -> dict[str, int]:
        multi = int(math.floor(self.per_video * self.multi_share + 0.5))
        return {"single": self.per_video - multi, "multi": multi}

    def to_record(self) -> dict:
        d = asdict(self)
        d["video_root"] = str(self.video_root) if self.video_root else None
        return d


# -- caption trees ------------------------------------------------------------------------

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

    def clip(self, node_id: NodeId) -> prompts.Clip:
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
    Raises QuestionsError when the file cannot be read at all.
    """
    errors: list[str] = []
    videos: dict[str, dict] = {}
    try:
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
    except RecordError as e:
        raise QuestionsError(str(e)) from None
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


# -- lexical similarity -------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W\d_]+")
# Only used to pick the words of a distractor that must be found in a leaf's caption.
STOPWORDS = frozenset("""a an the and or but of to in on at by for with from into onto over under
up down out off is are was were be been being it its this that these those there here he she they
them his her their we you i as than then so not no yes do does did has have had some any each one
while who whom which what when where how""".split())


def words(text: str) -> list[str]:
    """Lowercased runs of letters: digits, timestamps and punctuation are dropped."""
    return _WORD_RE.findall(text.lower())


def _terms(text: str) -> Counter:
    w = words(text)
    return Counter(w + [f"{a} {b}" for a, b in zip(w, w[1:])])


class Lexicon:
    """TF-IDF vectors of one video's leaf captions (word unigrams and bigrams).

    tf is sublinear (1 + ln count), idf is smoothed (ln((1 + n) / (1 + df)) + 1, n =
    leaves), each vector is L2-normalised, so dot products are cosine similarities.
    """

    def __init__(self, docs: Sequence[str]):
        import numpy as np

        counts = [_terms(d) for d in docs]
        df: Counter = Counter()
        for c in counts:
            df.update(c.keys())
        self.vocab = {t: i for i, t in enumerate(sorted(df))}
        n = len(docs)
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in sorted(df)], dtype=np.float32)
        self.matrix = np.stack([self.vector_of(c) for c in counts]) if counts else np.zeros((0, 0), np.float32)

    def vector_of(self, counts: Counter):
        import numpy as np

        v = np.zeros(len(self.vocab), dtype=np.float32)
        for t, c in counts.items():
            i = self.vocab.get(t)
            if i is not None:
                v[i] = (1.0 + math.log(c)) * self.idf[i]
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def vector(self, text: str):
        return self.vector_of(_terms(text))

    def similarities(self):
        """Leaf-by-leaf cosine matrix."""
        return self.matrix @ self.matrix.T

    def scores(self, text: str):
        """Cosine of `text` with every leaf."""
        return self.matrix @ self.vector(text)


@dataclass
class VideoIndex:
    """What the anchors and filters need about one video's leaves."""

    tree: CaptionTree
    leaves: list[NodeId]
    lexicon: Lexicon
    lookalikes: dict[NodeId, dict[NodeId, float]]   # leaf -> {near-duplicate leaf: cosine}

    @classmethod
    def build(cls, tree: CaptionTree, threshold: float) -> "VideoIndex":
        leaves = tree.leaves
        lex = Lexicon([tree.nodes[i]["caption"] for i in leaves])
        sims = lex.similarities()
        look: dict[NodeId, dict[NodeId, float]] = {i: {} for i in leaves}
        for a in range(len(leaves)):
            for b in range(len(leaves)):
                if a != b and sims[a, b] >= threshold - 1e-6:
                    look[leaves[a]][leaves[b]] = round(float(sims[a, b]), 4)
        return cls(tree, leaves, lex, look)

    def lookalike(self, a: NodeId, b: NodeId) -> float | None:
        return self.lookalikes.get(a, {}).get(b)


def lookalike_pairs(index: VideoIndex) -> list[tuple[NodeId, NodeId, float]]:
    return sorted({(min(a, b), max(a, b), s) for a, near in index.lookalikes.items() for b, s in near.items()})


# -- anchors --------------------------------------------------------------------------------

def _rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def single_anchor_slots(index: VideoIndex, seed: int) -> list[tuple[NodeId, ...]]:
    """Every leaf once, in a seeded order: slot n is the n-th (one anchor each)."""
    leaves = list(index.leaves)
    _rng(seed, index.tree.video_id, "single").shuffle(leaves)
    return [(leaf,) for leaf in leaves]


def multi_anchor_slots(index: VideoIndex, seed: int, count: int, min_anchors: int = 2,
                       max_anchors: int = 3) -> list[tuple[NodeId, ...]]:
    """Up to `count` seeded anchor sets of 2-3 leaves under different medium nodes.

    Slot n does not depend on `count` (the draws come from one seeded stream), no
    two anchors of a set are look-alikes, and no set repeats. Anchors are in time order.
    """
    rng = _rng(seed, index.tree.video_id, "multi")
    by_medium: dict[NodeId, list[NodeId]] = {}
    for leaf in index.leaves:
        by_medium.setdefault(leaf[:2], []).append(leaf)
    mediums = sorted(by_medium)
    top = min(max_anchors, len(mediums))
    if top < min_anchors:
        return []
    slots: list[tuple[NodeId, ...]] = []
    seen: set[tuple[NodeId, ...]] = set()
    for _ in range(count * 50):
        if len(slots) >= count:
            break
        n = rng.randint(min_anchors, top)
        chosen = sorted(rng.choice(by_medium[m]) for m in rng.sample(mediums, n))
        if any(index.lookalike(a, b) is not None for a in chosen for b in chosen if a < b):
            continue
        key = tuple(chosen)
        if key not in seen:
            seen.add(key)
            slots.append(key)
    return slots


# -- replies ----------------------------------------------------------------------------------

class ReplyError(ValueError):
    """A model reply is not the JSON object asked for; the text says why (shown to the model)."""


_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.S)


def parse_json_reply(text: str) -> dict:
    """The JSON object in a model reply, read with json.loads only (never evaluated).

    Tolerates <think> blocks, code fences and prose around one object. Raises
    ReplyError otherwise.
    """
    body = _THINK_RE.sub("", text or "").strip()
    if not body:
        raise ReplyError("the reply is empty")
    candidates = [body]
    candidates += [m.group(1).strip() for m in _FENCE_RE.finditer(body)]
    i, j = body.find("{"), body.rfind("}")
    if 0 <= i < j:
        candidates.append(body[i:j + 1])
    for cand in candidates:
        try:
            value = json.loads(cand)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
        raise ReplyError(f"the reply is JSON but not an object (a {type(value).__name__})")
    raise ReplyError("the reply is not a JSON object")


def parse_clip_id(value: Any, k: int) -> NodeId | None:
    """[1, 2, 3], "(1, 2, 3)", "clip (1,2,3)" -> (1, 2, 3); None for null or anything else."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        nums = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        if len(nums) != len(value):
            return None
    elif isinstance(value, str):
        nums = [int(x) for x in re.findall(r"\d{1,4}", value)]
    else:
        return None
    if len(nums) == 3 and all(1 <= n <= k for n in nums):
        return tuple(nums)
    return None


_LETTER_PREFIX_RE = re.compile(r"^\s*\(?[A-Da-d]\)?[.):]\s+")


def _option_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReplyError(f"{what} must be a non-empty string")
    text = _LETTER_PREFIX_RE.sub("", " ".join(value.split()))
    if not text:
        raise ReplyError(f"{what} is empty")
    return text


@dataclass
class Draft:
    question: str
    answer: str
    distractors: list[tuple[str, NodeId | None]]


def check_draft(obj: dict, k: int) -> Draft:
    """The writer's JSON -> Draft, or ReplyError saying what is wrong."""
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ReplyError("'question' must be a non-empty string")
    answer = _option_text(obj.get("answer"), "'answer'")
    raw = obj.get("distractors")
    if not isinstance(raw, list) or len(raw) < N_OPTIONS - 1:
        raise ReplyError(f"'distractors' must be a list of {N_OPTIONS - 1} objects")
    distractors = []
    for n, d in enumerate(raw[:N_OPTIONS - 1], 1):
        if isinstance(d, str):
            distractors.append((_option_text(d, f"distractor {n}"), None))
        elif isinstance(d, dict):
            distractors.append((_option_text(d.get("text"), f"distractor {n} 'text'"),
                                parse_clip_id(d.get("from_clip"), k)))
        else:
            raise ReplyError(f"distractor {n} must be an object with 'text' and 'from_clip'")
    texts = [answer.casefold()] + [t.casefold() for t, _ in distractors]
    if len(set(texts)) != len(texts):
        raise ReplyError("the answer and the three distractors must all differ")
    return Draft(" ".join(question.split()), answer, distractors)


# -- one question ---------------------------------------------------------------------------------

@dataclass
class Slot:
    index: VideoIndex
    kind: str
    n: int
    anchors: tuple[NodeId, ...]

    @property
    def qid(self) -> str:
        return f"{self.index.tree.video_id}-{self.kind[0]}{self.n}"


@dataclass
class Verdict:
    name: str
    verdict: str          # pass, fail or skipped
    reason: str
    details: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        rec = {"name": self.name, "verdict": self.verdict, "reason": self.reason}
        if self.details:
            rec["details"] = self.details
        return rec


class QuestionFailed(Exception):
    """A question could not be made (the model failed or kept replying unusably)."""


@dataclass
class Candidate:
    slot: Slot
    draft: Draft
    options: tuple[str, ...]       # "A. text", ...
    answer: str                    # the letter
    sources: dict[str, NodeId | None]   # distractor letter -> the leaf it was declared from

    @property
    def texts(self) -> list[str]:
        return [o.split(". ", 1)[1] for o in self.options]


def _letters(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{OPTION_LETTERS[i]}. {t}" for i, t in enumerate(texts))


def _seed_int(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


class Worker:
    """Writes and filters questions through one chat model."""

    def __init__(self, chat, options: QuestionOptions):
        self.chat = chat
        self.o = options

    async def ask_json(self, messages: list[dict], check: Callable[[dict], Any], usage: Usage, *,
                       temperature: float = 0.0, seed: int | None = None, what: str = "reply") -> Any:
        """Ask until `check(parse_json_reply(reply))` passes; retried with a correction message."""
        messages = list(messages)
        reason = ""
        for attempt in range(self.o.json_retries + 1):
            gen = GenerationOptions(max_tokens=self.o.max_tokens, temperature=temperature,
                                    seed=None if seed is None else seed + attempt)
            try:
                reply = await self.chat.complete(messages, gen)
            except ModelError as e:
                raise QuestionFailed(f"{what}: {e}") from None
            usage.add(reply.usage)
            try:
                return check(parse_json_reply(reply.text))
            except ReplyError as e:
                reason = str(e)
                messages += [{"role": "assistant", "content": reply.text or ""},
                             prompts.correction_message(reason)]
        raise QuestionFailed(f"{what}: no usable JSON after {self.o.json_retries + 1} tries ({reason})")

    async def choose(self, messages: list[dict], options: Sequence[str], usage: Usage, what: str) -> str | None:
        """The option letter the model picks, or None for "none"."""

        def check(obj: dict) -> str | None:
            value = obj.get("answer")
            if value is None or (isinstance(value, str) and (
                    value.strip().lower().strip(".") in ("", "n/a", "unknown", "cannot tell")
                    or value.strip().lower().startswith("none"))):
                return None
            if not isinstance(value, str):
                raise ReplyError("'answer' must be an option letter or \"none\"")
            letter = extract_choice(value, list(options))
            if letter is None:
                raise ReplyError(f"'answer' {value!r} names no single option; give a letter or \"none\"")
            return letter

        return await self.ask_json(messages, check, usage, what=what)

    # -- writing --------------------------------------------------------------

    def distractor_pool(self, slot: Slot) -> list[NodeId]:
        idx = slot.index
        pool = [leaf for leaf in idx.leaves if leaf not in slot.anchors
                and all(idx.lookalike(a, leaf) is None for a in slot.anchors)]
        rng = _rng(self.o.seed, slot.qid, "distractors")
        return sorted(rng.sample(pool, min(self.o.distractor_leaves, len(pool))))

    async def write(self, slot: Slot, usage: Usage) -> Candidate:
        tree = slot.index.tree
        others = [tree.clip(i) for i in self.distractor_pool(slot)]
        if slot.kind == "single":
            messages = prompts.single_writer_messages(tree.duration, tree.clip(slot.anchors[0]), others)
        else:
            mediums = sorted({a[:2] for a in slot.anchors})
            highs = [(h,) for h in range(1, tree.k + 1)]
            messages = prompts.multi_writer_messages(tree.duration, [tree.clip(h) for h in highs],
                                                     [tree.clip(m) for m in mediums],
                                                     [tree.clip(a) for a in slot.anchors], others)
        draft = await self.ask_json(messages, lambda obj: check_draft(obj, tree.k), usage,
                                    temperature=self.o.temperature, seed=_seed_int(self.o.seed, slot.qid),
                                    what="writing")
        # Our seeded order, not the writer's: answer letters come out balanced.
        pos = _rng(self.o.seed, slot.qid, "letters").randrange(N_OPTIONS)
        texts = [t for t, _ in draft.distractors]
        texts.insert(pos, draft.answer)
        options = _letters(texts)
        sources: dict[str, NodeId | None] = {}
        j = 0
        for i in range(N_OPTIONS):
            if i != pos:
                sources[OPTION_LETTERS[i]] = draft.distractors[j][1]
                j += 1
        return Candidate(slot, draft, options, OPTION_LETTERS[pos], sources)

    # -- filters --------------------------------------------------------------

    def f_lookalike(self, c: Candidate) -> Verdict:
        idx, anchors = c.slot.index, c.slot.anchors
        tree = idx.tree
        for a in anchors:
            for b in anchors:
                s = idx.lookalike(a, b) if a < b else None
                if s is not None:
                    return Verdict("lookalike", "fail", f"look-alike: anchors {format_id(a)} and {format_id(b)} "
                                   f"are near-duplicates (cosine {s:.2f})", {"pair": [list(a), list(b)]})
        near = {b: (a, s) for a in anchors for b, s in idx.lookalikes.get(a, {}).items() if b not in anchors}
        for letter, leaf in c.sources.items():
            if leaf is not None and leaf in near:
                a, s = near[leaf]
                return Verdict("lookalike", "fail",
                               f"look-alike: distractor {letter} is drawn from leaf {tree.where(leaf)}, a "
                               f"near-duplicate of anchor {format_id(a)} (cosine {s:.2f})",
                               {"pair": [list(a), list(leaf)], "distractor": letter, "declared": True})
        texts = dict(zip(OPTION_LETTERS, c.texts))
        for letter in c.sources:
            content = set(words(texts[letter])) - STOPWORDS
            if not content:
                continue
            for leaf, (a, s) in sorted(near.items()):
                if content <= set(words(tree.nodes[leaf]["caption"])):
                    return Verdict("lookalike", "fail",
                                   f"look-alike: distractor {letter} ({texts[letter]!r}) matches leaf "
                                   f"{tree.where(leaf)}, a near-duplicate of anchor {format_id(a)} "
                                   f"(cosine {s:.2f})",
                                   {"pair": [list(a), list(leaf)], "distractor": letter, "declared": False})
        if not near:
            return Verdict("lookalike", "pass", "the anchors have no near-duplicate leaves")
        return Verdict("lookalike", "pass", f"no distractor comes from the anchors' {len(near)} near-duplicate "
                       f"leaves ({', '.join(format_id(b) for b in sorted(near))})")

    async def f_no_leak(self, c: Candidate, usage: Usage) -> Verdict:
        texts = c.texts
        right = OPTION_LETTERS.index(c.answer)
        picks = []
        for t in range(self.o.leak_tries):
            shift = t % N_OPTIONS
            rotated = texts[shift:] + texts[:shift]
            options = _letters(rotated)
            key = OPTION_LETTERS[(right - shift) % N_OPTIONS]
            choice = await self.choose(prompts.blind_messages(c.draft.question, options), options, usage,
                                       "no-leak check")
            picks.append(choice == key)
            if choice != key:
                break
        if all(picks) and len(picks) == self.o.leak_tries:
            return Verdict("no_leak", "fail", f"answerable without the video: the model chose the right answer "
                           f"with no captions ({len(picks)} of {self.o.leak_tries} tries)")
        return Verdict("no_leak", "pass", "the model did not find the answer without captions")

    async def f_answerable(self, c: Candidate, usage: Usage) -> Verdict:
        tree = c.slot.index.tree
        choice = await self.choose(prompts.answer_messages(c.draft.question, c.options,
                                                           [tree.clip(a) for a in c.slot.anchors]),
                                   c.options, usage, "answerable check")
        if choice == c.answer:
            return Verdict("answerable", "pass", "answered right from its anchors' captions")
        said = choice or "none"
        return Verdict("answerable", "fail", f"not answerable from its anchors' captions (the model answered "
                       f"{said}, the key is {c.answer})")

    async def f_needs_all(self, c: Candidate, usage: Usage) -> Verdict:
        tree = c.slot.index.tree
        for a in c.slot.anchors:
            choice = await self.choose(prompts.answer_messages(c.draft.question, c.options, [tree.clip(a)]),
                                       c.options, usage, "needs-all-anchors check")
            if choice == c.answer:
                return Verdict("needs_all_anchors", "fail", f"answerable from anchor {tree.where(a)} alone; "
                               f"a multi-segment question must need all its anchors", {"leaf": list(a)})
        return Verdict("needs_all_anchors", "pass", "no single anchor is enough")

    def specificity_candidates(self, c: Candidate) -> list[tuple[NodeId, float, bool]]:
        """(leaf, lexical score, is a look-alike of an anchor): look-alikes first, then top-k."""
        idx, anchors = c.slot.index, c.slot.anchors
        k = self.o.specificity_k
        near: dict[NodeId, float] = {}
        for a in anchors:
            for b, s in idx.lookalikes.get(a, {}).items():
                if b not in anchors:
                    near[b] = max(s, near.get(b, 0.0))
        scores = idx.lexicon.scores(f"{c.draft.question} {c.draft.answer}")
        by_leaf = {leaf: float(scores[i]) for i, leaf in enumerate(idx.leaves)}
        out = [(b, round(by_leaf[b], 4), True) for b in sorted(near, key=lambda b: (-near[b], b))[:k]]
        ranked = sorted((leaf for leaf in idx.leaves if leaf not in anchors and leaf not in near
                         and by_leaf[leaf] > 0), key=lambda leaf: (-by_leaf[leaf], leaf))
        out += [(leaf, round(by_leaf[leaf], 4), False) for leaf in ranked[:k]]
        return out

    async def f_specificity(self, c: Candidate, usage: Usage) -> Verdict:
        idx = c.slot.index
        tree = idx.tree
        checked = self.specificity_candidates(c)
        details = {"checked": [{"leaf": list(leaf), "score": s, "lookalike": look} for leaf, s, look in checked]}
        for leaf, _, look in checked:
            choice = await self.choose(prompts.answer_messages(c.draft.question, c.options, [tree.clip(leaf)]),
                                       c.options, usage, "specificity check")
            if choice != c.answer:
                continue
            details["leaf"] = list(leaf)
            if look:
                a, s = max(((a, idx.lookalike(a, leaf)) for a in c.slot.anchors
                            if idx.lookalike(a, leaf) is not None), key=lambda x: x[1])
                details["pair"] = [list(a), list(leaf)]
                return Verdict("specificity", "fail", f"look-alike: answerable from leaf {tree.where(leaf)} alone, "
                               f"a near-duplicate of anchor {format_id(a)} (cosine {s:.2f})", details)
            return Verdict("specificity", "fail", f"answerable from non-anchor leaf {tree.where(leaf)} alone",
                           details)
        if not checked:
            return Verdict("specificity", "pass", "no other leaf shares a word with the question and its answer",
                           details)
        return Verdict("specificity", "pass", f"not answerable from any of the {len(checked)} most similar other "
                       f"leaves alone ({', '.join(format_id(leaf) for leaf, _, _ in checked)})", details)

    async def run_filters(self, c: Candidate, usage: Usage) -> list[Verdict]:
        steps: list[tuple[str, Callable]] = [
            ("lookalike", None), ("no_leak", self.f_no_leak), ("answerable", self.f_answerable),
            ("needs_all_anchors", self.f_needs_all), ("specificity", self.f_specificity)]
        verdicts: list[Verdict] = []
        failed = None
        for name, fn in steps:
            if name == "needs_all_anchors" and c.slot.kind != "multi":
                continue
            if failed is not None:
                verdicts.append(Verdict(name, "skipped", f"not checked: the {failed} filter failed"))
                continue
            v = self.f_lookalike(c) if fn is None else await fn(c, usage)
            verdicts.append(v)
            if v.verdict == "fail":
                failed = name
        return verdicts

    async def make(self, slot: Slot, producer: dict, usage: Usage) -> tuple[dict, bool]:
        """One question: write it, filter it; its requests are added to `usage`. Returns (record, kept)."""
        cand = await self.write(slot, usage)
        verdicts = await self.run_filters(cand, usage)
        tree = slot.index.tree
        record = {
            "schema": QA_SCHEMA, "id": slot.qid, "video": tree.video, "video_id": tree.video_id,
            "question": cand.draft.question, "options": list(cand.options), "answer": cand.answer,
            "clues": [list(tree.span(a)) for a in slot.anchors], "category": slot.kind, "source": SOURCE,
            "anchors": [list(a) for a in slot.anchors],
            "distractor_leaves": {k: (list(v) if v else None) for k, v in cand.sources.items()},
            "filters": [v.to_record() for v in verdicts],
            "producer": {**producer, "captioners": tree.captioners},
            "tokens": usage.to_record(),
        }
        fail = next((v for v in verdicts if v.verdict == "fail"), None)
        if fail is not None:
            record["rejected_by"] = fail.name
            record["reason"] = fail.reason
        return record, fail is None


# -- the batch ------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^(?P<vid>.+)-(?P<kind>[sm])(?P<n>\d+)$")


@dataclass
class QuestionsSummary:
    videos: int = 0
    written: Counter = field(default_factory=Counter)       # kind -> kept this run
    dropped: Counter = field(default_factory=Counter)       # filter -> dropped this run
    skipped: int = 0                                        # kept in an earlier run
    failed: list[str] = field(default_factory=list)         # items and videos, each one line
    short: list[str] = field(default_factory=list)          # videos that ran out of candidates
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


class _Plan:
    """One video's progress: which slots were tried, how many were kept, what is in flight."""

    def __init__(self, tree: CaptionTree, options: QuestionOptions, kept: dict[str, int],
                 tried: dict[str, set[int]]):
        self.tree = tree
        self.o = options
        self.wanted = options.wanted()
        self.kept = kept
        self.tried = tried
        self.in_flight = {k: 0 for k in KINDS}
        self.index: VideoIndex | None = None
        self.slots: dict[str, list[tuple[NodeId, ...]]] = {}
        self.finished = False

    def remaining(self) -> int:
        return sum(max(0, self.wanted[k] - self.kept[k]) for k in KINDS)

    def _ensure(self) -> None:
        if self.index is None:
            self.index = VideoIndex.build(self.tree, self.o.lookalike_threshold)
            limit = {k: self.o.max_tries * self.wanted[k] for k in KINDS}
            self.slots = {"single": single_anchor_slots(self.index, self.o.seed)[:limit["single"]],
                          "multi": multi_anchor_slots(self.index, self.o.seed, limit["multi"],
                                                      self.o.min_anchors, self.o.max_anchors)}

    def next_slot(self) -> Slot | None:
        if self.finished or self.remaining() == 0:
            return None
        self._ensure()
        for kind in KINDS:
            if self.kept[kind] + self.in_flight[kind] >= self.wanted[kind]:
                continue
            for n, anchors in enumerate(self.slots[kind], 1):
                if n not in self.tried[kind]:
                    self.tried[kind].add(n)
                    self.in_flight[kind] += 1
                    return Slot(self.index, kind, n, anchors)
        return None

    def next_slot_possible(self) -> bool:
        if self.remaining() == 0:
            return False
        self._ensure()
        return any(self.kept[k] + self.in_flight[k] < self.wanted[k]
                   and any(n not in self.tried[k] for n in range(1, len(self.slots[k]) + 1)) for k in KINDS)


def _existing(records: list[dict]) -> dict[str, dict[str, set[int]]]:
    """video_id -> kind -> slot numbers, from our own earlier records."""
    out: dict[str, dict[str, set[int]]] = {}
    for r in records:
        m = _ID_RE.match(str(r.get("id", ""))) if r.get("source") == SOURCE else None
        if m and r.get("video_id") == m.group("vid"):
            kind = "single" if m.group("kind") == "s" else "multi"
            out.setdefault(m.group("vid"), {k: set() for k in KINDS})[kind].add(int(m.group("n")))
    return out


def run_questions(source: str, output: "str | os.PathLike | None", model, options: QuestionOptions, *,
                  rejected: "str | os.PathLike | None" = None, log=lambda msg: None, progress: bool = True,
                  stdin: IO[str] | None = None) -> QuestionsSummary:
    """Everything `lvr questions` does.

    `model` is a ModelSpec (or anything with .build() returning a ChatModel). Per-video and
    per-question failures are in the summary; QuestionsError (bad input or options) and
    ModelError (no endpoint reachable) are raised.
    """
    from .. import __version__

    options.validate()
    if output not in (None, "-") and rejected is not None and \
            Path(output).resolve() == Path(rejected).resolve():
        raise QuestionsError("--rejected must be another file than -o")
    summary = QuestionsSummary()
    t0 = time.perf_counter()
    trees, errors = load_caption_trees(source, stdin=stdin)
    root, name_errors = assign_video_names(trees, options.video_root)
    trees = [t for t in trees if t.video]
    errors += name_errors
    for e in errors:
        log(f"error: {e}")
    summary.failed += errors
    summary.videos = len(trees)
    if root is not None:
        log(f"videos are named relative to {root}")
    producer = {"tool": SOURCE, "version": __version__, "prompt_hash": prompts.prompt_hash(),
                "seed": options.seed, "options": options.to_record()}
    with JsonlWriter(output) as out, (JsonlWriter(rejected) if rejected is not None else _NoWriter()) as rej:
        kept = _existing(out.existing)
        tried = _existing(out.existing + rej.existing)
        plans = []
        for t in trees:
            k_kept = {k: len(kept.get(t.video_id, {}).get(k, ())) for k in KINDS}
            summary.skipped += sum(k_kept.values())
            k_tried = {k: set(tried.get(t.video_id, {}).get(k, ())) for k in KINDS}
            plans.append(_Plan(t, options, k_kept, k_tried))
        asyncio.run(_run_all(plans, out, rej, model, options, producer, summary, log, progress))
    summary.seconds = time.perf_counter() - t0
    return summary


class _NoWriter:
    existing: list[dict] = []

    def write_unit(self, records) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


async def _run_all(plans: list[_Plan], out, rej, model, options: QuestionOptions, producer: dict,
                   summary: QuestionsSummary, log, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(p.remaining() for p in plans)
    if total == 0:
        if plans:
            log("nothing to do: every video has its questions already")
        return
    chat = model.build()
    producer = {**producer, "model": chat.name}
    worker = Worker(chat, options)
    bar = tqdm(total=total, unit="question", desc="questions", disable=None if progress else True,
               dynamic_ncols=True)
    changed = asyncio.Condition()
    cursor = 0

    def next_job() -> tuple[_Plan, Slot] | None:
        nonlocal cursor
        while cursor < len(plans) and plans[cursor].finished:
            cursor += 1
        for plan in plans[cursor:]:
            if plan.finished:
                continue
            slot = plan.next_slot()
            if slot is not None:
                return plan, slot
            close(plan)
        return None

    def close(plan: _Plan) -> None:
        """Mark a plan finished once nothing is in flight and nothing more can be tried."""
        if plan.finished or sum(plan.in_flight.values()) or plan.next_slot_possible():
            return
        plan.finished = True
        short = plan.remaining()
        if short:
            bar.update(short)
            got = {k: plan.kept[k] for k in KINDS}
            msg = (f"{plan.tree.label}: kept {got['single']} single and {got['multi']} multi-segment "
                   f"questions of {plan.wanted['single']} and {plan.wanted['multi']} wanted "
                   f"(candidates used up; raise --max-tries or lower --per-video)")
            summary.short.append(msg)
            log(f"note: {msg}")
        plan.index = None  # free the lexicon

    def in_flight() -> int:
        return sum(sum(p.in_flight.values()) for p in plans)

    async def one(plan: _Plan, slot: Slot) -> None:
        usage = Usage()
        try:
            record, ok = await worker.make(slot, producer, usage)
        except QuestionFailed as e:
            msg = f"{slot.qid} ({plan.tree.label}): {e}"
            summary.failed.append(msg)
            log(f"error: {msg}")
            return
        finally:
            summary.usage.add(usage)
        if ok:
            out.write_unit([record])
            plan.kept[slot.kind] += 1
            summary.written[slot.kind] += 1
            bar.update(1)
        else:
            rej.write_unit([record])
            summary.dropped[record["rejected_by"]] += 1
        bar.set_postfix(kept=sum(summary.written.values()), dropped=sum(summary.dropped.values()),
                        failed=len(summary.failed), refresh=False)

    async def run_worker() -> None:
        while True:
            job = next_job()
            if job is None:
                if in_flight() == 0:
                    return
                async with changed:
                    await changed.wait()
                continue
            plan, slot = job
            try:
                await one(plan, slot)
            finally:
                plan.in_flight[slot.kind] -= 1
                close(plan)
                async with changed:
                    changed.notify_all()

    try:
        check = getattr(chat, "check_reachable", None)
        if check is not None:
            await check()
        await asyncio.gather(*(run_worker() for _ in range(options.concurrency)))
    finally:
        bar.close()
        await chat.aclose()

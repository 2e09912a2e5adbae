"""LongVPO preference triples for a vision-language model (`lvr vpo`), and how they are shown to it.

LongVPO teaches a short-context vision-language model long videos with synthetic
preference data and no human labels. `lvr vpo` writes that data from the questions
`lvr questions` anchored to leaves, and the leaves' video_qa frames `lvr segment
--qa-frames` stored:

- **Stage 1** takes a single-segment question anchored to leaf *a* and builds a long
  input: *a* at a seeded random position among N distractor clips, drawn from far parts
  of the same video (under another high node) and from other videos. Each clip shows its
  video_qa frames with its own time labels (seconds from the clip's start). Chosen is the
  right option; rejected is the option a distractor clip supports (the leaf the question
  writer drew it from, when that leaf is far and becomes one of the clips), else a wrong
  option the writer wrote.
- **Stage 2** takes a multi-segment question over 2-3 anchors: the anchors keep their
  time order at seeded random positions among the distractors, and an LLM writes, from
  the clips' captions, a chosen answer that reasons from the anchors and a dispreferred
  one that is plausible but rests on a wrong clip (checked: the right and a wrong option,
  the clips named).
- **Visual filter** (`visual_similarity`): a candidate distractor whose frames look too
  much like an anchor's is left out; every clip's similarity, the threshold and the
  clips left out are recorded. The questions' own filters (look-alike, no leak,
  answerable, specificity) must all have passed.

One ``lvr.vpo/1`` record per triple, with frame keys rather than pixels, one append each,
so a killed run loses nothing and a rerun skips triples already written. The anchors'
positions over the whole output are checked for uniformity (chi-square) at the end.

`triple_messages` is the one layout of a triple for the model: the full interleaved input
for the policy, or the anchor clip(s) alone for the anchor-only reference of `lvr dpo --vlm`.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, Callable, Iterable

from ..infer.profiles import DEFAULT_QA_SYSTEM_PROMPT, LVR_PROFILE
from ..prep.jsonl import JsonlWriter, RecordError, read_jsonl
from ..prep.lettering import LETTERS, chosen_letter
from ..prep.models.base import Usage
from ..prep.options import check_options, option
from ..prep.tree import NodeId
from .anchors import seeded_rng
from .question_replies import JsonAsker, QuestionFailed, ReplyError
from .visual_similarity import DEFAULT_MAX_SIMILARITY, MEASURES, ClipLooks, make_measure

SCHEMA = "lvr.vpo/1"
TOOL = "lvr vpo"
VPO_PANEL = "Triples"
STAGE_KIND = {1: "single", 2: "multi"}
SOURCE_CLIP, SOURCE_OPTION, SOURCE_LLM = "distractor_clip", "written_option", "llm"
UNIFORM_ALPHA = 0.01     # anchor positions are called not uniform below this p-value


class VpoError(Exception):
    """The run cannot start (bad input files, bad options). One line."""


@dataclass(frozen=True, kw_only=True)
class VpoOptions:
    """What `lvr vpo` can be told besides its input, output and the stage-2 writer model."""

    stage: int = option(1, "--stage", min=1, max=2, panel=VPO_PANEL,
                        help="1: single-segment questions, one anchor among distractor clips, rejected = the "
                             "option a distractor supports. 2: multi-segment questions, 2-3 anchors, rejected "
                             "written by --model from the captions.")
    nodes: str = option(MISSING, "--nodes", metavar="FILE", panel=VPO_PANEL,
                        help="lvr.node/1 records of every video, from `lvr segment --qa-frames` (the clips' "
                             "video_qa frames and where they are).")
    caption_records: str | None = option(None, "--caption-records", metavar="FILE", panel=VPO_PANEL,
                                         help="lvr.caption/1 records of every video, from `lvr caption` (stage 2: "
                                              "what the writer reads about each clip).")
    distractors: int = option(3, "--distractors", min=1, panel=VPO_PANEL,
                              help="Distractor clips interleaved with the anchor(s) in each triple.")
    same_video_share: float = option(0.5, "--same-video-share", min=0.0, max=1.0, panel=VPO_PANEL,
                                     help="Share of the distractors taken from far parts of the anchor's own "
                                          "video (under another high node); the rest come from other videos.")
    similarity: str = option("pixel", "--similarity", choices=MEASURES, panel=VPO_PANEL,
                             help="How alike a distractor's frames and the anchor's are: pixel (grayscale "
                                  "thumbnails, CPU) or vision (mean-pooled vision-tower features of "
                                  "--similarity-model).")
    max_similarity: float | None = option(None, "--max-similarity", min=0.0, max=1.0, panel=VPO_PANEL,
                                          help="Leave out distractors at least this similar to an anchor "
                                               "(default: 0.92 for pixel, 0.95 for vision).")
    similarity_model: str | None = option(None, "--similarity-model", metavar="MODEL", panel=VPO_PANEL,
                                          help="The vision-language model whose vision tower --similarity "
                                               "vision uses (a folder or hub name; in process).")
    seed: int = 0                     # --seed comes from SamplingOptions
    temperature: float = 0.7          # the stage-2 writer's (--temperature)
    max_tokens: int = 1024            # the stage-2 writer's (--max-tokens)
    concurrency: int = 8              # stage-2 questions in flight (--concurrency)
    device: str = "auto"              # where --similarity vision runs (--device)

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def threshold(self) -> float:
        return self.max_similarity if self.max_similarity is not None else DEFAULT_MAX_SIMILARITY[self.similarity]

    def to_record(self) -> dict:
        return {**asdict(self), "threshold": self.threshold}


# -- inputs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    qid: str
    video_id: str
    category: str
    question: str
    options: tuple[str, ...]
    answer: str                                   # the key's letter
    anchors: tuple[NodeId, ...]
    sources: dict                                 # letter -> the leaf its distractor was drawn from


def _leaf_id(value: Any) -> NodeId | None:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in value):
        return tuple(value)
    return None


def read_question(rec: dict) -> Question:
    """An lvr.qa/1 record of `lvr questions` -> Question; ValueError says why it cannot be used."""
    if rec.get("schema") != "lvr.qa/1":
        raise ValueError(f"not an lvr.qa/1 record (schema {rec.get('schema')!r}); give the output of "
                         "`lvr questions`")
    failed = rec.get("rejected_by") or next((f.get("name") for f in rec.get("filters") or []
                                             if isinstance(f, dict) and f.get("verdict") == "fail"), None)
    if failed:
        raise ValueError(f"did not pass the question filters (rejected by {failed})")
    anchors = [_leaf_id(a) for a in rec.get("anchors") or []]
    if not anchors or None in anchors:
        raise ValueError("no anchor leaves (only questions from `lvr questions` carry them)")
    options = rec.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise ValueError("'options' must be a list of option texts")
    answer = str(rec.get("answer", "")).strip().upper()
    if answer not in LETTERS[:len(options)]:
        raise ValueError(f"answer {rec.get('answer')!r} is not one of the option letters")
    for key in ("id", "video_id", "question"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            raise ValueError(f"missing {key!r}")
    sources = {str(k): _leaf_id(v) for k, v in (rec.get("distractor_leaves") or {}).items()}
    return Question(rec["id"], rec["video_id"], str(rec.get("category", "")), rec["question"], tuple(options),
                    answer, tuple(anchors), {k: v for k, v in sources.items() if v is not None})


def load_leaves(path: str) -> tuple[dict[str, dict[NodeId, dict]], list[str]]:
    """video_id -> leaf id -> lvr.node/1 leaf record, for videos whose leaves carry video_qa frames; and errors."""
    leaves: dict[str, dict[NodeId, dict]] = {}
    without: dict[str, str] = {}
    errors = []
    try:
        for lineno, rec in read_jsonl(path):
            if rec.get("schema") != "lvr.node/1":
                errors.append(f"{path}:{lineno}: not an lvr.node/1 record; give the output of `lvr segment`")
                continue
            leaf = _leaf_id(rec.get("id"))
            if rec.get("level") != "low" or leaf is None:
                continue
            if not rec.get("qa_frame_keys"):
                without.setdefault(str(rec.get("video_id")), str(rec.get("path") or rec.get("video_id")))
                continue
            leaves.setdefault(str(rec.get("video_id")), {})[leaf] = rec
    except RecordError as e:
        raise VpoError(str(e)) from None
    for vid, label in without.items():
        leaves.pop(vid, None)
        errors.append(f"{label}: its leaves have no video_qa frames; segment it with `lvr segment --qa-frames`")
    return leaves, errors


# -- one triple's clips ------------------------------------------------------------------------------

class Skip(Exception):
    """This question gives no triple; the text says why (one line)."""


def clip_entry(node: dict, role: str, similarity: float | None) -> dict:
    return {"video_id": node["video_id"], "video": node.get("path"), "id": list(node["id"]),
            "start": node["start"], "end": node["end"], "frame_keys": list(node["qa_frame_keys"]),
            "frame_times": list(node.get("qa_frame_times") or []), "role": role,
            "similarity": None if similarity is None else round(similarity, 4)}


@dataclass
class Clips:
    """The interleaved clips of one triple and what the visual filter did."""

    sequence: list[dict]               # clip entries in the order shown
    anchor_clips: list[int]            # 1-based clip numbers of the anchors
    excluded: list[dict]               # distractors left out: video_id, id, similarity
    source_clip: tuple[int, str] | None = None   # (clip number, option letter) of a distractor a wrong option came from


class ClipPicker:
    """Draws distractor clips for a question's anchors, through the visual filter, and places the anchors."""

    def __init__(self, leaves: dict[str, dict[NodeId, dict]], looks: ClipLooks, options: VpoOptions):
        self.leaves = leaves
        self.looks = looks
        self.o = options

    def _anchor_nodes(self, q: Question) -> list[dict]:
        video = self.leaves.get(q.video_id)
        if video is None:
            raise Skip(f"video {q.video_id} is not in --nodes (or has no video_qa frames)")
        missing = [a for a in q.anchors if a not in video]
        if missing:
            raise Skip(f"anchor leaf {list(missing[0])} of video {q.video_id} is not in --nodes")
        return [video[a] for a in q.anchors]

    def _pools(self, q: Question) -> tuple[list[tuple[str, NodeId]], list[tuple[str, NodeId]]]:
        """(far leaves of the same video, leaves of other videos), each in a seeded order."""
        highs = {a[0] for a in q.anchors}
        same = [(q.video_id, leaf) for leaf in sorted(self.leaves[q.video_id]) if leaf[0] not in highs]
        other = [(vid, leaf) for vid in sorted(self.leaves) if vid != q.video_id for leaf in sorted(self.leaves[vid])]
        rng = seeded_rng(self.o.seed, q.qid, "distractors")
        rng.shuffle(same)
        rng.shuffle(other)
        return same, other

    def pick(self, q: Question, *, prefer: Iterable[tuple[str, NodeId]] = ()) -> Clips:
        """The clips of q's triple: anchors placed among distractors that passed the visual filter.

        `prefer` lists leaves of q's video to try first (the first far one that passes is used).
        """
        anchors = self._anchor_nodes(q)
        accepted, excluded = self._draw(q, prefer)
        clips = self._place(q, anchors, accepted)
        clips.excluded = excluded
        for letter, leaf in sorted(q.sources.items()):
            n = next((i for i, c in enumerate(clips.sequence, 1)
                      if c["role"] == "distractor" and c["video_id"] == q.video_id and tuple(c["id"]) == leaf), None)
            if n is not None and letter != q.answer:
                clips.source_clip = (n, letter)
                break
        return clips

    def _draw(self, q: Question, prefer: Iterable[tuple[str, NodeId]]) -> tuple[list[tuple], list[dict]]:
        """(accepted distractors as ((video_id, leaf), similarity), those left out as look-alikes)."""
        anchor_keys = [(q.video_id, a) for a in q.anchors]
        for a in anchor_keys:  # an anchor whose frames cannot be read fails the question (Skip)
            self.looks.features(a)
        same, other = self._pools(q)
        wanted = self.o.distractors
        accepted: list[tuple] = []
        excluded: list[dict] = []
        tried: set = set()

        def consider(key) -> bool:
            if key in tried:
                return False
            tried.add(key)
            try:
                sim = max(self.looks.similarity(a, key) for a in anchor_keys)
            except Skip:  # a candidate whose frames cannot be read is passed over
                return False
            if sim >= self.o.threshold:
                excluded.append({"video_id": key[0], "id": list(key[1]), "similarity": round(sim, 4)})
                return False
            accepted.append((key, sim))
            return True

        far = set(same)
        for key in prefer:
            if key in far and consider(key):
                break
        # The same video's share first, then other videos, then the same video again if they run short.
        for pool, goal in ((same, min(len(same), round(wanted * self.o.same_video_share))), (other, wanted),
                           (same, wanted)):
            for key in pool:
                if len(accepted) >= goal:
                    break
                consider(key)
        if len(accepted) < wanted:
            raise Skip(f"only {len(accepted)} of {wanted} distractor clips are below similarity "
                       f"{self.o.threshold:g} to the anchor ({len(excluded)} left out as look-alikes)")
        return accepted[:wanted], excluded

    def _place(self, q: Question, anchors: list[dict], accepted: list[tuple]) -> Clips:
        """Anchors in time order at seeded random positions; the distractors, shuffled, around them."""
        rng = seeded_rng(self.o.seed, q.qid, "positions")
        distractors = list(accepted)
        rng.shuffle(distractors)
        count = len(distractors) + len(anchors)
        slots = sorted(rng.sample(range(count), len(anchors)))
        anchor_iter, distractor_iter = iter(anchors), iter(distractors)
        sequence = []
        for i in range(count):
            if i in slots:
                sequence.append(clip_entry(next(anchor_iter), "anchor", None))
            else:
                (vid, leaf), sim = next(distractor_iter)
                sequence.append(clip_entry(self.leaves[vid][leaf], "distractor", sim))
        return Clips(sequence, [s + 1 for s in slots], [])


# -- records ----------------------------------------------------------------------------------------

def triple_id(q: Question, stage: int) -> str:
    return f"{q.qid}-vpo{stage}"


def triple_record(q: Question, stage: int, clips: Clips, chosen: str, rejected: str, rejected_source: str,
                  rejected_clip: int | None, looks: ClipLooks, options: VpoOptions, producer: dict) -> dict:
    return {
        "schema": SCHEMA, "id": triple_id(q, stage), "qid": q.qid, "stage": stage, "category": q.category,
        "video_id": q.video_id, "question": q.question, "options": list(q.options), "answer": q.answer,
        "chosen": chosen, "rejected": rejected, "rejected_source": rejected_source, "rejected_clip": rejected_clip,
        "anchor_clips": clips.anchor_clips, "clip_count": len(clips.sequence), "clips": clips.sequence,
        "similarity": {"measure": looks.measure.name, "model": looks.measure.model, "threshold": options.threshold,
                       "excluded": clips.excluded},
        "producer": producer,
    }


def stage1_answers(q: Question, clips: Clips, seed: int) -> tuple[str, str, str, int | None]:
    """(chosen, rejected, rejected_source, rejected_clip) of a stage-1 triple."""
    chosen = q.options[LETTERS.index(q.answer)]
    if clips.source_clip is not None:
        n, letter = clips.source_clip
        return chosen, q.options[LETTERS.index(letter)], SOURCE_CLIP, n
    wrong = [x for x in LETTERS[:len(q.options)] if x != q.answer]
    letter = seeded_rng(seed, q.qid, "rejected").choice(wrong)
    return chosen, q.options[LETTERS.index(letter)], SOURCE_OPTION, None


# -- stage 2: the writer ---------------------------------------------------------------------------

WRITER_SYSTEM = """\
You write two answers to a multiple-choice question about a sequence of video clips, to \
train a vision-language model that must find the right clips before it answers. You \
cannot see the clips; you get a caption of each, numbered as the model sees them.

- CHOSEN: reason briefly from the clips the question is about (named to you), say what \
they show, and reach the correct option.
- REJECTED: an answer that sounds just as sure and careful, but rests on the WRONG clip \
named to you: it takes that clip for the one the question is about, describes it, and \
reaches a wrong option. Never say or hint that it is wrong.

Refer to clips as "clip N". Keep both answers alike in length and tone, two or three \
sentences, and end each with a last line "Answer: X" where X is the option's letter.

Reply with one JSON object only: {"chosen": "...", "rejected": "..."}"""

WRITER_PROMPT_VERSION = "1"


def writer_messages(q: Question, clips: Clips, captions: list[str], wrong_clip: int) -> list[dict]:
    lines = ["The clips, in the order the model sees them:", ""]
    lines += [f"Clip {i}: {cap}" for i, cap in enumerate(captions, 1)]
    lines += ["", f"Question: {q.question}", "Options:", *q.options, "",
              f"The question is about clips {', '.join(map(str, clips.anchor_clips))}; the correct answer is "
              f"{q.answer}.", f"The wrong clip for the rejected answer: clip {wrong_clip}."]
    return [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def final_letter(text: str, options) -> str | None:
    """The option letter on an answer's last line ("Answer: B")."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return chosen_letter(last, list(options))


def check_written(obj: dict, q: Question, clips: Clips, wrong_clip: int) -> tuple[str, str]:
    """The writer's JSON -> (chosen, rejected), or ReplyError saying what to fix."""
    texts = []
    for key in ("chosen", "rejected"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ReplyError(f"'{key}' must be a non-empty string")
        texts.append(value.strip())
    chosen, rejected = texts
    if final_letter(chosen, q.options) != q.answer:
        raise ReplyError(f"'chosen' must end with the line \"Answer: {q.answer}\"")
    letter = final_letter(rejected, q.options)
    if letter is None or letter == q.answer:
        raise ReplyError(f"'rejected' must end with a line \"Answer: X\" naming a wrong option (not {q.answer})")
    if not re.search(rf"\bclip {wrong_clip}\b", rejected, re.I):
        raise ReplyError(f"'rejected' must rest on clip {wrong_clip} and name it")
    missing = [n for n in clips.anchor_clips if not re.search(rf"\bclips?\b[^.]*?\b{n}\b", chosen, re.I)]
    if missing:
        raise ReplyError(f"'chosen' must name the clips it reasons from (clip {missing[0]} is missing)")
    return chosen, rejected


def wrong_clip_of(q: Question, clips: Clips, seed: int) -> int:
    """The distractor a stage-2 rejected answer rests on: seeded, from the anchor's own video when one is there."""
    distractors = [i for i, c in enumerate(clips.sequence, 1) if c["role"] == "distractor"]
    own = [i for i in distractors if clips.sequence[i - 1]["video_id"] == q.video_id]
    return seeded_rng(seed, q.qid, "wrong clip").choice(own or distractors)


# -- anchor positions -------------------------------------------------------------------------------

def _upper_gamma(a: float, x: float) -> float:
    """The regularised upper incomplete gamma function Q(a, x) (series below a + 1, else a continued fraction)."""
    if x <= 0:
        return 1.0
    front = math.exp(-x + a * math.log(x) - math.lgamma(a))
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(1000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * front)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h


def chi_square_p(counts: list[int]) -> tuple[float, float]:
    """(statistic, p-value) of a chi-square test that `counts` come from a uniform distribution."""
    total, k = sum(counts), len(counts)
    if total == 0 or k < 2:
        return 0.0, 1.0
    expected = total / k
    stat = sum((c - expected) ** 2 / expected for c in counts)
    return stat, _upper_gamma((k - 1) / 2, stat / 2)


def position_check(records: Iterable[dict]) -> list[dict]:
    """Per stage and clip count: how often each clip position held an anchor, and the chi-square test."""
    groups: dict[tuple[int, int], list[int]] = {}
    triples: Counter = Counter()
    for r in records:
        if r.get("schema") != SCHEMA:
            continue
        group = (int(r["stage"]), int(r["clip_count"]))
        counts = groups.setdefault(group, [0] * group[1])
        triples[group] += 1
        for n in r["anchor_clips"]:
            counts[n - 1] += 1
    out = []
    for (stage, clip_count), counts in sorted(groups.items()):
        stat, p = chi_square_p(counts)
        out.append({"stage": stage, "clips": clip_count, "triples": triples[stage, clip_count],
                    "anchor_counts": counts, "chi_square": round(stat, 4), "p_value": round(p, 6),
                    "uniform": p >= UNIFORM_ALPHA})
    return out


def describe_positions(check: dict) -> str:
    verdict = "uniform" if check["uniform"] else f"NOT uniform (p < {UNIFORM_ALPHA})"
    return (f"stage {check['stage']}, {check['clips']} clips: anchors per position {check['anchor_counts']}, "
            f"chi-square {check['chi_square']:.2f} on {check['clips'] - 1} df, p = {check['p_value']:.3f}: {verdict}")


# -- the batch --------------------------------------------------------------------------------------

@dataclass
class VpoSummary:
    written: int = 0
    skipped: int = 0                                   # written in an earlier run
    not_this_stage: int = 0                            # questions of the other stage's kind
    excluded: int = 0                                  # distractors the visual filter left out
    sources: Counter = field(default_factory=Counter)  # rejected_source -> triples
    failed: list[str] = field(default_factory=list)    # questions and input lines, each one line
    positions: list[dict] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


def _frames_reader(leaves: dict[str, dict[NodeId, dict]], cache_dir: "str | os.PathLike | None"):
    from ..prep.cache import frames_dir, resolve_cache_dir
    from ..prep.frame_repair import FrameRepairError, read_node_frames
    from ..prep.frames import FrameStore

    store = FrameStore(frames_dir(resolve_cache_dir(cache_dir)))

    def read(key: tuple[str, NodeId]) -> list[bytes]:
        node = leaves[key[0]][key[1]]
        try:
            return read_node_frames(store, node, list(node["qa_frame_keys"]))
        except (FrameRepairError, ValueError, OSError) as e:
            raise Skip(f"frames of leaf {list(key[1])} of {node.get('path') or key[0]}: {e}") from None

    return read


def _read_questions(source: str, stage: int, summary: VpoSummary, log) -> list[Question]:
    questions = []
    try:
        for lineno, rec in read_jsonl(source):
            try:
                q = read_question(rec)
            except ValueError as e:
                msg = f"{source}:{lineno}: {e}"
                summary.failed.append(msg)
                log(f"error: {msg}")
                continue
            wanted_anchors = (1, 1) if stage == 1 else (2, 3)
            if q.category != STAGE_KIND[stage] or not wanted_anchors[0] <= len(q.anchors) <= wanted_anchors[1]:
                summary.not_this_stage += 1
                continue
            questions.append(q)
    except RecordError as e:
        raise VpoError(str(e)) from None
    return questions


def _caption_lookup(path: str | None) -> tuple[Callable[[dict], str], list[str]]:
    from .caption_trees import load_caption_trees

    if path is None:
        raise VpoError("--stage 2 needs --caption-records (the lvr.caption/1 records the writer reads)")
    try:
        trees, errors = load_caption_trees(path)
    except RecordError as e:
        raise VpoError(str(e)) from None
    by_video = {t.video_id: t for t in trees}

    def caption(clip: dict) -> str:
        tree = by_video.get(clip["video_id"])
        if tree is None:
            raise Skip(f"video {clip.get('video') or clip['video_id']} has no complete caption tree in "
                       "--caption-records")
        return tree.nodes[tuple(clip["id"])]["caption"]

    return caption, errors


def run_vpo(source: str, output: "str | os.PathLike | None", options: VpoOptions, *, model=None,
            cache_dir: "str | os.PathLike | None" = None, log=lambda msg: None) -> VpoSummary:
    """Everything `lvr vpo` does: triples of one stage appended to `output`, and the position check.

    `model` (a ModelSpec, or anything with .build() giving a ChatModel) writes stage 2's answers.
    Per-question failures are in the summary; VpoError (unusable inputs or options) is raised.
    """
    from .. import __version__

    started = time.perf_counter()
    summary = VpoSummary()
    if options.stage == 2 and model is None:
        raise VpoError("--stage 2 needs --model: the LLM that writes the chosen and rejected answers")
    try:
        measure = make_measure(options.similarity, options.similarity_model, device=options.device)
    except ValueError as e:
        raise VpoError(str(e)) from None
    leaves, errors = load_leaves(options.nodes)
    caption = None
    if options.stage == 2:
        caption, caption_errors = _caption_lookup(options.caption_records)
        errors += caption_errors
    for e in errors:
        log(f"error: {e}")
    summary.failed += errors
    questions = _read_questions(source, options.stage, summary, log)
    looks = ClipLooks(measure, _frames_reader(leaves, cache_dir))
    picker = ClipPicker(leaves, looks, options)
    producer = {"tool": TOOL, "version": __version__, "options": options.to_record()}
    with JsonlWriter(output) as out:
        done = {r.get("id") for r in out.existing if r.get("schema") == SCHEMA}
        todo = [q for q in questions if triple_id(q, options.stage) not in done]
        summary.skipped = len(questions) - len(todo)

        def failed(q: Question, why: str) -> None:
            msg = f"{q.qid}: {why}"
            summary.failed.append(msg)
            log(f"error: {msg}")

        def wrote(record: dict) -> None:
            out.write_unit([record])
            summary.written += 1
            summary.excluded += len(record["similarity"]["excluded"])
            summary.sources[record["rejected_source"]] += 1
            written.append(record)

        written: list[dict] = []
        if options.stage == 1:
            for q in todo:
                try:
                    clips = picker.pick(q, prefer=[(q.video_id, leaf) for _, leaf in sorted(q.sources.items())])
                except Skip as e:
                    failed(q, str(e))
                    continue
                wrote(triple_record(q, 1, clips, *stage1_answers(q, clips, options.seed), looks, options, producer))
        elif todo:
            asyncio.run(_stage2(todo, picker, caption, model, options, producer, summary, wrote, failed))
        summary.positions = position_check(out.existing + written)
    for check in summary.positions:
        log(f"anchor positions: {describe_positions(check)}")
    summary.seconds = time.perf_counter() - started
    return summary


async def _stage2(todo: list[Question], picker: ClipPicker, caption, model, options: VpoOptions, producer: dict,
                  summary: VpoSummary, wrote, failed) -> None:
    from ..prep.work_queue import run_jobs

    chat = model.build()
    producer = {**producer, "model": chat.name, "prompt_version": WRITER_PROMPT_VERSION}
    asker = JsonAsker(chat, max_tokens=options.max_tokens, json_retries=2)

    async def one(q: Question) -> None:
        usage = Usage()
        try:
            clips = picker.pick(q)
            wrong = wrong_clip_of(q, clips, options.seed)
            messages = writer_messages(q, clips, [caption(c) for c in clips.sequence], wrong)
            chosen, rejected = await asker.ask_json(
                messages, lambda obj: check_written(obj, q, clips, wrong), usage, temperature=options.temperature,
                seed=options.seed, what="answers")
        except (Skip, QuestionFailed) as e:
            failed(q, str(e))
            return
        finally:
            summary.usage.add(usage)
        wrote(triple_record(q, 2, clips, chosen, rejected, SOURCE_LLM, wrong, picker.looks, options, producer))

    try:
        check = getattr(chat, "check_reachable", None)
        if check is not None:
            await check()
        await run_jobs(todo, one, concurrency=options.concurrency)
    finally:
        await chat.aclose()


# -- the layout the model sees ----------------------------------------------------------------------

INTRO = "Clips from videos, shown one after another. Each frame is preceded by its time from the start of its clip."
CLIP_HEADER = "Clip {n}:"
INSTRUCTION = {1: "Answer with the letter and text of one option.",
               2: "Say which clips show it, then end with a last line \"Answer: X\", X the option's letter."}


def frame_picks(count: int, budget: int) -> list[int]:
    """Which of a clip's `count` frames to show when `budget` are allowed: evenly spread, first and last kept."""
    if count <= budget:
        return list(range(count))
    if budget == 1:
        return [count // 2]
    return [round(i * (count - 1) / (budget - 1)) for i in range(budget)]


def per_clip_budget(record: dict, max_images: int) -> int:
    """Frames each clip may show so that the whole interleaved input stays within `max_images`."""
    per_clip = max_images // max(1, int(record["clip_count"]))
    if per_clip < 1:
        raise ValueError(f"{record['clip_count']} clips do not fit in --max-images {max_images} (one frame each)")
    return per_clip


def triple_messages(record: dict, *, anchor_only: bool = False, max_images: int = 64) -> tuple[list[dict], list[dict]]:
    """(prompt messages, the frames in order) of a triple for a vision-language model.

    The policy sees every clip; the anchor-only reference (`anchor_only`) sees the anchor
    clip(s) alone, with the same frames, labels and clip numbers, so the anchor's part of
    the input is the same in both. Each image is a ``{"type": "image"}`` part; the frames
    come back as ``{"key", "video_id", "video"}`` in the order of those parts. Frames per
    clip are cut evenly to fit `max_images` over the whole interleaved input.
    """
    budget = per_clip_budget(record, max_images)
    anchors = set(record["anchor_clips"])
    parts: list[dict] = [{"type": "text", "text": INTRO}]
    frames: list[dict] = []
    for n, clip in enumerate(record["clips"], 1):
        if anchor_only and n not in anchors:
            continue
        parts.append({"type": "text", "text": CLIP_HEADER.format(n=n)})
        keys, times = clip["frame_keys"], clip.get("frame_times") or []
        for i in frame_picks(len(keys), budget):
            if i < len(times):
                label = LVR_PROFILE.qa_frame_label.format(time=LVR_PROFILE.time(max(0.0, times[i] - clip["start"])))
                parts.append({"type": "text", "text": label})
            parts.append({"type": "image"})
            frames.append({"key": keys[i], "video_id": clip["video_id"], "video": clip.get("video")})
    options = "\n".join(record["options"])
    query = f"{record['question']}\n{options}\n{INSTRUCTION[int(record['stage'])]}"
    parts.append({"type": "text", "text": LVR_PROFILE.qa_question.format(query=query)})
    return [{"role": "system", "content": DEFAULT_QA_SYSTEM_PROMPT}, {"role": "user", "content": parts}], frames


def answer_message(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def check_triple(rec: dict) -> None:
    """ValueError naming what makes an lvr.vpo/1 record unusable for training."""
    if rec.get("schema") != SCHEMA:
        raise ValueError(f"not an {SCHEMA} record (schema {rec.get('schema')!r}); make triples with `lvr vpo`")
    for key in ("question", "chosen", "rejected"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise ValueError(f"{key!r} must be non-empty text")
    if int(rec.get("stage", 0)) not in INSTRUCTION:
        raise ValueError(f"unknown stage {rec.get('stage')!r}")
    clips = rec.get("clips")
    if not isinstance(clips, list) or not clips or rec.get("clip_count") != len(clips):
        raise ValueError("'clips' must list clip_count clips")
    for n, clip in enumerate(clips, 1):
        if not isinstance(clip, dict) or not clip.get("frame_keys") or not isinstance(clip.get("start"), (int, float)):
            raise ValueError(f"clip {n} has no frame keys or no start")
    anchors = rec.get("anchor_clips")
    if not isinstance(anchors, list) or not anchors or not all(isinstance(n, int) and 1 <= n <= len(clips)
                                                               for n in anchors):
        raise ValueError("'anchor_clips' must name clips by number")
    if not isinstance(rec.get("options"), list) or not rec["options"]:
        raise ValueError("'options' must be a list")

"""The RL reward (docs/architecture.md §2.8): pure functions of one finished trajectory.

    R = w_ans·answer + w_loc·F1 − w_rep·repeat  (+ w_cd·center_distance)

with default weights 1.0, 1.0, 0.2 and 0.0 (the Center-Distance term from
LongVTG-R1 is an option, off by default). Every part is returned separately
(`RewardParts`) so it can be logged.

A grounding episode (the answer is a time interval P; the item's targets T) has
no answer term; the answered interval is scored instead (`grounding_reward`):

    R = w_iou·IoU(P, T) + w_icd·CenDist(P, T) + w_loc·F1 − w_rep·repeat (+ w_cd·center_distance)

with w_iou = w_icd = 1.0 by default, F1 and the center-distance term taken
against the targets as clues, and no interval (no usable answer) scoring 0 on
both interval terms.

Two rules compute the parts (`lvr rl --reward`):

- ``lvr`` (default): from the executed visits. Visits are the executed tool
  calls of a trajectory, either `infer.environment.Visit` objects or their
  JSONL records (dicts with `tool`, `node`, `start`, `end` and, for video_qa,
  `query`). Tool calls that broke a rule came back as corrections and have no
  visit, so they count nowhere here. Clue intervals are taken as given: callers
  merge them first (`merge_clues`). Here they are only unioned (gap 0), so
  overlapping clues are never double counted.
- ``reference``: LongVideo-R1's own reward, number for number, read off the
  rollout's text (`reference_reward`).

A QA item without clue intervals gets the answer-only reward under either rule
(`answer_only_reward`), as the reference does for its Video-MME split.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass
from itertools import zip_longest
from typing import Any, Iterable, Sequence

from ..infer.grounding import best_iou, temporal_iou as _temporal_iou
from ..infer.protocol import GROUNDING, QA, answer_matches, extract_choice
from ..prep import tags
from .hints import CLUE_GAP_S, merge_intervals

Interval = tuple[float, float]

CAPTION_TOOL = "get_caption"
QA_TOOL = "video_qa"
REWARD_RULES = ("lvr", "reference")


# --------------------------------------------------------------------------- visits

def _field(visit: Any, name: str, default: Any = None) -> Any:
    """One field of a visit: an attribute (Visit) or a key (its JSONL record)."""
    if isinstance(visit, dict):
        return visit.get(name, default)
    return getattr(visit, name, default)


def _node(visit: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in (_field(visit, "node") or ()))


def _span(visit: Any) -> Interval:
    return float(_field(visit, "start")), float(_field(visit, "end"))


def caption_spans(visits: Iterable[Any]) -> list[Interval]:
    """Time spans of the medium and low nodes visited with get_caption, in visit order.

    video_qa visits are ignored (they only re-examine a leaf already captioned),
    and so are high nodes (depth 1): their captions are in the first prompt, not
    fetched by a tool, so they say nothing about where the model chose to look.
    """
    return [_span(v) for v in visits
            if _field(v, "tool") == CAPTION_TOOL and len(_node(v)) != 1]


def _union(intervals: Iterable[Sequence[float]]) -> list[Interval]:
    """Sorted union of intervals as non-overlapping pieces; empty and inverted ones dropped."""
    return [(s, e) for s, e in merge_intervals(intervals, gap=0.0) if e > s]


def _length(intervals: Iterable[Interval]) -> float:
    return sum(e - s for s, e in intervals)


def _intersection_length(a: list[Interval], b: list[Interval]) -> float:
    """Length of the intersection of two disjoint sorted interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# --------------------------------------------------------------------------- answer

def answer_reward(answer: str | None, choice: str | None, options, reference: str) -> float:
    """answer = 1 if the extracted answer matches the reference, else 0.

    Uses `infer.protocol.answer_matches`: multiple choice compares the chosen
    letter with the reference letter (when `choice` is None it is extracted
    from `answer` with `extract_choice`); open questions compare the words,
    ignoring case and punctuation. No answer scores 0.
    """
    if reference is None:
        return 0.0
    if options and choice is None:
        choice = extract_choice(answer, list(options))
    return 1.0 if answer_matches(answer, choice, options, str(reference)) else 0.0


# --------------------------------------------------------------------------- localisation

@dataclass(frozen=True)
class Localisation:
    """Coverage, precision and their harmonic mean F1 (see `localisation_scores`)."""

    coverage: float
    precision: float
    f1: float


def localisation_scores(visits: Iterable[Any], clues: Iterable[Sequence[float]]) -> Localisation:
    """The LongVideo-R1 localisation reward and its two halves.

        V        = union of the spans of the medium/low nodes visited with get_caption
        C        = union of the (already merged) clue intervals
        overlap  = |V ∩ C|
        coverage = overlap / |C|
        precision = overlap / |V|
        F1       = 2·coverage·precision / (coverage + precision)

    |·| is total length in seconds. Because V is a union, nested visits (a
    medium node, then a low node inside it) and repeated visits are not double
    counted, so every score lies in [0, 1]. All three are 0 when nothing was
    visited, when there are no clues (or they have zero length), or when V and
    C do not overlap. video_qa visits and high nodes are ignored
    (`caption_spans`).
    """
    visited = _union(caption_spans(visits))
    clue_union = _union(clues)
    visited_len, clue_len = _length(visited), _length(clue_union)
    if visited_len <= 0 or clue_len <= 0:
        return Localisation(0.0, 0.0, 0.0)
    inter = _intersection_length(visited, clue_union)
    if inter <= 0:
        return Localisation(0.0, 0.0, 0.0)
    coverage = min(1.0, inter / clue_len)
    precision = min(1.0, inter / visited_len)
    f1 = 2 * coverage * precision / (coverage + precision)
    return Localisation(coverage, precision, min(1.0, f1))


def localisation_f1(visits: Iterable[Any], clues: Iterable[Sequence[float]]) -> float:
    """F1 = 2·coverage·precision / (coverage + precision); see `localisation_scores`."""
    return localisation_scores(visits, clues).f1


def coverage(visits: Iterable[Any], clues: Iterable[Sequence[float]]) -> float:
    """coverage = |V ∩ C| / |C|; see `localisation_scores`."""
    return localisation_scores(visits, clues).coverage


def precision(visits: Iterable[Any], clues: Iterable[Sequence[float]]) -> float:
    """precision = |V ∩ C| / |V|; see `localisation_scores`."""
    return localisation_scores(visits, clues).precision


# --------------------------------------------------------------------------- repeats

def call_key(visit: Any) -> tuple:
    """What makes two tool calls the same call.

    get_caption: (tool, node). video_qa: (tool, node, query), the query with
    case and whitespace normalised, so asking a leaf a different question is a
    new call, while asking it the same question again is a repeat.
    """
    tool = _field(visit, "tool")
    if tool == QA_TOOL:
        query = " ".join(str(_field(visit, "query") or "").split()).lower()
        return tool, _node(visit), query
    return tool, _node(visit)


def repeat_penalty(visits: Iterable[Any]) -> float:
    """repeat = (calls − unique) / unique, over all executed tool calls
    (get_caption and video_qa), with unique counted by `call_key`; 0 when there
    were no calls. E.g. A, A, B → (3 − 2) / 2 = 0.5. It is not bounded by 1:
    ten calls of one node give 9.
    """
    keys = [call_key(v) for v in visits]
    if not keys:
        return 0.0
    unique = len(set(keys))
    return (len(keys) - unique) / unique


# --------------------------------------------------------------------------- center distance

def _centre(span: Sequence[float]) -> float:
    return (float(span[0]) + float(span[1])) / 2


def _check_duration(duration: Any, what: str) -> None:
    """ValueError unless `duration` is a positive number of seconds (NaN is not)."""
    if duration is None or not duration > 0:
        raise ValueError(f"{what} needs a positive video duration, got {duration!r}")


def center_distance_reward(visits: Iterable[Any], clues: Iterable[Sequence[float]],
                           duration: float) -> float:
    """Center-Distance reward (LongVTG-R1 option): how close the visits are to the clue.

    For each distinct visited span v (medium/low get_caption visits, as in
    `caption_spans`; a span visited twice counts once, repeats are the repeat
    term's business) with centre c_v:

        d_v = min over clue intervals k of |c_v − c_k|     (c_k = clue centre)
        CD  = mean over v of (1 − min(1, d_v / duration))

    so CD ∈ [0, 1], it is 1 when every visited span is centred on a clue, and it
    falls linearly with distance (scaled by the video length) whether or not
    the spans overlap, which keeps it dense. 0 when nothing was visited or
    there are no clues. `duration` must be positive.
    """
    _check_duration(duration, "center_distance_reward")
    clue_centres = [_centre(c) for c in clues if float(c[1]) >= float(c[0])]
    spans = list(dict.fromkeys(caption_spans(visits)))
    if not spans or not clue_centres:
        return 0.0
    scores = [1.0 - min(1.0, min(abs(_centre(s) - c) for c in clue_centres) / duration) for s in spans]
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- grounding answers

def _interval(span: Sequence[float], name: str) -> Interval:
    start, end = float(span[0]), float(span[1])
    if start > end:
        raise ValueError(f"the {name} interval ends before it starts: [{start}, {end}]")
    return start, end


def temporal_iou(pred: Sequence[float], target: Sequence[float]) -> float:
    """Temporal IoU of an answered interval P = [s_p, e_p] and the target T = [s_t, e_t]:

        |P ∩ T| = max(0, min(e_p, e_t) − max(s_p, s_t))
        IoU     = |P ∩ T| / (|P| + |T| − |P ∩ T|)

    in seconds, so IoU ∈ [0, 1]: 1 for the exact interval, 0 when they do not
    overlap. Two points (zero-length intervals) score 1 when equal, else 0.
    ValueError for a reversed interval (start > end): a reward is never given for one.
    The formula's home is `infer.grounding.temporal_iou`, which eval's metrics use too.
    """
    return _temporal_iou(_interval(pred, "answered"), _interval(target, "target"))


def interval_center_distance_reward(pred: Sequence[float], target: Sequence[float], duration: float) -> float:
    """Center-Distance reward (LongVTG-R1's CenDist) of an answered interval against the target:

        c_p, c_t = centres of the answered and the target interval
        CD       = 1 − min(1, |c_p − c_t| / duration)

    the per-span score of `center_distance_reward`, for one answer and one target.
    CD ∈ [0, 1]: 1 when the centres coincide (whatever the lengths), falling
    linearly as they move apart even when the intervals do not overlap, so it
    stays dense where temporal IoU is 0. `duration` must be positive;
    ValueError for a reversed interval.
    """
    _check_duration(duration, "interval_center_distance_reward")
    pred, target = _interval(pred, "answered"), _interval(target, "target")
    return 1.0 - min(1.0, abs(_centre(pred) - _centre(target)) / duration)


def answer_iou(pred: Sequence[float] | None, targets: Iterable[Sequence[float]]) -> float:
    """IoU of an answered interval against the target it matches best:

        IoU(P, T) = max over targets t of temporal_iou(P, t)

    0 when there is no answer (None) or no target; eval's `best_iou`, the same rule.
    """
    answered = None if pred is None else _interval(pred, "answered")
    return best_iou(answered, [_interval(t, "target") for t in targets])


def answer_center_distance(pred: Sequence[float] | None, targets: Iterable[Sequence[float]],
                           duration: float) -> float:
    """CenDist of an answered interval against the nearest target:

        CenDist(P, T) = max over targets t of interval_center_distance_reward(P, t, duration)
                      = 1 − min(1, min over t of |c_P − c_t| / duration)

    0 when there is no answer (None) or no target; `duration` must be positive.
    """
    _check_duration(duration, "answer_center_distance")
    targets = list(targets)
    if pred is None or not targets:
        return 0.0
    return max(interval_center_distance_reward(pred, t, duration) for t in targets)


# --------------------------------------------------------------------------- composite

@dataclass(frozen=True)
class RewardWeights:
    """Weights of the composite reward; defaults are LongVideo-R1's (center distance off).

    `iou` and `interval_center_distance` weigh a grounding answer's two terms
    (`grounding_reward`); they play no part in a QA episode's reward.
    """

    answer: float = 1.0
    localisation: float = 1.0
    repeat: float = 0.2
    center_distance: float = 0.0
    iou: float = 1.0
    interval_center_distance: float = 1.0

    def to_record(self) -> dict:
        return asdict(self)


@dataclass
class RewardParts:
    """Every part of one trajectory's reward, unweighted, and the weighted total.

    `rule` is the rule that computed the parts (`REWARD_RULES`); `answer_only` marks
    the reward of an item without clue intervals, whose other parts are None (not
    part of its reward, so not logged either). `task` is the episode's task: a
    grounding episode has `iou` and `interval_center_distance` and no `answer`
    (None); a QA episode the other way round.
    """

    answer: float | None
    localisation: float | None
    repeat: float | None
    center_distance: float | None
    total: float
    rule: str = "lvr"
    answer_only: bool = False
    task: str = QA
    iou: float | None = None
    interval_center_distance: float | None = None

    def to_record(self) -> dict:
        return asdict(self)


def composite_reward(*, answer: str | None, choice: str | None, options, reference: str,
                     visits: Sequence[Any], clues: Iterable[Sequence[float]],
                     duration: float | None = None,
                     weights: RewardWeights = RewardWeights()) -> RewardParts:
    """R = w_ans·answer + w_loc·F1 − w_rep·repeat + w_cd·center_distance (the ``lvr`` rule).

    Parts: `answer_reward`, `localisation_f1`, `repeat_penalty` and
    `center_distance_reward` (computed when `duration` is given, else 0;
    a non-zero center-distance weight requires it). With no tool calls
    F1 = repeat = center_distance = 0, so R is just w_ans·answer.
    Clues must already be merged (`merge_clues`).
    """
    a = answer_reward(answer, choice, options, reference)
    f1, rep, cd = _visit_terms(visits, clues, duration, weights)
    total = (weights.answer * a + weights.localisation * f1 - weights.repeat * rep
             + weights.center_distance * cd)
    return RewardParts(answer=a, localisation=f1, repeat=rep, center_distance=cd, total=total)


def _visit_terms(visits: Iterable[Any], clues: Iterable[Sequence[float]], duration: float | None,
                 weights: RewardWeights) -> tuple[float, float, float]:
    """(F1, repeat, center_distance) of the executed visits against the clues, as both tasks score them."""
    visits = list(visits)
    clues = [tuple(c) for c in clues]
    f1 = localisation_f1(visits, clues)
    rep = repeat_penalty(visits)
    if duration is not None and duration > 0:
        cd = center_distance_reward(visits, clues, duration)
    elif weights.center_distance:
        raise ValueError("a center-distance weight needs the video duration")
    else:
        cd = 0.0
    return f1, rep, cd


def grounding_reward(*, interval: Sequence[float] | None, targets: Iterable[Sequence[float]],
                     visits: Sequence[Any], clues: Iterable[Sequence[float]], duration: float,
                     weights: RewardWeights = RewardWeights()) -> RewardParts:
    """R = w_iou·IoU + w_icd·CenDist + w_loc·F1 − w_rep·repeat + w_cd·center_distance (a grounding episode).

    IoU = `answer_iou(interval, targets)` and CenDist = `answer_center_distance(interval,
    targets, duration)`, both 0 without an interval; F1, repeat and center_distance are
    the visits' terms of `composite_reward`, with `clues` the targets merged
    (`merge_clues`). There is no answer term: the interval terms replace it.
    `duration` (seconds) must be positive.
    """
    targets = [tuple(t) for t in targets]
    iou = answer_iou(interval, targets)
    icd = answer_center_distance(interval, targets, duration)
    f1, rep, cd = _visit_terms(visits, clues, duration, weights)
    total = (weights.iou * iou + weights.interval_center_distance * icd + weights.localisation * f1
             - weights.repeat * rep + weights.center_distance * cd)
    return RewardParts(answer=None, localisation=f1, repeat=rep, center_distance=cd, total=total,
                       task=GROUNDING, iou=iou, interval_center_distance=icd)


# --------------------------------------------------------------------------- the reference's rule
#
# LongVideo-R1's RL reward (verl-tool/verl/verl/utils/reward_score/longvideor1_score.py in
# qiujihao19/LongVideo-R1), reproduced number for number. Where it differs from the lvr rule:
#
# - it reads the rollout's text, not the executed visits: every <tool> block counts, inside
#   the reasoning too and whether or not the environment accepted the call (tags are
#   case-sensitive there);
# - only get_caption calls count, at every level (high nodes too); video_qa never does;
# - node spans are the equal time division of the duration: high node h spans
#   [(h-1)·D/K, h·D/K], medium and low nodes likewise at D/K² and D/K³ (capped at D);
# - overlap is summed per visit against each merged clue, not taken against the union of
#   visits, so visiting a node and then a node inside it counts their common part twice;
#   precision divides that sum by the union length, so it (and F1) can exceed 1;
# - repeat = (calls − distinct arguments) / distinct arguments over those get_caption calls;
# - clues are merged when the next one (by start) begins at most `gap` s after the end of
#   the one before it (`reference_merge_clues`);
# - the answer is the last <answer> block of the text, stripped, equal to the reference
#   string exactly ("B" matches "B", not "b" or "B. a dog").

_REFERENCE_BLOCKS = {tag: re.compile(rf"{re.escape(tags.opening(tag))}(.*?){re.escape(tags.closing(tag))}", re.S)
                     for tag in (tags.TOOL, tags.ANSWER)}
_REFERENCE_CALL = re.compile(r"(\w+)\((.*)\)")    # name(...), up to the last ")" on the line


def rollout_transcript(turn_texts: Sequence[str], results: Sequence[str | None],
                       breaches: Sequence[str | None] = ()) -> str:
    """The text the reference scores: each model turn and the tool result that followed it.

    verl-tool decodes a rollout's whole response, tool observations included; a
    call it could not run observed nothing, so results of turns that broke a rule
    (lvr's corrections) are left out.
    """
    parts = []
    for text, result, breach in zip_longest(turn_texts, results, breaches[: len(turn_texts)]):
        parts.append(text or "")
        if result and not breach:
            parts.append(result)
    return "\n".join(parts)


def reference_answer(transcript: str) -> str | None:
    """The last <answer> block of the text, stripped; None when there is none."""
    found = _REFERENCE_BLOCKS[tags.ANSWER].findall(transcript or "")
    return found[-1].strip() if found else None


def reference_answer_reward(transcript: str, reference: str | None) -> float:
    """1 when `reference_answer` is the reference string exactly, else 0 (no answer: 0)."""
    answer = reference_answer(transcript)
    return 1.0 if answer is not None and reference is not None and answer == str(reference) else 0.0


def reference_calls(transcript: str) -> list[tuple[str, Any]]:
    """(name, arguments) of every <tool> block that reads as name(args) with args a Python
    literal (nothing: the empty tuple), in order; blocks that do not are skipped."""
    calls = []
    for block in _REFERENCE_BLOCKS[tags.TOOL].findall(transcript or ""):
        m = _REFERENCE_CALL.match(block.strip())
        if not m:
            continue
        text = m.group(2).strip()
        try:
            args = ast.literal_eval(text) if text else ()
        except Exception:  # noqa: BLE001 - anything literal_eval rejects is an unreadable call, as there
            continue
        calls.append((m.group(1), args))
    return calls


def reference_node_span(node: Sequence, duration: float, width: int) -> Interval:
    """A node's span by equal time division: depth d has nodes of D/K^d seconds; the end is
    capped at D; an id of another length spans (0, 0)."""
    if not 1 <= len(node) <= 3:
        return 0.0, 0.0
    start = sum((node[d] - 1) * (duration / width ** (d + 1)) for d in range(len(node)))
    return start, min(duration, start + duration / width ** len(node))


def reference_merge_clues(intervals: Iterable[Sequence[float]], gap: float = CLUE_GAP_S) -> list[Interval]:
    """Clue merging as the reference does it: sorted by start, an interval joins the group of the
    one before it when it starts at most `gap` s after that one's end; each group becomes
    [lowest start, highest end]. [(0, 100), (10, 20), (30, 40)] -> [(0, 100), (30, 40)]."""
    spans = [(float(s), float(e)) for s, e in intervals]
    if len(spans) < 2:
        return spans
    spans.sort(key=lambda x: x[0])
    groups = [[spans[0]]]
    for before, this in zip(spans, spans[1:]):
        if this[0] - before[1] <= gap:
            groups[-1].append(this)
        else:
            groups.append([this])
    return [(min(s for s, _ in g), max(e for _, e in g)) for g in groups]


def _reference_union_length(spans: list[Interval]) -> float:
    """Length of the union, sweeping the spans by start (an inverted span adds nothing)."""
    if not spans:
        return 0.0
    ordered = sorted(spans, key=lambda x: x[0])
    total, (lo, hi) = 0.0, ordered[0]
    for s, e in ordered[1:]:
        if s <= hi:
            hi = max(hi, e)
        else:
            total += max(0.0, hi - lo)
            lo, hi = s, e
    return total + max(0.0, hi - lo)


def reference_terms(transcript: str, clues: Sequence[Sequence[float]], duration: float | None,
                    width: int | None) -> tuple[float, float]:
    """(F1, repeat) of the reference rule; `clues` merged with `reference_merge_clues`.

        visits    = the get_caption arguments with fewer than 4 elements, in order
        repeat    = (visits − distinct visits) / distinct visits
        overlap   = Σ over visits v, Σ over clues c of |span(v) ∩ c|
        coverage  = overlap / Σ|c|          precision = overlap / |∪ span(v)|
        F1        = 2·coverage·precision / (coverage + precision)

    Both are 0 without such calls. Arguments the reference cannot score are
    handled as there: one without a length or unhashable (get_caption(3),
    get_caption([1, 2])) makes both 0; ids that are not numbers keep the
    repeat term and make F1 0.
    """
    try:
        visits = [args for name, args in reference_calls(transcript) if name == CAPTION_TOOL and len(args) < 4]
        if not visits:
            return 0.0, 0.0
        distinct = len(set(visits))
    except TypeError:
        return 0.0, 0.0
    repeat = (len(visits) - distinct) / distinct
    try:
        spans = [reference_node_span(v, duration, width) for v in visits]
    except (TypeError, ValueError, ArithmeticError):
        return 0.0, repeat
    clue_spans = [(float(s), float(e)) for s, e in clues]
    clue_len = sum(max(0.0, e - s) for s, e in clue_spans)
    overlap = sum(max(0.0, min(v[1], c[1]) - max(v[0], c[0])) for v in spans for c in clue_spans)
    union = _reference_union_length(spans)
    cov = overlap / clue_len if clue_len > 0 else 0.0
    prec = overlap / union if union > 0 else 0.0
    f1 = 2 * cov * prec / (cov + prec) if cov + prec > 0 else 0.0
    return f1, repeat


def reference_reward(*, transcript: str, reference: str, clues: Sequence[Sequence[float]],
                     duration: float | None, width: int | None,
                     weights: RewardWeights = RewardWeights()) -> RewardParts:
    """R = w_ans·answer + w_loc·F1 − w_rep·repeat by the reference's rule (see above); the
    reference has no center-distance term (None)."""
    a = reference_answer_reward(transcript, reference)
    f1, rep = reference_terms(transcript, clues, duration, width)
    total = weights.answer * a + weights.localisation * f1 - weights.repeat * rep
    return RewardParts(answer=a, localisation=f1, repeat=rep, center_distance=None, total=total,
                       rule="reference")


# --------------------------------------------------------------------------- choosing the rule

def merge_clues(rule: str, intervals: Iterable[Sequence[float]], gap: float = CLUE_GAP_S) -> list[Interval]:
    """A QA item's clue intervals merged as `rule` merges them (gap in seconds)."""
    if rule == "reference":
        return reference_merge_clues(intervals, gap)
    return merge_intervals(intervals, gap)


def answer_only_reward(rule: str, *, answer: str | None, choice: str | None, options, reference: str,
                       transcript: str = "", weights: RewardWeights = RewardWeights()) -> RewardParts:
    """R = w_ans·answer for an item without clue intervals (nothing to localise): the
    answer term of `rule` alone, as the reference scores its Video-MME split."""
    a = (reference_answer_reward(transcript, reference) if rule == "reference"
         else answer_reward(answer, choice, options, reference))
    return RewardParts(answer=a, localisation=None, repeat=None, center_distance=None,
                       total=weights.answer * a, rule=rule, answer_only=True)


def rollout_reward(rule: str, rollout: dict, weights: RewardWeights = RewardWeights()) -> RewardParts:
    """The reward of one rollout record (`train.rl`: answer, choice, options, reference, visits,
    clues, duration, width, turn_texts, results, breaches; a grounding rollout, ``"task":
    "grounding"``, has interval and targets instead of choice and reference) under `rule`.

    Grounding rollouts are scored by `grounding_reward`; the ``reference`` rule has no
    grounding task (LongVideo-R1 has none), so it refuses them (ValueError).
    """
    if rule not in REWARD_RULES:
        raise ValueError(f"unknown reward rule {rule!r} (use one of {', '.join(REWARD_RULES)})")
    clues = rollout.get("clues") or []
    if rollout.get("task") == GROUNDING:
        if rule == "reference":
            raise ValueError("the reference reward rule has no grounding task (LongVideo-R1 has none); use lvr")
        return grounding_reward(interval=rollout.get("interval"), targets=rollout.get("targets") or [],
                                visits=rollout.get("visits") or [], clues=clues, duration=rollout.get("duration"),
                                weights=weights)
    transcript = (rollout_transcript(rollout.get("turn_texts") or [], rollout.get("results") or [],
                                     rollout.get("breaches") or []) if rule == "reference" else "")
    if not clues:
        return answer_only_reward(rule, answer=rollout.get("answer"), choice=rollout.get("choice"),
                                  options=rollout.get("options"), reference=rollout.get("reference"),
                                  transcript=transcript, weights=weights)
    if rule == "reference":
        return reference_reward(transcript=transcript, reference=rollout.get("reference"), clues=clues,
                                duration=rollout.get("duration"), width=rollout.get("width"), weights=weights)
    return composite_reward(answer=rollout.get("answer"), choice=rollout.get("choice"), options=rollout.get("options"),
                            reference=rollout.get("reference"), visits=rollout.get("visits") or [], clues=clues,
                            duration=rollout.get("duration"), weights=weights)

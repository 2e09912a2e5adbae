"""The RL reward (docs/architecture.md §2.8): pure functions of one finished trajectory.

    R = w_ans·answer + w_loc·F1 − w_rep·repeat  (+ w_cd·center_distance)

with default weights 1.0, 1.0, 0.2 and 0.0 (the Center-Distance term from
LongVTG-R1 is an option, off by default). Every part is returned separately
(`RewardParts`) so it can be logged.

Visits are the executed tool calls of a trajectory, either
`infer.environment.Visit` objects or their JSONL records (dicts with `tool`,
`node`, `start`, `end` and, for video_qa, `query`). Tool calls that broke a
rule came back as corrections and have no visit, so they count nowhere here.

Clue intervals are taken as given: callers merge them first with
`train.hints.merge_intervals` (the LongVideo-R1 5 s gap). Here they are only
unioned (gap 0), so overlapping clues are never double counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from ..infer.protocol import answer_matches, extract_choice
from .hints import merge_intervals

Interval = tuple[float, float]

CAPTION_TOOL = "get_caption"
QA_TOOL = "video_qa"


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
    if not duration or duration <= 0:
        raise ValueError(f"center_distance_reward needs a positive video duration, got {duration!r}")
    clue_centres = [_centre(c) for c in clues if float(c[1]) >= float(c[0])]
    spans = list(dict.fromkeys(caption_spans(visits)))
    if not spans or not clue_centres:
        return 0.0
    scores = [1.0 - min(1.0, min(abs(_centre(s) - c) for c in clue_centres) / duration) for s in spans]
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- composite

@dataclass(frozen=True)
class RewardWeights:
    """Weights of the composite reward; defaults are LongVideo-R1's (center distance off)."""

    answer: float = 1.0
    localisation: float = 1.0
    repeat: float = 0.2
    center_distance: float = 0.0

    def to_record(self) -> dict:
        return asdict(self)


@dataclass
class RewardParts:
    """Every part of one trajectory's reward, unweighted, and the weighted total."""

    answer: float
    localisation: float
    repeat: float
    center_distance: float
    total: float

    def to_record(self) -> dict:
        return asdict(self)


def composite_reward(*, answer: str | None, choice: str | None, options, reference: str,
                     visits: Sequence[Any], clues: Iterable[Sequence[float]],
                     duration: float | None = None,
                     weights: RewardWeights = RewardWeights()) -> RewardParts:
    """R = w_ans·answer + w_loc·F1 − w_rep·repeat + w_cd·center_distance.

    Parts: `answer_reward`, `localisation_f1`, `repeat_penalty` and
    `center_distance_reward` (computed when `duration` is given, else 0;
    a non-zero center-distance weight requires it). With no tool calls
    F1 = repeat = center_distance = 0, so R is just w_ans·answer.
    Clues must already be merged (`train.hints.merge_intervals`).
    """
    visits = list(visits)
    clues = [tuple(c) for c in clues]
    a = answer_reward(answer, choice, options, reference)
    f1 = localisation_f1(visits, clues)
    rep = repeat_penalty(visits)
    if duration is not None and duration > 0:
        cd = center_distance_reward(visits, clues, duration)
    elif weights.center_distance:
        raise ValueError("a center-distance weight needs the video duration")
    else:
        cd = 0.0
    total = (weights.answer * a + weights.localisation * f1 - weights.repeat * rep
             + weights.center_distance * cd)
    return RewardParts(answer=a, localisation=f1, repeat=rep, center_distance=cd, total=total)

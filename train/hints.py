"""The LongVideo-R1 hint schedule for teacher trajectories, and the clue geometry it needs.

After a wrong answer the turn is dropped and a hint is shown:
1. the ids of the high nodes that cover the clue;
2. the (high, medium) ids that cover it;
3. a nudge to verify the captions with video_qa;
after that the item is given up. Clue intervals less than `gap` seconds
apart are merged first.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..infer.protocol import format_id

HINT_PREFIX = "Hint:"
MAX_HINTS = 3
CLUE_GAP_S = 5.0

Interval = tuple[float, float]


def merge_intervals(intervals: Iterable[Sequence[float]], gap: float = CLUE_GAP_S) -> list[Interval]:
    """Sort and merge intervals that overlap or lie less than `gap` seconds apart.

    [(0, 10), (12, 20), (30, 40)] with gap 5 -> [(0, 20), (30, 40)].
    """
    spans = sorted((float(s), float(e)) for s, e in intervals if float(e) >= float(s))
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] < gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def overlap(a: Interval, b: Interval) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def covering_ids(spans: dict[tuple[int, ...], Interval], clues: Sequence[Interval],
                 depth: int) -> list[tuple[int, ...]]:
    """Ids of the nodes at `depth` (1 high, 2 medium) whose span overlaps a clue, in tree order.

    A zero-length clue (a moment) counts for the node whose span holds it.
    """
    out = []
    for node_id, span in sorted(spans.items()):
        if len(node_id) != depth:
            continue
        for clue in clues:
            if overlap(span, clue) > 0 or (clue[0] == clue[1] and span[0] <= clue[0] < span[1]):
                out.append(node_id)
                break
    return out


def _ids(ids: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(format_id(i) for i in ids)


def hint_text(level: int, ids: Sequence[tuple[int, ...]] = ()) -> str:
    """The hint shown after the `level`-th wrong answer (1..MAX_HINTS)."""
    if level == 1:
        return (f"{HINT_PREFIX} that answer is not right. The part of the video that answers the question "
                f"lies in high-level clip{'s' if len(ids) > 1 else ''} {_ids(ids)}. Look there.")
    if level == 2:
        return (f"{HINT_PREFIX} that answer is still not right. Look in medium clip"
                f"{'s' if len(ids) > 1 else ''} {_ids(ids)}.")
    if level == 3:
        return (f"{HINT_PREFIX} that answer is still not right. Captions can miss details: check the low "
                f"clips you have read with video_qa before you answer.")
    raise ValueError(f"no hint level {level}")


def hint_for(level: int, spans: dict[tuple[int, ...], Interval], clues: Sequence[Interval]) -> tuple[str, list]:
    """(text, ids) of the hint at `level`; ids are those the clue intervals imply."""
    ids = covering_ids(spans, clues, level) if level in (1, 2) else []
    return hint_text(level, ids), ids

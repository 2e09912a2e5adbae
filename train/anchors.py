"""Which leaves a question is written from: seeded anchor slots and distractor leaves.

A slot is one numbered try at a question (or grounding query) of a kind: slot n of
a video is the same in every run with the same seed, so a rerun can skip the slots
already tried. Anchors never include two look-alike leaves, and distractor sources
are never look-alikes of an anchor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from ..prep.tree import NodeId
from .lexicon import VideoIndex


def seeded_rng(*parts: Any) -> random.Random:
    """A random stream of its own for each purpose (the parts name the seed, video or question, and what)."""
    return random.Random(":".join(str(p) for p in parts))


# The id tag of each (task, kind): ids are `<video_id>-<tag><n>`, so the kinds of both tasks never collide.
ID_TAGS = {("qa", "single"): "s", ("qa", "multi"): "m", ("grounding", "single"): "g", ("grounding", "span"): "gs"}


@dataclass
class Slot:
    index: VideoIndex
    kind: str                     # qa: single or multi; grounding: single or span
    n: int                        # the slot's number among its video's slots of this kind
    anchors: tuple[NodeId, ...]
    task: str = "qa"              # qa or grounding

    @property
    def qid(self) -> str:
        return f"{self.index.tree.video_id}-{ID_TAGS[self.task, self.kind]}{self.n}"


def single_anchor_slots(index: VideoIndex, seed: int) -> list[tuple[NodeId, ...]]:
    """Every leaf once, in a seeded order: slot n is the n-th (one anchor each)."""
    leaves = list(index.leaves)
    seeded_rng(seed, index.tree.video_id, "single").shuffle(leaves)
    return [(leaf,) for leaf in leaves]


def _distinct_draws(index: VideoIndex, count: int, draw: Callable[[], tuple[NodeId, ...]]) -> list[tuple[NodeId, ...]]:
    """Up to `count` draws from one seeded stream (`draw`), skipping any that repeats an earlier one or
    holds two look-alikes: slot n does not depend on `count`. At most 50 draws per wanted slot."""
    slots: list[tuple[NodeId, ...]] = []
    seen: set[tuple[NodeId, ...]] = set()
    for _ in range(count * 50):
        if len(slots) >= count:
            break
        key = draw()
        if key in seen or any(index.lookalike(a, b) is not None for a in key for b in key if a < b):
            continue
        seen.add(key)
        slots.append(key)
    return slots


def multi_anchor_slots(index: VideoIndex, seed: int, count: int, min_anchors: int = 2,
                       max_anchors: int = 3) -> list[tuple[NodeId, ...]]:
    """Up to `count` seeded anchor sets of 2-3 leaves under different medium nodes.

    Slot n does not depend on `count` (the draws come from one seeded stream), no
    two anchors of a set are look-alikes, and no set repeats. Anchors are in time order.
    """
    rng = seeded_rng(seed, index.tree.video_id, "multi")
    by_medium: dict[NodeId, list[NodeId]] = {}
    for leaf in index.leaves:
        by_medium.setdefault(leaf[:2], []).append(leaf)
    mediums = sorted(by_medium)
    top = min(max_anchors, len(mediums))
    if top < min_anchors:
        return []

    def draw() -> tuple[NodeId, ...]:
        n = rng.randint(min_anchors, top)
        return tuple(sorted(rng.choice(by_medium[m]) for m in rng.sample(mediums, n)))

    return _distinct_draws(index, count, draw)


def span_anchor_slots(index: VideoIndex, seed: int, count: int, min_leaves: int = 2,
                      max_leaves: int = 3) -> list[tuple[NodeId, ...]]:
    """Up to `count` seeded spans of 2-3 adjacent leaves (next to each other in time), in time order.

    A span may cross medium and high boundaries. Slot n does not depend on `count` (the
    draws come from one seeded stream), no span holds two look-alikes, and no span repeats.
    """
    rng = seeded_rng(seed, index.tree.video_id, "span")
    leaves = index.leaves                     # in time order: ids sort as their spans do
    top = min(max_leaves, len(leaves))
    if top < min_leaves:
        return []

    def draw() -> tuple[NodeId, ...]:
        n = rng.randint(min_leaves, top)
        first = rng.randrange(len(leaves) - n + 1)
        return tuple(leaves[first:first + n])

    return _distinct_draws(index, count, draw)


def distractor_leaves(slot: Slot, seed: int, count: int) -> list[NodeId]:
    """Up to `count` seeded other leaves offered to the writer as distractor sources, in time order."""
    idx = slot.index
    pool = [leaf for leaf in idx.leaves if leaf not in slot.anchors
            and all(idx.lookalike(a, leaf) is None for a in slot.anchors)]
    rng = seeded_rng(seed, slot.qid, "distractors")
    return sorted(rng.sample(pool, min(count, len(pool))))

"""Writing one candidate question for a slot: the writer's prompt, its draft, our option order.

The writer is shown the anchor leaves (and, for a multi-segment question, the high
captions and the anchors' medium captions) and a few other leaves as distractor
sources. Our code, not the model, puts the options in a seeded order, so answer
letters come out balanced.

A grounding query (`--task grounding`) is written from its anchor leaves (one, or a
span of adjacent ones) and the leaves just before and after them, which mark the
moment's edges.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..prep.lettering import LETTERS, letter_options, option_body
from ..prep.models.base import Usage
from ..prep.tree import NodeId
from . import question_prompts as prompts
from .anchors import Slot, distractor_leaves, seeded_rng
from .question_replies import N_OPTIONS, Draft, JsonAsker, check_draft, check_query


@dataclass
class Candidate:
    slot: Slot
    draft: Draft
    options: tuple[str, ...]       # "A. text", ...
    answer: str                    # the letter
    sources: dict[str, NodeId | None]   # distractor letter -> the leaf it was declared from

    @property
    def texts(self) -> list[str]:
        return [option_body(o, i) for i, o in enumerate(self.options)]


def _seed_int(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


async def write_candidate(asker: JsonAsker, slot: Slot, usage: Usage, *, seed: int, temperature: float,
                          distractor_count: int) -> Candidate:
    """Ask the writer for a question on the slot's anchors; raises QuestionFailed."""
    tree = slot.index.tree
    others = [tree.clip(i) for i in distractor_leaves(slot, seed, distractor_count)]
    if slot.kind == "single":
        messages = prompts.single_writer_messages(tree.duration, tree.clip(slot.anchors[0]), others)
    else:
        mediums = sorted({a[:2] for a in slot.anchors})
        highs = [(h,) for h in range(1, tree.k + 1)]
        messages = prompts.multi_writer_messages(tree.duration, [tree.clip(h) for h in highs],
                                                 [tree.clip(m) for m in mediums],
                                                 [tree.clip(a) for a in slot.anchors], others)
    draft = await asker.ask_json(messages, lambda obj: check_draft(obj, tree.k), usage,
                                 temperature=temperature, seed=_seed_int(seed, slot.qid), what="writing")
    # Our seeded order, not the writer's: answer letters come out balanced.
    pos = seeded_rng(seed, slot.qid, "letters").randrange(N_OPTIONS)
    texts = [t for t, _ in draft.distractors]
    texts.insert(pos, draft.answer)
    options = letter_options(texts)
    sources: dict[str, NodeId | None] = {}
    j = 0
    for i in range(N_OPTIONS):
        if i != pos:
            sources[LETTERS[i]] = draft.distractors[j][1]
            j += 1
    return Candidate(slot, draft, options, LETTERS[pos], sources)


@dataclass
class GroundingCandidate:
    slot: Slot
    query: str


async def write_grounding_candidate(asker: JsonAsker, slot: Slot, usage: Usage, *, seed: int,
                                    temperature: float) -> GroundingCandidate:
    """Ask the writer for a grounding query on the slot's anchors; raises QuestionFailed."""
    tree = slot.index.tree
    leaves = slot.index.leaves
    first, last = leaves.index(slot.anchors[0]), leaves.index(slot.anchors[-1])
    before = tree.clip(leaves[first - 1]) if first > 0 else None
    after = tree.clip(leaves[last + 1]) if last + 1 < len(leaves) else None
    messages = prompts.grounding_writer_messages(tree.duration, [tree.clip(a) for a in slot.anchors], before, after)
    query = await asker.ask_json(messages, check_query, usage, temperature=temperature,
                                 seed=_seed_int(seed, slot.qid), what="writing")
    return GroundingCandidate(slot, query)

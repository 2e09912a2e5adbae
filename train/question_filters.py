"""The filters a candidate question must pass, each giving a verdict and its reason.

In FILTERS order (the exact definitions are in docs/questions.md):

1. ``lookalike``: no two anchors are near-duplicates, and no distractor comes from a
   near-duplicate of an anchor (TF-IDF cosine of the leaves' captions);
2. ``no_leak``: the model, given the question and options only, must not answer right;
3. ``answerable``: the model, given the anchors' captions only, must answer right;
4. ``needs_all_anchors`` (multi only): no single anchor's caption is enough;
5. ``specificity``: no non-anchor leaf's caption alone is enough, checked on the
   near-duplicates of the anchors and the top-k lexically most similar other leaves.

The model's checks always run at temperature 0.

A grounding query (`--task grounding`) passes GROUNDING_FILTERS: ``lookalike`` (no two
anchors of a span are near-duplicates; the anchors' near-duplicates are recorded),
``answerable`` (the model says the query fits the anchors' captions) and
``specificity`` (the model says it fits none of the checked non-anchor leaves alone).
It has no options, so there is no ``no_leak`` filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from ..infer.protocol import format_id
from ..prep.lettering import LETTERS, letter_options
from ..prep.models.base import Usage
from ..prep.tree import NodeId
from . import question_prompts as prompts
from .lexicon import STOPWORDS, VideoIndex, words
from .question_replies import N_OPTIONS, JsonAsker
from .question_writer import Candidate, GroundingCandidate

FILTERS = ("lookalike", "no_leak", "answerable", "needs_all_anchors", "specificity")
GROUNDING_FILTERS = ("lookalike", "answerable", "specificity")


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


def anchor_pair_verdict(idx: VideoIndex, anchors: Sequence[NodeId]) -> Verdict | None:
    """The lookalike failure of two anchors that are near-duplicates, or None."""
    for a in anchors:
        for b in anchors:
            s = idx.lookalike(a, b) if a < b else None
            if s is not None:
                return Verdict("lookalike", "fail", f"look-alike: anchors {format_id(a)} and {format_id(b)} "
                               f"are near-duplicates (cosine {s:.2f})", {"pair": [list(a), list(b)]})
    return None


def specificity_leaves(idx: VideoIndex, anchors: Sequence[NodeId], text: str,
                       k: int) -> list[tuple[NodeId, float, bool]]:
    """(leaf, lexical score, is a look-alike of an anchor) to check: the anchors' look-alikes
    (highest cosine first, at most k), then the k non-anchor leaves whose captions are most
    similar to `text` (TF-IDF cosine; leaves sharing no word with it are left out)."""
    near = idx.near_duplicates(anchors)
    scores = idx.lexicon.scores(text)
    by_leaf = {leaf: float(scores[i]) for i, leaf in enumerate(idx.leaves)}
    out = [(b, round(by_leaf[b], 4), True) for b in sorted(near, key=lambda b: (-near[b][1], b))[:k]]
    ranked = sorted((leaf for leaf in idx.leaves if leaf not in anchors and leaf not in near
                     and by_leaf[leaf] > 0), key=lambda leaf: (-by_leaf[leaf], leaf))
    out += [(leaf, round(by_leaf[leaf], 4), False) for leaf in ranked[:k]]
    return out


async def specificity_verdict(idx: VideoIndex, anchors: Sequence[NodeId], checked: list[tuple[NodeId, float, bool]],
                              enough: Callable[[NodeId], Awaitable[bool]], *, hit: str, miss: str,
                              nothing: str) -> Verdict:
    """Ask `enough(leaf)` of each checked leaf in order; the first yes fails the filter.

    The reasons read `{hit} non-anchor leaf X alone`, or for a look-alike of an anchor
    `look-alike: {hit} leaf X alone, a near-duplicate of anchor A (cosine s)`; a pass reads
    `{miss} the N most similar other leaves alone (...)`, or `nothing` when none was checked.
    """
    tree = idx.tree
    details: dict = {"checked": [{"leaf": list(leaf), "score": s, "lookalike": look} for leaf, s, look in checked]}
    for leaf, _, look in checked:
        if not await enough(leaf):
            continue
        details["leaf"] = list(leaf)
        if look:
            a, s = idx.near_duplicates(anchors)[leaf]
            details["pair"] = [list(a), list(leaf)]
            return Verdict("specificity", "fail", f"look-alike: {hit} leaf {tree.where(leaf)} alone, "
                           f"a near-duplicate of anchor {format_id(a)} (cosine {s:.2f})", details)
        return Verdict("specificity", "fail", f"{hit} non-anchor leaf {tree.where(leaf)} alone", details)
    if not checked:
        return Verdict("specificity", "pass", nothing, details)
    return Verdict("specificity", "pass", f"{miss} the {len(checked)} most similar other leaves alone "
                   f"({', '.join(format_id(leaf) for leaf, _, _ in checked)})", details)


async def run_filters(names: Sequence[str], checks: dict[str, Callable[[], "Verdict | Awaitable[Verdict]"]]
                      ) -> list[Verdict]:
    """Every filter of `names` in order; after one fails, the rest are recorded as skipped."""
    verdicts: list[Verdict] = []
    failed = None
    for name in names:
        if failed is not None:
            verdicts.append(Verdict(name, "skipped", f"not checked: the {failed} filter failed"))
            continue
        v = checks[name]()
        if not isinstance(v, Verdict):
            v = await v
        verdicts.append(v)
        if v.verdict == "fail":
            failed = name
    return verdicts


class QuestionFilters:
    """The filters, asking their questions through one model."""

    def __init__(self, asker: JsonAsker, *, leak_tries: int, specificity_k: int):
        self.asker = asker
        self.leak_tries = leak_tries
        self.specificity_k = specificity_k

    def lookalike(self, c: Candidate) -> Verdict:
        idx, anchors = c.slot.index, c.slot.anchors
        tree = idx.tree
        pair = anchor_pair_verdict(idx, anchors)
        if pair is not None:
            return pair
        near = idx.near_duplicates(anchors)
        for letter, leaf in c.sources.items():
            if leaf is not None and leaf in near:
                a, s = near[leaf]
                return Verdict("lookalike", "fail",
                               f"look-alike: distractor {letter} is drawn from leaf {tree.where(leaf)}, a "
                               f"near-duplicate of anchor {format_id(a)} (cosine {s:.2f})",
                               {"pair": [list(a), list(leaf)], "distractor": letter, "declared": True})
        texts = dict(zip(LETTERS, c.texts))
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

    async def no_leak(self, c: Candidate, usage: Usage) -> Verdict:
        texts = c.texts
        right = LETTERS.index(c.answer)
        picks = []
        for t in range(self.leak_tries):
            shift = t % N_OPTIONS
            rotated = texts[shift:] + texts[:shift]
            options = letter_options(rotated)
            key = LETTERS[(right - shift) % N_OPTIONS]
            choice = await self.asker.choose(prompts.blind_messages(c.draft.question, options), options, usage,
                                             "no-leak check")
            picks.append(choice == key)
            if choice != key:
                break
        if all(picks) and len(picks) == self.leak_tries:
            return Verdict("no_leak", "fail", f"answerable without the video: the model chose the right answer "
                           f"with no captions ({len(picks)} of {self.leak_tries} tries)")
        return Verdict("no_leak", "pass", "the model did not find the answer without captions")

    async def answerable(self, c: Candidate, usage: Usage) -> Verdict:
        tree = c.slot.index.tree
        choice = await self.asker.choose(prompts.answer_messages(c.draft.question, c.options,
                                                                 [tree.clip(a) for a in c.slot.anchors]),
                                         c.options, usage, "answerable check")
        if choice == c.answer:
            return Verdict("answerable", "pass", "answered right from its anchors' captions")
        said = choice or "none"
        return Verdict("answerable", "fail", f"not answerable from its anchors' captions (the model answered "
                       f"{said}, the key is {c.answer})")

    async def needs_all_anchors(self, c: Candidate, usage: Usage) -> Verdict:
        tree = c.slot.index.tree
        for a in c.slot.anchors:
            choice = await self.asker.choose(prompts.answer_messages(c.draft.question, c.options, [tree.clip(a)]),
                                             c.options, usage, "needs-all-anchors check")
            if choice == c.answer:
                return Verdict("needs_all_anchors", "fail", f"answerable from anchor {tree.where(a)} alone; "
                               f"a multi-segment question must need all its anchors", {"leaf": list(a)})
        return Verdict("needs_all_anchors", "pass", "no single anchor is enough")

    def specificity_candidates(self, c: Candidate) -> list[tuple[NodeId, float, bool]]:
        """(leaf, lexical score, is a look-alike of an anchor): look-alikes first, then the top-k
        similar to the question plus its right answer."""
        return specificity_leaves(c.slot.index, c.slot.anchors, f"{c.draft.question} {c.draft.answer}",
                                  self.specificity_k)

    async def specificity(self, c: Candidate, usage: Usage) -> Verdict:
        tree = c.slot.index.tree

        async def enough(leaf: NodeId) -> bool:
            choice = await self.asker.choose(prompts.answer_messages(c.draft.question, c.options, [tree.clip(leaf)]),
                                             c.options, usage, "specificity check")
            return choice == c.answer

        return await specificity_verdict(c.slot.index, c.slot.anchors, self.specificity_candidates(c), enough,
                                         hit="answerable from", miss="not answerable from any of",
                                         nothing="no other leaf shares a word with the question and its answer")

    async def run(self, c: Candidate, usage: Usage) -> list[Verdict]:
        """Every filter in FILTERS order; after one fails, the rest are recorded as skipped."""
        checks = {"lookalike": lambda: self.lookalike(c), "no_leak": lambda: self.no_leak(c, usage),
                  "answerable": lambda: self.answerable(c, usage),
                  "needs_all_anchors": lambda: self.needs_all_anchors(c, usage),
                  "specificity": lambda: self.specificity(c, usage)}
        names = [n for n in FILTERS if n != "needs_all_anchors" or c.slot.kind == "multi"]
        return await run_filters(names, checks)


class GroundingFilters:
    """The filters of a grounding query (GROUNDING_FILTERS), asking through one model."""

    def __init__(self, asker: JsonAsker, *, specificity_k: int):
        self.asker = asker
        self.specificity_k = specificity_k

    def lookalike(self, c: GroundingCandidate) -> Verdict:
        idx, anchors = c.slot.index, c.slot.anchors
        pair = anchor_pair_verdict(idx, anchors)
        if pair is not None:
            return pair
        near = idx.near_duplicates(anchors)
        if not near:
            return Verdict("lookalike", "pass", "the anchors have no near-duplicate leaves")
        details = {"lookalikes": [{"anchor": list(a), "leaf": list(b), "cosine": s}
                                  for b, (a, s) in sorted(near.items())]}
        return Verdict("lookalike", "pass", f"the anchors' {len(near)} near-duplicate leaves "
                       f"({', '.join(format_id(b) for b in sorted(near))}) are checked first for specificity",
                       details)

    async def answerable(self, c: GroundingCandidate, usage: Usage) -> Verdict:
        tree = c.slot.index.tree
        clips = [tree.clip(a) for a in c.slot.anchors]
        if await self.asker.fits(prompts.fits_messages(c.query, clips), usage, "answerable check"):
            return Verdict("answerable", "pass", "the model says the query fits its anchors' captions")
        return Verdict("answerable", "fail", "the model says the query does not fit its anchors' captions")

    async def specificity(self, c: GroundingCandidate, usage: Usage) -> Verdict:
        idx, anchors = c.slot.index, c.slot.anchors

        async def enough(leaf: NodeId) -> bool:
            return await self.asker.fits(prompts.fits_messages(c.query, [idx.tree.clip(leaf)]), usage,
                                         "specificity check")

        checked = specificity_leaves(idx, anchors, c.query, self.specificity_k)
        return await specificity_verdict(idx, anchors, checked, enough, hit="the query also fits",
                                         miss="the query fits none of",
                                         nothing="no other leaf shares a word with the query")

    async def run(self, c: GroundingCandidate, usage: Usage) -> list[Verdict]:
        """Every filter in GROUNDING_FILTERS order; after one fails, the rest are recorded as skipped."""
        return await run_filters(GROUNDING_FILTERS, {"lookalike": lambda: self.lookalike(c),
                                                     "answerable": lambda: self.answerable(c, usage),
                                                     "specificity": lambda: self.specificity(c, usage)})

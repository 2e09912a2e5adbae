"""Lexical similarity of one video's leaf captions: TF-IDF vectors and look-alike leaves.

Two leaves are look-alikes (near-duplicates) when the cosine of their captions'
vectors reaches a threshold; `lvr questions` keeps them apart as anchors and as
distractor sources, and ranks the other leaves a question is checked against.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..prep.tree import NodeId
from .caption_trees import CaptionTree

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

    def near_duplicates(self, anchors: Sequence[NodeId]) -> dict[NodeId, tuple[NodeId, float]]:
        """The non-anchor look-alikes of the anchors: leaf -> (the anchor it is closest to, cosine)."""
        near: dict[NodeId, tuple[NodeId, float]] = {}
        for a in anchors:
            for b, s in self.lookalikes.get(a, {}).items():
                if b not in anchors and s > near.get(b, (a, -1.0))[1]:
                    near[b] = (a, s)
        return near


def lookalike_pairs(index: VideoIndex) -> list[tuple[NodeId, NodeId, float]]:
    return sorted({(min(a, b), max(a, b), s) for a, near in index.lookalikes.items() for b, s in near.items()})

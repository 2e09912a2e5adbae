"""Option letters, defined once: labels, lettered option lists, and reading a chosen letter.

Options are stored as ``"A. text"``, ``"B. text"``, ... and the letter of an
option is its position: the first is A. A *label* is how a source may write the
letter in front of an option: ``A. text``, ``A) text``, ``A: text`` (also the
full-width colon), ``(A) text``, ``[A] text``, in either case.

Two readers of a chosen letter, for two kinds of input:

- `answer_key`: the correct answer of a question file (``"C"``, ``"(c)"``,
  ``"C. a laptop"``, or the option's text): strict, a ValueError says why not;
- `chosen_letter`: a model's free answer (``"The answer is C"``, ``"a cup."``):
  lenient, None when it picks no single option.
"""

from __future__ import annotations

import re
from typing import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_LABEL = re.compile(r"^\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):：])(\s*)(.*)$", re.S)


def split_label(text: str, letter: str | None = None) -> tuple[str, str] | None:
    """``"(B) a dog"`` -> ``("B", "a dog")``; None when `text` carries no label.

    With `letter` (the letter expected at this position) only that letter counts and
    the text may follow at once (``"B.a dog"``). Without it any letter counts, but a
    space must follow, so ``"U.S. troops"`` or ``"e.g. a dog"`` carry no label.
    """
    m = _LABEL.match(text)
    if not m:
        return None
    found = (m.group(1) or m.group(2) or m.group(3)).upper()
    if letter is not None and found != letter:
        return None
    if letter is None and not m.group(4) and m.group(5):
        return None
    return found, m.group(5).strip()


def option_body(option: str, index: int) -> str:
    """The text of the option at `index`, without its label."""
    label = split_label(option, LETTERS[index]) if index < len(LETTERS) else None
    return label[1] if label else option.strip()


def letter_options(texts: Sequence[str]) -> tuple[str, ...]:
    """``["a cat", "a dog"]`` -> ``("A. a cat", "B. a dog")``."""
    if len(texts) > len(LETTERS):
        raise ValueError(f"{len(texts)} options; at most {len(LETTERS)}")
    return tuple(f"{LETTERS[i]}. {t.strip()}" for i, t in enumerate(texts))


def normalize_options(options: Sequence[str], *, fill: bool = False) -> tuple[str, ...]:
    """Options as ``("A. text", "B. text", ...)``.

    When every option carries its own letter in order, the labels are rewritten
    (``"(A) x"`` -> ``"A. x"``); when none does, letters are added. Options
    lettered only in part are a ValueError, unless `fill`: then an option carrying
    its letter is kept as written and the others get theirs (``lvr ask --option``).
    Also a ValueError: not a list of strings, an empty option, more than 26.
    """
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise ValueError("options must be a list of strings")
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options; at most {len(LETTERS)}")
    for i, o in enumerate(options):
        if not isinstance(o, str):
            raise ValueError(f"option {LETTERS[i]} must be text, got {type(o).__name__}")
    labels = [split_label(o, LETTERS[i]) for i, o in enumerate(options)]
    rewrite = bool(labels) and all(labels)
    if any(labels) and not rewrite and not fill:
        raise ValueError("options are lettered only in part")
    out = []
    for i, (option, label) in enumerate(zip(options, labels)):
        body = label[1] if label else option.strip()
        if not body:
            raise ValueError(f"option {LETTERS[i]} is empty")
        out.append(option.strip() if label and not rewrite else f"{LETTERS[i]}. {body}")
    return tuple(out)


def text_matches(text: str, options: Sequence[str]) -> list[str]:
    """Letters of the options whose text is `text`: exact matches, else ignoring case."""
    bodies = [option_body(o, i) for i, o in enumerate(options)]
    hits = [LETTERS[i] for i, b in enumerate(bodies) if b == text]
    return hits or [LETTERS[i] for i, b in enumerate(bodies) if b.casefold() == text.casefold()]


def answer_key(answer: str, options: Sequence[str]) -> str:
    """The letter a question file's answer names: ``"B"``, ``"b"``, ``"(B)"``, ``"B. text"`` or the text.

    A label with text must carry that option's own text. Raises ValueError when the
    answer names no option, or its text matches several.
    """
    letters = LETTERS[: len(options)]
    text = answer.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    for i, option in enumerate(options):
        label = split_label(text, letters[i])
        if label and (not label[1] or label[1] == option_body(option, i)):
            return letters[i]
    hits = text_matches(text, options)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ValueError(f"answer {answer!r} matches {len(hits)} options")
    raise ValueError(f"answer {answer!r} is not one of the options {letters[:1]}-{letters[-1:]}")


def chosen_letter(answer: str | None, options: Sequence[str]) -> str | None:
    """The option letter a model's answer picks, or None when it picks none (or several).

    Accepts 'B', 'b', '(B)', 'B.', 'B. a cat', 'The answer is B', or the option's text.
    """
    if not answer or not options:
        return None
    letters = LETTERS[: len(options)]
    text = answer.strip()
    # The option's own text first: "A cup." names option B, not option A.
    lowered = text.lower().rstrip(".")
    bodies = [option_body(o, i).lower().rstrip(".") for i, o in enumerate(options)]
    matches = [letters[i] for i, b in enumerate(bodies) if b and b == lowered]
    if len(matches) == 1:
        return matches[0]
    bare = text.rstrip(".")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    label = split_label(text)
    if label and label[0] in letters:
        return label[0]
    m = re.search(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?(?:[.):\s]|$)", text, re.I)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    lone = set(re.findall(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])", text)) & set(letters)
    return lone.pop() if len(lone) == 1 else None

"""The tags models write their replies in, and the one set of rules for reading them.

Tags: ``<think>`` (reasoning), ``<tool>`` and ``<answer>`` (the navigator's
actions), ``<caption>`` (a captioner's reply). Tag names match in any case;
a block is ``<name>...</name>`` and its content is what lies between.

Reasoning is never read as anything else. An unclosed ``<think>`` means the
model was still thinking when its reply ended (a token limit cut it, or it never
closed the tag): everything after it is reasoning. So a truncated reply yields
no caption, no video_qa answer, no JSON and no action taken from inside its
reasoning; the navigator's protocol is built on the same rule ("actions are read
outside the reasoning"), and a turn whose action sits inside an unclosed think has
no action.
"""

from __future__ import annotations

import re

THINK, TOOL, ANSWER, CAPTION = "think", "tool", "answer", "caption"
TAGS = (THINK, TOOL, ANSWER, CAPTION)

_BLOCK = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.S | re.I) for tag in TAGS}
# Reasoning: a closed think block, or an unclosed <think> to the very end.
_THINKING = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)
_WHOLE_CAPTION = re.compile(r"<caption>(.*)</caption>", re.S | re.I)
_CAPTION_TO_END = re.compile(r"<caption>(.*?)(?:</caption>|\Z)", re.S | re.I)


def opening(tag: str) -> str:
    return f"<{tag}>"


def closing(tag: str) -> str:
    return f"</{tag}>"


def wrap(tag: str, text: str) -> str:
    return f"{opening(tag)}{text}{closing(tag)}"


def blocks(tag: str, text: str | None) -> list[str]:
    """The contents of every closed ``<tag>...</tag>`` block, in order (not stripped)."""
    return _BLOCK[tag].findall(text or "")


def block_spans(tag: str, text: str | None) -> list[tuple[int, int]]:
    """Where the content of each closed block stands in `text`: (start, end) offsets."""
    return [m.span(1) for m in _BLOCK[tag].finditer(text or "")]


def extract(tag: str, text: str | None) -> str | None:
    """The content of the first closed ``<tag>`` block, stripped; None when there is none."""
    m = _BLOCK[tag].search(text or "")
    return m.group(1).strip() if m else None


def strip_think(text: str | None) -> str:
    """`text` without its reasoning (see the module docstring for an unclosed ``<think>``)."""
    return _THINKING.sub("", text or "")


def blank_think(text: str | None) -> str:
    """`text` with its reasoning replaced by spaces, so offsets into it stay those of `text`."""
    return _THINKING.sub(lambda m: " " * len(m.group()), text or "")


def caption_text(reply: str | None) -> str:
    """A captioner's reply -> the caption, trimmed.

    Reasoning is dropped. A reply that is one ``<caption>...</caption>`` pair keeps
    everything inside it (even a literal ``</caption>``); otherwise the first block
    is taken, an unclosed ``<caption>`` running to the end (the reply was cut off
    by its token limit); a reply without the tag is the caption as a whole.
    """
    text = strip_think(reply).strip()
    whole = _WHOLE_CAPTION.fullmatch(text)
    if whole and not re.search(opening(CAPTION), whole.group(1), re.I):
        return whole.group(1).strip()
    m = _CAPTION_TO_END.search(text)
    return (m.group(1) if m else text).strip()

"""Every prompt `lvr questions` sends: question writing and the model-checked filters.

Four kinds of request, each a system prompt plus a user message built here:

- **write a single-segment question** from one anchor leaf's caption, with a few other
  leaves' captions offered as sources of distractors;
- **write a multi-segment question** from 2-3 anchor leaves (under different medium
  nodes), the high captions and the anchors' medium captions;
- **answer from captions**: a multiple-choice question answered from the given clip
  captions only, or "none" when they do not say (the answerable, needs-all-anchors and
  specificity filters);
- **answer blind**: the same with no captions at all (the no-leak filter).

And two for grounding queries (`--task grounding`):

- **write a grounding query**: one description of the moment that 1-3 adjacent anchor
  leaves show, with the leaves just before and after it for its edges;
- **does the query fit**: given some clip captions, does the query describe what they
  show (the answerable and specificity filters).

Every reply is one JSON object. `PROMPT_VERSION` and each task's prompt texts make up
`prompt_hash(task)`, recorded with every question, so a changed prompt is visible in the output.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from ..infer.protocol import format_id, format_span
from ..prep.captioning import format_time

# Bump when a user-message layout below changes: it is part of the prompt hash.
PROMPT_VERSION = "1"

WRITER_SYSTEM = """\
You write multiple-choice questions about a long video. The questions train and \
test an agent that must find the right moment in the video before it can answer. \
You never see the video, only captions of its clips, each with its id and time span.

Rules:
- The question must be answerable from the ANCHOR clip caption(s) alone, and only \
from them: not from other parts of the video, and not from common sense or general \
knowledge. Pin it to its moment with a detail that only the anchor clip(s) have \
(who, where, what happens), so it points at one moment of the video.
- Ask about what is seen or said in the video. Do not mention clip ids, time spans, \
timestamps or captions in the question or the options.
- Give one correct answer and three distractors. Keep all four short and alike in \
form and length. Each distractor must be plausible for this video and clearly wrong \
for the anchor moment.
- Prefer distractors taken from the OTHER clips listed (something that really \
appears elsewhere in the video), and say which clip each comes from; write null \
when a distractor comes from no listed clip.

Reply with one JSON object only, no other text:
{"question": "...", "answer": "...", "distractors": [{"text": "...", "from_clip": "(h, m, l)"}, \
{"text": "...", "from_clip": null}, {"text": "...", "from_clip": "(h, m, l)"}]}"""

MULTI_RULES = """\
This is a MULTI-SEGMENT question: it must need every anchor clip together, and no \
single clip may be enough to answer it. Good kinds: the order of events, a comparison \
between the moments, what changed from one to the next, a count across them, cause and \
effect. The high-level and medium-level captions are context about the whole video; \
base the answer on the anchor clips."""

ANSWER_SYSTEM = """\
You answer a multiple-choice question about a video using ONLY the clip captions \
given: you cannot see the video, and nothing outside these captions counts. If the \
captions do not clearly support exactly one option, answer "none". Do not guess.

Reply with one JSON object only, no other text: {"answer": "B"} or {"answer": "none"}."""

BLIND_SYSTEM = """\
You answer a multiple-choice question about a video that you cannot see. Use only \
the question, the options, common sense and general knowledge. If you cannot tell \
which option is right without watching the video, answer "none".

Reply with one JSON object only, no other text: {"answer": "B"} or {"answer": "none"}."""

GROUNDING_WRITER_SYSTEM = """\
You write search queries for finding moments in a long video. Each query is one \
sentence that describes what happens in one moment, the way someone would type it \
to find that moment; a model must then give the moment's start and end time. You \
never see the video, only captions of its clips, each with its id and time span.

Rules:
- Describe the MOMENT clip(s) only: what is seen or said there, with the details \
(who, where, what happens) that only this moment has, so the query fits this moment \
and no other part of the video.
- When the moment spans several clips, describe the whole of it, in order, so that \
each of its clips is part of what the query says. Do not describe the clips just \
before or after it: the moment starts with its first clip and ends with its last.
- Do not mention clip ids, time spans, timestamps or captions. Write a plain \
description (e.g. "a man in a blue coat opens the red door"), not a question.

Reply with one JSON object only, no other text: {"query": "..."}"""

FITS_SYSTEM = """\
You judge whether a description of a moment fits some video clips, using ONLY the \
clip captions given: you cannot see the video, and nothing outside these captions \
counts. Answer "yes" only if the captions clearly show everything the description \
says, and every clip given is part of the described moment; otherwise answer "no".

Reply with one JSON object only, no other text: {"answer": "yes"} or {"answer": "no"}."""

JSON_CORRECTION = ("Your reply could not be used: {reason}. Reply again with one JSON object only, "
                   "exactly in the format asked for, and no other text.")

# The prompt texts of each task (`--task`): a changed text changes that task's hash only.
_TASK_PROMPTS = {"qa": (WRITER_SYSTEM, MULTI_RULES, ANSWER_SYSTEM, BLIND_SYSTEM),
                 "grounding": (GROUNDING_WRITER_SYSTEM, FITS_SYSTEM)}


def prompt_hash(task: str = "qa") -> str:
    """Identifies every prompt text and layout `lvr questions --task TASK` uses."""
    text = "\n\x00".join([PROMPT_VERSION, *_TASK_PROMPTS[task], JSON_CORRECTION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# A clip as the prompts show it: (node id, start, end, caption).
Clip = tuple[tuple[int, ...], float, float, str]


def _clip(label: str, clip: Clip) -> str:
    node_id, start, end, caption = clip
    return f"{label} {format_id(node_id)}, {format_span(start, end)}:\n{caption.strip()}"


def _clips(label: str, clips: Sequence[Clip]) -> list[str]:
    out: list[str] = []
    for clip in clips:
        out.append(_clip(label, clip))
        out.append("")
    return out


def single_writer_messages(duration: float, anchor: Clip, others: Sequence[Clip]) -> list[dict]:
    lines = [f"The video is {format_time(duration)} long ({duration:.1f} s).", "",
             "ANCHOR clip (the question is about this moment):", _clip("Clip", anchor), ""]
    if others:
        lines += ["OTHER clips of the same video (sources of distractors):", ""] + _clips("Clip", others)
    lines.append("Write one single-segment question about the anchor clip, as one JSON object.")
    return [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def multi_writer_messages(duration: float, high: Sequence[Clip], medium: Sequence[Clip],
                          anchors: Sequence[Clip], others: Sequence[Clip]) -> list[dict]:
    lines = [f"The video is {format_time(duration)} long ({duration:.1f} s).", "",
             "High-level clips (the whole video):", ""] + _clips("Clip", high)
    lines += ["Medium-level clips that contain the anchor clips:", ""] + _clips("Clip", medium)
    lines += [f"ANCHOR clips (the question needs all {len(anchors)} of them), in time order:", ""]
    lines += _clips("Clip", anchors)
    if others:
        lines += ["OTHER clips of the same video (sources of distractors):", ""] + _clips("Clip", others)
    lines += [MULTI_RULES, "", "Write one multi-segment question about the anchor clips, as one JSON object."]
    return [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def _question_block(question: str, options: Sequence[str]) -> list[str]:
    return [f"Question: {question.strip()}", "Options:", *[o.strip() for o in options]]


def answer_messages(question: str, options: Sequence[str], clips: Sequence[Clip]) -> list[dict]:
    lines = ["Captions of the video clips you may use, in time order:", ""] + _clips("Clip", clips)
    lines += _question_block(question, options)
    lines += ["", "Answer from these captions only, as one JSON object."]
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def blind_messages(question: str, options: Sequence[str]) -> list[dict]:
    lines = _question_block(question, options) + ["", "Answer as one JSON object."]
    return [{"role": "system", "content": BLIND_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def grounding_writer_messages(duration: float, anchors: Sequence[Clip], before: Clip | None,
                              after: Clip | None) -> list[dict]:
    what = "1 clip" if len(anchors) == 1 else f"{len(anchors)} adjacent clips, in time order"
    lines = [f"The video is {format_time(duration)} long ({duration:.1f} s).", "",
             f"The MOMENT to describe ({what}):", ""] + _clips("Clip", anchors)
    if before is not None:
        lines += ["Just BEFORE the moment (not part of it):", _clip("Clip", before), ""]
    if after is not None:
        lines += ["Just AFTER the moment (not part of it):", _clip("Clip", after), ""]
    lines.append("Write one grounding query for the moment, as one JSON object.")
    return [{"role": "system", "content": GROUNDING_WRITER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def fits_messages(query: str, clips: Sequence[Clip]) -> list[dict]:
    lines = ["Captions of the video clips you may use, in time order:", ""] + _clips("Clip", clips)
    lines += [f"Moment: {query.strip()}", "",
              "Does this description fit these clips, from the captions only? Answer as one JSON object."]
    return [{"role": "system", "content": FITS_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def correction_message(reason: str) -> dict:
    return {"role": "user", "content": JSON_CORRECTION.format(reason=reason)}

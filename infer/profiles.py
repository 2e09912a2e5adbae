"""Protocol profiles: every string the navigator's conversation, video_qa and caption requests carry.

A profile is one message layout, defined once below as a frozen `Profile`:

- ``lvr`` (the default): lvr's own wording and layout.
- ``longvideo-r1``: the layout the released LongVideo-R1 checkpoints were trained and
  evaluated with, read from the reference repository ``qiujihao19/LongVideo-R1``:
  ``eval/evaluation.py`` and ``eval/utils.py`` (the conversation, the last-round
  message, the video_qa request), the verl-tool get_caption tool
  (``verl-tool/verl_tool/servers/tools/utils/caption_videoqa.py``: tool results, the
  same as evaluation's), ``cli.py`` (the same layout online) and
  ``data/videocaption_generation.py`` with ``data/constant.py`` (caption requests and
  their word limits). Where these differ, evaluation's layout is kept, since the
  paper's numbers were measured with it: a colon right before each caption, medium ids
  written ``(h,m)``, the last-round sentence of ``eval/evaluation.py``. Captions are
  shown inside ``<caption></caption>``, as they are in the released caption files the
  checkpoints read, and a clip's times are its first and last sampled frame's, to 0.1 s.

The reference's system prompts are not shipped: with ``longvideo-r1`` they come from the
files the user gives (``--system-prompt``, ``--qa-system-prompt``,
``--caption-system-prompt``), sent byte for byte (``lvr protocol extract`` writes the
navigator's from the user's copy of the released SFT data). The navigator's prompt may
hold ``{width}`` for the tree width; the captioner's ``{num_frame}`` and ``{num_words}``.

A profile changes wording and layout only. The turn parser, the corrections and the tool
rules are shared (`infer.protocol`, `infer.environment`), and every profile's layout is
part of the prompt hashes, so results and captions of two profiles never mix.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..prep.captioning import CAPTION_LAYOUT, TIME_FORMATS, CaptionError, CaptionLayout, format_time
from ..prep.captioning import DEFAULT_SYSTEM_PROMPT as DEFAULT_CAPTION_PROMPT
from ..prep.captioning import prompt_hash as caption_prompt_hash
from ..prep.models.base import Message, image_part, message_text, text_messages, text_part  # noqa: F401 (re-exported)
from ..prep.records import read_prompt_file
from ..prep.tags import ANSWER, CAPTION, extract, wrap

LVR = "lvr"
LONGVIDEO_R1 = "longvideo-r1"
LEVEL_BY_DEPTH = {1: "high", 2: "medium", 3: "low"}
PROMPT_FLAGS = {"system": "--system-prompt", "qa": "--qa-system-prompt", "caption": "--caption-system-prompt"}
PROMPT_OWNERS = {"system": "the navigator's; `lvr protocol extract SFT.json -o prompts/` writes it from your "
                           "copy of the released SFT data",
                 "qa": "the video_qa model's", "caption": "the captioner's"}

DEFAULT_SYSTEM_PROMPT = """\
You answer questions about a long video that you cannot watch. You explore it \
through captions instead, arranged as a tree: the video is cut into {K} \
high-level clips, each high clip into {K} medium clips, and each medium clip \
into {K} low-level clips. Clips are named by their position in the tree, \
counting from 1: (h,) is a high clip, (h, m) a medium clip inside it, and \
(h, m, l) a low clip inside that. The first message gives you the question \
and the captions of all {K} high clips with their time spans.

You can use these tools, one per turn:
- get_caption((h, m)) returns the caption of a medium clip.
- get_caption((h, m, l)) returns the caption of a low clip.
- video_qa((h, m, l), "question") shows the frames of a low clip to a vision \
model and returns its answer to your question. You may use it on a low clip \
only after you have read that clip's caption.

Every index is a whole number from 1 to {K}. Read the high captions, reason \
about where the answer most likely is, and go down the tree toward it. Fetch \
only what you need: every call costs time. When you know enough, answer.

Format every reply exactly like this: first your reasoning inside \
<think></think>, then exactly one of
<tool>get_caption((2, 3))</tool>
<answer>your final answer</answer>
For a multiple-choice question, answer with the letter of the chosen option."""

DEFAULT_QA_SYSTEM_PROMPT = """\
You look at frames from a short clip of a video and answer one question about \
them. Answer from what the frames show, briefly and concretely; name the \
timestamp when it helps. If the frames do not show the answer, say so plainly \
instead of guessing."""

GROUNDING_NOTE = """

This question is a grounding query: it describes a moment, and you must find \
when it happens. Go down the tree to the clips that show it, then answer with \
its time interval in seconds from the start of the video, the start first, \
exactly like <answer>[754.5, 790]</answer>. Spans and timestamps in the \
messages are written [h:]mm:ss (01:15.2 is 75.2 seconds, 1:02:05.5 is 3725.5)."""

LAST_ROUND_NOTICE = ("This is your last turn. Tools are no longer available: give your final answer "
                     "now, inside <answer></answer>.")


def format_id(node_id) -> str:
    """(2, 3) -> '(2, 3)'; (2,) -> '(2,)'."""
    ids = tuple(node_id)
    return f"({ids[0]},)" if len(ids) == 1 else "(" + ", ".join(str(i) for i in ids) + ")"


def format_span(start: float, end: float) -> str:
    return f"{format_time(start)}-{format_time(end)}"


def _template_pattern(template: str) -> "re.Pattern[str]":
    """A str.format template as a regex: its literal text as written, {index} a number, any other
    field any text within a line."""
    parts = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(r"\d+" if name == "index" else ".*?")
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Prompts:
    """The three system prompts one run sends, as loaded from the defaults or the user's files."""

    system: str       # the navigator's template (the profile's width field is filled in per video)
    caption: str
    qa: str


@dataclass(frozen=True)
class Profile:
    """One message layout. Templates are filled with str.format; the fields each gets are listed."""

    name: str
    layout_version: str             # with the navigator's system prompt, its prompt hash
    qa_layout: str                  # with the video_qa system prompt, its hash ("" for lvr's own)
    # -- system prompts: the text shipped, or None when the user must give a file
    system_prompt: str | None
    qa_system_prompt: str | None
    caption_system_prompt: str | None
    width_field: str                # what the tree width K replaces in the navigator's system prompt
    verbatim_prompts: bool          # prompt files are sent byte for byte (else trimmed)
    # -- how clips and times are written
    times: str                      # a key of prep.captioning.TIME_FORMATS: "clock" 01:15.2, "seconds" 75.2
    spans_from_frames: bool         # a clip runs from its first to its last sampled frame (else its node span)
    compact_ids: bool               # (2,3) instead of (2, 3)
    captions_tagged: bool           # captions shown inside <caption></caption>
    # -- a grounding query (the interval answer kind): a note after the system prompt, the query block
    grounding_note: str
    grounding_question: str         # {question}
    # -- ground-then-answer: a question worded as the grounding stage's query, and the options
    #    appended to the question sent with the grounded span's frames
    gta_query: str                  # {question}
    span_options: str               # {options} (one per line)
    # -- the first user message: the question block, the duration, one block per high clip
    question: str                   # {question}
    options: str                    # {options} (one per line), appended to the question block when given
    duration: str                   # {duration} (float), {seconds}, {clock}, {count}
    high_caption: str               # {index}, {id}, {span}, {start}, {end}, {caption}
    parts: bool                     # blocks and appended texts (hints) are separate text parts
    separator: str                  # between blocks, and before appended texts, when not `parts`
    # -- tool results
    caption_result: str             # {level}, {Level}, {id}, {span}, {start}, {end}, {text}
    qa_result: str                  # {id}, {span}, {start}, {end}, {query}, {text}
    # -- the last round
    last_round: str
    last_round_alone: bool          # a user message of its own (else appended to the last user message)
    # -- video_qa requests: [intro] [question] (label, frame)... [question]
    qa_intro: str | None            # {count}, {start}, {end}
    qa_frame_label: str             # {time}
    qa_question: str                # {query}
    qa_question_first: bool
    qa_answer_tag: str | None       # the answer is this tag's content when the reply has one
    # -- caption requests
    caption_layout: CaptionLayout

    # -- ids, times, captions

    def clip_id(self, node_id) -> str:
        return "(" + ",".join(str(i) for i in node_id) + ")" if self.compact_ids else format_id(node_id)

    def time(self, seconds: float) -> str:
        return TIME_FORMATS[self.times](seconds)

    def span(self, node: dict) -> tuple[float, float]:
        """The times a clip is shown with: its node span, or its first and last sampled frame."""
        times = node.get("frame_times") or []
        if self.spans_from_frames and times:
            return float(times[0]), float(times[-1])
        return float(node["start"]), float(node["end"])

    def shown_caption(self, text: str) -> str:
        return wrap(CAPTION, text.strip()) if self.captions_tagged else text.strip()

    # -- the conversation

    def system_message(self, template: str, k: int, grounding: bool = False) -> str:
        """The navigator's system prompt for a tree of width k; a grounding query adds the note that
        says so and how to answer it."""
        # str.replace, not str.format: a user's prompt file may hold other braces.
        text = template.replace(self.width_field, str(k))
        return text + self.grounding_note if grounding else text

    def first_user_content(self, question: str, options, duration: float,
                           high: list[tuple[tuple[int, ...], float, float, str]],
                           grounding: bool = False) -> "str | list[dict]":
        """Question (or grounding query), options, duration and the K high captions with their times."""
        head = (self.grounding_question if grounding else self.question).format(question=question.strip())
        if options:
            head += self.options.format(options="\n".join(o.strip() for o in options))
        blocks = [head, self.duration.format(duration=duration, seconds=TIME_FORMATS["seconds"](duration),
                                             clock=format_time(duration), count=len(high))]
        for index, (node_id, start, end, caption) in enumerate(high, 1):
            blocks.append(self.high_caption.format(index=index, id=self.clip_id(node_id),
                                                   span=self._span_text(start, end), start=self.time(start),
                                                   end=self.time(end), caption=self.shown_caption(caption)))
        return [text_part(b) for b in blocks] if self.parts else self.separator.join(blocks)

    def high_caption_count(self, text: str) -> int:
        """How many high-level captions a first user turn in this layout holds (the tree width K),
        found with `high_caption` itself, so the layout is written in one place."""
        return len(_template_pattern(self.high_caption).findall(text))

    def tool_result(self, tool: str, node_id, start: float, end: float, text: str,
                    query: str | None = None) -> str:
        """What the model reads back after a tool call."""
        shown = dict(id=self.clip_id(node_id), span=self._span_text(start, end), start=self.time(start),
                     end=self.time(end))
        if tool == "video_qa":
            return self.qa_result.format(query=query, text=text.strip(), **shown)
        level = LEVEL_BY_DEPTH.get(len(tuple(node_id)), "?")
        return self.caption_result.format(level=level, Level=level.capitalize(), text=self.shown_caption(text),
                                          **shown)

    def append_text(self, content, text: str):
        """A user message's content with `text` added (a hint): as a part, or after the separator."""
        if self.parts:
            return (list(content) if isinstance(content, list) else [text_part(content)]) + [text_part(text)]
        return f"{content}{self.separator}{text}"

    def remove_text(self, content, text: str):
        """The inverse of `append_text`."""
        if isinstance(content, list):
            kept = list(content)
            if text_part(text) in kept:
                kept.remove(text_part(text))
            return kept[0]["text"] if len(kept) == 1 else kept
        return content.replace(f"{self.separator}{text}", "", 1)

    def add_last_round(self, messages: list[Message]) -> None:
        """Tell the model, in place, that this turn must answer."""
        if self.last_round_alone:
            messages.append({"role": "user", "content": self.last_round})
        else:
            last = messages[-1]
            messages[-1] = {**last, "content": f"{last['content']}{self.separator}{self.last_round}"}

    def _span_text(self, start: float, end: float) -> str:
        return f"{self.time(start)}-{self.time(end)}"

    # -- video_qa requests

    def video_qa_messages(self, node: dict, frames: list[bytes], times: list[float], query: str,
                          system_prompt: str) -> list[Message]:
        parts: list[dict] = []
        if self.qa_intro is not None:
            parts.append(text_part(self.qa_intro.format(count=len(frames), start=self.time(node["start"]),
                                                        end=self.time(node["end"]))))
        question = text_part(self.qa_question.format(query=query))
        if self.qa_question_first:
            parts.append(question)
        for t, jpeg in zip(times, frames):
            parts.append(text_part(self.qa_frame_label.format(time=self.time(t))))
            parts.append(image_part(jpeg))
        if not self.qa_question_first:
            parts.append(question)
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": parts}]

    def span_query(self, question: str, options) -> str:
        """What the video_qa model is asked about a grounded span's frames: the question, and its options
        with the request to pick one (ground-then-answer)."""
        query = question.strip()
        return query + self.span_options.format(options="\n".join(o.strip() for o in options)) if options else query

    def video_qa_answer(self, text: str) -> str:
        """The answer in a video_qa reply without its reasoning: inside the answer tag when there is one."""
        tagged = extract(self.qa_answer_tag, text) if self.qa_answer_tag else None
        return tagged if tagged is not None else text.strip()

    # -- prompts and their hashes

    def missing_prompts(self, system: "Path | None", caption: "Path | None", qa: "Path | None") -> list[str]:
        """The prompt roles this profile needs a file for and was not given one."""
        given = {"system": (system, self.system_prompt), "caption": (caption, self.caption_system_prompt),
                 "qa": (qa, self.qa_system_prompt)}
        return [role for role, (path, default) in given.items() if path is None and default is None]

    def check_prompt_files(self, system: "Path | None", caption: "Path | None", qa: "Path | None") -> None:
        """ValueError, one line naming each missing flag, when a needed prompt file is not given."""
        missing = self.missing_prompts(system, caption, qa)
        if missing:
            wanted = "; ".join(f"{PROMPT_FLAGS[r]} FILE ({PROMPT_OWNERS[r]})" for r in missing)
            raise ValueError(f"--protocol {self.name} takes its system prompts from files, and these are "
                             f"missing: {wanted}")

    def load_prompts(self, system: "Path | None", caption: "Path | None", qa: "Path | None") -> Prompts:
        """The three system prompts (ValueError or CaptionError naming a missing or unusable file)."""
        self.check_prompt_files(system, caption, qa)
        return Prompts(system=self._read(system, self.system_prompt),
                       caption=self._read(caption, self.caption_system_prompt, CaptionError),
                       qa=self._read(qa, self.qa_system_prompt))

    def _read(self, path, default: str | None, error: type[Exception] = ValueError) -> str:
        return read_prompt_file(path, default or "", error, strip=not self.verbatim_prompts)

    def prompt_hash(self, template: str) -> str:
        """Identifies the navigator's system prompt template together with the message layouts."""
        return hashlib.sha256(f"{self.layout_version}\n{template}".encode()).hexdigest()[:16]

    def qa_prompt_hash(self, prompt: str) -> str:
        head = f"{self.qa_layout}\n" if self.qa_layout else ""
        return hashlib.sha256(f"{head}{prompt}".encode()).hexdigest()[:16]

    def caption_prompt_hash(self, prompt: str) -> str:
        return caption_prompt_hash(prompt, self.caption_layout)


LVR_PROFILE = Profile(
    name=LVR, layout_version="1", qa_layout="",
    system_prompt=DEFAULT_SYSTEM_PROMPT, qa_system_prompt=DEFAULT_QA_SYSTEM_PROMPT,
    caption_system_prompt=DEFAULT_CAPTION_PROMPT, width_field="{K}", verbatim_prompts=False,
    times="clock", spans_from_frames=False, compact_ids=False, captions_tagged=False,
    grounding_note=GROUNDING_NOTE, grounding_question="Find when this happens in the video: {question}",
    gta_query='the moment that shows the answer to the question "{question}"',
    span_options="\nOptions:\n{options}\nAnswer with the letter of the correct option.",
    question="Question: {question}", options="\nOptions:\n{options}",
    duration="The video is {clock} long ({duration:.1f} s). Captions of its {count} high-level clips:",
    high_caption="Clip {id}, {span}:\n{caption}", parts=False, separator="\n\n",
    caption_result="get_caption: caption of {level} clip {id}, {span}:\n{text}",
    qa_result="video_qa on low clip {id}, {span}. Question: {query}\nAnswer:\n{text}",
    last_round=LAST_ROUND_NOTICE, last_round_alone=False,
    qa_intro="{count} frames from a clip of a video, {start} to {end}, each preceded by its timestamp.",
    qa_frame_label="[{time}]", qa_question="Question: {query}", qa_question_first=False, qa_answer_tag=None,
    caption_layout=CAPTION_LAYOUT)

LONGVIDEO_R1_PROFILE = Profile(
    name=LONGVIDEO_R1, layout_version="longvideo-r1/1", qa_layout="longvideo-r1/1",
    system_prompt=None, qa_system_prompt=None, caption_system_prompt=None, width_field="{width}",
    verbatim_prompts=True,
    times="seconds", spans_from_frames=True, compact_ids=True, captions_tagged=True,
    grounding_note=("\nThis question asks for a time span of the video. Answer with its start and end in "
                    "seconds, like <answer>[754.5, 790.0]</answer>."),
    grounding_question="Find the time span of the video where this happens: {question}\n",
    gta_query='the moment that shows the answer to the question "{question}"',
    span_options="\n{options}\nAnswer with the option's letter.",
    question="{question}\n", options="{options}\n",
    duration="The total duration of the video is {seconds} seconds.",
    high_caption="High-level Caption {index} from {start} to {end}:{caption}", parts=True, separator="\n",
    caption_result="{Level}-level Caption from tool get_caption({id}). From {start} to {end}:{text}",
    qa_result="<information>{text}</information>",
    last_round="This is the last round. You must provide the final answer in this round.", last_round_alone=True,
    qa_intro=None, qa_frame_label="Video frame at {time} seconds:", qa_question="{query}", qa_question_first=True,
    qa_answer_tag=ANSWER,
    caption_layout=CaptionLayout(
        name="longvideo-r1/1", intro=None, subtitles_note=("", ""),
        frame_label="{time}s.", subtitled_label="{time}s. Subtitle: {lines}.", subtitle_separator=",",
        label_every_frame=True, closing=None, times="seconds",
        words=(("low", 200), ("medium", 400), ("high", 400)), system_fields=True))

PROFILES = {p.name: p for p in (LVR_PROFILE, LONGVIDEO_R1_PROFILE)}
PROTOCOLS = tuple(PROFILES)


def profile_named(name: str) -> Profile:
    """The profile called `name`; ValueError naming the choices otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None

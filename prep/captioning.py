"""Captioning tree nodes: the prompt, the reply parser, and the lazy captioner.

The captioner sees a node's sampled frames in time order, each preceded by its
timestamp and the subtitle lines shown while it is on screen (marked as a transcript
when they were transcribed from the speech: `lvr segment --transcribe`), and is asked
for a caption wrapped in <caption> tags (about 200 words for a low node, 400
for medium and high). The system prompt can be replaced from a file; its hash
goes into every caption key and record, because a checkpoint answers best
with the prompt it was trained on. The words and layout around the frames are a
`CaptionLayout`: lvr's own, or one a navigator protocol profile brings
(infer/profiles.py); a layout other than lvr's own is part of the prompt hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from .caption_store import CaptionKey, CaptionStore
from .frames import FrameStore
from .options import check_options, option
from .records import read_prompt_file
from .subtitles import FROM_TRANSCRIPT
from .tags import caption_text
from .work_queue import run_jobs
from .models.base import ChatModel, Completion, GenerationOptions, Message, Usage, image_part, text_part

CAPTION_SCHEMA = "lvr.caption/1"
# Bump when the user-message layout below changes: it is part of the prompt hash.
USER_TEMPLATE_VERSION = "1"

DEFAULT_SYSTEM_PROMPT = """\
You write captions for clips of a long video. Another model will later read \
only your captions, never the video, to decide where in the video to look for \
the answer to a question. So be concrete and faithful to what is visible.

Cover, in time order: the setting, the people (appearance, clothing, what \
they do), objects and any readable on-screen text, actions and events, and \
changes between frames. Refer to moments by their timestamps. If subtitles \
are given, use them to say what is said, and by whom when that is clear. Do \
not guess at what cannot be seen or heard, and do not mention these \
instructions.

Reply with the caption only, inside <caption></caption> tags."""

WORD_LIMITS = {"low": 200, "medium": 400, "high": 400}


class CaptionError(Exception):
    """A node could not be captioned. One line naming the node and the reason."""


def load_system_prompt(path: "str | Path | None") -> str:
    return read_prompt_file(path, DEFAULT_SYSTEM_PROMPT, CaptionError)


def format_time(seconds: float) -> str:
    """12.3 -> '00:12.3'; 3725.5 -> '1:02:05.5'."""
    seconds = max(0.0, float(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h)}:{int(m):02d}:{s:04.1f}" if h >= 1 else f"{int(m):02d}:{s:04.1f}"


def format_seconds(seconds: float) -> str:
    """12.34 -> '12.3'; 75.0 -> '75.0': seconds to 0.1 s, as LongVideo-R1 writes a frame's time."""
    return str(round(max(0.0, float(seconds)), 1))


TIME_FORMATS = {"clock": format_time, "seconds": format_seconds}


@dataclass(frozen=True)
class CaptionLayout:
    """How a caption request is worded and laid out around the frames.

    `CAPTION_LAYOUT` is lvr's own; a navigator protocol profile (infer/profiles.py) may
    bring another. Templates are filled with str.format: `intro` with {count}, {level},
    {start}, {end} and {subtitles_note}; the frame labels with {time} and {lines};
    `closing` with {words}. None leaves that text out.
    """

    name: str                       # "" for lvr's own layout, so its prompt hash stays what it was
    intro: str | None
    subtitles_note: tuple[str, str]  # {subtitles_note} without and with subtitles
    frame_label: str
    subtitled_label: str            # a frame with subtitle lines
    subtitle_separator: str
    label_every_frame: bool         # with subtitles, every frame gets `subtitled_label`, lines or not
    closing: str | None
    times: str                      # a key of TIME_FORMATS
    words: tuple[tuple[str, int], ...]   # (level, words asked for)
    system_fields: bool             # fill {num_frame} and {num_words} in the system prompt
    # Lines transcribed from the speech (`--transcribe`) rather than subtitles: their intro note and
    # frame label. None words them as subtitles (a layout that keeps a reference's wording).
    transcript_note: str | None = None
    transcript_label: str | None = None

    def word_limit(self, level: str) -> int:
        return dict(self.words).get(level, 400)


CAPTION_LAYOUT = CaptionLayout(
    name="",
    intro=("These are {count} frames sampled in order from a {level}-level clip of a video, from {start} to "
           "{end}. Each frame is preceded by its timestamp{subtitles_note}"),
    subtitles_note=(".", " and the subtitle lines shown from then until the next frame."),
    frame_label="[{time}]", subtitled_label="[{time}] Subtitles: {lines}", subtitle_separator=" / ",
    label_every_frame=False,
    closing="Describe this clip in about {words} words, inside <caption></caption> tags.",
    times="clock", words=tuple(WORD_LIMITS.items()), system_fields=False,
    transcript_note=(" and the speech transcribed from the audio from then until the next frame (a machine "
                     "transcript, not subtitles: it may mishear words)."),
    transcript_label="[{time}] Transcript: {lines}")


def prompt_hash(system_prompt: str, layout: CaptionLayout = CAPTION_LAYOUT) -> str:
    """Identifies the whole prompt: the system text and the user-message layout."""
    version = f"{USER_TEMPLATE_VERSION}/{layout.name}" if layout.name else USER_TEMPLATE_VERSION
    h = hashlib.sha256(f"{version}\n{system_prompt}".encode()).hexdigest()
    return h[:16]


def parse_caption(reply: str) -> str:
    """The text inside <caption> tags; the whole reply when the model forgot them (`tags.caption_text`)."""
    return caption_text(reply)


def frame_lines(node: dict) -> list[list[dict]]:
    """Per sampled frame, the node's subtitle entries on screen from it until the next sampled frame.

    A line is listed at the first frame it overlaps only, so long lines are
    not repeated frame after frame.
    """
    times = node.get("frame_times") or []
    subs = node.get("subtitles") or []
    out: list[list[dict]] = [[] for _ in times]
    used: set[int] = set()
    for i, t in enumerate(times):
        t_next = times[i + 1] if i + 1 < len(times) else node["end"]
        for j, line in enumerate(subs):
            if j not in used and line["start"] < t_next and line["end"] > t:
                out[i].append(line)
                used.add(j)
    return out


def frame_subtitles(node: dict) -> list[list[str]]:
    """Per sampled frame, the text of the subtitle lines on screen from it until the next sampled frame."""
    return [[str(line["text"]) for line in lines] for lines in frame_lines(node)]


def is_transcript(line: dict) -> bool:
    """A node's subtitle entry transcribed from the speech (`--transcribe`), not read from subtitles."""
    return line.get("source") == FROM_TRANSCRIPT


def caption_system_prompt(system_prompt: str, frames: int, level: str,
                          layout: CaptionLayout = CAPTION_LAYOUT) -> str:
    """The system prompt as sent: a layout with `system_fields` fills in the frame count and word limit."""
    if not layout.system_fields:
        return system_prompt
    # str.replace, not str.format: a user's prompt file may hold other braces.
    return (system_prompt.replace("{num_frame}", str(frames))
            .replace("{num_words}", str(layout.word_limit(level))))


def build_caption_messages(node: dict, frames: list[bytes], system_prompt: str,
                           use_subtitles: bool = True, layout: CaptionLayout = CAPTION_LAYOUT) -> list[Message]:
    """The chat request for one node: timestamps, subtitles and frames, in order."""
    level = node["level"]
    times = node["frame_times"]
    at = TIME_FORMATS[layout.times]
    has_subs = use_subtitles and bool(node.get("subtitles"))
    heard = has_subs and any(is_transcript(line) for line in node["subtitles"])
    note = layout.transcript_note if heard and layout.transcript_note is not None else layout.subtitles_note[has_subs]
    parts: list[dict] = []
    if layout.intro is not None:
        parts.append(text_part(layout.intro.format(count=len(frames), level=level, start=at(node["start"]),
                                                   end=at(node["end"]), subtitles_note=note)))
    subs = frame_lines(node) if has_subs else [[] for _ in times]
    for t, jpeg, lines in zip(times, frames, subs):
        if lines or (has_subs and layout.label_every_frame):
            template = layout.subtitled_label
            if layout.transcript_label is not None and any(is_transcript(line) for line in lines):
                template = layout.transcript_label
            label = template.format(time=at(t), lines=layout.subtitle_separator.join(str(x["text"]) for x in lines))
        else:
            label = layout.frame_label.format(time=at(t))
        parts.append(text_part(label))
        parts.append(image_part(jpeg))
    if layout.closing is not None:
        parts.append(text_part(layout.closing.format(words=layout.word_limit(level))))
    system = caption_system_prompt(system_prompt, len(frames), level, layout)
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


@dataclass(frozen=True)
class CaptionOptions:
    use_subtitles: bool = True
    max_tokens_low: int = option(600, "--max-tokens-low", min=1, help="Reply token limit, low nodes.")
    max_tokens_high: int = option(1200, "--max-tokens-high", min=1, help="Reply token limit, medium and high nodes.")
    temperature: float = 0.0

    def __post_init__(self) -> None:
        check_options(self)

    def generation(self, level: str) -> GenerationOptions:
        limit = self.max_tokens_low if level == "low" else self.max_tokens_high
        return GenerationOptions(max_tokens=limit, temperature=self.temperature)


@dataclass
class CaptionResult:
    node: dict
    caption: str
    cached: bool
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    model: str = ""
    prompt_hash: str = ""

    def to_record(self, producer: dict | None = None) -> dict:
        n = self.node
        rec = {
            "schema": CAPTION_SCHEMA, "video_id": n["video_id"], "path": n.get("path"),
            "K": n["K"], "level": n["level"], "id": list(n["id"]),
            "start": n["start"], "end": n["end"],
            "frame_indices": n.get("frame_indices", []), "frame_times": n.get("frame_times", []),
            "caption": self.caption, "model": self.model, "prompt_hash": self.prompt_hash,
            "cached": self.cached, "tokens": self.usage.to_record(),
            "seconds": round(self.seconds, 3),
        }
        if producer is not None:
            rec["producer"] = producer
        return rec


def node_label(node: dict, tool: str) -> str:
    """How errors name a node and the tool that failed on it: `movie.mp4 node (4,) (high level), caption`."""
    node_id = tuple(node.get("id") or ())
    return f"{node.get('path') or node.get('video_id')} node {node_id} ({node.get('level', '?')} level), {tool}"


def frame_settings(node: dict, use_subtitles: bool = True) -> str:
    """The frame-settings part of a node's caption key: what the captioner was shown besides the span."""
    extra = {}
    if node.get("frame_sampling"):  # keyframe-sampled frames are other frames: never mix their captions
        extra = {"sampling": node["frame_sampling"].get("mode"), "tolerance": node["frame_sampling"].get("tolerance")}
    subtitles = bool(use_subtitles and node.get("subtitles"))
    if subtitles and node.get("transcript_id"):  # lines a speech model heard: never mix with others
        extra["transcript"] = node["transcript_id"]
    return CaptionKey.settings(frames=len(node.get("frame_indices") or []), side=node.get("image_side"),
                               subtitles=subtitles, **extra)


class Captioner:
    """Captions nodes through one model, reusing the shared caption store.

    `get_or_make(node)` is what every step calls: a stored caption comes back
    at once; otherwise the node's frames are read from the frame store, sent,
    and the caption is stored before it is returned. Concurrent calls for the
    same node make one request.
    """

    reads_files = False   # True for a captioner that only reads captions from files: it needs no frames

    def __init__(self, model: ChatModel, store: CaptionStore, frames: FrameStore,
                 options: CaptionOptions = CaptionOptions(), system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 layout: CaptionLayout = CAPTION_LAYOUT):
        self.model = model
        self.store = store
        self.frames = frames
        self.options = options
        self.system_prompt = system_prompt
        self.layout = layout
        self.prompt_hash = prompt_hash(system_prompt, layout)
        self._inflight: dict[str, asyncio.Future] = {}

    def key_for(self, node: dict) -> CaptionKey:
        return CaptionKey(video_id=node["video_id"], level=node["level"], start=node["start"],
                          end=node["end"], model=self.model.name, prompt_hash=self.prompt_hash,
                          frame_settings=frame_settings(node, self.options.use_subtitles))

    def cached(self, node: dict) -> CaptionResult | None:
        entry = self.store.get(self.key_for(node))
        if entry is None:
            return None
        return CaptionResult(node, entry.caption, True, model=self.model.name, prompt_hash=self.prompt_hash)

    def _read_frames(self, node: dict) -> list[bytes]:
        """The node's frames, each a whole JPEG: damaged ones are decoded again from the video first."""
        from .frame_repair import FrameRepairError, read_node_frames

        keys = node.get("frame_keys") or []
        if not keys:
            raise CaptionError(f"{node_label(node, 'caption')}: the record lists no frames")
        try:
            return read_node_frames(self.frames, node, keys)
        except (FrameRepairError, ValueError) as e:
            raise CaptionError(f"{node_label(node, 'caption')}: {e}") from None

    async def _make(self, node: dict, key: CaptionKey) -> CaptionResult:
        from .models.base import ModelError

        t0 = time.perf_counter()
        frames = await asyncio.to_thread(self._read_frames, node)
        messages = build_caption_messages(node, frames, self.system_prompt, self.options.use_subtitles,
                                          self.layout)
        try:
            reply: Completion = await self.model.complete(messages, self.options.generation(node["level"]))
        except ModelError as e:
            raise CaptionError(f"{node_label(node, 'caption')}: {e}") from None
        caption = parse_caption(reply.text)
        if not caption:
            raise CaptionError(f"{node_label(node, 'caption')}: the model returned an empty caption")
        seconds = time.perf_counter() - t0
        meta = {"tokens": reply.usage.to_record(), "seconds": round(seconds, 3),
                "finish_reason": reply.finish_reason, "created_at": time.time()}
        self.store.put(key, tuple(node["id"]), caption, meta)
        return CaptionResult(node, caption, False, reply.usage, seconds, self.model.name, self.prompt_hash)

    async def get_or_make(self, node: dict) -> CaptionResult:
        key = self.key_for(node)
        entry = self.store.get(key)
        if entry is not None:
            return CaptionResult(node, entry.caption, True, model=self.model.name, prompt_hash=self.prompt_hash)
        digest = key.digest()
        if digest in self._inflight:  # someone is already asking for this node
            result = await asyncio.shield(self._inflight[digest])
            return CaptionResult(node, result.caption, True, model=result.model, prompt_hash=result.prompt_hash)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        try:
            # Another process (a second caption run, an eval) may be asking for
            # this node right now: wait for its caption instead of paying twice.
            async with self.store.claim(key) as entry:
                if entry is not None:
                    result = CaptionResult(node, entry.caption, True, model=self.model.name,
                                           prompt_hash=self.prompt_hash)
                else:
                    result = await self._make(node, key)
            fut.set_result(result)
            return result
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[digest]


# -- batches ------------------------------------------------------------------------

NODE_FIELDS = ("video_id", "K", "level", "id", "start", "end", "frame_keys", "frame_times")


def check_node_record(rec: dict, where: str) -> dict:
    """A node record good enough to caption, or CaptionError naming the line."""
    if rec.get("schema") != "lvr.node/1":
        raise CaptionError(f"{where}: not an lvr.node/1 record (schema {rec.get('schema')!r})")
    missing = [f for f in NODE_FIELDS if f not in rec]
    if missing:
        raise CaptionError(f"{where}: node record lacks {', '.join(missing)}")
    if rec["level"] not in WORD_LIMITS:
        raise CaptionError(f"{where}: unknown level {rec['level']!r}")
    if not isinstance(rec["id"], list) or not all(isinstance(i, int) and i >= 1 for i in rec["id"]):
        raise CaptionError(f"{where}: bad node id {rec['id']!r}")
    return rec


@dataclass
class CaptionSummary:
    made: int = 0
    cached: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)


async def caption_nodes(nodes, captioner: Captioner, writer, *, concurrency: int = 8,
                        producer: dict | None = None, log=lambda msg: None,
                        progress: bool = True) -> CaptionSummary:
    """Caption (node record, where) pairs; one output record per node as it finishes.

    Nodes already in the writer's file are skipped; nodes in the store are
    written without a request. A failed node is named and the batch goes on.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    summary = CaptionSummary()
    done = {(r.get("video_id"), tuple(r.get("id") or ()), r.get("model"), r.get("prompt_hash"))
            for r in writer.existing}
    todo: list[dict] = []
    for node, where in nodes:
        try:
            node = check_node_record(node, where)
        except CaptionError as e:
            summary.failed.append(str(e))
            log(f"error: {e}")
            continue
        if (node["video_id"], tuple(node["id"]), captioner.model.name, captioner.prompt_hash) in done:
            summary.skipped += 1
            continue
        todo.append(node)

    bar = tqdm(total=len(todo), unit="node", desc="caption", disable=None if progress else True,
               dynamic_ncols=True)
    async def one(node: dict) -> None:
        try:
            result = await captioner.get_or_make(node)
        except CaptionError as e:
            summary.failed.append(str(e))
            log(f"error: {e}")
        else:
            record = result.to_record(producer)
            writer.write_unit([record])
            summary.records.append(record)
            if result.cached:
                summary.cached += 1
            else:
                summary.made += 1
                summary.usage.add(result.usage)
            bar.set_postfix(made=summary.made, cached=summary.cached,
                            tokens=summary.usage.total_tokens, refresh=False)
        bar.update(1)

    try:
        await run_jobs(todo, one, concurrency=concurrency)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary

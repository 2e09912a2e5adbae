"""The video_qa tool: a leaf's frames and one question, sent to a vision-language model."""

from __future__ import annotations

import hashlib

from ..prep.captioning import format_time, node_label
from ..prep.frame_repair import FrameRepairError, read_node_frames
from ..prep.frames import FrameStore
from ..prep.models.base import ChatModel, Completion, GenerationOptions, Message, image_part, text_part
from ..prep.tags import strip_think

QA_FRAMES = 16   # frames per video_qa request; segment stores them at 1024 px (--qa-frames)

DEFAULT_QA_SYSTEM_PROMPT = """\
You look at frames from a short clip of a video and answer one question about \
them. Answer from what the frames show, briefly and concretely; name the \
timestamp when it helps. If the frames do not show the answer, say so plainly \
instead of guessing."""

class VideoQAError(Exception):
    """The leaf cannot be asked about (frames missing, model failed). One line."""


def qa_prompt_hash(system_prompt: str) -> str:
    return hashlib.sha256(system_prompt.encode()).hexdigest()[:16]


def build_video_qa_messages(node: dict, frames: list[bytes], times: list[float], query: str,
                            system_prompt: str = DEFAULT_QA_SYSTEM_PROMPT) -> list[Message]:
    parts: list[dict] = [text_part(
        f"{len(frames)} frames from a clip of a video, {format_time(node['start'])} to "
        f"{format_time(node['end'])}, each preceded by its timestamp.")]
    for t, jpeg in zip(times, frames):
        parts.append(text_part(f"[{format_time(t)}]"))
        parts.append(image_part(jpeg))
    parts.append(text_part(f"Question: {query}"))
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": parts}]


class VideoQA:
    """Answers questions about one leaf at a time through a vision model."""

    def __init__(self, model: ChatModel, frames: FrameStore, *, max_tokens: int = 512,
                 system_prompt: str = DEFAULT_QA_SYSTEM_PROMPT):
        self.model = model
        self.frames = frames
        self.options = GenerationOptions(max_tokens=max_tokens, temperature=0.0)
        self.system_prompt = system_prompt

    def _frames(self, node: dict) -> tuple[list[bytes], list[float]]:
        keys, times = node.get("qa_frame_keys"), node.get("qa_frame_times")
        if not keys:
            # Nodes segmented without --qa-frames: fall back to the leaf's caption frames.
            keys, times = node.get("frame_keys") or [], node.get("frame_times") or []
            if len(keys) > QA_FRAMES:
                picks = [int(i * len(keys) / QA_FRAMES) for i in range(QA_FRAMES)]
                keys, times = [keys[i] for i in picks], [times[i] for i in picks]
        if not keys:
            raise VideoQAError(f"{node_label(node, 'video_qa')}: the record lists no frames for it")
        try:  # each a whole JPEG: damaged ones are decoded again from the video first
            return read_node_frames(self.frames, node, keys), list(times or [])
        except (FrameRepairError, ValueError) as e:
            raise VideoQAError(f"{node_label(node, 'video_qa')}: frames: {e}") from None

    async def ask(self, node: dict, query: str) -> tuple[str, Completion]:
        from ..prep.models.base import ModelError

        frames, times = self._frames(node)
        messages = build_video_qa_messages(node, frames, times, query, self.system_prompt)
        try:
            reply = await self.model.complete(messages, self.options)
        except ModelError as e:
            raise VideoQAError(f"{node_label(node, 'video_qa')}: {e}") from None
        answer = strip_think(reply.text).strip()
        return answer or "(the vision model gave no answer)", reply

"""The video_qa tool: a leaf's frames and one question, sent to a vision-language model.

The request's wording and layout, and how its answer is read, are the protocol profile's
(infer/profiles.py).
"""

from __future__ import annotations

from ..prep.captioning import node_label
from ..prep.frame_repair import FrameRepairError, read_node_frames
from ..prep.frames import FrameStore
from ..prep.models.base import ChatModel, Completion, GenerationOptions
from ..prep.tags import strip_think
from .profiles import DEFAULT_QA_SYSTEM_PROMPT, LVR_PROFILE, Profile

QA_FRAMES = 16   # frames per video_qa request; segment stores them at 1024 px (--qa-frames)


class VideoQAError(Exception):
    """The leaf cannot be asked about (frames missing, model failed). One line."""


class VideoQA:
    """Answers questions about one leaf at a time through a vision model."""

    def __init__(self, model: ChatModel, frames: FrameStore, *, max_tokens: int = 512,
                 system_prompt: str = DEFAULT_QA_SYSTEM_PROMPT, profile: Profile = LVR_PROFILE):
        self.model = model
        self.frames = frames
        self.options = GenerationOptions(max_tokens=max_tokens, temperature=0.0)
        self.system_prompt = system_prompt
        self.profile = profile

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
        frames, times = self._frames(node)
        answer, reply = await self.ask_frames(node, frames, times, query, node_label(node, "video_qa"))
        return answer or "(the vision model gave no answer)", reply

    async def ask_frames(self, span: dict, frames: list[bytes], times: list[float], query: str,
                         label: str) -> tuple[str, Completion]:
        """One question about these frames of `span` (a leaf, or a grounded span: its "start" and "end"),
        each labelled with its time. The answer is "" when the model gave none; VideoQAError names `label`."""
        from ..prep.models.base import ModelError

        messages = self.profile.video_qa_messages(span, frames, times, query, self.system_prompt)
        try:
            reply = await self.model.complete(messages, self.options)
        except ModelError as e:
            raise VideoQAError(f"{label}: {e}") from None
        return self.profile.video_qa_answer(strip_think(reply.text)), reply

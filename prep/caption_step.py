"""`lvr caption` as a library: node records in, caption records out.

Reads lvr.node/1 records (a file or '-'), optionally imports LongVideo-R1
caption files into the store first, captions the chosen levels through one
model with bounded concurrency, appends one lvr.caption/1 record per node,
and optionally exports the result in the LongVideo-R1 layout.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from .cache import frames_dir
from .caption_store import CaptionStore
from .caption_store import captions_path as caption_store_path  # the name other steps import
from .captioning import WORD_LIMITS, CaptionOptions, Captioner, CaptionSummary, caption_nodes, load_system_prompt
from .frames import FrameStore
from .jsonl import JsonlWriter, RecordError, read_jsonl
from .models import ModelSpec


@dataclass(frozen=True)
class CaptionStepOptions:
    model: ModelSpec = field(default_factory=ModelSpec)
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    levels: tuple[str, ...] = ("high", "medium", "low")
    system_prompt_file: Path | None = None
    import_dir: Path | None = None
    export_dir: Path | None = None

    def to_record(self) -> dict:
        return {"model": self.model.to_record(), "caption": asdict(self.caption),
                "levels": list(self.levels),
                "system_prompt_file": str(self.system_prompt_file) if self.system_prompt_file else None}


def _read_nodes(source: str, errors: list[str]) -> list[tuple[dict, str]]:
    nodes = []
    try:
        for lineno, rec in read_jsonl(source):
            nodes.append((rec, f"{source}:{lineno}"))
    except RecordError as e:
        errors.append(str(e))
    return nodes


def run_caption_step(source: str, output: "str | os.PathLike | None", cache_dir: Path,
                     options: CaptionStepOptions, *, log=lambda msg: None,
                     progress: bool = True) -> CaptionSummary:
    """Everything `lvr caption` does. Per-node failures are in the summary, not raised."""
    from .longvideo_r1 import export_longvideo_r1, import_longvideo_r1

    input_errors: list[str] = []
    nodes = _read_nodes(source, input_errors)
    for e in input_errors:
        log(f"error: {e}")
    system_prompt = load_system_prompt(options.system_prompt_file)
    chat = options.model.build()
    store = CaptionStore(caption_store_path(cache_dir))
    captioner = Captioner(chat, store, FrameStore(frames_dir(cache_dir)), options.caption, system_prompt)
    try:
        if options.import_dir is not None:
            files = sorted(Path(options.import_dir).glob("*.json"))
            imported = import_longvideo_r1(
                files, (n for n, _ in nodes), store, model=chat.name,
                prompt_hash=captioner.prompt_hash,
                frame_settings=lambda node: captioner.key_for(node).frame_settings)
            log(f"imported: {imported}")
        # Records with no valid level go through, so the batch names them as bad.
        wanted = [(n, w) for n, w in nodes
                  if n.get("level") in options.levels or n.get("level") not in WORD_LIMITS]
        producer = {"tool": "lvr caption", "version": __version__, "options": options.to_record()}
        with JsonlWriter(output) as writer:
            summary = asyncio.run(_caption_and_close(wanted, captioner, writer, options, producer,
                                                     log, progress))
            existing = writer.existing
        summary.failed[:0] = input_errors
        if options.export_dir is not None:
            records = [r for r in existing if r.get("schema") == "lvr.caption/1"] + summary.records
            paths = export_longvideo_r1(records, options.export_dir)
            log(f"exported {len(paths)} LongVideo-R1 caption files to {options.export_dir}")
    finally:
        store.close()
    return summary


async def _caption_and_close(nodes, captioner, writer, options, producer, log, progress):
    try:
        return await caption_nodes(nodes, captioner, writer, concurrency=options.model.concurrency,
                                   producer=producer, log=log, progress=progress)
    finally:
        await captioner.model.aclose()

"""Preference training of a vision-language model on `lvr vpo` triples (`lvr dpo --vlm`), LongVPO's way.

The policy sees each triple's whole interleaved input: every clip's frames with their
time labels, then the question (`vpo_data.triple_messages`). The reference model's
log-probs of chosen and rejected are computed once, before training, in one pass, and
handed to TRL's DPOTrainer as its precomputed reference columns (``ref_chosen_logps``,
``ref_rejected_logps``), so no reference copy stays in memory. LongVPO's approximation
is the default (``--reference-context anchor``): the reference scores the answers on the
anchor clip(s) alone plus the question, a short input, which removes the cost of long
reference forwards. ``--reference-context full`` scores the whole interleaved input
instead, for comparison.

Frames stay in the frame store until a batch needs them: the collator reads a batch's
frames (healing damaged ones from the video), shrinks them to ``--image-side`` and
renders the triples with the model's processor. ``--max-images`` bounds the images of
one input: each clip shows an even share of its frames. The rest is `lvr dpo`'s: the
settings and DPO knobs, full or LoRA, `--config`, `--resume`, `accelerate launch`
(the triples are written into OUT so every process reads the same reference cache).

The output folder is a plain checkpoint with the model's processor (image processor,
tokenizer, chat template), so `lvr caption --backend transformers --model OUT` and
video_qa (`--qa-backend transformers --qa-model OUT`) load it; `OUT/lvr_dpo.json` records
the settings, the data and the loss / reward-margin curve.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..prep.options import option
from .dpo import (DATA_DIR, RECORD_FILE, SCHEMA, TOOL, DpoError, DpoSettings, loss_and_margin, preference_dataset, preference_results,
                  quiet_precompute, step_details)
from .trainer_kit import (ADAPTER_DIR, TrainingRun, check_model, check_output_folder, progress_callbacks,
                          quiet_libraries, resolve_bf16, run_record, train, training_arguments, without_printer,
                          world_size, write_record)
from .vpo_data import answer_message, check_triple, per_clip_budget, triple_messages

VLM_PANEL = "Vision-language model (--vlm)"
REFERENCE_CONTEXTS = ("anchor", "full")


@dataclass(kw_only=True)
class VlmDpoOptions:
    """`lvr dpo`'s options for a vision-language model (`--vlm`)."""

    vlm: bool = option(False, "--vlm", panel=VLM_PANEL,
                       help="Train a vision-language model (Qwen2.5-VL, Qwen3-VL, ...) on `lvr vpo` triples: "
                            "PAIRS is then their JSONL and the frames come from --cache-dir.")
    reference_context: str = option("anchor", "--reference-context", choices=REFERENCE_CONTEXTS, panel=VLM_PANEL,
                                    help="What the reference model scores the answers on, once before training: "
                                         "anchor (the anchor clip(s) alone plus the question, LongVPO's "
                                         "approximation) or full (the whole interleaved input).")
    max_images: int = option(64, "--max-images", min=1, panel=VLM_PANEL,
                             help="Most images in one input; each clip shows an even share of its frames.")
    image_side: int = option(448, "--image-side", min=28, panel=VLM_PANEL,
                             help="Longest side of every image, in pixels (frames are never upscaled).")


@dataclass(kw_only=True)
class VlmDpoSettings(DpoSettings, VlmDpoOptions):
    """Everything `lvr dpo --vlm` can be told: `lvr dpo`'s settings and the vision-language ones."""

    cache_dir: str | None = None       # the frame store's cache (--cache-dir)

    def check(self) -> None:
        super().check()
        if self.reference_context not in REFERENCE_CONTEXTS:
            raise DpoError(f"--reference-context takes {' or '.join(REFERENCE_CONTEXTS)}, not "
                           f"{self.reference_context!r}")
        if self.max_images < 1 or self.image_side < 28:
            raise DpoError("--max-images must be at least 1 and --image-side at least 28")


def text_only_flags(values: dict) -> list[str]:
    """The --vlm flags given other values than their defaults (they mean nothing without --vlm)."""
    import dataclasses

    return [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(VlmDpoOptions)
            if f.name != "vlm" and values.get(f.name, f.default) != f.default]


# -- data ---------------------------------------------------------------------------------

@dataclass
class TripleData:
    path: str
    samples: list[dict] = field(default_factory=list)    # {"triple": the record as JSON}
    records: int = 0
    identical: int = 0                                    # chosen == rejected: no signal, left out
    stages: Counter = field(default_factory=Counter)
    images: int = 0                                       # images of the largest policy input

    def describe(self) -> str:
        by = ", ".join(f"{n} stage {s}" for s, n in sorted(self.stages.items()))
        extra = f", {self.identical} with chosen == rejected left out" if self.identical else ""
        return f"{len(self.samples)} triples ({by}{extra}; at most {self.images} images each)"


def load_triples(path: "str | os.PathLike", max_images: int) -> TripleData:
    """Read and check lvr.vpo/1 triples; DpoError names the file, line and problem."""
    from .sft import training_records

    data = TripleData(path=str(path))
    for where, rec in training_records(path, "triples", DpoError):
        data.records += 1
        try:
            check_triple(rec)
            per_clip_budget(rec, max_images)
        except ValueError as e:
            raise DpoError(f"{where}: {e}") from None
        if rec["chosen"].strip() == rec["rejected"].strip():
            data.identical += 1
            continue
        data.stages[int(rec["stage"])] += 1
        data.images = max(data.images, len(triple_messages(rec, max_images=max_images)[1]))
        data.samples.append({"triple": json.dumps(rec, ensure_ascii=False)})
    if not data.samples:
        raise DpoError(f"{data.path}: no usable triples (every one has chosen == rejected)")
    return data


# -- batches ------------------------------------------------------------------------------

class TripleCollator:
    """Triples -> a DPO batch for the model: frames read from the store, the processor's rendering.

    ``anchor_only`` renders the anchor clip(s) alone (the reference's input). Rows that
    carry precomputed reference log-probs pass them on, as TRL's collators do.
    """

    REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")

    def __init__(self, processor, frames_dir: Path, *, max_images: int, image_side: int, max_length: int | None,
                 anchor_only: bool = False):
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        from ..prep.frames import FrameStore

        self.store = FrameStore(frames_dir)
        self.max_images = max_images
        self.image_side = image_side
        self.max_length = max_length
        self.anchor_only = anchor_only
        self._render = DataCollatorForVisionPreference(processor=processor)
        self._pad_id = processor.tokenizer.pad_token_id

    def image(self, frame: dict):
        """One frame, whole (healed from its video if damaged), at most image_side px on its longest side."""
        import io

        from PIL import Image

        from ..prep.frame_repair import FrameRepairError, read_node_frames

        try:
            (jpeg,) = read_node_frames(self.store, {"video_id": frame["video_id"], "path": frame.get("video")},
                                       [frame["key"]])
        except (FrameRepairError, ValueError, OSError) as e:
            raise DpoError(f"frame {frame['key']}: {e}") from None
        with Image.open(io.BytesIO(jpeg)) as im:
            image = im.convert("RGB")
        if max(image.size) > self.image_side:
            scale = self.image_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        return image

    def example(self, record: dict) -> dict:
        prompt, frames = triple_messages(record, anchor_only=self.anchor_only, max_images=self.max_images)
        return {"prompt": prompt, "chosen": answer_message(record["chosen"]),
                "rejected": answer_message(record["rejected"]), "images": [self.image(f) for f in frames]}

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        records = [json.loads(row["triple"]) for row in rows]
        batch = self._render([self.example(r) for r in records])
        if self.max_length is not None:
            lengths = batch["attention_mask"].sum(dim=1)
            over = int(lengths.argmax())
            if int(lengths[over]) > self.max_length:
                rec = records[over % len(records)]
                raise DpoError(f"triple {rec.get('id')}: {int(lengths[over])} tokens, over --max-length "
                               f"{self.max_length}; lower --max-images or --image-side, or raise --max-length")
        for key in self.REFERENCE_COLUMNS:
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows])
        return batch


def _trainer_class():
    from trl import DPOTrainer

    class TripleDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on triples rendered per batch, with the reference scored on its own input.

        TRL refuses precomputed reference log-probs for image datasets (it renders their
        images per batch); the triples are not an image dataset to it (they hold frame keys,
        rendered by our collators), so precomputing runs, over the reference collator.
        """

        def __init__(self, *args, reference_collator, **kwargs):
            self._reference_collator = reference_collator
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # rendered per batch by the collators

        def _precompute_ref_logps(self, dataset, name, batch_size):
            policy, self.data_collator = self.data_collator, self._reference_collator
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.data_collator = policy

    return TripleDPOTrainer


# -- setting up ---------------------------------------------------------------------------

@dataclass
class VlmDpoRun(TrainingRun):
    settings: VlmDpoSettings
    data: TripleData
    reference: str = ""                # "precomputed-anchor" or "precomputed-full"


def _processor(model: str, settings: VlmDpoSettings):
    from transformers import AutoConfig

    from ..prep.models.locate import config_takes_images
    from ..prep.models.transformers_backend import load_processor

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - one line naming the model
        raise DpoError(f"--model {settings.model}: cannot load it ({' '.join(str(e).split())[:300]})") from None
    if not config_takes_images(config):
        raise DpoError(f"--model {settings.model}: a text-only model; --vlm trains a vision-language model")
    try:
        processor = load_processor(model, config)
    except Exception as e:  # noqa: BLE001
        raise DpoError(f"--model {settings.model}: cannot load its processor ({' '.join(str(e).split())[:300]})") \
            from None
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def _template() -> Any:
    from .chat_template import TemplateFix

    return TemplateFix(False, "model", "the processor's own (answers carry no earlier turns)", "")


def build_trainer(settings: VlmDpoSettings, data: TripleData | None = None, *,
                  log: Callable[[str], None] | None = None) -> VlmDpoRun:
    """Check everything, score the reference once, and build the DPOTrainer (no training yet)."""
    from trl import DPOConfig

    from ..prep.cache import frames_dir, resolve_cache_dir

    settings.check()
    model = check_model(settings.model, error=DpoError)
    output, resume_from = check_output_folder(settings.output, settings.resume, error=DpoError)
    data = data if data is not None else load_triples(settings.data, settings.max_images)
    if data.path == "-" and world_size() > 1:
        raise DpoError("PAIRS '-' (stdin) cannot be shared by several processes; pass a file")
    quiet_libraries()
    bf16 = resolve_bf16(settings.bf16, cpu=settings.cpu, error=DpoError)
    processor = _processor(model, settings)
    run = VlmDpoRun(settings, data, processor, _template(), model, output, bf16, resume_from)
    config = DPOConfig(
        beta=settings.beta,
        loss_type=[settings.loss_type],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=settings.precompute_batch_size,
        max_length=None,                 # the collator refuses an input over --max-length instead of cutting images
        remove_unused_columns=False,     # the collators read the triple column
        ddp_find_unused_parameters=False,
        **training_arguments(settings, run.output, run.bf16),
    )
    store = frames_dir(resolve_cache_dir(settings.cache_dir))
    collate = dict(max_images=settings.max_images, image_side=settings.image_side, max_length=settings.max_length)
    policy = TripleCollator(processor, store, **collate)
    reference = TripleCollator(processor, store, anchor_only=settings.reference_context == "anchor", **collate)
    existed = run.output.exists()
    try:
        train_dataset = preference_dataset(data.samples, run.output, config, on_disk=True)
        with quiet_precompute(log is None):  # TRL's bar while the reference scores the triples
            run.trainer = without_printer(_trainer_class()(
                model=run.model, args=config, train_dataset=train_dataset, processing_class=processor,
                data_collator=policy, reference_collator=reference, peft_config=settings.peft_config(),
                callbacks=progress_callbacks(log, TOOL, step_details)))
    except BaseException:  # e.g. a triple over --max-length while scoring: leave no half-made OUT behind
        shutil.rmtree(run.output / DATA_DIR, ignore_errors=True)
        if not existed:
            shutil.rmtree(run.output, ignore_errors=True)
        raise
    run.reference = f"precomputed-{settings.reference_context}"
    return run


# -- training and saving ------------------------------------------------------------------

def save_vlm(run: VlmDpoRun) -> None:
    """The trained model and its processor into OUT; with merged LoRA the adapter goes to OUT/adapter."""
    trainer, output = run.trainer, run.output
    if run.settings.merges_lora():
        adapter_dir = output / ADAPTER_DIR
        trainer.save_model(str(adapter_dir))
        trainer.accelerator.wait_for_everyone()
        if run.main:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForImageTextToText

            base = AutoModelForImageTextToText.from_pretrained(run.model, dtype=torch.bfloat16 if run.bf16
                                                               else torch.float32)
            PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(str(output))
    else:
        trainer.save_model(str(output))
    if run.main:
        run.tokenizer.save_pretrained(str(output))  # the processor: image processor, tokenizer, chat template
    trainer.accelerator.wait_for_everyone()


def run_vlm_dpo(settings: VlmDpoSettings, *, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint and its processor into settings.output, and return the lvr_dpo.json record."""
    started = time.time()
    run = build_trainer(settings, log=log)
    details = [settings.method(), f"beta {settings.beta}", f"reference {run.reference}",
               f"at most {settings.max_images} images of {settings.image_side} px"]
    trained = train(run, log, TOOL, details)
    save_vlm(run)
    if run.main:
        shutil.rmtree(run.output / DATA_DIR, ignore_errors=True)

    record = run_record(
        run, trained, schema=SCHEMA, tool=TOOL, started=started,
        head={**settings.layout(), "vlm": True, "reference": run.reference},
        data={"path": run.data.path, "format": "lvr.vpo/1", "records": run.data.records,
              "triples": len(run.data.samples), "identical_left_out": run.data.identical,
              "stages": {str(k): v for k, v in sorted(run.data.stages.items())},
              "max_images_per_input": run.data.images},
        results=preference_results(run.trainer.state.log_history))
    write_record(run, RECORD_FILE, record)
    return record


def summary_line(record: dict) -> str:
    return (f"lvr dpo: {record['data']['triples']} triples, {record['steps']} steps, {loss_and_margin(record)}, reference "
            f"{record['reference'].removeprefix('precomputed-')}, {record['seconds']:.1f} s; {record['layout']} "
            f"model in {record['output']}")

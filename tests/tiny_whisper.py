"""A tiny, randomly initialised Whisper built offline, saved so `pipeline(...)` and
`transformers serve` load it as they load a downloaded checkpoint.

The folder mirrors a real multilingual Whisper checkpoint: config.json, safetensors weights,
generation_config.json with the timestamp and language fields Whisper's generate reads,
preprocessor_config.json (the 80-bin log-mel feature extractor, 30 s windows), and a byte-level
BPE tokenizer (vocab.json, merges.txt, tokenizer.json) trained in milliseconds on a small
corpus, with Whisper's special tokens and its 1501 timestamp tokens after them, in the same
order as the real vocabulary. Its text is random; its timestamps are real timestamp tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "ja", "zh")
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES),
                  "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                  "<|notimestamps|>")
TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in steps of 0.02 s
_CORPUS = ("hello and welcome to the kitchen today we talk about videos speech and subtitles "
           "the quick brown fox jumps over the lazy dog one two three four five six seven eight\n")


def _bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok.get_vocab(), [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_tiny_whisper(path: str | Path, *, seed: int = 0, max_length: int = 48, words_only: bool = False) -> Path:
    """A WhisperForConditionalGeneration of one encoder and one decoder layer, width 32.

    `max_length` caps the tokens generated per 30 s window (real checkpoints: 448), so a
    random model's babble stays short and the tests quick. `words_only` zeroes the (tied)
    embeddings of the special and timestamp tokens, so that decoding without timestamps (what
    `transformers serve` does) picks text tokens instead of stopping or naming a language.
    """
    import torch
    from tokenizers import AddedToken
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizer)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe()
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                                for t in SPECIAL_TOKENS]})
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False)
                          for i in range(TIMESTAMPS)])
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert tokenizer.all_special_ids[-1] == ids["<|notimestamps|>"]  # timestamps follow the specials
    end = ids["<|endoftext|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                           max_target_positions=448, pad_token_id=end, bos_token_id=end, eos_token_id=end,
                           decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    if words_only:
        with torch.no_grad():
            model.get_input_embeddings().weight[end:] = 0.0   # the specials and timestamps come last
    model.generation_config = GenerationConfig(
        pad_token_id=end, bos_token_id=end, eos_token_id=end, decoder_start_token_id=ids["<|startoftranscript|>"],
        max_length=max_length, begin_suppress_tokens=[end], suppress_tokens=[], forced_decoder_ids=None,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True, lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        max_initial_timestamp_index=50, alignment_heads=[[0, 0]])
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path

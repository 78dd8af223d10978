"""The tiny preset's CLIP tokenizer: a byte-level BPE learnt here, deterministically, on iedp's prompt words."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import CLIPTokenizer

from iedp.resources import read_names

# CLIP's own text pipeline (transformers.CLIPTokenizer): NFC, whitespace collapse, lowercase, CLIP's split regex,
# then GPT-2 byte-level symbols; BPE marks the end of a word with </w>.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_END_OF_WORD = "</w>"


def _tiny_prompt_corpus() -> list[str]:
    """The prompts the tokenizer is trained on: every shipped class and scene name in iedp's prompt forms."""
    names = read_names("ade20k_classes.txt") + [
        name.replace("_", " ") for name in read_names("nyu_scenes.txt")
    ]
    # The words of the pre-training captions ("... with white walls, a red sofa and two chairs"), so each is one
    # token too.
    from iedp.data.synthetic import SYNTHETIC_CLASSES  # imports the data package: only when building
    from iedp.pretrain.data import COLOUR_WORDS, COUNT_WORDS, plural

    words = [*COLOUR_WORDS, *COUNT_WORDS, *(plural(name) for name in SYNTHETIC_CLASSES)]
    return [f"a photo of a {name}." for name in names] + [
        "a photo of a wall, floor, bed and lamp",
        f"a photo of a kitchen with {', '.join(words)} and walls",
    ]


def _clip_pre_tokenizer() -> Tokenizer:
    """CLIP's normalizer and pre-tokenizer (as in transformers.CLIPTokenizer), used to split the corpus."""
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def learn_bpe_merges(word_counts: Counter[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Byte-pair merges learned until every word is one symbol; ties go to the smallest pair, so it is deterministic.

    Args:
        word_counts: each word as a tuple of symbols, with its count.

    The tokenizers library's BpeTrainer breaks ties in hash order, which differs between processes; the corpus
    here is a few hundred words, so plain Python is fast enough.
    """
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def write_tiny_tokenizer(clip_dir: Path) -> CLIPTokenizer:
    """Learn a byte-level BPE on the prompt corpus, write it as CLIP's vocab.json + merges.txt, load it back.

    The vocabulary has CLIP's layout: the 256 byte symbols, the same with ``</w>``, one token per merge in
    merge order, then ``<|startoftext|>`` and ``<|endoftext|>``. Every corpus word becomes one token, and any
    other text still encodes through the byte symbols, in more tokens.
    """
    pre_tokenizer = _clip_pre_tokenizer()
    word_counts: Counter[tuple[str, ...]] = Counter()
    for prompt in _tiny_prompt_corpus():
        normalized = pre_tokenizer.normalizer.normalize_str(prompt)
        for word, _ in pre_tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            word_counts[(*word[:-1], word[-1] + _END_OF_WORD)] += 1
    merges = learn_bpe_merges(word_counts)

    # Sorted, the byte-level alphabet is in bytes_to_unicode's order: printable bytes first, then 256 + n.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_symbols + [symbol + _END_OF_WORD for symbol in byte_symbols]
    tokens += [left + right for left, right in merges] + [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = [f"{left} {right}" for left, right in merges]
    # CLIP's reference tokenizer skips the first line of merges.txt, so keep the usual version header.
    (clip_dir / "merges.txt").write_text("\n".join(["#version: 0.2", *merge_lines]) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77)
    tokenizer.save_pretrained(clip_dir)
    return tokenizer

"""A byte-level CLIP BPE vocabulary whose merges spell out a word list (the tiny models' and the
toy-world model's tokenizers), so CLIPTokenizer loads it offline.

BPE applies merges by rank, so merges written word by word, left to right, break later words:
"triangle" ranks "t r" before "star"'s "s t", and "striped" then stops at "s|tri|p|e|d". Each word's
merges are therefore found by running BPE with the merges so far and adding a merge for the first
pair where it gets stuck. A merge added later never changes an earlier word (at each of that word's
steps a lower-ranked pair was available), so every word, or each part of a "tea|pot" entry, is one
token.
"""
from __future__ import annotations

import json
import os

from customedit_core.clip_vocab import byte_symbols


def _bpe(symbols: list[str], ranks: dict) -> list[str]:
    """CLIP's BPE of one word: merge the lowest-ranked adjacent pair everywhere, until none is left."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def write_tokenizer(folder: str, words, whole_words: bool = True) -> str:
    """Write vocab.json/merges.txt for a CLIP BPE in which each of `words` ("tea|pot": one word of
    two tokens) is a single token; returns the folder. whole_words=False writes the merges left to
    right, word by word (some words then split, e.g. "striped"): the tiny test models' tokenizer,
    kept as it was so that their seeded weights and the tests calibrated on them stay the same."""
    chars = byte_symbols()
    vocab = chars + [c + "</w>" for c in chars]
    if whole_words:
        vocab, merges = _whole_words(vocab, words)
    else:
        vocab, merges = _left_to_right(vocab, words)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def _symbols(words):
    """Each word's (or "tea|pot" part's) characters, the last one marked as the word's end."""
    for entry in words:
        parts = entry.split("|")
        for k, part in enumerate(parts):
            syms = list(part)
            if k == len(parts) - 1:
                syms[-1] += "</w>"
            yield syms


def _left_to_right(vocab: list, words) -> tuple[list, list]:
    merges = []
    for syms in _symbols(words):
        cur = syms[0]
        for sym in syms[1:]:
            if f"{cur} {sym}" not in merges:
                merges.append(f"{cur} {sym}")
            cur = cur + sym
        if cur not in vocab:
            vocab.append(cur)
    vocab += [t for t in dict.fromkeys(m.replace(" ", "") for m in merges) if t not in vocab]
    return vocab, merges


def _whole_words(vocab: list, words) -> tuple[list, list]:
    known = set(vocab)
    ranks: dict = {}
    for syms in _symbols(words):
        while len(cur := _bpe(syms, ranks)) > 1:
            ranks[(cur[0], cur[1])] = len(ranks)
            if cur[0] + cur[1] not in known:
                known.add(cur[0] + cur[1])
                vocab.append(cur[0] + cur[1])
    return vocab, [f"{a} {b}" for a, b in ranks]

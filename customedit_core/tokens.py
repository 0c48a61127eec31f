"""Prompt -> token ids, and which token positions each word occupies.

Words are CLIP's pre-tokens (the same regex its BPE runs on: letters, digits one by one,
punctuation runs), so "a cat, sitting" is [a, cat, ",", sitting] and a multi-token word
such as "teapot" stays one word spanning several positions. CLIP byte-pair-encodes each
pre-token independently, so the prompt's ids are the concatenation of its words' ids;
we check that instead of trusting it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import regex

from .errors import InputError

_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


class Tokenizer(Protocol):
    bos: int
    eos: int
    pad: int
    max_length: int

    def word_ids(self, word: str) -> list[int]:
        """BPE ids of one pre-token, without start/end tokens."""

    def text_ids(self, text: str) -> list[int]:
        """BPE ids of a whole text, without start/end tokens."""


def split_words(text: str) -> list[str]:
    return _PAT.findall(" ".join(text.split()).lower())


@dataclass(frozen=True)
class PromptTokens:
    text: str
    words: tuple[str, ...]
    ids: tuple[int, ...]               # full padded sequence, length max_length
    spans: tuple[tuple[int, ...], ...]  # positions of each word in `ids`
    length: int                        # BOS + content + EOS

    def positions(self, selector: str | int, input_name: str = "words") -> list[int]:
        """Positions of a word (by index, or by text: every occurrence, multi-word allowed)."""
        if isinstance(selector, int):
            if not 0 <= selector < len(self.words):
                raise InputError(input_name, f"word index {selector} is outside the prompt "
                                             f"{self.text!r} ({len(self.words)} words)")
            return list(self.spans[selector])
        query = split_words(selector)
        if not query:
            raise InputError(input_name, f"empty word selection {selector!r}")
        out = []
        n = len(query)
        for i in range(len(self.words) - n + 1):
            if list(self.words[i:i + n]) == query:
                for j in range(i, i + n):
                    out.extend(self.spans[j])
        if not out:
            raise InputError(input_name, f"{selector!r} does not occur in the prompt {self.text!r} "
                                         f"(its words are {list(self.words)})")
        return out


def tokenize(tok: Tokenizer, text: str, input_name: str = "prompt", allow_empty: bool = False) -> PromptTokens:
    if not isinstance(text, str):
        raise InputError(input_name, f"expected text, got {type(text).__name__}")
    words = split_words(text)
    if not words and not allow_empty:
        raise InputError(input_name, "is empty; expected a description of the image")
    spans, ids, pos = [], [], 1
    for w in words:
        w_ids = tok.word_ids(w)
        spans.append(tuple(range(pos, pos + len(w_ids))))
        ids.extend(w_ids)
        pos += len(w_ids)
    if ids != tok.text_ids(" ".join(words)):
        raise InputError(input_name, f"the tokenizer splits {text!r} in a way that does not follow "
                                     "word boundaries; simplify the prompt's punctuation")
    limit = tok.max_length - 2
    if len(ids) > limit:
        raise InputError(input_name, f"is {len(ids)} tokens long; the model takes at most {limit} "
                                     "(shorten the prompt)")
    full = [tok.bos] + ids + [tok.eos]
    length = len(full)
    full += [tok.pad] * (tok.max_length - length)
    return PromptTokens(text, tuple(words), tuple(full), tuple(spans), length)


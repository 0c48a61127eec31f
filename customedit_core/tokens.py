"""Prompt -> token ids, and which token positions each word occupies.

Words are CLIP's pre-tokens (the same regex its BPE runs on: letters, digits one by one,
punctuation runs), so "a cat, sitting" is [a, cat, ",", sitting] and a multi-token word
such as "teapot" stays one word spanning several positions. CLIP byte-pair-encodes each
pre-token independently, so the prompt's ids are the concatenation of its words' ids;
we check that instead of trusting it.
"""
from __future__ import annotations

import functools
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


def split_words(text: str, added=()) -> list[str]:
    """CLIP pre-tokens of `text`; `added` words (concept tokens such as "<new1>") stay whole."""
    text = " ".join(text.split()).lower()
    if not added:
        return _PAT.findall(text)
    out = []
    for i, part in enumerate(added_pattern(tuple(sorted(added, key=len, reverse=True))).split(text)):
        out.extend([part] if i % 2 else _PAT.findall(part))
    return out


@functools.lru_cache(maxsize=64)
def added_pattern(words, flags=0):
    # whole words only: "<new1>" must not match inside "x<new1>y" when it starts/ends with a letter
    alts = "|".join(regex.escape(w) for w in words)
    return regex.compile(rf"(?<![\p{{L}}\p{{N}}])({alts})(?![\p{{L}}\p{{N}}])", flags)


_FORBIDDEN = set("()[]{}:,\"'\\")


class AddedWords:
    """Words the base vocabulary lacks (concept tokens): one placeholder id each, past the
    vocabulary, with its own input embedding vector that the backend's encode() puts in."""

    def _init_added(self, first_id: int):
        self.added: dict[str, int] = {}
        self.vectors: dict[int, object] = {}
        self._first_added = self._next_id = int(first_id)

    def add_word(self, word: str, vector, input_name: str = "token") -> int:
        return self._register(check_new_word(self, word, input_name), vector)

    def _register(self, word: str, vector) -> int:
        i = self._next_id
        self._next_id += 1
        self.added[word], self.vectors[i] = i, vector
        return i

    def remove_word(self, word: str) -> None:
        i = self.added.pop(word.lower(), None)
        if i is not None:
            self.vectors.pop(i, None)


def check_token_text(word, input_name: str = "token") -> str:
    """The spelling rules of a concept token (one word, no prompt syntax); returns it lower-cased."""
    if not isinstance(word, str) or not word.strip():
        raise InputError(input_name, "is empty; expected a new word such as '<new1>'")
    w = word.strip().lower()
    if any(c.isspace() for c in word) or _FORBIDDEN & set(w) or len(w) > 32:
        raise InputError(input_name, f"{word!r} must be one word of at most 32 characters without spaces or "
                                     "any of ( ) [ ] { } : , quotes or backslash, e.g. '<new1>'")
    return w


def check_new_word(tok, word: str, input_name: str = "token") -> str:
    """A concept token must be one word that is neither a vocabulary token nor taken already."""
    w = check_token_text(word, input_name)
    if w in getattr(tok, "added", {}):
        raise InputError(input_name, f"{word!r} is already taken by a loaded concept; choose another token")
    if len(tok.text_ids(w)) == 1:
        raise InputError(input_name, f"{word!r} is already a token of the model's vocabulary (it would change "
                                     "the meaning of every prompt using it); choose a new word such as '<new1>'")
    return w


@dataclass(frozen=True)
class PromptTokens:
    text: str
    words: tuple[str, ...]
    ids: tuple[int, ...]               # full padded sequence, length max_length
    spans: tuple[tuple[int, ...], ...]  # positions of each word in `ids`
    length: int                        # BOS + content + EOS
    added: tuple[str, ...] = ()        # concept tokens the tokenizer knew (kept whole by split_words)

    def positions(self, selector: str | int, input_name: str = "words") -> list[int]:
        """Positions of a word (by index, or by text: every occurrence, multi-word allowed)."""
        if isinstance(selector, int):
            if not 0 <= selector < len(self.words):
                raise InputError(input_name, f"word index {selector} is outside the prompt "
                                             f"{self.text!r} ({len(self.words)} words)")
            return list(self.spans[selector])
        query = split_words(selector, self.added)
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

    def positions_of(self, words, input_name: str = "words") -> list[int]:
        """The sorted union of several words' positions (a mask's or a blend's words)."""
        return sorted({p for w in words for p in self.positions(w, input_name)})


def tokenize(tok: Tokenizer, text: str, input_name: str = "prompt", allow_empty: bool = False) -> PromptTokens:
    if not isinstance(text, str):
        raise InputError(input_name, f"expected text, got {type(text).__name__}")
    added = getattr(tok, "added", None) or {}
    words = split_words(text, tuple(added))
    if not words and not allow_empty:
        raise InputError(input_name, "is empty; expected a description of the image")
    spans, ids, pos = [], [], 1
    run, run_ids = [], []          # consecutive ordinary words, checked against the whole-text BPE

    def check_run():
        if run and run_ids != tok.text_ids(" ".join(run)):
            raise InputError(input_name, f"the tokenizer splits {text!r} in a way that does not follow "
                                         "word boundaries; simplify the prompt's punctuation")
        run.clear()
        run_ids.clear()

    for w in words:
        if w in added:
            check_run()
            w_ids = [added[w]]
        else:
            w_ids = tok.word_ids(w)
            run.append(w)
            run_ids.extend(w_ids)
        spans.append(tuple(range(pos, pos + len(w_ids))))
        ids.extend(w_ids)
        pos += len(w_ids)
    check_run()
    limit = tok.max_length - 2
    if len(ids) > limit:
        raise InputError(input_name, f"is {len(ids)} tokens long; the model takes at most {limit} "
                                     "(shorten the prompt)")
    full = [tok.bos] + ids + [tok.eos]
    length = len(full)
    full += [tok.pad] * (tok.max_length - length)
    return PromptTokens(text, tuple(words), tuple(full), tuple(spans), length, tuple(w for w in added if w in words))

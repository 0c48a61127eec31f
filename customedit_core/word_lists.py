"""Word lists typed as text (the nodes' widgets, the CLI's flags): 'teapot, red car' and
'dog:2, grass:-1', checked so that only finite weights in a sane range reach a model."""
from __future__ import annotations

from .errors import InputError


def parse_words(text: str, input_name: str) -> tuple:
    """'teapot, red car' -> ('teapot', 'red car'); empty -> ()."""
    if not isinstance(text, str):
        raise InputError(input_name, f"expected comma-separated words, got {type(text).__name__}")
    words = (" ".join(w.split()) for w in text.split(","))
    return tuple(w for w in words if w)          # stray commas are forgiven


def parse_reweight(text: str, input_name: str = "reweight") -> dict:
    """'dog:2, grass:-1' -> {'dog': 2.0, 'grass': -1.0}; empty -> {}."""
    out = {}
    for entry in parse_words(text, input_name):
        word, sep, value = entry.rpartition(":")
        word = word.strip()
        if not sep or not word:
            raise InputError(input_name, f"entry {entry!r} is not 'word:weight'; expected e.g. 'dog:2, grass:-1'")
        try:
            out[word] = float(value)
        except ValueError:
            raise InputError(input_name, f"weight {value.strip()!r} of {word!r} is not a number; "
                                         "expected e.g. 'dog:2, grass:-1'") from None
        if out[word] != out[word] or abs(out[word]) > 100:
            raise InputError(input_name, f"weight of {word!r} must be a finite number in [-100, 100], got {value.strip()}")
    return out

"""Training captions and which token each object's mask supervises.

A scene's caption ("a red striped circle and a blue star on grass") is said as is most of the
time; a share of the captions take the template Custom Diffusion trains with ("photo of a ...")
and, when the object's size shows it, one of its view prefixes ("a far away", "very small" for a
small object; "zoomed in", "close up" for a large one), so every word a concept prompt of the pack
uses is a word the model knows. Each word gets a label: 1.. for the object whose colour, pattern
or shape it names, BACKGROUND for the background word, 0 for words that name no region.
"""
from __future__ import annotations

import numpy as np

from customedit_core.augment import LARGE, SMALL

from .world import Scene

BACKGROUND = 3           # label of the background word (objects are 1 and 2)
TEMPLATE = "photo of"    # Custom Diffusion's "photo of a" template, the article being the object's
TEMPLATE_SHARE = 0.3
PREFIX_SHARE = 0.5       # of the templated captions whose object's size fits a view prefix
SMALL_SIZE, LARGE_SIZE = 0.16, 0.27


def words(scene: Scene, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(word, label) of a caption drawn for this scene."""
    out: list[tuple[str, int]] = []
    if rng.random() < TEMPLATE_SHARE:
        size = max(o.size for o in scene.objects)
        prefixes = SMALL if size < SMALL_SIZE else LARGE if size > LARGE_SIZE else ()
        if prefixes and rng.random() < PREFIX_SHARE:
            out += [(w, 0) for w in prefixes[rng.integers(len(prefixes))].split()]
        out += [(w, 0) for w in TEMPLATE.split()]
    for i, o in enumerate(scene.objects):
        if i:
            out.append(("and", 0))
        out += [(w, 0 if k == 0 else i + 1) for k, w in enumerate(o.phrase().split())]
    return out + [("on", 0), (scene.background, BACKGROUND)]


def token_labels(tok, caption_words: list[tuple[str, int]], length: int = 77) -> tuple[list[int], list[int]]:
    """(token ids padded to `length`, the label of each position); a word of several tokens labels
    all of them."""
    ids, labels = [tok.bos_token_id], [0]
    for w, lab in caption_words:
        t = tok(w, add_special_tokens=False).input_ids
        ids += t
        labels += [lab] * len(t)
    ids, labels = ids[:length - 1] + [tok.eos_token_id], labels[:length - 1] + [0]
    pad = length - len(ids)
    return ids + [tok.pad_token_id] * pad, labels + [0] * pad

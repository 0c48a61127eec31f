"""Concepts on ComfyUI objects: patched clones of MODEL and CLIP that stock nodes understand.

MODEL: the K/V deltas become "diff" weight patches on a clone, exactly what LoraLoader makes of
the exported LoRA file, so KSampler and our nodes see the same weights.
CLIP: a clone whose tokenizer (a copy; clones share it otherwise) knows the concept words. A word
in a prompt is rewritten to ComfyUI's own `embedding:` syntax with an internal name that resolves
to the concept's vector, so CLIPTextEncode, prompt weights and our nodes all see the same vector.
The registry lives on the tokenizer, so it survives CLIP clones made by other nodes.
"""
from __future__ import annotations

import copy
import types

from ..concept import Concept, check_base
from ..errors import InputError
from ..tokens import added_pattern, check_new_word
from .comfy import ComfyBackend
from .comfy_tokens import WORDS_KEY, tokenizer_name

CLASSES_KEY = "customedit_classes"    # beside WORDS_KEY: concept word -> class word (DCI's plain prompt)

_NAME = "__customedit_{}__"


PART_KEY = "customedit_part"          # on each SDTokenizer: the share of a word's vector it encodes


def _inner(clip):
    tok = getattr(clip, "tokenizer", None)
    return getattr(tok, tokenizer_name(tok) or "", None)


def _parts(tok, widths) -> list:
    """(tokenizer attribute, share of each word vector): SD1/SD2 one whole; SDXL CLIP-L's, CLIP-G's."""
    if widths:
        return [("clip_l", slice(0, widths[0])), ("clip_g", slice(widths[0], None))]
    return [(tok.clip, slice(None))]


def loaded_words(clip) -> dict:
    return dict(getattr(_inner(clip), WORDS_KEY, {}) or {})


def loaded_classes(clip) -> dict:
    """Concept word -> class word of the concepts loaded on this CLIP."""
    classes = getattr(_inner(clip), CLASSES_KEY, {}) or {}
    return {w: classes.get(w, "") for w in loaded_words(clip)}


def apply_concept(model, clip, concept: Concept, strength: float = 1.0, input_name: str = "concept"):
    """(model clone, clip clone, warnings); the inputs are not modified."""
    backend = ComfyBackend(model, clip)
    warnings = check_base(concept, backend, input_name)
    taken = loaded_words(clip)
    for word in concept.tokens:
        if word in taken:
            raise InputError(input_name, f"token {word!r} is already taken by a concept loaded on this CLIP; "
                                         "load each concept once (retrain with another token to combine two of the same name)")
        check_new_word(backend.tokenizer, word, input_name)      # not a word of the vocabulary either
    m = model.clone()
    patches = {f"diffusion_model.{k}.weight": ("diff", (d,)) for k, d in concept.deltas.items()}
    added = m.add_patches(patches, float(strength))
    if len(added) != len(patches):
        raise InputError(input_name, f"only {len(added)} of {len(patches)} K/V deltas fit this model's layers")
    c = clip.clone()
    tok = copy.copy(clip.tokenizer)
    words = dict(taken)
    words.update({w: v.detach().float().cpu().clone() for w, v in zip(concept.tokens, concept.embeddings)})
    classes = dict(getattr(_inner(clip), CLASSES_KEY, {}) or {})
    classes.update(zip(concept.tokens, concept.class_words))
    # every SDTokenizer of the CLIP (SDXL: clip_l and clip_g) resolves the words to its share of the
    # vector, so stock CLIPTextEncode and our backend see the same input vectors
    for attr, part in _parts(tok, backend.text_widths):
        inner = copy.copy(getattr(tok, attr))
        setattr(inner, WORDS_KEY, words)
        setattr(inner, CLASSES_KEY, classes)
        setattr(inner, PART_KEY, part)
        if inner.embedding_directory is None:    # ComfyUI only resolves `embedding:` with a directory set
            inner.embedding_directory = []
        # bound to this copy: a copied instance attribute would still call the original's
        inner.tokenize_with_weights = types.MethodType(_tokenize_with_words, inner)
        inner._try_get_embedding = types.MethodType(_try_get_word, inner)
        setattr(tok, attr, inner)
    c.tokenizer = tok
    return m, c, warnings


def _tokenize_with_words(self, text, return_word_ids=False, **kwargs):
    words = sorted(getattr(self, WORDS_KEY))
    if words and isinstance(text, str):
        import regex

        pattern = added_pattern(tuple(sorted(words, key=len, reverse=True)), regex.IGNORECASE)
        ident = self.embedding_identifier
        text = pattern.sub(lambda m: f" {ident}{_NAME.format(words.index(m.group(1).lower()))} ", text)
    return type(self).tokenize_with_weights(self, text, return_word_ids, **kwargs)


def _try_get_word(self, embedding_name: str):
    parts = embedding_name.split()
    name = parts[0] if parts else ""
    words = sorted(getattr(self, WORDS_KEY))
    for i, w in enumerate(words):
        if name == _NAME.format(i):
            return getattr(self, WORDS_KEY)[w][getattr(self, PART_KEY, slice(None))], " ".join(parts[1:])
    return type(self)._try_get_embedding(self, embedding_name)

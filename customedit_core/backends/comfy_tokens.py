"""ComfyUI's SDTokenizer (clip.tokenizer.clip_l / clip_h; SDXL: its clip_l) as the core's Tokenizer."""
from __future__ import annotations

from ..tokens import AddedWords

WORDS_KEY = "customedit_words"      # on a CLIP's SDTokenizer: concept word -> input vector (LoadConcept)


def tokenizer_name(tok):
    """The attribute of a CLIP's tokenizer holding the SDTokenizer whose ids the core uses: SD1/SD2's
    only one (`tok.clip`); SDXL's clip_l (clip_g has the same vocabulary, it only pads with 0).
    Concept words live on that one. None for tokenizers of other families."""
    name = getattr(tok, "clip", None)
    if name is None and hasattr(tok, "clip_l") and hasattr(tok, "clip_g"):
        return "clip_l"
    return name


class ComfyTokenizer(AddedWords):
    """Concept words a LoadConcept node put on that tokenizer become added words here."""

    def __init__(self, sd_tokenizer):
        self.sd = sd_tokenizer
        self.tok = sd_tokenizer.tokenizer
        self._init_added(len(self.tok))
        for word, vector in getattr(sd_tokenizer, WORDS_KEY, {}).items():
            self._register(word, vector)         # checked when LoadConcept put them there
        self.bos = int(sd_tokenizer.start_token)
        self.eos = int(sd_tokenizer.end_token)
        self.pad = int(sd_tokenizer.pad_token)      # SD1: the end token; SD2: 0
        self.max_length = int(min(sd_tokenizer.max_length, 77))

    def word_ids(self, word):
        return list(self.tok(word, add_special_tokens=False)["input_ids"])

    def text_ids(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

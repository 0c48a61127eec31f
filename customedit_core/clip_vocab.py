"""CLIP's BPE tokenizer files, derived offline from the original `bpe_simple_vocab_16e6.txt.gz`.

Single-file SD1.x/SD2.x checkpoints carry no tokenizer and the hub is out of reach, so the
vocabulary is rebuilt the way OpenAI's `SimpleTokenizer` builds it (and as the Hugging Face
`vocab.json` of openai/clip-vit-large-patch14 lists it):
the 256 byte symbols, the same with `</w>`, one token per merge (the first 49152 - 256 - 2
merge lines after the header), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).

The data file is vendored in `data/` (MIT, see data/README.md): the same bytes open_clip_torch
ships in its package.
"""
from __future__ import annotations

import gzip
import json
import os

BPE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2        # CLIP's SimpleTokenizer: merges[1:49152 - 256 - 2 + 1]


def derive(bpe_path: str = BPE_FILE) -> tuple[dict, list[str]]:
    """(vocab token -> id, merges as 'a b' lines) exactly as CLIP builds them."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:N_MERGES + 1]
    if len(merges) != N_MERGES:
        raise ValueError(f"{bpe_path} holds {len(merges)} merges; expected {N_MERGES}")
    chars = byte_symbols()
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path} does not give CLIP's {VOCAB_SIZE} distinct tokens")
    return {t: i for i, t in enumerate(vocab)}, merges


def byte_symbols() -> list[str]:
    """CLIP's 256 printable stand-ins for bytes, in its order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_files(folder: str, bpe_path: str = BPE_FILE) -> str:
    """Write vocab.json and merges.txt (the Hugging Face CLIPTokenizer files) into `folder`."""
    vocab, merges = derive(bpe_path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer for SD1.x (pad `<|endoftext|>`) or SD2.x (pad `!`), offline."""
    from transformers import CLIPTokenizer

    vocab, merges = derive()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                         pad_token=pad_token, model_max_length=77)

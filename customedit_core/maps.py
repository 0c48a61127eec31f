"""Per-word cross-attention maps of an inversion's reconstruction or of an edit, as images."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .attention import AttentionHook
from .ddim import Schedule
from .edit import P2PSettings, p2p_edit
from .inversion import Inversion, at_inversion_size
from .p2p import AttentionStore
from .sampling import denoise


@at_inversion_size
def record_source_maps(backend, inv: Inversion) -> AttentionStore:
    """Reconstruct the source with an AttentionStore attached (no edit)."""
    inv.check(backend)
    store = AttentionStore()
    schedule = Schedule(backend.alphas_cumprod, inv.steps)
    dev = backend.device
    cond = backend.encode([inv.tokens])
    with backend.offload():
        denoise(backend, schedule, inv.noise.to(dev), cond, guidance=inv.guidance,
                hook=AttentionHook([store]), **inv.walk(dev, 1))
    return store


def word_maps(store: AttentionStore, tokens, prompt_row: int):
    """[(word, map [h, w] normalised to 0..1)] for every word of a prompt, start/end tokens excluded,
    at the store's level (nearest 16x16 maps)."""
    maps = store.word_maps()[prompt_row]                             # [h, w, L]
    out = []
    for word, span in zip(tokens.words, tokens.spans):
        m = maps[..., list(span)].sum(-1)
        out.append((word, m / m.max().clamp_min(1e-12)))
    return out


def render(maps, size: tuple[int, int], label: bool = True) -> torch.Tensor:
    """IMAGE batch [N, H, W, 3] in 0..1: each map upsampled (bicubic, clamped), word written on it."""
    imgs = []
    for word, m in maps:
        up = F.interpolate(m[None, None].float(), size=size, mode="bicubic", align_corners=False)[0, 0]
        img = up.clamp(0, 1)[..., None].expand(-1, -1, 3).clone()
        if label:
            img = _label(img, word)
        imgs.append(img)
    return torch.stack(imgs)


def _label(img: torch.Tensor, text: str) -> torch.Tensor:
    try:
        from PIL import Image, ImageDraw
    except ImportError:   # labels are a nicety; maps stay correct without them
        return img
    import numpy as np

    pil = Image.fromarray((img.numpy() * 255).astype("uint8"))
    draw = ImageDraw.Draw(pil)
    draw.rectangle([0, 0, 7 * len(text) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 0))
    return torch.from_numpy(np.asarray(pil).astype("float32") / 255.0)


def attention_maps(backend, inv: Inversion, target_prompt: Optional[str] = None,
                   settings: Optional[P2PSettings] = None, image_size: Optional[tuple] = None,
                   label: bool = True) -> torch.Tensor:
    """Maps of the source prompt's words (no target) or of the target prompt's words in an edit."""
    if target_prompt:
        res = p2p_edit(backend, inv, target_prompt, settings)
        from .tokens import tokenize
        tokens, row, store = tokenize(backend.tokenizer, target_prompt, "target_prompt"), 1, res.store
    else:
        tokens, row, store = inv.tokens, 0, record_source_maps(backend, inv)
    h, w = inv.source.shape[2:]
    size = image_size or (h * backend.vae_scale, w * backend.vae_scale)
    return render(word_maps(store, tokens, row), size, label)

"""Prompt-to-Prompt editing of an inverted real image.

One batched walk down from the inversion's noise: row 0 is the source branch (it
reconstructs the image), rows 1.. are the edits, steered by the controllers of p2p.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from . import align
from .attention import AttentionHook
from .ddim import Schedule
from .errors import InputError
from .inversion import Inversion, at_inversion_size
from .p2p import AttentionStore, LocalBlend, RefineCross, ReplaceCross, ReplaceSelf, Reweight
from .sampling import denoise
from .tokens import PromptTokens, tokenize

Window = Union[float, tuple]


@dataclass
class P2PSettings:
    mode: str = "refine"                      # "refine" (added words) | "replace" (word swap)
    cross_replace: Window = 0.8               # fraction of steps (or (start, end) fractions)
    self_replace: Window = 0.5
    self_max_side: float = 0.5                # self-attention replaced in layers with side <= this * latent
    # the edit rows' unconditional embedding: "inversion" (the reference: the inversion's per-step
    # one, for every row) or "empty" (only the source row keeps it; the edit rows get the empty
    # prompt's, so guidance scales target - empty, not target - source; helps small models)
    edit_uncond: str = "inversion"
    word_cross_replace: dict = field(default_factory=dict)   # target word -> fraction or (start, end)
    reweight: dict = field(default_factory=dict)              # target word -> weight (negative allowed)
    blend_source_words: tuple = ()            # local blend off when both are empty
    blend_target_words: tuple = ()
    blend_source_only: bool = False           # Custom-Edit: mask from the source words alone
    blend_threshold: float = 0.3
    blend_start: float = 0.2

    @property
    def local_blend(self) -> bool:
        return bool(self.blend_source_words or self.blend_target_words)


@dataclass
class EditResult:
    edited: torch.Tensor           # [E, C, h, w] model-space latents
    source: torch.Tensor           # [1, C, h, w] the source branch (the reconstruction)
    mask: Optional[torch.Tensor]   # [E, 1, h, w] local blend mask at the last step, or None
    store: AttentionStore


def _window(w, steps: int, name: str) -> tuple[int, int]:
    lo, hi = (0.0, w) if isinstance(w, (int, float)) else w
    if not (0.0 <= lo <= hi <= 1.0):
        raise InputError(name, f"expected a fraction of the steps in [0, 1] (or a start <= end pair), got {w!r}")
    return int(lo * steps), int(hi * steps)


def cross_alpha(settings: P2PSettings, targets: list[PromptTokens], steps: int) -> torch.Tensor:
    """alpha[T, E, L]: 1 where a target token takes the source's cross-attention at step T."""
    L = len(targets[0].ids)
    alpha = torch.zeros(steps, len(targets), L)
    lo, hi = _window(settings.cross_replace, steps, "cross_replace")
    alpha[lo:hi] = 1.0
    for word, w in settings.word_cross_replace.items():
        lo, hi = _window(w, steps, f"cross_replace for {word!r}")
        for e, tok in enumerate(targets):
            pos = tok.positions(word, "word_cross_replace")
            alpha[:, e, pos] = 0.0
            alpha[lo:hi, e, pos] = 1.0
    return alpha


def edit_controllers(settings: P2PSettings, source: PromptTokens, targets: list[PromptTokens], steps: int):
    """(controllers, store): P2P's self/cross-attention edits and reweighting, then the store that
    records the edited maps (also SpecRef's attention control)."""
    if settings.mode not in ("refine", "replace"):
        raise InputError("mode", f"expected 'refine' or 'replace', got {settings.mode!r}")
    if settings.edit_uncond not in ("inversion", "empty"):
        raise InputError("edit_uncond", f"expected 'inversion' or 'empty', got {settings.edit_uncond!r}")
    if not 0.0 <= settings.self_max_side <= 1.0:
        raise InputError("self_max_side", f"expected a fraction of the latent side in [0, 1], got "
                                          f"{settings.self_max_side!r}")
    store = AttentionStore()
    alpha = cross_alpha(settings, targets, steps)
    if settings.mode == "replace":
        mapper = torch.stack([align.replace_mapper(source, t) for t in targets])
        cross = ReplaceCross(mapper, alpha)
    else:
        maps = [align.refine_mapper(source, t) for t in targets]
        cross = RefineCross(torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps]), alpha)
    s_lo, s_hi = _window(settings.self_replace, steps, "self_replace")
    controllers = [ReplaceSelf(s_hi, settings.self_max_side, s_lo), cross]
    if settings.reweight:
        eq = torch.ones(len(targets), len(targets[0].ids))
        for word, value in settings.reweight.items():
            for e, tok in enumerate(targets):
                eq[e, tok.positions(word, "reweight")] = float(value)
        lo, hi = _window(settings.cross_replace, steps, "cross_replace")
        controllers.append(Reweight(eq, lo, hi))
    # the store records after the edits, as the reference's does (it keeps the very tensors the
    # controllers then overwrite in place): local blend and the maps see the edited attention
    controllers.append(store)
    return controllers, store


def build_controllers(settings: P2PSettings, source: PromptTokens, targets: list[PromptTokens], steps: int):
    controllers, store = edit_controllers(settings, source, targets, steps)
    blend = None
    if settings.local_blend:
        if not 0.0 < settings.blend_threshold < 1.0:
            raise InputError("blend_threshold", f"expected a value in (0, 1), got {settings.blend_threshold}")
        if not settings.blend_source_words:
            raise InputError("blend_source_words", "local blend needs at least one source word")
        positions = [source.positions_of(settings.blend_source_words, "blend_source_words")]
        for t in targets:
            tw = settings.blend_target_words
            positions.append(t.positions_of(tw, "blend_target_words") if tw and not settings.blend_source_only else [])
        blend = LocalBlend(store, positions, settings.blend_threshold,
                           _window(settings.blend_start, steps, "blend_start")[1],
                           source_only=settings.blend_source_only or not settings.blend_target_words)
    return AttentionHook(controllers), store, blend


@at_inversion_size
def p2p_edit(backend, inv: Inversion, target_prompts, settings: Optional[P2PSettings] = None,
             steps: Optional[int] = None) -> EditResult:
    settings = settings or P2PSettings()
    if isinstance(target_prompts, str):
        target_prompts = [target_prompts]
    inv.check(backend, steps)
    targets = [tokenize(backend.tokenizer, t, "target_prompt") for t in target_prompts]
    schedule = Schedule(backend.alphas_cumprod, inv.steps)
    hook, store, blend = build_controllers(settings, inv.tokens, targets, inv.steps)
    P = 1 + len(targets)
    dev = backend.device
    cond = backend.encode([inv.tokens] + targets)
    z = inv.noise.to(dev).expand(P, -1, -1, -1).clone()
    walk = inv.walk(dev, P)
    if settings.edit_uncond == "empty":
        empty = backend.encode([tokenize(backend.tokenizer, "", allow_empty=True)]).expand(P - 1, -1, -1)
        per_step = walk["uncond_at"]
        walk["uncond_at"] = lambda i: torch.cat([per_step(i)[:1], empty.to(per_step(i))])
    with backend.offload():
        z = denoise(backend, schedule, z, cond, guidance=inv.guidance, hook=hook, after_step=blend, **walk)
    mask = blend.mask.cpu() if blend is not None and blend.mask is not None else None
    return EditResult(z[1:].cpu(), z[:1].cpu(), mask, store)

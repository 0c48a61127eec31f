"""SpecRef (Chen, Huang et al.): edit a region of an inverted image after a reference image.

1. Reference bank: invert the reference latent (DDIM, guidance 1, its prompt may be empty) and
   keep the self-attention keys/values of the chosen decoder layers at the chosen steps, on the
   store device (CPU by default), plus the reference object mask M_s. Layers are chosen by
   resolution: level 0 is the finest decoder resolution that has self-attention, level 1 half
   of it, ... (the paper's layers 10-16 of SD1.5 are levels 0-1). The K/V of the inverse step
   at timestep t serve the denoising step at t, as in the reference code.
2. Edit, two branches walked down from the source inversion's noise: row 0 follows the
   inverted latents exactly (the source branch), row 1 is the edit with the target prompt,
   under Prompt-to-Prompt's attention control as in the reference code (cross-attention
   replaced for 0.8 of the steps, self-attention for 0.6). In the chosen layers and steps, the
   edit's conditional half also attends to the reference keys, masked by M_s (eq. 2-3), and
   mixes O = M_t * O_ref + (1 - M_t) * O_self (there SR-attention, not P2P, sets the
   self-attention); M_t is the edited words' cross-attention map in the edit branch after the
   P2P edits (the level nearest 16x16 maps, averaged over layers, heads and the steps so far in
   a fixed-size sum, min-max normalised, thresholded; re-estimated after every step) or a given
   mask. After each step from `blend_start` on, the edit keeps the source branch outside M_t
   (eq. 5, P2P local blend, with the same mask), so an empty M_t gives back the source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionHook, Controller, Site
from .ddim import Schedule
from .edit import P2PSettings, edit_controllers
from .errors import InputError
from .inversion import Inversion, at_inversion_size, check_latent, ddim_trajectory
from .masks import check_grid_mask, resize
from .p2p import AttentionStore, ReplaceSelf
from .sampling import denoise
from .tokens import tokenize



def step_range(start: float, end: float, steps: int) -> tuple[int, int]:
    """Fractions of the steps -> denoising step indices [lo, hi)."""
    if not 0.0 <= start <= 1.0:
        raise InputError("step_start", f"expected a fraction of the steps in [0, 1], got {start}")
    if not start <= end <= 1.0:
        raise InputError("step_end", f"expected a fraction of the steps in [step_start, 1] = [{start}, 1], got {end}")
    return int(start * steps), int(end * steps)


def _check_levels(start: int, end: int):
    if not isinstance(start, int) or start < 0:
        raise InputError("level_start", f"expected a decoder level >= 0 (0 = the finest resolution), got {start!r}")
    if not isinstance(end, int) or end < start:
        raise InputError("level_end", f"expected a decoder level >= level_start ({start}), got {end!r}")


def _keep(x: torch.Tensor, device) -> torch.Tensor:
    return x[:1].detach().to(device, copy=True, memory_format=torch.contiguous_format)


@dataclass
class ReferenceBank:
    """Self-attention K/V of a reference image's inversion (the CE_REFERENCE_KV type)."""
    fingerprint: str
    steps: int
    latent_hw: tuple
    vae_scale: int
    prompt: str
    levels: tuple                       # decoder levels kept, inclusive
    model_levels: int                   # decoder levels with self-attention the model has
    step_range: tuple                   # denoising step indices kept, [lo, hi)
    sites: dict                         # kept layer name -> level
    kv: dict                            # (layer name, step) -> (k, v), each [1, heads, N, d]
    object_mask: Optional[torch.Tensor]  # M_s [1, 1, h, w] on the latent grid; None: the whole image
    _allowed: dict = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)

    def describe(self) -> str:
        h, w = self.latent_hw
        dev = next(iter(self.kv.values()))[0].device if self.kv else "-"
        return (f"reference K/V: {len(self.sites)} layers (decoder levels {self.levels[0]}-{self.levels[1]} of "
                f"0-{self.model_levels - 1}) x {self.step_range[1] - self.step_range[0]} steps "
                f"({self.step_range[0]}..{self.step_range[1] - 1} of {self.steps}), "
                f"{w * self.vae_scale}x{h * self.vae_scale} px, {self.nbytes / 2 ** 20:.1f} MiB on {dev}")

    def check(self, backend, inv: Inversion, input_name: str = "reference"):
        if backend.fingerprint() != self.fingerprint:
            raise InputError(input_name, "was extracted with a different model (or different patches/LoRAs) than "
                                         "the one given now; extract it again with this model")
        if inv.steps != self.steps:
            raise InputError(input_name, f"was extracted with {self.steps} steps but the source inversion has "
                                         f"{inv.steps}; use the same step count for both")
        hw = tuple(inv.source.shape[2:])
        if hw != tuple(self.latent_hw):
            s = self.vae_scale
            raise InputError(input_name, f"was extracted from a {self.latent_hw[1] * s}x{self.latent_hw[0] * s} px "
                                         f"image but the source is {hw[1] * s}x{hw[0] * s} px; give both images "
                                         "the same size")

    def allowed_keys(self, height: int, width: int) -> Optional[torch.Tensor]:
        """M_s on a layer's grid as a boolean key mask [height * width] (None: every key)."""
        if self.object_mask is None:
            return None
        if (height, width) not in self._allowed:
            m = resize(self.object_mask, (height, width)).flatten()
            keep = m >= 0.5
            if not keep.any():            # a small object vanishes on a coarse grid: keep its strongest cells
                keep = m >= m.max()
            self._allowed[(height, width)] = keep
        return self._allowed[(height, width)]


def decoder_levels(scale_downs: dict) -> dict:
    """{layer name: scale-down factor} of the decoder self-attention layers -> {name: level}."""
    finest = min(scale_downs.values())
    return {n: int(round(math.log2(s / finest))) for n, s in scale_downs.items()}


class _Recorder(Controller):
    """Keeps the decoder self-attention K/V of the reference's inverse steps."""

    def __init__(self, levels, steps: range, device):
        self.levels, self.keep, self.device = levels, steps, device
        self.scale_downs: dict = {}
        self.sites: Optional[dict] = None        # known after the first model call
        self.model_levels = 0
        self.kept: dict = {}

    def kv(self, k, v, site: Site):
        if site.kind == "self" and site.place == "up":
            if self.sites is None:
                self.scale_downs.setdefault(site.name, site.scale_down())
            if site.step in self.keep and (self.sites is None or site.name in self.sites):
                self.kept[(site.name, site.step)] = (_keep(k, self.device), _keep(v, self.device))
        return k, v

    def end_step(self, step):
        if self.sites is not None:
            return
        if not self.scale_downs:
            raise InputError("model", "its UNet has no decoder self-attention layers, which SpecRef needs")
        levels = decoder_levels(self.scale_downs)
        self.model_levels = max(levels.values()) + 1
        check_levels_in(self.levels, (0, self.model_levels - 1), "the model's decoder has self-attention at "
                        f"{self.model_levels} resolutions (levels 0-{self.model_levels - 1}, 0 = the finest)")
        lo, hi = self.levels
        self.sites = {n: lv for n, lv in levels.items() if lo <= lv <= hi}
        self.kept = {key: kv for key, kv in self.kept.items() if key[0] in self.sites}


def check_levels_in(levels, available, what: str):
    if levels[0] < available[0] or levels[0] > available[1]:
        raise InputError("level_start", f"level {levels[0]} is outside the range: {what}")
    if levels[1] > available[1]:
        raise InputError("level_end", f"level {levels[1]} is outside the range: {what}")


def extract_reference(backend, latent: torch.Tensor, prompt: str = "", steps: int = 50,
                      mask: Optional[torch.Tensor] = None, level_start: int = 0, level_end: int = 1,
                      step_start: float = 0.08, step_end: float = 1.0, store_device=None) -> ReferenceBank:
    """Invert one reference latent [1, C, h, w] and keep its K/V bank.

    mask: M_s, the reference object ([1, 1, h, w] on the latent grid, see masks.latent_mask);
    None uses the whole reference. store_device: where the bank lives (default the CPU).
    """
    z0 = check_latent(backend, latent, "reference").float().to(backend.device)
    if z0.shape[0] != 1:
        raise InputError("reference", f"holds {z0.shape[0]} images; give one reference image")
    _check_levels(level_start, level_end)
    schedule = Schedule(backend.alphas_cumprod, steps)
    lo, hi = step_range(step_start, step_end, steps)
    if lo == hi:
        raise InputError("step_end", f"the range {step_start}-{step_end} of {steps} steps holds no step; widen it")
    object_mask = None
    if mask is not None:
        object_mask = check_grid_mask(mask, z0.shape[2:], "mask").cpu()
        if not bool(object_mask.ge(0.5).any()):
            raise InputError("mask", "is empty; the reference object mask M_s needs a region (leave it "
                                     "unconnected to use the whole reference image)")
        if bool(object_mask.ge(0.5).all()):
            object_mask = None              # every key allowed: same as no mask
    tokens = tokenize(backend.tokenizer, prompt or "", "reference_prompt", allow_empty=True)
    recorder = _Recorder((level_start, level_end), range(lo, hi), torch.device(store_device or "cpu"))
    cond = backend.encode([tokens])
    with backend.offload():
        ddim_trajectory(backend, z0, cond, schedule, hook=AttentionHook([recorder]))
    return ReferenceBank(backend.fingerprint(), steps, tuple(z0.shape[2:]), backend.vae_scale, prompt or "",
                         (level_start, level_end), recorder.model_levels, (lo, hi), dict(recorder.sites),
                         recorder.kept, object_mask)


class TargetRegion(Controller):
    """M_t: where the edit takes the reference. From the edited words' cross-attention in the edit
    branch (re-estimated after every step from the store's running sums) or from a fixed mask."""

    def __init__(self, store: AttentionStore, edit_positions, source_positions, threshold: float,
                 fixed: Optional[torch.Tensor] = None):
        self.store, self.edit_positions, self.source_positions = store, edit_positions, source_positions
        self.threshold, self.fixed = threshold, fixed
        self.maps = None                   # [2, 1, h, w] min-max normalised (edit words, source words)
        self._cache: dict = {}

    def end_step(self, step):
        self._cache = {}
        if self.fixed is not None or not self.store.sites:
            return
        maps = self.store.word_maps()           # [P, h, w, L] at the level nearest 16x16 maps (p2p.map_scale)
        out = []
        for row, pos in ((1, self.edit_positions), (0, self.source_positions)):
            m = maps[row][..., pos].sum(-1) if pos else torch.zeros(maps.shape[1:3], device=maps.device)
            lo, hi = m.min(), m.max()
            out.append((m - lo) / (hi - lo) if hi - lo > 1e-12 else torch.zeros_like(m))
        self.maps = torch.stack(out)[:, None]

    def _grid(self, which: int, h: int, w: int) -> Optional[torch.Tensor]:
        if self.fixed is not None:
            return resize(self.fixed, (h, w))[0] if which == 0 else None
        if self.maps is None:
            return None
        up = F.interpolate(self.maps[which:which + 1], size=(h, w), mode="bilinear", align_corners=False)
        return (up[0] >= self.threshold).float()

    def at(self, h: int, w: int) -> Optional[torch.Tensor]:
        """M_t on an h x w grid ([1, h, w]), or None while it is empty."""
        if ("t", h, w) not in self._cache:
            m = self._grid(0, h, w)
            self._cache[("t", h, w)] = m if m is not None and bool(m.gt(0).any()) else None
        return self._cache[("t", h, w)]

    def blend_mask(self, h: int, w: int, device) -> torch.Tensor:
        """The region the edit may change, [1, 1, h, w]: M_t, united with the source words' region."""
        m = self.at(h, w)
        m = torch.zeros(1, h, w, device=device) if m is None else m.to(device)
        if self.source_positions and self.fixed is None:
            s = self._grid(1, h, w)
            if s is not None:
                m = torch.maximum(m, s.to(device))
        return m[None]


class SelfOutsideReference(ReplaceSelf):
    """P2P's self-attention replacement, except where SR-attention acts: in the reference code those
    layers and steps return SR-attention's output before the P2P controller could edit them."""

    def __init__(self, base: ReplaceSelf, sites: set, steps: range):
        super().__init__(base.end, base.max_side, base.start)
        self.sites, self.steps = sites, steps

    def needs_probs(self, site):
        return super().needs_probs(site) and not (site.name in self.sites and site.step in self.steps)


class ReferenceKV(Controller):
    """SR-attention (eq. 2-3): the edit's conditional half attends to the reference keys under M_s;
    the result replaces its own attention output inside M_t."""

    def __init__(self, bank: ReferenceBank, sites, steps: range, region: TargetRegion):
        self.bank, self.sites, self.steps, self.region = bank, set(sites), steps, region

    def attend(self, q, o, site):
        if site.kind != "self" or site.step not in self.steps or site.name not in self.sites:
            return o
        c = site.layout.cond
        if c.stop - c.start < 2:
            return o
        mt = self.region.at(site.height, site.width)
        if mt is None:
            return o
        k, v = (x.to(q.device, q.dtype, non_blocking=True) for x in self.bank.kv[(site.name, site.step)])
        allowed = self.bank.allowed_keys(site.height, site.width)
        if allowed is not None:
            allowed = allowed.to(q.device)[None, None, None, :]
        e = c.start + 1
        ref = F.scaled_dot_product_attention(q[e:e + 1], k, v, attn_mask=allowed)
        w = mt.reshape(1, 1, -1, 1).to(o.device, o.dtype)
        o[e:e + 1] = torch.lerp(o[e:e + 1], ref.to(o.dtype), w)
        return o


@dataclass
class SpecRefResult:
    edited: torch.Tensor        # [1, C, h, w] model-space latent
    source: torch.Tensor        # [1, C, h, w] the source branch at the end (the inverted source)
    mask: torch.Tensor          # [1, 1, h, w] the edit region (M_t, source words) of the last step
    store: AttentionStore


@at_inversion_size
def specref_edit(backend, inv: Inversion, bank: ReferenceBank, target_prompt: str,
                 edited_words: Sequence[str] = (), level_start: int = 0, level_end: int = 1,
                 step_start: float = 0.08, step_end: float = 1.0, threshold: float = 0.3,
                 mask: Optional[torch.Tensor] = None, source_words: Sequence[str] = (),
                 blend_start: float = 0.2, mode: str = "auto", cross_replace: float = 0.8,
                 self_replace: float = 0.6, self_max_side: float = 0.5,
                 callback: Optional[Callable[[int, torch.Tensor], None]] = None) -> SpecRefResult:
    """Edit `inv` so that the edited words' region follows the reference in `bank`.

    threshold: for M_t (0.3 when words are added, 0.5 for a swapped word, as in the reference code).
    mask: a fixed M_t [1, 1, h, w] on the latent grid (replaces the words' map; source_words are then
    not used). source_words: source-prompt words whose region joins the local blend (e.g. the
    object being replaced). callback(i, z) sees both rows after each step.
    mode, cross_replace, self_replace, self_max_side: the Prompt-to-Prompt control the edit runs
    under, as the reference code's (its controller: cross-attention replaced for 0.8 of the steps,
    self-attention for 0.6; M_t is read from the edited maps). mode "auto": "replace" when both
    prompts have as many words, else "refine". cross_replace = self_replace = 0: no P2P control.
    """
    if isinstance(edited_words, str):
        edited_words = (edited_words,)
    if isinstance(source_words, str):
        source_words = (source_words,)
    inv.check(backend)
    bank.check(backend, inv)
    _check_levels(level_start, level_end)
    check_levels_in((level_start, level_end), bank.levels,
                    f"the reference bank holds decoder levels {bank.levels[0]}-{bank.levels[1]}; extract it "
                    "again with a range that covers this one")
    steps = inv.steps
    lo, hi = step_range(step_start, step_end, steps)
    if lo < hi and not (bank.step_range[0] <= lo and hi <= bank.step_range[1]):
        b0, b1 = bank.step_range
        name = "step_start" if lo < b0 else "step_end"
        raise InputError(name, f"steps {lo}..{hi - 1} are not all in the reference bank (steps {b0}..{b1 - 1} of "
                               f"{steps}); extract it again with a step range that covers this one")
    if not 0.0 < threshold < 1.0:
        raise InputError("threshold", f"expected a value in (0, 1), got {threshold}")
    if not 0.0 <= blend_start <= 1.0:
        raise InputError("blend_start", f"expected a fraction of the steps in [0, 1], got {blend_start}")
    if mode not in ("auto", "replace", "refine"):
        raise InputError("mode", f"expected 'auto', 'replace' or 'refine', got {mode!r}")
    hw = tuple(inv.source.shape[2:])
    fixed = check_grid_mask(mask, hw, "mask") if mask is not None else None
    target = tokenize(backend.tokenizer, target_prompt, "target_prompt")
    if fixed is None and not edited_words:
        raise InputError("edited_words", "name the word(s) of the target prompt whose region takes the "
                                         "reference (or give a mask)")
    edit_pos = target.positions_of(edited_words, "edited_words") if fixed is None else []
    source_pos = inv.tokens.positions_of(source_words, "source_words") if fixed is None else []
    dev = backend.device
    sites = [n for n, lv in bank.sites.items() if level_start <= lv <= level_end]
    if mode == "auto":
        mode = "replace" if len(inv.tokens.words) == len(target.words) else "refine"
    control = P2PSettings(mode=mode, cross_replace=cross_replace, self_replace=self_replace,
                          self_max_side=self_max_side)
    controllers, store = edit_controllers(control, inv.tokens, [target], steps)
    controllers[0] = SelfOutsideReference(controllers[0], set(sites), range(lo, hi))
    region = TargetRegion(store, edit_pos, source_pos, threshold, None if fixed is None else fixed.to(dev))
    hook = AttentionHook(controllers + [region, ReferenceKV(bank, sites, range(lo, hi), region)])
    first_blend = int(blend_start * steps)

    def local_blend(i, z):
        if i >= first_blend:
            m = region.blend_mask(z.shape[2], z.shape[3], z.device)
            z = torch.cat([z[:1], torch.lerp(z[:1], z[1:], m)])
        if callback is not None:
            callback(i, z)
        return z

    cond = backend.encode([inv.tokens, target])
    path = [inv.latents[steps - i - 1].to(dev) for i in range(steps)]     # the source branch, exactly
    z = inv.noise.to(dev).expand(2, -1, -1, -1).clone()
    with backend.offload():
        z = denoise(backend, Schedule(backend.alphas_cumprod, steps), z, cond, guidance=inv.guidance, hook=hook,
                    source_path=path, after_step=local_blend, uncond_at=inv.walk(dev, 2)["uncond_at"])
    final = region.blend_mask(hw[0], hw[1], torch.device("cpu"))
    return SpecRefResult(z[1:].cpu(), z[:1].cpu(), final, store)

"""DCI, "Divide, Conquer, then Integrate" (Jin et al., ECCV 2024): sampling a customized model.

A concept's K/V deltas and token pull the whole image towards the training pictures (fidelity)
at the cost of the rest of the prompt (editability). DCI separates the two in the early steps,
where the layout is decided, and joins them per pixel:

- Divide: beside the customized branch (the prompt with the concept token), an auxiliary branch
  runs the same customized model with a plain prompt (the concept token dropped or replaced by
  its class word), from the same starting noise. Both branches go through one batched model call.
- Conquer, then integrate: in every cross-attention layer of the first `fraction` of the steps,
  the customized branch's (conditional) output becomes, per query pixel p,
      O_c(p) <- w(p) O_c(p) + (1 - w(p)) O_a(p),
      w = softmax over {A_concept(p) + lambda, A_context(p)} = sigmoid((A_concept - A_context) / T + lambda),
  A_concept: the customized branch's attention on the concept tokens, A_context: the auxiliary
  branch's attention on the context tokens (every other word of the prompt), each summed over its
  tokens, averaged over heads and scaled to a maximum of 1 in that layer, so the two are
  comparable whatever the token counts. lambda > 0 favours the concept (fidelity), < 0 the
  context (editability); the temperature T is 1.
- Then: the customized branch alone for the remaining steps; the auxiliary branch is dropped,
  so it costs exactly the model rows of the steps it runs.

The merge uses the attention outputs before the output projection; the projection is affine and
the weights sum to one, so this equals merging after it. Editing from an inversion walks both
branches down from its noise with its per-step unconditional embeddings (null-text or
negative-prompt inversion keep the layout; direct inversion corrects only a source branch, which
DCI does not have, so it behaves like plain DDIM inversion here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionHook, Controller, Site
from .ddim import Schedule
from .errors import InputError, require_finite
from .inversion import Inversion, at_inversion_size
from .sampling import denoise
from .tokens import PromptTokens, tokenize


@dataclass
class DCISettings:
    fraction: float = 0.3        # share of the steps with the auxiliary branch (the paper: early 30%)
    balance: float = 0.0         # lambda: > 0 towards the concept branch, < 0 towards the context
    temperature: float = 1.0

    def check(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise InputError("integrate_fraction", f"expected a fraction of the steps in [0, 1], got {self.fraction}")
        if not -100.0 <= self.balance <= 100.0 or self.balance != self.balance:
            raise InputError("balance", f"expected lambda in [-100, 100] (useful: -2..2), got {self.balance}")
        if not 0.0 < self.temperature <= 100.0:
            raise InputError("temperature", f"expected a value in (0, 100], got {self.temperature}")


@dataclass
class DCIResult:
    latents: torch.Tensor               # [B, C, h, w] model-space latents of the customized branch
    weights: Optional[torch.Tensor]     # [B, 1, h, w] mean concept-branch weight w over layers and steps
    auxiliary_prompt: str
    integrated_steps: int


# ---- prompts -------------------------------------------------------------------------------

def default_auxiliary(prompt: str, concepts: Mapping[str, str], words: Sequence[str]) -> str:
    """The plain prompt: each concept word dropped where its class word follows ('<new1> dog' ->
    'dog'), else replaced by its class word."""
    from .tokens import split_words

    parts = split_words(prompt, tuple(concepts))
    out = []
    for i, w in enumerate(parts):
        if w in words:
            cls = concepts.get(w) or ""
            if not cls:
                raise InputError("auxiliary_prompt", f"the class word of {w!r} is unknown, so the plain prompt cannot "
                                                     "be derived; write it (e.g. the prompt with 'dog' for the token)")
            if i + 1 < len(parts) and parts[i + 1].lower() == cls.lower():
                continue
            out.append(cls)
        else:
            out.append(w)
    return " ".join(out)


def align(custom: PromptTokens, aux: PromptTokens, words: Sequence[str], concepts: Mapping[str, str]):
    """(concept positions in the customized prompt, context positions in the auxiliary prompt)."""
    classes = {(concepts.get(w) or "").lower() for w in words} - {""}
    for w in concepts:
        if w in aux.words:
            raise InputError("auxiliary_prompt", f"contains the concept token {w!r}; the auxiliary branch needs a plain "
                                                 "prompt (e.g. with the class word instead)")
    concept_pos = sorted({p for w in words for p in custom.positions(w, "concept_words")})

    def rest(tok, drop):
        return [(i, w) for i, w in enumerate(tok.words) if w not in drop and w.lower() not in classes]

    c_rest = rest(custom, set(concepts))
    a_rest = rest(aux, set())
    if [w.lower() for _, w in c_rest] != [w.lower() for _, w in a_rest]:
        raise InputError("auxiliary_prompt", "cannot be aligned with the prompt: apart from the concept tokens and "
                                             "their class words both need the same words in the same order, but the "
                                             f"prompt has {[w for _, w in c_rest]} and the auxiliary prompt "
                                             f"{[w for _, w in a_rest]}")
    if not a_rest:
        raise InputError("prompt", "has no words besides the concept and its class word, so DCI has no context to "
                                   "integrate; describe the scene (e.g. 'a <new1> dog on the beach') or set "
                                   "integrate_fraction to 0")
    context_pos = sorted(p for i, _ in a_rest for p in aux.spans[i])
    return concept_pos, context_pos


# ---- the integration -----------------------------------------------------------------------

def _peak_normalised(a: torch.Tensor) -> torch.Tensor:
    return a / a.amax(dim=-1, keepdim=True).clamp_min(1e-12)


class Integrate(Controller):
    """Merges the auxiliary rows' cross-attention outputs into the customized rows (see above).

    Rows of a call: per half, B customized rows then B auxiliary rows."""

    def __init__(self, batch: int, concept_pos, context_pos, until: int, settings: DCISettings, latent_hw):
        self.B, self.until, self.s = batch, until, settings
        self.positions = (torch.tensor(concept_pos), torch.tensor(context_pos))
        self.latent_hw = latent_hw
        self._w: Optional[torch.Tensor] = None
        self.weight_sum: Optional[torch.Tensor] = None
        self.layers = 0

    def _active(self, site: Site) -> bool:
        return site.kind == "cross" and site.step < self.until and site.layout.prompts == 2 * self.B

    def needs_probs(self, site):
        return self._active(site)

    def probs(self, p, site):
        rows = p[site.layout.cond]                       # [2B, heads, N, L]
        pc, pa = rows[:self.B], rows[self.B:]
        if self.positions[0].device != p.device:       # moved once, not in every layer of every step
            self.positions = tuple(x.to(p.device) for x in self.positions)
        a_c = pc[..., self.positions[0]].sum(-1).mean(1)     # [B, N]
        a_x = pa[..., self.positions[1]].sum(-1).mean(1)
        logit = (_peak_normalised(a_c) - _peak_normalised(a_x)) / self.s.temperature + self.s.balance
        self._w = torch.sigmoid(logit)
        self._record(self._w, site)
        return p

    def out(self, o, site):
        if self._w is None or not self._active(site):
            return o
        w = self._w.to(o.dtype)[:, None, :, None]         # [B, 1, N, 1]
        self._w = None
        c = site.layout.cond.start
        o = o.clone()
        oc, oa = o[c:c + self.B], o[c + self.B:c + 2 * self.B]
        o[c:c + self.B] = w * oc + (1 - w) * oa
        return o

    def _record(self, w, site):
        grid = w.detach().float().reshape(self.B, 1, site.height, site.width)
        grid = F.interpolate(grid, size=self.latent_hw, mode="bilinear", align_corners=False)   # stays on the device
        self.weight_sum = grid if self.weight_sum is None else self.weight_sum + grid
        self.layers += 1

    def mean_weights(self) -> Optional[torch.Tensor]:
        return None if self.weight_sum is None else (self.weight_sum / self.layers).cpu()


# ---- sampling ------------------------------------------------------------------------------

def integrated_steps(fraction: float, steps: int) -> int:
    return int(round(fraction * steps))


@at_inversion_size
def dci_sample(backend, prompt: str, concepts: Mapping[str, str], *, noise: Optional[torch.Tensor] = None,
               inversion: Optional[Inversion] = None, auxiliary_prompt: str = "",
               concept_words: Sequence[str] = (), settings: Optional[DCISettings] = None,
               steps: int = 50, guidance: float = 7.5, negative_prompt: str = "") -> DCIResult:
    """Sample the customized model with DCI from `noise` [B, C, h, w] or from an inversion.

    concepts: the concept words the model knows -> their class words ('' when unknown).
    concept_words: which of them the prompt's concept is (default: every one in the prompt).
    An empty auxiliary_prompt is derived from the prompt (default_auxiliary)."""
    s = settings or DCISettings()
    s.check()
    if (noise is None) == (inversion is None):
        raise InputError("latent_image", "give either starting noise (a latent for the size) or an inversion, not both")
    if not 1.0 <= guidance <= 30.0:
        raise InputError("guidance", f"expected a value between 1 and 30, got {guidance}")
    tok = backend.tokenizer
    custom = tokenize(tok, prompt, "prompt")
    words = _concept_words(custom, concepts, concept_words)
    if inversion is not None:
        inversion.check(backend, steps)
        if negative_prompt:
            raise InputError("negative_prompt", "an inversion brings its own unconditional embeddings; leave the "
                                                "negative prompt empty when editing from an inversion")
        start = inversion.noise
    else:
        start = require_finite("latent_image", noise)
        if start.dim() != 4 or start.shape[1] != backend.latent_channels:
            raise InputError("latent_image", f"expected noise [B, {backend.latent_channels}, h, w], got "
                                             f"{tuple(start.shape)}")
    B = start.shape[0]
    schedule = Schedule(backend.alphas_cumprod, steps)
    until = integrated_steps(s.fraction, steps) if words else 0
    aux_text = ""
    if until:
        aux_text = auxiliary_prompt.strip() or default_auxiliary(prompt, concepts, words)
        aux = tokenize(tok, aux_text, "auxiliary_prompt")
        concept_pos, context_pos = align(custom, aux, words, concepts)
    dev = backend.device
    if inversion is not None:
        u_all = inversion.walk(dev, 2 * B)["uncond_at"]
    else:
        neg = tokenize(tok, negative_prompt, "negative_prompt", allow_empty=True)
        null = backend.encode([neg])
        u_all = lambda i: null.expand(2 * B, -1, -1)    # noqa: E731
    z = start.to(dev, torch.float32)
    c_cond = backend.encode([custom]).expand(B, -1, -1)
    weights = None
    with backend.offload():
        tick = backend.progress(steps)
        if until:
            a_cond = backend.encode([aux]).expand(B, -1, -1)
            ctl = Integrate(B, concept_pos, context_pos, until, s, tuple(start.shape[2:]))
            z = denoise(backend, schedule, torch.cat([z, z]), torch.cat([c_cond, a_cond]), u_all, guidance,
                        hook=AttentionHook([ctl]), end_step=until, tick=tick)[:B]
            weights = ctl.mean_weights()
        if until < steps:
            z = denoise(backend, schedule, z, c_cond, lambda i: u_all(i)[:B], guidance, first_step=until, tick=tick)
    return DCIResult(z.cpu(), weights, aux_text, until)


def _concept_words(custom: PromptTokens, concepts: Mapping[str, str], chosen: Sequence[str]) -> tuple:
    if chosen:
        for w in chosen:
            if w not in concepts:
                known = ", ".join(sorted(concepts)) or "none"
                raise InputError("concept_words", f"{w!r} is not a concept word of this model (loaded: {known})")
            if w not in custom.words:
                raise InputError("concept_words", f"{w!r} does not occur in the prompt {custom.text!r}")
        return tuple(chosen)
    found = tuple(w for w in concepts if w in custom.words)
    if concepts and not found:
        raise InputError("prompt", f"contains none of the loaded concept words ({', '.join(sorted(concepts))}); "
                                   "put the concept token in the prompt, e.g. 'a photo of a <new1> dog on the beach'")
    return found

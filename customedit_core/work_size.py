"""How much work a run is, told before it starts (a 2048 px image on a CPU had not finished one
step after 400 s, with no word).

`estimate` counts the run's UNet evaluations of one latent (a batch row; a backward pass counts as
two more) and weighs each by the latent's size, in *units*: one unit is one UNet evaluation of a
512 px image (a 64x64 latent, P0 = 4096 latent pixels). An evaluation's cost grows with the latent's
pixels P (convolutions) and, in the self-attention of the finest levels, with P squared; at 512 px
each is taken as half of it:

    units per evaluation = P / P0 * (1 + P / P0) / 2      (1 at 512 px, 10 at 1024 px, 136 at 2048 px)

For scale: a default 50-step Prompt-to-Prompt edit at 512 px is 200 units, a default null-text
inversion 1,700, a default concept training 3,800. The estimate is relative (no device is timed).

`check_work_size` refuses a latent with a side above MAX_LATENT_SIDE (256 latent pixels: 2048 px
with Stable Diffusion's VAE) unless it is allowed (`allow=True`, or the environment variable
CUSTOMEDIT_ALLOW_LARGE=1), and logs a warning with the estimate above WARN_UNITS. Pure: no torch,
no model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .errors import InputError

MAX_LATENT_SIDE = 256          # refused above this latent side (2048 px at VAE scale 8) unless allowed
WARN_UNITS = 10_000            # logged above this (e.g. a null-text inversion at 1024 px: ~17,000)
ALLOW_ENV = "CUSTOMEDIT_ALLOW_LARGE"
BASE_PIXELS = 64 * 64          # the unit's latent: a 512 px image
BACKWARD = 3                   # a forward and backward pass, in forward evaluations

METHODS = ("invert_ddim", "invert_negative_prompt", "invert_direct", "invert_null_text", "p2p", "attention_maps",
           "specref_extract", "specref", "diffedit_mask", "diffedit_sample", "dci", "train")

log = logging.getLogger("customedit")


@dataclass(frozen=True)
class WorkEstimate:
    method: str
    latent_hw: tuple            # (height, width) of the latent
    evaluations: float          # UNet evaluations of one latent row (backward passes included)
    units: float                # the same in 512 px evaluations

    def describe(self, vae_scale: int = 8) -> str:
        h, w = self.latent_hw
        return (f"{self.method} at {w * vae_scale}x{h * vae_scale} px ({w}x{h} latent) is about "
                f"{self.evaluations:,.0f} UNet evaluations, {self.units:,.0f} times the work of one at 512 px "
                "(a default 50-step Prompt-to-Prompt edit at 512 px: 200)")


def unit_cost(latent_hw) -> float:
    """One UNet evaluation of a latent of this size, in 512 px evaluations."""
    p = _side(latent_hw[0]) * _side(latent_hw[1]) / BASE_PIXELS
    return p * (1.0 + p) / 2.0


def evaluations(method: str, steps: int, *, batch: int = 1, inner_steps: int = 10, prompts: int = 2,
                samples: int = 10, encoding_ratio: float = 1.0, integrate_fraction: float = 0.0,
                prior: bool = False, class_images: int = 0, class_steps: int = 25) -> float:
    """UNet evaluations of one latent row that `method` makes (what each core function calls).

    steps: the DDIM steps (training: the training steps; diffedit_mask: not used, `samples` counts).
    batch: images per run (DCI's latent batch; training: its batch size). inner_steps: null-text
    optimisation steps per step. prompts: rows of an edit walk (source + targets; Attention Maps with
    no target prompt: 1). prior, class_images, class_steps: training's prior preservation and the
    class images the model generates for it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    steps, batch = max(0, int(steps)), max(1, int(batch))
    if method in ("invert_ddim", "invert_negative_prompt"):
        return steps * (1 + 2)                      # inverse walk at guidance 1, guided reconstruction
    if method in ("invert_direct", "specref_extract"):
        return steps * 1.0                          # the inverse walk only
    if method == "invert_null_text":
        # inverse walk, the conditional estimate, each optimisation step (forward + backward), guided step
        return steps * (1 + 1 + BACKWARD * max(1, int(inner_steps)) + 2)
    if method in ("p2p", "attention_maps", "specref"):
        return steps * 2.0 * max(1, int(prompts))   # every prompt's row, with and without the prompt
    if method == "diffedit_mask":
        return 2.0 * max(1, int(samples))           # each noise sample under both prompts, one timestep
    if method == "diffedit_sample":
        count = max(1, round(float(encoding_ratio) * steps))
        return count * (1 + 2)                      # encode at guidance 1, decode guided
    if method == "dci":
        until = int(float(integrate_fraction) * steps)
        return batch * (until * 4.0 + (steps - until) * 2.0)   # two branches while integrating, then one
    # train: each step's batch (twice with prior preservation), forward + backward; then class images
    return steps * batch * (2 if prior else 1) * BACKWARD + (max(0, int(class_images)) * class_steps * 2
                                                             if prior else 0)


def estimate(method: str, latent_hw, steps: int, **options) -> WorkEstimate:
    """The relative cost of running `method` on a latent of `latent_hw` (height, width) for `steps`;
    options as for `evaluations`."""
    hw = (_side(latent_hw[0]), _side(latent_hw[1]))
    n = float(evaluations(method, steps, **options))
    return WorkEstimate(method, hw, n, n * unit_cost(hw))


def large_allowed(allow=None) -> bool:
    """allow True/False decides; None reads CUSTOMEDIT_ALLOW_LARGE (1/true/yes allow)."""
    if allow is not None:
        return bool(allow)
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def check_work_size(method: str, latent_hw, steps: int, *, input_name: str = "latent", vae_scale: int = 8,
                    allow=None, allow_hint: str = f"set the environment variable {ALLOW_ENV}=1", **options) -> WorkEstimate:
    """Refuse (InputError naming `input_name`) a latent side above MAX_LATENT_SIDE unless allowed;
    otherwise log a warning above WARN_UNITS. Returns the estimate. Call it before any model work."""
    est = estimate(method, latent_hw, steps, **options)
    h, w = est.latent_hw
    if max(h, w) > MAX_LATENT_SIDE and not large_allowed(allow):
        raise InputError(input_name, f"is {w * vae_scale}x{h * vae_scale} px, above the limit of "
                                     f"{MAX_LATENT_SIDE * vae_scale} px a side ({MAX_LATENT_SIDE} latent pixels): "
                                     f"{est.describe(vae_scale)}; resize the image, or {allow_hint} to run it anyway")
    if est.units > WARN_UNITS:
        log.warning("customedit: a long run: %s", est.describe(vae_scale))
    return est


def _side(v) -> int:
    if isinstance(v, bool) or int(v) != v or int(v) < 0:
        raise ValueError(f"expected a latent side (an integer >= 0), got {v!r}")
    return int(v)

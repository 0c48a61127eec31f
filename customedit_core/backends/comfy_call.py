"""One model call the way ComfyUI's samplers make it, so what other packs put on the MODEL runs.

A KSampler's call of the UNet goes `model_function_wrapper(apply_model, {input, timestep, c,
cond_or_uncond})` when one is set, else `apply_model(x, sigma, **c)`; the patcher's wrappers
(ModelPatcher.add_wrapper: APPLY_MODEL, DIFFUSION_MODEL, ...) reach apply_model and the UNet through
`c["transformer_options"]["wrappers"]`, merged there by the sampler, and the sampler runs the
patcher's pre_run / cleanup (ON_PRE_RUN / ON_CLEANUP callbacks) around sampling. We do the same on
our clone. The sampler-level wrappers (OUTER_SAMPLE, SAMPLER_SAMPLE, PREDICT_NOISE, CALC_COND_BATCH)
and the cfg functions wrap ComfyUI's own sampler and cond batching, which our DDIM loop replaces.
"""
from __future__ import annotations

import contextlib
import uuid

from .comfy_attention import HOOK_KEY


def cond_or_uncond(rows: int, hook) -> list:
    """ComfyUI's chunk labels (0 cond, 1 uncond) of a call, from the hook's layout: with cfg the core
    lays out [uncond; cond] in equal halves. Calls without a layout are one cond chunk."""
    layout = getattr(hook, "layout", None)
    if layout is not None and layout.cfg and rows == 2 * layout.prompts:
        return [1, 0]
    return [0]


class ModelCall:
    """Calls of one patcher's model, with stable per-chunk uuids (what patches key state on)."""

    def __init__(self, patcher):
        self.patcher = patcher
        self._uuids = {0: uuid.uuid4(), 1: uuid.uuid4()}
        self._runs = 0

    @contextlib.contextmanager
    def run(self):
        """pre_run / cleanup around a run of calls, as the sampler does around sampling (nests)."""
        self._runs += 1
        if self._runs == 1:
            self.patcher.pre_run()
        try:
            yield
        finally:
            self._runs -= 1
            if self._runs == 0:
                self.patcher.cleanup()

    def __call__(self, x, sigma, context, hook=None, extra=None):
        """The denoised estimate of x at sigma [B] (k-diffusion scaling), with our hook in this call."""
        import comfy.patcher_extension as pe

        patcher = self.patcher
        options = patcher.model_options
        # a copy: the merge (the sampler's, onto its own options clone) leaves the patcher's dicts alone
        to = pe.merge_nested_dicts(options.get("transformer_options", {}),
                                   {"wrappers": patcher.wrappers, "callbacks": patcher.callbacks})
        chunks = cond_or_uncond(x.shape[0], hook)
        to["cond_or_uncond"] = chunks
        to["uuids"] = [self._uuids[c] for c in chunks]
        to["sigmas"] = sigma
        to[HOOK_KEY] = hook
        c = {"c_crossattn": context, "transformer_options": to, **(extra or {})}     # extra: SDXL's y
        model = patcher.model
        with self.run():
            wrapper = options.get("model_function_wrapper")
            if wrapper is None:
                return model.apply_model(x, sigma, **c)
            return wrapper(model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": chunks})

"""The fingerprint of a ComfyUI MODEL + CLIP: what an inversion was made with.

Sampled base weights (the backup when ComfyUI applied patches in place), the weight patches
(LoRAs: their data digested), the object patches, the schedule, the CLIP's layer and concept
words, and what other packs put on the model's options that changes its function (attention
patches, model_function_wrapper, APPLY_MODEL / DIFFUSION_MODEL wrappers) by name: their own
state (an IPAdapter's image) is out of reach, but adding or removing one is seen.
"""
from __future__ import annotations

import hashlib

import torch

from .. import fingerprint as digests

# wrapper kinds that wrap a model call (the sampler-level ones never run under our sampler)
MODEL_WRAPPERS = ("apply_model", "diffusion_model")


def _digest(h, obj, depth=0):
    """Content digest of patch data: tensors by shape and a few sampled values."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        digests.update(h, obj)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _digest(h, x, depth + 1)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(h, obj[k], depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__name__.encode())
        weights = getattr(obj, "weights", None)        # LoRA-style weight adapters
        if weights is not None:
            _digest(h, weights, depth + 1)


def _digest_weights(h, patcher, module, prefix, samples=24):
    """A few sampled values of the base weights (the backup when patches are applied in place)."""
    params = sorted(module.named_parameters(), key=lambda kv: kv[0])
    if not params:
        return
    picks = sorted({round(i * (len(params) - 1) / max(1, samples - 1)) for i in range(samples)})
    backup = getattr(patcher, "backup", {}) or {}
    for i in picks:
        name, p = params[i]
        key = prefix + name
        w = backup[key].weight if key in backup else p
        _digest(h, (key, w))


def _digest_patches(h, patcher):
    for key in sorted(patcher.patches):
        h.update(key.encode())
        for p in patcher.patches[key]:
            # (strength_patch, patch, strength_model, offset, function)
            h.update(repr((p[0], p[2], p[3] if len(p) > 3 else None)).encode())
            _digest(h, p[1])
    for key in sorted(getattr(patcher, "object_patches", {})):
        h.update(f"obj:{key}:{type(patcher.object_patches[key]).__name__}".encode())


def callable_name(f) -> str:
    """A stable name for another pack's patch: its qualified name (or its class's)."""
    f = getattr(f, "func", f)                       # functools.partial
    name = getattr(f, "__qualname__", None) or type(f).__qualname__
    return f"{getattr(f, '__module__', None) or type(f).__module__}.{name}"


def _digest_model_options(h, patcher):
    options = patcher.model_options
    to = options.get("transformer_options", {})
    for kind, sites in sorted(to.get("patches_replace", {}).items()):
        for site in sorted(sites, key=str):
            h.update(f"replace:{kind}:{site}:{callable_name(sites[site])}".encode())
    for kind, patches in sorted(to.get("patches", {}).items()):
        h.update(f"patch:{kind}:{[callable_name(p) for p in patches]}".encode())
    if "model_function_wrapper" in options:
        h.update(f"unet_wrapper:{callable_name(options['model_function_wrapper'])}".encode())
    for source in (to.get("wrappers", {}), getattr(patcher, "wrappers", {})):
        for kind in MODEL_WRAPPERS:
            for key, fns in sorted(source.get(kind, {}).items(), key=lambda kv: str(kv[0])):
                h.update(f"wrapper:{kind}:{key}:{[callable_name(f) for f in fns]}".encode())


def fingerprint(model, clip, model_sampling, tokenizer) -> str:
    h = hashlib.sha1()
    inner = model.model
    h.update(f"{type(inner).__name__}/{type(inner.model_config).__name__}".encode())
    h.update("/".join(c.__name__ for c in type(model_sampling).__mro__).encode())
    _digest(h, model_sampling.sigmas)
    _digest_weights(h, model, model.get_model_object("diffusion_model"), "diffusion_model.")
    _digest_patches(h, model)
    _digest_model_options(h, model)
    cp = clip.patcher
    _digest_weights(h, cp, clip.cond_stage_model, "")
    _digest_patches(h, cp)
    h.update(repr(getattr(clip, "layer_idx", None)).encode())
    for word, i in sorted(tokenizer.added.items()):
        h.update(word.encode())
        _digest(h, tokenizer.vectors[i])
    return h.hexdigest()[:16]

"""Our attention hook at every transformer block of a ComfyUI UNet, composed with what is there.

Our clone gets an attn1/attn2 replace patch at every transformer block. The patches are
stateless: the hook of a call travels in that call's `transformer_options` (HOOK_KEY), so with no
hook they compute exactly what the model computed before.

Composition with a replace patch already on the MODEL (IPAdapter-style, another pack's, the
user's), per call of one site:
- no hook: the earlier patch runs as it would without us;
- hook: the earlier patch runs and computes the output; we hand it transformer_options with an
  `optimized_attention_override` (chained to any override already there) that runs our hook on
  the first attention it computes over this site's own q/k/v; attention over anything else it
  brings (extra image tokens) goes on to ComfyUI's attention. So its effect and our controllers'
  both reach the output, in that order: its code, our attention inside it;
- hook, and the earlier patch computed attention without the override (it did not hand its
  transformer_options on): our hook still runs on the site's q/k/v, so observers (maps, K/V
  banks) see it; if our controllers left the attention unchanged there the earlier patch's output
  is kept, otherwise the edit is refused, naming that patch: its output cannot carry our edit and
  dropping it would silently change the user's model.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..attention import Site
from ..errors import InputError
from .comfy_fingerprint import callable_name
from .comfy_support import SUPPORTED, layout_error

HOOK_KEY = "customedit_hook"
OVERRIDE_KEY = "optimized_attention_override"
BLOCK = re.compile(r"^(input|middle|output)_blocks?(?:\.(\d+))?\.\d+\.transformer_blocks\.(\d+)$")
_PLACE = {"input": "down", "middle": "mid", "output": "up"}
# optimized_attention's parameters, for reading them positionally or by name
_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def block_key(name: str):
    """(part, number, index) of a transformer block's module name, as ComfyUI keys its patches."""
    m = BLOCK.match(name)
    if m is None or (m.group(1) == "middle") != (m.group(2) is None):
        raise layout_error(name)
    part = m.group(1)
    return part, 0 if part == "middle" else int(m.group(2)), int(m.group(3))


def transformer_blocks(patcher):
    """(module name, module) of every BasicTransformerBlock of the patcher's UNet."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    dm = patcher.get_model_object("diffusion_model")
    return [(name, mod) for name, mod in dm.named_modules() if isinstance(mod, BasicTransformerBlock)]


def install_attention(patcher):
    """attn1/attn2 replace patches on every transformer block; returns their (part, number, index) keys."""
    old = patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    keys = []
    for name, _ in transformer_blocks(patcher):
        key = block_key(name)
        part, number, index = key
        for attn, kind, setter in (("attn1", "self", patcher.set_model_attn1_replace),
                                   ("attn2", "cross", patcher.set_model_attn2_replace)):
            # ComfyUI looks a site up by (part, number, index), then by (part, number)
            sites = old.get(attn, {})
            prev = sites.get(key, sites.get((part, number)))
            setter(_replacement(f"{part}.{number}.{index}.{attn}", kind, _PLACE[part], prev), part, number, index)
        keys.append(key)
    if not keys:
        raise InputError("model", f"no transformer blocks found in the UNet; {SUPPORTED}")
    return keys


def _comfy_attention(q, k, v, extra_options):
    from comfy.ldm.modules import attention as comfy_attention

    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                               attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


def _replacement(name: str, kind: str, place: str, prev=None):
    """An attn replace patch: the hook of this call, composed with `prev` (see the module doc)."""

    def run_hook(hook, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        B, N, C = q.shape
        d = C // heads
        qh, kh, vh = (x.reshape(x.shape[0], -1, heads, d).transpose(1, 2) for x in (q, k, v))
        shape = extra_options.get("activations_shape") or [B, C, N, 1]
        orig = extra_options.get("original_shape") or shape
        site = Site(name, kind, place, int(shape[-2]), int(shape[-1]), heads, int(orig[-2]), int(orig[-1]))
        o = hook(qh, kh, vh, site)
        return o.transpose(1, 2).reshape(B, -1, heads * d).to(q.dtype)

    def composed(hook, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        outer = extra_options.get(OVERRIDE_KEY)
        ran = []

        def ours(func, *args, **kwargs):
            arg = dict(zip(_PARAMS, args))
            arg.update((p, kwargs[p]) for p in _PARAMS if p in kwargs)
            a = (arg.get("q"), arg.get("k"), arg.get("v"))
            if not ran and arg.get("mask") is None and arg.get("heads") == heads:
                flat = _flat(a, heads) if arg.get("skip_reshape") else a
                if all(isinstance(x, torch.Tensor) and x.shape == y.shape for x, y in zip(flat, (q, k, v))):
                    ran.append(True)
                    o = run_hook(hook, *flat, extra_options)
                    if arg.get("skip_output_reshape"):
                        o = o.view(o.shape[0], -1, heads, o.shape[-1] // heads).transpose(1, 2)
                    return o
            return outer(func, *args, **kwargs) if outer is not None else func(*args, **kwargs)

        out = prev(q, k, v, {**extra_options, OVERRIDE_KEY: ours})
        if ran:
            return out
        o = run_hook(hook, q, k, v, extra_options)        # observers see the site all the same
        if not _unchanged(o, q, k, v, heads):
            raise InputError("model", f"carries an {name.rsplit('.', 1)[1]} replace patch ({callable_name(prev)}, "
                                      f"at {name}) that computes attention without ComfyUI's "
                                      f"{OVERRIDE_KEY}, so this edit cannot steer the attention inside it and "
                                      "will not drop it; remove that patch for the edit, or update the pack that "
                                      "sets it to pass its transformer_options to optimized_attention")
        return out

    def attention(q, k, v, extra_options):
        hook = extra_options.get(HOOK_KEY)
        if hook is None:
            return prev(q, k, v, extra_options) if prev is not None else _comfy_attention(q, k, v, extra_options)
        if prev is None:
            return run_hook(hook, q, k, v, extra_options)
        return composed(hook, q, k, v, extra_options)

    return attention


def _flat(tensors, heads):
    """[B, heads, N, d] (skip_reshape) -> [B, N, heads * d], the layout replace patches get."""
    return tuple(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) if isinstance(x, torch.Tensor) and x.ndim == 4
                 else x for x in tensors)


def _unchanged(o, q, k, v, heads) -> bool:
    """Whether the hook's output is plain attention, up to the rounding of q's dtype."""
    B, N, C = q.shape
    qh, kh, vh = (x.float().reshape(x.shape[0], -1, heads, C // heads).transpose(1, 2) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(B, N, C)
    tol = 8 * torch.finfo(q.dtype).eps * float(ref.abs().max()) + 1e-6
    return float((o.float() - ref).abs().max()) <= tol

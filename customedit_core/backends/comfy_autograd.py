"""ComfyUI's inference mode and autograd: ComfyUI runs nodes under `torch.inference_mode()` and
its loaded weights are inference tensors.

`core_context()` is where nodes call the core: inference mode off, no grad, so the tensors the
core makes are ordinary ones. The rest makes autograd reach the text embedding without copying a
weight, as follows.

Autograd must save a layer's weight to send a gradient back through it, and inference tensors
cannot be saved. ComfyUI's own trainer adds a weight wrapper to every weight; a wrapper makes
ComfyUI copy the weight at every op (`cast_bias_weight(copy=True)`), i.e. the whole UNet per call,
which made null-text inversion 1.5x slower than the diffusers backend at SD1.5's size on a CPU.

Instead each weighted layer of *our clone* gets an object patch on its `forward` that, while
autograd is on, runs the layer's op with ordinary tensors over the same memory (a DLPack round
trip: no copy). With autograd off it is ComfyUI's own forward, untouched. Object patches live on
the clone's ModelPatcher, which applies them when it loads and takes them back when another
patcher of the model (the user's KSampler) loads, so the host's model is never changed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.dlpack


@contextlib.contextmanager
def core_context():
    """Run core code from inside a ComfyUI node: ordinary (non-inference) tensors, no autograd."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def ordinary(t):
    """t, or an ordinary copy of an inference tensor (those cannot be saved for backward)."""
    return t.clone() if t.is_inference() else t


def _identity(t):
    return t


def saving_copies(grad: bool):
    """ComfyUI's text encoder adds residuals in place, which autograd refuses when the summand was
    saved for backward; saving copies (only while a gradient is wanted) makes it differentiable."""
    return torch.autograd.graph.saved_tensors_hooks(torch.clone, _identity) if grad else contextlib.nullcontext()


def alias(t):
    """An ordinary (non-inference) tensor over t's memory; t itself when it is one already. The
    weights are frozen, so nothing writes through the alias. Clone where DLPack cannot (some fp8
    dtypes, tensor subclasses)."""
    if t is None or not t.is_inference():
        return t
    try:
        return torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t.detach()))
    except (RuntimeError, TypeError, BufferError):
        return t.clone()


def _linear(m, x, w, b):
    return F.linear(x, w, b)


def _conv(m, x, w, b):
    return m._conv_forward(x, w, b)


def _group_norm(m, x, w, b):
    return F.group_norm(x, m.num_groups, w, b, m.eps)


def _layer_norm(m, x, w, b):
    return F.layer_norm(x, m.normalized_shape, w, b, m.eps)


# torch base classes of ComfyUI's ops (comfy.ops.*.Linear subclasses torch.nn.Linear, ...)
_OPS = ((torch.nn.Linear, _linear), (torch.nn.Conv1d, _conv), (torch.nn.Conv2d, _conv), (torch.nn.Conv3d, _conv),
        (torch.nn.GroupNorm, _group_norm), (torch.nn.LayerNorm, _layer_norm))


def _op_of(module):
    for cls, op in _OPS:
        if isinstance(module, cls):
            return op
    return None


def _needs_cast(m) -> bool:
    return bool(getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None)
                or getattr(m, "bias_function", None))


def _forward(module, op, own):
    def forward(*args, **kw):
        if not torch.is_grad_enabled() or len(args) != 1 or kw:
            return own(*args, **kw)
        x = args[0]
        if _needs_cast(module):
            # ComfyUI's cast (device/dtype, and the weight wrappers: K/V deltas) as its own forward does
            import comfy.ops

            w, b = comfy.ops.cast_bias_weight(module, x)[:2]
        else:
            w, b = module.weight, module.bias
        return op(module, x, alias(w), alias(b))

    return forward


def add_alias_forwards(patcher) -> int:
    """Object patches on every weighted layer of the patcher's model (see the module doc); returns
    how many. Layers of other kinds keep their forward (their weights are never saved here)."""
    n = 0
    for name, module in patcher.model.named_modules():
        op = _op_of(module)
        if op is None or getattr(module, "weight", None) is None:
            continue
        key = f"{name}.forward"
        own = patcher.get_model_object(key)      # composes with an object patch already there
        patcher.add_object_patch(key, _forward(module, op, own))
        n += 1
    return n

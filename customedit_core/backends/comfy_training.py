"""Concept training on our clone: live K/V deltas on the cross-attention projections and gradient
checkpointing of the transformer blocks, both as patches on the clone (never the host's model)."""
from __future__ import annotations

from ..errors import InputError
from .comfy_attention import BLOCK


def kv_module_names(blocks):
    """Canonical (LDM) names of the cross-attention modules of (part, number, index) block keys."""
    return [f"{'middle_block.1' if part == 'middle' else f'{part}_blocks.{number}.1'}.transformer_blocks.{index}.attn2"
            for part, number, index in blocks]


class KVDeltas:
    """W + delta for the attn2 to_k/to_v weights. The weight wrappers go on the clone once and read
    the current deltas at call time, so changing them needs no reload: the sum ComfyUI's "diff"
    patch forms, so a trained concept and the same concept loaded by LoraLoader match."""

    def __init__(self, patcher, names):
        self.patcher = patcher
        self.keys = [f"{n}.{p}" for n in names for p in ("to_k", "to_v")]
        self.deltas = None
        self.wrapped = False

    def set(self, deltas) -> bool:
        """Returns True when the clone got new wrappers (it must be reloaded to apply them)."""
        if deltas:
            unknown = sorted(set(deltas) - set(self.keys))
            if unknown:
                raise InputError("concept", f"has weights for layers this model does not have ({unknown[0]}, ...)")
        self.deltas = dict(deltas) if deltas else None
        if not deltas or self.wrapped:
            return False
        for key in self.keys:
            self.patcher.add_weight_wrapper(f"diffusion_model.{key}.weight", self._wrapper(key))
        self.wrapped = True
        return True

    def _wrapper(self, key):
        def add_delta(w):
            d = (self.deltas or {}).get(key)
            return w if d is None else w + d.to(w)
        return add_delta


def add_checkpointing(patcher) -> None:
    """Recompute each transformer block in backward: object patches on the clone's blocks."""
    import torch
    import torch.utils.checkpoint

    dm = patcher.get_model_object("diffusion_model")
    for name, mod in dm.named_modules():
        if BLOCK.match(name):
            fwd = mod.forward

            def checkpointed(*args, _fwd=fwd, **kw):
                if not torch.is_grad_enabled():
                    return _fwd(*args, **kw)
                return torch.utils.checkpoint.checkpoint(_fwd, *args, use_reentrant=False, **kw)

            patcher.add_object_patch(f"diffusion_model.{name}.forward", checkpointed)

"""Canonical names of the UNet's cross-attention key/value projections.

A concept's weight deltas are keyed by the original (LDM) layout that ComfyUI's UNet, single-file
checkpoints and LoRA files use, e.g. "input_blocks.1.1.transformer_blocks.0.attn2.to_k", so one
concept file serves every backend. diffusers numbers the same layers per block; the mapping
needs only `layers_per_block`.
"""
from __future__ import annotations

import re

_DIFFUSERS = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$|^mid_block\.attentions\.0\.(.+)$")
_LDM = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$|^middle_block\.1\.(.+)$")


def _per_block(layers_per_block) -> int:
    if isinstance(layers_per_block, (list, tuple)):
        if len(set(layers_per_block)) != 1:
            raise ValueError(f"unsupported UNet: layers_per_block differs between blocks {layers_per_block}")
        layers_per_block = layers_per_block[0]
    return int(layers_per_block)


def diffusers_to_ldm(name: str, layers_per_block) -> str:
    """'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k' -> 'input_blocks.2.1.transformer_blocks.0.attn2.to_k'."""
    L = _per_block(layers_per_block)
    m = _DIFFUSERS.match(name)
    if m is None:
        raise ValueError(f"not a UNet attention layer name: {name!r}")
    if m.group(5) is not None:
        return f"middle_block.1.{m.group(5)}"
    part, b, a, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if part == "down_blocks":
        return f"input_blocks.{1 + b * (L + 1) + a}.1.{rest}"
    return f"output_blocks.{b * (L + 1) + a}.1.{rest}"


def ldm_to_diffusers(name: str, layers_per_block) -> str:
    L = _per_block(layers_per_block)
    m = _LDM.match(name)
    if m is None:
        raise ValueError(f"not a UNet attention layer name: {name!r}")
    if m.group(4) is not None:
        return f"mid_block.attentions.0.{m.group(4)}"
    part, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if part == "input_blocks":
        b, a = divmod(i - 1, L + 1)
        return f"down_blocks.{b}.attentions.{a}.{rest}"
    b, a = divmod(i, L + 1)
    return f"up_blocks.{b}.attentions.{a}.{rest}"


def kv_names(attn2_layer: str) -> tuple[str, str]:
    """Canonical key and value projection names of one cross-attention layer ('...attn2')."""
    return f"{attn2_layer}.to_k", f"{attn2_layer}.to_v"

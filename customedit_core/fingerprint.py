"""Sampled content digests of tensors, for model fingerprints (which model an inversion was made with).

A digest reads a fixed number of evenly spaced elements, never the whole tensor, so it costs the
same for a 38 M-element token table as for a bias, on any device (weights ComfyUI keeps offloaded
are read where they lie; only the samples move to the CPU). The samples are hashed as raw bits:
the element positions are integer arithmetic (a float index cannot address past 2^24 elements)
and each dtype is reinterpreted as a same-width integer, which works for every float type
ComfyUI loads, fp8 included, and for non-contiguous views.
"""
from __future__ import annotations

import torch

SAMPLES = 32
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sample_positions(shape, count: int = SAMPLES) -> tuple:
    """Index tensors (one per dimension) of `count` evenly spaced elements in row-major order,
    first and last included."""
    n = 1
    for s in shape:
        n *= int(s)
    k = min(n, count)
    if k == 0:
        return ()
    flat = torch.arange(k, dtype=torch.int64) * (n - 1) // max(1, k - 1)
    return torch.unravel_index(flat, tuple(int(s) for s in shape)) if len(shape) else ()


def sampled_bits(t: torch.Tensor, count: int = SAMPLES) -> bytes:
    """Raw bits of `count` evenly spaced elements of t (shape and dtype not included)."""
    t = t.detach()
    if t.numel() == 0:
        return b""
    if t.dim() == 0:
        t = t.reshape(1)
    idx = tuple(i.to(t.device) for i in sample_positions(t.shape, count))
    bits = _BITS.get(t.element_size())
    if bits is not None and not t.is_complex():
        try:
            return t.view(bits)[idx].cpu().numpy().tobytes()
        except (RuntimeError, TypeError):   # a tensor subclass without a same-width view
            pass
    return t[idx].float().cpu().numpy().tobytes()


def update(h, t: torch.Tensor, count: int = SAMPLES) -> None:
    """Feed shape, dtype and sampled bits of t into the hash object h."""
    h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
    h.update(sampled_bits(t, count))

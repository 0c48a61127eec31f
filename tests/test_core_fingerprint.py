"""Sampled tensor digests (customedit_core/fingerprint.py): any size, dtype and layout."""
import hashlib

import pytest
import torch

from customedit_core import fingerprint as F


def digest(t):
    h = hashlib.sha1()
    F.update(h, t)
    return h.hexdigest()


def test_positions_stay_inside_tensors_past_float32_integers():
    # float32 holds integers exactly only up to 2^24: a float index rounds past the end of this
    n = 29_491_200                       # SD1.5's largest convolution, flattened
    (idx,) = F.sample_positions((n,))
    assert idx.dtype == torch.int64 and int(idx[-1]) == n - 1 and int(idx[0]) == 0
    assert len(idx) == F.SAMPLES and bool((idx[1:] > idx[:-1]).all())
    rows, cols = F.sample_positions((49408, 768))     # CLIP-L's token table: 38 M elements
    assert (int(rows[-1]), int(cols[-1])) == (49407, 767)


def test_large_tensor_is_sampled_without_a_copy():
    t = torch.zeros(2 ** 24 + 3, dtype=torch.float16)     # just past the float32 integer range
    t[-1] = 1.0
    before = digest(t)
    t[-1] = 2.0                           # the last element is always sampled
    assert digest(t) != before
    t[2 ** 23] = 5.0                      # an element between samples is not read
    assert digest(t) == digest(t.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.float64])
def test_every_weight_dtype_is_digested_as_its_bits(dtype):
    w = torch.randn(64, 33).to(dtype)
    assert F.sampled_bits(w) == F.sampled_bits(w.clone())
    assert len(F.sampled_bits(w)) == F.SAMPLES * w.element_size()
    other = (w.float() + 1).to(dtype)
    assert digest(other) != digest(w)
    assert digest(w.float()) != digest(w) or dtype == torch.float32     # dtype is part of the digest


def test_views_scalars_and_empty_tensors():
    w = torch.randn(40, 30)
    assert F.sampled_bits(w.t()) == F.sampled_bits(w.t().contiguous())      # non-contiguous view
    assert F.sampled_bits(w[:, ::3]) == F.sampled_bits(w[:, ::3].contiguous())
    assert F.sampled_bits(torch.tensor(3.0)) == torch.tensor([3.0]).numpy().tobytes()
    assert F.sampled_bits(torch.empty(0, 5)) == b""
    assert digest(torch.empty(0, 5)) != digest(torch.empty(5, 0))          # shape is part of the digest


def test_inference_tensors_and_no_grad_needed():
    with torch.inference_mode():
        w = torch.randn(100, 100)
    p = torch.nn.Parameter(torch.randn(100, 100))
    assert F.sampled_bits(w) and F.sampled_bits(p)

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

try:
    import torch  # noqa: E402
    torch.set_num_threads(2)
except ImportError:  # the ComfyUI venv tests import their own torch
    torch = None


@pytest.fixture(scope="session")
def tiny():
    from customedit_core.tiny import tiny_models
    return tiny_models(seed=0)


@pytest.fixture(scope="session")
def backend(tiny):
    from customedit_core.backends.diffusers import DiffusersBackend
    unet, te, tok = tiny
    return DiffusersBackend(unet, te, tok)


@pytest.fixture(scope="session")
def z0():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g)

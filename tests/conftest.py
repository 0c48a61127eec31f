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
    from testmodels.tiny import tiny_models
    return tiny_models(seed=0)


@pytest.fixture(scope="session")
def backend(tiny):
    from customedit_core.backends.diffusers import DiffusersBackend
    unet, te, tok = tiny
    return DiffusersBackend(unet, te, tok)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny models (with VAE) as a diffusers-format folder: what the CLI tests pass as --model."""
    from testmodels.ldm_layout import save_diffusers_folder
    from testmodels.tiny import tiny_models
    return save_diffusers_folder(str(tmp_path_factory.mktemp("tiny-model")), *tiny_models(with_vae=True))


@pytest.fixture
def run_cli(tiny_folder, capsys):
    """The command line's main(args) -> (exit code, stderr), on the tiny model's folder unless args give
    --model (the CLI tests check the command line's mechanics)."""
    from customedit_core.cli import main

    def run(args):
        if "--model" not in args:
            args = [args[0], "--model", tiny_folder, *args[1:]]
        return main(args), capsys.readouterr().err
    return run


@pytest.fixture(scope="session")
def z0():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g)


# ---- ComfyUI tests (test_comfy_*.py; they skip without COMFYUI_DIR before asking for these) ----

@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """Folder with the generated tiny SD1.x checkpoint and the pack linked as a custom node."""
    import comfy_support as S
    r = tmp_path_factory.getbasetemp() / "comfy"
    S.tiny_checkpoint(r)
    return r


@pytest.fixture(scope="session")
def comfy(root):
    """ComfyUI's `nodes` module, imported in-process with the pack loaded."""
    import comfy_support as S
    return S.import_comfy(root)


# ---- the real-shapes tier (random weights at SD1.5's / SD2.x's exact shapes) ----
# Opt-in: `CUSTOMEDIT_REAL_SHAPES=1 pytest -m realshapes tests` (or give -m realshapes alone).
REAL_SHAPES_ENV = "CUSTOMEDIT_REAL_SHAPES"


def pytest_configure(config):
    config.addinivalue_line("markers", "realshapes: needs models at SD1.5/SD2.x's exact shapes (minutes, GBs); "
                                       f"runs with {REAL_SHAPES_ENV}=1 or -m realshapes")


def real_shapes_enabled(config) -> bool:
    return os.environ.get(REAL_SHAPES_ENV) == "1" or "realshapes" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config, items):
    if real_shapes_enabled(config):
        return
    skip = pytest.mark.skip(reason=f"real-shapes tier: set {REAL_SHAPES_ENV}=1 or run with -m realshapes")
    for item in items:
        if "realshapes" in item.keywords:
            item.add_marker(skip)

"""Shared helpers of the ComfyUI tests (test_comfy_*.py): locating and importing a ComfyUI
checkout, the generated tiny SD1.x checkpoint, the test image and the pack folder link.

Nothing here imports ComfyUI at import time; `import_comfy()` does, following the in-process
rules of ../shared/comfyui-cpu/README.md, and skips the calling test when it cannot.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK_DIR / "workflows"
# every node id the pack's schemas declare (a new node module needs no edit here)
NODE_IDS = tuple(sorted({m for f in (Path(__file__).resolve().parents[1] / "nodes").glob("*.py")
                         for m in re.findall(r'node_id="(CustomEdit\w+)"', f.read_text())}))
CKPT_NAME = "customedit_tiny_sd15.safetensors"
IMAGE_NAME = "customedit_test.png"
IMAGE_SIZE = 64
_TINY_SCRIPT_DEFAULT = PACK_DIR.parent / "shared" / "comfyui-cpu" / "make_tiny_sd15.py"


def comfy_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    if not d or not (Path(d) / "comfy" / "model_management.py").is_file():
        return None
    return Path(d).resolve()


def skip_unless_comfy():
    """Module-level skip, before anything imports ComfyUI or its dependencies."""
    if comfy_dir() is None:
        pytest.skip("COMFYUI_DIR is not set to a ComfyUI checkout", allow_module_level=True)
    for dep in ("torch", "safetensors", "einops", "transformers", "PIL", "yaml", "aiohttp"):
        try:
            __import__(dep)
        except Exception as e:  # noqa: BLE001 - any import failure means: no ComfyUI here
            pytest.skip(f"ComfyUI's dependencies are not importable here ({dep}: {e})", allow_module_level=True)


def tiny_script() -> Path:
    p = Path(os.environ.get("CUSTOMEDIT_TINY_SD15", _TINY_SCRIPT_DEFAULT))
    if not p.is_file():
        pytest.skip(f"tiny checkpoint generator not found at {p} (set CUSTOMEDIT_TINY_SD15)")
    return p


def tiny_checkpoint(root: Path) -> Path:
    """root/checkpoints/<CKPT_NAME>, generated once per session (random weights, TAESD VAE)."""
    out = root / "checkpoints" / CKPT_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        tmp = out.with_suffix(".partial")
        subprocess.run([sys.executable, str(tiny_script()), "--comfy", str(comfy_dir()), "--vae", "taesd",
                        "--out", str(tmp)], check=True, env=env, timeout=300, capture_output=True)
        tmp.rename(out)
    return out


REAL_SHAPES_NAMES = {"sd15": "customedit_sd15_shapes.safetensors", "sd2": "customedit_sd2_shapes.safetensors"}
SDXL_CKPT_NAME = "customedit_tiny_sdxl.safetensors"
TINY_SDXL_NODE = Path(__file__).resolve().parent / "comfy_tiny_sdxl_node"


def tiny_sdxl_checkpoint(root: Path) -> Path:
    """root/checkpoints/<SDXL_CKPT_NAME>, generated once per session by make_tiny_sdxl.py (ComfyUI loads
    it as SDXL through the test-only entry that custom_nodes_dir links in)."""
    out = root / "checkpoints" / SDXL_CKPT_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        tmp = out.with_suffix(".partial")
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "make_tiny_sdxl.py"),
                        "--comfy", str(comfy_dir()), "--out", str(tmp)], check=True, env=env, timeout=300,
                       capture_output=True)
        tmp.rename(out)
    return out


def checkpoint(root: Path, shapes: str) -> str:
    """The checkpoint name (under root/checkpoints) of a model tier: "tiny" (the shared generator's
    2-level SD1.x UNet), "sdxl" (make_tiny_sdxl.py's tiny SDXL), or "sd15" / "sd2" (random weights at
    those models' exact shapes, written by testmodels.real_shapes in a subprocess, so this process never
    holds the diffusers copy)."""
    if shapes == "tiny":
        tiny_checkpoint(root)
        return CKPT_NAME
    if shapes == "sdxl":
        return tiny_sdxl_checkpoint(root).name
    out = root / "checkpoints" / REAL_SHAPES_NAMES[shapes]
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
               "PYTHONPATH": str(PACK_DIR)}
        subprocess.run([sys.executable, "-m", "testmodels.real_shapes", "--family", shapes, "--out", str(out)],
                       check=True, env=env, timeout=900, capture_output=True, cwd=str(PACK_DIR))
    return out.name


def custom_nodes_dir(root: Path) -> Path:
    """root/custom_nodes holding a link named `customedit` to this pack, and the test-only node that
    makes the tiny SDXL checkpoint loadable (it matches only that file's widths)."""
    d = root / "custom_nodes"
    d.mkdir(parents=True, exist_ok=True)
    for name, target in (("customedit", PACK_DIR), ("customedit_tiny_sdxl", TINY_SDXL_NODE)):
        link = d / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return d


def image_array(size: int = IMAGE_SIZE):
    """A deterministic RGB test picture (float32 HxWx3 in 0..1): gradient background, a disc."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size].astype("float32") / (size - 1)
    disc = ((x - 0.55) ** 2 + (y - 0.45) ** 2 < 0.07).astype("float32")
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.25 + 0.0 * x], -1)
    img = img * (1 - disc[..., None]) + disc[..., None] * np.array([0.9, 0.6, 0.2], "float32")
    return img.astype("float32")


def write_test_image(folder: Path, name: str = IMAGE_NAME) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray((image_array() * 255).round().astype("uint8")).save(path)
    return path


_STATE = {}


def import_comfy(root: Path):
    """Import ComfyUI in this process (once) and load the pack; returns ComfyUI's `nodes` module."""
    if "nodes" in _STATE:
        return _STATE["nodes"]
    import asyncio

    cdir = str(comfy_dir())
    if cdir in sys.path:
        sys.path.remove(cdir)
    sys.path.insert(0, cdir)                 # ahead of the repo root: its `nodes/` is not ComfyUI's
    try:
        from comfy.cli_args import args

        args.cpu = True                      # before anything imports comfy.model_management
        import utils.extra_config            # noqa: F401  - before `nodes` shadows `utils`
        import folder_paths
        import nodes
    except ImportError as e:
        pytest.skip(f"cannot import ComfyUI from {cdir}: {e}")
    folder_paths.add_model_folder_path("checkpoints", str(root / "checkpoints"))
    folder_paths.add_model_folder_path("custom_nodes", str(custom_nodes_dir(root)))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _STATE["nodes"] = nodes
    return nodes


def pack_module(nodes, suffix: str):
    """A module of the pack as ComfyUI imported it (its own copy, under a path-derived name)."""
    mod = sys.modules[nodes.NODE_CLASS_MAPPINGS["CustomEditP2PEdit"].__module__]
    prefix = mod.__name__[: -len(".nodes.edit")]
    if not suffix:
        return sys.modules[prefix]
    import importlib

    return importlib.import_module(f"{prefix}.{suffix}")     # imported on first use (e.g. the diffusers backend)


class ServerStub:
    """What execution.PromptExecutor needs of the server."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def run_node(comfy, node_id, **kw):
    """Call a node as ComfyUI does (under inference mode); returns its outputs."""
    import torch

    with torch.inference_mode():
        return comfy.NODE_CLASS_MAPPINGS[node_id].execute(**kw).result


def expect_input_error(input_name, fn, *args, **kw):
    """fn(...) raises the pack's InputError naming `input_name`; returns its message."""
    with pytest.raises(ValueError) as info:
        fn(*args, **kw)
    err = info.value
    assert type(err).__name__ == "InputError", repr(err)
    assert err.input_name == input_name, str(err)
    assert str(err).startswith(f"{input_name}: ")
    return str(err)

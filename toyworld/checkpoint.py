"""A training run's full state on disk, so a run can stop and go on later as if it never stopped.

The state is the modules' weights, the optimiser's moments and step counts, the batch generator's
state (so a resumed run draws fresh batches, the ones the uninterrupted run would have drawn), the
step reached and the losses so far. Tensors go to safetensors, the rest to JSON (no pickle is ever
written or read); both are written beside the target and renamed into place, so a crash while
writing leaves the previous state.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

TENSORS, META = "state.safetensors", "state.json"


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(folder: str, modules: dict, opt: Optional[torch.optim.Optimizer], gen: torch.Generator,
         meta: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    groups = None
    if opt is not None:
        sd = opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
        groups = sd["param_groups"]
    tensors["generator"] = gen.get_state()
    _atomic(os.path.join(folder, TENSORS), lambda p: save_file(tensors, p))
    _atomic(os.path.join(folder, META), lambda p: json.dump(dict(meta, param_groups=groups), open(p, "w")))


def load(folder: str) -> Optional[tuple[dict, dict]]:
    """(tensors, meta) of a saved state, or None when the folder holds none."""
    if not (os.path.isfile(os.path.join(folder, TENSORS)) and os.path.isfile(os.path.join(folder, META))):
        return None
    with open(os.path.join(folder, META)) as f:
        meta = json.load(f)
    return load_file(os.path.join(folder, TENSORS)), meta


def restore(tensors: dict, meta: dict, modules: dict, opt: Optional[torch.optim.Optimizer],
            gen: torch.Generator) -> None:
    for name, m in modules.items():
        sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        m.load_state_dict(sub, strict=True)
    if opt is not None and meta.get("param_groups") is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["generator"])

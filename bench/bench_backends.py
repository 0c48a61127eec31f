#!/usr/bin/env python
"""The two backends side by side: each inversion method and one P2P edit, on one checkpoint file loaded
by ComfyUI (ComfyBackend, as the nodes run it: weights loaded under inference mode) and by the pack's
single-file loader (DiffusersBackend), with the seconds of each and their ratio.

    COMFYUI_DIR=/path/to/ComfyUI OMP_NUM_THREADS=2 /path/to/comfy/python bench/bench_backends.py
    ... --family sd2 --size 64 --steps 4 --repeat 2
    ... --checkpoint path/to/sd15.safetensors --device cuda --size 512 --steps 50

Without --checkpoint, random weights at the family's exact shapes are written once to
--cache (testmodels/real_shapes.py, 2 GB in fp16). The two backends alternate run by run (comfy,
diffusers, comfy, ...) so a machine that slows down mid-run affects both alike; the fastest of
--repeat runs is reported. JSON goes to bench/results/backends-*.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

from bench_engine import SOURCE, TARGET, write_json  # noqa: E402

METHODS = ("ddim", "negative_prompt", "direct", "null_text")


def import_comfy(comfy_dir: str, cpu: bool):
    """ComfyUI in this process, following its in-process import rules (see ../shared/comfyui-cpu)."""
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = cpu                           # before anything imports comfy.model_management
    import comfy.sd  # noqa: F401
    return comfy


def load_comfy(path: str):
    import comfy.sd

    with torch.inference_mode():             # as CheckpointLoaderSimple runs: inference-tensor weights
        model, clip, _vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=False)[:3]
    return model, clip


def load_diffusers(path: str, device, dtype):
    from customedit_core import single_file as sf
    from customedit_core.backends.diffusers import DiffusersBackend
    from customedit_core.clip_vocab import clip_tokenizer

    ck = sf.inspect_checkpoint(path)
    tok = clip_tokenizer("!" if ck.family == "sd2" else "<|endoftext|>")
    unet, te = sf.build_unet(ck), sf.build_text_encoder(ck, tok)
    ck.state_dict.clear()
    for m in (unet, te):
        m.requires_grad_(False).to(device, dtype)
    return DiffusersBackend(unet, te, tok, prediction_type=ck.prediction_type, device=device, dtype=dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("sd15", "sd2"), default="sd15")
    ap.add_argument("--checkpoint", help="an SD1.x/SD2.x .safetensors (default: random weights at --family's shapes)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "customedit-bench"),
                    help="folder for the generated checkpoint (default $TMPDIR/customedit-bench)")
    ap.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps (default 4)")
    ap.add_argument("--inner-steps", type=int, default=10, help="null-text inner steps (default 10)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeat", type=int, default=1, help="runs per backend and method; the fastest is reported")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--methods", default=",".join(METHODS + ("p2p",)), help="comma-separated subset")
    ap.add_argument("--out", help="JSON path (default bench/results/backends-<family>-<device>-<size>px-<steps>st.json)")
    a = ap.parse_args(argv)
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_management.py")):
        ap.error("set COMFYUI_DIR to a ComfyUI checkout (and run with a Python that has its dependencies)")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = a.checkpoint
    if path is None:
        path = os.path.join(a.cache, f"{a.family}-shapes.safetensors")
        if not os.path.isfile(path):
            os.makedirs(a.cache, exist_ok=True)
            print(f"writing {path} (random weights at {a.family}'s shapes)", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "testmodels.real_shapes", "--family", a.family, "--out", path],
                           check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    import_comfy(comfy_dir, cpu=device.type == "cpu")
    from customedit_core.backends.comfy import ComfyBackend, core_context
    from customedit_core.edit import P2PSettings, p2p_edit
    from customedit_core.inversion import invert

    t0 = time.perf_counter()
    model, clip = load_comfy(path)
    comfy_b = ComfyBackend(model, clip)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    diff_b = load_diffusers(path, device, dtype)
    load_s = time.perf_counter() - t0
    side = a.size // 8 // comfy_b.latent_multiple * comfy_b.latent_multiple
    z0 = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)) * 0.8
    wanted = [m.strip() for m in a.methods.split(",") if m.strip()]
    backends = {"comfy": comfy_b, "diffusers": diff_b}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clock(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    rows = {}
    with core_context():
        for b in backends.values():          # warm-up: load, one guided call, one backward
            invert(b, z0, SOURCE, steps=1, guidance=a.guidance, method="null_text", inner_steps=1)
        for method in METHODS:
            if method not in wanted and not (method == "null_text" and "p2p" in wanted):
                continue
            best, records = {}, {}
            for _ in range(a.repeat):
                for name, b in backends.items():
                    inv, s = clock(lambda: invert(b, z0, SOURCE, steps=a.steps, guidance=a.guidance,
                                                  method=method, inner_steps=a.inner_steps))
                    best[name] = min(best.get(name, float("inf")), s)
                    records[name] = inv
            if method in wanted:
                rows[f"invert_{method}"] = best
            if method == "null_text" and "p2p" in wanted:
                best = {}
                for _ in range(a.repeat):
                    for name, b in backends.items():
                        _, s = clock(lambda: p2p_edit(b, records[name], TARGET,
                                                      P2PSettings(mode="refine", blend_source_words=("cat",))))
                        best[name] = min(best.get(name, float("inf")), s)
                rows["p2p_refine_blend"] = best
    for r in rows.values():
        r["ratio"] = r["comfy"] / r["diffusers"]
    result = {"checkpoint": path, "family": a.family if a.checkpoint is None else "file", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "size_px": a.size,
              "latent": list(z0.shape), "steps": a.steps, "inner_steps": a.inner_steps, "guidance": a.guidance,
              "repeat": a.repeat, "load_seconds": load_s, "runs": rows}
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"backends-{result['family']}-{device.type}-{a.size}px-{a.steps}st.json")
    write_json(out, result)
    print(f"{path} on {device} ({result['device_name']}, {result['threads']} threads), {a.size}px, {a.steps} steps, "
          f"guidance {a.guidance}, null-text inner steps {a.inner_steps}, fastest of {a.repeat}")
    print(f"{'run':<22}{'comfy s':>10}{'diffusers s':>13}{'comfy / diffusers':>19}")
    for name, r in rows.items():
        print(f"{name:<22}{r['comfy']:>10.2f}{r['diffusers']:>13.2f}{r['ratio']:>19.2f}")
    print(f"wrote {out}")
    diff_b.close()
    return result


if __name__ == "__main__":
    main()

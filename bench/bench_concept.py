#!/usr/bin/env python
"""Concept training benchmark: seconds per training step, peak memory, and the time to a usable
concept (class-image generation + encoding the augmented views + all steps), per configuration.

    OMP_NUM_THREADS=2 python bench/bench_concept.py                              # tiny model, CPU
    OMP_NUM_THREADS=2 python bench/bench_concept.py --sd15-shapes --size 128 --steps 3
    python bench/bench_concept.py --sd15-shapes --device cuda --size 512 --steps 20   # the 512 px figure

The time to a usable concept is the measured setup plus `--full-steps` (default 250, the Custom
Diffusion recipe) times the measured seconds per step, with the class images the run generated
(`--class-images`, default 16, at 25 DDIM steps). Peak memory is measured as in bench_engine.py
(CUDA: max allocated; CPU: peak RSS above the level before the run). JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

from bench_engine import Meter, real_shaped, write_json  # noqa: E402


def tiny_pipeline(device):
    from customedit_core.backends.diffusers import DiffusersBackend
    from testmodels.tiny import tiny_models

    unet, te, tok, vae = tiny_models(0, with_vae=True)
    for m in (unet, te, vae):
        m.to(device)
    return DiffusersBackend(unet, te, tok, device=device), vae, 0.18215, "tiny (tests' model)"


def main(argv=None):
    from customedit_core import customize
    from customedit_core.customize import TrainSettings, train_concept

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15-shapes", action="store_true", help="SD1.5-sized random weights instead of the tiny model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64, help="reference image side in pixels")
    ap.add_argument("--steps", type=int, default=6, help="training steps measured per configuration")
    ap.add_argument("--full-steps", type=int, default=250)
    ap.add_argument("--class-images", type=int, default=16)
    ap.add_argument("--configs", default="fp32,prior,ckpt,ico", help="comma list of: fp32 (no prior), prior, ckpt, bf16, fp16, ico")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    if a.sd15_shapes:
        pipe = real_shaped(device, torch.float32)
        backend, vae, scale, label = pipe.backend, pipe.vae, pipe.scaling_factor, pipe.source
    else:
        backend, vae, scale, label = tiny_pipeline(device)

    def encode(px):
        return vae.encode(px.permute(0, 3, 1, 2).to(device) * 2 - 1).latent_dist.mean * scale

    g = torch.Generator().manual_seed(0)
    refs = torch.rand(4, a.size, a.size, 3, generator=g)
    meter = Meter(device)
    results = []
    for name in [c.strip() for c in a.configs.split(",") if c.strip()]:
        s = TrainSettings(class_word="dog", steps=a.steps, batch_size=2, learning_rate=1e-5, seed=0,
                          prior_weight=0.0 if name in ("fp32", "bf16", "fp16") else 1.0,
                          num_class_images=a.class_images, precision=name if name in ("bf16", "fp16") else "fp32",
                          gradient_checkpointing=name == "ckpt", ico=name == "ico")
        stamps = []
        customize._CLASS_CACHE.clear()          # every configuration pays for its class images
        meter.start()
        t0 = time.perf_counter()
        res = train_concept(backend, refs, encode, s, on_step=lambda i, loss: stamps.append(time.perf_counter()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        peak = meter.stop()
        first_step_end = stamps[0]
        per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else total
        setup = first_step_end - t0 - per_step
        row = dict(config=name, prior=s.prior_weight > 0, seconds_per_step=round(per_step, 4), setup_seconds=round(setup, 2),
                   peak_mib=round(peak, 1), measured_steps=len(stamps), measured_total_seconds=round(total, 2),
                   usable_concept_seconds=round(setup + a.full_steps * per_step, 1), final_loss=res.losses[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    info = dict(model=label, device=str(device), size=a.size, full_steps=a.full_steps, class_images=a.class_images,
                torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                memory_method=meter.method,
                gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None, results=results)
    out = a.out or os.path.join(ROOT, "bench", "results", f"concept-{'sd15' if a.sd15_shapes else 'tiny'}-{a.size}-{device.type}.json")
    print("wrote", write_json(out, info))


if __name__ == "__main__":
    main()

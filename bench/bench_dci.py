#!/usr/bin/env python
"""DCI overhead: seconds and peak memory of DCI sampling versus plain sampling of the same customized
model (a concept with random K/V deltas and token vector), as ratios, per integrate fraction.

    OMP_NUM_THREADS=2 python bench/bench_dci.py                                   # tiny model, CPU
    OMP_NUM_THREADS=2 python bench/bench_dci.py --sd15-shapes --size 128 --steps 10
    python bench/bench_dci.py --sd15-shapes --device cuda --size 512 --steps 50   # the 512 px figure

Plain sampling is the same sampler with integrate fraction 0 (no auxiliary branch, fused attention).
DCI runs both branches in one batched model call for the first fraction of the steps, with explicit
attention probabilities in the cross-attention layers of those steps; the expected time ratio is
about 1 + fraction (twice the rows for that share of the steps) plus the cost of explicit cross-attention.
Each configuration runs `--repeats` times after one warm-up; the median is reported. Peak memory is
measured as in bench_engine.py. JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

from bench_engine import Meter, real_shaped, write_json  # noqa: E402

PROMPT = "a photo of a <new1> dog on the grass"


def tiny_backend(device):
    from customedit_core.backends.diffusers import DiffusersBackend
    from testmodels.tiny import tiny_models

    unet, te, tok = tiny_models(0)
    unet.to(device)
    te.to(device)
    return DiffusersBackend(unet, te, tok, device=device), "tiny (tests' model)"


def random_concept(backend):
    from customedit_core import concept as C

    g = torch.Generator().manual_seed(0)
    probe = C.probe(backend)
    width = backend.token_embedding_table().shape[1]
    deltas = {k: (torch.randn(w.shape, generator=g) * 0.01).to(w.dtype) for k, w in backend.kv_weights().items()}
    return C.Concept(("<new1>",), ("dog",), torch.randn(1, width, generator=g) * 0.3, deltas, probe,
                     C.fingerprint_of(probe), {}, "bench")


def main(argv=None):
    from customedit_core import concept as C
    from customedit_core.dci import DCISettings, dci_sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15-shapes", action="store_true", help="SD1.5-sized random weights instead of the tiny model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default=None, help="default: fp16 on cuda, fp32 on cpu")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fractions", default="0.3,1.0", help="integrate fractions compared with plain (0)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, None: None}[a.dtype]
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if a.sd15_shapes:
        pipe = real_shaped(device, dtype)
        backend, label = pipe.backend, pipe.source
    else:
        backend, label = tiny_backend(device)
    C.apply(backend, random_concept(backend))
    side = a.size // backend.vae_scale
    noise = torch.randn(1, backend.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    meter = Meter(device)

    def run(fraction):
        times, peaks = [], []
        for k in range(a.repeats + 1):
            meter.start()
            t0 = time.perf_counter()
            res = dci_sample(backend, PROMPT, {"<new1>": "dog"}, noise=noise, settings=DCISettings(fraction),
                             steps=a.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            peak = meter.stop()
            if k:                                   # the first run warms up
                times.append(dt)
                peaks.append(peak)
        return statistics.median(times), max(peaks), res

    results = []
    base_t, base_m, _ = run(0.0)
    row = dict(fraction=0.0, seconds=round(base_t, 4), peak_mib=round(base_m, 1), time_ratio=1.0, memory_ratio=1.0)
    results.append(row)
    print(json.dumps(row), flush=True)
    for f in [float(x) for x in a.fractions.split(",") if x.strip()]:
        t, m, res = run(f)
        row = dict(fraction=f, integrated_steps=res.integrated_steps, seconds=round(t, 4), peak_mib=round(m, 1),
                   time_ratio=round(t / base_t, 3), memory_ratio=round(m / base_m, 3) if base_m > 0 else None,
                   expected_time_ratio_rows_only=round(1 + res.integrated_steps / a.steps, 3))
        results.append(row)
        print(json.dumps(row), flush=True)
    info = dict(model=label, device=str(device), dtype=str(dtype), size=a.size, steps=a.steps, repeats=a.repeats,
                torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), memory_method=meter.method,
                gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None, results=results)
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"dci-{'sd15' if a.sd15_shapes else 'tiny'}-{a.size}-{device.type}.json")
    print("wrote", write_json(out, info))


if __name__ == "__main__":
    main()

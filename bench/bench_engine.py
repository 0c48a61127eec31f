#!/usr/bin/env python
"""Engine benchmark: time and peak memory of each inversion method and of one P2P edit, each as a
ratio to a plain DDIM sampling run (same model, steps, guidance 7.5, same process).

    OMP_NUM_THREADS=2 python bench/bench_engine.py                       # tiny model, CPU
    OMP_NUM_THREADS=2 python bench/bench_engine.py --sd15-shapes --size 256 --steps 5
    python bench/bench_engine.py --sd15-shapes --device cuda --size 512 --steps 50
    python bench/bench_engine.py --model path/to/sd15.safetensors --device cuda

Runs, in this order, after one warm-up model call (forward and backward):
  baseline      plain DDIM sampling from noise: one prompt, CFG 7.5, no hooks (run first and again
                last; the ratios use the mean time, the drift between the two is reported)
  ddim          deterministic inversion + its reconstruction
  negative_prompt, direct, null_text (--inner-steps, default 10)
  p2p_refine_blend   one Prompt-to-Prompt refine edit with a local blend, on the null-text record
Peak memory: on CUDA, torch.cuda.max_memory_allocated() above what was allocated before the run.
On the CPU, the process's peak resident set size above its size before the run: Linux's VmHWM,
reset before each run through /proc/self/clear_refs (exact); elsewhere psutil sampling every 2 ms
when installed, else ru_maxrss (never reset, so only runs that raise the process's peak show).
The JSON (default bench/results/engine-*.json) records which was used.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SOURCE = "a photo of a cat on grass"
TARGET = "a photo of a striped cat on grass"
BLEND = ("cat",)


# --- memory -------------------------------------------------------------------------------
def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Meter:
    """Peak memory above the level at start() in MiB, for one run."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (above the allocation before the run)"
        elif _procfs_ok():
            self.method = "peak RSS delta: Linux VmHWM reset via /proc/self/clear_refs before each run"
        else:
            try:
                import psutil  # noqa: F401
                self.method = "peak RSS delta: psutil RSS sampled every 2 ms"
            except ImportError:
                self.method = "peak RSS delta: ru_maxrss (never reset; a lower bound for later runs)"

    def start(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.method.startswith("peak RSS delta: Linux"):
            self.base = _rss_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        elif "psutil" in self.method:
            import psutil
            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self.peak, self._stop = self.base, threading.Event()

            def poll():
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.002)
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        else:
            self.base = _rss_kb_fallback()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("peak RSS delta: Linux"):
            peak = _rss_kb("VmHWM") * 1024
        elif "psutil" in self.method:
            self._stop.set()
            self._thread.join()
            peak = self.peak
        else:
            peak = _rss_kb_fallback()
        return max(0, peak - self.base) / 2 ** 20


def _procfs_ok() -> bool:
    try:
        _rss_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb_fallback() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r * (1 if sys.platform == "darwin" else 1024)


# --- models -------------------------------------------------------------------------------
def real_shaped(device, dtype, family: str = "sd15"):
    """Random weights at SD1.5's (or SD2.x's) exact shapes: UNet, CLIP text encoder with CLIP's real
    49,408-token tokenizer, SD KL VAE (testmodels/real_shapes.py)."""
    from testmodels import real_shapes

    from customedit_core import api
    from customedit_core.backends.diffusers import DiffusersBackend

    unet, te, tok, vae = real_shapes.build(family)
    te = real_shapes.text_encoder_for_conditioning(family, te)
    for m, dt in ((unet, dtype), (te, dtype), (vae, torch.float32)):
        m.to(device)
        if next(m.parameters()).dtype != dt:
            m.to(dt)
    backend = DiffusersBackend(unet, te, tok, prediction_type=real_shapes.PREDICTION[family], device=device, dtype=dtype)
    backend.vae_scale = 8
    n = sum(p.numel() for p in unet.parameters())
    return api.Pipeline(backend, vae, 0.18215, f"{family}-shapes (random weights, UNet {n / 1e6:.0f}M params)",
                        f"{family}-shapes", log=lambda s: None)


def sdxl_shaped(device, dtype):
    """Random weights at SDXL base's exact shapes (testmodels/real_shapes.build_sdxl), through
    api.from_models as a user's SDXL modules would go."""
    from testmodels import real_shapes

    from customedit_core import api

    unet, te, te2, tok, tok2, vae = real_shapes.build_sdxl()
    n = sum(p.numel() for p in unet.parameters())
    return api.from_models(unet, te, tok, vae, device=device, dtype=dtype, text_encoder_2=te2, tokenizer_2=tok2,
                           source=f"sdxl-shapes (random weights, UNet {n / 1e6:.0f}M params)", family="sdxl-shapes",
                           log=lambda s: None, default_size=1024)


# --- runs ---------------------------------------------------------------------------------
def timed(meter, device, fn, repeat=1):
    """(output, fastest seconds, largest peak MiB) over `repeat` runs."""
    best_s, best_mb = float("inf"), 0.0
    for _ in range(repeat):
        out, s, mb = _timed_once(meter, device, fn)
        best_s, best_mb = min(best_s, s), max(best_mb, mb)
    return out, best_s, best_mb


def _timed_once(meter, device, fn):
    meter.start()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    return out, sec, meter.stop()


# --- shared by the bench scripts -------------------------------------------------------------
def add_model_args(ap, sd15_cpu_size: int):
    ap.add_argument("--model", help="diffusers folder or SD1.x/SD2.x .safetensors (default: the tiny model)")
    ap.add_argument("--sd15-shapes", action="store_true", help="random weights at SD1.5's exact shapes")
    ap.add_argument("--sd2-shapes", action="store_true", help="random weights at SD2.x-768-v's exact shapes")
    ap.add_argument("--sdxl-shapes", action="store_true", help="random weights at SDXL base's exact shapes "
                                                               "(1024 px on cuda)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50 on cuda, 10 on cpu)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default: 512 on cuda; on cpu "
                                                           f"{sd15_cpu_size} for --sd15/sd2-shapes, 64 for tiny)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                    help="UNet/text encoder precision (default fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as set by OMP_NUM_THREADS)")


def setup(a, sd15_cpu_size: int):
    """Threads, device, precision, step count and model of a run:
    (pipe, label, device, dtype, steps, size in px rounded to the model's multiple, load seconds)."""
    from customedit_core import api

    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             None: torch.float16 if device.type == "cuda" else torch.float32}[a.dtype]
    steps = a.steps or (50 if device.type == "cuda" else 10)
    t0 = time.perf_counter()
    if getattr(a, "sdxl_shapes", False):
        pipe = sdxl_shaped(device, dtype)
        size = a.size or (1024 if device.type == "cuda" else sd15_cpu_size)
        label = "sdxl-shapes"
    elif a.sd15_shapes or a.sd2_shapes:
        family = "sd2" if a.sd2_shapes else "sd15"
        pipe = real_shaped(device, dtype, family)
        size = a.size or ((768 if a.sd2_shapes else 512) if device.type == "cuda" else sd15_cpu_size)
        label = f"{family}-shapes"
    elif a.model is None:
        from testmodels.tiny import tiny_pipeline

        pipe = tiny_pipeline(device, dtype, log=lambda s: print(s, file=sys.stderr))
        size = a.size or (512 if device.type == "cuda" else 64)
        label = "tiny"
    else:
        pipe = api.load(a.model, device=device, dtype=dtype, log=lambda s: print(s, file=sys.stderr))
        size = a.size or (512 if device.type == "cuda" else 256)
        label = os.path.splitext(os.path.basename(a.model.rstrip("/")))[0]
    load_s = time.perf_counter() - t0
    m = pipe.pixel_multiple
    return pipe, label, device, dtype, steps, max(m, size // m * m), load_s


def write_json(out: str, result: dict) -> str:
    """Write a result file atomically (a finished JSON or nothing); returns its path."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def print_table(rows):
    print(f"{'run':<26}{'seconds':>10}{'x DDIM':>9}{'peak MiB':>11}{'x DDIM':>9}")
    for name, r in rows.items():
        mr = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        print(f"{name:<26}{r['seconds']:>10.2f}{r['time_ratio']:>9.2f}{r['peak_mib']:>11.1f}{mr:>9}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, sd15_cpu_size=256)
    ap.add_argument("--inner-steps", type=int, default=10, help="null-text inner steps (default 10)")
    ap.add_argument("--methods", default="ddim,negative_prompt,direct,null_text,p2p",
                    help="comma-separated subset of ddim,negative_prompt,direct,null_text,p2p")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each measurement N times; report the fastest time and the largest peak")
    ap.add_argument("--out", help="JSON path (default bench/results/engine-<model>-<device>-<size>px-<steps>st.json)")
    a = ap.parse_args(argv)

    from customedit_core import api
    from customedit_core.ddim import Schedule
    from customedit_core.edit import P2PSettings, p2p_edit
    from customedit_core.inversion import invert
    from customedit_core.sampling import denoise
    from customedit_core.tokens import tokenize

    pipe, label, device, dtype, steps, size, load_s = setup(a, sd15_cpu_size=256)
    b = pipe.backend
    z0 = pipe.encode_image(api.demo_scene(size)).to(device)
    meter = Meter(device)
    wanted = [s.strip() for s in a.methods.split(",") if s.strip()]

    # warm-up: one guided call and one backward through the UNet
    src = tokenize(b.tokenizer, SOURCE)
    empty = tokenize(b.tokenizer, "", allow_empty=True)
    cond, null = b.encode([src, empty]).chunk(2)
    with torch.no_grad():
        b.predict_eps(torch.cat([z0, z0]), 500, torch.cat([null, cond]))
    u = null.clone().requires_grad_(True)
    with b.grad_enabled():
        torch.autograd.grad(b.predict_eps(z0, 500, u).square().mean(), [u])
    del u

    schedule = Schedule(b.alphas_cumprod, steps)
    zT = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    _, base_s, base_mb = timed(meter, device, lambda: denoise(b, schedule, zT, cond, lambda i: null, a.guidance),
                                   a.repeat)
    rows = {"baseline_ddim_sampling": {"seconds": base_s, "peak_mib": base_mb}}
    records = {}
    for method in ("ddim", "negative_prompt", "direct", "null_text"):
        if method not in wanted and not (method == "null_text" and "p2p" in wanted):
            continue
        inv, sec, mb = timed(meter, device, lambda: invert(b, z0, SOURCE, steps=steps, guidance=a.guidance,
                                                           method=method, inner_steps=a.inner_steps),
                              a.repeat)
        records[method] = inv
        row = {"seconds": sec, "peak_mib": mb}
        if method == "null_text":
            row["inner_steps_used"] = sum(inv.inner_steps_used)
            row["inner_steps_max"] = steps * a.inner_steps
        if method in wanted:
            rows[f"invert_{method}"] = row
    if "p2p" in wanted:
        settings = P2PSettings(mode="refine", blend_source_words=BLEND)
        res, sec, mb = timed(meter, device, lambda: p2p_edit(b, records["null_text"], TARGET, settings),
                               a.repeat)
        rows["p2p_refine_blend"] = {"seconds": sec, "peak_mib": mb, "inversion": "null_text",
                                    "mask_fraction": float(res.mask.mean()) if res.mask is not None else None}
    # the baseline again at the end: ratios use the mean of both, and the drift between them shows how
    # steady the machine was (other processes on a shared CPU)
    _, end_s, end_mb = timed(meter, device, lambda: denoise(b, schedule, zT, cond, lambda i: null, a.guidance),
                             a.repeat)
    base = rows.pop("baseline_ddim_sampling")
    base_s, base_mb = (base_s + end_s) / 2, max(base_mb, end_mb)
    rows = {"baseline_ddim_sampling": {"seconds": base_s, "peak_mib": base_mb, "seconds_first": base["seconds"],
                                       "seconds_last": end_s}, **rows}
    drift = abs(end_s - base["seconds"]) / base_s
    for r in rows.values():
        r["time_ratio"] = r["seconds"] / base_s
        r["memory_ratio"] = r["peak_mib"] / base_mb if base_mb > 0 else None

    weights_mib = sum(p.numel() * p.element_size() for mod in (b.unet, b.text_encoder, pipe.vae)
                      for p in mod.parameters()) / 2 ** 20
    result = {
        "model": pipe.source, "label": label,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "size_px": size, "latent": list(z0.shape), "steps": steps, "guidance": a.guidance,
        "inner_steps": a.inner_steps, "repeat": a.repeat, "source": SOURCE, "target": TARGET, "blend_words": list(BLEND),
        "memory_method": meter.method, "baseline_drift": drift, "weights_mib": weights_mib, "load_seconds": load_s,
        "runs": rows,
    }
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"engine-{label}-{device.type}-{size}px-{steps}st.json")
    write_json(out, result)
    print(f"{result['model']} on {result['device']} ({result['device_name']}, {result['threads']} threads, "
          f"{result['dtype']}), {size}px, {steps} steps, guidance {a.guidance}, null-text inner steps "
          f"{a.inner_steps}")
    print(f"memory: {meter.method}")
    print(f"baseline measured first and last: {base['seconds']:.2f} s and {end_s:.2f} s (drift {100 * drift:.0f}%; "
          "ratios use the mean)")
    print_table(rows)
    if "invert_null_text" in rows:
        r = rows["invert_null_text"]
        print(f"null-text inner steps used: {r['inner_steps_used']} of {r['inner_steps_max']}")
    print(f"wrote {out}")
    pipe.close()
    return result


if __name__ == "__main__":
    main()

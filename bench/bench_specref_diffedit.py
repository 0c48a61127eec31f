#!/usr/bin/env python
"""SpecRef and DiffEdit benchmark: time and peak memory of each step as a ratio to a plain DDIM sampling
run (same model, steps, guidance 7.5, same process), and the size of SpecRef's reference K/V bank.

    OMP_NUM_THREADS=2 python bench/bench_specref_diffedit.py                     # tiny model, CPU
    OMP_NUM_THREADS=1 python bench/bench_specref_diffedit.py --sd15-shapes --size 128 --steps 5
    python bench/bench_specref_diffedit.py --sd15-shapes --device cuda --size 512 --steps 50
    OMP_NUM_THREADS=2 python bench/bench_specref_diffedit.py --sdxl-shapes --size 128 --steps 3 --samples 2

Runs, after one warm-up model call: baseline (plain DDIM sampling with CFG, first and last; ratios use
the mean), specref_extract (inversion of the reference keeping its K/V), specref_edit (on a direct
inversion of the source, which is not counted), diffedit_mask (--samples noise samples),
diffedit_sample (encoding ratio 0.8). Memory is measured as in bench_engine.py.

The bank size at the native size (SD1.5 512 px, SDXL 1024 px; the two finest decoder levels with
self-attention, steps 4..49 of 50; the key names the size) is computed
from the UNet's layer shapes: per kept layer and step, K and V of [tokens, channels] each; the same
formula is checked against the bank measured here.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

from bench_engine import Meter, add_model_args, print_table, setup, timed, write_json  # noqa: E402

SOURCE = "a red circle on green grass"
TARGET = "a yellow circle on green grass"
EDITED = ("yellow", "circle")


def decoder_self_attention(unet):
    """[(layer name, scale-down factor, channels)] of the decoder's self-attention layers, from the UNet's
    structure: up block j of n works at 1/2^(n-1-j) of the latent side."""
    n = len(unet.up_blocks)
    out = []
    for name, mod in unet.named_modules():
        if name.startswith("up_blocks.") and name.endswith("attn1"):
            j = int(name.split(".")[1])
            out.append((name, 2 ** (n - 1 - j), mod.to_k.out_features))
    return out


def bank_bytes(layers, latent_side: int, steps_kept: int, levels=(0, 1), bytes_per_value: int = 2) -> int:
    """K + V of the kept decoder levels (0 = the finest with self-attention) over the kept steps."""
    finest = min(s for _, s, _ in layers)
    total = 0
    for _, scale, channels in layers:
        level = (scale // finest).bit_length() - 1
        if levels[0] <= level <= levels[1]:
            tokens = (latent_side // scale) ** 2
            total += 2 * tokens * channels * bytes_per_value
    return total * steps_kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, sd15_cpu_size=128)
    ap.add_argument("--samples", type=int, default=10, help="DiffEdit mask noise samples (default 10)")
    ap.add_argument("--out", help="JSON path (default bench/results/specref_diffedit-<model>-<device>-<size>px-"
                                  "<steps>st.json)")
    a = ap.parse_args(argv)

    from customedit_core import api
    from customedit_core.ddim import Schedule
    from customedit_core.diffedit import diffedit_mask, diffedit_sample
    from customedit_core.inversion import invert
    from customedit_core.sampling import denoise
    from customedit_core.specref import extract_reference, specref_edit
    from customedit_core.tokens import tokenize

    pipe, label, device, dtype, steps, size, load_s = setup(a, sd15_cpu_size=128)
    b = pipe.backend
    scene = api.demo_scene(size)
    z0 = pipe.encode_image(scene).to(device)
    zr = pipe.encode_image(scene.transpose(0)).to(device)           # the reference: the scene mirrored
    meter = Meter(device)

    src = tokenize(b.tokenizer, SOURCE)
    empty = tokenize(b.tokenizer, "", allow_empty=True)
    cond, null = b.encode([src, empty]).chunk(2)
    with torch.no_grad():
        b.predict_eps(torch.cat([z0, z0]), 500, torch.cat([null, cond]))          # warm-up

    schedule = Schedule(b.alphas_cumprod, steps)
    zT = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def baseline():
        return denoise(b, schedule, zT, cond, lambda i: null, a.guidance)

    _, first_s, first_mb = timed(meter, device, baseline)
    rows = {}
    bank, sec, mb = timed(meter, device, lambda: extract_reference(b, zr, "", steps=steps))
    rows["specref_extract"] = {"seconds": sec, "peak_mib": mb, "bank_mib": bank.nbytes / 2 ** 20,
                               "bank_layers": len(bank.sites), "bank_steps": bank.step_range[1] - bank.step_range[0]}
    inv = invert(b, z0, SOURCE, steps=steps, guidance=a.guidance, method="direct")
    res, sec, mb = timed(meter, device, lambda: specref_edit(b, inv, bank, TARGET, EDITED, source_words=("red",)))
    rows["specref_edit"] = {"seconds": sec, "peak_mib": mb, "mask_fraction": float(res.mask.mean())}
    found, sec, mb = timed(meter, device, lambda: diffedit_mask(b, z0, SOURCE, TARGET, samples=a.samples))
    rows["diffedit_mask"] = {"seconds": sec, "peak_mib": mb, "samples": a.samples,
                             "mask_fraction": float(found.mask.mean())}
    region = found.mask if found.mask.any() else torch.ones_like(found.mask)
    _, sec, mb = timed(meter, device, lambda: diffedit_sample(b, z0, region, TARGET, encoding_ratio=0.8, steps=steps,
                                                              guidance=a.guidance))
    rows["diffedit_sample"] = {"seconds": sec, "peak_mib": mb, "encoding_ratio": 0.8}
    _, last_s, last_mb = timed(meter, device, baseline)
    base_s, base_mb = (first_s + last_s) / 2, max(first_mb, last_mb)
    rows = {"baseline_ddim_sampling": {"seconds": base_s, "peak_mib": base_mb, "seconds_first": first_s,
                                       "seconds_last": last_s}, **rows}
    for r in rows.values():
        r["time_ratio"] = r["seconds"] / base_s
        r["memory_ratio"] = r["peak_mib"] / base_mb if base_mb > 0 else None

    layers = decoder_self_attention(b.unet)
    element = next(iter(bank.kv.values()))[0].element_size()
    latent_side = z0.shape[2]
    measured_formula = bank_bytes(layers, latent_side, rows["specref_extract"]["bank_steps"], bank.levels, element)
    kept_512 = 50 - int(0.08 * 50)
    native = 128 if getattr(b, "sdxl", False) else 64      # latent side at the native size: SDXL 1024 px, SD1.5 512
    bank_512 = {f"{name}_mib": bank_bytes(layers, native, kept_512, (0, 1), nbytes) / 2 ** 20
                for name, nbytes in (("fp16", 2), ("fp32", 4))}
    unet_params = sum(p.numel() for p in b.unet.parameters())
    bank_512["ratio_to_unet_weights"] = bank_512["fp16_mib"] * 2 ** 20 / (2 * unet_params)   # same precision
    result = {
        "model": pipe.source, "label": label, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "size_px": size, "latent": list(z0.shape), "steps": steps, "guidance": a.guidance,
        "source": SOURCE, "target": TARGET, "edited_words": list(EDITED), "memory_method": meter.method,
        "baseline_drift": abs(last_s - first_s) / base_s, "load_seconds": load_s, "runs": rows,
        "bank": {"measured_bytes": bank.nbytes, "formula_bytes": measured_formula,
                 "formula_matches": measured_formula == bank.nbytes,
                 "layers_kept": sorted(bank.sites), "levels": list(bank.levels),
                 f"at_{native * 8}px_50_steps_levels_0_1_steps_4_to_49": bank_512},
    }
    out = a.out or os.path.join(ROOT, "bench", "results", f"specref_diffedit-{label}-{device.type}-{size}px-{steps}st.json")
    write_json(out, result)
    print(f"{result['model']} on {result['device']} ({result['device_name']}, {result['threads']} threads, "
          f"{result['dtype']}), {size}px, {steps} steps, guidance {a.guidance}, DiffEdit samples {a.samples}")
    print(f"memory: {meter.method}")
    print(f"baseline measured first and last: {first_s:.2f} s and {last_s:.2f} s "
          f"(drift {100 * result['baseline_drift']:.0f}%; ratios use the mean)")
    print_table(rows)
    print(f"reference K/V bank here: {bank.describe()} (layer-shape formula "
          f"{'matches' if result['bank']['formula_matches'] else 'DIFFERS: ' + str(measured_formula)})")
    if label != "tiny":
        print(f"bank at {native * 8}x{native * 8}, 50 steps (4..49), decoder levels 0-1: {bank_512['fp16_mib']:.0f} MiB fp16, "
              f"{bank_512['fp32_mib']:.0f} MiB fp32 ({bank_512['ratio_to_unet_weights']:.2f}x the UNet's weights "
              "in the same precision)")
    print(f"wrote {out}")
    pipe.close()
    return result


if __name__ == "__main__":
    main()

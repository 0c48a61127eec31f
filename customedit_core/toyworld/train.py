"""Train the toy-world model: the VAE first, then the text encoder and the UNet together.

    OMP_NUM_THREADS=2 python -m customedit_core.toyworld.train                     # CPU: the shipped model
    python -m customedit_core.toyworld.train --device cuda --scenes 60000 --unet-steps 30000 --batch 128

Writes a diffusers-format folder (unet/, text_encoder/, vae/ as .safetensors, tokenizer/,
scheduler/, model_index.json, training.json with the settings, losses and timings) atomically:
into a temporary folder beside the target, renamed into place at the end. Scenes are the world's
seeds 1000000.. (the benchmark and tests use seeds below that); captions are dropped for 10% of
the samples so that classifier-free guidance works; images are mirrored at random (no caption
word depends on left and right). UNet loss: epsilon MSE with min-SNR-5 weighting.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M
from .world import render, sample_scene

TRAIN_SEED0 = 1_000_000


def render_scenes(n: int, size: int, log) -> tuple[torch.Tensor, list]:
    t = time.time()
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    caps = []
    for i in range(n):
        s = sample_scene(TRAIN_SEED0 + i)
        imgs[i] = np.round(render(s, size)[0] * 255)
        caps.append(s.caption())
        if (i + 1) % 5000 == 0:
            log(f"rendered {i + 1}/{n} scenes ({time.time() - t:.0f} s)")
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0, caps


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train_vae(vae, images, steps, batch, lr, device, log, g):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    t = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = torch.randint(images.shape[0], (batch,), generator=g)
        x = images[idx].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log(f"vae {step + 1}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t:.0f} s)")
    vae.eval()
    return losses


@torch.no_grad()
def encode_all(vae, images, device, batch=256):
    out = [vae.encode(images[i:i + batch].to(device)).latent_dist.mean.cpu() for i in range(0, images.shape[0], batch)]
    return torch.cat(out)


def train_unet(unet, te, tok, latents, captions, steps, batch, lr, device, log, g, snapshot=None):
    from ..ddim import sd_alphas_cumprod

    alphas = sd_alphas_cumprod().float().to(device)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr                    # min-SNR-5 for epsilon prediction
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    unet.train()
    te.train()
    losses = []
    t = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = torch.randint(latents.shape[0], (batch,), generator=g)
        z0 = latents[idx].to(device)
        flip = torch.rand(batch, generator=g) < 0.5
        z0 = torch.where(flip.to(device)[:, None, None, None], z0.flip(-1), z0)
        tok_ids = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        tok_ids[drop] = empty
        ts = torch.randint(1000, (batch,), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        a = alphas[ts][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ctx = te(tok_ids.to(device))[0]
        eps = unet(zt, ts, ctx).sample
        loss = (weight[ts] * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log(f"unet {step + 1}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - t:.0f} s)")
        if snapshot is not None and (step + 1) % snapshot[1] == 0 and step + 1 < steps:
            snapshot[0](step + 1)
    unet.eval()
    te.eval()
    return losses


def save(out: str, unet, te, tok, vae, info: dict):
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(out)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        te.save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=True)
        vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(M.SCHEDULER, f, indent=1)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                       "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                       "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}, f, indent=1)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(info, f, indent=1)
        old = out + ".old"
        if os.path.exists(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=M.FOLDER)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=16000)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", help="start the text encoder and UNet from an earlier run's folder")
    ap.add_argument("--vae-from", help="take the VAE of an earlier run's folder instead of training one")
    ap.add_argument("--snapshot", help="write the model so far to this folder every --snapshot-every steps")
    ap.add_argument("--snapshot-every", type=int, default=1000)
    ap.add_argument("--cache", help="keep the rendered scenes in this .npz (reused when it matches --scenes)")
    a = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)       # noqa: E731
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    import tempfile
    tok = M.build_tokenizer(tempfile.mkdtemp(prefix="toyworld-tok-"))
    te, unet = M.build_text_encoder(tok).to(device), M.build_unet().to(device)
    if a.resume:            # go on training an earlier run's text encoder and UNet (same tokenizer)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        unet = UNet2DConditionModel.from_pretrained(a.resume, subfolder="unet").to(device)
        te = CLIPTextModel.from_pretrained(os.path.join(a.resume, "text_encoder")).to(device)
    if a.cache and os.path.isfile(a.cache) and len(np.load(a.cache)["captions"]) == a.scenes:
        data = np.load(a.cache)
        images, captions = torch.from_numpy(data["images"]), [str(c) for c in data["captions"]]
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
    else:
        images, captions = render_scenes(a.scenes, M.IMAGE_SIZE, log)
        if a.cache:
            px = torch.round((images + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
            np.savez(a.cache, images=px.numpy(), captions=np.array(captions))
    t1 = time.time()
    if a.vae_from:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.vae_from, subfolder="vae").to(device).eval()
        with open(os.path.join(a.vae_from, "training.json")) as f:
            vae_losses = json.load(f).get("vae_losses", [0.0])
    else:
        vae = M.build_vae().to(device)
        vae_losses = train_vae(vae, images, a.vae_steps, a.vae_batch, a.vae_lr, device, log, g)
    t2 = time.time()
    mean = encode_all(vae, images, device)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latent std {mean.std():.3f}: scaling factor {scale:.4f}")
    snap = None
    if a.snapshot:
        def write_snapshot(step):
            save(a.snapshot, copy.deepcopy(unet).cpu().eval(), copy.deepcopy(te).cpu().eval(), tok, vae.cpu(),
                 dict(snapshot_step=step, unet_steps=step, vae_steps=a.vae_steps))
            vae.to(device)
            unet.train()
            te.train()
            log(f"snapshot at step {step} in {a.snapshot}")
        snap = (write_snapshot, a.snapshot_every)
    unet_losses = train_unet(unet, te, tok, mean * scale, captions, a.unet_steps, a.batch, a.lr, device, log, g, snap)
    t3 = time.time()
    before = 0
    if a.resume and os.path.isfile(os.path.join(a.resume, "training.json")):
        with open(os.path.join(a.resume, "training.json")) as f:
            before = int(json.load(f).get("unet_steps_total", 0))
    info = dict(vars(a), out=None, cache=None, snapshot=None, resume=bool(a.resume), unet_steps_total=before + a.unet_steps, device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                seconds=dict(render=round(t1 - t0, 1), vae=round(t2 - t1, 1), unet=round(t3 - t2, 1)),
                scaling_factor=scale, vae_loss_last100=float(np.mean(vae_losses[-100:])),
                unet_loss_last100=float(np.mean(unet_losses[-100:])) if unet_losses else None,
                vae_losses=[round(x, 5) for x in vae_losses[::10]], unet_losses=[round(x, 5) for x in unet_losses[::10]],
                parameters=dict(unet=sum(p.numel() for p in unet.parameters()),
                                text_encoder=sum(p.numel() for p in te.parameters()),
                                vae=sum(p.numel() for p in vae.parameters())))
    save(a.out, unet.cpu(), te.cpu(), tok, vae.cpu(), info)
    log(f"wrote {a.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Train the toy-world model: the VAE, then the text encoder and the UNet together, with the
cross-attention of every described word supervised by its object's exact mask.

    OMP_NUM_THREADS=2 python -m toyworld.train --checkpoint /tmp/tw-run            # from scratch
    python -m toyworld.train --init toyworld/weights --vae-from toyworld/weights --checkpoint RUN
    python -m toyworld.train --device cuda --arch wide --scenes 60000 --unet-steps 30000 --batch 128

A run is resumable: with `--checkpoint DIR` it writes its whole state there every
`--checkpoint-every` steps (and at `--stop-after`), and the same command started again goes on from
the last state, drawing the batches the uninterrupted run would have drawn (same weights, to the
bit, on the same machine). The trained model is written as a diffusers-format folder (unet/,
text_encoder/, vae/ as .safetensors, tokenizer/, scheduler/, model_index.json, training.json with
the settings, losses and timings), atomically, when the last step is done.

Scenes are the world's seeds 1000000.. (the benchmark and tests use seeds below that); captions
are dropped for 10 % of the samples so that classifier-free guidance works, and a share take
Custom Diffusion's template and view prefixes (captions.py); images (and masks) are mirrored at
random (no caption word depends on left and right). UNet loss: epsilon MSE with min-SNR-5
weighting, plus `--attn-weight` x the cross-attention supervision (attn_supervision.py).
`--init` starts the text encoder and UNet from an earlier model (v1's words keep their vectors;
new words start at the mean vector), `--vae-from` takes its VAE instead of training one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from customedit_core.ddim import sd_alphas_cumprod

from . import attn_supervision as S
from . import captions as C
from . import checkpoint as K
from . import model as M
from .world import render, sample_scene

TRAIN_SEED0 = 1_000_000
RESUME_KEYS = ("arch", "size", "scenes", "vae_steps", "vae_batch", "vae_lr", "unet_steps", "batch", "lr",
               "attn_weight", "seed", "init", "vae_from")


def render_scenes(n: int, size: int, log):
    """(images [n, 3, size, size] uint8, object coverage [n, 2, size/4, size/4] float16, scenes)."""
    t = time.time()
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    cover = np.zeros((n, 2, size // 4, size // 4), dtype=np.float16)
    scenes = []
    for i in range(n):
        s = sample_scene(TRAIN_SEED0 + i)
        img, masks = render(s, size)
        imgs[i] = np.round(img * 255)
        cover[i, :len(masks)] = masks.reshape(len(masks), size // 4, 4, size // 4, 4).mean(axis=(2, 4))
        scenes.append(s)
        if (i + 1) % 5000 == 0:
            log(f"rendered {i + 1}/{n} scenes ({time.time() - t:.0f} s)")
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(cover), scenes


def caption_tokens(tok, scenes, seed: int):
    """(token ids [n, 77], labels [n, 77], captions) with each scene's caption drawn by its own rng."""
    ids, labels, caps = [], [], []
    for i, s in enumerate(scenes):
        words = C.words(s, np.random.default_rng([seed, i]))
        t, lab = C.token_labels(tok, words)
        ids.append(t)
        labels.append(lab)
        caps.append(" ".join(w for w, _ in words))
    return torch.tensor(ids), torch.tensor(labels), caps


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _pixels(images_u8):
    return images_u8.float() / 127.5 - 1.0


def train_vae(vae, images, steps, batch, lr, device, log, g):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    t = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x = _pixels(images[torch.randint(images.shape[0], (batch,), generator=g)]).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
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
    out = [vae.encode(_pixels(images[i:i + batch]).to(device)).latent_dist.mean.cpu()
           for i in range(0, images.shape[0], batch)]
    return torch.cat(out)


def adopt_text_encoder(te_new, te_old, tok_new, tok_old) -> None:
    """Copy an earlier text encoder into one over a larger vocabulary: every weight, and each
    token's vector by its spelling (ids move when words are added); new tokens get the mean."""
    old_emb = te_old.get_input_embeddings().weight.data
    sd = {k: v for k, v in te_old.state_dict().items() if "token_embedding" not in k}
    missing = te_new.load_state_dict(sd, strict=False).missing_keys
    assert all("token_embedding" in k for k in missing), missing
    emb = te_new.get_input_embeddings().weight.data
    emb[:] = old_emb.mean(0)
    old_vocab = tok_old.get_vocab()
    for word, i in tok_new.get_vocab().items():
        if word in old_vocab:
            emb[i] = old_emb[old_vocab[word]]


def train_unet(unet, te, data, state, a, device, log, g, save_state):
    """The UNet + text encoder stage from state["step"] to a.unet_steps (or a.stop_after)."""
    latents, cover, ids, labels, empty = data
    alphas = sd_alphas_cumprod().float().to(device)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr                    # min-SNR-5 for epsilon prediction
    rec = S.install(unet)
    rec.active = a.attn_weight > 0
    opt = state["opt"]
    params = [p for grp in opt.param_groups for p in grp["params"]]
    unet.train()
    te.train()
    t = time.time()
    end = state["step"] if a.export else min(a.unet_steps, a.stop_after or a.unet_steps)
    for step in range(state["step"], end):
        for group in opt.param_groups:
            group["lr"] = _lr(step, a.unet_steps, a.lr)
        idx = torch.randint(latents.shape[0], (a.batch,), generator=g)
        flip = (torch.rand(a.batch, generator=g) < 0.5).to(device)[:, None, None, None]
        z0 = torch.where(flip, latents[idx].to(device).flip(-1), latents[idx].to(device))
        m = cover[idx].float().to(device)
        m = torch.where(flip, m.flip(-1), m)
        drop = torch.rand(a.batch, generator=g) < 0.1
        tok_ids = torch.where(drop[:, None], empty[None], ids[idx])
        lab = torch.where(drop[:, None], 0, labels[idx]).to(device)
        ts = torch.randint(1000, (a.batch,), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        al = alphas[ts][:, None, None, None]
        rec.maps.clear()
        eps = unet(al.sqrt() * z0 + (1 - al).sqrt() * noise, ts, te(tok_ids.to(device))[0]).sample
        loss_eps = (weight[ts] * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        loss_attn = S.loss(rec.maps, lab, m) if rec.active else loss_eps.new_zeros(())
        loss = loss_eps + a.attn_weight * loss_attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["losses"].append(round(float(loss_eps.detach()), 5))
        state["attn_losses"].append(round(float(loss_attn.detach()), 5))
        state["step"] = step + 1
        if (step + 1) % 100 == 0:
            iou = S.map_iou(rec.maps, lab, m, a.size // 4) if rec.active else float("nan")
            log(f"unet {step + 1}/{a.unet_steps} loss {np.mean(state['losses'][-100:]):.4f} attn "
                f"{np.mean(state['attn_losses'][-100:]):.3f} map IoU {iou:.2f} ({time.time() - t:.0f} s)")
        if (step + 1) % a.checkpoint_every == 0 or step + 1 == end:
            save_state()
    S.uninstall(unet, rec)
    unet.eval()
    te.eval()
    state["seconds"] = state.get("seconds", 0.0) + time.time() - t


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def save(out: str, unet, te, tok, vae, info: dict, dtype: torch.dtype = torch.float32):
    unet, te, vae = (m if dtype == torch.float32 else copy.deepcopy(m).to(dtype) for m in (unet, te, vae))
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
        for extra in ("demo.png", "demo.json", "README.md"):      # what the folder ships beside the weights
            if os.path.isfile(os.path.join(out, extra)):
                shutil.copy2(os.path.join(out, extra), tmp)
        old = out + ".old"
        if os.path.exists(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=M.FOLDER)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="v1", choices=sorted(M.ARCHS))
    ap.add_argument("--size", type=int, default=M.IMAGE_SIZE, help="image side in px (a multiple of 16)")
    ap.add_argument("--scenes", type=int, default=16000)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-steps", type=int, default=5000, help="the run's total UNet steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--attn-weight", type=float, default=0.05, help="weight of the cross-attention supervision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start the text encoder and UNet from an earlier model's folder")
    ap.add_argument("--vae-from", help="take the VAE of an earlier model's folder instead of training one")
    ap.add_argument("--checkpoint", help="keep the run's state here, and go on from it when it exists")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--stop-after", type=int, help="stop (state saved) after this many UNet steps of the run")
    ap.add_argument("--export", action="store_true",
                    help="write the model as the checkpoint has it now, without training on (a run cut short: "
                         "training.json says at which step of how many)")
    ap.add_argument("--cache", help="keep the rendered scenes in this .npz (reused when it matches)")
    ap.add_argument("--save-dtype", choices=("fp32", "fp16"), default="fp32",
                    help="precision of the written weights (fp16: half the size, for the shipped folder; the "
                         "pack loads them in float32 on the CPU); the run's own state is always float32")
    a = ap.parse_args(argv)
    if a.size % 16 or a.size < 16:
        ap.error(f"--size: expected a multiple of 16 (the VAE's 4x and the UNet's 4x), got {a.size}")
    return a


def _scenes(a, log):
    if a.cache and os.path.isfile(a.cache):
        d = np.load(a.cache, allow_pickle=False)
        if int(d["scenes"]) == a.scenes and int(d["size"]) == a.size:
            return torch.from_numpy(d["images"]), torch.from_numpy(d["cover"]), \
                [sample_scene(TRAIN_SEED0 + i) for i in range(a.scenes)]
    images, cover, scenes = render_scenes(a.scenes, a.size, log)
    if a.cache:
        np.savez(a.cache, images=images.numpy(), cover=cover.numpy(), scenes=a.scenes, size=a.size)
    return images, cover, scenes


def main(argv=None):
    a = parse(argv)
    log = lambda m: print(m, flush=True)       # noqa: E731
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    tok = M.build_tokenizer(tempfile.mkdtemp(prefix="toyworld-tok-"))
    te, unet, vae = M.build_text_encoder(tok, a.arch), M.build_unet(a.arch, a.size), M.build_vae(a.size)
    history = []
    if a.init:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizerFast
        unet = UNet2DConditionModel.from_pretrained(a.init, subfolder="unet")
        old_te = CLIPTextModel.from_pretrained(os.path.join(a.init, "text_encoder"))
        te = CLIPTextModel(type(old_te.config)(**dict(
            old_te.config.to_dict(), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
        adopt_text_encoder(te, old_te, tok, CLIPTokenizerFast.from_pretrained(os.path.join(a.init, "tokenizer")))
        with open(os.path.join(a.init, "training.json")) as f:
            history = json.load(f).get("unet_stages", [])
    if a.vae_from:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.vae_from, subfolder="vae")
    unet, te, vae = unet.to(device), te.to(device), vae.to(device)
    images, cover, scenes = _scenes(a, log)
    ids, labels, caps = caption_tokens(tok, scenes, a.seed)
    empty, _ = C.token_labels(tok, [])
    t1 = time.time()

    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2)
    state = dict(step=0, losses=[], attn_losses=[], vae_losses=[], opt=opt)
    settings = {k: getattr(a, k) for k in RESUME_KEYS}
    modules = dict(unet=unet, te=te, vae=vae)
    saved = K.load(a.checkpoint) if a.checkpoint else None
    if saved:
        tensors, meta = saved
        if meta["settings"] != settings:
            diff = {k: (meta["settings"].get(k), v) for k, v in settings.items() if meta["settings"].get(k) != v}
            raise SystemExit(f"--checkpoint {a.checkpoint}: its run had other settings (saved, given): {diff}")
        K.restore(tensors, meta, modules, opt, g)
        state.update(step=meta["step"], losses=meta["losses"], attn_losses=meta["attn_losses"],
                     vae_losses=meta["vae_losses"], seconds=meta.get("seconds", 0.0))
        log(f"resumed {a.checkpoint} at UNet step {state['step']}/{a.unet_steps}")

    def save_state():
        if a.checkpoint:
            K.save(a.checkpoint, modules, opt, g, dict(
                settings=settings, step=state["step"], losses=state["losses"], attn_losses=state["attn_losses"],
                vae_losses=state["vae_losses"], seconds=state.get("seconds", 0.0) + time.time() - t_stage))

    t_stage = time.time()
    if not saved and not a.vae_from:
        state["vae_losses"] = [round(x, 5) for x in train_vae(vae, images, a.vae_steps, a.vae_batch, a.vae_lr,
                                                              device, log, g)]
    vae.eval()
    t2 = time.time()
    mean = encode_all(vae, images, device)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latent std {mean.std():.3f}: scaling factor {scale:.4f}")
    t_stage = time.time()
    train_unet(unet, te, (mean * scale, cover, ids, labels, torch.tensor(empty)), state, a, device, log, g, save_state)
    if a.export and not saved:
        raise SystemExit(f"--export: {a.checkpoint} holds no state to export")
    if state["step"] < a.unet_steps and not a.export:
        log(f"stopped at UNet step {state['step']}/{a.unet_steps}; the same command goes on from {a.checkpoint}")
        return
    losses, attn = state["losses"], state["attn_losses"]
    stage = dict(steps=state["step"], planned_steps=a.unet_steps, lr=a.lr, batch=a.batch, attn_weight=a.attn_weight, arch=a.arch,
                 init=bool(a.init), seconds=round(state.get("seconds", 0.0), 1))
    info = dict(settings, out=None, init=bool(a.init), vae_from=bool(a.vae_from), device=str(device),
                torch=torch.__version__, threads=torch.get_num_threads(),
                unet_steps_total=sum(s["steps"] for s in history) + state["step"], unet_stages=history + [stage],
                seconds=dict(render=round(t1 - t0, 1), vae=round(t2 - t1, 1), unet=stage["seconds"]),
                scaling_factor=scale, caption_examples=caps[:8],
                vae_loss_last100=float(np.mean(state["vae_losses"][-100:])) if state["vae_losses"] else None,
                unet_loss_last100=float(np.mean(losses[-100:])) if losses else None,
                attn_loss_last100=float(np.mean(attn[-100:])) if attn else None,
                vae_losses=state["vae_losses"][::10], unet_losses=losses[::10], attn_losses=attn[::10],
                parameters=dict(unet=sum(p.numel() for p in unet.parameters()),
                                text_encoder=sum(p.numel() for p in te.parameters()),
                                vae=sum(p.numel() for p in vae.parameters())))
    info["save_dtype"] = a.save_dtype
    save(a.out, unet.cpu(), te.cpu(), tok, vae.cpu(), info, SAVE_DTYPES[a.save_dtype])
    log(f"wrote {a.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

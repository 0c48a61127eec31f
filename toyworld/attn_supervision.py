"""Supervising the UNet's cross-attention with the world's exact masks.

A denoising loss alone leaves a small model's cross-attention anywhere: the shipped v1 model sent
89-94 % of it to padding, and every word had the same map, so nothing that reads maps (local
blend, SpecRef's M_t, the maps node) could work. Here every cross-attention layer's map of each
labelled token (see captions.py), averaged over heads and normalised over the image, is pulled
toward its region (the object's mask; outside all objects for the background word, at the layer's
resolution) by cross-entropy. Only where a word attends is taught, not how much: the maps the pack
reads are normalised per word as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class MapRecorder:
    """Cross-attention processor that keeps each call's probabilities (batch, heads, queries, tokens)."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []
        self.active = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        if self.active:
            self.maps.append(probs.view(b, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def install(unet) -> MapRecorder:
    """Route every cross-attention layer (attn2) of a diffusers UNet through one recorder."""
    rec = MapRecorder()
    rec.original = dict(unet.attn_processors)
    unet.set_attn_processor({name: (rec if name.endswith("attn2.processor") else proc)
                             for name, proc in rec.original.items()})
    return rec


def uninstall(unet, rec: MapRecorder) -> None:
    unet.set_attn_processor(rec.original)


def regions(masks: torch.Tensor) -> torch.Tensor:
    """Object coverage [B, 2, h, w] -> the labels' regions [B, 4, h, w] (0: none, 1-2: the objects,
    3: the background, i.e. what no object covers)."""
    bg = (1 - masks.sum(1, keepdim=True)).clamp(min=0)
    return torch.cat([torch.zeros_like(bg), masks, bg], 1)


def loss(maps: list[torch.Tensor], labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy between each labelled token's normalised map and its normalised region.

    maps: the recorder's [B, heads, h*w, T] per layer; labels: [B, T] (0: unsupervised);
    masks: object coverage [B, 2, H, W] at the latent's resolution."""
    reg = regions(masks.float())
    total, n = maps[0].new_zeros(()), 0
    for m in maps:
        side = int(round(m.shape[2] ** 0.5))
        r = F.adaptive_avg_pool2d(reg, side).flatten(2)                   # [B, 4, hw]
        target = r.gather(1, labels[:, :, None].expand(-1, -1, r.shape[2]))   # [B, T, hw]
        mass = target.sum(-1)
        keep = (labels > 0) & (mass > 1e-6)
        if not keep.any():
            continue
        a = m.mean(1).transpose(1, 2)                                      # [B, T, hw]
        logp = torch.log(a / a.sum(-1, keepdim=True).clamp(min=1e-12) + 1e-8)
        ce = -(target / mass.clamp(min=1e-6)[..., None] * logp).sum(-1)
        total = total + ce[keep].mean()
        n += 1
    return total / max(n, 1)


@torch.no_grad()
def map_iou(maps: list[torch.Tensor], labels: torch.Tensor, masks: torch.Tensor, side: int) -> float:
    """Mean best-threshold-free IoU at one level: each labelled map, scaled to a maximum of 1 and
    cut at 0.5, against its region cut at 0.5 (a training-time probe of word locality)."""
    reg = regions(masks.float())
    ious = []
    for m in maps:
        if int(round(m.shape[2] ** 0.5)) != side:
            continue
        r = F.adaptive_avg_pool2d(reg, side).flatten(2) > 0.5
        a = m.mean(1).transpose(1, 2)
        a = a / a.amax(-1, keepdim=True).clamp(min=1e-12) > 0.5
        for b, t in zip(*torch.nonzero(labels > 0, as_tuple=True)):
            tr = r[b, labels[b, t]]
            if tr.any():
                ious.append(float((a[b, t] & tr).sum() / (a[b, t] | tr).sum()))
    return sum(ious) / len(ious) if ious else float("nan")

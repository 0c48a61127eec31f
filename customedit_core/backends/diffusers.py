"""diffusers backend: UNet2DConditionModel + CLIPTextModel, hooks via attention processors.

SDXL (a UNet with addition_embed_type "text_time"): a second text encoder
(CLIPTextModelWithProjection) and tokenizer; the context is both encoders' penultimate hidden
states side by side plus the pooled CLIP-G vector packed as one more row (sdxl_cond.py), and each
call adds the size/crop time ids of `self.size` (default: the image's own size).

Used by the tests (tiny models built from configs) and by Python users outside ComfyUI.
The processors are installed when the backend is made and removed by `close()`; with no
hook active they compute plain fused attention, so outputs match the stock processors.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import fingerprint as digests
from ..attention import Site
from ..errors import InputError
from ..tokens import AddedWords, PromptTokens
from ..unet_names import diffusers_to_ldm
from .base import SUPPORTED, Backend, input_vectors, wants_grad
from .sdxl_cond import SizeConditioning, pack, unpack


class HFTokenizer(AddedWords):
    """Adapts a transformers CLIPTokenizer to the core's Tokenizer protocol."""

    def __init__(self, tok):
        self.tok = tok
        self._init_added(len(tok))
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.max_length = int(min(tok.model_max_length, 77))

    def word_ids(self, word):
        return list(self.tok(word, add_special_tokens=False).input_ids)

    def text_ids(self, text):
        return list(self.tok(text, add_special_tokens=False).input_ids)


class _HookState:
    """Per-UNet: the hook of the current call. Shared by every backend made on that UNet, so
    a second backend on the same model does not silently disconnect the first one."""

    def __init__(self, saved):
        self.hook, self.latent_hw, self.saved, self.users = None, (0, 0), saved, 0
        self.deltas = None         # {processor name: (delta_k, delta_v)} of the current call


class _HookProcessor:
    def __init__(self, owner: _HookState, name: str):
        self.owner, self.name = owner, name
        self.kind = "cross" if name.endswith("attn2") else "self"
        self.place = "down" if name.startswith("down") else ("mid" if name.startswith("mid") else "up")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        B, N, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        H = attn.heads
        delta = self.owner.deltas.get(self.name) if self.owner.deltas else None
        q = attn.to_q(hidden_states)
        if delta is None:
            k, v = attn.to_k(ctx), attn.to_v(ctx)
        else:      # W + delta, the same sum ComfyUI's "diff" patch forms, so loaded concepts match bit for bit
            k = F.linear(ctx, attn.to_k.weight + delta[0].to(attn.to_k.weight), attn.to_k.bias)
            v = F.linear(ctx, attn.to_v.weight + delta[1].to(attn.to_v.weight), attn.to_v.bias)
        d = q.shape[-1] // H
        q, k, v = (x.view(B, -1, H, d).transpose(1, 2) for x in (q, k, v))
        hook = self.owner.hook
        if hook is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            lh, lw = self.owner.latent_hw
            s = max(1, round(math.sqrt(lh * lw / N)))
            site = Site(self.name, self.kind, self.place, -(-lh // s), -(-lw // s), H, lh, lw)
            o = hook(q, k, v, site)
        o = o.transpose(1, 2).reshape(B, -1, H * d).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        if attn.residual_connection:
            o = o + hidden_states
        return o / attn.rescale_output_factor


class DiffusersBackend(Backend):
    name = "diffusers"

    def __init__(self, unet, text_encoder, tokenizer, alphas_cumprod=None, prediction_type="epsilon",
                 device=None, dtype=torch.float32, text_encoder_2=None, tokenizer_2=None, vae_scale: int = 8):
        """vae_scale: image pixels per latent cell of the VAE this UNet works with (SD's 8; the UNet
        cannot tell, and a wrong one samples pictures of the wrong size)."""
        from ..ddim import sd_alphas_cumprod

        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, None
        self.tokenizer = HFTokenizer(tokenizer)
        added = getattr(unet.config, "addition_embed_type", None)
        self.sdxl = added == "text_time"
        if added and not self.sdxl:
            raise InputError("model", f"the UNet has an added {added!r} embedding (not a text-to-image SD "
                                      f"model); {SUPPORTED}")
        if self.sdxl:
            if text_encoder_2 is None or tokenizer_2 is None:
                raise InputError("model", "an SDXL UNet needs its second text encoder and tokenizer "
                                          "(text_encoder_2, tokenizer_2)")
            self.text_encoder_2 = text_encoder_2
            self.pooled_dim = int(text_encoder_2.config.projection_dim)
            # SDXL's second stream pads with its own pad token ("!", id 0) after the end token
            self.pad_2 = int(tokenizer_2.pad_token_id if tokenizer_2.pad_token_id is not None else tokenizer_2.eos_token_id)
            self.width_1 = int(text_encoder.config.hidden_size)
            self.text_widths = (self.width_1, int(text_encoder_2.config.hidden_size))
            self.size = SizeConditioning()
        self.alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InputError("model", f"prediction type {prediction_type!r} is not supported; {SUPPORTED}")
        self.prediction_type = prediction_type
        if not isinstance(vae_scale, int) or vae_scale < 1:
            raise InputError("vae_scale", f"expected a positive whole number of pixels per latent cell, "
                                          f"got {vae_scale!r}")
        self.vae_scale = vae_scale
        self.device = torch.device(device) if device else next(unet.parameters()).device
        self.dtype = dtype
        self.latent_channels = unet.config.in_channels
        self.latent_multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        state = getattr(unet, "_customedit_hooks", None)
        if state is None:
            state = _HookState(unet.attn_processors)
            unet.set_attn_processor({n: _HookProcessor(state, n.rsplit(".", 1)[0]) for n in state.saved})
            unet._customedit_hooks = state
        state.users += 1
        self._state = state
        self._deltas = None
        self._checkpointing = False
        lpb = unet.config.layers_per_block
        self._kv = {}              # canonical attn2 name -> (processor name, attention module)
        for proc in state.saved:
            layer = proc.rsplit(".", 1)[0]
            if layer.endswith("attn2"):
                self._kv[diffusers_to_ldm(layer, lpb)] = (layer, unet.get_submodule(layer))

    def close(self):
        """Put the stock attention processors back once the last backend on this UNet closes."""
        state, self._state = self._state, None
        if state is None:
            return
        state.users -= 1
        if state.users == 0:
            self.unet.set_attn_processor(state.saved)
            del self.unet._customedit_hooks

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        with torch.no_grad():
            # sampled elements of every weight (whole tensors are never read: see fingerprint.py)
            for mod in self._modules():
                for name, p in mod.named_parameters():
                    h.update(name.encode())
                    digests.update(h, p)
            # a loaded concept changes the model: its deltas and token vectors count too
            for name, (dk, dv) in sorted((self._deltas or {}).items()):
                h.update(name.encode())
                digests.update(h, dk)
                digests.update(h, dv)
            for word, i in sorted(self.tokenizer.added.items()):
                h.update(word.encode() + self.tokenizer.vectors[i].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def _modules(self):
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    def encode(self, prompts: Sequence[PromptTokens], overrides=None) -> torch.Tensor:
        vectors = input_vectors(self.tokenizer, prompts, overrides)
        vocab = self.tokenizer._first_added
        rows = [[i if i < vocab else self.tokenizer.bos for i in p.ids] for p in prompts]
        ids = torch.tensor(rows, device=self.device)
        with torch.set_grad_enabled(wants_grad(vectors)):
            if not self.sdxl:
                return _run(self.text_encoder, ids, vectors).last_hidden_state.float()
            w = self.width_1
            ids_2 = torch.tensor([r[:p.length] + [self.pad_2] * (len(r) - p.length) for r, p in zip(rows, prompts)],
                                 device=self.device)
            out_1 = _run(self.text_encoder, ids, [{k: v[:w] for k, v in d.items()} for d in vectors])
            out_2 = _run(self.text_encoder_2, ids_2, [{k: v[w:] for k, v in d.items()} for d in vectors])
            tokens = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
            return pack(tokens.float(), out_2.text_embeds.float())

    def kv_weights(self) -> dict:
        out = {}
        for name, (_, attn) in self._kv.items():
            out[f"{name}.to_k"], out[f"{name}.to_v"] = attn.to_k.weight.detach(), attn.to_v.weight.detach()
        return out

    def set_kv_deltas(self, deltas) -> None:
        if not deltas:
            self._deltas = None
            return
        unknown = sorted(set(deltas) - set(self.kv_weights()))
        if unknown:
            raise InputError("concept", f"has weights for layers this model does not have ({unknown[0]}, ...)")
        self._deltas = {proc: (deltas.get(f"{name}.to_k", torch.zeros((), device=self.device)),
                               deltas.get(f"{name}.to_v", torch.zeros((), device=self.device)))
                        for name, (proc, _) in self._kv.items()
                        if f"{name}.to_k" in deltas or f"{name}.to_v" in deltas}

    def token_embedding_table(self) -> torch.Tensor:
        """SDXL: both encoders' rows side by side [vocab, D_l + D_g]; a concept word's vector is that pair."""
        t = self.text_encoder.get_input_embeddings().weight.detach()
        if self.sdxl:
            t = torch.cat([t, self.text_encoder_2.get_input_embeddings().weight.detach().to(t)], dim=1)
        return t

    @contextlib.contextmanager
    def frozen(self):
        params = [p for m in self._modules() for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    @contextlib.contextmanager
    def gradient_checkpointing(self):
        was = getattr(self.unet, "is_gradient_checkpointing", False)
        self.unet.enable_gradient_checkpointing()
        self._checkpointing = True
        try:
            yield
        finally:
            self._checkpointing = False
            self._state.hook = self._state.deltas = None
            if not was:
                self.unet.disable_gradient_checkpointing()

    def predict_eps(self, z, t, context, hook=None):
        state = self._state
        state.hook, state.latent_hw, state.deltas = hook, (z.shape[2], z.shape[3]), self._deltas
        try:
            tt = _timesteps(t, z.shape[0], self.device)
            extra = {}
            if self.sdxl:
                context, pooled = unpack(context, self.pooled_dim)
                h, w = z.shape[2] * self.vae_scale, z.shape[3] * self.vae_scale
                ids = torch.tensor(self.size.time_ids(h, w), device=self.device, dtype=self.dtype)
                extra["added_cond_kwargs"] = {"text_embeds": pooled.to(self.dtype),
                                              "time_ids": ids.expand(z.shape[0], -1)}
            out = self.unet(z.to(self.dtype), tt, encoder_hidden_states=context.to(self.dtype), **extra).sample.float()
        finally:
            if not self._checkpointing:    # recomputation in backward reads them again
                state.hook = state.deltas = None
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[tt.cpu()].float().view(-1, 1, 1, 1).to(out.device)
            out = a.sqrt() * out + (1 - a).sqrt() * z.float()
        return out


def _run(encoder, ids, vectors):
    """The encoder's outputs (all hidden states) with `vectors` ({position: vector} per row) as the
    input embeddings at those positions; autograd reaches the vectors."""
    if not any(vectors):
        return encoder(ids, output_hidden_states=True)
    table = encoder.get_input_embeddings()
    base = table(ids)
    rows = []
    for b, d in enumerate(vectors):
        if d:
            pos = torch.tensor(list(d), device=ids.device)
            vals = torch.stack([v.to(base.device, base.dtype) for v in d.values()])
            rows.append(base[b].index_put((pos,), vals))
        else:
            rows.append(base[b])
    embeds = torch.stack(rows)
    # swap the lookup's output for ours: works for every CLIPTextModel version
    handle = table.register_forward_hook(lambda module, args, output: embeds)
    try:
        return encoder(ids, output_hidden_states=True)
    finally:
        handle.remove()


def _timesteps(t, batch: int, device) -> torch.Tensor:
    """One integer timestep for the batch, or one per row (training)."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return t.to(device=device, dtype=torch.long)
    return torch.full((batch,), int(t), device=device, dtype=torch.long)

"""diffusers backend: UNet2DConditionModel + CLIPTextModel, hooks via attention processors.

Used by the tests (tiny models built from configs) and by Python users outside ComfyUI.
The processors are installed when the backend is made and removed by `close()`; with no
hook active they compute plain fused attention, so outputs match the stock processors.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..attention import Site
from ..errors import InputError
from ..tokens import PromptTokens
from .base import Backend


class HFTokenizer:
    """Adapts a transformers CLIPTokenizer to the core's Tokenizer protocol."""

    def __init__(self, tok):
        self.tok = tok
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


class _HookProcessor:
    def __init__(self, owner: _HookState, name: str):
        self.owner, self.name = owner, name
        self.kind = "cross" if name.endswith("attn2") else "self"
        self.place = "down" if name.startswith("down") else ("mid" if name.startswith("mid") else "up")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        B, N, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        H = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
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
                 device=None, dtype=torch.float32):
        from ..ddim import sd_alphas_cumprod

        self.unet, self.text_encoder = unet, text_encoder
        self.tokenizer = HFTokenizer(tokenizer)
        self.alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InputError("model", f"prediction type {prediction_type!r} is not supported "
                                      "(supported: epsilon and v_prediction SD1.x/SD2.x models)")
        self.prediction_type = prediction_type
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
            for mod in (self.unet, self.text_encoder):
                for name, p in mod.named_parameters():
                    flat = p.detach().flatten()
                    h.update(f"{name}{tuple(p.shape)}".encode())
                    h.update(flat[:8].float().cpu().numpy().tobytes())
                    h.update(flat.float().sum().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def encode(self, prompts: Sequence[PromptTokens]) -> torch.Tensor:
        ids = torch.tensor([p.ids for p in prompts], device=self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0].float()

    def predict_eps(self, z, t, context, hook=None):
        state = self._state
        state.hook, state.latent_hw = hook, (z.shape[2], z.shape[3])
        try:
            tt = torch.full((z.shape[0],), int(t), device=self.device, dtype=torch.long)
            out = self.unet(z.to(self.dtype), tt, encoder_hidden_states=context.to(self.dtype)).sample.float()
        finally:
            state.hook = None
        if self.prediction_type == "v_prediction":
            a = float(self.alphas_cumprod[int(t)])
            out = a ** 0.5 * out + (1 - a) ** 0.5 * z.float()
        return out

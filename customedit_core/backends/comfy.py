"""ComfyUI backend: a ModelPatcher (SD1.x/SD2.x/SDXL UNet) + CLIP. The public entry the nodes import.

Only the backends import ComfyUI, and only when a backend is made, so the core stays importable
without it. The user's ModelPatcher is never modified: the backend works on `model.clone()`.
The parts, one job each:
  comfy_support.py      which models and CLIPs are accepted (SUPPORTED, check_supported)
  comfy_tokens.py       the tokenizer adapter (ComfyTokenizer, WORDS_KEY)
  comfy_fingerprint.py  what an inversion was made with
  comfy_attention.py    our hook at every attention site, composed with other packs' patches
  comfy_call.py         one model call the way ComfyUI's samplers make it (wrappers included)
  comfy_autograd.py     inference-mode workarounds (core_context, autograd over inference weights)
  comfy_training.py     K/V deltas and gradient checkpointing for concept training
  comfy_concept.py      concepts as patched MODEL/CLIP clones for stock nodes

SDXL: the context the core carries is CLIP-L's and CLIP-G's hidden states (ComfyUI's SDXL CLIP,
as CLIPTextEncode encodes) plus the pooled CLIP-G vector as one more row (sdxl_cond.py); each
call builds the ADM vector y from that pooled vector and `self.size` with the model's own
encode_adm, as ComfyUI's samplers do (default size: the latent's, x 8).

Time: the core's integer DDIM timestep t is the model's discrete timestep; it is turned into
sigma with the model's `model_sampling`, the latent is scaled to k-diffusion's
x = z * sqrt(sigma^2 + 1), the model returns the denoised estimate and
eps = (x - denoised) / sigma, which holds for eps- and v-prediction alike.

Autograd: the alias object patches (comfy_autograd.py) go on our clone the first time autograd is
asked for (one reload of the model) and stay for the rest of that backend's life: switching
between two clones at every timestep would make ComfyUI move the whole model to the offload
device and back each time.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..tokens import PromptTokens
from .base import Backend, input_vectors, wants_grad
from .comfy_attention import HOOK_KEY, install_attention
from .comfy_autograd import add_alias_forwards, core_context, ordinary, saving_copies
from .comfy_call import ModelCall
from .comfy_fingerprint import fingerprint
from .comfy_support import SUPPORTED, check_supported
from .comfy_tokens import WORDS_KEY, ComfyTokenizer, tokenizer_name
from .comfy_training import KVDeltas, add_checkpointing, kv_module_names
from .sdxl_cond import SizeConditioning, pack, unpack

__all__ = ["ComfyBackend", "ComfyTokenizer", "HOOK_KEY", "SUPPORTED", "WORDS_KEY", "core_context"]


class ComfyBackend(Backend):
    name = "comfy"

    def __init__(self, model, clip):
        import comfy.model_management

        ms, self.sdxl = check_supported(model, clip)
        self.source_model = model
        self.clip = clip
        self.patcher = model.clone()
        self.blocks = install_attention(self.patcher)
        self._call = ModelCall(self.patcher)
        self._kv = KVDeltas(self.patcher, kv_module_names(self.blocks))
        self._autograd_weights = False
        self._model_sampling = ms
        inner = model.model
        self.latent_format = inner.latent_format
        self.latent_channels = int(getattr(self.latent_format, "latent_channels", 4))
        mult = inner.model_config.unet_config.get("channel_mult", (1, 2, 4, 4))
        self.latent_multiple = 2 ** (len(mult) - 1)
        self.vae_scale = int(getattr(self.latent_format, "spacial_downscale_ratio", 8))
        sigmas = ms.sigmas.detach().double().cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
        self.device = torch.device(model.load_device)
        tok = clip.tokenizer
        self.tokenizer = ComfyTokenizer(getattr(tok, tokenizer_name(tok)))
        if self.sdxl:
            # ComfyUI's SDXL CLIP takes {"l": ..., "g": ...}; clip_g pads with its own pad token (0)
            self._width_l = int(tok.clip_l.embedding_size)
            self.text_widths = (self._width_l, int(tok.clip_g.embedding_size))
            self._pad_g = int(tok.clip_g.pad_token)
            self.pooled_dim = int(inner.model_config.unet_config["adm_in_channels"]) - 6 * 256
            self.size = SizeConditioning()
        else:
            self._clip_key = tok.clip_name
        self._mm = comfy.model_management
        self._fingerprint = None
        self._session = 0
        self._loaded = False
        self._grad = 0
        self._text_clip = None          # CLIP clone with the autograd object patches (training)
        self._checkpointing = False

    # ---- latents ---------------------------------------------------------------------------

    def to_model_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """Host LATENT["samples"] -> the model space the core works in."""
        return self.latent_format.process_in(samples.float().clone())

    def from_model_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_out(z.float().cpu().clone())

    # ---- Backend interface -----------------------------------------------------------------

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.source_model, self.clip, self._model_sampling, self.tokenizer)
        return self._fingerprint

    def encode(self, prompts: Sequence[PromptTokens], overrides=None) -> torch.Tensor:
        vectors = input_vectors(self.tokenizer, prompts, overrides)
        grad = wants_grad(vectors)
        clip = self._autograd_clip() if grad else self.clip
        out = []
        with torch.set_grad_enabled(grad), saving_copies(grad):
            for p, d in zip(prompts, vectors):
                if not self.sdxl:
                    cond = clip.encode_from_tokens({self._clip_key: [_row(p, d)]})
                    out.append(cond.float())
                    continue
                w = self._width_l
                tokens = {"l": [_row(p, d, part=slice(0, w))],
                          "g": [_row(p, d, part=slice(w, None), pad=self._pad_g)]}
                cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
                out.append(pack(cond.float(), pooled.float()))
        return torch.cat(out).to(self.device)

    def predict_eps(self, z, t, context, hook=None):
        grad = self._grad > 0 and torch.is_grad_enabled()
        self._ensure_loaded()
        dev = self.device
        z = z.to(dev, torch.float32)
        context = context.to(dev)
        if grad:
            z, context = ordinary(z), ordinary(context)
        B = z.shape[0]
        tt = t.float().cpu() if isinstance(t, torch.Tensor) and t.ndim == 1 else torch.tensor([float(t)])
        sigma = self._model_sampling.sigma(tt).to(dev, torch.float32).expand(B)
        s = sigma.view(B, 1, 1, 1)
        x = z * (s ** 2 + 1.0).sqrt()
        extra = {}
        if self.sdxl:
            context, pooled = unpack(context, self.pooled_dim)
            extra["y"] = self._adm(pooled, z.shape[2] * self.vae_scale, z.shape[3] * self.vae_scale).to(dev)
        denoised = self._call(x, sigma, context, hook, extra)
        return ((x - denoised.float()) / s).float()

    def _adm(self, pooled, height: int, width: int):
        """SDXL's y: the model's encode_adm of the pooled vectors and the size conditioning."""
        oh, ow, top, left, th, tw = self.size.time_ids(height, width)
        return self.patcher.model.encode_adm(pooled_output=pooled, height=oh, width=ow, crop_h=top, crop_w=left,
                                             target_height=th, target_width=tw, device=pooled.device)

    # ---- training --------------------------------------------------------------------------

    def kv_weights(self) -> dict:
        dm = self.source_model.get_model_object("diffusion_model")
        out = {}
        for name in kv_module_names(self.blocks):
            attn = dm.get_submodule(name)
            out[f"{name}.to_k"], out[f"{name}.to_v"] = attn.to_k.weight.detach(), attn.to_v.weight.detach()
        return out

    def set_kv_deltas(self, deltas) -> None:
        if self._kv.set(deltas):
            self._loaded = False        # the next call reloads our clone, which applies the wrappers

    def token_embedding_table(self) -> torch.Tensor:
        """SDXL: CLIP-L's and CLIP-G's rows side by side (a concept word's vector is that pair)."""
        csm = self.clip.cond_stage_model
        if self.sdxl:
            tables = [csm.clip_l, csm.clip_g]
        else:
            tables = [getattr(csm, csm.clip)]
        rows = [t.transformer.get_input_embeddings().weight.detach() for t in tables]
        return torch.cat([r.to(rows[0]) for r in rows], dim=1)

    def text_grad_enabled(self):
        self._autograd_clip()
        return self._grad_context()

    def grad_enabled(self):
        return self._grad_context()

    @contextlib.contextmanager
    def gradient_checkpointing(self):
        if not self._checkpointing:
            add_checkpointing(self.patcher)
            self._checkpointing = True
            self._loaded = False
        yield

    def _autograd_clip(self):
        """A clone of the CLIP whose weights reach the ops as ordinary tensors (autograd to inputs)."""
        if self._text_clip is None:
            c = self.clip.clone()
            add_alias_forwards(c.patcher)
            self._text_clip = c
        return self._text_clip

    @contextlib.contextmanager
    def _grad_context(self):
        if not self._autograd_weights:
            add_alias_forwards(self.patcher)
            self._autograd_weights = True
            self._loaded = False        # the next call reloads our clone, which applies the object patches
        with torch.inference_mode(False), torch.enable_grad():
            self._grad += 1
            try:
                yield
            finally:
                self._grad -= 1

    # ---- host services ---------------------------------------------------------------------

    def check_interrupt(self) -> None:
        self._mm.throw_exception_if_processing_interrupted()

    def progress(self, total: int):
        import comfy.utils

        bar = comfy.utils.ProgressBar(total)
        return lambda n=1: bar.update(n)

    @contextlib.contextmanager
    def offload(self):
        """One run: our clone loaded, and its pre_run / cleanup around the run as a sampler does."""
        self._session += 1
        try:
            self._ensure_loaded(force=True)
            with self._call.run():
                yield
        finally:
            self._session -= 1
            if self._session == 0:
                self._loaded = False

    def _ensure_loaded(self, force=False):
        """Our clone on its device (ComfyUI may have moved or swapped models between our sessions)."""
        if force or self._session == 0 or not self._loaded:
            self._mm.load_models_gpu([self.patcher])
            self._loaded = True


def _row(p: PromptTokens, vectors: dict, part=slice(None), pad=None) -> list:
    """One prompt as ComfyUI token pairs: ids, and a vector where `vectors` has one (ComfyUI puts a
    tensor entry's vector at that position, its `embedding:` mechanism); `part` of each vector (SDXL:
    CLIP-L's or CLIP-G's share); `pad` replaces the ids after the end token."""
    return [((vectors[pos][part].float() if pos in vectors else (int(i) if pad is None or pos < p.length else pad)), 1.0)
            for pos, i in enumerate(p.ids)]

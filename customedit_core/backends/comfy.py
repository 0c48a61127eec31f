"""ComfyUI backend: a ModelPatcher (SD1.x/SD2.x UNet) + CLIP, hooks via attention replace patches.

Only this module imports ComfyUI, and only when a backend is made, so the core stays
importable without it. The user's ModelPatcher is never modified: the backend works on
`model.clone()`, on which it registers an attn1/attn2 replace patch for every transformer
block of the UNet. The patches are stateless: the hook of a call travels in the
`transformer_options` of that call, so with no hook they compute ComfyUI's own attention.

Time: the core's integer DDIM timestep t is the model's discrete timestep; it is turned
into sigma with the model's `model_sampling`, the latent is scaled to k-diffusion's
x = z * sqrt(sigma^2 + 1), the model returns the denoised estimate and
eps = (x - denoised) / sigma, which holds for eps- and v-prediction alike.

Host quirk: ComfyUI runs nodes under `torch.inference_mode()` and its weights are
inference tensors. Call the core inside `core_context()` (inference mode off, no grad), so
the tensors the core makes are ordinary ones; `grad_enabled()` then adds object patches to our
clone's layers that hand their ops ordinary tensors over the weights' memory while autograd is
on (comfy_autograd.py), so autograd can reach the text embedding without copying a weight. They
go on our clone the first time autograd is asked for (one reload of the model) and stay for the
rest of that backend's life: switching between two clones at every timestep would make ComfyUI
move the whole model to the offload device and back each time.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import fingerprint as digests
from ..attention import Site
from ..errors import InputError
from ..tokens import AddedWords, PromptTokens
from .base import Backend, input_vectors, wants_grad
from .comfy_autograd import add_alias_forwards

HOOK_KEY = "customedit_hook"
WORDS_KEY = "customedit_words"      # on a CLIP's SDTokenizer: concept word -> input vector (LoadConcept)
SUPPORTED = "supported: SD1.x and SD2.x checkpoints (e.g. v1-5, v2-1), eps or v prediction"
_BLOCK = re.compile(r"^(input|middle|output)_blocks?(?:\.(\d+))?\.\d+\.transformer_blocks\.(\d+)$")
_PLACE = {"input": "down", "middle": "mid", "output": "up"}


@contextlib.contextmanager
def core_context():
    """Run core code from inside a ComfyUI node: ordinary (non-inference) tensors, no autograd."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _identity(t):
    return t


class ComfyTokenizer(AddedWords):
    """Adapts ComfyUI's SDTokenizer (clip.tokenizer.clip_l / clip_h) to the core's Tokenizer.
    Concept words a LoadConcept node put on that tokenizer become added words here."""

    def __init__(self, sd_tokenizer):
        self.sd = sd_tokenizer
        self.tok = sd_tokenizer.tokenizer
        self._init_added(len(self.tok))
        for word, vector in getattr(sd_tokenizer, WORDS_KEY, {}).items():
            self._register(word, vector)         # checked when LoadConcept put them there
        self.bos = int(sd_tokenizer.start_token)
        self.eos = int(sd_tokenizer.end_token)
        self.pad = int(sd_tokenizer.pad_token)      # SD1: the end token; SD2: 0
        self.max_length = int(min(sd_tokenizer.max_length, 77))

    def word_ids(self, word):
        return list(self.tok(word, add_special_tokens=False)["input_ids"])

    def text_ids(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def _check_supported(model, clip):
    import comfy.model_sampling
    import comfy.supported_models as sm

    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if config is None or not hasattr(model, "clone"):
        raise InputError("model", f"expected a MODEL from a checkpoint loader; {SUPPORTED}")
    if type(config) not in (sm.SD15, sm.SD20):
        raise InputError("model", f"{type(config).__name__} models are not supported; {SUPPORTED}")
    ms = model.get_model_object("model_sampling")
    mst = comfy.model_sampling
    discrete = (isinstance(ms, mst.ModelSamplingDiscrete)
                and int(ms.sigmas.shape[0]) == int(getattr(ms, "num_timesteps", -1))      # not distilled (LCM)
                and type(ms).sigma is mst.ModelSamplingDiscrete.sigma)
    prediction = (getattr(type(ms), "calculate_input", None) is mst.EPS.calculate_input
                  and type(ms).calculate_denoised in (mst.EPS.calculate_denoised, mst.V_PREDICTION.calculate_denoised))
    if not (discrete and prediction):
        kinds = "/".join(c.__name__ for c in type(ms).__mro__[1:3])
        raise InputError("model", f"its sampling ({kinds}) is not a 1000-step discrete eps or v-prediction "
                                  f"schedule (e.g. a ModelSamplingDiscrete lcm/x0 patch); {SUPPORTED}")
    tok = getattr(clip, "tokenizer", None)
    name = getattr(tok, "clip", None)
    if clip is None or name is None or not hasattr(tok, name) or not hasattr(clip, "encode_from_tokens"):
        raise InputError("clip", f"expected the CLIP of an SD1.x/SD2.x checkpoint (one CLIP text encoder); {SUPPORTED}")
    width = getattr(getattr(tok, name), "embedding_size", None)
    context = config.unet_config.get("context_dim")
    if width is not None and context is not None and int(width) != int(context):
        raise InputError("clip", f"gives {width}-wide text embeddings but the model takes {context}; use the CLIP "
                                 "loaded with this checkpoint")
    return ms


def _digest(h, obj, depth=0):
    """Content digest of patch data: tensors by shape and a few sampled values."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        digests.update(h, obj)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _digest(h, x, depth + 1)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(h, obj[k], depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__name__.encode())
        weights = getattr(obj, "weights", None)        # LoRA-style weight adapters
        if weights is not None:
            _digest(h, weights, depth + 1)


def _digest_weights(h, patcher, module, prefix, samples=24):
    """A few sampled values of the base weights (the backup when patches are applied in place)."""
    params = sorted(module.named_parameters(), key=lambda kv: kv[0])
    if not params:
        return
    picks = sorted({round(i * (len(params) - 1) / max(1, samples - 1)) for i in range(samples)})
    backup = getattr(patcher, "backup", {}) or {}
    for i in picks:
        name, p = params[i]
        key = prefix + name
        w = backup[key].weight if key in backup else p
        _digest(h, (key, w))


def _digest_patches(h, patcher):
    for key in sorted(patcher.patches):
        h.update(key.encode())
        for p in patcher.patches[key]:
            # (strength_patch, patch, strength_model, offset, function)
            h.update(repr((p[0], p[2], p[3] if len(p) > 3 else None)).encode())
            _digest(h, p[1])
    for key in sorted(getattr(patcher, "object_patches", {})):
        h.update(f"obj:{key}:{type(patcher.object_patches[key]).__name__}".encode())


class ComfyBackend(Backend):
    name = "comfy"

    def __init__(self, model, clip):
        import comfy.model_management

        ms = _check_supported(model, clip)
        self.source_model = model
        self.clip = clip
        self.patcher = model.clone()
        self.blocks = self._install_attention(self.patcher)
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
        self.tokenizer = ComfyTokenizer(getattr(clip.tokenizer, clip.tokenizer.clip))
        self._clip_key = clip.tokenizer.clip_name
        self._mm = comfy.model_management
        self._fingerprint = None
        self._session = 0
        self._loaded = False
        self._grad = 0
        self._deltas = None             # live K/V deltas (training): weight wrappers read them
        self._kv_wrapped = False
        self._text_clip = None          # CLIP clone with the autograd object patches (training)
        self._checkpointing = False

    # ---- attention -------------------------------------------------------------------------

    @staticmethod
    def _install_attention(patcher):
        """attn1/attn2 replace patches on every transformer block; returns their (block, index) keys."""
        from comfy.ldm.modules.attention import BasicTransformerBlock

        dm = patcher.get_model_object("diffusion_model")
        old = patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
        keys = []
        for name, mod in dm.named_modules():
            if not isinstance(mod, BasicTransformerBlock):
                continue
            m = _BLOCK.match(name)
            if m is None:
                raise InputError("model", f"unexpected UNet layout (transformer block {name!r}); {SUPPORTED}")
            part = m.group(1)
            if (part == "middle") != (m.group(2) is None):
                raise InputError("model", f"unexpected UNet layout (transformer block {name!r}); {SUPPORTED}")
            number = 0 if part == "middle" else int(m.group(2))
            index = int(m.group(3))
            key = (part, number, index)
            for attn, kind, setter in (("attn1", "self", patcher.set_model_attn1_replace),
                                       ("attn2", "cross", patcher.set_model_attn2_replace)):
                prev = old.get(attn, {}).get(key, old.get(attn, {}).get((part, number)))
                setter(_replacement(f"{part}.{number}.{index}.{attn}", kind, _PLACE[part], prev),
                       part, number, index)
            keys.append(key)
        if not keys:
            raise InputError("model", f"no transformer blocks found in the UNet; {SUPPORTED}")
        return keys

    # ---- latents ---------------------------------------------------------------------------

    def to_model_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """Host LATENT["samples"] -> the model space the core works in."""
        return self.latent_format.process_in(samples.float().clone())

    def from_model_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_out(z.float().cpu().clone())

    # ---- Backend interface -----------------------------------------------------------------

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha1()
            inner = self.source_model.model
            h.update(f"{type(inner).__name__}/{type(inner.model_config).__name__}".encode())
            h.update("/".join(c.__name__ for c in type(self._model_sampling).__mro__).encode())
            _digest(h, self._model_sampling.sigmas)
            dm = self.source_model.get_model_object("diffusion_model")
            _digest_weights(h, self.source_model, dm, "diffusion_model.")
            _digest_patches(h, self.source_model)
            cp = self.clip.patcher
            _digest_weights(h, cp, self.clip.cond_stage_model, "")
            _digest_patches(h, cp)
            h.update(repr(getattr(self.clip, "layer_idx", None)).encode())
            for word, i in sorted(self.tokenizer.added.items()):
                h.update(word.encode())
                _digest(h, self.tokenizer.vectors[i])
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def encode(self, prompts: Sequence[PromptTokens], overrides=None) -> torch.Tensor:
        vectors = input_vectors(self.tokenizer, prompts, overrides)
        grad = wants_grad(vectors)
        clip = self._autograd_clip() if grad else self.clip
        out = []
        # ComfyUI's text encoder adds residuals in place, which autograd refuses when the summand was
        # saved for backward; saving copies (only while a gradient is wanted) makes it differentiable.
        saved = torch.autograd.graph.saved_tensors_hooks(torch.clone, _identity) if grad else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), saved:
            for p, d in zip(prompts, vectors):
                # ComfyUI puts a tensor entry's vector at that position (its `embedding:` mechanism)
                row = [((d[pos].float() if pos in d else int(i)), 1.0) for pos, i in enumerate(p.ids)]
                cond = clip.encode_from_tokens({self._clip_key: [row]})
                out.append(cond.float())
        return torch.cat(out).to(self.device)

    def kv_weights(self) -> dict:
        dm = self.source_model.get_model_object("diffusion_model")
        out = {}
        for name in self._kv_names():
            attn = dm.get_submodule(name)
            out[f"{name}.to_k"], out[f"{name}.to_v"] = attn.to_k.weight.detach(), attn.to_v.weight.detach()
        return out

    def _kv_names(self):
        return [f"{'middle_block.1' if part == 'middle' else f'{part}_blocks.{number}.1'}.transformer_blocks.{index}.attn2"
                for part, number, index in self.blocks]

    def set_kv_deltas(self, deltas) -> None:
        if deltas:
            unknown = sorted(set(deltas) - {f"{n}.{p}" for n in self._kv_names() for p in ("to_k", "to_v")})
            if unknown:
                raise InputError("concept", f"has weights for layers this model does not have ({unknown[0]}, ...)")
        self._deltas = dict(deltas) if deltas else None
        if deltas and not self._kv_wrapped:
            # wrappers read self._deltas at call time: W + delta, the sum ComfyUI's "diff" patch forms
            for name in self._kv_names():
                for proj in ("to_k", "to_v"):
                    key = f"{name}.{proj}"
                    self.patcher.add_weight_wrapper(f"diffusion_model.{key}.weight", self._delta_wrapper(key))
            self._kv_wrapped = True
            self._loaded = False

    def _delta_wrapper(self, key):
        def add_delta(w):
            d = (self._deltas or {}).get(key)
            return w if d is None else w + d.to(w)
        return add_delta

    def token_embedding_table(self) -> torch.Tensor:
        csm = self.clip.cond_stage_model
        return getattr(csm, csm.clip).transformer.get_input_embeddings().weight.detach()

    def text_grad_enabled(self):
        self._autograd_clip()
        return self._grad_context()

    def _autograd_clip(self):
        """A clone of the CLIP whose weights reach the ops as ordinary tensors (autograd to inputs)."""
        if self._text_clip is None:
            c = self.clip.clone()
            add_alias_forwards(c.patcher)
            self._text_clip = c
        return self._text_clip

    @contextlib.contextmanager
    def gradient_checkpointing(self):
        """Recompute each transformer block in backward (object patches on our clone only)."""
        import torch.utils.checkpoint

        if not self._checkpointing:
            dm = self.patcher.get_model_object("diffusion_model")
            for name, mod in dm.named_modules():
                if _BLOCK.match(name):
                    fwd = mod.forward

                    def checkpointed(*args, _fwd=fwd, **kw):
                        if not torch.is_grad_enabled():
                            return _fwd(*args, **kw)
                        return torch.utils.checkpoint.checkpoint(_fwd, *args, use_reentrant=False, **kw)

                    self.patcher.add_object_patch(f"diffusion_model.{name}.forward", checkpointed)
            self._checkpointing = True
            self._loaded = False
        yield

    def predict_eps(self, z, t, context, hook=None):
        grad = self._grad > 0 and torch.is_grad_enabled()
        patcher = self.patcher
        self._ensure_loaded()
        dev = self.device
        z = z.to(dev, torch.float32)
        context = context.to(dev)
        if grad:
            # inference tensors cannot be saved for backward: hand autograd ordinary ones
            z = z.clone() if z.is_inference() else z
            context = context.clone() if context.is_inference() else context
        B = z.shape[0]
        tt = t.float().cpu() if isinstance(t, torch.Tensor) and t.ndim == 1 else torch.tensor([float(t)])
        sigma = self._model_sampling.sigma(tt).to(dev, torch.float32).expand(B)
        s = sigma.view(B, 1, 1, 1)
        x = z * (s ** 2 + 1.0).sqrt()
        to = dict(patcher.model_options.get("transformer_options", {}))
        to["sigmas"] = sigma
        to["cond_or_uncond"] = [0]      # one chunk: the core lays out cfg rows itself
        to[HOOK_KEY] = hook
        denoised = patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to)
        return ((x - denoised.float()) / s).float()

    def grad_enabled(self):
        return self._grad_context()

    @contextlib.contextmanager
    def _grad_context(self):
        self._enable_autograd_weights()
        with torch.inference_mode(False), torch.enable_grad():
            self._grad += 1
            try:
                yield
            finally:
                self._grad -= 1

    def check_interrupt(self) -> None:
        self._mm.throw_exception_if_processing_interrupted()

    def progress(self, total: int):
        import comfy.utils

        bar = comfy.utils.ProgressBar(total)
        return lambda n=1: bar.update(n)

    @contextlib.contextmanager
    def offload(self):
        self._session += 1
        try:
            self._ensure_loaded(force=True)
            yield
        finally:
            self._session -= 1
            if self._session == 0:
                self._loaded = False

    # ---- internals -------------------------------------------------------------------------

    def _ensure_loaded(self, force=False):
        """Our clone on its device (ComfyUI may have moved or swapped models between our sessions)."""
        if force or self._session == 0 or not self._loaded:
            self._mm.load_models_gpu([self.patcher])
            self._loaded = True

    def _enable_autograd_weights(self):
        """Object patches on our clone: with autograd on, every layer's op sees ordinary tensors
        over the weights' memory (comfy_autograd.py)."""
        if self._autograd_weights:
            return
        add_alias_forwards(self.patcher)
        self._autograd_weights = True
        self._loaded = False       # the next call reloads our clone, which applies the object patches


def _replacement(name: str, kind: str, place: str, prev=None):
    """An attn replace patch: calls the hook of this call, or plain attention without one."""

    def attention(q, k, v, extra_options):
        hook = extra_options.get(HOOK_KEY)
        heads = extra_options["n_heads"]
        if hook is None:
            if prev is not None:
                return prev(q, k, v, extra_options)
            from comfy.ldm.modules import attention as comfy_attention

            return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                      transformer_options=extra_options)
        B, N, C = q.shape
        d = C // heads
        qh, kh, vh = (x.reshape(x.shape[0], -1, heads, d).transpose(1, 2) for x in (q, k, v))
        shape = extra_options.get("activations_shape") or [B, C, N, 1]
        orig = extra_options.get("original_shape") or shape
        site = Site(name, kind, place, int(shape[-2]), int(shape[-1]), heads, int(orig[-2]), int(orig[-1]))
        o = hook(qh, kh, vh, site)
        return o.transpose(1, 2).reshape(B, -1, heads * d).to(q.dtype)

    return attention


def local_blend_mask_image(mask: Optional[torch.Tensor], latent_hw, vae_scale: int) -> torch.Tensor:
    """Core mask [E, 1, h, w] (or None) -> host MASK [E, H, W] at image resolution (nearest)."""
    h, w = latent_hw
    if mask is None:
        return torch.ones(1, h * vae_scale, w * vae_scale)
    return F.interpolate(mask.float().cpu(), scale_factor=vae_scale, mode="nearest")[:, 0]

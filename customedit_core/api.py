"""Python API for use outside ComfyUI: load a model, encode an image, invert, edit, decode.

    from customedit_core import api
    pipe = api.load("path/to/sd15.safetensors")        # or a diffusers folder, None (the toy-world model)
    inv = pipe.invert(Image.open("cat.png"), "a photo of a cat", method="null_text")
    res = pipe.edit(inv, "a photo of a striped cat", mode="refine", blend_source_words=("cat",))
    pipe.decode(res.edited)[0].save("striped.png")

    mask = pipe.diffedit_mask(Image.open("fruits.png"), "a bowl of fruits", "a basket of fruits").mask
    pipe.decode(pipe.diffedit(Image.open("fruits.png"), mask, "a basket of fruits").edited)[0].save("basket.png")

    src = pipe.invert(Image.open("cat.png"), "a cat next to a mirror", method="direct", guidance=7.5)
    ref = pipe.extract_reference(Image.open("my_dog.png"), source=src)
    res = pipe.specref(src, ref, "a dog next to a mirror", ("dog",), source_words=("cat",), threshold=0.5)

Everything is offline: a diffusers folder is read with local_files_only, a single .safetensors
checkpoint is converted in memory (see single_file.py), and a single file's CLIP tokenizer comes
from a folder next to it, from `tokenizer=`, or from the vendored CLIP BPE merges.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .backends.diffusers import DiffusersBackend
from .edit import EditResult, P2PSettings, p2p_edit
from .errors import InputError
from .inversion import METHODS, Inversion, invert as _invert
from .single_file import PICKLE_SUFFIXES, SUPPORTED, refuse_pickle

# the shipped toy-world model: data beside the package (the repo's toyworld/ trains it; never imported here)
TOYWORLD_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toyworld", "weights")
TOYWORLD_NOTICE = ("notice: no model given, so the shipped toy-world model is used (a small model trained on "
                   "procedural scenes: '<colour> [<pattern>] <shape> on <background>', 64 px). Pass a "
                   "diffusers-format folder or an SD1.x/SD2.x/SDXL .safetensors checkpoint for real photographs.")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class Pipeline:
    """A DiffusersBackend plus the VAE that maps images to the backend's latent space."""
    backend: DiffusersBackend
    vae: object                             # diffusers AutoencoderKL
    scaling_factor: float
    source: str                             # what was loaded: a path (or a name given to from_models)
    family: str                             # "sd1" | "sd2" | "diffusers" | "toyworld", or from_models' family
    notes: list = field(default_factory=list)
    log: Callable[[str], None] = _stderr
    default_size: int = 512
    concepts: dict = field(default_factory=dict)      # concept word -> class word, of the loaded concepts
    edit_defaults: dict = field(default_factory=dict)  # the model's own P2PSettings defaults (MODEL_DEFAULTS)

    # --- facts -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def prediction_type(self) -> str:
        return self.backend.prediction_type

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (VAE factor x UNet downsampling)."""
        return self.backend.latent_multiple * self.backend.vae_scale

    # --- images --------------------------------------------------------------------------
    def prepare_image(self, image, size: Optional[int] = None, input_name: str = "image"):
        """RGB PIL image whose longer side is `size` (default: as given) and whose sides are multiples
        of `pixel_multiple`; states any resize through `log`."""
        pil = to_pil(image, input_name)
        w, h = pil.size
        m = self.pixel_multiple
        if size is not None:
            if size < m:
                raise InputError("size", f"expected at least {m} px for this model, got {size}")
            s = size / max(w, h)
            tw, th = max(m, round(w * s / m) * m), max(m, round(h * s / m) * m)
        else:
            tw, th = max(m, round(w / m) * m), max(m, round(h / m) * m)
        if (tw, th) != (w, h):
            self.log(f"note: {input_name} resized from {w}x{h} to {tw}x{th} px (this model needs sides that "
                     f"are multiples of {m} px" + (f", longer side {size} px)" if size else ")"))
            from PIL import Image
            pil = pil.resize((tw, th), Image.LANCZOS)
        return pil

    @torch.no_grad()
    def encode_image(self, image, size: Optional[int] = None, input_name: str = "image") -> torch.Tensor:
        """Model-space latent [1, C, h, w] (VAE posterior mean x scaling factor) of one image."""
        pil = self.prepare_image(image, size, input_name)
        x = pil_to_tensor(pil).to(self.device) * 2.0 - 1.0
        lat = self.vae.encode(x.to(_dtype(self.vae))).latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * self.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, output: str = "pil"):
        """Images of model-space latents [B, C, h, w]: a list of PIL images, or with output="tensor"
        a float tensor [B, 3, H, W] in 0..1."""
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4:
            raise InputError("latent", "expected a latent batch of shape [B, C, h, w]")
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latent.to(self.device, _dtype(self.vae)) / self.scaling_factor + shift
        x = ((self.vae.decode(z).sample.float() + 1.0) / 2.0).clamp(0, 1).cpu()
        if output == "tensor":
            return x
        return [tensor_to_pil(img) for img in x]

    # --- the core, wrapped ----------------------------------------------------------------
    def invert(self, image, prompt: str, steps: int = 50, guidance: float = 7.5, method: str = "null_text",
               inner_steps: int = 10, size: Optional[int] = None) -> Inversion:
        """Invert an image (PIL, array, tensor) or a model-space latent [1, C, h, w] with its prompt."""
        return _invert(self.backend, self.latent(image, size), prompt, steps=steps, guidance=guidance,
                       method=method, inner_steps=inner_steps)

    def latent(self, image, size: Optional[int] = None, input_name: str = "image") -> torch.Tensor:
        """A model-space latent [1, C, h, w]: the image encoded, or the latent itself when one is given."""
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == self.backend.latent_channels \
                and image.shape[1] != 3:
            return image
        return self.encode_image(image, size, input_name)

    def mask(self, mask, latent: torch.Tensor, input_name: str = "mask") -> torch.Tensor:
        """A region mask for `latent` on its grid [1, 1, h, w], from a PIL image (white = the region), an array
        or tensor at the image's size (0..1, or 0..255 for uint8), or a [1, 1, h, w] grid mask as it is."""
        import numpy as np
        from PIL import Image

        from .masks import check_grid_mask, latent_mask

        hw = tuple(latent.shape[2:])
        if isinstance(mask, Image.Image):
            mask = np.asarray(mask.convert("L"))
        if isinstance(mask, np.ndarray):
            arr = torch.from_numpy(np.array(mask))
            mask = arr.float() / 255.0 if arr.dtype == torch.uint8 else arr.float()
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and tuple(mask.shape[2:]) == hw:
            return check_grid_mask(mask, hw, input_name)
        return latent_mask(mask, hw, self.backend.vae_scale, input_name)

    def extract_reference(self, image, prompt: str = "", steps: int = 50, mask=None,
                          source: Optional[Inversion] = None, **kw):
        """SpecRef's reference K/V bank of an image (or latent). mask: the reference object M_s (see `mask`).
        source: resize the reference image to this inversion's size first. Keywords: level_start,
        level_end, step_start, step_end, store_device (see specref.extract_reference)."""
        from .specref import extract_reference

        if source is not None and not isinstance(image, torch.Tensor):
            h, w = (n * self.backend.vae_scale for n in source.source.shape[2:])
            pil = to_pil(image, "reference")
            if pil.size != (w, h):
                self.log(f"note: reference resized from {pil.size[0]}x{pil.size[1]} to the source's {w}x{h} px")
                from PIL import Image
                image = pil.resize((w, h), Image.LANCZOS)
        latent = self.latent(image, None, "reference")
        m = self.mask(mask, latent) if mask is not None else None
        return extract_reference(self.backend, latent, prompt, steps=steps, mask=m, **kw)

    def specref(self, inv: Inversion, reference, target_prompt: str, edited_words=(), mask=None, **kw):
        """SpecRef edit of an inversion after a reference bank; mask: a fixed M_t instead of the edited
        words' attention. Keywords: see specref.specref_edit. Returns a SpecRefResult."""
        from .specref import specref_edit

        m = self.mask(mask, inv.source) if mask is not None else None
        return specref_edit(self.backend, inv, reference, target_prompt, edited_words, mask=m, **kw)

    def diffedit_mask(self, image, source_prompt: str, target_prompt: str, size: Optional[int] = None, **kw):
        """DiffEdit's mask of an image (or latent); keywords: samples, strength, threshold, seed."""
        from .diffedit import diffedit_mask

        return diffedit_mask(self.backend, self.latent(image, size), source_prompt, target_prompt, **kw)

    def diffedit(self, image, mask, target_prompt: str, size: Optional[int] = None, **kw):
        """DiffEdit sampling of an image (or latent) inside `mask` (see `mask`; e.g. diffedit_mask(...).mask);
        keywords: encoding_ratio, steps, guidance, encode_prompt. Returns a DiffEditResult."""
        from .diffedit import diffedit_sample

        latent = self.latent(image, size)
        return diffedit_sample(self.backend, latent, self.mask(mask, latent), target_prompt, **kw)

    def edit(self, inv: Inversion, target_prompts: Union[str, Sequence[str]],
             settings: Optional[P2PSettings] = None, **settings_kw) -> EditResult:
        """Prompt-to-Prompt edit of an inversion; keyword arguments are P2PSettings fields, over the
        model's own defaults (`edit_defaults`, from its folder's customedit.json) where it has any."""
        if settings is None:
            settings = P2PSettings(**{**self.edit_defaults, **settings_kw})
        elif settings_kw:
            raise InputError("settings", "give either a P2PSettings or its fields as keywords, not both")
        return p2p_edit(self.backend, inv, target_prompts, settings)

    def attention_maps(self, inv: Inversion, target_prompt: Optional[str] = None,
                       settings: Optional[P2PSettings] = None, label: bool = True) -> torch.Tensor:
        """IMAGE batch [N, H, W, 3] of the per-word cross-attention maps (see maps.attention_maps)."""
        from .maps import attention_maps
        return attention_maps(self.backend, inv, target_prompt, settings, label=label)

    # --- concepts (Custom Diffusion) -------------------------------------------------------
    def train_concept(self, images, class_word: str, token: str = "<new1>", masks=None, class_images=None,
                      size: Optional[int] = None, on_step: Optional[Callable[[int, float], None]] = None,
                      **settings):
        """Learn a concept from reference images (PIL images, arrays or an [N, H, W, 3] tensor in 0..1,
        resized to one size); keywords: see customize.TrainSettings. on_step(step, loss) after each
        step (progress). Returns a TrainResult whose `.concept` goes to `load_concept` or
        `concept.save`. The pipeline's model is left unchanged."""
        from .customize import TrainSettings, train_concept

        refs = self._image_batch(images, size, "images")
        cls = None if class_images is None else self._image_batch(class_images, size, "class_images",
                                                                  like=refs)
        m = None if masks is None else self._mask_batch(masks, refs)
        s = TrainSettings(token=token, class_word=class_word, **settings)
        return train_concept(self.backend, refs, self._encode_pixels, s, masks=m, class_images=cls,
                             on_step=on_step)

    def load_concept(self, concept, strength: float = 1.0) -> list:
        """Add a concept (a Concept or a .safetensors path) to this pipeline's model: its word works in
        every prompt from now on. Returns warnings (e.g. trained on another base model)."""
        from . import concept as concepts

        c = concepts.load(concept) if isinstance(concept, str) else concept
        warnings = concepts.apply(self.backend, c, strength)
        self.concepts.update(zip(c.tokens, c.class_words))
        for w in warnings:
            self.log(f"warning: {w}")
        return warnings

    def dci(self, prompt: str, seed: int = 0, size: Optional[int] = None, batch: int = 1,
            inversion: Optional[Inversion] = None, **kw):
        """DCI sampling of the loaded concept(s) from seeded noise (size x size px, or `size` as
        (width, height)) or from an inversion; keywords: see dci.dci_sample (auxiliary_prompt,
        concept_words, settings, steps, guidance, negative_prompt). Returns a DCIResult."""
        from .dci import dci_sample

        if not self.concepts:
            self.log("warning: no concept is loaded, so DCI is plain sampling")
        noise = None
        if inversion is None:
            w, h = (size, size) if isinstance(size, int) or size is None else size
            w, h = w or self.default_size, h or self.default_size
            m = self.pixel_multiple
            if w % m or h % m or w <= 0 or h <= 0:
                raise InputError("size", f"expected positive multiples of {m} px, got {w}x{h}")
            if batch < 1:
                raise InputError("batch", f"expected at least 1, got {batch}")
            s = self.backend.vae_scale
            g = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(batch, self.backend.latent_channels, h // s, w // s, generator=g)
        return dci_sample(self.backend, prompt, self.concepts, noise=noise, inversion=inversion, **kw)

    def _image_batch(self, images, size, input_name, like=None) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[-1] == 3:
            return images.float()
        if not isinstance(images, (list, tuple)) or not images:
            raise InputError(input_name, "expected a non-empty list of images or an [N, H, W, 3] tensor")
        first = self.prepare_image(images[0], size, input_name) if like is None else None
        w, h = (first.size if first is not None else (like.shape[2], like.shape[1]))
        out = []
        for k, img in enumerate(images):
            pil = to_pil(img, f"{input_name}[{k}]").convert("RGB")
            if pil.size != (w, h):
                if like is None and k > 0:
                    raise InputError(input_name, f"image {k} is {pil.size[0]}x{pil.size[1]} but the first is "
                                                 f"{w}x{h}; give reference images of one size")
                from PIL import Image
                pil = pil.resize((w, h), Image.LANCZOS)
            out.append(pil_to_tensor(pil)[0].permute(1, 2, 0))
        return torch.stack(out)

    def _mask_batch(self, masks, refs) -> torch.Tensor:
        import numpy as np

        if isinstance(masks, torch.Tensor):
            return masks.float()
        out = []
        for k, m in enumerate(masks):
            pil = to_pil(m, f"masks[{k}]").convert("L").resize((refs.shape[2], refs.shape[1]))
            out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
        return torch.stack(out)

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(self.device, _dtype(self.vae)) * 2.0 - 1.0
        lat = self.vae.encode(x).latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * self.scaling_factor

    def close(self) -> None:
        self.backend.close()


# --- image conversions -------------------------------------------------------------------
def to_pil(image, input_name: str = "image"):
    """PIL RGB from a PIL image, a path, a uint8/float array (H, W, 3) or a float tensor in 0..1
    ([3, H, W], [1, 3, H, W], [H, W, 3] or [1, H, W, 3])."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return open_image(str(image), input_name)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image))
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise InputError(input_name, f"holds {t.shape[0]} images; give one image")
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        if t.dim() != 3 or t.shape[-1] not in (1, 3):
            raise InputError(input_name, f"expected an RGB image tensor, got shape {tuple(image.shape)}")
        if t.shape[-1] == 1:
            t = t.expand(-1, -1, 3)
        return Image.fromarray((t.clamp(0, 1).numpy() * 255).round().astype("uint8"))
    raise InputError(input_name, f"expected a PIL image, a path, an array or a tensor, got {type(image).__name__}")


def open_image(path: str, input_name: str = "image"):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(input_name, f"{path!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(input_name, f"{path!r} is not a readable image ({e})") from None


def pil_to_tensor(pil) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(pil.convert("RGB")).astype("float32") / 255.0).permute(2, 0, 1)[None]


def tensor_to_pil(x: torch.Tensor):
    """[3, H, W] in 0..1 -> PIL."""
    from PIL import Image
    return Image.fromarray((x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"))


def demo_scene(size: int = 512):
    """The bundled picture (drawn, not shipped): a red circle on green grass under a blue sky."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size].astype("float32") / size
    img = np.zeros((size, size, 3), "float32")
    sky = yy < 0.55
    img[sky] = np.stack([0.35 + 0.2 * yy, 0.6 + 0.2 * yy, 0.95 - 0.1 * yy], -1)[sky]
    grass = ~sky
    stripes = 0.05 * np.sin(xx * 60 + yy * 20)
    img[grass] = np.stack([0.2 + stripes, 0.55 + 0.2 * (yy - 0.55) + stripes, 0.15 + 0 * yy], -1)[grass]
    r = np.sqrt((xx - 0.5) ** 2 + (yy - 0.58) ** 2)
    disk = r < 0.22
    shade = 1.0 - 0.6 * np.clip((xx - 0.42) ** 2 + (yy - 0.5) ** 2, 0, 1) ** 0.5
    img[disk] = np.stack([0.85 * shade, 0.08 * shade, 0.08 * shade], -1)[disk]
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype("uint8"))


# --- loading -----------------------------------------------------------------------------
def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", "CUDA was asked for but this torch build sees no GPU; use device 'cpu'")
    return dev


def alphas_from_scheduler_config(cfg: dict) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod float64 [N], prediction type) of a diffusers scheduler config."""
    from .ddim import sd_alphas_cumprod

    n = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    pred = cfg.get("prediction_type", "epsilon")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        return torch.cumprod(1.0 - betas, 0), pred
    if cfg.get("rescale_betas_zero_snr"):
        raise InputError("model", "the scheduler rescales betas to zero terminal SNR, which the DDIM math "
                                  "here does not support")
    if kind == "scaled_linear":
        return sd_alphas_cumprod(n, start, end), pred
    if kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, 0), pred
    if kind == "squaredcos_cap_v2":
        from diffusers import DDIMScheduler
        sch = DDIMScheduler(num_train_timesteps=n, beta_schedule=kind)
        return sch.alphas_cumprod.double(), pred
    raise InputError("model", f"the scheduler's beta schedule {kind!r} is not supported "
                              "(scaled_linear, linear, squaredcos_cap_v2)")


def load(model: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None,
         tokenizer: Optional[str] = None, prediction_type: Optional[str] = None,
         log: Optional[Callable[[str], None]] = None) -> Pipeline:
    """Load a model for editing, fully offline.

    model: a diffusers-format folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/), a single
    SD1.x/SD2.x/SDXL-base `.safetensors` checkpoint in the original (LDM/SGM) layout, None for the shipped toy-world
    model (toyworld/weights, trained on procedural scenes). device: default CUDA when available. dtype: of
    the UNet and text encoder, default float16 on CUDA and float32 on the CPU (the VAE always runs in float32).
    tokenizer: a CLIP tokenizer folder, overriding the one found with the model.
    prediction_type: "epsilon" or "v_prediction", overriding what is read or inferred.
    """
    log = log or _stderr
    dev = _device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise InputError("prediction_type", f"expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
    notes = []
    family = None
    if model is None:
        if not os.path.isfile(os.path.join(TOYWORLD_FOLDER, "model_index.json")):
            raise InputError("model", f"no model given and the toy-world model is not at {TOYWORLD_FOLDER!r}; "
                                      "give a diffusers-format folder or a .safetensors SD1.x/SD2.x/SDXL checkpoint")
        log(TOYWORLD_NOTICE)
        model, family = TOYWORLD_FOLDER, "toyworld"
    model = os.fspath(model)
    if os.path.isdir(model):
        unet, te, tok, vae, alphas, pred, second = _load_folder(model, tokenizer, log)
        pred = prediction_type or pred
        # the UNet's native size: 512 px for SD1.x, 768 for SD2.x-v, 64 for the toy-world model
        family, size = family or "diffusers", int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    elif os.path.isfile(model):
        unet, te, tok, vae, pred, family, second = _load_single_file(model, tokenizer, prediction_type, log, notes)
        alphas, size = None, 1024 if family == "sdxl" else 512
    elif model.lower().endswith(PICKLE_SUFFIXES):
        raise InputError("model", f"{model!r} does not exist (and pickle checkpoints are refused anyway: "
                                  "convert them to .safetensors)")
    else:
        raise InputError("model", f"{model!r} does not exist; expected a diffusers-format folder or a "
                                  ".safetensors SD1.x/SD2.x/SDXL checkpoint (models are never downloaded)")
    pipe = from_models(unet, te, tok, vae, device=dev, dtype=dtype, alphas_cumprod=alphas, prediction_type=pred,
                       source=model, family=family, notes=notes, log=log, default_size=size,
                       text_encoder_2=second[0], tokenizer_2=second[1])
    if os.path.isdir(model):
        pipe.edit_defaults = model_defaults(model)
    return pipe


MODEL_DEFAULTS = "customedit.json"


def model_defaults(folder: str) -> dict:
    """A model folder's own P2PSettings defaults: {"p2p": {field: value}} in customedit.json. For what
    helps only that model (the toy world's empty unconditional embedding for edit rows, say); SD's
    defaults stay the reference's."""
    path = os.path.join(folder, MODEL_DEFAULTS)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            p2p = json.load(f).get("p2p", {})
        fields = set(P2PSettings.__dataclass_fields__)
        if not isinstance(p2p, dict) or set(p2p) - fields:
            raise ValueError(f"unknown settings {sorted(set(p2p) - fields) if isinstance(p2p, dict) else p2p!r}")
        P2PSettings(**p2p)
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError("model", f"{path} is not a valid settings file ({e}); expected "
                                  '{"p2p": {<P2PSettings field>: value}}') from None
    return p2p


def from_models(unet, text_encoder, tokenizer, vae, device=None, dtype: Optional[torch.dtype] = None,
                alphas_cumprod: Optional[torch.Tensor] = None, prediction_type: str = "epsilon",
                source: str = "", family: str = "diffusers", notes: Sequence[str] = (),
                log: Optional[Callable[[str], None]] = None, default_size: int = 512,
                text_encoder_2=None, tokenizer_2=None) -> Pipeline:
    """A Pipeline of diffusers modules already built (UNet2DConditionModel, CLIPTextModel, CLIPTokenizer,
    AutoencoderKL; SDXL: also CLIPTextModelWithProjection and its tokenizer): frozen, in eval mode,
    moved to the device; the UNet and text encoders in `dtype` (default float16 on CUDA, float32 on
    the CPU), the VAE in float32. alphas_cumprod: default SD's scaled-linear schedule."""
    dev = _device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]
    for m in (unet, *encoders, vae):
        m.requires_grad_(False)
        m.eval()
    for m, dt in ((unet, dtype), *((e, dtype) for e in encoders), (vae, torch.float32)):
        m.to(dev)
        if _dtype(m) != dt:
            m.to(dt)
    backend = DiffusersBackend(unet, text_encoder, tokenizer, alphas_cumprod=alphas_cumprod,
                               prediction_type=prediction_type, device=dev, dtype=dtype,
                               text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                               vae_scale=2 ** (len(vae.config.block_out_channels) - 1))
    scaling = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
    return Pipeline(backend, vae, scaling, source, family, list(notes), log or _stderr, default_size)


# diffusers pipelines whose folders hold an SDXL base (two text encoders, text_time UNet)
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")


def _has_weights(folder: str, name: str) -> Optional[str]:
    """Raise for a component folder with only pickled weights; return its path."""
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        raise InputError("model", f"{folder!r} has no {name}/ folder; a diffusers-format SD1.x/SD2.x folder "
                                  "needs unet/, text_encoder/, tokenizer/ and vae/ (scheduler/ optional; "
                                  "SDXL also text_encoder_2/ and tokenizer_2/)")
    if name.startswith("tokenizer"):
        return path
    files = os.listdir(path)
    if not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith(PICKLE_SUFFIXES) for f in files):
            refuse_pickle(os.path.join(path, next(f for f in files if f.endswith(PICKLE_SUFFIXES))))
        raise InputError("model", f"{path!r} holds no .safetensors weights")
    return path


def _load_folder(folder: str, tokenizer: Optional[str], log):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .single_file import load_tokenizer_folder

    index = os.path.join(folder, "model_index.json")
    cls = ""
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            cls = json.load(f).get("_class_name", "")
        if cls not in SDXL_PIPELINES and any(x in cls for x in (
                "XL", "StableDiffusion3", "Flux", "Cascade", "Kandinsky", "UnCLIP", "PixArt", "Upscale", "Sana",
                "Wuerstchen")):
            raise InputError("model", f"{folder!r} is a {cls} folder, which is not supported; {SUPPORTED}")
    sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    if sdxl and not os.path.isdir(os.path.join(folder, "text_encoder")):
        raise InputError("model", f"{folder!r} has only the second (CLIP-G) text encoder: an SDXL refiner, which "
                                  f"is not supported (it is an img2img second stage); load the SDXL base; {SUPPORTED}")
    for name in ("unet", "text_encoder", "vae"):
        _has_weights(folder, name)
    with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
        ucfg = json.load(f)
    if (ucfg.get("addition_embed_type") == "text_time") != sdxl:
        what = "an SDXL UNet without text_encoder_2/" if not sdxl else "text_encoder_2/ with a UNet that is not SDXL's"
        raise InputError("model", f"{folder!r} has {what}; expected a complete SD1.x/SD2.x or SDXL folder")
    if ucfg.get("in_channels", 4) != 4:
        raise InputError("model", f"the UNet takes {ucfg.get('in_channels')} input channels (an inpainting or "
                                  "depth model); only plain 4-channel text-to-image models are supported")
    kw = dict(local_files_only=True, use_safetensors=True)
    dkw = dict(kw, low_cpu_mem_usage=False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **dkw)
    te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), **kw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **dkw)
    tok = load_tokenizer_folder(tokenizer or _has_weights(folder, "tokenizer"), None,
                                "tokenizer" if tokenizer else "model")
    second = (None, None)
    if sdxl:
        from transformers import CLIPTextModelWithProjection

        _has_weights(folder, "text_encoder_2")
        te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2"), **kw)
        # bare vocab/merges: pad with "!" (what SDXL's tokenizer_2 does, as SD2.x's tokenizer)
        tok2 = load_tokenizer_folder(_has_weights(folder, "tokenizer_2"), "sd2", "model")
        _check_vocab(te2, tok2)
        second = (te2, tok2)
    alphas, pred = None, "epsilon"
    sch = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(sch):
        with open(sch, encoding="utf-8") as f:
            alphas, pred = alphas_from_scheduler_config(json.load(f))
    else:
        log("note: no scheduler/scheduler_config.json; assuming SD's scaled-linear betas and epsilon prediction")
    _check_vocab(te, tok)
    return unet, te, tok, vae, alphas, pred, second


def _load_single_file(path: str, tokenizer: Optional[str], prediction_type, log, notes):
    from .clip_vocab import clip_tokenizer
    from .single_file import (build_text_encoder, build_text_encoder_2, build_unet, build_vae,
                              find_tokenizer_folder, inspect_checkpoint, load_tokenizer_folder)

    ck = inspect_checkpoint(path, prediction_type)
    tok_dir = tokenizer or find_tokenizer_folder(path)
    if tok_dir:
        tok = load_tokenizer_folder(tok_dir, ck.family)
        notes.append(f"tokenizer from {tok_dir}")
    else:
        tok = clip_tokenizer("!" if ck.family == "sd2" else "<|endoftext|>")
        notes.append("tokenizer derived from the vendored CLIP BPE merges")
    if ck.text_config["vocab_size"] != len(tok):
        raise InputError("tokenizer", f"the checkpoint's text encoder has {ck.text_config['vocab_size']} token "
                                      f"embeddings but the tokenizer has {len(tok)} tokens; give the matching "
                                      "tokenizer folder (vocab.json + merges.txt) with --tokenizer")
    unet = build_unet(ck)
    te = build_text_encoder(ck, tok)
    second = (None, None)
    if ck.family == "sdxl":
        # SDXL's second tokenizer is the same vocabulary padded with "!" (id 0) after the end token
        tok2 = load_tokenizer_folder(tok_dir, "sd2") if tok_dir else clip_tokenizer("!")
        second = (build_text_encoder_2(ck, tok2), tok2)
    vae = build_vae(ck)
    name = "SDXL" if ck.family == "sdxl" else f"{ck.family.upper()}.x"
    note = f"{name} checkpoint, {ck.prediction_type} prediction ({ck.prediction_note})"
    notes.append(note)
    if ck.family == "sd2" and not prediction_type:
        log(f"note: {note}")
    ck.state_dict.clear()
    return unet, te, tok, vae, ck.prediction_type, ck.family, second


def _check_vocab(te, tok):
    n = te.config.vocab_size
    if n < len(tok):
        raise InputError("tokenizer", f"the tokenizer has {len(tok)} tokens but the text encoder only {n} "
                                      "embeddings; give the tokenizer that belongs to the model")


__all__ = ["METHODS", "Pipeline", "P2PSettings", "demo_scene", "from_models", "load", "open_image", "to_pil"]

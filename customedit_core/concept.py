"""A learned concept: new token vectors plus cross-attention key/value weight deltas.

One `.safetensors` file holds everything: the deltas (keyed by canonical LDM layer names, see
unet_names.py), the token vectors, token and class words, a probe of the base model's weights,
and the training settings. Saving can also export what stock ComfyUI reads without this pack:
a LoRA-format file of full `.diff` deltas (LoraLoader) and an embedding file (`embedding:name`).

Base-model check: the probe is a few sampled values of every base K/V weight and of the token
table. A concept meets a model when shapes agree; values that differ mean another base model,
which is allowed with a warning (a concept transfers somewhat between fine-tunes of one base).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .single_file import is_pickle, refuse_pickle
from .tokens import check_token_text

FORMAT = "customedit.concept"
VERSION = "1"


@dataclass
class Concept:
    tokens: tuple                    # new words, e.g. ("<new1>",)
    class_words: tuple               # e.g. ("dog",)
    embeddings: torch.Tensor         # [len(tokens), D] input vectors of the tokens
    deltas: dict                     # canonical K/V name -> [out, in] delta
    base_probe: torch.Tensor         # probe() of the model it was trained on
    base_fingerprint: str
    settings: dict = field(default_factory=dict)
    name: str = ""
    text_widths: tuple = ()          # SDXL: (CLIP-L, CLIP-G) widths the vectors hold side by side

    @property
    def width(self) -> int:
        return int(self.embeddings.shape[-1])

    def describe(self) -> str:
        words = ", ".join(f"{t} ({c})" for t, c in zip(self.tokens, self.class_words))
        return f"concept {self.name or '?'}: {words}; {len(self.deltas)} K/V deltas; base {self.base_fingerprint}"


# ---- base model probe ----------------------------------------------------------------------

def probe(backend) -> torch.Tensor:
    """A few values of every base K/V weight and of the token table, in a fixed order."""
    vals = []
    kv = backend.kv_weights()
    for name in sorted(kv):
        flat = kv[name].detach().flatten()
        idx = torch.tensor([0, flat.numel() // 3, 2 * flat.numel() // 3, flat.numel() - 1], device=flat.device)
        vals.append(flat[idx].float().cpu())
    table = backend.token_embedding_table()
    rows = torch.tensor([0, table.shape[0] // 2, table.shape[0] - 1], device=table.device)
    vals.append(table[rows, :4].float().flatten().cpu())
    return torch.cat(vals)


def fingerprint_of(p: torch.Tensor) -> str:
    # fp16 copies of the same weights must print the same, so hash a coarse rounding
    return hashlib.sha1(torch.round(p.double() * 256).numpy().tobytes()).hexdigest()[:12]


def check_base(concept: Concept, backend, input_name: str = "concept") -> list:
    """Errors for a concept that cannot be applied to this model; warnings for another base."""
    table = backend.token_embedding_table()
    ours = tuple(getattr(backend, "text_widths", ()) or ())
    if bool(concept.text_widths) != bool(ours):
        made, this = ("an SDXL model", "is not SDXL") if concept.text_widths else ("an SD1.x/SD2.x model", "is SDXL")
        raise InputError(input_name, f"{concept.name or 'the concept'} was made for {made}, but this model {this}; "
                                     "load it with the family it was trained on")
    if concept.width != int(table.shape[-1]) or (ours and tuple(concept.text_widths) != ours):
        raise InputError(input_name, f"{concept.name or 'the concept'} has {concept.width}-wide token vectors but this "
                                     f"model's text encoder takes {int(table.shape[-1])} (made for another model family)")
    kv = backend.kv_weights()
    for name, d in concept.deltas.items():
        if name not in kv:
            raise InputError(input_name, f"{concept.name or 'the concept'} changes layer {name}, which this model does not "
                                         "have (made for another model family)")
        if tuple(d.shape) != tuple(kv[name].shape):
            raise InputError(input_name, f"{concept.name or 'the concept'} has a {tuple(d.shape)} delta for {name} but this "
                                         f"model's weight is {tuple(kv[name].shape)} (made for another model family)")
    here = probe(backend)
    same = here.shape == concept.base_probe.shape and torch.allclose(here, concept.base_probe, rtol=1e-2, atol=1e-3)
    if same:
        return []
    return [f"{input_name}: {concept.name or 'the concept'} was trained on another base model (fingerprint "
            f"{concept.base_fingerprint}, this model {fingerprint_of(here)}); the layer shapes match, so it is applied "
            "anyway, but expect a weaker or distorted concept"]


# ---- applying to a core backend ------------------------------------------------------------

def apply(backend, concept: Concept, strength: float = 1.0, input_name: str = "concept") -> list:
    """Add the concept's tokens and K/V deltas (times strength) to a backend; returns warnings.

    Several concepts stack (their deltas add). Strength 1 uses the stored deltas as they are,
    so predictions match the model the concept was trained in bit for bit."""
    warnings = check_base(concept, backend, input_name)
    tok = backend.tokenizer
    for word in concept.tokens:
        if word in getattr(tok, "added", {}):
            raise InputError(input_name, f"token {word!r} is already taken by a loaded concept; a model can hold one "
                                         "concept per token")
    current = dict(backend.concept_deltas or {})
    for name, d in concept.deltas.items():
        d = d.to(backend.device) if strength == 1.0 else float(strength) * d.to(backend.device)
        current[name] = current[name] + d if name in current else d
    backend.set_kv_deltas(current)
    backend.concept_deltas = current
    for word, vec in zip(concept.tokens, concept.embeddings):
        tok.add_word(word, vec.to(backend.device), input_name)
    return warnings


# ---- file ----------------------------------------------------------------------------------

def _write_atomic(path: str, tensors: dict, metadata: dict) -> str:
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save(concept: Concept, path: str) -> str:
    tensors = {"embeddings": concept.embeddings.float(), "base_probe": concept.base_probe.float()}
    tensors.update({f"delta.{k}": v.float() for k, v in concept.deltas.items()})
    meta = {"format": FORMAT, "version": VERSION, "name": concept.name, "tokens": json.dumps(list(concept.tokens)),
            "class_words": json.dumps(list(concept.class_words)), "base_fingerprint": concept.base_fingerprint,
            "settings": json.dumps(concept.settings, sort_keys=True, default=str),
            "text_widths": json.dumps(list(concept.text_widths))}
    return _write_atomic(path, tensors, meta)


def _read(path: str, input_name: str):
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise InputError(input_name, f"file {path} does not exist")
    if is_pickle(path):
        refuse_pickle(path, input_name, "; for diffusers Custom Diffusion output use its .safetensors files")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:       # safetensors raises its own error types for bad headers and short files
        raise InputError(input_name, f"{os.path.basename(path)} is corrupt or truncated ({e}); "
                                     "expected a .safetensors concept file") from None
    return meta, tensors


def load(path: str, input_name: str = "concept") -> Concept:
    meta, tensors = _read(path, input_name)
    base = os.path.basename(path)
    if meta.get("format") != FORMAT:
        if any("custom_diffusion" in k for k in tensors):
            raise InputError(input_name, f"{base} is a diffusers Custom Diffusion weights file; convert it once with "
                                         "`python -m customedit_core import-concept` (it needs the base model)")
        raise InputError(input_name, f"{base} is not a customedit concept file (no '{FORMAT}' metadata; a LoRA or an "
                                     "embedding goes to ComfyUI's own loaders)")
    try:
        tokens = tuple(json.loads(meta["tokens"]))
        classes = tuple(json.loads(meta["class_words"]))
        settings = json.loads(meta.get("settings", "{}"))
        emb, probe_ = tensors["embeddings"], tensors["base_probe"]
        widths = tuple(int(w) for w in json.loads(meta.get("text_widths", "[]")))
    except (KeyError, ValueError) as e:
        raise InputError(input_name, f"{base} is incomplete ({e}); save the concept again") from None
    for t in tokens:          # the file's words obey the rules a trained token does (not "cat", "(x)", "")
        try:
            check_token_text(t, input_name)
        except InputError as e:
            raise InputError(input_name, f"{base} holds an invalid token: {str(e)[len(input_name) + 2:]}") from None
    deltas = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")}
    if emb.ndim != 2 or emb.shape[0] != len(tokens) or len(classes) != len(tokens) or not tokens:
        raise InputError(input_name, f"{base} is inconsistent: {len(tokens)} tokens, {len(classes)} class words, "
                                     f"token vectors of shape {tuple(emb.shape)}")
    if widths and sum(widths) != emb.shape[1]:
        raise InputError(input_name, f"{base} is inconsistent: token vectors of {emb.shape[1]} for text "
                                     f"encoders of widths {list(widths)}")
    for k, v in list(deltas.items()) + [("embeddings", emb)]:
        if v.ndim != 2 or not torch.isfinite(v).all():
            raise InputError(input_name, f"{base}: tensor {k} is not a finite matrix")
    return Concept(tokens, classes, emb.float(), {k: v.float() for k, v in deltas.items()}, probe_.float(),
                   meta.get("base_fingerprint", "?"), settings, meta.get("name") or os.path.splitext(base)[0], widths)


# ---- exports for stock ComfyUI -------------------------------------------------------------

def export_lora(concept: Concept, path: str) -> str:
    """LoRA-format file of full-rank '.diff' deltas: ComfyUI's LoraLoader adds them to the UNet."""
    tensors = {f"diffusion_model.{k}.diff": v.float() for k, v in concept.deltas.items()}
    meta = {"customedit_concept": concept.name, "tokens": json.dumps(list(concept.tokens)),
            "note": "K/V deltas of a customedit concept; write the tokens with the embedding file"}
    return _write_atomic(path, tensors, meta)


def export_embedding(concept: Concept, path: str) -> str:
    """Embedding file for ComfyUI's `embedding:<file name>` prompt syntax (one row per token). SDXL:
    the "clip_l" and "clip_g" halves, the SDXL embedding format that ComfyUI's SDXL CLIP reads by key
    (a single "emb_params" would be refused by, or misread as, one encoder's)."""
    e = concept.embeddings.float()
    if concept.text_widths:
        wl = concept.text_widths[0]
        tensors = {"clip_l": e[:, :wl].contiguous(), "clip_g": e[:, wl:].contiguous()}
    else:
        tensors = {"emb_params": e}
    return _write_atomic(path, tensors, {"customedit_concept": concept.name, "tokens": json.dumps(list(concept.tokens))})


# ---- import of diffusers Custom Diffusion output -------------------------------------------

def from_custom_diffusion(weights_path: str, embedding_paths: dict, class_words: dict, backend,
                          layers_per_block: int = 2, name: str = "") -> Concept:
    """diffusers' Custom Diffusion output (`pytorch_custom_diffusion_weights.safetensors` with full
    trained to_k/to_v weights, and one `<token>.safetensors` per modifier token) -> a Concept of
    deltas against `backend`'s weights."""
    from .unet_names import diffusers_to_ldm

    _, weights = _read(weights_path, "weights")
    base = backend.kv_weights()
    deltas = {}
    for key, w in weights.items():
        if "attn2.processor.to_" not in key or "_custom_diffusion.weight" not in key:
            continue
        layer, _, proj = key.partition(".processor.")
        proj = proj.split("_custom_diffusion")[0]          # to_k / to_v (to_q/to_out are not K/V)
        if proj not in ("to_k", "to_v"):
            continue
        canonical = f"{diffusers_to_ldm(layer, layers_per_block)}.{proj}"
        if canonical not in base or tuple(base[canonical].shape) != tuple(w.shape):
            raise InputError("weights", f"{os.path.basename(weights_path)}: {key} does not fit this model")
        deltas[canonical] = w.float() - base[canonical].float().cpu()
    if not deltas:
        raise InputError("weights", f"{os.path.basename(weights_path)} holds no Custom Diffusion to_k/to_v weights")
    tokens, vecs = [], []
    for token, p in embedding_paths.items():
        _, t = _read(p, "embedding")
        v = t.get(token, next(iter(t.values())) if len(t) == 1 else None)
        if v is None:
            raise InputError("embedding", f"{os.path.basename(p)} has no vector for {token!r}")
        tokens.append(token.lower())
        vecs.append(v.float().reshape(-1))
    missing = [t for t in embedding_paths if t not in class_words]
    if missing:
        raise InputError("class_word", f"give a class word for {missing[0]!r}")
    classes = tuple(class_words[t] for t in embedding_paths)
    p = probe(backend)
    return Concept(tuple(tokens), classes, torch.stack(vecs), deltas, p, fingerprint_of(p),
                   {"source": "diffusers custom diffusion"}, name, tuple(backend.text_widths))

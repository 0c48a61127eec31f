"""What every backend provides. Algorithms use only this; they never import a model library.

Latents handed to the core are in the model's space (VAE output times its scaling factor).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from ..attention import AttentionHook
from ..tokens import PromptTokens, Tokenizer

# what every backend accepts; refusals end with it (file loading words its own: single_file.SUPPORTED)
SUPPORTED = ("supported: SD1.x, SD2.x and SDXL base checkpoints (e.g. v1-5, v2-1, sdxl-base-1.0 and its "
             "fine-tunes), eps or v prediction")


class Backend:
    tokenizer: Tokenizer
    alphas_cumprod: torch.Tensor       # [1000] float64, the model's training schedule
    latent_channels: int = 4
    latent_multiple: int = 8           # latent height/width must be a multiple of this
    vae_scale: int = 8                 # image pixels per latent cell
    device: torch.device = torch.device("cpu")
    name: str = "backend"
    concept_deltas: Optional[dict] = None   # K/V deltas of the concepts applied (concept.apply)
    # widths of the text encoders whose input vectors a token vector holds side by side: () for one
    # encoder (SD1.x/SD2.x), (CLIP-L, CLIP-G) for SDXL (token_embedding_table rows are that pair)
    text_widths: tuple = ()

    def fingerprint(self) -> str:
        """Identifies the model (weights and patches) an inversion was made with."""
        raise NotImplementedError

    def encode(self, prompts: Sequence[PromptTokens], overrides=None) -> torch.Tensor:
        """Text embeddings [B, L, D] (float32, on self.device) for padded token sequences.

        Positions holding an added word's placeholder id (a concept token) get that word's input
        vector; `overrides` (per prompt, {position: vector [D]}) replace more input vectors
        (learnable contexts). Autograd flows to those vectors when they require grad.
        """
        raise NotImplementedError

    # ---- what concept training and loading use ----------------------------------------------

    def kv_weights(self) -> dict:
        """Base weight [out, in] of every cross-attention key/value projection, by canonical
        (LDM) name, e.g. 'input_blocks.1.1.transformer_blocks.0.attn2.to_k'. Read only."""
        raise NotImplementedError

    def set_kv_deltas(self, deltas: Optional[dict]) -> None:
        """From now on compute those projections with W + deltas[name] (None: plain weights)."""
        raise NotImplementedError

    def token_embedding_table(self) -> torch.Tensor:
        """The text encoder's input embedding rows [vocab, D]. Read only."""
        raise NotImplementedError

    def frozen(self) -> contextlib.AbstractContextManager:
        """Context in which no model parameter collects gradients (restored afterwards)."""
        return contextlib.nullcontext()

    def gradient_checkpointing(self) -> contextlib.AbstractContextManager:
        """Context that recomputes activations in backward instead of keeping them."""
        return contextlib.nullcontext()

    def predict_eps(self, z: torch.Tensor, t: int, context: torch.Tensor,
                    hook: Optional[AttentionHook] = None) -> torch.Tensor:
        """Noise prediction (float32) for latents z [B, C, h, w] at integer timestep t
        (or a LongTensor [B] of timesteps, one per row)."""
        raise NotImplementedError

    def text_grad_enabled(self):
        """Like grad_enabled(), and autograd also flows through the text encoder to its inputs."""
        return self.grad_enabled()

    def grad_enabled(self):
        """Context in which autograd can flow through the model to its inputs."""
        return torch.enable_grad()

    def check_interrupt(self) -> None:
        """Raise if the user asked to stop."""

    def progress(self, total: int) -> Callable[[int], None]:
        """A callable advancing a progress display by n."""
        return lambda n=1: None

    def offload(self) -> contextlib.AbstractContextManager:
        """Context that keeps the model on its device for a run of calls."""
        return contextlib.nullcontext()


def input_vectors(tokenizer, prompts: Sequence[PromptTokens], overrides=None) -> list:
    """Per prompt {position: vector}: added words' vectors, then the explicit overrides."""
    table = getattr(tokenizer, "vectors", None) or {}
    out = []
    for b, p in enumerate(prompts):
        d = {pos: table[i] for pos, i in enumerate(p.ids) if i in table}
        if overrides is not None and overrides[b]:
            d.update(overrides[b])
        out.append(d)
    return out


def wants_grad(vectors: list) -> bool:
    return torch.is_grad_enabled() and any(getattr(v, "requires_grad", False) for d in vectors for v in d.values())

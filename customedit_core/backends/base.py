"""What every backend provides. Algorithms use only this; they never import a model library.

Latents handed to the core are in the model's space (VAE output times its scaling factor).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from ..attention import AttentionHook
from ..tokens import PromptTokens, Tokenizer


class Backend:
    tokenizer: Tokenizer
    alphas_cumprod: torch.Tensor       # [1000] float64, the model's training schedule
    latent_channels: int = 4
    latent_multiple: int = 8           # latent height/width must be a multiple of this
    vae_scale: int = 8                 # image pixels per latent cell
    device: torch.device = torch.device("cpu")
    name: str = "backend"

    def fingerprint(self) -> str:
        """Identifies the model (weights and patches) an inversion was made with."""
        raise NotImplementedError

    def encode(self, prompts: Sequence[PromptTokens]) -> torch.Tensor:
        """Text embeddings [B, L, D] (float32, on self.device) for padded token sequences."""
        raise NotImplementedError

    def predict_eps(self, z: torch.Tensor, t: int, context: torch.Tensor,
                    hook: Optional[AttentionHook] = None) -> torch.Tensor:
        """Noise prediction (float32) for latents z [B, C, h, w] at integer timestep t."""
        raise NotImplementedError

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

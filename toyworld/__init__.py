"""A procedural world with known ground truth and a small latent diffusion model trained on it."""

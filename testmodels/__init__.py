"""Models for tests and benchmarks, built from configs with fixed seeds (never downloaded).

- `real_shapes`: random weights at the exact shapes of Stable Diffusion 1.5 and 2.x (UNet, text
  encoder, VAE), so code paths that only real sizes reach (tensors over 2^24 elements, four UNet
  levels, 64-channel heads, linear projections, v-prediction) are exercised.
- `tiny`: SD1.x-structured models at toy width (`tiny_models`) and their api.Pipeline
  (`tiny_pipeline`), random weights: what most tests run on.
- `word_bpe`: a CLIP BPE tokenizer whose merges spell out given words (the tiny and toy-world models').
- `ldm_layout`: writes diffusers modules as a single-file checkpoint in the original LDM layout,
  which both ComfyUI's loaders and the pack's own single-file loader read.

The pack (`customedit_core`, `nodes`) never imports this package.
"""

#!/usr/bin/env python
"""Write a tiny random-weight SDXL checkpoint (SGM layout, fp16) that ComfyUI's CheckpointLoaderSimple
loads as SDXL with the test-only entry of tests/comfy_tiny_sdxl_node, and that the pack's single-file
loader rebuilds exactly (the UNet and both text encoders; its VAE is a TAESD, which ComfyUI loads and
the pack's loader does not need for parity). Test only: generated at test time, never committed.

UNet: testmodels.ldm_layout.tiny_sdxl_ldm_models (64/64/128 channels, heads of 64, GroupNorm 32,
transformer depths 0/1/2, linear projections) with SDXL's 256-dim size/crop features; CLIP-L 64 wide
+ CLIP-G 128 wide (3 layers each) over the full CLIP vocabulary, so ComfyUI's own tokenizers serve.

  python tests/make_tiny_sdxl.py --comfy $COMFYUI_DIR --out models/checkpoints/tiny_sdxl.safetensors
"""
import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, help="a ComfyUI checkout (for its TAESD class)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    sys.path.insert(0, a.comfy)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    import comfy.taesd.taesd
    from customedit_core.clip_vocab import clip_tokenizer
    from testmodels.ldm_layout import tiny_sdxl_ldm_models, write_checkpoint

    tok, tok2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    unet, te, te2, _ = tiny_sdxl_ldm_models(tok, tok2, seed=a.seed, time_dim=256)
    torch.manual_seed(a.seed + 1)
    taesd = comfy.taesd.taesd.TAESD()
    for m in taesd.modules():        # ComfyUI's ops skip weight init (a no-op reset): torch's own
        for base in (torch.nn.Conv2d, torch.nn.Linear):
            if isinstance(m, base):
                base.reset_parameters(m)
    vae = {f"first_stage_model.{k}": v for k, v in taesd.state_dict().items()}
    write_checkpoint(a.out, unet, te, None, "sdxl", torch.float16, extra=vae, text_encoder_2=te2)


if __name__ == "__main__":
    main()

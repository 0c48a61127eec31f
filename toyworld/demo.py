"""Write the toy-world model's demo scene beside its weights (what the command line edits without
--image): demo.png, the DEMO_SCENE rendered at the model's size, and demo.json, its prompts.

    python -m toyworld.demo [--out toyworld/weights]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from .model import FOLDER, IMAGE_SIZE
from .world import DEMO_SCENE, render

TARGET = "a blue circle on grass"


def write_demo(folder: str = FOLDER) -> tuple:
    """Write demo.png and demo.json into `folder`; returns their paths."""
    png, js = os.path.join(folder, "demo.png"), os.path.join(folder, "demo.json")
    img = render(DEMO_SCENE, IMAGE_SIZE)[0]
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(png)
    with open(js, "w", encoding="utf-8") as f:
        json.dump({"source": DEMO_SCENE.caption(), "target": TARGET}, f, indent=1)
    return png, js


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m toyworld.demo",
                                 description="write demo.png and demo.json of the toy-world model")
    ap.add_argument("--out", default=FOLDER, help="the model folder (default: the shipped one)")
    print("wrote", *write_demo(ap.parse_args().out))

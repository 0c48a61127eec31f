"""The command line's picture: panels of one size in rows, each scaled up by a whole factor, names in a
white strip above each row (never drawn over the images)."""
from __future__ import annotations

import math

MIN_SIDE = 256          # the toy-world model works at 64 px: too small to judge an edit by eye
STRIP = 16              # height of the label strip, px (PIL's default font is 11 px high)


def scale_factor(size: tuple[int, int], min_side: int = MIN_SIDE) -> int:
    """The whole factor that brings the shorter side of `size` (w, h) to at least `min_side`."""
    return max(1, math.ceil(min_side / min(size)))


def mask_panel(mask, size: tuple[int, int]):
    """A grid mask [1, 1, h, w] (or [1, h, w]) in 0..1 as a grey PIL image of `size` (w, h), nearest
    sampled so its cells stay visible."""
    import torch.nn.functional as F
    from PIL import Image

    m = mask.float().reshape(1, 1, *mask.shape[-2:])
    m = F.interpolate(m, size=(size[1], size[0]), mode="nearest")[0, 0]
    return Image.fromarray((m.clamp(0, 1).numpy() * 255).round().astype("uint8")).convert("RGB")


def grid(panels, labels=None, columns: int = 0, min_side: int = MIN_SIDE):
    """One picture of `panels` (PIL images of one size) in rows of `columns` (0: all in one row), each
    panel scaled up with nearest neighbour by `scale_factor`; `labels` (one per panel) are written in
    a white strip of STRIP px above each row, None leaves the strip out."""
    from PIL import Image

    if not panels:
        raise ValueError("no panels to compose")
    if labels is not None and len(labels) != len(panels):
        raise ValueError(f"{len(labels)} labels for {len(panels)} panels")
    size = panels[0].size
    if any(p.size != size for p in panels):
        raise ValueError(f"panels differ in size: {sorted({p.size for p in panels})}")
    f = scale_factor(size, min_side)
    w, h = size[0] * f, size[1] * f
    cols = columns if columns > 0 else len(panels)
    rows = -(-len(panels) // cols)
    strip = STRIP if labels is not None else 0
    out = Image.new("RGB", (min(cols, len(panels)) * w, rows * (strip + h)), (255, 255, 255))
    for k, p in enumerate(panels):
        x, y = (k % cols) * w, (k // cols) * (strip + h)
        out.paste(p.convert("RGB").resize((w, h), Image.NEAREST), (x, y + strip))
        if labels is not None:
            out.paste(_strip(labels[k], w), (x, y))
    return out


def _strip(text: str, width: int):
    # drawn on its own strip so a long name is clipped at its panel, not written over the next one
    from PIL import Image, ImageDraw

    s = Image.new("RGB", (width, STRIP), (255, 255, 255))
    ImageDraw.Draw(s).text((4, 2), text, fill=(0, 0, 0))
    return s


def row(panels, labels=None, min_side: int = MIN_SIDE):
    """`grid` in a single row: panel k at x = k * its scaled width, below the label strip."""
    return grid(panels, labels, 0, min_side)

"""Measurements of images against the world's own rules (no learned classifier).

- colour: every pixel of a region goes to the nearest of the palette's colours and their dark
  shades; the region's colour is the majority of those votes (a pattern does not change it).
- shape: the region's mask is compared with each shape's template placed on the mask's bounding
  box; the shape is the template with the best IoU.
- pattern: the region's dark-shade pixels are compared with each pattern rendered at the object's
  known geometry; the pattern is the one with the best agreement.
- background: the mean colour outside the objects against each background's mean colour.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np

from .world import BACKGROUNDS, COLORS, HELD_OUT, PATTERNS, SHADE, SHAPES, Obj, Scene, _background, _grid, \
    _inside, _pattern

_NAMES = list(COLORS)
_PROTOS = np.array([COLORS[c] for c in _NAMES] + [tuple(SHADE * np.array(COLORS[c])) for c in _NAMES])


def _pixels(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return img.reshape(-1, 3)[mask.reshape(-1).astype(bool)]


def colour_votes(img: np.ndarray, mask: np.ndarray) -> dict:
    """{colour: share of the region's pixels nearest to it or its shade}."""
    px = _pixels(img, mask)
    if not len(px):
        return {}
    d = ((px[:, None, :] - _PROTOS[None]) ** 2).sum(-1)
    k = d.argmin(1) % len(_NAMES)
    return {c: float((k == i).mean()) for i, c in enumerate(_NAMES)}


def colour_of(img: np.ndarray, mask: np.ndarray) -> Optional[str]:
    votes = colour_votes(img, mask)
    return max(votes, key=votes.get) if votes else None


def colour_mask(img: np.ndarray, colour: str, tol: float = 0.2) -> np.ndarray:
    """Pixels within `tol` (RMS over the channels) of a colour or of its shade; 0.2 accepts a generated
    colour's drift and still keeps the backgrounds apart from the colours that stand out on them."""
    base = np.array(COLORS[colour])
    d = np.minimum(((img - base) ** 2).sum(-1), ((img - SHADE * base) ** 2).sum(-1))
    return d < tol ** 2 * 3


def base_mask(img: np.ndarray, colour: str, tol: float = 0.2) -> np.ndarray:
    """Pixels within `tol` of the colour itself (not its shade) and nearer to it than to any other
    colour or shade: what only an object of that colour has. (The shades overlap: a dark red pixel
    is within 0.2 of yellow's shade too.)"""
    d = ((img[..., None, :] - _PROTOS) ** 2).sum(-1)
    i = _NAMES.index(colour)
    return (d[..., i] < tol ** 2 * 3) & (d.argmin(-1) == i)


def largest_component(mask: np.ndarray, weight: Optional[np.ndarray] = None) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (pure numpy flood fill); with `weight`, the
    region holding the most of its pixels (none when no region holds any)."""
    h, w = mask.shape
    weight = mask if weight is None else weight
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_n, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        stack, count = [(y0, x0)], 0
        labels[y0, x0] = n
        while stack:
            y, x = stack.pop()
            count += bool(weight[y, x])
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        if count > best_n:
            best, best_n = n, count
    return labels == best if best else np.zeros_like(mask, dtype=bool)


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Grow a boolean mask by r pixels (8-neighbourhood): objects' anti-aliased rims included."""
    m = mask.astype(bool)
    for _ in range(r):
        p = np.pad(m, 1)
        m = np.zeros_like(m)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                m |= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return m


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


_EXTENT = {}


def _extent(shape: str):
    """The template's bounding box in object-local units: (u0, u1, v0, v1)."""
    if shape not in _EXTENT:
        c = np.linspace(-1.2, 1.2, 481)
        u, v = np.meshgrid(c, c)
        m = _inside(shape, u, v)
        us, vs = u[m], v[m]
        _EXTENT[shape] = (us.min(), us.max(), vs.min(), vs.max())
    return _EXTENT[shape]


def template(shape: str, box, size: int) -> np.ndarray:
    """The shape's mask fitted to a pixel bounding box (y0, y1, x0, x1), inclusive."""
    y0, y1, x0, x1 = box
    u0, u1, v0, v1 = _extent(shape)
    sx = (x1 + 1 - x0) / size / (u1 - u0)
    sy = (y1 + 1 - y0) / size / (v1 - v0)
    s = max((sx + sy) / 2, 1e-6)
    cx = x0 / size - u0 * s
    cy = y0 / size - v0 * s
    x, y = _grid(size, 1)
    return _inside(shape, (x - cx) / s, (y - cy) / s)


def fit_object(mask: np.ndarray, shape: str, colour: str, pattern: str = "plain") -> Optional[Obj]:
    """The object whose `shape` template sits on the mask's bounding box (a generated object's geometry)."""
    if mask.sum() < 6:
        return None
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    u0, u1, v0, v1 = _extent(shape)
    s = ((xs.max() + 1 - xs.min()) / (u1 - u0) + (ys.max() + 1 - ys.min()) / (v1 - v0)) / 2 / size
    return Obj(shape, colour, pattern, float(xs.min() / size - u0 * s), float(ys.min() / size - v0 * s), float(s))


def shape_of(mask: np.ndarray) -> tuple[Optional[str], float]:
    """(best shape, its IoU) for a region's mask; (None, 0) for an empty or tiny one."""
    if mask.sum() < 6:
        return None, 0.0
    ys, xs = np.nonzero(mask)
    box = (ys.min(), ys.max(), xs.min(), xs.max())
    scores = {s: iou(template(s, box, mask.shape[0]), mask) for s in SHAPES}
    best = max(scores, key=scores.get)
    return best, scores[best]


def pattern_of(img: np.ndarray, obj: Obj, mask: np.ndarray, candidates=PATTERNS + HELD_OUT,
               search: bool = True) -> tuple[str, dict]:
    """(best pattern, {pattern: agreement}) of a region against each pattern drawn on the object.

    A pixel is dark when it is nearer to the object's colour's shade than to the colour itself. With
    `search`, each pattern is also tried at 12 other angles and 8 small shifts (a generated or edited
    object draws its stripes at its own angle and phase) and keeps its best agreement."""
    size = img.shape[0]
    base = np.array(COLORS[obj.color])
    m = mask.astype(bool)
    if not m.any():
        return "plain", {}
    px = img[m]
    dark = ((px - SHADE * base) ** 2).sum(-1) < ((px - base) ** 2).sum(-1)
    x, y = _grid(size, 1)
    u, v = (x[m] - obj.cx) / obj.size, (y[m] - obj.cy) / obj.size
    angles = [obj.angle] + ([k * np.pi / 12 for k in range(12)] if search else [])
    shifts = [(0.0, 0.0)] + ([(dx, dy) for dx in (-0.15, 0.0, 0.15) for dy in (-0.15, 0.0, 0.15)
                              if dx or dy] if search else [])
    scores = {}
    for p in candidates:
        if p == "plain":
            scores[p] = float((~dark).mean())
            continue
        scores[p] = max(float((_pattern(p, u - dx, v - dy, a) == dark).mean()) for a in angles for dx, dy in shifts)
    return max(scores, key=scores.get), scores


@lru_cache(maxsize=None)
def _background_means(size: int) -> dict:
    x, y = _grid(size, 1)
    return {b: _background(b, x, y, 0).reshape(-1, 3).mean(0) for b in BACKGROUNDS}


def background_of(img: np.ndarray, objects_mask: np.ndarray) -> str:
    """The background whose mean colour is nearest to the image's outside the objects."""
    keep = ~objects_mask.astype(bool)
    mean = img[keep].mean(0) if keep.any() else img.reshape(-1, 3).mean(0)
    refs = _background_means(img.shape[0])
    return min(refs, key=lambda b: ((refs[b] - mean) ** 2).sum())


def psnr(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """PSNR in dB of images in 0..1, over the mask's pixels (all when None)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        d = d[mask.astype(bool)]
    mse = float(d.mean()) if d.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def generated_object(img: np.ndarray, colour: str) -> np.ndarray:
    """The region of a colour (and its shade) holding the most pixels of the colour itself: the object
    a caption asked for (a red object with dark patches has yellow's shade but no yellow)."""
    return largest_component(colour_mask(img, colour), base_mask(img, colour))


def check_generation(img: np.ndarray, scene: Scene) -> dict:
    """For a one-object caption: did the image get the object's colour, shape and pattern right?
    (The pattern is judged on the caption's shape fitted to the generated region.)"""
    o = scene.objects[0]
    m = generated_object(img, o.color)
    shape, score = shape_of(m)
    fit = fit_object(m, o.shape, o.color)
    pattern = pattern_of(img, fit, m, candidates=PATTERNS)[0] if fit is not None else None
    return dict(colour_ok=bool(m.sum() >= 60), shape=shape, shape_ok=shape == o.shape, shape_iou=score,
                pattern=pattern, pattern_ok=pattern == o.pattern, area=int(m.sum()))

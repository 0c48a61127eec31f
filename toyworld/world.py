"""The procedural world: one or two patterned, coloured shapes over a textured background.

Everything is a pure function of a seed (numpy's PCG64), so a scene, its caption, its image and
its exact per-object masks can be regenerated anywhere. Scenes render at any size; shapes are
drawn in object-local coordinates with 4x4 supersampling, so edges are anti-aliased and a mask is
the set of pixels more than half covered by that object (after occlusion by later objects).

Patterns mix the object's colour with a dark shade of it (0.35x), so an object's hue is its colour
whatever the pattern. Two patterns are held out of the captions: objects wearing them are
described only as "a <shape>" (no colour, no pattern word), so they can serve as concepts to learn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (0.86, 0.12, 0.10), "green": (0.12, 0.70, 0.18), "blue": (0.12, 0.26, 0.90),
          "yellow": (0.96, 0.84, 0.10), "white": (0.96, 0.96, 0.96)}
PATTERNS = ("plain", "striped", "dotted", "checked")        # named in captions ("plain" is left unsaid)
HELD_OUT = ("ringed", "zigzag")                              # rendered, never named
BACKGROUNDS = ("grass", "sand", "snow", "sky", "water")
SHADE = 0.35
HELD_OUT_SHARE = 0.12                                        # objects that wear a held-out pattern


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    pattern: str
    cx: float          # centre, as a fraction of the image side
    cy: float
    size: float        # half-width, as a fraction of the image side
    angle: float = 0.0  # stripe/zigzag direction, radians

    @property
    def described(self) -> bool:
        return self.pattern not in HELD_OUT

    def phrase(self) -> str:
        if not self.described:
            return f"a {self.shape}"
        words = [self.color] + ([] if self.pattern == "plain" else [self.pattern]) + [self.shape]
        return "a " + " ".join(words)


@dataclass(frozen=True)
class Scene:
    objects: tuple
    background: str
    texture_seed: int

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on {self.background}"

    def with_object(self, index: int, **changes) -> "Scene":
        objs = list(self.objects)
        objs[index] = replace(objs[index], **changes)
        return replace(self, objects=tuple(objs))


DEMO_SCENE = Scene((Obj("circle", "red", "plain", 0.5, 0.56, 0.27),), "grass", 7)   # the CLI's bundled scene


def vocabulary() -> tuple:
    """Every word a caption can hold."""
    return tuple(("a", "and", "on") + SHAPES + tuple(COLORS) + PATTERNS[1:] + BACKGROUNDS)


# ---- sampling ------------------------------------------------------------------------------

def _overlap(a: Obj, b: Obj) -> bool:
    return math.hypot(a.cx - b.cx, a.cy - b.cy) < (a.size + b.size) * 1.08


def sample_scene(seed: int, objects: Optional[int] = None, held_out: Optional[bool] = None,
                 patterns: Sequence[str] = PATTERNS) -> Scene:
    """The scene of a seed. objects: 1 or 2 (default: 1 in 60% of seeds); held_out: force (True) or
    forbid (False) a held-out pattern on the first object (default: HELD_OUT_SHARE of objects)."""
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    n = objects or (1 if rng.random() < 0.6 else 2)
    objs: list = []
    tries = 0
    while len(objs) < n:
        tries += 1
        size = rng.uniform(0.17, 0.3) if n == 1 else rng.uniform(0.13, 0.21)
        cx, cy = rng.uniform(size + 0.03, 1 - size - 0.03, size=2)
        wear_held = held_out if (held_out is not None and not objs) else rng.random() < HELD_OUT_SHARE
        pattern = HELD_OUT[rng.integers(len(HELD_OUT))] if wear_held else patterns[rng.integers(len(patterns))]
        o = Obj(SHAPES[rng.integers(len(SHAPES))], tuple(COLORS)[rng.integers(len(COLORS))], pattern,
                float(cx), float(cy), float(size), float(rng.uniform(0, math.pi)))
        if all(not _overlap(o, p) for p in objs) or tries > 50:
            objs.append(o)
    return Scene(tuple(objs), BACKGROUNDS[rng.integers(len(BACKGROUNDS))], int(rng.integers(2 ** 31)))


# ---- rendering -----------------------------------------------------------------------------

def _grid(size: int, ss: int):
    n = size * ss
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.meshgrid(c, c)          # x, y in [0, 1]


def _background(name: str, x, y, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    h, w = x.shape
    noise = rng.random((h // 4 + 1, w // 4 + 1))
    blotch = np.kron(noise, np.ones((4, 4)))[:h, :w]
    if name == "grass":
        blades = 0.5 + 0.5 * np.sin(2 * math.pi * (x * 23 + 0.3 * np.sin(y * 40 + seed % 7)))
        img = np.stack([0.20 + 0.08 * blotch, 0.46 + 0.12 * blades * blotch, 0.14 + 0.05 * blotch], -1)
    elif name == "sand":
        speck = rng.random((h, w))
        img = np.stack([0.86 - 0.06 * speck, 0.76 - 0.07 * speck, 0.52 - 0.06 * blotch], -1)
    elif name == "snow":
        img = np.stack([0.88 + 0.06 * blotch, 0.91 + 0.05 * blotch, 0.97 + 0.02 * blotch], -1)
    elif name == "sky":
        t = y
        img = np.stack([0.42 + 0.33 * t, 0.62 + 0.24 * t, 0.93 + 0.05 * t], -1)
        img = img + 0.04 * (blotch[..., None] > 0.85)
    elif name == "water":
        waves = 0.5 + 0.5 * np.sin(2 * math.pi * (y * 14 + 0.08 * np.sin(x * 25 + seed % 5)))
        img = np.stack([0.08 + 0.06 * waves, 0.30 + 0.12 * waves, 0.55 + 0.15 * waves * blotch + 0.1], -1)
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0, 1)


def _inside(shape: str, u, v):
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.84
    if shape == "triangle":          # upright, base at v = 0.75, apex at v = -0.95
        return (v <= 0.75) & (np.abs(u) <= (v + 0.95) / 1.7 * 0.98)
    if shape == "star":
        r = np.hypot(u, v)
        a = np.arctan2(v, u) + math.pi / 2
        k = np.abs(((a / (2 * math.pi / 5)) % 1.0) - 0.5) * 2          # 1 at a point, 0 between
        return r <= 0.45 + 0.55 * k ** 1.6
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _pattern(pattern: str, u, v, angle: float):
    """1 where the dark shade goes."""
    if pattern == "plain":
        return np.zeros_like(u, dtype=bool)
    ca, sa = math.cos(angle), math.sin(angle)
    if pattern == "striped":
        return np.sin(math.pi * 3.2 * (ca * u + sa * v)) > 0
    if pattern == "dotted":
        gu, gv = (u * 2.2) % 1.0 - 0.5, (v * 2.2) % 1.0 - 0.5
        return gu * gu + gv * gv < 0.1
    if pattern == "checked":
        return (np.floor(u * 2.6) + np.floor(v * 2.6)) % 2 == 0
    if pattern == "ringed":
        return np.sin(math.pi * 3.6 * np.hypot(u, v)) > 0
    if pattern == "zigzag":
        s, t = ca * u + sa * v, -sa * u + ca * v
        tri = np.abs((t * 2.5) % 1.0 - 0.5)
        return np.sin(math.pi * 3.2 * (s + 0.45 * tri)) > 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS + HELD_OUT}")


def render(scene: Scene, size: int = 64, supersample: int = 4):
    """(image [size, size, 3] float32 in 0..1, masks [objects, size, size] bool)."""
    ss = supersample
    x, y = _grid(size, ss)
    img = _background(scene.background, x, y, scene.texture_seed)
    cover = []
    for o in scene.objects:
        u, v = (x - o.cx) / o.size, (y - o.cy) / o.size
        inside = _inside(o.shape, u, v)
        base = np.array(COLORS[o.color])
        dark = _pattern(o.pattern, u, v, o.angle)
        colour = np.where(dark[..., None], base * SHADE, base)
        img = np.where(inside[..., None], colour, img)
        cover = [c & ~inside for c in cover] + [inside]
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3)).astype(np.float32)
    masks = np.stack([c.reshape(size, ss, size, ss).mean(axis=(1, 3)) > 0.5 for c in cover]) if cover else \
        np.zeros((0, size, size), dtype=bool)
    return img, masks


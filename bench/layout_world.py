"""A synthetic world whose captions state their layout, and a scorer that reads the layout back.

A scene is a sky over a ground with a horizon at 40-70% of the height, one or two red suns in
the top left / centre / right third of the sky, and zero to three trees standing on the
horizon. Captions say all of it ("one red sun top left, horizon at 70%, three trees"), so an
image generated from a caption can be checked against it: sun count (more suns than the
caption = a duplicated subject), sun positions, horizon height, tree count. Sizes of suns and
trees follow the image's short side, so a scene reads the same at any aspect ratio.

`score_image` classifies pixels by the nearest palette colour and counts connected blobs
(scipy.ndimage); on clean renders it recovers the scene exactly at every aspect ratio from
1:3 to 3:1 (tests/test_layout_world.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "sky": (120, 180, 235),
    "ground": (170, 130, 70),
    "sun": (230, 40, 40),
    "tree": (20, 90, 35),
}
THIRDS = ("left", "centre", "right")
HORIZONS = (40, 50, 60, 70)
WORDS = ("no", "one", "two", "three")
SUN_RADIUS = 0.09  # of the short side
TREE_H, TREE_W = 0.22, 0.14  # of the short side
MIN_BLOB = 0.3  # a blob counts when it has this share of a clean sun's / tree's area


@dataclass(frozen=True)
class Scene:
    suns: tuple[str, ...]  # the thirds holding a sun, left to right
    horizon: int  # percent of the height, from the top
    trees: int

    @property
    def caption(self) -> str:
        n = len(self.suns)
        where = " and ".join(self.suns) if n > 1 else self.suns[0]
        trees = f"{WORDS[self.trees]} tree{'' if self.trees == 1 else 's'}"
        return f"{WORDS[n]} red sun{'s' if n > 1 else ''} top {where}, horizon at {self.horizon}%, {trees}"


def random_scene(rng: random.Random) -> Scene:
    n = 1 if rng.random() < 0.75 else 2
    chosen = rng.sample(THIRDS, n)
    suns = tuple(t for t in THIRDS if t in chosen)
    return Scene(suns, rng.choice(HORIZONS), rng.randint(0, 3))


def render(
    scene: Scene, width: int, height: int, rng: random.Random | None = None, supersample: int = 4
) -> Image.Image:
    """The scene at width x height (drawn `supersample` times larger, then reduced: smooth edges).
    `rng` jitters positions a little (None: none)."""
    jitter = rng is not None
    rng = rng or random.Random(0)
    s = supersample
    W, H, short = width * s, height * s, min(width, height) * s
    img = Image.new("RGB", (W, H), PALETTE["sky"])
    draw = ImageDraw.Draw(img)
    hy = round(H * scene.horizon / 100)
    draw.rectangle([0, hy, W, H], fill=PALETTE["ground"])
    th, tw = TREE_H * short, TREE_W * short
    for k in range(scene.trees):
        cx = W * (k + 1) / (scene.trees + 1) + (rng.uniform(-0.03, 0.03) * W if jitter else 0)
        draw.polygon([(cx - tw / 2, hy), (cx + tw / 2, hy), (cx, hy - th)], fill=PALETTE["tree"])
    r = SUN_RADIUS * short
    for third in scene.suns:  # in the sky, clear of the trees' tops where there is room
        cx = W * (THIRDS.index(third) * 2 + 1) / 6 + (rng.uniform(-0.04, 0.04) * W if jitter else 0)
        top = r * 1.3
        lowest = max(top, min(hy - th - r * 1.3, 0.3 * H))
        cy = rng.uniform(top, lowest) if jitter else top
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PALETTE["sun"])
    return img.resize((width, height), Image.Resampling.LANCZOS) if s > 1 else img


@dataclass(frozen=True)
class LayoutScore:
    suns: int
    sun_thirds: tuple[str, ...]
    horizon: float  # percent from the top, estimated
    trees: int


def classify(image: Image.Image) -> np.ndarray:
    """Per pixel: index into PALETTE's order (nearest colour)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.array(list(PALETTE.values()), dtype=np.float32)
    return np.argmin(((px[:, :, None, :] - colours[None, None]) ** 2).sum(axis=-1), axis=-1)


def _blobs(mask: np.ndarray, min_area: float) -> list[tuple[float, float]]:
    """Centroids (y, x) of the 8-connected blobs of `mask` with at least `min_area` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if not n:
        return []
    areas = ndimage.sum(mask, labels, range(1, n + 1))
    centres = ndimage.center_of_mass(mask, labels, range(1, n + 1))
    return [c for c, a in zip(centres, areas, strict=True) if a >= min_area]


def score_image(image: Image.Image) -> LayoutScore:
    """Read the layout back from an image of this world."""
    cls = classify(image)
    h, w = cls.shape
    short = min(w, h)
    names = list(PALETTE)
    ground, sun, tree = (cls == names.index(k) for k in ("ground", "sun", "tree"))
    suns = _blobs(sun, MIN_BLOB * np.pi * (SUN_RADIUS * short) ** 2)
    trees = _blobs(tree, MIN_BLOB * 0.5 * TREE_H * TREE_W * short**2)
    horizon = float(
        100 * (ground.mean(axis=1) < 0.5).sum() / h
    )  # rows above the ground are mostly not ground
    thirds = tuple(sorted({THIRDS[min(2, int(3 * x / w))] for _, x in suns}, key=THIRDS.index))
    return LayoutScore(len(suns), thirds, horizon, len(trees))


def layout_errors(scene: Scene, found: LayoutScore) -> dict[str, float]:
    """Per-image checks of `found` against the caption's `scene`."""
    return {
        "sun_count_ok": float(found.suns == len(scene.suns)),
        "extra_suns": float(found.suns > len(scene.suns)),  # a duplicated subject
        "sun_thirds_ok": float(found.sun_thirds == scene.suns),
        "horizon_error": abs(found.horizon - scene.horizon) / 100,
        "tree_count_error": float(abs(found.trees - scene.trees)),
    }

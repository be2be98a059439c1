"""The demo world: flat coloured shapes on tinted, noisy grey backgrounds, rendered from a seed.

Everything here is pure: a `Scene` is plain data, and `render(scene)` always gives the same pixels
and masks for the same scene. Randomness only enters through the `numpy.random.Generator` passed to
the samplers, so a dataset or a training stream is a function of its seed.

Geometry is defined at a 64 x 64 canvas (the tiny CLIP's input size) and scaled with the canvas:
`scale = min(height, width) / 64`. A "small" object has radius 5-7.5 px at 64 px, a "big" one
11-15 px. The evaluation dataset uses a larger canvas (128 px by default), so that the CLIP,
which sees the image resized to 64 px, sees objects at the sizes it was trained on.

Masks are exact: each object is painted through the very boolean mask returned for it, in scene
order, so a later object occludes an earlier one and the *visible* mask of an object is its own
mask minus the masks of the objects after it. Noise is added to the background only, so every
visible object pixel has exactly the object's (jittered) colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 205, 40),
    "purple": (145, 55, 185),
    "orange": (240, 135, 30),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "big")
RADIUS: dict[str, tuple[float, float]] = {"small": (5.0, 7.5), "big": (11.0, 15.0)}  # at 64 px
BASE_SIZE = 64
COLOUR_JITTER = 12.0  # per-channel sigma of the object colour
BACKGROUND_GREY = (10, 170)  # grey level range of the background
BACKGROUND_TINT = 25  # +- per channel
NOISE_SIGMA = (2.0, 10.0)  # background noise sigma, on half of the images
BOUND = 1.25  # every shape fits in a disc of BOUND * r around its centre


@dataclass(frozen=True)
class SceneObject:
    """One shape. `r` is the radius in pixels of the canvas it lives on; `rgb` the painted colour."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A canvas, its background and its objects in painting order (later ones are on top)."""

    height: int
    width: int
    background: tuple[int, int, int]
    noise: float  # sigma of the background noise (0: none)
    noise_seed: int
    objects: tuple[SceneObject, ...]

    @property
    def scale(self) -> float:
        return min(self.height, self.width) / BASE_SIZE


# ----------------------------------------------------------------------------------- rendering
def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def outline(obj: SceneObject) -> list[tuple[float, float]] | None:
    """The polygon of `obj` (None for a circle, which is drawn as an ellipse)."""
    cx, cy, r = obj.cx, obj.cy, obj.r
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        h = 0.88 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        big_r = 1.2 * r
        return [(cx + big_r * math.cos(a), cy + 0.15 * r + big_r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if obj.shape == "star":
        return _star(cx, cy, 1.22 * r, 0.5 * r)
    raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")


def object_mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """`[H, W] bool`: the pixels `obj` covers (no anti-aliasing, so painting is exact)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    poly = outline(obj)
    if poly is None:
        draw.ellipse([obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(canvas) > 0


def background_image(scene: Scene) -> np.ndarray:
    """`[H, W, 3] uint8` background of `scene` (flat tint plus optional Gaussian noise)."""
    base = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    base[:] = scene.background
    if scene.noise > 0:
        noise_rng = np.random.default_rng(scene.noise_seed)
        base += noise_rng.normal(0.0, scene.noise, size=base.shape).astype(np.float32)
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """`(image [H, W, 3] uint8, visible masks [N, H, W] bool)` of `scene`.

    Objects are painted in order through their masks; the visible mask of object i is its mask
    minus the masks of the objects painted after it.
    """
    image = background_image(scene)
    full = np.stack([object_mask(o, scene.height, scene.width) for o in scene.objects]) if scene.objects \
        else np.zeros((0, scene.height, scene.width), dtype=bool)
    for obj, mask in zip(scene.objects, full):
        image[mask] = obj.rgb
    visible = full.copy()
    covered = np.zeros((scene.height, scene.width), dtype=bool)
    for i in range(len(full) - 1, -1, -1):
        visible[i] &= ~covered
        covered |= full[i]
    return image, visible


def full_masks(scene: Scene) -> np.ndarray:
    """`[N, H, W] bool` the whole (amodal) mask of every object, occlusion ignored."""
    if not scene.objects:
        return np.zeros((0, scene.height, scene.width), dtype=bool)
    return np.stack([object_mask(o, scene.height, scene.width) for o in scene.objects])


# ------------------------------------------------------------------------------------ sampling
def jittered(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour], dtype=np.float64)
    value = np.clip(np.rint(base + rng.normal(0.0, COLOUR_JITTER, size=3)), 0, 255)
    return (int(value[0]), int(value[1]), int(value[2]))


def sample_background(rng: np.random.Generator) -> tuple[tuple[int, int, int], float, int]:
    """`(rgb, noise sigma, noise seed)`: a grey with a tint, noisy half of the time."""
    grey = rng.uniform(*BACKGROUND_GREY)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    rgb = np.clip(np.rint(grey + tint), 0, 255).astype(int)
    noise = float(rng.uniform(*NOISE_SIGMA)) if rng.random() < 0.5 else 0.0
    return (int(rgb[0]), int(rgb[1]), int(rgb[2])), noise, int(rng.integers(0, 2**31 - 1))


def sample_radius(rng: np.random.Generator, size: str, scale: float = 1.0) -> float:
    lo, hi = RADIUS[size]
    return float(rng.uniform(lo, hi)) * scale


def sample_object(rng: np.random.Generator, scale: float = 1.0, shape: str | None = None,
                  colour: str | None = None, size: str | None = None) -> SceneObject:
    """An object with the given (or random) attributes, centred at (0, 0): place it afterwards."""
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    size = size or SIZES[int(rng.integers(len(SIZES)))]
    return SceneObject(shape, colour, size, 0.0, 0.0, sample_radius(rng, size, scale), jittered(rng, colour))


def _position(rng: np.random.Generator, obj: SceneObject, height: int, width: int) -> tuple[float, float]:
    m = BOUND * obj.r + 1.0
    return float(rng.uniform(m, max(m + 1e-3, width - m))), float(rng.uniform(m, max(m + 1e-3, height - m)))


def place(rng: np.random.Generator, objects: list[SceneObject], height: int, width: int,
          overlap: float = 0.0, tries: int = 60) -> list[SceneObject] | None:
    """Give every object a position inside the canvas; None when it does not fit.

    Without `overlap`, the bounding discs (radius `BOUND * r`) of two objects never touch. With
    `overlap` in (0, 1), a pair may come as close as `(1 - overlap) * (R_i + R_j)`.
    """
    placed: list[SceneObject] = []
    for obj in objects:
        for _ in range(tries):
            cx, cy = _position(rng, obj, height, width)
            ok = True
            for other in placed:
                need = BOUND * (obj.r + other.r)
                need = need * (1.0 - overlap) if overlap > 0 else need + 1.0
                if math.hypot(cx - other.cx, cy - other.cy) < need:
                    ok = False
                    break
            if ok:
                placed.append(replace(obj, cx=cx, cy=cy))
                break
        else:
            return None
    return placed


def make_scene(rng: np.random.Generator, objects: list[SceneObject], height: int, width: int) -> Scene:
    background, noise, noise_seed = sample_background(rng)
    return Scene(height, width, background, noise, noise_seed, tuple(objects))


def sample_scene(rng: np.random.Generator, size: int = BASE_SIZE, n_objects: tuple[int, int] = (1, 4),
                 overlap: float = 0.0) -> Scene:
    """A random scene of `n_objects[0]..n_objects[1]` objects that do not overlap (by default)."""
    scale = size / BASE_SIZE
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        objects = [sample_object(rng, scale) for _ in range(n)]
        placed = place(rng, objects, size, size, overlap)
        if placed is not None:
            return make_scene(rng, placed, size, size)


def mirror(scene: Scene, horizontal: bool = True) -> Scene:
    """The same scene with every centre mirrored (left-right, or top-bottom); shapes stay upright."""
    if horizontal:
        objects = tuple(replace(o, cx=scene.width - o.cx) for o in scene.objects)
    else:
        objects = tuple(replace(o, cy=scene.height - o.cy) for o in scene.objects)
    return replace(scene, objects=objects)


# ------------------------------------------------------------------------------------- crops
def masked_box_crop(image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int], out: int = BASE_SIZE,
                    margin: int = 3, square: bool = True) -> np.ndarray:
    """The object of `mask` alone on a flat `fill`, cut out by its box and resized to `out` x `out`.

    `square=True`: a square box with `margin` pixels around the object (aspect kept, as in the
    training mix). `square=False`: the tight box, stretched to a square (as the pipeline's local
    crops do).
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("cannot crop an empty mask")
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    if square:
        side = max(y1 - y0, x1 - x0) + 2 * margin
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
        y1, x1 = y0 + side, x0 + side
    h, w = y1 - y0, x1 - x0
    crop = np.empty((h, w, 3), dtype=np.uint8)
    crop[:] = fill
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y1, image.shape[0]), min(x1, image.shape[1])
    region = mask[sy0:sy1, sx0:sx1]
    target = crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    target[region] = image[sy0:sy1, sx0:sx1][region]
    return np.asarray(Image.fromarray(crop).resize((out, out), Image.BILINEAR))


def box_centre(mask: np.ndarray) -> tuple[float, float]:
    """`(x, y)` centre of the tight box of a non-empty mask (inclusive pixel box)."""
    ys, xs = np.nonzero(mask)
    return (float(xs.min() + xs.max()) / 2.0, float(ys.min() + ys.max()) / 2.0)


# ------------------------------------------------------------------------ evaluation scenes
EVAL_SIZE = 128  # evaluation canvas: objects are twice their 64 px size, as the CLIP sees them resized
MIN_VISIBLE = 0.55  # every object keeps at least this fraction of its pixels visible
TWIN_PROB = 0.75  # scenes with two or three objects of the same colour and shape


def _composition(rng: np.random.Generator, n: int, scale: float) -> list[SceneObject]:
    """`n` objects, often with repeated colour + shape ("twins") and shared shapes or colours, so
    that location, size, relation and context expressions are needed to tell them apart."""
    p_big = 0.5 if n <= 3 else 0.3

    def size() -> str:
        return "big" if rng.random() < p_big else "small"

    objects: list[SceneObject] = []
    if rng.random() < TWIN_PROB:
        twin = sample_object(rng, scale)
        count = min(n, 2 if rng.random() < 0.8 else 3)
        same_size = rng.random() < 0.5
        for k in range(count):
            s = twin.size if same_size else ("big" if k % 2 == 0 else "small")
            objects.append(sample_object(rng, scale, twin.shape, twin.colour, s))
    while len(objects) < n:
        u = rng.random()
        if objects and u < 0.3:  # same shape as an existing object, another colour
            ref = objects[int(rng.integers(len(objects)))]
            colour = [c for c in COLOUR_NAMES if c != ref.colour][int(rng.integers(len(COLOUR_NAMES) - 1))]
            objects.append(sample_object(rng, scale, ref.shape, colour, size()))
        elif objects and u < 0.5:  # same colour, another shape
            ref = objects[int(rng.integers(len(objects)))]
            shape = [s for s in SHAPES if s != ref.shape][int(rng.integers(len(SHAPES) - 1))]
            objects.append(sample_object(rng, scale, shape, ref.colour, size()))
        else:
            objects.append(sample_object(rng, scale, size=size()))
    return [objects[k] for k in rng.permutation(len(objects))]


def sample_eval_scene(rng: np.random.Generator, size: int = EVAL_SIZE, n_objects: tuple[int, int] = (2, 6),
                      p_overlap: float = 0.35, min_visible: float = MIN_VISIBLE,
                      ) -> tuple[Scene, np.ndarray, np.ndarray]:
    """`(scene, image, visible masks)` of an evaluation scene: 2-6 objects on a `size` canvas,
    overlapping in about `p_overlap` of the scenes (later objects occlude earlier ones), every
    object keeping at least `min_visible` of its pixels."""
    scale = size / BASE_SIZE
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        overlap = 0.35 if rng.random() < p_overlap else 0.0
        placed = place(rng, _composition(rng, n, scale), size, size, overlap)
        if placed is None:
            continue
        scene = make_scene(rng, placed, size, size)
        image, visible = render(scene)
        whole = full_masks(scene).reshape(len(placed), -1).sum(1)
        seen = visible.reshape(len(placed), -1).sum(1)
        if np.all(seen >= np.maximum(min_visible * whole, 20)):
            return scene, image, visible

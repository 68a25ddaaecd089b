"""The embedded world's scenes: prompts in GenEval's six categories, and a seeded renderer that draws them.

Images are small RGB arrays (32×32 by default, 64×64 works the same with every length doubled) on a plain **white**
background: flat, hard-edged objects (no anti-aliasing) in one of six palette colours, each a circle, square or
triangle. White was chosen over black because every palette colour stays at least ~200 RGB units from it, and the
generated images of a flow model start from grey, not from either extreme.

The three shapes differ in how much of their bounding box they fill (square 1, circle ≈ π/4, triangle ≈ 0.5),
which is all an exact judge needs (``engine/world/judge.py``); sizes are kept in a range where the rasterised
fill ratios stay apart (circle 0.75–0.86, triangle 0.55–0.64 at 32 px).

Held-out rule: ``make_prompts(seed)`` holds out six colour–shape *pairings* (each colour once, each shape twice,
chosen by the seed). A prompt is held out iff any of its objects uses a held-out pairing, so fine-tuning never
sees those pairings in any category, while every colour and every shape still appears in fine-tuning (in other
pairings): the held-out set measures compositional generalisation, not unseen words.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Far apart in RGB: the closest pairs (red–orange, orange–yellow) are ~127 apart, so a σ≈8 (0.03) Gaussian noise
# is ~8σ away from flipping a pixel to a neighbouring colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (170, 0, 200),
    "orange": (255, 128, 0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MAX_COUNT = 4

_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Geometry at 32 px; everything scales with size / 32.
_BASE_SIZE = 32
_OBJECT_SIZE = (7, 10)  # side / diameter range, inclusive: keeps circle and triangle fill ratios apart
_GAP = 2  # minimum empty pixels between two objects' bounding boxes (so same-colour objects never touch)
_BORDER = 1  # objects never touch the image border, so their bounding boxes are whole
_PLACE_TRIES = 2000


@dataclass(frozen=True)
class ObjectSpec:
    """One kind of object in a scene.

    Attributes:
        shape: One of ``SHAPES``.
        color: One of ``COLORS``, or ``None`` where the prompt names no colour (the renderer then picks one and the
            judge accepts any).
        count: How many of this object the scene holds (1–4).
    """

    shape: str
    color: str | None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"ObjectSpec.shape={self.shape!r}: use one of {SHAPES}")
        if self.color is not None and self.color not in PALETTE:
            raise ValueError(f"ObjectSpec.color={self.color!r}: use one of {COLORS} or None")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"ObjectSpec.count={self.count}: use 1..{MAX_COUNT}")


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for.

    Attributes:
        objects: One or two object kinds.
        relation: Where ``objects[0]`` lies relative to ``objects[1]`` (one of ``RELATIONS``), or ``None``.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"SceneSpec.objects has {len(self.objects)} entries: use one or two")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"SceneSpec.relation={self.relation!r}: use one of {RELATIONS} or None")
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise ValueError("SceneSpec.relation needs exactly two objects of count 1")

    def pairings(self) -> frozenset[tuple[str | None, str]]:
        """The (colour, shape) pairings the scene uses: the unit of the held-out rule."""
        return frozenset((o.color, o.shape) for o in self.objects)


@dataclass(frozen=True)
class Prompt:
    """A caption, its GenEval category and the structured spec the renderer and the judge work from."""

    text: str
    category: str
    spec: SceneSpec


@dataclass(frozen=True)
class PromptSplit:
    """Fine-tuning and held-out prompts, disjoint at the level of colour–shape pairings.

    Attributes:
        finetune: Prompts whose objects use only non-held-out pairings.
        heldout: Prompts with at least one held-out pairing.
        heldout_pairings: The held-out (colour, shape) pairings.
    """

    finetune: tuple[Prompt, ...]
    heldout: tuple[Prompt, ...]
    heldout_pairings: frozenset[tuple[str, str]]


def _noun(obj: ObjectSpec) -> str:
    shape = obj.shape + ("s" if obj.count > 1 else "")
    return f"{obj.color} {shape}" if obj.color else shape


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def caption(spec: SceneSpec, category: str) -> str:
    """The caption for a spec; counting prompts spell the number, the others use "a"/"an"."""
    if category == "counting":
        (obj,) = spec.objects
        return f"{_NUMBERS[obj.count]} {_noun(obj)}"
    first = _a(_noun(spec.objects[0]))
    if len(spec.objects) == 1:
        return first
    second = _a(_noun(spec.objects[1]))
    if spec.relation is not None:
        return f"{first} {_RELATION_TEXT[spec.relation]} {second}"
    return f"{first} and {second}"


def all_prompts() -> dict[str, list[Prompt]]:
    """Every prompt of the world, per category, in a fixed order.

    Every object names its colour (as in "a red circle"), so the judge checks colour in every category; the spec
    also allows colourless objects for GenEval's stricter-to-the-letter variants.
    """
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    single = [SceneSpec((ObjectSpec(s, c),)) for c, s in pairs]
    counting = [SceneSpec((ObjectSpec(s, c, n),)) for c, s in pairs for n in range(1, MAX_COUNT + 1)]
    # Two distinct shapes (GenEval's two_object names two different classes), colours free; shape order canonical.
    two = [
        SceneSpec((ObjectSpec(s1, c1), ObjectSpec(s2, c2)))
        for s1, s2 in itertools.combinations(SHAPES, 2)
        for c1, c2 in itertools.product(COLORS, repeat=2)
    ]
    # Binding: distinct shapes *and* distinct colours, so swapping the colours gives a different, wrong scene.
    binding = [spec for spec in two if spec.objects[0].color != spec.objects[1].color]
    # Position: two distinguishable objects (any differing colour or shape), ordered, in each relation.
    position = [
        SceneSpec((ObjectSpec(s1, c1), ObjectSpec(s2, c2)), relation)
        for (c1, s1), (c2, s2) in itertools.permutations(pairs, 2)
        for relation in RELATIONS
    ]
    specs = {
        "single_object": single,
        "two_object": two,
        "counting": counting,
        "colors": single,
        "position": position,
        "color_attr": binding,
    }
    return {cat: [Prompt(caption(spec, cat), cat, spec) for spec in specs[cat]] for cat in CATEGORIES}


def heldout_pairings(seed: int) -> frozenset[tuple[str, str]]:
    """Six held-out colour–shape pairings: a seeded permutation of the colours, two per shape."""
    order = np.random.default_rng(seed).permutation(len(COLORS))
    per_shape = len(COLORS) // len(SHAPES)
    return frozenset(
        (COLORS[order[i * per_shape + j]], shape) for i, shape in enumerate(SHAPES) for j in range(per_shape)
    )


# "finetune": the fine-tuning split; "heldout": the test (pairings fine-tuning never sees); "train" and "validation":
# the fine-tuning split without and with the validation pairings (validation_pairings), for choosing
# hyper-parameters on pairings a run never trains on, as the test's are (engine.world.evaluate.prompt_set).
SPLITS = ("finetune", "heldout", "train", "validation")


def validation_pairings(seed: int) -> frozenset[tuple[str, str]]:
    """Three pairings that ``heldout_pairings(seed)`` leaves to fine-tuning, one per shape, each with a held-out
    colour: the first held-out colour of each shape moves to the next shape. Carving the fine-tuning prompts that use
    them out of training gives a validation split that mirrors the held-out test (pairings a run never trains on, in
    every category) for choosing hyper-parameters without touching the test, while training keeps 9 of its 12
    pairings."""
    order = np.random.default_rng(seed).permutation(len(COLORS))  # heldout_pairings' permutation
    per_shape = len(COLORS) // len(SHAPES)
    return frozenset((COLORS[order[i * per_shape]], SHAPES[(i + 1) % len(SHAPES)]) for i in range(len(SHAPES)))


def make_prompts(seed: int = 0, max_per_category: int | None = None) -> PromptSplit:
    """Split the world's prompts into fine-tuning and held-out sets.

    Args:
        seed: Chooses the held-out pairings and the (shuffled) order within each category.
        max_per_category: Keep at most this many prompts per category in each split (None keeps all: position
            has ~1200 prompts, single_object 18).

    Returns:
        The split; see the module docstring for the held-out rule.
    """
    held = heldout_pairings(seed)
    rng = np.random.default_rng([seed, 1])
    finetune: list[Prompt] = []
    heldout: list[Prompt] = []
    for prompts in all_prompts().values():
        order = rng.permutation(len(prompts))
        ft = [prompts[i] for i in order if not (prompts[i].spec.pairings() & held)]
        ho = [prompts[i] for i in order if prompts[i].spec.pairings() & held]
        finetune += ft[:max_per_category]
        heldout += ho[:max_per_category]
    return PromptSplit(tuple(finetune), tuple(heldout), held)


# --------------------------------------------------------------------------------------------------------- render


def shape_mask(shape: str, size: int) -> np.ndarray:
    """A boolean ``[size, size]`` mask of a shape filling its box: pixel centres inside the exact figure."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        r = size / 2
        return (x - r) ** 2 + (y - r) ** 2 <= r * r
    if shape == "triangle":
        # Apex up, base on the bottom row; (y + 0.5) / size puts a one-pixel apex on the top row.
        return np.abs(x - size / 2) <= (y + 0.5) / size * size / 2
    raise ValueError(f"shape={shape!r}: use one of {SHAPES}")


@dataclass(frozen=True)
class _Box:
    y: int
    x: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return self.y + self.size / 2, self.x + self.size / 2

    def apart(self, other: _Box, gap: int) -> bool:
        """True when at least ``gap`` empty pixels separate the boxes along x or along y."""
        dx = max(other.x - (self.x + self.size), self.x - (other.x + other.size))
        dy = max(other.y - (self.y + self.size), self.y - (other.y + other.size))
        return max(dx, dy) >= gap


def _relation_holds(a: _Box, b: _Box, relation: str, gap: int) -> bool:
    """The renderer's own, stricter test: separated along the relation's axis, and mostly along it.

    Stricter than the judge's GenEval rule on purpose (boxes apart by ``gap`` on the axis, off-axis offset at most a
    quarter of the on-axis one), so a rendered scene satisfies the judge with a margin even with the triangle's
    centroid sitting below its box centre.
    """
    (ay, ax), (by, bx) = a.center, b.center
    if relation in ("left of", "right of"):
        apart = b.x - (a.x + a.size) if relation == "left of" else a.x - (b.x + b.size)
        return apart >= gap and abs(ay - by) <= 0.25 * abs(ax - bx)
    apart = b.y - (a.y + a.size) if relation == "above" else a.y - (b.y + b.size)
    return apart >= gap and abs(ax - bx) <= 0.25 * abs(ay - by)


def _layout(spec: SceneSpec, size: int, rng: np.random.Generator) -> list[tuple[str, str, _Box]]:
    scale = size / _BASE_SIZE
    lo, hi = round(_OBJECT_SIZE[0] * scale), round(_OBJECT_SIZE[1] * scale)
    gap, border = round(_GAP * scale), _BORDER
    colors = [o.color or COLORS[int(rng.integers(len(COLORS)))] for o in spec.objects]
    items = [(o.shape, c) for o, c in zip(spec.objects, colors) for _ in range(o.count)]
    for _ in range(_PLACE_TRIES):
        placed: list[tuple[str, str, _Box]] = []
        for shape, color in items:
            side = int(rng.integers(lo, hi + 1))
            y, x = (int(v) for v in rng.integers(border, size - border - side + 1, size=2))
            box = _Box(y, x, side)
            if not all(box.apart(other, gap) for *_, other in placed):
                break
            placed.append((shape, color, box))
        else:
            if spec.relation is None or _relation_holds(placed[0][2], placed[1][2], spec.relation, gap):
                return placed
    raise RuntimeError(f"could not place {spec} in {size}×{size} after {_PLACE_TRIES} tries")


def render(spec: SceneSpec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw a scene that satisfies ``spec``.

    Objects are non-overlapping with at least 2 px (at 32 px) between bounding boxes, 7–10 px across, never touching
    the border; a relation holds with a margin (see ``_relation_holds``).

    Args:
        spec: What to draw.
        rng: The only source of randomness: the same generator state gives the same image.
        size: Image side in pixels (32 or 64; any size ≥ 32 works, geometry scales with it).

    Returns:
        ``uint8 [size, size, 3]``.
    """
    if size < _BASE_SIZE:
        raise ValueError(f"size={size}: use at least {_BASE_SIZE} (four objects must fit with gaps)")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for shape, color, box in _layout(spec, size, rng):
        window = image[box.y : box.y + box.size, box.x : box.x + box.size]
        window[shape_mask(shape, box.size)] = PALETTE[color]
    return image


def mirror(spec: SceneSpec) -> SceneSpec:
    """The spec with its relation reversed (left ↔ right, above ↔ below): a wrong scene for the original."""
    if spec.relation is None:
        raise ValueError("mirror needs a spec with a relation")
    return SceneSpec(spec.objects, _MIRROR[spec.relation])


def sample_dataset(
    n: int,
    seed: int,
    size: int = 32,
    prompts: Sequence[Prompt] | None = None,
    category_weights: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, list[Prompt]]:
    """Rendered (image, prompt) pairs for pretraining.

    Args:
        n: Number of pairs.
        seed: Seeds the prompt choice and the rendering.
        size: Image side in pixels.
        prompts: Prompts to draw from; the default is every prompt of the world (pretraining sees all pairings,
            as a base model would; only fine-tuning is kept off the held-out ones). Categories are drawn uniformly,
            then a prompt within the category, so the ~1200 position prompts do not swamp the rest.
        category_weights: Relative weights of the categories (1 where not given); None draws them uniformly.

    Returns:
        ``uint8 [n, size, size, 3]`` images and their prompts.
    """
    rng = np.random.default_rng(seed)
    if prompts is None:
        pool = all_prompts()
    else:
        pool = {}
        for p in prompts:
            pool.setdefault(p.category, []).append(p)
    categories = [c for c in CATEGORIES if pool.get(c)]
    if not categories:
        raise ValueError("sample_dataset: no prompts to draw from")
    unknown = set(category_weights or {}) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"sample_dataset: unknown categories {sorted(unknown)}; use some of {list(CATEGORIES)}")
    weights = None
    if category_weights is not None:
        weights = np.array([float(category_weights.get(c, 1.0)) for c in categories])
        weights /= weights.sum()
    chosen: list[Prompt] = []
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        pick = int(rng.integers(len(categories))) if weights is None else int(rng.choice(len(categories), p=weights))
        group = pool[categories[pick]]
        prompt = group[int(rng.integers(len(group)))]
        chosen.append(prompt)
        images[i] = render(prompt.spec, rng, size)
    return images, chosen

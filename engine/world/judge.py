"""An exact, non-learned judge for the embedded world: GenEval's rules on segmented flat-colour scenes.

It shares no code with any reward (nothing from ``engine.rewards``): a policy optimised against a reward must not be
graded by that reward's own pieces. From ``engine.world.scenes`` it takes only the vocabulary (palette, shapes,
relations) and the prompt spec types.

Pipeline per image:

1. Every pixel goes to the nearest of the palette colours and the background by RGB distance; a pixel farther than
   ``max_distance`` from all of them is "unknown" (anti-aliased edges, blends, off-palette blotches) and counted.
2. 4-connected components per colour; components under ``min_area`` pixels are dropped as noise.
3. Each component gets its colour, area, bounding box, centroid and a shape from its bounding box's fill ratio
   (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2) and aspect ratio (a box far from square is no clean shape).

Scoring follows GenEval (``evaluation/evaluate_images.py``): an object of the prompt is matched by shape and, where
the prompt names one, colour. ``single_object``/``colors``/``two_object``/``color_attr``: each object present at
least once; ``counting``: exactly N matching objects (others of other colours are ignored); ``position``: both present
and every pair of matches in the relation under GenEval's rule, with centroids in place of box centres (offset per
axis shrunk by 0.1 × the summed box dimensions; the relation holds if its axis carries more than half of the
normalised offset). The overall score is GenEval's: the mean of the per-category accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.world.scenes import BACKGROUND, CATEGORIES, PALETTE, ObjectSpec, Prompt

POSITION_THRESHOLD = 0.1  # GenEval's: fraction of the summed box dimensions that does not count as offset

_NAMES = ("background", *PALETTE)
_REFERENCE = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # [7, 3]
_BACKGROUND_INDEX = 0
_UNKNOWN_INDEX = -1


@dataclass(frozen=True)
class Detection:
    """One segmented object.

    Attributes:
        color: Palette colour name.
        shape: ``circle``, ``square``, ``triangle`` or ``unknown``.
        area: Pixels in the component.
        box: ``(y0, x0, y1, x1)``, inclusive.
        centroid: ``(y, x)`` mean pixel centre.
        fill: Area over bounding-box area.
    """

    color: str
    shape: str
    area: int
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    fill: float

    @property
    def dims(self) -> tuple[int, int]:
        """Box height and width."""
        y0, x0, y1, x1 = self.box
        return y1 - y0 + 1, x1 - x0 + 1


@dataclass(frozen=True)
class Segmentation:
    """Detections of one image plus the count of pixels no palette colour or background explains."""

    detections: tuple[Detection, ...]
    unknown_pixels: int
    dropped_components: int


@dataclass(frozen=True)
class Judgement:
    """Verdict on one (image, prompt) pair, with GenEval-style reasons for a failure."""

    correct: bool
    category: str
    reason: str
    segmentation: Segmentation


@dataclass(frozen=True)
class Evaluation:
    """Per-category accuracy, GenEval's overall (mean over categories present) and every judgement."""

    per_category: dict[str, float]
    overall: float
    judgements: tuple[Judgement, ...] = field(repr=False)


def to_uint8_hwc(image: Any) -> np.ndarray:
    """An image as ``uint8 [H, W, 3]``: accepts uint8 or float in [0, 1], HWC or CHW, numpy or torch.

    Float inputs are clipped to [0, 1] and rounded, so a generated image's overshoot does not wrap around.
    """
    if hasattr(image, "detach"):  # a torch tensor; duck-typed so the judge does not need torch
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"image of shape {array.shape}: expected [H, W, 3] or [3, H, W]")
    if array.shape[-1] != 3 and array.shape[0] == 3:
        array = np.moveaxis(array, 0, -1)
    if array.shape[-1] != 3:
        raise ValueError(f"image of shape {array.shape}: expected 3 colour channels")
    if array.dtype == np.uint8:
        return array
    return np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def classify_pixels(image: np.ndarray, max_distance: float) -> np.ndarray:
    """Index per pixel into ``("background", *PALETTE)``, or -1 where every reference is farther than max_distance."""
    pixels = image.astype(np.float32)[..., None, :]  # [H, W, 1, 3]
    distance = np.sqrt(((pixels - _REFERENCE) ** 2).sum(-1))  # [H, W, 7]
    index = distance.argmin(-1)
    index[distance.min(-1) > max_distance] = _UNKNOWN_INDEX
    return index


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as a ``[k, 2]`` array of (y, x) pixels; breadth-first."""
    height, width = mask.shape
    seen = ~mask.copy()
    components = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue = [(int(y0), int(x0))]
        head = 0
        while head < len(queue):
            y, x = queue[head]
            head += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(np.array(queue))
    return components


def classify_shape(fill: float, aspect: float) -> str:
    """Shape from a component's bounding-box fill ratio and aspect (width / height).

    Thresholds sit midway between the shapes' rasterised fill ratios (triangle 0.55–0.64, circle 0.75–0.86,
    square 1.0 for the renderer's sizes); a box more than 1.5× longer one way than the other is no clean shape.
    """
    if not 1 / 1.5 <= aspect <= 1.5:
        return "unknown"
    if fill >= 0.93:
        return "square"
    if fill >= 0.70:
        return "circle"
    if fill >= 0.40:
        return "triangle"
    return "unknown"


def segment(image: Any, max_distance: float = 60.0, min_area: int | None = None) -> Segmentation:
    """Find the objects of one image.

    Args:
        image: ``uint8`` or float [0, 1] image, HWC or CHW.
        max_distance: RGB distance (0–441) beyond which a pixel matches nothing; the palette's closest pair is ~127
            apart, so 60 keeps nearest-colour decisions unambiguous and absorbs noise up to σ ≈ 0.05.
        min_area: Smallest component kept; default 8 px at 32×32, scaled with the image area.

    Returns:
        The detections, ordered by colour then position, and the unknown-pixel count.
    """
    array = to_uint8_hwc(image)
    height, width = array.shape[:2]
    if min_area is None:
        min_area = max(4, round(8 * height * width / 32**2))
    labels = classify_pixels(array, max_distance)
    detections = []
    dropped = 0
    for index, name in enumerate(_NAMES):
        if index == _BACKGROUND_INDEX:
            continue
        for pixels in connected_components(labels == index):
            if len(pixels) < min_area:
                dropped += 1
                continue
            (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0)
            bh, bw = int(y1 - y0 + 1), int(x1 - x0 + 1)
            fill = len(pixels) / (bh * bw)
            cy, cx = pixels.mean(0) + 0.5  # pixel centres, as the renderer places shapes
            detections.append(
                Detection(
                    color=name,
                    shape=classify_shape(fill, bw / bh),
                    area=len(pixels),
                    box=(int(y0), int(x0), int(y1), int(x1)),
                    centroid=(float(cy), float(cx)),
                    fill=float(fill),
                )
            )
    return Segmentation(tuple(detections), int((labels == _UNKNOWN_INDEX).sum()), dropped)


def relations(a: Detection, b: Detection) -> set[str]:
    """Where ``a`` lies relative to ``b``: GenEval's ``relative_position`` on centroids (possibly two at a diagonal)."""
    offset = np.subtract(a.centroid, b.centroid)  # (dy, dx); +y is down
    dims = np.add(a.dims, b.dims)
    norm = float(np.linalg.norm(offset))
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dy, dx = revised / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def _matches(segmentation: Segmentation, obj: ObjectSpec) -> list[Detection]:
    return [d for d in segmentation.detections if d.shape == obj.shape and (obj.color is None or d.color == obj.color)]


def _describe(obj: ObjectSpec) -> str:
    return f"{obj.color} {obj.shape}" if obj.color else obj.shape


def judge(image: Any, prompt: Prompt, **segment_kwargs: Any) -> Judgement:
    """Score one image against one prompt by GenEval's rules (see the module docstring).

    Args:
        image: ``uint8`` or float [0, 1] image, HWC or CHW.
        prompt: The prompt with its spec.
        **segment_kwargs: Passed to ``segment``.

    Returns:
        The verdict; ``reason`` is empty when correct.
    """
    segmentation = segment(image, **segment_kwargs)
    spec = prompt.spec
    matched = [_matches(segmentation, obj) for obj in spec.objects]
    reasons = []
    for obj, found in zip(spec.objects, matched):
        if prompt.category == "counting" and len(found) != obj.count:
            reasons.append(f"expected {obj.count} {_describe(obj)}, found {len(found)}")
        elif len(found) < obj.count:
            reasons.append(f"expected {_describe(obj)} x{obj.count}, found {len(found)}")
    if not reasons and spec.relation is not None:
        # GenEval requires every matched pair in the relation; the first failing pair is the reason.
        failing = ((a, b) for a in matched[0] for b in matched[1] if spec.relation not in relations(a, b))
        pair = next(failing, None)
        if pair is not None:
            rels = sorted(relations(*pair)) or ["no clear relation"]
            reasons.append(
                f"expected {_describe(spec.objects[0])} {spec.relation} {_describe(spec.objects[1])}, "
                f"found {'/'.join(rels)}"
            )
    return Judgement(not reasons, prompt.category, "; ".join(reasons), segmentation)


def object_outcome(segmentation: Segmentation, obj: ObjectSpec) -> str:
    """What became of one object of the prompt: ``found``, ``<shape> drawn as <other shape>`` (its colour is there,
    but its box fill ratio reads as another shape), or ``colour absent`` (nothing of its colour, or of any colour
    where the prompt names none)."""
    if _matches(segmentation, obj):
        return "found"
    same_colour = [d for d in segmentation.detections if obj.color is None or d.color == obj.color]
    if same_colour:
        return f"{obj.shape} drawn as {max(same_colour, key=lambda d: d.area).shape}"
    return "colour absent"


def evaluate(images: Any, prompts: Sequence[Prompt], **segment_kwargs: Any) -> Evaluation:
    """Judge a batch and aggregate as GenEval does.

    Args:
        images: A sequence (or ``[N, ...]`` array/tensor) of images, one per prompt.
        prompts: The prompts, in order.
        **segment_kwargs: Passed to ``segment``.

    Returns:
        Accuracy per category present, and overall = their unweighted mean.
    """
    if len(images) != len(prompts):
        raise ValueError(f"evaluate: {len(images)} images for {len(prompts)} prompts")
    judgements = tuple(judge(image, prompt, **segment_kwargs) for image, prompt in zip(images, prompts))
    per_category = {}
    for category in CATEGORIES:
        verdicts = [j.correct for j in judgements if j.category == category]
        if verdicts:
            per_category[category] = float(np.mean(verdicts))
    overall = float(np.mean(list(per_category.values()))) if per_category else float("nan")
    return Evaluation(per_category, overall, judgements)

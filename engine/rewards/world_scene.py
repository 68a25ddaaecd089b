"""``world_scene``: a differentiable structural reward for the embedded world, written from its scene definitions.

The world's analogue of a GenEval-style detector reward: it reads the caption ("two red squares", "a blue circle to
the left of a green triangle") and scores whether the image holds those objects, with soft operations throughout so
its gradient reaches every pixel. It sees everything the judge checks — colour, shape, count and relation — because
a reward that ignores one of them is optimised along it (a probe of colour mass and centroids alone melted shapes
into blobs while the judge fell; issue 14). It shares no code with the judge (``engine/world/judge.py``), which
segments hard pixels into connected components; from the world it takes only the vocabulary and the renderer's
shape masks, as a detector is trained on the shapes it must find.

1. **Soft colour.** Each pixel's probability of being the background, each palette colour, or *unknown*:
   ``softmax(−‖x − ref‖² / 2σ²)`` with the unknown class at a fixed distance ``UNKNOWN_DISTANCE`` (off-palette
   blends and blotches belong to no colour).
2. **Template match.** For every palette colour c, shape s and side d (7–10 px at 32 px, scaled with the image), at
   every position: (mean probability of c inside the shape)^``inside_power`` × (mean probability of not-c in the
   rest of a window one pixel larger on every side). 1 is a clean, isolated shape of that kind; the power makes a
   shape count only when (nearly) all its pixels are there: a square missing its corners is no square, whatever
   else it is. A square scores ≈ 0.77 on a circle template, a blob lower still; nothing scores 0.
3. **Object quality** at a position: the target shape's match times its softmax share (``beta``) among the three
   shapes' matches there, so a square is no circle even where the circle template half fits.
4. **Rules per caption.** One object: the best quality anywhere. Two objects (``and``): a soft minimum of the two
   (both must be there). Counting N: greedy peaks with non-maximum suppression; the mean of the first N minus how far
   an (N+1)-th exceeds ``extra_threshold``. The N are found on the strict quality above, the (N+1)-th on a *lenient*
   one (power 1, share ``LENIENT_BETA``): an extra object is penalised even when it is too ragged to count as
   present. An image holds a shape only when it is clean, and lacks one only when nothing like it is there.
   Relation: the best soft minimum over candidate pairs whose positions satisfy the relation (dominant axis, past a
   margin).

**Versions** (``VERSIONS``). ``world_scene`` is version 2; ``world_scene_v1`` keeps version 1, which the methods
benchmark's protocol versions 1 and 2 ran (``benchmarks/methods.py``), so that they stay reproducible. Version 2
raises the inside power 1 → 4 and the shape share 10 → 40, and looks for extra objects on the lenient quality above
0.25 (version 1: on the one quality map, above 0.5). These values were chosen on validation captions of the
fine-tuning split. On 900 validation images (the base model, and the EMA and last weights of a 64-step LeapAlign run)
the reward's AUC against the judge rose 0.853 → 0.902. Between the objects the judge finds and those it reads as
another shape, the AUC rose 0.786 → 0.841. Version 1 gave a square missing three pixels at each corner a fifth of a
clean square's score, though the judge reads it as a circle; version 2 gives it almost nothing
(``tests/unit/test_world_scene.py``).

Score in about [−0.5, 1]; rendered true scenes score ≈ 0.78 (both versions) and each category's negatives (wrong
colour, shape, count, mirrored relation, a missing object) far lower (``tests/unit/test_world_scene.py``). λ = 1
keeps the hinge active everywhere (no image scores above 1), α = 0.3.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.rewards.base import RewardSpec, register
from engine.world.scenes import BACKGROUND, COLORS, PALETTE, SHAPES, shape_mask

DEFAULT_LAM = 1.0
DEFAULT_ALPHA = 0.3
SIGMA = 0.1  # soft-colour width in [0, 1] RGB units; the palette's closest pair is 0.5 apart
UNKNOWN_DISTANCE = 60 / 255  # farther than this from every reference is mostly "unknown"
LENIENT_BETA = 10.0  # the shape share of the lenient quality that finds extra objects
SOFTMIN_TAU = 0.1
PAIR_CANDIDATES = 12  # peaks per object searched for a relation-consistent pair


@dataclass(frozen=True)
class Version:
    """One version's settings.

    Attributes:
        inside_power: The template's inside mean is raised to it: a shape counts only when (nearly) all its pixels
            are there.
        beta: Sharpness of the shape share.
        extra_threshold: In counting prompts, an (N+1)-th object whose quality exceeds it is penalised.
        lenient_extras: Look for that object on the lenient quality (power 1, share ``LENIENT_BETA``) rather than
            on the strict one.
    """

    inside_power: int
    beta: float
    extra_threshold: float
    lenient_extras: bool


VERSIONS = {
    1: Version(inside_power=1, beta=10.0, extra_threshold=0.5, lenient_extras=False),
    2: Version(inside_power=4, beta=40.0, extra_threshold=0.25, lenient_extras=True),
}
LATEST = max(VERSIONS)


def registered_name(version: int) -> str:
    """``world_scene`` for the latest version, ``world_scene_v<N>`` for an older one."""
    return "world_scene" if version == LATEST else f"world_scene_v{version}"


_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
_RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_BASE_SIZE, _SIDES = 32, (7, 10)


@dataclass(frozen=True)
class _Object:
    color: str | None
    shape: str
    count: int


@dataclass(frozen=True)
class _Caption:
    objects: tuple[_Object, ...]
    relation: str | None
    counting: bool


@functools.lru_cache(maxsize=4096)
def parse(prompt: str) -> _Caption:
    """Read a world caption; a caption the world cannot write is a one-line error naming it."""
    words = re.findall(r"[a-z]+", prompt.lower())
    objects, count, color, relation = [], 1, None, None
    counting = bool(words) and words[0] in _NUMBERS
    for word in words:
        if word in _NUMBERS:
            count = _NUMBERS[word]
        elif word in PALETTE:
            color = word
        elif word.rstrip("s") in SHAPES:
            objects.append(_Object(color, word.rstrip("s"), count))
            count, color = 1, None
        elif word in _RELATIONS:
            relation = _RELATIONS[word]
        elif word not in ("a", "an", "and", "to", "the", "of"):
            objects = []
            break
    if not 1 <= len(objects) <= 2 or (relation is not None and len(objects) != 2):
        raise ValueError(
            f"world_scene cannot read the prompt {prompt!r}: it scores the embedded world's captions only "
            "(engine.world.make_prompts); use another reward for other prompts"
        )
    return _Caption(tuple(objects), relation, counting)


@functools.lru_cache(maxsize=8)
def _templates(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """The template kernels ``[S·D + D, 1, W, W]``: the S·D inside masks (shape-major), then the D windows (one per
    side; every shape of a side shares its window); inside and outside pixel counts ``[S·D]``; W, S, D."""
    scale = size / _BASE_SIZE
    sides = range(round(_SIDES[0] * scale), round(_SIDES[1] * scale) + 1)
    window = sides[-1] + 2
    inside = torch.zeros(len(SHAPES) * len(sides), 1, window, window)
    frame = torch.zeros(len(sides), 1, window, window)
    for j, side in enumerate(sides):
        frame[j, 0, : side + 2, : side + 2] = 1.0
        for i, shape in enumerate(SHAPES):
            mask = torch.from_numpy(shape_mask(shape, side)).float()
            inside[i * len(sides) + j, 0, 1 : side + 1, 1 : side + 1] = mask
    n_in = inside.sum((1, 2, 3))
    n_out = frame.sum((1, 2, 3)).repeat(len(SHAPES)) - n_in
    return torch.cat([inside, frame]), n_in, n_out, window, len(SHAPES), len(sides)


class _Correlate(torch.autograd.Function):
    """``F.conv2d(maps, kernels)`` for single-channel maps ``[N, 1, H, W]``, whose input gradient is computed as a
    depthwise convolution of the padded output gradient with the flipped kernels, summed over kernels: the same
    adjoint as autograd's, but oneDNN's ``convolution_backward`` for one input channel is about 13× slower than the
    forward on CPU (36 → 10 ms for one batch of 8 world images). The kernels are constants (no gradient)."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kernels)
        return F.conv2d(maps, kernels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kernels,) = ctx.saved_tensors
        kh, kw = kernels.shape[-2:]
        padded = F.pad(grad, (kw - 1, kw - 1, kh - 1, kh - 1))
        return F.conv2d(padded, kernels.flip(-1, -2), groups=kernels.shape[0]).sum(1, keepdim=True), None


def soft_colors(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] → ``[B, 8, H, W]`` probabilities of background, the six colours, unknown."""
    refs = torch.tensor([BACKGROUND, *PALETTE.values()], device=images.device, dtype=torch.float32) / 255.0
    x = images.float()
    distance2 = ((x[:, None] - refs[None, :, :, None, None]) ** 2).sum(2)  # [B, 7, H, W]
    unknown = torch.full_like(distance2[:, :1], UNKNOWN_DISTANCE**2)
    return torch.softmax(-torch.cat([distance2, unknown], 1) / (2 * SIGMA**2), dim=1)


def match_maps(images: torch.Tensor, *inside_powers: int) -> tuple[torch.Tensor, ...]:
    """Template matches ``[B, colours, shapes, H, W]``, one per inside power (the colour masks and convolutions are
    shared): best over sides, positions = window top-left corners."""
    batch, _, height, width = images.shape
    kernels, n_in, n_out, window, n_shapes, n_sides = _templates(height)
    kernels, n_in, n_out = (t.to(images.device) for t in (kernels, n_in, n_out))
    masks = soft_colors(images)[:, 1 : 1 + len(COLORS)]  # [B, 6, H, W]
    padded = F.pad(masks, (0, window - 1, 0, window - 1)).reshape(batch * len(COLORS), 1, height + window - 1, -1)
    sums = _Correlate.apply(padded, kernels)  # [B·6, S·D + D, H, W]
    in_sum = sums[:, : n_shapes * n_sides]
    win_sum = sums[:, n_shapes * n_sides :].repeat(1, n_shapes, 1, 1)
    inside_mean = in_sum / n_in[:, None, None]
    outside_clear = 1.0 - (win_sum - in_sum) / n_out[:, None, None]
    shape = (batch, len(COLORS), n_shapes, n_sides, height, width)
    return tuple((inside_mean**power * outside_clear).reshape(shape).amax(3) for power in inside_powers)


def quality_maps(match: torch.Tensor, beta: float) -> torch.Tensor:
    """Each shape's match times its softmax share among the shapes (the others max-pooled over 3×3 positions)."""
    b, c, s, h, w = match.shape
    pooled = F.max_pool2d(match.reshape(b * c, s, h, w), 3, stride=1, padding=1).reshape(b, c, s, h, w)
    quality = []
    for i in range(s):
        logits = torch.cat([pooled[:, :, :i], match[:, :, i : i + 1], pooled[:, :, i + 1 :]], 2) * beta
        quality.append(match[:, :, i] * torch.softmax(logits, 2)[:, :, i])
    return torch.stack(quality, 2)


def _peaks(
    quality: torch.Tensor, n: int, radius: int, blocked: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]:
    """Greedy non-maximum suppression on one ``[H, W]`` map: n values (differentiable), their positions and the
    suppressed area; ``blocked`` marks positions already taken (by peaks found on another map)."""
    blocked = torch.zeros_like(quality, dtype=torch.bool) if blocked is None else blocked.clone()
    detached = quality.detach()
    indices, places = [], []
    for _ in range(n):
        index = int(detached.masked_fill(blocked, float("-inf")).argmax())
        y, x = divmod(index, quality.shape[1])
        indices.append(index)
        places.append((y, x))
        blocked[max(0, y - radius + 1) : y + radius, max(0, x - radius + 1) : x + radius] = True
    return quality.flatten()[torch.tensor(indices, device=quality.device)], places, blocked


def _softmin(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -SOFTMIN_TAU * torch.logsumexp(torch.stack([-a, -b]) / SOFTMIN_TAU, 0) + SOFTMIN_TAU * math.log(2.0)


def _object_map(quality: torch.Tensor, obj: _Object) -> torch.Tensor:
    """``[H, W]`` quality of ``obj`` (any colour where the caption names none)."""
    shape = SHAPES.index(obj.shape)
    if obj.color is None:
        return quality[:, shape].amax(0)
    return quality[COLORS.index(obj.color), shape]


def _holds(a: tuple[int, int], b: tuple[int, int], relation: str, margin: float) -> bool:
    dy, dx = a[0] - b[0], a[1] - b[1]  # +y is down
    if relation in ("left of", "right of"):
        along = -dx if relation == "left of" else dx
        return along > margin and along > abs(dy)
    along = -dy if relation == "above" else dy
    return along > margin and along > abs(dx)


def score_one(
    quality: torch.Tensor, caption: _Caption, radius: int, extra_threshold: float, lenient: torch.Tensor | None = None
) -> torch.Tensor:
    """One image's score from its strict ``[colours, shapes, H, W]`` quality maps and, for counting, the lenient ones
    that look for extra objects (the strict ones where none are given)."""
    maps = [_object_map(quality, obj) for obj in caption.objects]
    if caption.relation is not None:
        (va, pa, _), (vb, pb, _) = (_peaks(m, PAIR_CANDIDATES, radius // 2) for m in maps)
        holds = [[_holds(a, b, caption.relation, margin=radius / 2) for b in pb] for a in pa]
        if not any(map(any, holds)):
            return 0.0 * (va.sum() + vb.sum())
        pairs = _softmin(va[:, None].expand(-1, len(pb)), vb[None, :].expand(len(pa), -1))  # [i, j], all at once
        return pairs[torch.tensor(holds, device=pairs.device)].max()
    scores = []
    for obj, quality_map in zip(caption.objects, maps):
        if caption.counting:
            values, _, taken = _peaks(quality_map, obj.count, radius)
            extra, _, _ = _peaks(_object_map(quality if lenient is None else lenient, obj), 1, radius, taken)
            scores.append(values.mean() - torch.relu(extra[0] - extra_threshold))
        else:
            scores.append(quality_map.max())
    return scores[0] if len(scores) == 1 else _softmin(*scores)


class WorldSceneReward:
    """The structural reward (module docstring); images ``[B, 3, H, W]`` in [0, 1], world captions."""

    default_lam = DEFAULT_LAM
    default_alpha = DEFAULT_ALPHA

    def __init__(self, version: int = LATEST):
        if version not in VERSIONS:
            raise ValueError(f"world_scene version={version}: use one of {sorted(VERSIONS)}")
        self.version = VERSIONS[version]
        self.name = registered_name(version)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"{self.name}: {images.shape[0]} images for {len(prompts)} prompts")
        captions = [parse(p) for p in prompts]
        v = self.version
        lenient = None
        if v.lenient_extras and any(c.counting for c in captions):
            strict_match, lenient_match = match_maps(images, v.inside_power, 1)
            lenient = quality_maps(lenient_match, LENIENT_BETA)
        else:
            (strict_match,) = match_maps(images, v.inside_power)
        quality = quality_maps(strict_match, v.beta)
        radius = round(_SIDES[0] * images.shape[-2] / _BASE_SIZE)  # the smallest object side
        scores = [
            score_one(quality[b], c, radius, v.extra_threshold, None if lenient is None else lenient[b])
            for b, c in enumerate(captions)
        ]
        return torch.stack(scores).to(images.dtype)


for _version in VERSIONS:
    register(
        RewardSpec(
            registered_name(_version),
            lambda path, device, dtype, version=_version: WorldSceneReward(version),
            needs_path=False,
            files="nothing",
            takes_path=False,
        )
    )

"""``tiny_color``: a bundled, weight-free, prompt-aware differentiable reward for the embedded default run.

It scores whether an image's mean colour leans towards the colour named in its prompt (``"a red circle"`` → red):
``r = cos(mean_rgb(image) − ½, rgb(colour) − ½)`` in [−1, 1], the direction of the mean colour away from mid-grey.
A direction rather than a distance, so that a model whose decoder only reaches colours near grey (the embedded
random VAE) can still move it. Prompts that name no known colour score the image's contrast (pixel standard
deviation, doubled, clipped to 1). Simple enough to need no checkpoint, real enough
that its gradient w.r.t. the pixels is prompt-dependent — a stand-in until a learned reward is configured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.rewards.base import RewardSpec, register

COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.6, 0.0, 0.8),
    "orange": (1.0, 0.5, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}


def prompt_color(prompt: str) -> tuple[float, float, float] | None:
    """The RGB of the first known colour word in ``prompt``, or None."""
    for word in prompt.lower().replace(",", " ").split():
        if word in COLORS:
            return COLORS[word]
    return None


class ColorReward:
    name = "tiny_color"
    default_lam = 0.9
    default_alpha = 0.3

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        mean_rgb = images.float().mean(dim=(2, 3))  # [B, 3]
        scores = []
        for b, prompt in enumerate(prompts):
            color = prompt_color(prompt)
            if color is None:
                scores.append(torch.clamp(2.0 * images[b].float().std(), max=1.0))
            else:
                target = torch.tensor(color, device=images.device) - 0.5
                scores.append(torch.nn.functional.cosine_similarity(mean_rgb[b] - 0.5, target, dim=0, eps=1e-6))
        return torch.stack(scores)


register(
    RewardSpec(
        "tiny_color", lambda path, device, dtype: ColorReward(), needs_path=False, files="nothing", takes_path=False
    )
)

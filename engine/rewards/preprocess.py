"""Differentiable tensor versions of the CLIP-family validation transforms the reward models were trained with.

Every function takes and returns ``[B, C, H, W]`` float tensors and keeps the autograd graph to the pixels. The
PIL pipelines they replace (open_clip ``image_transform``, transformers ``CLIPImageProcessor``) work on uint8
images; the parity is measured in ``tests/unit/test_rewards.py`` (PIL rounds to uint8 after each resampling pass,
torch does not, so the two differ by about one grey level before normalisation).

Resampling is ``F.interpolate(mode="bicubic", antialias=True)``: with ``antialias=True`` torch uses PIL's cubic
kernel (a = −0.5) and widens it when downsampling, as PIL does; without it torch uses a = −0.75 and aliases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation, shared by open_clip's OPENAI_DATASET_MEAN/STD and transformers' CLIP processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
    """Bicubic antialiased resize to ``size = (H, W)`` as two separable passes, width then height, like PIL.

    PIL resamples horizontally into a saturated uint8 buffer, then vertically. Bicubic overshoots (up to ~20 grey
    levels on noise); a single 2-D ``interpolate`` never clamps the intermediate and lands that far from PIL, the
    two clamped passes land within ~1 grey level (measured in the tests). The clamp zeroes the gradient only on
    overshooting pixels.
    """
    out = images
    if out.shape[-1] != size[1]:
        out = F.interpolate(out, size=(out.shape[-2], size[1]), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0.0, 1.0) if clamp else out
    if out.shape[-2] != size[0]:
        out = F.interpolate(out, size=(size[0], size[1]), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp(0.0, 1.0) if clamp else out
    return out


def shortest_side_size(height: int, width: int, target: int) -> tuple[int, int]:
    """Output size when the SHORTEST side becomes ``target`` (torchvision ``Resize(int)`` and transformers'
    ``shortest_edge``: the long side is truncated, ``int(target * long / short)``)."""
    if height <= width:
        return target, int(target * width / height)
    return int(target * height / width), target


def longest_side_size(height: int, width: int, target: int) -> tuple[int, int]:
    """Output size when the LONGEST side becomes ``target`` (open_clip ``ResizeKeepRatio(longest=1)`` and HPSv2's
    ``ResizeMaxSize``: both sides ``round(side * target / longest)``)."""
    scale = target / max(height, width)
    return round(height * scale), round(width * scale)


def resize_shortest_side(images: torch.Tensor, target: int) -> torch.Tensor:
    return resize_bicubic(images, shortest_side_size(images.shape[-2], images.shape[-1], target))


def resize_longest_side(images: torch.Tensor, target: int) -> torch.Tensor:
    return resize_bicubic(images, longest_side_size(images.shape[-2], images.shape[-1], target))


def pad_to_square(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Centre-pad to ``size × size`` with ``fill`` (open_clip ``center_crop_or_pad``: left/top get the floor half)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to ``size × size``; offsets are floored, as transformers' CLIP processors do."""
    height, width = images.shape[-2:]
    top, left = max((height - size) // 2, 0), max((width - size) // 2, 0)
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_shortest_crop(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """transformers ``CLIPImageProcessor``: shortest side → ``size``, centre crop, normalise. [B,3,H,W] in [0,1]."""
    return normalize(center_crop(resize_shortest_side(images, size), size), mean, std)


def clip_longest_pad(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """open_clip ``image_transform(resize_mode="longest")`` (HPSv2): longest side → ``size``, zero-pad, normalise."""
    return normalize(pad_to_square(resize_longest_side(images, size), size, fill=0.0), mean, std)

"""Image grids with captions, written as PNG (atomically: write to a temporary file, then rename)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def save_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path, cell: int = 128) -> Path:
    """Tile ``images`` ``[B, 3, H, W]`` in [0, 1] into a captioned grid PNG, each image upscaled to ``cell`` px."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = images.shape[0]
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    caption_height = 14
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(count):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_height)
        tile = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (x, y))
        draw.text((x + 2, y + cell + 1), captions[i][:24], fill="black")
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path

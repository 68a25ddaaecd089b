"""Image grids with captions, written as PNG (atomically: write to a temporary file, then rename)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 12  # PIL's default bitmap font is 11 px high


def wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a word wider than that is split)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width:  # one over-long word: cut it where it overflows
            cut = next(i for i in range(1, len(word) + 1) if draw.textlength(word[:i], font=font) > width) - 1
            lines.append(word[: max(1, cut)])
            word = word[max(1, cut) :]
        line = word
    return [*lines, line] if line else lines or [""]


def _mark(draw: ImageDraw.ImageDraw, x: int, y: int, correct: bool, size: int = 14) -> None:
    """A verdict drawn as lines on a white disc (no font needed): a green check or a red cross."""
    draw.ellipse((x, y, x + size, y + size), fill="white", outline="black")
    inset = size // 4
    if correct:
        points = [(x + inset, y + size // 2), (x + size // 2 - 1, y + size - inset), (x + size - inset, y + inset)]
        draw.line(points, fill=(0, 150, 0), width=2)
    else:
        draw.line((x + inset, y + inset, x + size - inset, y + size - inset), fill=(200, 0, 0), width=2)
        draw.line((x + inset, y + size - inset, x + size - inset, y + inset), fill=(200, 0, 0), width=2)


@dataclass(frozen=True)
class GridLayout:
    """Where :func:`save_grid` puts each image and its caption: ``columns`` per row, each tile ``cell`` px square
    over ``caption_height`` px of wrapped caption lines."""

    columns: int
    cell: int
    caption_height: int
    wrapped: list[list[str]]

    def box(self, index: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of tile ``index`` with its caption, in the grid's pixels."""
        x, y = (index % self.columns) * self.cell, (index // self.columns) * (self.cell + self.caption_height)
        return x, y, x + self.cell, y + self.cell + self.caption_height


def grid_layout(captions: Sequence[str], cell: int = 128, columns: int | None = None) -> GridLayout:
    """The layout :func:`save_grid` draws ``captions`` in (so a reader can cut one tile out of a saved grid)."""
    count = len(captions)
    columns = min(count, columns or max(4, math.ceil(math.sqrt(count))))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default()
    wrapped = [wrap(text, cell - 4, probe, font) for text in captions]
    return GridLayout(columns, cell, LINE_HEIGHT * max(len(lines) for lines in wrapped) + 4, wrapped)


def save_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    cell: int = 128,
    verdicts: Sequence[bool | None] | None = None,
    columns: int | None = None,
) -> Path:
    """Tile ``images`` ``[B, 3, H, W]`` in [0, 1] into a captioned grid PNG, each image upscaled to ``cell`` px.

    Every caption is written whole, wrapped at spaces under its image. ``verdicts`` (the judge's, one per image;
    None for none) are drawn as a green check or a red cross in each image's corner. ``columns`` defaults to
    ⌈√count⌉ (at least 4), so that a 300-image evaluation is a near-square sheet, not a 75-row strip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = images.shape[0]
    font = ImageFont.load_default()
    layout = grid_layout(captions, cell, columns)
    wrapped, columns, caption_height = layout.wrapped, layout.columns, layout.caption_height
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(count):
        x, y, *_ = layout.box(i)
        tile = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (x, y))
        for line_index, line in enumerate(wrapped[i]):
            draw.text((x + 2, y + cell + 2 + line_index * LINE_HEIGHT), line, fill="black", font=font)
        if verdicts is not None and verdicts[i] is not None:
            _mark(draw, x + cell - 17, y + 3, bool(verdicts[i]))
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_images(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """Each of ``images`` ``[B, 3, H, W]`` in [0, 1] as ``folder/NNNN.png`` at its own size (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"{i:04d}.png"
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths

"""What the world's build stages share: image sizes, the stage record (``TRAINING.json``), the atomic folder swap,
the learning-rate schedule and image conversions (``engine.world.build``, ``engine.world.build_reward``)."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32
T5_MAX_LENGTH = 12  # the longest caption is 11 word tokens + </s>
TEXT_DIM = 32


def record_stage(folder: Path, stage: str, settings: dict, seconds: float, metrics: dict, **extra) -> None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    import diffusers

    record = {
        "stage": stage,
        "settings": settings,
        "wall_seconds": round(seconds, 1),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads (CPU)"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "metrics": metrics,
        **extra,
    }
    (folder / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def replace_folder(tmp: Path, final: Path) -> None:
    """Moves a finished folder into place; the old one is removed only after the new one is complete."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_unit(images: np.ndarray) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` → float ``[N, 3, H, W]`` in [0, 1] (what rewards take)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` → float ``[N, 3, H, W]`` in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def loss_curve(losses: Sequence[float], points: int = 20) -> list[float]:
    chunks = np.array_split(np.asarray(losses), points)
    return [round(float(c.mean()), 5) for c in chunks if len(c)]

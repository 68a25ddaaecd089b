"""``world_clip``: the embedded world's learned reward, a tiny open_clip CLIP trained contrastively on the world's
scenes with hard negative captions (``engine/world/build_reward.py``), loaded through the HPS open_clip loader.

Score: the cosine of the normalised image and text features, as HPSv2's. On rendered ground-truth scenes it scores
0.93 ± 0.03 (``engine/world/assets/reward/TRAINING.json``), on the base model's held-out images 0.65 ± 0.30 (0.91 on
the images the judge accepts, 0.58 on the rest). The default λ = 0.9 sits just under true scenes, so the hinge stays
active until an image scores like a true scene of its prompt, as HPSv2.1's λ = 0.55 sits above real images' ≈ 0.3.
α = 0.3, HPSv2.1's. ``path`` null loads the committed weights.
"""

from __future__ import annotations

import torch

from engine.rewards.base import RewardSpec, register
from engine.rewards.hps import HPSReward, load_hps
from engine.world.paths import REWARD_DIR, REWARD_FILE

DEFAULT_LAM = 0.9
DEFAULT_ALPHA = 0.3


def load_world_clip(path: str | None, device: torch.device, dtype: torch.dtype) -> HPSReward:
    return load_hps(
        "world_clip",
        path or REWARD_DIR,
        device,
        dtype,
        file_name=REWARD_FILE,
        default_lam=DEFAULT_LAM,
        default_alpha=DEFAULT_ALPHA,
    )


register(
    RewardSpec(
        "world_clip",
        load_world_clip,
        needs_path=False,
        files=f"{REWARD_FILE} with open_clip_config.json beside it (null = the committed engine/world/assets/reward)",
    )
)

"""Where the embedded world's committed assets live: the pretrained tiny FLUX model and the ``world_clip`` reward.

Readers (the text phase, the reward loader, the planner) import these paths from here, never from the builder
(``engine/world/build.py``), which writes the assets and pulls in training code.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).with_name("assets")
MODEL_DIR = ASSETS / "model"  # a FluxPipeline folder (save_pretrained)
REWARD_DIR = ASSETS / "reward"  # world_clip.pt + open_clip_config.json
REWARD_FILE = "world_clip.pt"
REWARD_CONFIG = REWARD_DIR / "open_clip_config.json"

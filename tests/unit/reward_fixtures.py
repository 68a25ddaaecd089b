"""Tiny random reward models saved in their REAL checkpoint formats, for loading through ``load_reward``.

- ``build_tiny_hf_clip``: a transformers ``CLIPModel`` folder (config.json, model.safetensors, tokenizer files,
  preprocessor_config.json) — PickScore / CLIPScore layout, and the aesthetic predictor's ``clip/``.
- ``build_tiny_hps``: ``HPS_v2.1_compressed.pt`` = ``torch.save({"state_dict": open_clip CLIP state dict})``, with an
  ``open_clip_config.json`` naming a tiny open_clip architecture (real HPS uses ViT-H-14 and needs no config).
- ``build_tiny_aesthetic``: ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP state dict, real key layout) + ``clip/``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from engine.models.tiny import _clip_tokenizer
from engine.rewards.aesthetic import MLP_FILE, aesthetic_mlp

# A tiny open_clip CLIP: ViT with one block on 224 px / 32 px patches (7 × 7 tokens), one text block. The text
# vocabulary must stay 49408: open_clip's SimpleTokenizer (the real HPS tokenizer) emits ids up to 49407.
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_hf_clip(folder: Path, projection_dim: int = 16, seed: int = 0, vision: dict | None = None) -> Path:
    """A random CLIPModel (hidden 32, one layer per tower, 224 px / 32 px patches) saved with its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _clip_tokenizer(Path(scratch))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config={**tower, "image_size": 224, "patch_size": 32, **(vision or {})},
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def build_tiny_hps(
    folder: Path, filename: str = "HPS_v2.1_compressed.pt", seed: int = 0, cfg: dict | None = None
) -> Path:
    """A random tiny open_clip CLIP saved as HPS does: ``{"state_dict": model.state_dict()}``. Returns the file."""
    import open_clip
    from open_clip import factory

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg or TINY_OPEN_CLIP_CFG
    factory._MODEL_CONFIGS["tiny-hps-fixture"] = cfg
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-hps-fixture", pretrained=None)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_name": "tiny-hps", "model_cfg": cfg}), encoding="utf-8"
    )
    torch.save({"state_dict": model.state_dict()}, folder / filename)
    return folder / filename


def build_tiny_aesthetic(folder: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """``folder/sac+logos+ava1-l14-linearMSE.pth`` (real widths after the input: 1024, 128, 64, 16, 1) + ``clip/``."""
    folder = Path(folder)
    build_tiny_hf_clip(folder / "clip", projection_dim=projection_dim, seed=seed)
    torch.manual_seed(seed)
    mlp = aesthetic_mlp([projection_dim, 1024, 128, 64, 16, 1])
    torch.save(mlp.state_dict(), folder / MLP_FILE)
    return folder

"""``aesthetic``: the LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

Score: an MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained to regress 1–10 ratings (SAC + LAION-Logos
+ AVA, MSE); typical generated images score 5–6.5. Prompt-independent (the prompts are ignored).
MLP (the checkpoint's key layout, Dropouts carry no weights): ``layers.0`` Linear 768→1024, Dropout(0.2),
``layers.2`` Linear 1024→128, Dropout(0.2), ``layers.4`` Linear 128→64, Dropout(0.1), ``layers.6`` Linear 64→16,
``layers.7`` Linear 16→1. The widths are read from the checkpoint and checked against the CLIP projection size.
Preprocessing: OpenAI CLIP's (shortest side → 224 bicubic, centre crop, CLIP mean/std), on tensors.

Files (one folder): ``sac+logos+ava1-l14-linearMSE.pth`` (a torch state dict, loaded with weights_only=True) and
the transformers CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) either in a ``clip/`` subfolder or in the same
folder. Defaults (our choice, not from a paper): λ = 7.0 (above what base models reach, so the hinge stays
active), α = 0.3 (the HPS value).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from engine.rewards.base import RewardSpec, register
from engine.rewards.clipscore import HF_CLIP_FILES, HFClip, image_features, load_hf_clip

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
FILES = (
    f"a folder with {MLP_FILE} (the LAION improved-aesthetic MLP state dict, keys layers.0/2/4/6/7.weight|bias) and "
    f"the CLIP ViT-L/14 model in clip/ or beside it ({HF_CLIP_FILES.removeprefix('a ')})"
)
LINEAR_LAYERS = ("0", "2", "4", "6", "7")
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}  # index in ``layers`` → rate (inactive in eval, kept for the key layout)


def _fail(path, why: str) -> ValueError:
    why = " ".join(str(why).split())[:300]
    return ValueError(
        f"reward 'aesthetic': cannot load {path!s} ({why}); expected {FILES}; fix: set rewards.N.path to that folder"
    )


def aesthetic_mlp(widths: Sequence[int]) -> nn.Module:
    """The predictor's ``layers`` Sequential for ``widths = (768, 1024, 128, 64, 16, 1)``, keys as in the .pth."""
    if len(widths) != len(LINEAR_LAYERS) + 1:
        raise ValueError(f"widths={list(widths)} must give {len(LINEAR_LAYERS)} linear layers")
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(fan_in, fan_out))
        if len(layers) in DROPOUTS:
            layers.append(nn.Dropout(DROPOUTS[len(layers)]))
    module = nn.Module()
    module.layers = nn.Sequential(*layers)
    return module


class AestheticReward:
    """``MLP(normalize(CLIP_image(x)))``: the LAION aesthetic score, prompt-independent."""

    name = "aesthetic"
    default_lam = 7.0
    default_alpha = 0.3

    def __init__(self, clip: HFClip, mlp: nn.Module):
        self.clip = clip
        self.mlp = mlp

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        embeds = nn.functional.normalize(image_features(self.clip, images), dim=-1)
        parameter = next(self.mlp.parameters())
        return self.mlp.layers(embeds.to(parameter.dtype)).squeeze(-1).float()


def load_aesthetic(path: str | os.PathLike | None, device: torch.device, dtype: torch.dtype) -> AestheticReward:
    folder = Path(path)
    if not folder.is_dir():
        raise _fail(path, "not a folder")
    if not (folder / MLP_FILE).is_file():
        raise _fail(path, f"missing {MLP_FILE}")
    try:
        state = torch.load(folder / MLP_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated file, or a pickle of more than tensors
        raise _fail(folder / MLP_FILE, f"torch.load(weights_only=True) failed: {type(err).__name__}: {err}") from err
    expected = {f"layers.{i}.{kind}" for i in LINEAR_LAYERS for kind in ("weight", "bias")}
    if not isinstance(state, dict) or set(state) != expected:
        keys = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise _fail(folder / MLP_FILE, f"not the aesthetic MLP state dict (got {keys})")
    widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in LINEAR_LAYERS]
    mlp = aesthetic_mlp(widths)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _fail(folder / MLP_FILE, f"inconsistent layer shapes: {str(err).splitlines()[-1]}") from err
    clip_folder = folder / "clip" if (folder / "clip").is_dir() else folder
    clip = load_hf_clip(clip_folder, "aesthetic", device, dtype, FILES)
    projection = int(clip.model.config.projection_dim)
    if projection != widths[0]:
        raise _fail(path, f"the MLP takes {widths[0]}-d embeddings but the CLIP model projects to {projection}")
    mlp = mlp.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return AestheticReward(clip, mlp)


register(RewardSpec("aesthetic", load_aesthetic, needs_path=True, files=FILES))

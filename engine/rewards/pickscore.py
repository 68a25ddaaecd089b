"""``pickscore``: PickScore v1 (Kirstain et al. 2023), a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Score: ``logit_scale.exp() · cos(image, text)`` — PickScore's own definition (the model's learned scale, ≈ 100;
real images score ≈ 18–23). Preprocessing: the CLIP processor's shortest side → 224 (bicubic, antialiased),
centre crop 224, CLIP mean/std, done on tensors so the gradient reaches the pixels.

Files: the PickScore weights (``yuvalkirstain/PickScore_v1``: config.json, model.safetensors) and, in the SAME
folder, the processor/tokenizer files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` that PickScore is used with
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, preprocessor_config.json).

Defaults: α = 0.1 and λ = 0.4 from the LeapAlign paper. The paper's thresholds sit on the cosine scale (HPSv2.1
scores ≈ 0.3 against λ 0.55; PickScore's cosine ≈ 0.22 against λ 0.4), so on PickScore's own scale the default
threshold is ``0.4 · logit_scale.exp()`` (= 40 for PickScore v1, whose scale is 100): the same hinge, scaled.
A ``rewards.N.lam`` set in the config is taken on the score's own scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.rewards.base import RewardSpec, register
from engine.rewards.clipscore import HF_CLIP_FILES, HFClip, cosine, load_hf_clip

PICKSCORE_FILES = "PickScore_v1 weights + the CLIP-ViT-H-14-laion2B processor/tokenizer files in one folder: " + (
    HF_CLIP_FILES.removeprefix("a transformers CLIP folder: ")
)


class PickScoreReward:
    """``logit_scale.exp() · cos(image, prompt)`` from a transformers ``CLIPModel``."""

    name = "pickscore"
    default_lam = 0.4
    default_alpha = 0.1

    def __init__(self, clip: HFClip):
        self.clip = clip
        self.scale = float(clip.model.logit_scale.detach().float().exp())  # a frozen constant: read once
        self.default_lam = 0.4 * self.scale  # the paper's cosine-scale λ = 0.4 on this score's scale

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scale * cosine(self.clip, images, prompts)


def load_pickscore(path: str | None, device: torch.device, dtype: torch.dtype) -> PickScoreReward:
    return PickScoreReward(load_hf_clip(path, "pickscore", device, dtype, PICKSCORE_FILES))


register(RewardSpec("pickscore", load_pickscore, needs_path=True, files=PICKSCORE_FILES))

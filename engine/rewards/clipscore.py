"""``clipscore``: CLIP image–text agreement from a local transformers CLIP folder, and the shared CLIP loader.

Score: ``100 · max(cos(image, text), 0)`` — the scale torchmetrics' ``CLIPScore`` reports (Hessel et al. 2021 write
it ``w · max(cos, 0)`` with w = 2.5; ours is that times 40). Typical values with ``openai/clip-vit-large-patch14``:
~20 for unrelated image/prompt pairs, 30–35 for well-aligned ones; default λ = 35 (push towards the aligned range),
α = 0.3 (the HPS value; not tuned). The clamp at 0 kills the gradient only for anti-aligned pairs, which CLIP
practically never produces.

``load_hf_clip`` is shared with ``pickscore`` (same model class, processor and folder layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models.base import transformers_dtype_kwargs
from engine.rewards import preprocess
from engine.rewards.base import RewardSpec, register

HF_CLIP_FILES = (
    "a transformers CLIP folder: config.json + model.safetensors (or pytorch_model.bin), tokenizer "
    "(vocab.json, merges.txt, tokenizer_config.json) and preprocessor_config.json"
)


@dataclass
class HFClip:
    """A frozen transformers ``CLIPModel`` with its tokenizer and the processor's image settings."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int  # crop size (224 for ViT-L/14 and ViT-H/14)
    resize_size: int  # shortest side before the crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_length: int


def _fail(reward: str, path, why: str, files: str = HF_CLIP_FILES) -> ValueError:
    # One line: what is wrong, what is expected, how to fix it.
    why = " ".join(str(why).split())[:300]
    return ValueError(
        f"reward {reward!r}: cannot load {path!s} ({why}); expected {files}; "
        f"fix: point rewards.N.path at that folder (e.g. from save_pretrained or a local hub snapshot)"
    )


def features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers < 5 and ``BaseModelOutputWithPooling`` (projected
    features in ``pooler_output``) in transformers ≥ 5."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _crop_size(value) -> int:
    if isinstance(value, dict):
        return int(value.get("height", value.get("shortest_edge", 224)))
    return int(value)


def load_hf_clip(
    path: str | os.PathLike, reward: str, device: torch.device, dtype: torch.dtype, files: str = HF_CLIP_FILES
) -> HFClip:
    """Load ``CLIPModel`` + ``CLIPTokenizer`` + the processor settings from a local folder, offline and frozen."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise _fail(reward, path, "not a folder", files)
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")) and not any(
        folder.glob("model-*.safetensors")
    ):
        missing.append("model.safetensors")
    if missing:
        raise _fail(reward, path, f"missing {', '.join(missing)}", files)
    try:
        processor_cfg = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        size = processor_cfg.get("size", {"shortest_edge": 224})
        resize_size = int(size["shortest_edge"]) if isinstance(size, dict) else int(size)
        image_size = _crop_size(processor_cfg.get("crop_size", resize_size))
        mean = tuple(processor_cfg.get("image_mean", preprocess.CLIP_MEAN))
        std = tuple(processor_cfg.get("image_std", preprocess.CLIP_STD))
    except (ValueError, KeyError, TypeError) as err:
        raise _fail(reward, folder / "preprocessor_config.json", f"unreadable: {err}", files) from err
    try:
        # local_files_only: never a hub, even if HF_HUB_OFFLINE is unset; pytorch_model.bin goes through
        # torch.load(weights_only=True) inside transformers; remote code is never trusted (the default).
        model = CLIPModel.from_pretrained(folder, local_files_only=True, **transformers_dtype_kwargs(dtype))
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, safetensors errors, ... for bad folders
        raise _fail(reward, path, f"{type(err).__name__}: {err}", files) from err
    model = model.to(device).eval().requires_grad_(False)
    max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    return HFClip(model, tokenizer, image_size, resize_size, mean, std, max_length)


def image_features(clip: HFClip, images: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image features ``[B, D]`` float32 (not normalised), differentiable w.r.t. ``images``.

    ``images [B,3,H,W]`` in [0, 1] go through the processor's transform on tensors: shortest side →
    ``resize_size`` (bicubic, antialiased), centre crop ``image_size``, normalise.
    """
    parameter = next(clip.model.parameters())
    pixels = preprocess.resize_shortest_side(images.float(), clip.resize_size)
    pixels = preprocess.normalize(preprocess.center_crop(pixels, clip.image_size), clip.mean, clip.std)
    return features(clip.model.get_image_features(pixel_values=pixels.to(parameter.device, parameter.dtype))).float()


def cosine(clip: HFClip, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Cosine of the projected CLIP image and text features. ``images [B,3,H,W]`` in [0, 1] → ``[B]`` float32.

    Differentiable w.r.t. ``images``; the text side runs without a graph (nothing upstream of it trains).
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    image_embeds = torch.nn.functional.normalize(image_features(clip, images), dim=-1)
    with torch.no_grad():
        tokens = clip.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=clip.max_length, return_tensors="pt"
        ).to(image_embeds.device)
        text_embeds = features(
            clip.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
    text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    return (image_embeds * text_embeds).sum(dim=-1)


class CLIPScoreReward:
    """``100 · max(cos, 0)`` of CLIP image and prompt features (torchmetrics' CLIPScore scale)."""

    name = "clipscore"
    default_lam = 35.0
    default_alpha = 0.3

    def __init__(self, clip: HFClip):
        self.clip = clip

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return 100.0 * torch.clamp(cosine(self.clip, images, prompts), min=0.0)


def load_clipscore(path: str | None, device: torch.device, dtype: torch.dtype) -> CLIPScoreReward:
    return CLIPScoreReward(load_hf_clip(path, "clipscore", device, dtype))


register(RewardSpec("clipscore", load_clipscore, needs_path=True, files=HF_CLIP_FILES))

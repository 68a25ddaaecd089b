"""``hpsv2`` / ``hpsv21``: Human Preference Score v2 / v2.1 (Wu et al. 2023), an open_clip ViT-H/14 fine-tuned on
HPD v2 preferences.

Score: the cosine of the L2-normalised image and text features (what HPSv2's ``score()`` returns: the diagonal of
``image_features @ text_features.T``, no logit scale); real images score ≈ 0.2–0.35.
Preprocessing: the model's validation transform, open_clip ``image_transform(224, resize_mode="longest")`` (HPSv2's
``resize_longest_max=True`` → ``ResizeMaxSize``): longest side → 224 (bicubic, antialiased), centre zero-pad to
224 × 224, OpenAI CLIP mean/std — on tensors, so the gradient reaches the pixels.

Files: ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``), a torch file ``{"state_dict": <whole CLIP>}``,
loaded with ``torch.load(weights_only=True)`` and a STRICT ``load_state_dict`` into
``open_clip.create_model("ViT-H-14", pretrained=None)``. ``path`` is that file or a folder holding it. An optional
``open_clip_config.json`` next to it (open_clip's own hub format, ``{"model_cfg": {...}}``, plus an optional
``"model_name"``) selects another architecture — the tests use it for a tiny model; real use needs none.
The tokenizer is open_clip's ``SimpleTokenizer``, whose BPE vocabulary ships inside the open_clip package.

Defaults: HPSv2.1 λ = 0.55, α = 0.3 (LeapAlign paper). HPSv2 (not in the paper): the same values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.rewards import preprocess
from engine.rewards.base import RewardSpec, register

DEFAULT_ARCH = "ViT-H-14"
CONFIG_NAME = "open_clip_config.json"
CHECKPOINTS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}


def _files(name: str) -> str:
    if name not in CHECKPOINTS:
        return f"{name}.pt with {CONFIG_NAME} beside it"
    return (
        f"{CHECKPOINTS[name]} (a torch file {{'state_dict': ...}} of open_clip {DEFAULT_ARCH}, from the xswu/HPSv2 "
        f"release), given as the file or a folder holding it, optionally with {CONFIG_NAME} beside it"
    )


def _fail(name: str, path, why: str) -> ValueError:
    why = " ".join(str(why).split())[:300]
    return ValueError(
        f"reward {name!r}: cannot load {path!s} ({why}); expected {_files(name)}; "
        f"fix: download it once and set rewards.N.path to its local path"
    )


def _find_checkpoint(name: str, path: str | os.PathLike, file_name: str) -> Path:
    candidate = Path(path)
    if candidate.is_dir():
        # The exact name only: a folder holding the other HPS version must not load silently under this name.
        if not (candidate / file_name).is_file():
            raise _fail(name, path, f"no {file_name} in the folder")
        return candidate / file_name
    if not candidate.is_file():
        raise _fail(name, path, "no such file or folder")
    return candidate


def _architecture(name: str, checkpoint: Path) -> str:
    """The open_clip model name to build: ViT-H-14, or the config found next to the checkpoint (registered)."""
    import open_clip
    from open_clip import factory

    config_file = checkpoint.parent / CONFIG_NAME
    if not config_file.is_file():
        return DEFAULT_ARCH
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        model_cfg = config.get("model_cfg")
        arch = config.get("model_name")
        if model_cfg is None:
            if arch not in open_clip.list_models():
                raise KeyError(f"{CONFIG_NAME} has neither 'model_cfg' nor a known open_clip 'model_name'")
            return arch
        # A name unique to this config, so two configs never overwrite each other in open_clip's registry.
        digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
        arch = f"{arch or 'hps-local'}-{digest}"
        factory._MODEL_CONFIGS[arch] = model_cfg  # open_clip's registry of architectures (a dict by name)
        return arch
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _fail(name, config_file, f"unreadable {CONFIG_NAME}: {err}") from err


def _torch_load(file: Path):
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it: every rank loads the 2 GB
    checkpoint, and mmap shares the page cache instead of copying it into each process."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # only the legacy (non-zip) format cannot be mapped
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


class HPSReward:
    """HPSv2/v2.1: ``cos(f_img(x), f_txt(prompt))`` of an open_clip CLIP model."""

    def __init__(
        self, name: str, model: torch.nn.Module, tokenizer, default_lam: float = 0.55, default_alpha: float = 0.3
    ):
        self.name = name
        self.default_lam = default_lam
        self.default_alpha = default_alpha
        self.model = model
        self.tokenizer = tokenizer
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images [B,3,H,W]`` in [0, 1], one prompt each → ``[B]`` float32, differentiable w.r.t. ``images``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        parameter = next(self.model.parameters())
        pixels = preprocess.clip_longest_pad(images.float(), self.image_size)
        image_features = self.model.encode_image(pixels.to(parameter.device, parameter.dtype), normalize=True)
        with torch.no_grad():  # nothing upstream of the text trains
            text = self.tokenizer(list(prompts)).to(parameter.device)
            text_features = self.model.encode_text(text, normalize=True)
        return (image_features.float() * text_features.float()).sum(dim=-1)


def load_hps(
    name: str,
    path: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype,
    *,
    file_name: str | None = None,
    default_lam: float = 0.55,
    default_alpha: float = 0.3,
) -> HPSReward:
    """Build open_clip ViT-H-14 (or the local config's architecture) and strictly load the HPS checkpoint.

    ``file_name``/``default_lam``/``default_alpha`` let another open_clip cosine reward (the embedded world's
    ``world_clip``) load through this same path; the HPS names take their release file names.
    """
    import open_clip

    checkpoint = _find_checkpoint(name, path, file_name or CHECKPOINTS[name])
    arch = _architecture(name, checkpoint)
    try:
        state = _torch_load(checkpoint)
    except Exception as err:  # corrupt zip, pickle with non-tensor objects, truncated file, ...
        raise _fail(name, checkpoint, f"torch.load(weights_only=True) failed: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise _fail(name, checkpoint, "the file holds no 'state_dict' dict")
    state_dict = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}  # DDP-saved copies
    model = open_clip.create_model(arch, pretrained=None, device="cpu")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise _fail(
            name,
            checkpoint,
            f"does not match open_clip {arch}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}",
        )
    # Shapes checked here: some torch versions (2.5, 2.6) copy a [3] tensor into a scalar parameter silently.
    own = model.state_dict()
    wrong = [k for k in sorted(expected) if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if wrong:
        k = wrong[0]
        raise _fail(
            name,
            checkpoint,
            f"does not match open_clip {arch}: size mismatch for {len(wrong)} tensor(s), e.g. {k} "
            f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}",
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # same keys, wrong shapes: another architecture
        raise _fail(name, checkpoint, f"does not match open_clip {arch}: {str(err).splitlines()[-1]}") from err
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)  # SimpleTokenizer: BPE vocab packaged with open_clip, no download
    return HPSReward(name, model, tokenizer, default_lam, default_alpha)


register(RewardSpec("hpsv21", lambda p, d, t: load_hps("hpsv21", p, d, t), needs_path=True, files=_files("hpsv21")))
register(RewardSpec("hpsv2", lambda p, d, t: load_hps("hpsv2", p, d, t), needs_path=True, files=_files("hpsv2")))

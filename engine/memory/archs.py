"""The frozen models' sizes, counted from their released configs on the meta device: the text encoders of each model
family and every reward's towers, with the reward-graph formula and a model folder's transformer spec."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.memory.activations import Calibration
from engine.models.specs import ModelSpec
from engine.world.paths import REWARD_CONFIG


def _t5_xxl_encoder() -> int:
    """google/t5-v1_1-xxl's encoder (FLUX.1-dev's and SD3.5's text_encoder_2/3/config.json)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    return _meta_count(lambda: T5EncoderModel(config))


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int | None) -> Callable[[], int]:
    def count() -> int:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        config = CLIPTextConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
            max_position_embeddings=77, vocab_size=49408, projection_dim=projection or hidden,
        )  # fmt: skip
        return _meta_count(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config))

    return count


# Text encoders per model family: (name, parameter count), from the released text_encoder*/config.json.
TEXT_ENCODERS: dict[str, tuple[tuple[str, Callable[[], int]], ...]] = {
    "flux": (("CLIP-L text", _clip_text(768, 12, 12, 3072, None)), ("T5-XXL encoder", _t5_xxl_encoder)),
    "sd3": (
        ("CLIP-L text", _clip_text(768, 12, 12, 3072, 768)),
        ("CLIP-G text", _clip_text(1280, 32, 20, 5120, 1280)),
        ("T5-XXL encoder", _t5_xxl_encoder),
    ),
}


@dataclass(frozen=True)
class Tower:
    """One stack of layers on the reward's gradient path: ``layers`` × ``tokens`` × ``width``."""

    layers: int
    tokens: int
    width: int

    @property
    def units(self) -> int:
        return self.layers * self.tokens * self.width


@dataclass(frozen=True)
class RewardArch:
    """A reward model as the planner sees it. ``family`` keys its activation constant in the calibration."""

    name: str
    family: str  # "open_clip_vit" | "hf_clip_vit" | "qwen2_vl"
    count: Callable[[], int]  # parameters of the released model, built on the meta device
    towers: tuple[Tower, ...]  # the layers the reward gradient goes through (the prompt side runs without one)
    input_px: int  # the square size the reward's preprocessing resizes to
    source: str


_COUNTED: dict[Callable, int] = {}


def counted(count: Callable[[], int]) -> int:
    """``count()``, built once per process (the planner asks for each model many times while it searches fixes)."""
    if count not in _COUNTED:
        _COUNTED[count] = count()
    return _COUNTED[count]


def _meta_count(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def _open_clip(name: str) -> Callable[[], int]:
    def count() -> int:
        import open_clip

        return _meta_count(lambda: open_clip.create_model(name, pretrained=None, device="meta"))

    return count


def _open_clip_config(cfg: dict) -> Callable[[], int]:
    def count() -> int:
        import open_clip
        from open_clip import factory

        factory._MODEL_CONFIGS["planner-" + str(id(cfg))] = cfg  # open_clip's registry of architectures (by name)
        return _meta_count(lambda: open_clip.create_model("planner-" + str(id(cfg)), pretrained=None, device="meta"))

    return count


def _hf_clip(text: dict, vision: dict, projection: int, extra: int = 0) -> Callable[[], int]:
    def count() -> int:
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
        return _meta_count(lambda: CLIPModel(config)) + extra

    return count


def _qwen2_vl_7b() -> int:
    """Qwen2-VL-7B-Instruct's config.json (HPSv3's backbone), plus one token (<|Reward|>) and the ranknet head."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=152064 + 1, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
    )  # fmt: skip
    return _meta_count(lambda: Qwen2VLForConditionalGeneration(config)) + 3584 * 2 + 2


_VIT_H_TEXT = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_VIT_H_VISION = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                     image_size=224, patch_size=14)  # fmt: skip
_VIT_L_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_VIT_L_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     image_size=224, patch_size=14)  # fmt: skip
_AESTHETIC_MLP = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
_VIT_H_224 = (Tower(32, 257, 1280),)  # 16 × 16 patches + CLS
_VIT_L_224 = (Tower(24, 257, 1024),)


def _hpsv3_template_tokens() -> int:
    """Text tokens of HPSv3's chat template around a short prompt: its words × 1.3 (an estimate of Qwen2's BPE rate
    on English; the real tokenizer is not available offline)."""
    from engine.rewards.hpsv3 import chat_text

    return round(1.3 * len(chat_text("a red circle above a blue square", 0).split()))


# HPSv3 resizes every image to 448² (min = max pixels 256·28²): 32² patches through the vision tower, then 16² merged
# image tokens + the chat template through the LM.
_QWEN2_VL_448 = (Tower(32, 1024, 1280), Tower(28, 256 + _hpsv3_template_tokens(), 3584))

_WORLD_CLIP_CFG = REWARD_CONFIG


def _world_clip() -> RewardArch:
    cfg = json.loads(_WORLD_CLIP_CFG.read_text(encoding="utf-8"))["model_cfg"]
    vision = cfg["vision_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return RewardArch(
        "world_clip", "open_clip_vit", _open_clip_config(cfg), (Tower(vision["layers"], tokens, vision["width"]),),
        vision["image_size"], f"{_WORLD_CLIP_CFG.relative_to(Path(__file__).parents[1])}",
    )  # fmt: skip


REWARD_ARCHS: dict[str, RewardArch] = {
    arch.name: arch
    for arch in (
        RewardArch("hpsv21", "open_clip_vit", _open_clip("ViT-H-14"), _VIT_H_224, 224,
                   "open_clip ViT-H-14 (xswu/HPSv2: HPS_v2.1_compressed.pt)"),
        RewardArch("hpsv2", "open_clip_vit", _open_clip("ViT-H-14"), _VIT_H_224, 224,
                   "open_clip ViT-H-14 (xswu/HPSv2: HPS_v2_compressed.pt)"),
        RewardArch("pickscore", "hf_clip_vit", _hf_clip(_VIT_H_TEXT, _VIT_H_VISION, 1024), _VIT_H_224, 224,
                   "transformers CLIPModel, yuvalkirstain/PickScore_v1 config.json (CLIP-ViT-H-14)"),
        RewardArch("clipscore", "hf_clip_vit", _hf_clip(_VIT_L_TEXT, _VIT_L_VISION, 768), _VIT_L_224, 224,
                   "transformers CLIPModel, openai/clip-vit-large-patch14 config.json"),
        RewardArch("aesthetic", "hf_clip_vit", _hf_clip(_VIT_L_TEXT, _VIT_L_VISION, 768, _AESTHETIC_MLP),
                   _VIT_L_224, 224, "openai/clip-vit-large-patch14 + the LAION aesthetic MLP (768-1024-128-64-16-1)"),
        RewardArch("hpsv3", "qwen2_vl", _qwen2_vl_7b, _QWEN2_VL_448, 448,
                   "Qwen2-VL-7B-Instruct config.json + <|Reward|> token + ranknet head (MizzenAI/HPSv3)"),
        RewardArch("tiny_color", "none", lambda: 0, (), 0, "weight-free (engine/rewards/color.py)"),
        _world_clip(),
    )
}  # fmt: skip


def reward_graph_bytes(arch: RewardArch, calibration: Calibration, element_bytes: int, batch_size: int) -> int:
    """Saved bytes of the reward's forward with a gradient to its input: ``Σ_towers c_tower × layers·tokens·width
    × E`` (one constant per tower of the family, ``calibration.reward``) + the rest (preprocessing, patch embedding,
    pooling, heads) per pixel of the resized input, ``calibration.reward_input``."""
    if not arch.towers:
        return 0
    constants = calibration.reward.get(arch.family)
    if constants is None or len(constants) < len(arch.towers):
        raise ValueError(
            f"the planner calibration has no reward constants for family {arch.family!r}; run "
            "benchmarks/reward_memory.py to measure them"
        )
    units = sum(c * tower.units for c, tower in zip(constants, arch.towers, strict=False))
    pixels = calibration.reward_input.get(arch.family, 0.0) * 3 * arch.input_px**2 * 4  # preprocessing, heads (fp32)
    return int((units * element_bytes + pixels) * batch_size)


def spec_from_folder(folder: str | Path, kind: str) -> ModelSpec:
    """The architecture of a local diffusers folder: its transformer's and VAE's config.json, its text length."""
    from engine.models.kinds import model_kind

    folder, model = Path(folder), model_kind(kind)

    def config(name: str) -> dict:
        data = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        return {k: v for k, v in data.items() if not k.startswith("_")}

    tokens = model.text_tokens(model.adapter.sequence_length(folder))
    return ModelSpec(
        str(folder), kind, config("transformer"), config("vae"), text_tokens=tokens, cfg_batch=model.cfg_batch
    )

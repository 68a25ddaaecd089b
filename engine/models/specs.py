"""The transformer and VAE architectures of the released checkpoints, and the tiny ones the tests and the embedded
world use: their configs (so shapes are never magic numbers), meta-device builders and exact parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Transformer configs of the released checkpoints (their transformer/config.json), so shapes are never magic numbers.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# FLUX.1-dev's and SD3.5's AutoencoderKL (16 latent channels, scale factor 8, no quant convs).
REAL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# engine/models/tiny.py's FLUX (build_tiny_flux), for calibration and validation.
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[4, 4, 8],
)
TINY_VAE = dict(REAL_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4)


@dataclass(frozen=True)
class ModelSpec:
    """A named architecture: the transformer and VAE configs plus the text length the model is trained with."""

    name: str
    family: str  # "flux" | "sd3"
    transformer: dict
    vae: dict
    text_tokens: int  # FLUX: 512 T5 tokens; SD3: 77 CLIP + 256 T5 = 333
    cfg_batch: int = 1  # SD3 runs true CFG: two transformer batches per velocity

    @property
    def hidden(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    @property
    def blocks(self) -> int:
        return self.transformer["num_layers"] + self.transformer.get("num_single_layers", 0)

    @property
    def latent_channels(self) -> int:
        return self.vae["latent_channels"]

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens: FLUX packs 2×2 latent patches (patch_size 1 after packing); SD3 patchifies by 2."""
        return (height // self.vae_scale // 2) * (width // self.vae_scale // 2)

    def latent_numel(self, height: int, width: int) -> int:
        return self.latent_channels * (height // self.vae_scale) * (width // self.vae_scale)


MODELS = {
    "tiny": ModelSpec("tiny", "flux", TINY_FLUX_TRANSFORMER, TINY_VAE, text_tokens=64),
    "flux-dev": ModelSpec("flux-dev", "flux", FLUX_DEV_TRANSFORMER, REAL_VAE, text_tokens=512),
    "sd35-medium": ModelSpec("sd35-medium", "sd3", SD35_MEDIUM_TRANSFORMER, REAL_VAE, text_tokens=333, cfg_batch=2),
}


def build_transformer(spec: ModelSpec, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32):
    """The spec's diffusers transformer (random weights; on ``meta`` no memory is allocated)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if spec.family == "flux" else SD3Transformer2DModel
    with torch.device(device):
        model = cls(**spec.transformer)
    return model if dtype == torch.float32 else model.to(dtype)


def build_vae(spec: ModelSpec, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    with torch.device(device):
        model = AutoencoderKL(**spec.vae)
    return model if dtype == torch.float32 else model.to(dtype)


_COUNTS: dict = {}


def parameter_counts(spec: ModelSpec, lora_rank: int = 0, lora_targets=("to_q", "to_k", "to_v", "to_out.0")) -> dict:
    """Exact counts from the architecture built on the meta device: transformer, VAE decoder, LoRA parameters.

    LoRA adds ``rank·(in + out)`` per adapted ``nn.Linear`` (``engine.parallelize.apply_lora``'s targets).
    """
    key = (spec.name, lora_rank, tuple(lora_targets))
    if key not in _COUNTS:
        transformer = build_transformer(spec)
        vae = build_vae(spec)
        lora = 0
        if lora_rank:
            for name, module in transformer.named_modules():
                if isinstance(module, nn.Linear) and any(name.endswith(t) for t in lora_targets):
                    lora += lora_rank * (module.in_features + module.out_features)
        _COUNTS[key] = {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "lora": lora,
            "largest_block": max(sum(p.numel() for p in b.parameters()) for b in _blocks(transformer)),
        }
    return _COUNTS[key]


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(transformer, "transformer_blocks", []))
    return blocks + list(getattr(transformer, "single_transformer_blocks", []))

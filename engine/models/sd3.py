"""Stable Diffusion 3 / 3.5 adapter: an MMDiT with true classifier-free guidance.

Prompt encoding, the time grid and decoding call ``StableDiffusion3Pipeline`` code or the scheduler so that a
rollout here equals a pipeline run with the same latents and negative prompt (``tests/unit/test_rollout.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from engine.models.base import (
    Conditioning,
    Seeds,
    check_times,
    decode_latents,
    freeze,
    make_noise,
    module_dtype,
    scheduler_sigmas,
    set_vae_gradient_checkpointing,
)
from engine.models.family import Family, free_text_encoders
from engine.models.loading import ComponentKind, Link

logger = logging.getLogger(__name__)

SD3_COMPONENTS: dict[str, ComponentKind] = {
    "transformer": "model",
    "vae": "model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "text_encoder_3": "model",
    "tokenizer": "tokenizer",
    "tokenizer_2": "tokenizer",
    "tokenizer_3": "tokenizer",
    "scheduler": "scheduler",
}

# The class that loads each component.
SD3_CLASSES: dict[str, type] = {
    "transformer": SD3Transformer2DModel,
    "vae": AutoencoderKL,
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "text_encoder": CLIPTextModelWithProjection,
    "text_encoder_2": CLIPTextModelWithProjection,
    "text_encoder_3": T5EncoderModel,
    "tokenizer": CLIPTokenizer,
    "tokenizer_2": CLIPTokenizer,
    "tokenizer_3": T5TokenizerFast,
}
# Dimensions the components must agree on: T5's width is the context width (the CLIP token embeddings are padded to
# it), the two CLIP projections concatenate into the pooled projection, and the transformer sees the VAE's latents.
SD3_LINKS: tuple[Link, ...] = (
    ("transformer", "joint_attention_dim", (("text_encoder_3", "d_model"),), 1),
    (
        "transformer",
        "pooled_projection_dim",
        (("text_encoder", "projection_dim"), ("text_encoder_2", "projection_dim")),
        1,
    ),
    ("transformer", "in_channels", (("vae", "latent_channels"),), 1),
)
SD3 = Family("SD3", "StableDiffusion3Pipeline", SD3_COMPONENTS, SD3_CLASSES, SD3_LINKS)


class SD3Adapter:
    """SD3-style model: v = v_u + s·(v_c − v_u) with a negative prompt, in the VAE's [B, C, h, w] layout.

    ``cfg_negative_no_grad`` runs the unconditional branch under ``torch.no_grad()``: its activations are not kept
    for backward, halving the transformer's activation memory when training through guided velocities. The
    gradient then flows only through the conditional branch (scaled by s), i.e. it is the gradient of the same
    formula with v_u detached.
    """

    def __init__(
        self,
        *,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: CLIPTextModelWithProjection | None,
        tokenizer: CLIPTokenizer | None,
        text_encoder_2: CLIPTextModelWithProjection | None,
        tokenizer_2: CLIPTokenizer | None,
        text_encoder_3: T5EncoderModel | None,
        tokenizer_3: T5TokenizerFast | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 256,
        cfg_negative_no_grad: bool = False,
        transformer_config=None,
    ) -> None:
        """Wraps loaded components; most callers want ``SD3Adapter.from_pretrained``.

        Args:
            transformer: The trainable SD3Transformer2DModel.
            vae: The autoencoder (frozen here).
            scheduler: A FlowMatchEulerDiscreteScheduler (static shift 3.0 for SD3).
            text_encoder: CLIP-L with projection, frozen here.
            tokenizer: CLIP-L tokenizer.
            text_encoder_2: CLIP-G with projection, frozen here.
            tokenizer_2: CLIP-G tokenizer.
            text_encoder_3: T5 encoder, frozen here.
            tokenizer_3: T5 tokenizer.
            device: Where the modules already are.
            dtype: The dtype the transformer and VAE were loaded in.
            max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
            cfg_negative_no_grad: Default for ``velocity``'s option of the same name.
            transformer_config: The transformer's config when ``transformer`` is None (a text-only adapter).
        """
        self.transformer = transformer
        self.vae = freeze(vae) if vae is not None else None
        self.scheduler = scheduler
        self.text_encoder = freeze(text_encoder) if text_encoder is not None else None
        self.text_encoder_2 = freeze(text_encoder_2) if text_encoder_2 is not None else None
        self.text_encoder_3 = freeze(text_encoder_3) if text_encoder_3 is not None else None
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self.cfg_negative_no_grad = cfg_negative_no_grad
        # Kept from the unwrapped model: a DeepSpeed engine or compiled module swapped in later may not expose it.
        self.transformer_config = transformer.config if transformer is not None else transformer_config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else None
        self.latent_channels = self.transformer_config.in_channels
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    @classmethod
    def check_folder(cls, path: str | Path) -> Path:
        """Checks an SD3 folder whole without loading a weight (``Family.check_folder``)."""
        return SD3.check_folder(path)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_encoder_dtype: torch.dtype | None = None,
        max_sequence_length: int = 256,
        cfg_negative_no_grad: bool = False,
        parts: Collection[str] | None = None,
        transformer: nn.Module | None = None,
    ) -> SD3Adapter:
        """Loads an SD3 / SD3.5 model from a local diffusers folder (never from the hub).

        Args:
            path: A folder holding a StableDiffusion3Pipeline.
            device: Where to put every module.
            dtype: Dtype of the transformer and the VAE.
            text_encoder_dtype: Dtype of the CLIPs and T5; defaults to ``dtype``.
            max_sequence_length: T5 tokens per prompt.
            cfg_negative_no_grad: Run the unconditional CFG branch without gradient by default.
            parts: The components to load (``SD3_COMPONENTS`` names; None = all), as ``FluxAdapter``'s.
            transformer: A transformer built elsewhere (e.g. partitioned by ZeRO-3); not loaded here then.

        Returns:
            The adapter, with VAE and text encoders frozen.

        Raises:
            ModelFolderError: When the folder is missing, incomplete or not a StableDiffusion3Pipeline.
        """
        _, loaded = SD3.load(path, device=device, dtype=dtype, text_encoder_dtype=text_encoder_dtype, parts=parts,
                             transformer=transformer)  # fmt: skip
        return cls(**loaded, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                   cfg_negative_no_grad=cfg_negative_no_grad)  # fmt: skip

    @staticmethod
    def sequence_length(path: str | Path) -> int:
        """T5 tokens per prompt the trainer's adapter uses (``from_pretrained``'s default, the pipeline's 256)."""
        return 256

    # ----------------------------------------------------------------------------------------------- prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        """Encodes prompts and negative prompts through ``StableDiffusion3Pipeline.encode_prompt``.

        Negative embeddings are always produced (from "" when ``negative_prompts`` is None, as the pipeline does),
        so the conditioning serves any guidance scale.

        Args:
            prompts: B prompts.
            negative_prompts: B negative prompts, or None for the empty prompt.

        Returns:
            Conditioning with prompt_embeds / negative_prompt_embeds [B, 77 + L_t5, D_t5] and pooled /
            negative_pooled [B, P_clip_l + P_clip_g].
        """
        if self.text_encoder is None or self.text_encoder_2 is None or self.text_encoder_3 is None:
            raise RuntimeError(
                "SD3Adapter.encode_prompts: the text encoders were freed by free_text_encoders(); encode every "
                "prompt before freeing them, or load the adapter again"
            )
        prompts = list(prompts)
        if negative_prompts is not None:
            negative_prompts = list(negative_prompts)
            if len(negative_prompts) != len(prompts):
                raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        # A text-only pipeline view: it borrows the encoders and holds no transformer.
        pipeline = StableDiffusion3Pipeline(
            transformer=None,
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompts,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            prompt_embeds=prompt_embeds,
            pooled=pooled,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled=negative_pooled,
        )

    def free_text_encoders(self) -> None:
        """Drops both CLIPs, T5 and their tokenizers (after prompts are encoded and cached) to free memory."""
        free_text_encoders(self, "SD3")

    # -------------------------------------------------------------------------------------------- geometry

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.vae_scale_factor * self.transformer_config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"SD3 image size must be divisible by {multiple}, got {height}x{width}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent shape [B, C, H/s, W/s] (s = VAE scale factor, 8 for SD3)."""
        latent_h, latent_w = self._latent_hw(height, width)
        return batch_size, self.latent_channels, latent_h, latent_w

    def time_grid(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The sigmas StableDiffusion3Pipeline uses for ``num_steps`` steps (static shift, or dynamic if set).

        Returns:
            [num_steps + 1] float32 on CPU, from 1 down to exactly 0.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config = self.scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", False):
            _, _, latent_h, latent_w = self.latent_shape(1, height, width)
            patch = self.transformer_config.patch_size
            kwargs["mu"] = calculate_shift(
                (latent_h // patch) * (latent_w // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return scheduler_sigmas(self.scheduler, num_inference_steps=num_steps, **kwargs)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Identity: SD3's model layout is the VAE layout [B, C, h, w] (patching happens inside the model)."""
        return latents

    def unpack_latents(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Identity (see ``pack_latents``); checks that x fits an image of ``height`` × ``width``."""
        expected = self.latent_shape(x.shape[0], height, width)
        if tuple(x.shape) != expected:
            raise ValueError(f"SD3 latents of shape {tuple(x.shape)} do not fit {height}x{width} (want {expected})")
        return x

    def prepare_noise(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator_or_seeds: Seeds,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """x_1 ~ N(0, I) [B, C, H/s, W/s], drawn as StableDiffusion3Pipeline.prepare_latents draws it.

        Args:
            batch_size: B.
            height: Image height in pixels.
            width: Image width in pixels.
            generator_or_seeds: A generator or int for the batch, or one int / generator per sample.
            dtype: Returned dtype.
        """
        return make_noise(self.latent_shape(batch_size, height, width), generator_or_seeds, self.device, dtype)

    # -------------------------------------------------------------------------------------------- velocity

    def _forward(
        self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """One transformer call: x [B, C, h, w], t [B], embeds [B, L, D], pooled [B, P] → v [B, C, h, w]."""
        model_dtype = module_dtype(module, self.dtype)
        return module(
            hidden_states=x.to(model_dtype),
            # The SD3 transformer takes the scheduler's float32 timestep, sigma · num_train_timesteps, as the
            # pipeline passes it (its time embedding casts to the model dtype itself).
            timestep=t.to(device=x.device, dtype=torch.float32) * self.num_train_timesteps,
            encoder_hidden_states=embeds.to(device=x.device, dtype=model_dtype),
            pooled_projections=pooled.to(device=x.device, dtype=model_dtype),
            return_dict=False,
        )[0]

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        *,
        guidance_scale: float,
        transformer: nn.Module | None = None,
        height: int | None = None,
        width: int | None = None,
        cfg_negative_no_grad: bool | None = None,
    ) -> torch.Tensor:
        """Guided velocity v = v_u + s·(v_c − v_u); the conditional branch alone when s <= 1.

        Args:
            x: [B, C, h, w] latents at time t.
            t: [B] per-sample times in [0, 1] (t = 1 noise).
            cond: Conditioning with batch B; needs negative embeddings when guidance_scale > 1.
            guidance_scale: CFG scale s (SD3.5-M uses 4.5, SD3 7.0).
            transformer: Module to call instead of ``self.transformer`` (same keyword interface).
            height: Unused (the layout carries the size); accepted for the adapter interface.
            width: Unused, as ``height``.
            cfg_negative_no_grad: Run the unconditional branch under ``torch.no_grad()``; defaults to the
                adapter's attribute.

        Returns:
            [B, C, h, w] velocity in x's dtype.
        """
        del height, width
        module = transformer if transformer is not None else self.transformer
        check_times(t, x.shape[0])
        if guidance_scale <= 1:
            return self._forward(module, x, t, cond.prompt_embeds, cond.pooled).to(x.dtype)
        if not cond.has_negative:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs negative-prompt embeddings in the conditioning; "
                "encode it with SD3Adapter.encode_prompts"
            )
        no_grad = self.cfg_negative_no_grad if cfg_negative_no_grad is None else cfg_negative_no_grad
        if no_grad:
            v_cond = self._forward(module, x, t, cond.prompt_embeds, cond.pooled)
            with torch.no_grad():
                v_uncond = self._forward(module, x, t, cond.negative_prompt_embeds, cond.negative_pooled)
        else:
            # One batched call [uncond; cond] like the pipeline: one pass over the weights per step.
            v_uncond, v_cond = self._forward(
                module,
                torch.cat([x, x]),
                torch.cat([t, t]),
                torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds.to(cond.negative_prompt_embeds.device)]),
                torch.cat([cond.negative_pooled, cond.pooled.to(cond.negative_pooled.device)]),
            ).chunk(2)
        return (v_uncond + guidance_scale * (v_cond - v_uncond)).to(x.dtype)

    # ---------------------------------------------------------------------------------------------- decode

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Decodes latents ``[B, C, h, w]`` to ``[B, 3, height, width]`` float32 images in [0, 1], differentiably."""
        return decode_latents(self.vae, self.unpack_latents(x, height, width))

    def vae_gradient_checkpointing(self, enabled: bool) -> None:
        """As ``FluxAdapter.vae_gradient_checkpointing``."""
        set_vae_gradient_checkpointing(self.vae, enabled)

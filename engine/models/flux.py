"""FLUX.1 adapter: a guidance-distilled MMDiT on packed 2×2 latent patches.

Everything that must agree with ``diffusers.FluxPipeline`` (prompt encoding, packing, position ids, the shifted
time grid, the timestep scaling, decoding) calls the pipeline's own code or the scheduler, so that a rollout here
equals a pipeline run with the same latents (tested in ``tests/unit/test_rollout.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

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

FLUX_COMPONENTS: dict[str, ComponentKind] = {
    "transformer": "model",
    "vae": "model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "tokenizer": "tokenizer",
    "tokenizer_2": "tokenizer",
    "scheduler": "scheduler",
}

# The class that loads each component.
FLUX_CLASSES: dict[str, type] = {
    "transformer": FluxTransformer2DModel,
    "vae": AutoencoderKL,
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": T5EncoderModel,
    "tokenizer": CLIPTokenizer,
    "tokenizer_2": T5TokenizerFast,
}
# Dimensions the components must agree on: T5's width is the context width, CLIP's pooled output the pooled
# projection's input, and the transformer sees the VAE's latent channels packed 2×2.
FLUX_LINKS: tuple[Link, ...] = (
    ("transformer", "joint_attention_dim", (("text_encoder_2", "d_model"),), 1),
    ("transformer", "pooled_projection_dim", (("text_encoder", "hidden_size"),), 1),
    ("transformer", "in_channels", (("vae", "latent_channels"),), 4),
)
FLUX = Family("FLUX", "FluxPipeline", FLUX_COMPONENTS, FLUX_CLASSES, FLUX_LINKS)


class FluxAdapter:
    """FLUX.1 [dev]-style model: one transformer call per velocity, guidance as an input embedding.

    Latent layout: packed [B, N, C·4] with N = (H / 2s)·(W / 2s) for a VAE with scale factor s (8 for FLUX).
    """

    def __init__(
        self,
        *,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        text_encoder_2: T5EncoderModel | None,
        tokenizer_2: T5TokenizerFast | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
        transformer_config=None,
    ) -> None:
        """Wraps loaded components; most callers want ``FluxAdapter.from_pretrained``.

        Args:
            transformer: The trainable FluxTransformer2DModel.
            vae: The autoencoder (frozen here).
            scheduler: A FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting config.
            text_encoder: CLIP text model (pooled embedding), frozen here; None if prompts are never encoded.
            tokenizer: CLIP tokenizer.
            text_encoder_2: T5 encoder (token embeddings), frozen here.
            tokenizer_2: T5 tokenizer.
            device: Where the modules already are.
            dtype: The dtype the transformer and VAE were loaded in.
            max_sequence_length: T5 tokens per prompt (FluxPipeline's default is 512).
            transformer_config: The transformer's config when ``transformer`` is None (a text-only adapter).
        """
        self.transformer = transformer
        self.vae = freeze(vae) if vae is not None else None
        self.scheduler = scheduler
        self.text_encoder = freeze(text_encoder) if text_encoder is not None else None
        self.text_encoder_2 = freeze(text_encoder_2) if text_encoder_2 is not None else None
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        # Kept from the unwrapped model: a DeepSpeed engine or compiled module swapped in later may not expose it.
        self.transformer_config = transformer.config if transformer is not None else transformer_config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else None
        self.latent_channels = self.transformer_config.in_channels // 4

    @classmethod
    def check_folder(cls, path: str | Path) -> Path:
        """Checks a FLUX folder whole without loading a weight (``Family.check_folder``)."""
        return FLUX.check_folder(path)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_encoder_dtype: torch.dtype | None = None,
        max_sequence_length: int | None = None,
        parts: Collection[str] | None = None,
        transformer: nn.Module | None = None,
    ) -> FluxAdapter:
        """Loads a FLUX model from a local diffusers folder (never from the hub).

        Args:
            path: A folder holding a FluxPipeline (``model_index.json`` and its component subfolders).
            device: Where to put every module.
            dtype: Dtype of the transformer and the VAE.
            text_encoder_dtype: Dtype of CLIP and T5; defaults to ``dtype``.
            max_sequence_length: T5 tokens per prompt; None = the T5 tokenizer's ``model_max_length``, at most 512
                (FLUX.1-dev's tokenizer says 512, FluxPipeline's default; the embedded world's says 12).
            parts: The components to load (``FLUX_COMPONENTS`` names; None = all). A text-only adapter (the
                encoders, tokenizers, scheduler) encodes prompts before the transformer exists; a training adapter
                skips the encoders when the prompts come from the embedding store.
            transformer: A transformer built elsewhere (e.g. partitioned by ZeRO-3); not loaded here then.

        Returns:
            The adapter, with VAE and text encoders frozen.

        Raises:
            ModelFolderError: When the folder is missing, incomplete or not a FluxPipeline.
        """
        folder, loaded = FLUX.load(path, device=device, dtype=dtype, text_encoder_dtype=text_encoder_dtype,
                                   parts=parts, transformer=transformer)  # fmt: skip
        if max_sequence_length is None:
            max_sequence_length = cls.sequence_length(folder)
        return cls(**loaded, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    @staticmethod
    def sequence_length(path: str | Path) -> int:
        """T5 tokens per prompt ``from_pretrained`` uses for this folder: the T5 tokenizer's, at most 512."""
        tokenizer = T5TokenizerFast.from_pretrained(Path(path) / "tokenizer_2", local_files_only=True)
        return min(512, int(tokenizer.model_max_length))

    # ----------------------------------------------------------------------------------------------- prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        """Encodes prompts with CLIP (pooled) and T5 (tokens) through ``FluxPipeline.encode_prompt``.

        Args:
            prompts: B prompts.
            negative_prompts: Must be None: FLUX.1 [dev] is guidance-distilled and takes no negative prompt.

        Returns:
            Conditioning with prompt_embeds [B, L, D_t5], pooled [B, D_clip], text_ids [L, 3].
        """
        if negative_prompts is not None:
            raise ValueError(
                "FluxAdapter takes no negative prompts: FLUX.1 is guidance-distilled (guidance is an input, "
                "one transformer call per step); pass negative_prompts=None"
            )
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError(
                "FluxAdapter.encode_prompts: the text encoders were freed by free_text_encoders(); encode every "
                "prompt before freeing them, or load the adapter again"
            )
        # A text-only pipeline view: it borrows the encoders and tokenizers, and holds no transformer so the
        # trainable module is never referenced from here.
        pipeline = FluxPipeline(
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=None,
        )
        prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning(prompt_embeds=prompt_embeds, pooled=pooled, text_ids=text_ids)

    def free_text_encoders(self) -> None:
        """Drops CLIP, T5 and their tokenizers (after prompts are encoded and cached) to free their memory."""
        free_text_encoders(self, "FLUX")

    # -------------------------------------------------------------------------------------------- geometry

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Unpacked latent height and width for an image size; FLUX needs both divisible by 2·(VAE factor)."""
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"FLUX image size must be divisible by {multiple}, got {height}x{width}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int]:
        """Packed latent shape [B, (h/2)(w/2), C·4] for images of ``height`` × ``width`` pixels."""
        latent_h, latent_w = self._latent_hw(height, width)
        return batch_size, (latent_h // 2) * (latent_w // 2), self.latent_channels * 4

    def time_grid(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The sigmas FluxPipeline uses for ``num_steps`` steps at this resolution.

        FLUX shifts its schedule with the image token count: mu = calculate_shift(N) from the scheduler config,
        applied by the scheduler to linspace(1, 1/T, T), as ``FluxPipeline.__call__`` does.

        Returns:
            [num_steps + 1] float32 on CPU, from 1 down to exactly 0.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config = self.scheduler.config
        image_seq_len = self.latent_shape(1, height, width)[1]
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if config.get("use_flow_sigmas", False):
            return scheduler_sigmas(self.scheduler, num_inference_steps=num_steps, mu=mu)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        return scheduler_sigmas(self.scheduler, sigmas=sigmas, mu=mu)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] VAE-layout latents → [B, (h/2)(w/2), C·4] packed 2×2 patches (FluxPipeline's packing)."""
        batch_size, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch_size, channels, height, width)

    def unpack_latents(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, N, C·4] packed latents of an image ``height`` × ``width`` → [B, C, h, w]."""
        return FluxPipeline._unpack_latents(x, height, width, self.vae_scale_factor)

    def prepare_noise(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator_or_seeds: Seeds,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """x_1 ~ N(0, I) in the packed layout, drawn as FluxPipeline.prepare_latents draws it.

        Args:
            batch_size: B.
            height: Image height in pixels.
            width: Image width in pixels.
            generator_or_seeds: A generator or int for the batch, or one int / generator per sample (per-sample
                seeds make each sample reproducible whatever batch it is drawn in).
            dtype: Returned dtype.

        Returns:
            [B, (h/2)(w/2), C·4] on the adapter's device.
        """
        latent_h, latent_w = self._latent_hw(height, width)
        noise = make_noise(
            (batch_size, self.latent_channels, latent_h, latent_w), generator_or_seeds, self.device, dtype
        )
        return self.pack_latents(noise)

    def _grid_hw(self, num_tokens: int, height: int | None, width: int | None) -> tuple[int, int]:
        """Packed token grid (rows, cols); square unless the image size says otherwise."""
        if height is not None and width is not None:
            latent_h, latent_w = self._latent_hw(height, width)
            rows, cols = latent_h // 2, latent_w // 2
        else:
            rows = cols = math.isqrt(num_tokens)
        if rows * cols != num_tokens:
            raise ValueError(
                f"cannot place {num_tokens} FLUX tokens on a grid; pass height= and width= for non-square images"
            )
        return rows, cols

    # -------------------------------------------------------------------------------------------- velocity

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
    ) -> torch.Tensor:
        """v(x_t, t) ≈ ε − x_data, one transformer call with the guidance scale as an input.

        Args:
            x: [B, N, C·4] packed latents at time t.
            t: [B] per-sample times in [0, 1] (t = 1 noise).
            cond: Conditioning with batch B.
            guidance_scale: FLUX's distilled guidance (3.5 for FLUX.1 [dev]).
            transformer: Module to call instead of ``self.transformer`` (same keyword interface).
            height: Image height in pixels; only needed for non-square images.
            width: Image width in pixels; only needed for non-square images.

        Returns:
            [B, N, C·4] velocity in x's dtype.
        """
        module = transformer if transformer is not None else self.transformer
        batch_size, num_tokens, _ = x.shape
        check_times(t, batch_size)
        rows, cols = self._grid_hw(num_tokens, height, width)
        model_dtype = module_dtype(module, self.dtype)
        # Position ids are small integers: float32 holds them exactly whatever the model dtype.
        img_ids = FluxPipeline._prepare_latent_image_ids(batch_size, rows, cols, x.device, torch.float32)
        txt_ids = cond.text_ids.to(device=x.device, dtype=torch.float32)
        guidance = None
        if self.transformer_config.guidance_embeds:
            guidance = torch.full((batch_size,), guidance_scale, device=x.device, dtype=torch.float32)
        # FluxPipeline passes its timestep (sigma · 1000, float32) cast to the latents' dtype, then divided by 1000
        # in that dtype; the transformer multiplies by 1000 inside. Rounding as it does matters in bf16: bf16(sigma)
        # and bf16(bf16(sigma · 1000) / 1000) can be a bf16 step apart (7 of 28 steps at 1024²).
        timestep = (t.to(device=x.device, dtype=torch.float32) * 1000).to(model_dtype) / 1000
        out = module(
            hidden_states=x.to(model_dtype),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled.to(device=x.device, dtype=model_dtype),
            encoder_hidden_states=cond.prompt_embeds.to(device=x.device, dtype=model_dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    # ---------------------------------------------------------------------------------------------- decode

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Decodes packed latents to images, differentiably (no ``no_grad`` inside).

        Args:
            x: [B, N, C·4] packed x_0.
            height: Image height in pixels.
            width: Image width in pixels.

        Returns:
            [B, 3, height, width] float32 images in [0, 1].
        """
        return decode_latents(self.vae, self.unpack_latents(x, height, width))

    def vae_gradient_checkpointing(self, enabled: bool) -> None:
        """Recomputes VAE block activations in backward (saves the decode graph's memory) when enabled."""
        set_vae_gradient_checkpointing(self.vae, enabled)

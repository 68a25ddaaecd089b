"""The model adapter interface and the small pieces FLUX and SD3 share.

An adapter wraps one text-to-image flow model loaded from a local diffusers folder and speaks the engine's
convention (Lipman et al. flow matching, as diffusers' FlowMatchEulerDiscreteScheduler does):

    x_t = t·ε + (1 − t)·x_data        t = 1 is noise, t = 0 is data
    v(x_t, t) ≈ ε − x_data            the model's output
    x_{t'} = x_t + (t' − t)·v         one Euler step

Latents are always in the model's own layout ("packed": FLUX [B, N, C·4], SD3 [B, C, h, w]); only ``decode``
and the pack/unpack helpers see the VAE's [B, C, h, w] layout.

Shared behaviour lives in plain functions here rather than a base class: the adapters compose them.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

logger = logging.getLogger(__name__)

Seeds = torch.Generator | Sequence[torch.Generator] | Sequence[int] | int


@dataclass
class Conditioning:
    """Encoded prompts for a batch; every field but ``text_ids`` has the batch on dim 0.

    Attributes:
        prompt_embeds: [B, L, D] token embeddings (FLUX: T5; SD3: CLIP-L ⊕ CLIP-G padded, then T5).
        pooled: [B, P] pooled embeddings (FLUX: CLIP-L pooler; SD3: CLIP-L ⊕ CLIP-G projections).
        text_ids: [L, 3] FLUX rotary position ids of the text tokens, shared by the batch; None for SD3.
        negative_prompt_embeds: [B, L, D] negative-prompt embeddings for classifier-free guidance, or None.
        negative_pooled: [B, P] pooled negative-prompt embeddings, or None.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    # Fields that are not batched: copied, never sliced or repeated.
    _SHARED = ("text_ids",)

    def __post_init__(self) -> None:
        batch_size = self.prompt_embeds.shape[0]
        for name, tensor in self._batched():
            if tensor.shape[0] != batch_size:
                raise ValueError(
                    f"Conditioning.{name} has batch {tensor.shape[0]} but prompt_embeds has {batch_size}; "
                    "build all fields from the same prompt list"
                )
        if (self.negative_prompt_embeds is None) != (self.negative_pooled is None):
            raise ValueError("Conditioning needs both negative_prompt_embeds and negative_pooled, or neither")

    def _batched(self) -> list[tuple[str, torch.Tensor]]:
        return [
            (f.name, getattr(self, f.name))
            for f in fields(self)
            if f.name not in self._SHARED and getattr(self, f.name) is not None
        ]

    @property
    def batch_size(self) -> int:
        """Number of prompts B."""
        return self.prompt_embeds.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def has_negative(self) -> bool:
        """Whether negative-prompt embeddings (for true classifier-free guidance) are present."""
        return self.negative_prompt_embeds is not None

    def _map(self, batched_fn, shared_fn) -> Conditioning:
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                changes[f.name] = shared_fn(value) if f.name in self._SHARED else batched_fn(value)
        return replace(self, **changes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moves every tensor to ``device`` and, when given, casts floating tensors to ``dtype``."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            return tensor.to(device=device, dtype=target)

        return self._map(move, move)

    def index(self, idx: int | slice | torch.Tensor | Sequence[int]) -> Conditioning:
        """Selects samples along the batch; an int keeps the batch dimension (B = 1)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        elif not isinstance(idx, slice | torch.Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)

        def select(tensor: torch.Tensor) -> torch.Tensor:
            if isinstance(idx, torch.Tensor):
                return tensor.index_select(0, idx.to(tensor.device))
            return tensor[idx]

        return self._map(select, lambda tensor: tensor)

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Repeats each sample ``repeats`` times in place (prompt a, a, b, b, ...), e.g. several seeds per prompt."""
        return self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0), lambda tensor: tensor)

    @classmethod
    def cat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenates conditionings along the batch; shared fields are taken from the first part."""
        if not parts:
            raise ValueError("Conditioning.cat needs at least one part")
        first = parts[0]
        changes = {}
        for f in fields(first):
            values = [getattr(part, f.name) for part in parts]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise ValueError(f"Conditioning.cat: field {f.name} is set in some parts and None in others")
            changes[f.name] = values[0] if f.name in cls._SHARED else torch.cat(values, dim=0)
        return replace(first, **changes)


@runtime_checkable
class FlowModelAdapter(Protocol):
    """A text-to-image flow model seen through the engine's convention (see the module docstring).

    Attributes:
        transformer: The trainable velocity network. A caller may replace it with a wrapped module (a DeepSpeed
            engine, a compiled module) that takes the same keyword arguments; ``velocity`` calls whatever is here.
        vae: The frozen autoencoder.
        scheduler: The frozen scheduler whose sigmas define the time grid.
        device: Where the adapter runs its modules.
        dtype: The dtype the transformer and VAE were loaded in.
    """

    transformer: nn.Module
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning: ...

    def free_text_encoders(self) -> None: ...

    def time_grid(self, num_steps: int, height: int, width: int) -> torch.Tensor: ...

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]: ...

    def prepare_noise(
        self, batch_size: int, height: int, width: int, generator_or_seeds: Seeds, *, dtype: torch.dtype = ...
    ) -> torch.Tensor: ...

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def unpack_latents(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor: ...

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
    ) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor: ...

    def vae_gradient_checkpointing(self, enabled: bool) -> None: ...


def freeze(module: nn.Module) -> nn.Module:
    """Puts a frozen model (VAE, text encoder) in eval mode without gradients; returns it."""
    module.requires_grad_(False)
    return module.eval()


def module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of the module's first floating parameter (a wrapper's parameters count), else ``default``."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return default


def check_times(t: torch.Tensor, batch_size: int) -> None:
    """Checks that ``t`` holds one time per sample: a 1-D tensor [B]."""
    if t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(f"t must be a 1-D tensor of per-sample times [B={batch_size}], got shape {tuple(t.shape)}")


def make_noise(
    shape: tuple[int, ...], generator_or_seeds: Seeds, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (batch first), drawn exactly as diffusers' pipelines draw it.

    A list of ints gives one CPU generator per sample, so sample b's noise depends only on seed b, not on the
    batch it travels in; CPU generators also make the noise identical on every device.

    Args:
        shape: [B, ...] the unpacked latent shape.
        generator_or_seeds: One generator or int seed for the whole batch, or one generator / int per sample.
        device: Where the noise is returned.
        dtype: The returned dtype (the draw itself is float32 so the values do not depend on it).

    Returns:
        Noise of ``shape`` on ``device`` in ``dtype``.
    """
    batch_size = shape[0]
    if isinstance(generator_or_seeds, int):
        generator = torch.Generator("cpu").manual_seed(generator_or_seeds)
    elif isinstance(generator_or_seeds, torch.Generator):
        generator = generator_or_seeds
    else:
        items = list(generator_or_seeds)
        if len(items) != batch_size:
            raise ValueError(f"got {len(items)} seeds/generators for a batch of {batch_size}; give one per sample")
        generator = [
            torch.Generator("cpu").manual_seed(int(s)) if not isinstance(s, torch.Generator) else s for s in items
        ]
    noise = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
    return noise.to(dtype)


def scheduler_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, **set_timesteps_kwargs) -> torch.Tensor:
    """The sigmas (times) a fresh copy of ``scheduler`` produces for ``set_timesteps(**kwargs)``.

    A copy is built from the config so that the adapter's scheduler keeps no step state from this call.

    Returns:
        [T + 1] float32 on CPU, strictly decreasing from 1 to exactly 0.
    """
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    fresh.set_timesteps(device="cpu", **set_timesteps_kwargs)
    sigmas = fresh.sigmas.detach().to(device="cpu", dtype=torch.float32).clone()
    if sigmas[-1].item() != 0.0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(
            f"scheduler config gives sigmas {sigmas.tolist()} which do not decrease strictly to 0; "
            "the engine needs a flow-matching Euler schedule without invert_sigmas"
        )
    return sigmas


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decodes model-space latents to images in [0, 1], differentiably, as the diffusers pipelines do.

    Args:
        vae: The autoencoder; its config's scaling and shift factors are undone first.
        latents: [B, C, h, w] latents in the VAE layout (unpacked), as the denoiser produces them.

    Returns:
        [B, 3, H, W] float32 images in [0, 1] (the pipeline's ``(x / 2 + 0.5).clamp(0, 1)`` post-processing).
    """
    vae_dtype = module_dtype(vae, latents.dtype)
    shift_factor = vae.config.get("shift_factor", None) or 0.0
    latents = latents.to(vae_dtype) / vae.config.scaling_factor + shift_factor
    images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def set_vae_gradient_checkpointing(vae: AutoencoderKL, enabled: bool) -> None:
    """Turns diffusers' gradient checkpointing of the VAE encoder/decoder blocks on or off."""
    if enabled:
        vae.enable_gradient_checkpointing()
    else:
        vae.disable_gradient_checkpointing()


def release_memory() -> None:
    """Returns freed host and device memory after large modules were dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` dtype keyword for the installed transformers (``dtype`` since 4.56)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}

"""The model kinds the engine trains, in one registry: everything outside ``engine/models/`` asks here, by
``model.kind``, instead of branching on the kind's name.

Adding a kind (another diffusers flow transformer) means an adapter in ``engine/models/`` and one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

from engine.models.flux import FluxAdapter
from engine.models.sd3 import SD3Adapter


@dataclass(frozen=True)
class ModelKind:
    """One kind of model: its adapter, the diffusers classes of its pipeline and transformer, and its quirks."""

    name: str
    adapter: type  # FluxAdapter / SD3Adapter: loading, prompts, velocity, decode
    pipeline: type  # the diffusers pipeline an export is loadable with
    transformer: type  # the class built partitioned under ZeRO-3
    text_parts: tuple[str, ...]  # what the text phase loads (encoders, tokenizers, scheduler)
    negative_prompt: bool  # true CFG with a negative prompt (SD3) vs embedded guidance (FLUX)
    planner_spec: str  # engine.models.specs.MODELS entry of the released model
    clip_tokens: int  # CLIP tokens the transformer sees beside T5's (SD3 concatenates 77)

    def text_tokens(self, t5_tokens: int) -> int:
        """Text tokens per prompt the transformer attends to."""
        return self.clip_tokens + t5_tokens

    @property
    def cfg_batch(self) -> int:
        """Transformer batches per velocity call: two under true CFG."""
        return 2 if self.negative_prompt else 1


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind(
            "flux", FluxAdapter, FluxPipeline, FluxTransformer2DModel,
            ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
            negative_prompt=False, planner_spec="flux-dev", clip_tokens=0,
        ),
        ModelKind(
            "sd3", SD3Adapter, StableDiffusion3Pipeline, SD3Transformer2DModel,
            ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
             "scheduler"),
            negative_prompt=True, planner_spec="sd35-medium", clip_tokens=77,
        ),
    )
}  # fmt: skip


def model_kind(name: str) -> ModelKind:
    """The registered kind ``name`` (``model.kind``)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"model.kind={name!r} is unknown; choose one of {sorted(KINDS)}") from None

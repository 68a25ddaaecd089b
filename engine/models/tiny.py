"""Tiny random FLUX and SD3 pipelines, saved as real diffusers folders: the embedded default model and test fixtures.

The sizes follow diffusers' own pipeline tests (``get_dummy_components``) but keep the real layouts: a VAE with
four blocks (scale factor 8, so 32×32 pixels are 4×4 latents), 4 latent channels, FLUX's dynamic-shift scheduler
and SD3's static shift 3.0, FLUX guidance embeddings, SD3.5's RMS QK-norm. Tokenizers are built from tiny local
vocabularies (a byte-level BPE vocab.json / merges.txt for CLIP, a sentencepiece model trained here for T5)
because the hub's tiny test tokenizers cannot be fetched.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from engine.models.loading import strip_machine_paths
from engine.models.specs import TINY_FLUX_TRANSFORMER

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4

# Sentences that seed the tiny T5 vocabulary; test prompts are drawn from the same words.
_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table",
    "the quick brown fox jumps over the lazy dog",
    "a watercolor painting of a city at night",
    "two dogs playing in the snow",
]
_CLIP_MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o f</w>", "a n</w>", "o n</w>", "d o", "do g</w>"]


def _clip_tokenizer(workdir: Path) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer from a ~520-entry vocab.json / merges.txt written to ``workdir``."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in _CLIP_MERGES]
    # Real CLIP puts its two special tokens last; the pooled output then sits at the argmax-id (EOS) position.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    source = workdir / "clip_vocab"
    source.mkdir(parents=True, exist_ok=True)
    (source / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}), encoding="utf-8")
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_CLIP_MERGES) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(source, model_max_length=77)


def _t5_tokenizer(
    workdir: Path,
    corpus: Sequence[str] = _CORPUS,
    vocab_size: int = 64,
    model_max_length: int = 512,
    model_type: str = "unigram",
) -> T5TokenizerFast:
    """A unigram T5 tokenizer from a sentencepiece model trained on ``corpus`` into ``workdir``.

    ``model_max_length`` is saved with the tokenizer; ``FluxAdapter`` pads T5 prompts to it (at most 512).
    """
    import sentencepiece

    source = workdir / "t5_vocab"
    source.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 4),
        model_prefix=str(source / "spiece"),
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=1.0,
        # T5's special ids: <pad>=0, </s>=1, <unk>=2, no <s>.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return T5TokenizerFast.from_pretrained(source, extra_ids=0, model_max_length=model_max_length)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
    block_out_channels: Sequence[int] = (8, 8, 8, 8),
    norm_num_groups: int = 4,
    mid_block_add_attention: bool = True,
) -> AutoencoderKL:
    """A small AutoencoderKL; the default four blocks give scale factor 8 as in FLUX / SD3; no quant convs, as both."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=list(block_out_channels),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=norm_num_groups,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        mid_block_add_attention=mid_block_add_attention,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1 [dev]'s scheduler config: resolution-dependent exponential shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# Mid-size FLUX architecture for start-up measurements on CPU: 5 double + 12 single blocks, 10 heads × 64
# (147M parameters, 560 MiB in fp32), with the tiny encoders and VAE. Large enough that fixed start-up costs
# (measured: ~65 MiB for DeepSpeed's engine and comm set-up, ~25 MiB left by the text phase, ~10 MiB for the VAE)
# do not decide bounds stated relative to the model.
MID_FLUX_TRANSFORMER = dict(
    num_layers=5, num_single_layers=12, attention_head_dim=64, num_attention_heads=10, axes_dims_rope=[16, 24, 24]
)
# Tiny encoders with a T5 width of 128 at 512 tokens: 256 KiB of fp32 embedding per prompt (5,000 = 1.3 GB).
WIDE_T5_TRANSFORMER = dict(joint_attention_dim=128)


def build_tiny_flux(folder: str | Path, seed: int = 0, transformer: dict | None = None) -> Path:
    """Writes a tiny random FluxPipeline to ``folder`` with ``save_pretrained``; returns the folder.

    Transformer: 1 double + 1 single block, 2 heads × 16, guidance embeddings, in_channels 16 (4 latent × 2×2);
    ``transformer`` overrides entries of that config (a mid-size FLUX architecture for start-up measurements;
    ``joint_attention_dim``/``pooled_projection_dim`` also size T5/CLIP).
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _clip_tokenizer(Path(scratch))
        tokenizer_2 = _t5_tokenizer(Path(scratch))
    # One config for the builder and the memory planner's "tiny" rows (engine/models/specs.py).
    config = {**TINY_FLUX_TRANSFORMER, **(transformer or {})}
    clip_dim, t5_dim = config["pooled_projection_dim"], config["joint_attention_dim"]
    text_encoder = CLIPTextModel(_clip_config(tokenizer, clip_dim))
    text_encoder_2 = _t5_encoder(tokenizer_2, t5_dim)
    transformer = FluxTransformer2DModel(**config)
    scheduler = flux_scheduler()
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    strip_machine_paths(folder)
    logger.debug("tiny FLUX pipeline written to %s", folder)
    return folder


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random StableDiffusion3Pipeline to ``folder`` with ``save_pretrained``; returns the folder.

    Transformer: 2 joint blocks, 4 heads × 8, patch 2, RMS QK-norm (SD3.5); CLIP-L/G stand-ins of width 16 and 24
    (pooled 40), T5 width 48 (the concatenated CLIP token embeddings, 40 wide, are zero-padded to it as SD3 pads
    768 + 1280 to T5's 4096).
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _clip_tokenizer(Path(scratch))
        tokenizer_3 = _t5_tokenizer(Path(scratch))
    clip_l_dim, clip_g_dim, t5_dim = 16, 24, 48
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, clip_l_dim))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, clip_g_dim))
    text_encoder_3 = _t5_encoder(tokenizer_3, t5_dim)
    transformer = SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,
        pooled_projection_dim=clip_l_dim + clip_g_dim,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(folder)
    logger.debug("tiny SD3 pipeline written to %s", folder)
    return folder

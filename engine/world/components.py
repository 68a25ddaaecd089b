"""The embedded world's components as ``engine.world.build`` creates them: the VAE, the FLUX transformer (and a
deeper copy of a trained one, ``grow``) and the frozen random text encoders, with a probe of how much word order
their features keep (``t5_word_order``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.world.scenes import SHAPES, all_prompts
from engine.world.training import T5_MAX_LENGTH, TEXT_DIM


def world_vae():
    from engine.models.tiny import _vae

    # Two blocks: scale factor 2 (32×32 pixels → 16×16 latents); scaling/shift are set after training.
    return _vae(block_out_channels=(16, 32), norm_num_groups=8, mid_block_add_attention=False)


def world_transformer(double_blocks: int = 2, single_blocks: int = 2):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    )


def grow(transformer, double_blocks: int, single_blocks: int):
    """A deeper copy of ``transformer`` that computes the same function: its blocks keep their weights and the new
    ones, appended to each stack, start as identities.

    Every FLUX block adds its attention and MLP outputs to the residual stream through gates that its adaptive norm
    computes from the time embedding (adaLN-Zero, as DiT initialises every block); zeroing that norm's projection
    zeroes the gates, so a new block passes its input through unchanged until training opens them.
    """
    config = transformer.config
    if double_blocks < config.num_layers or single_blocks < config.num_single_layers:
        raise ValueError(
            f"cannot grow a {config.num_layers}+{config.num_single_layers}-block transformer to "
            f"{double_blocks}+{single_blocks} blocks: growing only adds blocks"
        )
    grown = world_transformer(double_blocks, single_blocks)
    _, unexpected = grown.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"cannot grow this transformer: {len(unexpected)} weights fit no block of the world's, e.g. "
                         f"{unexpected[0]}")  # fmt: skip
    with torch.no_grad():
        for block in grown.transformer_blocks[config.num_layers :]:
            for norm in (block.norm1, block.norm1_context):
                norm.linear.weight.zero_()
                norm.linear.bias.zero_()
        for block in grown.single_transformer_blocks[config.num_single_layers :]:
            block.norm.linear.weight.zero_()
            block.norm.linear.bias.zero_()
    return grown


def world_captions() -> list[str]:
    return sorted({p.text for prompts in all_prompts().values() for p in prompts})


def text_components(workdir: Path, seed: int, order_bias: float = 1.0):
    """The frozen text encoders, random from ``seed``; ``order_bias`` scales T5's relative-position attention bias
    (see ``t5_word_order``)."""
    from transformers import CLIPTextModel

    from engine.models.tiny import _clip_config, _clip_tokenizer, _t5_encoder, _t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(workdir)
    tokenizer_2 = _t5_tokenizer(
        workdir, world_captions(), vocab_size=32, model_max_length=T5_MAX_LENGTH, model_type="word"
    )
    text_encoder = CLIPTextModel(_clip_config(tokenizer, TEXT_DIM)).eval()
    text_encoder_2 = _t5_encoder(tokenizer_2, TEXT_DIM).eval()
    with torch.no_grad():
        for block in text_encoder_2.encoder.block:
            attention = block.layer[0].SelfAttention
            if attention.has_relative_attention_bias:
                attention.relative_attention_bias.weight.mul_(order_bias)
    return tokenizer, tokenizer_2, text_encoder, text_encoder_2


def t5_word_order(text_encoder_2, tokenizer_2, seed: int = 0, steps: int = 1500) -> float:
    """How well T5's output tells a position caption's two objects apart by place: the held-out accuracy of a linear
    probe that reads, from a shape noun's feature alone, whether it names the first object or the second
    ("a red circle to the left of a blue square": circle first, square second). A transformer conditioned on
    these features can draw "A left of B" only if it can tell A from B; 0.5 is chance."""
    captions = [p.text for p in all_prompts()["position"]]
    ids = tokenizer_2(captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        features = text_encoder_2(ids)[0]
    nouns = set(SHAPES)
    rows, labels = [], []
    for n, tokens in enumerate(tokenizer_2.convert_ids_to_tokens(row) for row in ids.tolist()):
        places = [i for i, token in enumerate(tokens) if token.strip("▁") in nouns]
        for label, i in enumerate(places[:2]):
            rows.append(features[n, i])
            labels.append(float(label))
    x, y = torch.stack(rows), torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)) :]
    x = (x - x[train].mean(0)) / x[train].std(0)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(x[train] @ weight + bias, y[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[test] @ weight + bias > 0).float() == y[test]).float().mean())

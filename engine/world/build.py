"""Builds the embedded world's weights, seeded and timed: a tiny VAE, a tiny FLUX transformer pretrained with
rectified flow on the scenes, and a tiny open_clip CLIP reward trained contrastively on them.

    python -m engine.world.build vae      # ~6 min on 2 CPU cores
    python -m engine.world.build model    # ~13 min: text encoders + transformer, 2600 steps (needs the VAE)
    python -m engine.world.build model --resume --steps 3400   # ~20 min: run 4 times (rounds 2–5)
    python -m engine.world.build model --resume --blocks 3 3 --steps 3400   # grow to 3+3 blocks, then a round
    python -m engine.world.build reward   # ~5 min: the CLIP reward
    python -m engine.world.build all

Each stage writes into a temporary folder and moves it into place when it finishes (a crash leaves the committed
weights untouched) and records its settings, wall time, device, versions and commit in ``TRAINING.json``.

**Model** (``assets/model``, a ``FluxPipeline`` folder loaded by ``FluxAdapter.from_pretrained`` like FLUX.1-dev):
- VAE: ``AutoencoderKL`` with two blocks (scale factor 2: 32×32 pixels → 16×16×4 latents → 8×8 = 64 packed
  tokens), trained for reconstruction (L1 + L2 + 1e-6·KL); ``scaling_factor``/``shift_factor`` set from its latent
  statistics as FLUX's are.
- Text: a frozen, randomly initialised CLIP text model (character-level byte BPE, pooled 32-d) and T5 encoder
  (a word-level sentencepiece vocabulary of the world's 26 words, 12 tokens a prompt, 32-d). Random frozen encoders
  still give every word and position a distinct code; the transformer learns to read it.
- Transformer: ``FluxTransformer2DModel`` with 2 double-stream + 2 single-stream blocks, 4 heads × 32, no guidance
  embedding (it is not guidance-distilled), FLUX's dynamic-shift scheduler (``--blocks`` sets other depths; with
  ``--resume`` it grows the saved model, its new blocks starting as identities). Trained with the rectified-flow loss
  ‖v(x_t, t) − (ε − x_0)‖² at logit-normal times shifted as the sampler shifts them, on freshly rendered scenes
  from every prompt of the world (categories drawn uniformly), through the adapter's own ``velocity``; the saved
  weights are an EMA.

**Reward** (``assets/reward``, loaded by the HPS open_clip loader): an open_clip CLIP (ViT 32 px, patch 4;
text transformer of width 48 on open_clip's own BPE tokenizer), trained with CLIP's symmetric contrastive loss plus
hard negative captions per image (the mirrored relation, swapped colours, a wrong count, a wrong colour or
shape), so it scores composition, not only content. Score: cosine, as HPSv2's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.models.loading import strip_machine_paths
from engine.world import build_reward
from engine.world.components import grow, t5_word_order, text_components, world_captions, world_transformer, world_vae
from engine.world.paths import ASSETS
from engine.world.scenes import (
    sample_dataset,
)
from engine.world.training import (
    IMAGE_SIZE,
    T5_MAX_LENGTH,
    cosine_lr,
    loss_curve,
    record_stage,
    replace_folder,
    to_pixels,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- VAE


def train_vae(
    out: Path, steps: int = 3000, batch: int = 32, seed: int = 0, lr: float = 2e-3, num_images: int = 20_000
) -> dict:
    """Trains the world VAE on rendered scenes and saves it to ``out/vae`` (the other components stay)."""
    from engine.world.judge import evaluate

    torch.manual_seed(seed)
    vae = world_vae()
    images, _ = sample_dataset(num_images, seed=seed + 101, size=IMAGE_SIZE)
    pixels = to_pixels(images)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    losses = []
    for step in (bar := tqdm(range(steps), desc="vae", unit="step")):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 100)
        x = pixels[torch.randint(len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    seconds = time.time() - start
    vae.eval()
    # FLUX's convention: model latents = (z − shift) · scale, with z the posterior mean.
    held_images, held_prompts = sample_dataset(600, seed=seed + 202, size=IMAGE_SIZE)
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latent_dist.mean for c in to_pixels(held_images).split(100)])
        shift, scale = z.mean().item(), 1.0 / z.std().item()
        recon = torch.cat([vae.decode(c).sample for c in z.split(100)])
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    judged = evaluate((recon / 2 + 0.5).clamp(0, 1), held_prompts)
    metrics = {
        "final_loss": float(np.mean(losses[-50:])),
        "recon_l1_pixels_0_255": float((recon - to_pixels(held_images)).abs().mean() * 127.5),
        "judge_on_reconstructions": {"overall": judged.overall, **judged.per_category},
        "shift_factor": round(shift, 4),
        "scaling_factor": round(scale, 4),
    }
    tmp = out / ".vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    strip_machine_paths(tmp)
    settings = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "images": num_images}
    record_stage(tmp, "vae", settings, seconds, metrics)
    out.mkdir(parents=True, exist_ok=True)
    replace_folder(tmp, out / "vae")
    logger.info("VAE saved to %s: %s", out / "vae", metrics)
    return metrics


# -------------------------------------------------------------------------------------------------- transformer


def pretrain_model(
    out: Path,
    steps: int = 2600,
    batch: int = 64,
    seed: int = 0,
    lr: float = 7e-4,
    num_images: int = 60_000,
    ema_decay: float = 0.998,
    eval_per_category: int = 20,
    resume: bool = False,
    blocks: tuple[int, int] | None = None,
    t5_order_bias: float | None = None,
    category_weights: dict[str, float] | None = None,
) -> dict:
    """Pretrains the world transformer on VAE latents of rendered scenes; writes the whole pipeline to ``out``.

    Needs ``out/vae`` (``train_vae``). The text encoders are built here from ``seed`` and frozen.
    ``resume``: continue from the transformer already in ``out`` (a second round: fresh scenes from a round-specific
    seed, a new warm-up and cosine schedule); ``TRAINING.json`` keeps every round's record.
    ``blocks``: (double, single) blocks. From scratch, the transformer's depth; with ``resume``, the depth to grow the
    saved transformer to before the round (``grow``: the new blocks start as identities).
    ``t5_order_bias``: the scale of T5's random relative-position bias (``text_components``); None keeps the last
    round's (1.0 from scratch). Changing it on ``resume`` changes the text features the transformer reads.
    ``category_weights``: how often each category's scenes are drawn, relative to 1 (``sample_dataset``).
    """
    from diffusers import AutoencoderKL, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from engine.models.flux import FluxAdapter
    from engine.models.tiny import flux_scheduler

    if not (out / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{out / 'vae'} holds no VAE; run `python -m engine.world.build vae` first")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    rounds: list[dict] = []
    if resume:
        rounds = json.loads((out / "TRAINING.json").read_text(encoding="utf-8")).get("rounds", [])
    if t5_order_bias is None:
        t5_order_bias = rounds[-1]["settings"].get("t5_order_bias", 1.0) if rounds else 1.0
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, tokenizer_2, text_encoder, text_encoder_2 = text_components(Path(scratch), seed, t5_order_bias)
    word_order = t5_word_order(text_encoder_2, tokenizer_2)
    logger.info("T5 relative-position bias x%g: a noun's place read from its feature %.0f %% of the time",
                t5_order_bias, 100 * word_order)  # fmt: skip
    torch.manual_seed(seed)
    transformer = world_transformer(*(blocks or (2, 2)))
    if resume:
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(out / "transformer")
        if blocks is not None and blocks != (transformer.config.num_layers, transformer.config.num_single_layers):
            torch.manual_seed(seed + len(rounds))
            transformer = grow(transformer, *blocks)
    data_seed = seed + 303 + 1000 * len(rounds)
    adapter = FluxAdapter(
        transformer=transformer,
        vae=vae,
        scheduler=flux_scheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        max_sequence_length=T5_MAX_LENGTH,
    )
    captions = world_captions()
    index = {text: i for i, text in enumerate(captions)}
    cond = adapter.encode_prompts(captions)

    logger.info("rendering %d scenes and encoding them", num_images)
    images, prompts = sample_dataset(num_images, seed=data_seed, size=IMAGE_SIZE, category_weights=category_weights)
    with torch.no_grad():
        z = torch.cat([vae.encode(c).latent_dist.mean for c in to_pixels(images).split(500)])
    latents = adapter.pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor)
    prompt_ids = torch.tensor([index[p.text] for p in prompts])
    del images, z

    # Training times follow the sampler's shifted grid: t = shift(σ), σ ~ logit-normal(0, 1).
    config = adapter.scheduler.config
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)  # fmt: skip
    ema = [p.detach().clone() for p in transformer.parameters()]
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed + len(rounds))
    losses: list[float] = []
    start = time.time()
    transformer.train()
    for step in (bar := tqdm(range(steps), desc="pretrain", unit="step")):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 200)
        rows = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
        t = math.exp(mu) * sigma / (1 + (math.exp(mu) - 1) * sigma)
        xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
        v = adapter.velocity(xt, t, cond.index(prompt_ids[rows]), guidance_scale=1.0)
        loss = F.mse_loss(v, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, transformer.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    seconds = time.time() - start
    with torch.no_grad():
        for e, p in zip(ema, transformer.parameters()):
            p.copy_(e)
    transformer.eval()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    FluxPipeline(
        scheduler=adapter.scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    ).save_pretrained(tmp)
    strip_machine_paths(tmp)
    shutil.copy(out / "vae" / "TRAINING.json", tmp / "vae" / "TRAINING.json")
    from engine.world.evaluate import evaluate_model

    report = evaluate_model(tmp, seed=0, per_category=eval_per_category)
    metrics = {"final_loss": float(np.mean(losses[-100:])), "loss_curve": loss_curve(losses), **report}
    settings = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "images": num_images, "ema": ema_decay,
                "eval_per_category": eval_per_category, "data_seed": data_seed,
                "blocks": [transformer.config.num_layers, transformer.config.num_single_layers],
                "t5_order_bias": t5_order_bias, "t5_word_order_probe": round(word_order, 3),
                **({"category_weights": category_weights} if category_weights else {})}  # fmt: skip
    rounds.append({"settings": settings, "wall_seconds": round(seconds, 1), "judge": report["judge"]})
    total = {**settings, "steps": sum(r["settings"]["steps"] for r in rounds), "rounds": len(rounds)}
    record_stage(tmp, "model", total, sum(r["wall_seconds"] for r in rounds), metrics, rounds=rounds)
    replace_folder(tmp, out)
    logger.info("world model saved to %s (judge overall %.3f)", out, report["judge"]["overall"])
    return metrics


# ---------------------------------------------------------------------------------------------------------- CLI


def _weights(pairs: Sequence[str]) -> dict[str, float] | None:
    """``--category-weight`` values, checked before any model is loaded."""
    from engine.world.scenes import CATEGORIES

    weights = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        if name not in CATEGORIES or value <= 0:
            raise SystemExit(f"--category-weight {pair!r}: expected CATEGORY=W with W > 0 and CATEGORY one of "
                             f"{', '.join(CATEGORIES)}, e.g. position=5")  # fmt: skip
        weights[name] = value
    return weights or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.world.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["vae", "model", "reward", "all"])
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder (default: the committed one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count (smoke runs)")
    parser.add_argument("--images", type=int, default=None, help="override the stage's rendered images (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="model: continue from the transformer in --out")
    parser.add_argument(
        "--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=None,
        help="model: the transformer's double- and single-stream blocks (default 2 2); with --resume, grow to them",
    )  # fmt: skip
    parser.add_argument(
        "--t5-order-bias",
        type=float,
        default=None,
        help="model: scale of T5's random relative-position bias (default: the last round's, else 1)",
    )
    parser.add_argument("--category-weight", action="append", default=[], metavar="CATEGORY=W",
                        help="model: draw CATEGORY's scenes W times as often as the others' (repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    weights = _weights(args.category_weight)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = {} if args.steps is None else {"steps": args.steps}
    if args.images is not None:
        size["num_images"] = args.images
    stages: dict[str, Callable[[], dict]] = {
        "vae": lambda: train_vae(args.out / "model", seed=args.seed, **size),
        "model": lambda: pretrain_model(
            args.out / "model",
            seed=args.seed,
            resume=args.resume,
            blocks=args.blocks and tuple(args.blocks),
            t5_order_bias=args.t5_order_bias,
            category_weights=weights,
            **size,
        ),
        "reward": lambda: build_reward.train_reward(args.out / "reward", seed=args.seed, **size),
    }
    for name in ["vae", "model", "reward"] if args.stage == "all" else [args.stage]:
        stages[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())

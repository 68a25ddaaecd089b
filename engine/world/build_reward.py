"""The world's CLIP reward (``assets/reward``, loaded by the HPS open_clip loader), trained with CLIP's symmetric
contrastive loss plus hard negative captions per image, so it scores composition, not only content.

    python -m engine.world.build reward   # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.world.paths import REWARD_FILE
from engine.world.scenes import COLORS, MAX_COUNT, SHAPES, Prompt, SceneSpec, caption, mirror, sample_dataset
from engine.world.training import IMAGE_SIZE, cosine_lr, loss_curve, record_stage, replace_folder, to_unit

logger = logging.getLogger(__name__)

REWARD_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 3},
}


def hard_negatives(prompt: Prompt, rng: np.random.Generator) -> list[str]:
    """Captions that differ from ``prompt`` in one compositional detail: what the reward must learn to see."""
    spec, category = prompt.spec, prompt.category
    objects = list(spec.objects)
    out: list[SceneSpec] = []
    if spec.relation is not None:
        out.append(mirror(spec))
        out.append(SceneSpec((objects[1], objects[0]), spec.relation))  # the same relation, objects swapped
    if len(objects) == 2 and objects[0].color != objects[1].color:
        a, b = objects
        out.append(replace(spec, objects=(replace(a, color=b.color), replace(b, color=a.color))))
    if category == "counting":
        wrong = [n for n in range(1, MAX_COUNT + 1) if n != objects[0].count]
        out.append(SceneSpec((replace(objects[0], count=int(rng.choice(wrong))),)))
    i = int(rng.integers(len(objects)))
    other_color = [c for c in COLORS if c != objects[i].color]
    other_shape = [s for s in SHAPES if s != objects[i].shape and all(o.shape != s for o in objects)]
    swapped = list(objects)
    swapped[i] = replace(objects[i], color=str(rng.choice(other_color)))
    out.append(replace(spec, objects=tuple(swapped)))
    if other_shape:
        swapped = list(objects)
        swapped[i] = replace(objects[i], shape=str(rng.choice(other_shape)))
        out.append(replace(spec, objects=tuple(swapped)))
    texts = []
    for negative in out:
        text = caption(negative, category if category != "counting" or len(negative.objects) == 1 else "two_object")
        if text != prompt.text:
            texts.append(text)
    return texts


def train_reward(
    out: Path, steps: int = 1500, batch: int = 64, seed: int = 0, lr: float = 1e-3, num_images: int = 40_000
) -> dict:
    """Trains the world's CLIP reward and saves ``out/world_clip.pt`` + ``open_clip_config.json``."""
    import open_clip
    from open_clip import factory

    torch.manual_seed(seed)
    arch = "world-clip"
    factory._MODEL_CONFIGS[arch] = REWARD_MODEL_CFG
    model = open_clip.create_model(arch, pretrained=None)
    tokenizer = open_clip.get_tokenizer(arch)
    images, prompts = sample_dataset(num_images, seed=seed + 404, size=IMAGE_SIZE)
    rng = np.random.default_rng(seed + 505)
    negatives = [hard_negatives(p, rng) for p in prompts]
    from engine.rewards import preprocess

    pixels = to_unit(images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.time()
    model.train()
    for step in (bar := tqdm(range(steps), desc="reward", unit="step")):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 100)
        rows = torch.randint(num_images, (batch,), generator=generator).tolist()
        # The same preprocessing the reward applies at scoring time, plus light pixel noise for robustness to
        # the slightly-off colours of generated images.
        x = pixels[rows]
        x = (x + 0.04 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        x = preprocess.clip_longest_pad(x, IMAGE_SIZE)
        texts = [prompts[r].text for r in rows]
        hard = [t for r in rows for t in negatives[r]]
        owner = torch.tensor([b for b, r in enumerate(rows) for _ in negatives[r]])
        image_features = model.encode_image(x, normalize=True)
        text_features = model.encode_text(tokenizer(texts + hard), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T  # [B, B + H]
        # Duplicate captions in a batch are not negatives of each other.
        all_texts = texts + hard
        same = torch.tensor([[a == b for b in all_texts] for a in texts])
        target = torch.arange(batch)
        mask = same & ~F.one_hot(target, len(all_texts)).bool()
        # Hard negatives only compete for their own image.
        mask[:, batch:] |= owner[None, :] != torch.arange(batch)[:, None]
        image_to_text = F.cross_entropy(logits.masked_fill(mask, float("-inf")), target)
        eye = torch.eye(batch, dtype=torch.bool)
        text_logits = logits[:, :batch].T.masked_fill(same[:, :batch] & ~eye, float("-inf"))
        text_to_image = F.cross_entropy(text_logits, target)
        loss = (image_to_text + text_to_image) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    seconds = time.time() - start
    model.eval()
    metrics = {"final_loss": float(np.mean(losses[-100:])), "loss_curve": loss_curve(losses)}
    metrics.update(reward_accuracy(model, tokenizer, seed=seed + 606))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp / REWARD_FILE)
    config = {"model_name": "world-clip", "model_cfg": REWARD_MODEL_CFG}
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    settings = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "images": num_images, "saved_dtype": "fp16"}
    record_stage(tmp, "reward", settings, seconds, metrics)
    replace_folder(tmp, out)
    logger.info("world reward saved to %s: %s", out, {k: v for k, v in metrics.items() if k != "loss_curve"})
    return metrics


@torch.no_grad()
def reward_accuracy(model, tokenizer, seed: int, n: int = 600) -> dict:
    """How often the reward ranks a rendered scene's caption above each of its hard negatives, and its score range."""
    from engine.rewards import preprocess

    images, prompts = sample_dataset(n, seed=seed, size=IMAGE_SIZE)
    rng = np.random.default_rng(seed)
    x = preprocess.clip_longest_pad(to_unit(images), IMAGE_SIZE)
    features = model.encode_image(x, normalize=True)
    wins: dict[str, list[bool]] = {}
    scores = []
    for feature, prompt in zip(features, prompts):
        texts = [prompt.text, *hard_negatives(prompt, rng)]
        sims = (model.encode_text(tokenizer(texts), normalize=True) @ feature).tolist()
        scores.append(sims[0])
        wins.setdefault(prompt.category, []).extend(s < sims[0] for s in sims[1:])
    return {
        "hard_negative_accuracy": {c: round(float(np.mean(w)), 3) for c, w in wins.items()},
        "score_on_truth": {"mean": round(float(np.mean(scores)), 4), "std": round(float(np.std(scores)), 4)},
    }

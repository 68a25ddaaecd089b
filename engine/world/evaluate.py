"""Generate and judge: the embedded world's evaluation of a model, by GenEval's rules on held-out prompts.

Used for the base model's record (``build.py``), the default run's start/end scores (``engine/trainer.py``) and the
method comparison (``benchmarks/methods.py``). Every sample has its own noise seed, so a prompt's image does not
depend on the batch it was drawn in, and two models are compared on the same noise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.world.judge import evaluate
from engine.world.scenes import CATEGORIES, SPLITS, Prompt, all_prompts, make_prompts, validation_pairings

SPLIT_SEED = 0  # the held-out pairings of the embedded world (make_prompts(0))


@functools.cache
def _by_text() -> dict[str, Prompt]:
    table: dict[str, Prompt] = {}
    for _category, prompts in all_prompts().items():
        for prompt in prompts:
            # "colors" and "single_object" share captions; the first category wins, and both are judged alike.
            table.setdefault(prompt.text, prompt)
    return table


def world_prompt(text: str) -> Prompt | None:
    """The world prompt (spec and category) with this caption, or None if the caption is not the world's."""
    return _by_text().get(text)


def prompt_set(split: str, per_category: int, seed: int = SPLIT_SEED, cycle: bool = False) -> list[Prompt]:
    """``per_category`` prompts of each category from one of ``SPLITS``, in a fixed order.

    ``single_object`` and ``colors`` share captions in this world (every object names its colour), so the two
    categories draw different captions of the same pool. A category with fewer captions than ``per_category``
    (held-out ``single_object`` has 6) gives all of them, or with ``cycle`` repeats them in order up to
    ``per_category`` (each repeat is a new image where every image gets its own seed, as ``launch/evaluate.py``'s).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    split_prompts = make_prompts(seed)
    pool = split_prompts.heldout if split == "heldout" else split_prompts.finetune
    if split in ("train", "validation"):
        carved = validation_pairings(seed)
        pool = tuple(p for p in pool if bool(p.spec.pairings() & carved) == (split == "validation"))
    chosen: list[Prompt] = []
    for category in CATEGORIES:
        members = [p for p in pool if p.category == category]
        if category == "colors":  # skip the captions single_object already took
            taken = {p.text for p in chosen if p.category == "single_object"}
            members = [p for p in members if p.text not in taken] or members
        chosen += [members[i % len(members)] for i in range(per_category)] if cycle else members[:per_category]
    return chosen


@torch.no_grad()
def generate(
    adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int = 25,
    transformer: torch.nn.Module | None = None,
    height: int = 32,
    width: int = 32,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    embeddings: dict | None = None,
) -> torch.Tensor:
    """Samples one image per prompt (per-sample noise seeds) with the adapter's rollout; ``[N, 3, H, W]`` in [0, 1]
    (``engine.rollout.sample`` without guidance: the world's model is not guidance-distilled).

    ``embeddings`` maps prompt → Conditioning (already encoded, e.g. after the text encoders were freed).
    """
    from engine.rollout import sample

    return sample(adapter, list(prompts), list(seeds), num_steps=num_steps, height=height, width=width,
                  guidance_scale=1.0, dtype=dtype, batch_size=batch_size, transformer=transformer,
                  embeddings=embeddings)  # fmt: skip


def judge_report(images: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
    """``{"overall": ..., <category>: ...}`` by GenEval's rules, rounded to 4 decimals (as recorded)."""
    result = evaluate(images, prompts)
    return {k: round(float(v), 4) for k, v in {"overall": result.overall, **result.per_category}.items()}


def evaluate_model(
    folder: str | Path, seed: int = 0, per_category: int = 20, split: str = "heldout", num_steps: int = 25
) -> dict:
    """Loads a world model folder through ``FluxAdapter`` and judges its images of a prompt split."""
    from engine.models.flux import FluxAdapter

    adapter = FluxAdapter.from_pretrained(folder)
    prompts = prompt_set(split, per_category)
    seeds = [seed * 100_003 + i for i in range(len(prompts))]
    images = generate(adapter, [p.text for p in prompts], seeds, num_steps=num_steps)
    return {"judge": judge_report(images, prompts), "split": split, "prompts": len(prompts), "seed": seed}

"""The one evaluator: score sampled images with the configured rewards and, for the embedded world's prompts, the
exact judge; write what a person looks at (a grid PNG, every caption whole, each world image marked with the judge's
verdict beside its reward) and the JSON of the numbers behind it, per image and per category.

Used by the trainer's start/end (and periodic) grids and by ``launch/evaluate.py``; sampling stays with the caller,
which owns the model (under ZeRO-3 every rank samples, rank 0 writes).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def world_specs(prompts: Sequence) -> list | None:
    """The world ``Prompt`` of every prompt (given, or looked up by caption), or None if any is not the world's.

    A caption that two categories share (such as "a red circle" in single_object and colors) is then reported under
    the first.
    """
    from engine.world.evaluate import world_prompt

    specs = [p if not isinstance(p, str) else world_prompt(p) for p in prompts]
    return None if any(spec is None for spec in specs) else specs


def judge(
    images: torch.Tensor, prompts: Sequence
) -> tuple[dict[str, float], list[bool], list[str], dict[str, int]] | None:
    """The embedded world's exact judge (GenEval's rules): ``({"overall", <category>: accuracy}, per-image verdicts,
    per-image reasons ("" when correct), what became of the prompts' objects)`` when every prompt is a world prompt,
    else None. The last counts every object of every prompt as ``found``, ``<shape> drawn as <other>`` or
    ``colour absent``, most frequent first: where a model fails, in one line."""
    from engine.world.judge import evaluate, object_outcome

    specs = world_specs(prompts)
    if specs is None:
        return None
    result = evaluate(images.float().cpu(), specs)
    report = {k: round(float(v), 4) for k, v in {"overall": result.overall, **result.per_category}.items()}
    outcomes = Counter(
        object_outcome(j.segmentation, obj) for j, spec in zip(result.judgements, specs) for obj in spec.spec.objects
    )
    return (
        report,
        [bool(j.correct) for j in result.judgements],
        [j.reason for j in result.judgements],
        dict(outcomes.most_common()),
    )


def agreement(scores: Sequence[float], correct: Sequence[bool]) -> dict[str, float | int | None]:
    """How well a reward separates the judge's accepted from its rejected images: ROC AUC (ties count half) and the
    mean reward of each group. Optimising a reward that the judge does not follow shows here first: the rejected
    images' reward rises, the AUC falls (issue 14's proxy–gold gap). AUC is None while one group is empty."""
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    accepted, rejected = scores[correct], scores[~correct]
    auc = None
    if len(accepted) and len(rejected):  # the probability that an accepted image outscores a rejected one
        above = (accepted[:, None] > rejected[None, :]).mean() + 0.5 * (accepted[:, None] == rejected[None, :]).mean()
        auc = round(float(above), 4)
    mean = lambda x: round(float(x.mean()), 4) if len(x) else None  # noqa: E731
    return {"auc": auc, "mean_if_correct": mean(accepted), "mean_if_wrong": mean(rejected),
            "n_correct": int(len(accepted)), "n_wrong": int(len(rejected))}  # fmt: skip


def grid_captions(prompts: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Each grid image's caption: the whole prompt and its (first) reward."""
    return [f"{p} ({s:.3f})" for p, s in zip(prompts, scores)]


def write_evaluation(
    path: Path,
    images: torch.Tensor,
    prompts: Sequence[str],
    rewards: torch.Tensor | dict[str, torch.Tensor],
    *,
    specs: Sequence | None = None,
    record: dict | None = None,
    json_path: Path | None = None,
) -> dict:
    """Judge (world prompts), then write ``path`` (the grid) and ``path.json``.

    Args:
        path: the grid's PNG path; the JSON goes beside it.
        images: ``[B, 3, H, W]`` in [0, 1].
        prompts: the captions.
        rewards: ``[B]``, the criterion's reward of each image, or name → ``[B]`` for several rewards (the first is
            written in the captions).
        specs: world ``Prompt``s for the judge (None: looked up by caption).
        record: what produced the images (seeds, steps, precision, weights, step), stored in the JSON.
        json_path: where the JSON goes; None = beside the grid (``path`` with ``.json``).

    Returns:
        The JSON record written: ``prompts``, the ``record`` entries, ``reward`` (the first reward per image), and
        for world prompts ``judge`` (accuracy per category and overall), ``correct`` and ``reasons`` (per image),
        ``objects`` (what became of the prompts' objects, counted), ``reward_per_category`` and ``reward_vs_judge``
        (per reward, ``agreement``); with several rewards, ``rewards`` (name → per image) too.
    """
    from engine.images import save_grid

    path = Path(path)
    named = rewards if isinstance(rewards, dict) else {"reward": rewards}
    per_image = {name: [float(v) for v in values.tolist()] for name, values in named.items()}
    scores = next(iter(per_image.values()))
    judged = judge(images, specs or prompts)
    verdicts = judged[1] if judged is not None else None
    save_grid(images.float().cpu(), grid_captions(prompts, scores), path, verdicts=verdicts)
    out = {"prompts": list(prompts), **(record or {}), "reward": scores}
    if len(per_image) > 1:
        out["rewards"] = per_image
    if judged is not None:
        out["judge"], out["correct"], out["reasons"], out["objects"] = judged
        out["reward_vs_judge"] = {name: agreement(values, out["correct"]) for name, values in per_image.items()}
        categories = [spec.category for spec in world_specs(specs or prompts)]
        out["reward_per_category"] = {
            c: round(float(np.mean([s for s, k in zip(scores, categories) if k == c])), 4)
            for c in dict.fromkeys(categories)
        }
        summary = ", ".join(f"{k} {v:.2f}" for k, v in out["judge"].items())
        logger.info("judge (%s, %d prompts): %s", path.stem, len(prompts), summary)
        logger.info("objects: %s", ", ".join(f"{k} {v}" for k, v in out["objects"].items()))
        for name, agree in out["reward_vs_judge"].items():
            if agree["auc"] is not None:
                logger.info("%s vs judge: AUC %.3f, mean %.3f accepted / %.3f rejected", name, agree["auc"],
                            agree["mean_if_correct"], agree["mean_if_wrong"])  # fmt: skip
    json_path = Path(json_path) if json_path is not None else path.with_suffix(".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(json_path)
    return out

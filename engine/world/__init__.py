"""The embedded world: procedural flat-colour scenes with GenEval-style prompts, and an exact judge for them.

The judge's batch scoring is ``engine.world.judge.evaluate``: it is not re-exported here, because the package's
attribute ``evaluate`` is the submodule ``engine.world.evaluate`` (prompt sets and sampling) as soon as anything
imports that, and a re-export would silently turn into a module.
"""

from engine.world.judge import Evaluation, Judgement, judge, segment
from engine.world.scenes import (
    CATEGORIES,
    COLORS,
    PALETTE,
    SHAPES,
    ObjectSpec,
    Prompt,
    PromptSplit,
    SceneSpec,
    make_prompts,
    render,
    sample_dataset,
    validation_pairings,
)

__all__ = [
    "CATEGORIES",
    "COLORS",
    "PALETTE",
    "SHAPES",
    "Evaluation",
    "Judgement",
    "ObjectSpec",
    "Prompt",
    "PromptSplit",
    "SceneSpec",
    "judge",
    "make_prompts",
    "validation_pairings",
    "render",
    "sample_dataset",
    "segment",
]

"""The embedded world: procedural flat-colour scenes with GenEval-style prompts, and an exact judge for them."""

from engine.world.judge import Evaluation, Judgement, evaluate, judge, segment
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
    "evaluate",
    "judge",
    "make_prompts",
    "render",
    "sample_dataset",
    "segment",
]

"""Prompts: loading, the embedded default list, and a deterministic, resumable order shared by all ranks.

The global order is a sequence of epochs, each a permutation drawn from ``seed + epoch``; step s uses global
positions ``[s·G, (s+1)·G)`` (G = the global batch), and each rank takes its micro-batches of that window. A sample
is identified by its global position, which also seeds its noise: the same run on 1 or N ranks sees the same
prompts with the same noise.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

# The embedded default prompts come from the embedded world (``engine/world``): fine-tuning draws a balanced set of
# the fine-tuning split (every category, no held-out colour-shape pairing); evaluation images and the judge's
# start/end scores use the held-out split, whose pairings fine-tuning never sees.
EMBEDDED_PER_CATEGORY = 40

logger = logging.getLogger(__name__)


def embedded_prompts() -> list[str]:
    """The default fine-tuning prompts: 40 per GenEval category of the world's fine-tuning split (240)."""
    from engine.world.evaluate import prompt_set

    return [p.text for p in prompt_set("finetune", EMBEDDED_PER_CATEGORY)]


def embedded_eval_specs(per_category: int):
    """The default evaluation prompts, ``per_category`` of each category of the world's held-out split (the
    default 50: 300), as world ``Prompt``s: caption, GenEval category and spec, for the judge."""
    from engine.world.evaluate import prompt_set

    return prompt_set("heldout", per_category, cycle=True)


def read_prompts(path: str, field: str = "data.prompts") -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file; a one-line error if unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{field}={path!r} cannot be read ({error}); give a UTF-8 text file, one prompt a line"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    # A line of only zero-width or control characters (ZWSP, BOM, ...) looks empty but would be trained on.
    invisible = [i for i, p in enumerate(prompts) if not _visible(p)]
    if invisible:
        line = invisible[0]
        raise ValueError(
            f"{field}={path!r}: {len(invisible)} prompt(s) hold no visible character (e.g. prompt {line + 1}: "
            f"{prompts[line]!r}); delete those lines"
        )
    if not prompts:
        raise ValueError(f"{field}={path!r} holds no prompts; write one prompt per line")
    return prompts


def _visible(prompt: str) -> bool:
    """Whether a prompt has a character a text encoder would see as text (not format or control characters)."""
    import unicodedata

    return any(unicodedata.category(c)[0] in "LNPS" for c in prompt)


def run_prompts(data) -> tuple[list[str], list[str], list | None]:
    """A run's (training prompts, evaluation prompts, world specs of the evaluation prompts or None).

    ``data`` is the config's ``data`` section. With no prompt file the world's fine-tuning split trains and its
    held-out split (with specs, for the judge) evaluates; with a prompt file and no eval file, its first 4 prompts.
    """
    prompts = read_prompts(data.prompts) if data.prompts else embedded_prompts()
    eval_prompts = read_prompts(data.eval_prompts, "data.eval_prompts") if data.eval_prompts else None
    specs = None
    if eval_prompts is None and data.prompts is None:
        specs = embedded_eval_specs(data.eval_per_category)
        eval_prompts = [p.text for p in specs]
    elif eval_prompts is None:
        eval_prompts = prompts[:4]
    return prompts, eval_prompts, specs


class PromptOrder:
    """Deterministic prompt order over epochs; ``window(step)`` gives the global batch of a step."""

    def __init__(self, prompts: Sequence[str], global_batch: int, seed: int, shuffle: bool = True):
        self.prompts = list(prompts)
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations, for the object's lifetime
    def _epoch(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def window(self, step: int) -> list[tuple[int, str]]:
        """``(global position, prompt)`` for the G samples of ``step``."""
        start = step * self.global_batch
        n = len(self.prompts)
        out = []
        for position in range(start, start + self.global_batch):
            epoch, offset = divmod(position, n)
            out.append((position, self.prompts[self._epoch(epoch)[offset]]))
        return out

    def state_dict(self) -> dict:
        """The order is a function of the step (the trainer's state); what defines it is recorded, to compare."""
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "prompts": len(self.prompts),
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        changed = [f"{key} {state[key]} -> {now[key]}" for key in now if key in state and state[key] != now[key]]
        if changed:
            logger.warning("resuming with another prompt order than the checkpoint's (%s)", ", ".join(changed))

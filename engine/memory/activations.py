"""The calibrated activation formula (``engine.memory``): per-pass and reward-graph saved bytes from the
architecture, resolution and objective, with constants fitted on measured tiny rows (``engine/calibration.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.specs import ModelSpec
from engine.objectives import objective_settings


@dataclass
class Calibration:
    """Constants of the activation formula (module docstring), fitted on measured tiny rows.

    ``block_*``: saved bytes of one block per (token × hidden × element byte); ``vae_*``: saved bytes of the
    reward/VAE graph per decoder unit (Σ h·w·C·(layers + 1) × element byte). ``source`` says where they came from.
    """

    block_plain: float = 22.0
    block_checkpointed: float = 1.0
    vae_plain: float = 6.0
    vae_checkpointed: float = 1.5
    source: str = "defaults (run benchmarks/memory_vs_depth.py to fit)"
    # Saved bytes of a reward's forward with an input gradient per (layer × token × width × element byte), by family
    # (engine.memory.archs' RewardArch.family); fitted by benchmarks/reward_memory.py.
    reward: dict[str, list[float]] = field(default_factory=dict)  # family → one constant per tower
    reward_input: dict[str, float] = field(default_factory=dict)  # family → the rest, per input pixel (3·px²·4)
    reward_source: str = ""


# Shipped with the package (setup.py package_data): an installed copy plans with the constants that were measured.
CALIBRATION_FILE = Path(__file__).resolve().parents[1] / "calibration.json"


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The fitted constants from ``path`` (default: ``engine/calibration.json``, written from
    ``benchmarks/memory_vs_depth.py``'s fit); a missing or unreadable file is an error, never silent defaults."""
    path = Path(path) if path is not None else CALIBRATION_FILE
    try:
        return Calibration(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(
            f"planner calibration {path} is missing or unreadable ({type(error).__name__}: {error}); reinstall the "
            "package (it ships engine/calibration.json) or refit it with benchmarks/memory_vs_depth.py"
        ) from None


def transformer_units(spec: ModelSpec, height: int, width: int, batch_size: int = 1) -> int:
    """blocks × S × D for one velocity call (S = image + text tokens, ×2 batches under SD3's CFG)."""
    tokens = spec.image_tokens(height, width) + spec.text_tokens
    return spec.blocks * tokens * spec.hidden * batch_size * spec.cfg_batch


def vae_units(spec: ModelSpec, height: int, width: int, batch_size: int = 1) -> int:
    """Σ over decoder levels of h·w·C·(layers + 1): the decoder's activation volume at one image."""
    channels = list(reversed(spec.vae["block_out_channels"]))
    layers = spec.vae["layers_per_block"] + 1
    h, w = height // spec.vae_scale, width // spec.vae_scale
    total = h * w * channels[0] * 2  # mid block
    for level, c in enumerate(channels):
        total += h * w * c * layers
        if level < len(channels) - 1:
            h, w = h * 2, w * 2
    return total * batch_size


def gradient_passes(objective: str, n_leaps: int, num_steps: int) -> tuple[int, bool]:
    """(transformer passes alive in one graph, whether the reward graph is alive at the same time), as the objective
    declares them (``ObjectiveConfig.gradient_graph``; e.g. LeapAlign decouples the reward gradient, so its reward
    graph is freed before the n-pass leap graph is built; full backprop keeps all T passes)."""
    graph = objective_settings(objective, n_leaps=n_leaps).gradient_graph(num_steps)
    return graph.passes, graph.with_reward


def activation_bytes(
    spec: ModelSpec,
    objective: str,
    *,
    n_leaps: int = 2,
    num_steps: int = 25,
    height: int,
    width: int,
    batch_size: int = 1,
    checkpointing: bool,
    element_bytes: int = 2,
    calibration: Calibration | None = None,
) -> dict:
    """Predicted activation bytes: ``{"transformer", "transformer_graph", "reward", "peak", "recompute"}``.

    ``transformer_graph`` is the part saved inside transformer forwards (what the benchmark's
    ``saved_transformer_bytes`` measures); ``transformer`` adds the float32 leap/Euler latents around them.
    ``peak`` is what :class:`SavedTensorCounter` measures (bytes saved for backward, parameters excluded).
    ``recompute`` is the transient a checkpointed region adds during its backward (the counter does not see it:
    the recomputation packs with checkpoint's own hooks): one block's plain activations under block
    checkpointing, one whole (block-checkpointed or plain) pass under full backprop's ``checkpoint_steps``.
    Full backprop with ``checkpoint_steps`` keeps one latent per sampling step (the checkpoint inputs).
    """
    cal = calibration or load_calibration()
    kept = objective_settings(objective, n_leaps=n_leaps).gradient_graph(num_steps)
    passes = kept.passes
    c_block = cal.block_checkpointed if checkpointing else cal.block_plain
    c_vae = cal.vae_checkpointed if checkpointing else cal.vae_plain
    units = transformer_units(spec, height, width, batch_size) * element_bytes
    one_pass = units * c_block
    latent = spec.latent_numel(height, width) * batch_size * 4  # leap arithmetic is float32
    recompute = units * cal.block_plain / spec.blocks if checkpointing else 0.0
    if kept.chained and checkpointing:  # full backprop's checkpointed sampling chain
        graph = 0.0
        transformer = passes * latent
        recompute += one_pass
    else:
        graph = passes * one_pass
        transformer = passes * (one_pass + 2 * latent)
    reward = vae_units(spec, height, width, batch_size) * element_bytes * c_vae + latent
    peak = transformer + reward if kept.with_reward else max(transformer, reward)
    return {
        "transformer": int(transformer),
        "transformer_graph": int(graph),
        "reward": int(reward),
        "peak": int(peak),
        "recompute": int(recompute),
    }

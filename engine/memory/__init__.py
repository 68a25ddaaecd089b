"""Memory measurement and the analytic per-GPU memory planner, by job: ``measure`` (the counters), ``activations``
(the calibrated formula), ``archs`` (frozen models' sizes), ``plan`` (the phase-by-phase plan); the transformer and
VAE architectures live with the models (``engine.models.specs``).

Measurement (used by ``benchmarks/memory_vs_depth.py`` and the tests):

- :class:`SavedTensorCounter` counts the bytes autograd saves for backward through
  ``torch.autograd.graph.saved_tensors_hooks``. Each packed tensor is attributed to its *storage*, counted once
  however many ops save it (views of one storage, the same tensor saved twice). The hook wraps every saved tensor in
  a small holder whose release (when autograd frees the graph after ``backward``) decrements the storage's count,
  so the counter knows the live saved bytes at every moment: ``peak_bytes`` is the largest live total (the graph
  memory a step really needs; objectives free each loss term's graph before building the next) and
  ``total_bytes`` sums every storage that was saved at some point. Storages of parameters (including views such as
  ``weight.t()`` saved by ``linear``) are resident anyway and are reported apart, in ``param_bytes``, never in
  ``peak_bytes``. Non-reentrant ``torch.utils.checkpoint`` saves its region's inputs through the outer hooks
  (``_NoopSaveInputs``) and packs the region's own activations with its inner hooks, so a checkpointed block
  counts as its inputs, exactly what it keeps.
- :class:`PeakRSS` measures a region's peak resident set size on Linux: ``/proc/self/clear_refs`` ← ``5`` resets
  the kernel's high-water mark ``VmHWM``, read back after the region; the result is the peak minus ``VmRSS`` at
  entry. Where the reset is not allowed a thread samples ``/proc/self/statm`` every millisecond instead.

Planning (``launch/plan.py``, ``engine.memory.plan``) predicts per-GPU peak bytes from the architecture config
(parameters counted exactly on the meta device), ZeRO stage, world size, optimizer offload, LoRA rank, resolution,
objective, activation checkpointing and rollout parameter gathering. The activation terms use one calibrated
formula (see :data:`CALIBRATION`):

    transformer pass, saved bytes = blocks × S × D × E × c                  S tokens (image + text), D hidden, E bytes
    reward/VAE graph, saved bytes = Σ_decoder levels h·w·C·(layers + 1) × E × c_vae     (+ the latent itself)

with ``c`` (and ``c_vae``) fitted on the tiny model's measured rows, separately with and without checkpointing.
"""

from engine.memory.activations import (
    CALIBRATION_FILE,
    Calibration,
    activation_bytes,
    gradient_passes,
    load_calibration,
    transformer_units,
    vae_units,
)
from engine.memory.archs import (
    REWARD_ARCHS,
    TEXT_ENCODERS,
    RewardArch,
    Tower,
    counted,
    reward_graph_bytes,
    spec_from_folder,
)
from engine.memory.measure import PeakRSS, SavedTensorCounter
from engine.memory.plan import PHASES, GiB, MemoryPlan, PlanInput, plan_memory
from engine.models.specs import (
    FLUX_DEV_TRANSFORMER,
    MODELS,
    REAL_VAE,
    SD35_MEDIUM_TRANSFORMER,
    TINY_FLUX_TRANSFORMER,
    TINY_VAE,
    ModelSpec,
    build_transformer,
    build_vae,
    parameter_counts,
)

__all__ = [
    "CALIBRATION_FILE",
    "FLUX_DEV_TRANSFORMER",
    "MODELS",
    "PHASES",
    "REAL_VAE",
    "REWARD_ARCHS",
    "SD35_MEDIUM_TRANSFORMER",
    "TEXT_ENCODERS",
    "TINY_FLUX_TRANSFORMER",
    "TINY_VAE",
    "Calibration",
    "GiB",
    "MemoryPlan",
    "ModelSpec",
    "PeakRSS",
    "PlanInput",
    "RewardArch",
    "SavedTensorCounter",
    "Tower",
    "activation_bytes",
    "build_transformer",
    "build_vae",
    "counted",
    "gradient_passes",
    "load_calibration",
    "parameter_counts",
    "plan_memory",
    "reward_graph_bytes",
    "spec_from_folder",
    "transformer_units",
    "vae_units",
]

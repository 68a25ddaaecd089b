"""Memory measurement and the analytic per-GPU memory planner.

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

Planning (``launch/plan.py``, ``engine/planner.py``) predicts per-GPU peak bytes from the architecture config
(parameters counted exactly on the meta device), ZeRO stage, world size, optimizer offload, LoRA rank, resolution,
objective, activation checkpointing and rollout parameter gathering. The activation terms use one calibrated
formula (see :data:`CALIBRATION`):

    transformer pass, saved bytes = blocks × S × D × E × c                  S tokens (image + text), D hidden, E bytes
    reward/VAE graph, saved bytes = Σ_decoder levels h·w·C·(layers + 1) × E × c_vae     (+ the latent itself)

with ``c`` (and ``c_vae``) fitted on the tiny model's measured rows, separately with and without checkpointing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

GiB = 1024**3


# --------------------------------------------------------------------------------------------------------------------
# Measurement


class _Saved:
    """What the pack hook stores in the graph: the tensor plus a release callback run when autograd drops it."""

    __slots__ = ("tensor", "counter", "key")

    def __init__(self, tensor: torch.Tensor, counter: SavedTensorCounter, key):
        self.tensor = tensor
        self.counter = counter
        self.key = key

    def __del__(self):
        self.counter._release(self.key)


def _storage_key(tensor: torch.Tensor) -> tuple[tuple, int]:
    """(key, bytes) of the storage behind ``tensor``; tensors without a storage count their own bytes."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse, nested or tensor subclasses without a plain storage
        return ("id", id(tensor)), tensor.numel() * tensor.element_size()


class SavedTensorCounter:
    """Counts the bytes saved for backward inside a ``with`` block, one count per storage.

    Args:
        exclude: modules or tensors whose storages are not activations (the trainable model's parameters); their
            saved storages are summed into ``param_bytes`` instead.

    Attributes:
        peak_bytes: the largest total of live saved storages (parameters excluded).
        total_bytes: every storage saved at some point, summed once each (parameters excluded).
        param_bytes: parameter storages saved at some point, summed once each.
        live_bytes: saved bytes still held by a graph (0 after every graph was freed).
        region_peak_bytes: per named region (:meth:`region`, e.g. the transformer's forward), the peak of live bytes
            first saved inside it; a storage belongs to the region it was first saved in.
    """

    def __init__(self, exclude: Iterable[nn.Module | torch.Tensor] = ()):
        self._param_keys: set = set()
        for item in exclude:
            tensors = item.parameters() if isinstance(item, nn.Module) else [item]
            for tensor in tensors:
                self._param_keys.add(_storage_key(tensor)[0])
        self._refs: dict = {}
        self._sizes: dict = {}
        self._params_seen: set = set()
        self._lock = threading.Lock()
        self.live_bytes = self.peak_bytes = self.total_bytes = self.param_bytes = 0
        self._region: str | None = None
        self._region_of: dict = {}
        self.region_live_bytes: dict[str, int] = {}
        self.region_peak_bytes: dict[str, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        key, nbytes = _storage_key(tensor)
        if key in self._param_keys:
            if key not in self._params_seen:
                self._params_seen.add(key)
                self.param_bytes += nbytes
            return tensor
        with self._lock:
            if key in self._refs:
                self._refs[key] += 1
            else:
                self._refs[key] = 1
                self._sizes[key] = nbytes
                self.live_bytes += nbytes
                self.total_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                region = self._region_of[key] = self._region
                if region is not None:
                    live = self.region_live_bytes[region] = self.region_live_bytes.get(region, 0) + nbytes
                    self.region_peak_bytes[region] = max(self.region_peak_bytes.get(region, 0), live)
        return _Saved(tensor, self, key)

    def region(self, name: str):
        """Context manager: storages first saved inside it are attributed to ``name`` (not re-entrant per name)."""
        counter = self

        class _Region:
            def __enter__(self):
                self.previous, counter._region = counter._region, name

            def __exit__(self, *exc):
                counter._region = self.previous

        return _Region()

    def attribute_module(self, module: nn.Module, name: str) -> list:
        """Attribute everything saved inside ``module``'s forward to ``name``; returns the hook handles to remove."""
        state = {}

        def pre(*_):
            state["region"] = self.region(name)
            state["region"].__enter__()

        def post(*_):
            state.pop("region").__exit__(None, None, None)

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key) -> None:
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                nbytes = self._sizes.pop(key)
                self.live_bytes -= nbytes
                first_region = self._region_of.pop(key)
                if first_region is not None:
                    self.region_live_bytes[first_region] -= nbytes

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident set size of a ``with`` region above the RSS at entry (Linux), in bytes.

    Attributes:
        peak_bytes: peak RSS during the region minus RSS at entry (≥ 0), or None where /proc is missing.
        method: ``"vmhwm"`` (kernel high-water mark, reset at entry) or ``"sampled"`` (1 ms /proc/self/statm polls).
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.method = "vmhwm"
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        if not os.path.exists("/proc/self/statm"):
            self.method = "unavailable"
            return self
        self._start = self._rss()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.method = "sampled"
            self._sampled_peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "unavailable":
            return
        if self.method == "sampled":
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled_peak, self._rss())
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        self.peak_bytes = max(0, peak - self._start)


# --------------------------------------------------------------------------------------------------------------------
# Architectures

# Transformer configs of the released checkpoints (their transformer/config.json), so shapes are never magic numbers.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# FLUX.1-dev's and SD3.5's AutoencoderKL (16 latent channels, scale factor 8, no quant convs).
REAL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# engine/models/tiny.py's FLUX (build_tiny_flux), for calibration and validation.
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[4, 4, 8],
)
TINY_VAE = dict(REAL_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4)


@dataclass(frozen=True)
class ModelSpec:
    """A named architecture: the transformer and VAE configs plus the text length the model is trained with."""

    name: str
    family: str  # "flux" | "sd3"
    transformer: dict
    vae: dict
    text_tokens: int  # FLUX: 512 T5 tokens; SD3: 77 CLIP + 256 T5 = 333
    cfg_batch: int = 1  # SD3 runs true CFG: two transformer batches per velocity

    @property
    def hidden(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    @property
    def blocks(self) -> int:
        return self.transformer["num_layers"] + self.transformer.get("num_single_layers", 0)

    @property
    def latent_channels(self) -> int:
        return self.vae["latent_channels"]

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens: FLUX packs 2×2 latent patches (patch_size 1 after packing); SD3 patchifies by 2."""
        return (height // self.vae_scale // 2) * (width // self.vae_scale // 2)

    def latent_numel(self, height: int, width: int) -> int:
        return self.latent_channels * (height // self.vae_scale) * (width // self.vae_scale)


MODELS = {
    "tiny": ModelSpec("tiny", "flux", TINY_FLUX_TRANSFORMER, TINY_VAE, text_tokens=64),
    "flux-dev": ModelSpec("flux-dev", "flux", FLUX_DEV_TRANSFORMER, REAL_VAE, text_tokens=512),
    "sd35-medium": ModelSpec("sd35-medium", "sd3", SD35_MEDIUM_TRANSFORMER, REAL_VAE, text_tokens=333, cfg_batch=2),
}


def build_transformer(spec: ModelSpec, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32):
    """The spec's diffusers transformer (random weights; on ``meta`` no memory is allocated)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if spec.family == "flux" else SD3Transformer2DModel
    with torch.device(device):
        model = cls(**spec.transformer)
    return model if dtype == torch.float32 else model.to(dtype)


def build_vae(spec: ModelSpec, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    with torch.device(device):
        model = AutoencoderKL(**spec.vae)
    return model if dtype == torch.float32 else model.to(dtype)


_COUNTS: dict = {}


def parameter_counts(spec: ModelSpec, lora_rank: int = 0, lora_targets=("to_q", "to_k", "to_v", "to_out.0")) -> dict:
    """Exact counts from the architecture built on the meta device: transformer, VAE decoder, LoRA parameters.

    LoRA adds ``rank·(in + out)`` per adapted ``nn.Linear`` (``engine.parallelize.apply_lora``'s targets).
    """
    key = (spec.name, lora_rank, tuple(lora_targets))
    if key not in _COUNTS:
        transformer = build_transformer(spec)
        vae = build_vae(spec)
        lora = 0
        if lora_rank:
            for name, module in transformer.named_modules():
                if isinstance(module, nn.Linear) and any(name.endswith(t) for t in lora_targets):
                    lora += lora_rank * (module.in_features + module.out_features)
        _COUNTS[key] = {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "lora": lora,
            "largest_block": max(sum(p.numel() for p in b.parameters()) for b in _blocks(transformer)),
        }
    return _COUNTS[key]


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(transformer, "transformer_blocks", []))
    return blocks + list(getattr(transformer, "single_transformer_blocks", []))


# --------------------------------------------------------------------------------------------------------------------
# Activation formula


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
    # (engine/planner.py's RewardArch.family); fitted by benchmarks/reward_memory.py.
    reward: dict[str, list[float]] = field(default_factory=dict)  # family → one constant per tower
    reward_input: dict[str, float] = field(default_factory=dict)  # family → the rest, per input pixel (3·px²·4)
    reward_source: str = ""


# Shipped with the package (setup.py package_data): an installed copy plans with the constants that were measured.
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


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


def gradient_passes(objective: str, n_leaps: int, num_steps: int, drtune_train_steps: int = 2) -> tuple[int, bool]:
    """(transformer passes alive in one graph, whether the reward graph is alive at the same time).

    LeapAlign decouples the reward gradient: the reward graph is freed before the n-pass leap graph is built.
    Full backprop keeps all T passes; DRaFT-LV's terms are backpropagated one at a time.
    """
    if objective == "leapalign":
        return n_leaps, False
    if objective == "full_backprop":
        return num_steps, True
    if objective == "drtune":
        return drtune_train_steps, True
    return 1, True  # refl, draft_lv


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
    passes, together = gradient_passes(objective, n_leaps, num_steps)
    c_block = cal.block_checkpointed if checkpointing else cal.block_plain
    c_vae = cal.vae_checkpointed if checkpointing else cal.vae_plain
    units = transformer_units(spec, height, width, batch_size) * element_bytes
    one_pass = units * c_block
    latent = spec.latent_numel(height, width) * batch_size * 4  # leap arithmetic is float32
    recompute = units * cal.block_plain / spec.blocks if checkpointing else 0.0
    if objective == "full_backprop" and checkpointing:
        graph = 0.0
        transformer = passes * latent
        recompute += one_pass
    else:
        graph = passes * one_pass
        transformer = passes * (one_pass + 2 * latent)
    reward = vae_units(spec, height, width, batch_size) * element_bytes * c_vae + latent
    peak = transformer + reward if together else max(transformer, reward)
    return {
        "transformer": int(transformer),
        "transformer_graph": int(graph),
        "reward": int(reward),
        "peak": int(peak),
        "recompute": int(recompute),
    }

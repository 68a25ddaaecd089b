"""The no-grad rollout and its CPU trajectory cache.

One rollout integrates dx/dt = v(x, t) with Euler steps from x_1 (noise, grid position 0) to x_0 (data, position
T) over a time grid that decreases from 1 to 0:

    x_{t_{i+1}} = x_{t_i} + (t_{i+1} − t_i) · v(x_{t_i}, t_i)

exactly as diffusers' FlowMatchEulerDiscreteScheduler steps. It runs under ``torch.no_grad()`` and never
PyTorch's inference mode: its tensors cannot be saved for backward, and the objectives later start
gradient-carrying leap passes from the cached latents.

The latents the objective needs (its anchors, or the whole path) are copied to CPU as they are produced; on CUDA
the copies go to pinned memory without blocking the GPU, and the trajectory waits for them once, on first read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from engine.models.base import Conditioning, FlowModelAdapter

logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """The time grid of a rollout and the latents it kept, on CPU.

    Attributes:
        times: [T + 1] float32 CPU grid, times[0] = 1 (noise) … times[T] = 0 (data).
        latents: Grid position → CPU latent in the adapter's packed layout and the rollout dtype
            (FLUX [B, N, C·4], SD3 [B, C, h, w]). Position T (x_0) is always present.
        ready: CUDA event recorded after the last device-to-host copy, or None when the copies were synchronous.
    """

    times: torch.Tensor
    latents: dict[int, torch.Tensor]
    ready: torch.cuda.Event | None = field(default=None, repr=False)

    def _wait(self) -> None:
        # The pinned copies were issued with non_blocking=True; this is the one host sync before reading them.
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    @property
    def num_steps(self) -> int:
        """Number of Euler steps T."""
        return self.times.shape[0] - 1

    @property
    def positions(self) -> tuple[int, ...]:
        """Sorted grid positions held in the cache."""
        return tuple(sorted(self.latents))

    @property
    def nbytes(self) -> int:
        """Host bytes held by the cached latents."""
        return sum(t.numel() * t.element_size() for t in self.latents.values())

    def latent(
        self, position: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The latent x_{times[position]}, moved to ``device`` / cast to ``dtype`` when given.

        Without a move or cast this is the cached tensor itself: do not modify it in place.

        Raises:
            KeyError: When the position was not kept by the rollout.
        """
        if position not in self.latents:
            raise KeyError(
                f"trajectory position {position} (t={self._time_str(position)}) is not cached; kept positions are "
                f"{list(self.positions)}; add it to the rollout's keep= (or use keep='all')"
            )
        self._wait()
        # Host-to-device from pinned memory may be asynchronous: the source stays alive in the cache.
        return self.latents[position].to(device=device, dtype=dtype, non_blocking=True)

    def _time_str(self, position: int) -> str:
        return f"{self.times[position].item():.4f}" if 0 <= position <= self.num_steps else "out of range"

    @property
    def x0(self) -> torch.Tensor:
        """The final latent x_0 (position T) on CPU, in the rollout dtype."""
        return self.latent(self.num_steps)


def _keep_positions(keep: Literal["all"] | Iterable[int], num_steps: int) -> set[int]:
    if isinstance(keep, str):
        if keep != "all":
            raise ValueError(f"keep must be 'all' or an iterable of grid positions, got {keep!r}")
        return set(range(num_steps + 1))
    positions = {int(p) for p in keep}
    bad = sorted(p for p in positions if not 0 <= p <= num_steps)
    if bad:
        raise ValueError(f"keep positions {bad} are outside the grid 0..{num_steps}")
    return positions | {num_steps}


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """Copies a latent to CPU: into pinned memory without blocking when it lives on CUDA."""
    if x.device.type != "cuda":
        return x.detach().to("cpu", copy=True)
    host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
    host.copy_(x.detach(), non_blocking=True)
    return host


@torch.no_grad()
def rollout(
    adapter: FlowModelAdapter,
    cond: Conditioning,
    x1: torch.Tensor,
    times: torch.Tensor,
    *,
    guidance_scale: float,
    keep: Literal["all"] | Iterable[int] = "all",
    dtype: torch.dtype = torch.bfloat16,
    transformer: nn.Module | None = None,
    progress: bool = False,
    height: int | None = None,
    width: int | None = None,
) -> Trajectory:
    """Samples x_0 from x_1 with Euler steps over ``times``, without gradient, keeping chosen latents on CPU.

    The running latent is kept in ``dtype`` and cast explicitly (no autocast), as a bf16 sampler does; the
    velocity then runs in the transformer's parameter dtype (bf16 for a bf16 model or DeepSpeed bf16 engine) and
    each Euler update rounds as the diffusers scheduler's does (dt·v in v's dtype, the sum in float32, then
    ``dtype``), so that a bf16 rollout equals the bf16 pipeline bit for bit.

    Args:
        adapter: The model adapter; its ``velocity`` applies CFG where the model needs it.
        cond: Conditioning for the B samples, on the adapter's device.
        x1: [B, ...] initial noise in the adapter's packed layout (from ``adapter.prepare_noise``).
        times: [T + 1] decreasing grid from 1 to 0 (from ``adapter.time_grid``).
        guidance_scale: Passed to ``adapter.velocity``.
        keep: "all", or the grid positions to cache (0 = x_1, T = x_0); x_0 is always cached.
        dtype: Dtype of the running latent and the model inputs.
        transformer: Module to call instead of ``adapter.transformer`` (e.g. the DeepSpeed engine).
        progress: Show a progress bar over the steps.
        height: Image height in pixels, passed to ``velocity`` (only FLUX with non-square images needs it).
        width: Image width in pixels, as ``height``.

    Returns:
        The trajectory: the CPU float32 grid and the cached latents.
    """
    times = times.detach().to(device="cpu", dtype=torch.float32)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid of T + 1 >= 2 values, got shape {tuple(times.shape)}")
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"times must decrease strictly (t = 1 noise → t = 0 data), got {times.tolist()}")
    num_steps = times.shape[0] - 1
    positions = _keep_positions(keep, num_steps)
    batch_size = x1.shape[0]
    if len(cond) != batch_size:
        raise ValueError(f"conditioning has batch {len(cond)} but x1 has batch {batch_size}")

    device = x1.device
    grid = times.to(device)
    velocity_kwargs = {"guidance_scale": guidance_scale, "transformer": transformer, "height": height, "width": width}
    cache: dict[int, torch.Tensor] = {}
    x = x1.to(dtype)
    if 0 in positions:
        cache[0] = _to_host(x)

    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="rollout", leave=False)
    for i in steps:
        v = adapter.velocity(x, grid[i].expand(batch_size), cond, **velocity_kwargs)
        # dt < 0: the step moves from noise towards data.
        dt = grid[i + 1] - grid[i]
        # As FlowMatchEulerDiscreteScheduler.step: the 0-dim float32 dt does not promote v, so dt·v is formed in
        # v's dtype (bf16 in a bf16 rollout) and added to the float32 latent; the sum is rounded back to `dtype`.
        x = (x.float() + dt * v).to(dtype)
        if i + 1 in positions:
            cache[i + 1] = _to_host(x)

    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return Trajectory(times=times, latents=cache, ready=ready)


@torch.no_grad()
def sample(
    adapter: FlowModelAdapter,
    prompts: list[str],
    seeds: list[int],
    *,
    num_steps: int,
    height: int,
    width: int,
    guidance_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    transformer: nn.Module | None = None,
    embeddings: dict | None = None,
    negative_prompt: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One image per prompt from per-sample noise ``seeds``: encode, rollout, decode, in batches.

    Args:
        adapter: the model adapter (its text encoders encode the prompts unless ``embeddings`` has them).
        prompts, seeds: one seed per prompt (``adapter.prepare_noise``: the same seed, the same noise).
        num_steps: Euler steps on the adapter's time grid.
        height, width: image size in pixels.
        guidance_scale: FLUX's distilled guidance / SD3's CFG scale, as in training.
        dtype: the rollout's latent dtype (``rollout.dtype``).
        batch_size: prompts per rollout.
        transformer: a module to call instead of ``adapter.transformer``.
        embeddings: prompt → ``Conditioning`` already encoded (e.g. after the text encoders were freed).
        negative_prompt: encoded beside every prompt for true CFG (SD3); None for none.
        progress: show a progress bar over the batches.

    Returns:
        ``[N, 3, H, W]`` float32 images in [0, 1], on the CPU.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
    times = adapter.time_grid(num_steps, height, width)
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sample", unit="batch")
    images = []
    for start in starts:
        chunk = list(prompts[start : start + batch_size])
        if embeddings is not None:
            cond = Conditioning.cat([embeddings[p] for p in chunk]).to(adapter.device)
        else:
            negative = [negative_prompt] * len(chunk) if negative_prompt is not None else None
            cond = adapter.encode_prompts(chunk, negative)
        noise = adapter.prepare_noise(len(chunk), height, width, list(seeds[start : start + batch_size]))
        trajectory = rollout(adapter, cond, noise.to(adapter.device), times, guidance_scale=guidance_scale, keep=[],
                             dtype=dtype, transformer=transformer, height=height, width=width)  # fmt: skip
        images.append(adapter.decode(trajectory.x0.to(adapter.device, torch.float32), height, width).cpu())
    return torch.cat(images)

"""The no-grad rollout: parity with the diffusers pipelines, bf16 vs fp32, the CPU cache, per-sample seeds."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from engine.rollout import Trajectory, rollout

HEIGHT = WIDTH = 32
STEPS = 25
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon"]
NEGATIVES = ["blurry", "low quality"]
# fp32 parity with the pipeline: the same calls in the same order (FLUX's timestep formed as the pipeline forms
# it, (sigma · 1000) / 1000), bit-exact on CPU as measured. The tolerance allows for other kernels on other hardware.
PARITY_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _setup(adapter, seeds, prompts, negatives=None, height=HEIGHT, width=WIDTH):
    cond = adapter.encode_prompts(prompts, negatives)
    x1 = adapter.prepare_noise(len(seeds), height, width, seeds)
    return cond, x1, adapter.time_grid(STEPS, height, width)


def _flux_pipeline_x0(folder, x1, max_sequence_length, dtype):
    """FluxPipeline's own sampling of PROMPTS from ``x1`` (guidance 3.5, STEPS steps), as latents."""
    pipeline = FluxPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        PROMPTS,
        latents=x1.clone(),
        output_type="latent",
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=max_sequence_length,
    ).images
    return pipeline, expected


def test_flux_rollout_equals_pipeline(flux_adapter, tiny_flux_dir):
    cond, x1, times = _setup(flux_adapter, [0, 1], PROMPTS)
    trajectory = rollout(flux_adapter, cond, x1, times, guidance_scale=3.5, dtype=torch.float32)

    pipeline, expected = _flux_pipeline_x0(tiny_flux_dir, x1, flux_adapter.max_sequence_length, torch.float32)
    torch.testing.assert_close(trajectory.x0, expected, **PARITY_TOL)
    # The grid is exactly the scheduler's sigmas after the pipeline ran.
    torch.testing.assert_close(times, pipeline.scheduler.sigmas.cpu(), rtol=0, atol=0)


def test_flux_bf16_rollout_equals_bf16_pipeline(tiny_flux_dir):
    """bf16 end to end (encoders, transformer, latents): the same rounding as FluxPipeline, timestep included."""
    from engine.models import FluxAdapter

    adapter = FluxAdapter.from_pretrained(tiny_flux_dir, device="cpu", dtype=torch.bfloat16)
    cond, x1, times = _setup(adapter, [0, 1], PROMPTS)
    x1 = x1.to(torch.bfloat16)
    trajectory = rollout(adapter, cond, x1, times, guidance_scale=3.5, dtype=torch.bfloat16)

    _, expected = _flux_pipeline_x0(tiny_flux_dir, x1, adapter.max_sequence_length, torch.bfloat16)
    assert trajectory.x0.dtype == expected.dtype == torch.bfloat16
    # Bit-exact on CPU as measured; a timestep one bf16 step off changes x_0 by ~1e-2 here.
    torch.testing.assert_close(trajectory.x0, expected, rtol=0, atol=0)


def test_sd3_rollout_with_cfg_equals_pipeline(sd3_adapter, tiny_sd3_dir):
    cond, x1, times = _setup(sd3_adapter, [0, 1], PROMPTS, NEGATIVES)
    trajectory = rollout(sd3_adapter, cond, x1, times, guidance_scale=4.5, dtype=torch.float32)

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        PROMPTS,
        negative_prompt=NEGATIVES,
        latents=x1.clone(),
        output_type="latent",
        num_inference_steps=STEPS,
        guidance_scale=4.5,
        height=HEIGHT,
        width=WIDTH,
        max_sequence_length=sd3_adapter.max_sequence_length,
    ).images
    torch.testing.assert_close(trajectory.x0, expected, **PARITY_TOL)
    torch.testing.assert_close(times, pipeline.scheduler.sigmas.cpu(), rtol=0, atol=0)
    # The guidance matters: without it the sample differs.
    unguided = rollout(sd3_adapter, cond, x1, times, guidance_scale=1.0, dtype=torch.float32)
    assert not torch.allclose(unguided.x0, trajectory.x0, atol=1e-3)


def test_flux_time_grid_matches_pipeline_at_other_resolution(flux_adapter, tiny_flux_dir):
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    pipeline("a cat", num_inference_steps=4, height=64, width=96, output_type="latent")
    grid = flux_adapter.time_grid(4, 64, 96)
    torch.testing.assert_close(grid, pipeline.scheduler.sigmas.cpu(), rtol=0, atol=0)
    assert not torch.equal(grid, flux_adapter.time_grid(4, HEIGHT, WIDTH))


def test_flux_non_square_rollout_equals_pipeline(flux_adapter, tiny_flux_dir):
    height, width = 32, 64
    cond, x1, times = _setup(flux_adapter, [3], PROMPTS[:1], height=height, width=width)
    trajectory = rollout(
        flux_adapter, cond, x1, times, guidance_scale=3.5, dtype=torch.float32, height=height, width=width
    )
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        PROMPTS[:1], latents=x1.clone(), output_type="latent", num_inference_steps=STEPS, height=height, width=width
    ).images
    torch.testing.assert_close(trajectory.x0, expected, **PARITY_TOL)


# Relative L2 error of a bf16 rollout's x_0 against fp32. Rounding to bf16 (8-bit mantissa, 2^-9 ≈ 0.2% each
# time) happens at every one of the 25 steps. Measured: bf16 latents on the fp32 model 1.8% (FLUX) / 1.0% (SD3);
# a bf16 transformer as well 2.9% / 1.2%. The bounds leave about 2x room and still catch a wrong step or grid.
BF16_REL_TOL = {torch.float32: 3e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32_model", "bf16_model"])
@pytest.mark.parametrize(("name", "guidance_scale"), [("flux", 3.5), ("sd3", 4.5)])
def test_bf16_rollout_close_to_fp32(request, name, guidance_scale, model_dtype):
    adapter = request.getfixturevalue(f"{name}_adapter")
    cond, x1, times = _setup(adapter, [0, 1], PROMPTS)
    fp32 = rollout(adapter, cond, x1, times, guidance_scale=guidance_scale, dtype=torch.float32).x0
    low = adapter
    if model_dtype != torch.float32:
        low = type(adapter).from_pretrained(request.getfixturevalue(f"tiny_{name}_dir"), dtype=model_dtype)
    bf16 = rollout(low, cond, x1, times, guidance_scale=guidance_scale, dtype=torch.bfloat16).x0
    assert bf16.dtype == torch.bfloat16
    relative = (bf16.float() - fp32).norm() / fp32.norm()
    assert relative < BF16_REL_TOL[model_dtype], f"relative error {relative:.3e}"


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_cache_keeps_requested_positions(request, name):
    adapter = request.getfixturevalue(f"{name}_adapter")
    cond, x1, times = _setup(adapter, [0, 1], PROMPTS)
    full = rollout(adapter, cond, x1, times, guidance_scale=4.0, dtype=torch.float32)
    assert full.positions == tuple(range(STEPS + 1)) and full.num_steps == STEPS
    torch.testing.assert_close(full.latent(0), x1, rtol=0, atol=0)

    sparse = rollout(adapter, cond, x1, times, guidance_scale=4.0, dtype=torch.float32, keep=[0, 7, 13])
    assert sparse.positions == (0, 7, 13, STEPS)
    for position in sparse.positions:
        torch.testing.assert_close(sparse.latent(position), full.latent(position), rtol=0, atol=0)
    torch.testing.assert_close(sparse.x0, full.x0, rtol=0, atol=0)
    assert sparse.nbytes == 4 * x1.numel() * 4
    assert full.nbytes == (STEPS + 1) * x1.numel() * 4
    assert sparse.latent(7, "cpu", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(KeyError, match="position 8 .* not cached"):
        sparse.latent(8)

    only_x0 = rollout(adapter, cond, x1, times, guidance_scale=4.0, dtype=torch.float32, keep=())
    assert only_x0.positions == (STEPS,)
    torch.testing.assert_close(only_x0.x0, full.x0, rtol=0, atol=0)
    # The cached latents are CPU, not inference tensors: a later pass may use them with autograd.
    assert full.x0.device.type == "cpu" and not torch.is_inference(full.x0)
    assert full.times.dtype == torch.float32 and full.times.device.type == "cpu"


def test_cached_latent_feeds_a_gradient_pass(flux_adapter):
    cond, x1, times = _setup(flux_adapter, [0], PROMPTS[:1])
    trajectory = rollout(flux_adapter, cond, x1, times, guidance_scale=3.5, keep=[10])
    x = trajectory.latent(10, "cpu", torch.float32).requires_grad_()
    v = flux_adapter.velocity(x, times[10].expand(1), cond, guidance_scale=3.5)
    (grad,) = torch.autograd.grad(v.square().sum(), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_per_sample_seeds_reproducible_across_batch_splits(request, name):
    adapter = request.getfixturevalue(f"{name}_adapter")
    seeds = [11, 12, 13, 14]
    prompts = PROMPTS * 2
    times = adapter.time_grid(STEPS, HEIGHT, WIDTH)

    def run(indices):
        cond = adapter.encode_prompts([prompts[i] for i in indices])
        x1 = adapter.prepare_noise(len(indices), HEIGHT, WIDTH, [seeds[i] for i in indices])
        return rollout(adapter, cond, x1, times, guidance_scale=4.0, dtype=torch.float32).x0

    whole = run([0, 1, 2, 3])
    torch.testing.assert_close(run([0, 1, 2, 3]), whole, rtol=0, atol=0)
    split = torch.cat([run([0, 1]), run([2]), run([3])])
    # Different batch sizes may take different CPU matmul blocking: equal up to float32 rounding.
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    reordered = run([3, 1])
    torch.testing.assert_close(reordered, whole[[3, 1]], rtol=1e-5, atol=1e-6)


def test_rollout_uses_transformer_override(sd3_adapter):
    cond, x1, times = _setup(sd3_adapter, [0], PROMPTS[:1])
    calls = []

    class Wrapped(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            calls.append(kwargs["hidden_states"].dtype)
            return self.module(**kwargs)

    wrapped = Wrapped(sd3_adapter.transformer)
    out = rollout(sd3_adapter, cond, x1, times, guidance_scale=4.5, dtype=torch.float32, transformer=wrapped)
    assert len(calls) == STEPS
    reference = rollout(sd3_adapter, cond, x1, times, guidance_scale=4.5, dtype=torch.float32)
    torch.testing.assert_close(out.x0, reference.x0, rtol=0, atol=0)


def test_rollout_rejects_bad_inputs(flux_adapter):
    cond, x1, times = _setup(flux_adapter, [0], PROMPTS[:1])
    with pytest.raises(ValueError, match="decrease"):
        rollout(flux_adapter, cond, x1, times.flip(0), guidance_scale=3.5)
    with pytest.raises(ValueError, match="outside the grid"):
        rollout(flux_adapter, cond, x1, times, guidance_scale=3.5, keep=[STEPS + 1])
    with pytest.raises(ValueError, match="keep"):
        rollout(flux_adapter, cond, x1, times, guidance_scale=3.5, keep="some")
    with pytest.raises(ValueError, match="batch"):
        rollout(flux_adapter, cond.repeat_interleave(2), x1, times, guidance_scale=3.5)


def test_trajectory_is_a_plain_dataclass():
    times = torch.tensor([1.0, 0.5, 0.0])
    trajectory = Trajectory(times=times, latents={2: torch.zeros(1, 4)})
    assert trajectory.num_steps == 2 and trajectory.positions == (2,) and trajectory.nbytes == 16
    torch.testing.assert_close(trajectory.x0, torch.zeros(1, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rollout_caches_in_pinned_memory(tiny_flux_dir):
    from engine.models import FluxAdapter

    adapter = FluxAdapter.from_pretrained(tiny_flux_dir, device="cuda", dtype=torch.bfloat16)
    cond, x1, times = _setup(adapter, [0, 1], PROMPTS)
    trajectory = rollout(adapter, cond, x1, times, guidance_scale=3.5, keep=[0, 5])
    assert all(trajectory.latents[p].is_pinned() for p in trajectory.positions)
    torch.testing.assert_close(trajectory.latent(0, "cuda", torch.float32), x1.to(torch.bfloat16).float())
    x0 = trajectory.latent(STEPS, "cuda")
    assert x0.device.type == "cuda" and x0.dtype == torch.bfloat16 and torch.isfinite(x0).all()

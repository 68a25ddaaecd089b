"""Model adapters on tiny random FLUX / SD3 folders: loading, folder checks, prompts, noise, velocity, decode."""

import shutil

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from engine.models import Conditioning, FlowModelAdapter, FluxAdapter, ModelFolderError, SD3Adapter
from engine.models.loading import check_model_folder

HEIGHT = WIDTH = 32
PROMPTS = ["a photo of a cat", "two dogs playing in the snow", "a bowl of fruit on a wooden table"]


def _adapter(request, name):
    return request.getfixturevalue(f"{name}_adapter")


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_loads_through_adapter_and_matches_saved_weights(request, name):
    adapter = _adapter(request, name)
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    pipeline_class = FluxPipeline if name == "flux" else StableDiffusion3Pipeline
    pipeline = pipeline_class.from_pretrained(folder, local_files_only=True)

    assert isinstance(adapter, FlowModelAdapter)
    assert adapter.device == torch.device("cpu") and adapter.dtype == torch.float32
    assert type(adapter.transformer) is type(pipeline.transformer)
    reference = pipeline.transformer.state_dict()
    for key, value in adapter.transformer.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    assert all(p.requires_grad for p in adapter.transformer.parameters())
    frozen = [adapter.vae, adapter.text_encoder, adapter.text_encoder_2]
    frozen += [adapter.text_encoder_3] if name == "sd3" else []
    for module in frozen:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


@pytest.fixture
def flux_copy(tiny_flux_dir, tmp_path):
    return shutil.copytree(tiny_flux_dir, tmp_path / "flux")


def _check_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert "fix:" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_folder_is_one_line_error(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(ModelFolderError) as excinfo:
        FluxAdapter.from_pretrained(path)
    _check_error(excinfo, str(path), "does not exist")
    assert isinstance(excinfo.value, ValueError)


def test_missing_model_index(flux_copy):
    (flux_copy / "model_index.json").unlink()
    with pytest.raises(ModelFolderError) as excinfo:
        FluxAdapter.from_pretrained(flux_copy)
    _check_error(excinfo, str(flux_copy), "model_index.json")


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("transformer", "the transformer/ subfolder"),
        ("text_encoder_2/model.safetensors", "text_encoder_2/weights"),
        ("vae/config.json", "vae/config.json"),
        ("tokenizer_2/tokenizer.json", "tokenizer_2/a vocabulary file"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ],
)
def test_partial_folder_names_what_is_missing(flux_copy, remove, expected):
    target = flux_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelFolderError) as excinfo:
        FluxAdapter.from_pretrained(flux_copy)
    _check_error(excinfo, str(flux_copy), expected)


def test_wrong_model_type_names_expected_and_found(tiny_flux_dir, tiny_sd3_dir):
    with pytest.raises(ModelFolderError) as excinfo:
        FluxAdapter.from_pretrained(tiny_sd3_dir)
    _check_error(excinfo, "StableDiffusion3Pipeline", "expects a FluxPipeline", "SD3Adapter")
    with pytest.raises(ModelFolderError) as excinfo:
        SD3Adapter.from_pretrained(tiny_flux_dir)
    _check_error(excinfo, "FluxPipeline", "expects a StableDiffusion3Pipeline", "FluxAdapter")


def test_check_model_folder_accepts_complete_folder(tiny_sd3_dir):
    from engine.models.sd3 import SD3_COMPONENTS

    folder = check_model_folder(tiny_sd3_dir, pipeline_class="StableDiffusion3Pipeline", components=SD3_COMPONENTS)
    assert folder == tiny_sd3_dir.resolve()


# ------------------------------------------------------------------------------------------------ prompts


def test_flux_encode_prompts_matches_pipeline(flux_adapter, tiny_flux_dir):
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    cond = flux_adapter.encode_prompts(PROMPTS)
    # Under no_grad as in the pipeline's __call__ (SDPA picks another CPU kernel when grad is enabled).
    with torch.no_grad():
        embeds, pooled, text_ids = pipeline.encode_prompt(PROMPTS, prompt_2=None, device="cpu")
    assert cond.prompt_embeds.shape == (3, flux_adapter.max_sequence_length, 32)
    assert cond.pooled.shape == (3, 32) and cond.text_ids.shape == (flux_adapter.max_sequence_length, 3)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(cond.text_ids, text_ids, rtol=0, atol=0)
    assert not cond.has_negative
    with pytest.raises(ValueError, match="guidance-distilled"):
        flux_adapter.encode_prompts(PROMPTS, negative_prompts=["blurry"] * 3)


def test_sd3_encode_prompts_has_negatives(sd3_adapter):
    cond = sd3_adapter.encode_prompts(PROMPTS[:2], negative_prompts=["blurry", "low quality"])
    assert cond.has_negative
    assert cond.prompt_embeds.shape == cond.negative_prompt_embeds.shape == (2, 77 + 256, 48)
    assert cond.pooled.shape == cond.negative_pooled.shape == (2, 40)
    # Without negatives the pipeline's empty prompt is used: same for every sample.
    default = sd3_adapter.encode_prompts(PROMPTS[:2])
    torch.testing.assert_close(default.negative_prompt_embeds[0], default.negative_prompt_embeds[1])
    assert not torch.equal(default.negative_prompt_embeds, cond.negative_prompt_embeds)


def test_conditioning_batch_ops(sd3_adapter, flux_adapter):
    cond = sd3_adapter.encode_prompts(PROMPTS)
    alone = sd3_adapter.encode_prompts(PROMPTS[1:2])
    # Batch composition does not change a prompt's embedding (up to matmul blocking on CPU).
    torch.testing.assert_close(cond.index(1).prompt_embeds, alone.prompt_embeds, rtol=1e-5, atol=1e-6)
    assert len(cond.index(slice(0, 2))) == 2
    picked = cond.index(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.pooled, cond.pooled[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(picked.negative_pooled, cond.negative_pooled[[2, 0]], rtol=0, atol=0)
    repeated = cond.repeat_interleave(2)
    assert len(repeated) == 6
    torch.testing.assert_close(repeated.prompt_embeds[2], cond.prompt_embeds[1], rtol=0, atol=0)
    joined = Conditioning.cat([cond.index(0), cond.index(slice(1, 3))])
    torch.testing.assert_close(joined.prompt_embeds, cond.prompt_embeds, rtol=0, atol=0)
    assert cond.to("cpu", torch.bfloat16).prompt_embeds.dtype == torch.bfloat16

    flux_cond = flux_adapter.encode_prompts(PROMPTS)
    # text_ids are shared by the batch: never sliced.
    assert flux_cond.index(0).text_ids.shape == flux_cond.text_ids.shape
    assert flux_cond.repeat_interleave(3).text_ids.shape == flux_cond.text_ids.shape
    with pytest.raises(ValueError, match="batch"):
        Conditioning(prompt_embeds=torch.zeros(2, 3, 4), pooled=torch.zeros(3, 4))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_free_text_encoders_then_encode_raises(request, name):
    adapter_class = FluxAdapter if name == "flux" else SD3Adapter
    adapter = adapter_class.from_pretrained(request.getfixturevalue(f"tiny_{name}_dir"))
    cond = adapter.encode_prompts(PROMPTS[:1])
    adapter.free_text_encoders()
    assert adapter.text_encoder is None and adapter.tokenizer is None and adapter.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="free_text_encoders"):
        adapter.encode_prompts(PROMPTS[:1])
    # Cached conditioning still drives the model.
    x = adapter.prepare_noise(1, HEIGHT, WIDTH, [0])
    assert adapter.velocity(x, torch.ones(1), cond, guidance_scale=3.5).shape == x.shape


# ------------------------------------------------------------------------------------------ grid and noise


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_time_grid_shape_and_ends(request, name):
    adapter = _adapter(request, name)
    grid = adapter.time_grid(25, HEIGHT, WIDTH)
    assert grid.shape == (26,) and grid.dtype == torch.float32 and grid.device.type == "cpu"
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    with pytest.raises(ValueError):
        adapter.time_grid(0, HEIGHT, WIDTH)


def test_flux_time_grid_shifts_with_resolution(flux_adapter, sd3_adapter):
    small, large = flux_adapter.time_grid(10, 32, 32), flux_adapter.time_grid(10, 256, 256)
    # More image tokens → larger mu → more time spent at high noise.
    assert bool((large[1:-1] > small[1:-1]).all())
    torch.testing.assert_close(sd3_adapter.time_grid(10, 32, 32), sd3_adapter.time_grid(10, 256, 256))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_noise_shape_and_per_sample_seeds(request, name):
    adapter = _adapter(request, name)
    x = adapter.prepare_noise(3, HEIGHT, WIDTH, [7, 8, 9])
    assert tuple(x.shape) == adapter.latent_shape(3, HEIGHT, WIDTH)
    expected = (3, 4, 16) if name == "flux" else (3, 4, 4, 4)
    assert tuple(x.shape) == expected
    torch.testing.assert_close(x[1:2], adapter.prepare_noise(1, HEIGHT, WIDTH, [8]), rtol=0, atol=0)
    torch.testing.assert_close(x[2:], adapter.prepare_noise(1, HEIGHT, WIDTH, [torch.manual_seed(9)]), rtol=0, atol=0)
    assert adapter.prepare_noise(1, HEIGHT, WIDTH, 7, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="one per sample"):
        adapter.prepare_noise(3, HEIGHT, WIDTH, [1, 2])


def test_flux_noise_matches_pipeline_draw(flux_adapter, tiny_flux_dir):
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected, _ = pipeline.prepare_latents(2, 4, HEIGHT, WIDTH, torch.float32, "cpu", generators)
    torch.testing.assert_close(flux_adapter.prepare_noise(2, HEIGHT, WIDTH, [3, 4]), expected, rtol=0, atol=0)


def test_flux_pack_unpack_round_trip(flux_adapter):
    latents = torch.randn(2, 4, 8, 12)
    packed = flux_adapter.pack_latents(latents)
    assert packed.shape == (2, 4 * 6, 16)
    torch.testing.assert_close(flux_adapter.unpack_latents(packed, 64, 96), latents, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ velocity


class CountingWrapper(torch.nn.Module):
    """Stands in for a wrapped transformer (e.g. a DeepSpeed engine): same kwargs, counts its calls."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_velocity_uses_transformer_override_and_swap(request, name):
    adapter = _adapter(request, name)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x = adapter.prepare_noise(2, HEIGHT, WIDTH, [0, 1])
    t = torch.tensor([0.9, 0.4])
    wrapper = CountingWrapper(adapter.transformer)
    with torch.no_grad():
        direct = adapter.velocity(x, t, cond, guidance_scale=4.0)
        via_kwarg = adapter.velocity(x, t, cond, guidance_scale=4.0, transformer=wrapper)
    assert wrapper.calls == 1
    torch.testing.assert_close(via_kwarg, direct, rtol=0, atol=0)
    original = adapter.transformer
    try:
        adapter.transformer = wrapper
        with torch.no_grad():
            adapter.velocity(x, t, cond, guidance_scale=4.0)
        assert wrapper.calls == 2
    finally:
        adapter.transformer = original


def test_velocity_casts_to_model_dtype_and_back(flux_adapter):
    cond = flux_adapter.encode_prompts(PROMPTS[:1])
    x = flux_adapter.prepare_noise(1, HEIGHT, WIDTH, [0], dtype=torch.bfloat16)
    seen = {}

    def record(module, args, kwargs):
        seen["dtype"] = kwargs["hidden_states"].dtype

    hook = flux_adapter.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            v = flux_adapter.velocity(x, torch.tensor([0.5]), cond, guidance_scale=3.5)
    finally:
        hook.remove()
    assert seen["dtype"] == torch.float32 and v.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="per-sample times"):
        flux_adapter.velocity(x, torch.tensor(0.5), cond, guidance_scale=3.5)


def test_flux_guidance_is_an_input(flux_adapter):
    cond = flux_adapter.encode_prompts(PROMPTS[:1])
    x = flux_adapter.prepare_noise(1, HEIGHT, WIDTH, [0])
    t = torch.tensor([0.7])
    with torch.no_grad():
        low = flux_adapter.velocity(x, t, cond, guidance_scale=1.0)
        high = flux_adapter.velocity(x, t, cond, guidance_scale=5.0)
    assert not torch.allclose(low, high)


def test_sd3_cfg_formula_and_low_scale(sd3_adapter):
    cond = sd3_adapter.encode_prompts(PROMPTS[:2], negative_prompts=["blurry", "dark"])
    x = sd3_adapter.prepare_noise(2, HEIGHT, WIDTH, [0, 1])
    t = torch.tensor([0.8, 0.3])
    negative = Conditioning(prompt_embeds=cond.negative_prompt_embeds, pooled=cond.negative_pooled)
    with torch.no_grad():
        v_cond = sd3_adapter.velocity(x, t, cond, guidance_scale=1.0)
        v_uncond = sd3_adapter.velocity(x, t, negative, guidance_scale=1.0)
        guided = sd3_adapter.velocity(x, t, cond, guidance_scale=4.5)
        split = sd3_adapter.velocity(x, t, cond, guidance_scale=4.5, cfg_negative_no_grad=True)
    torch.testing.assert_close(guided, v_uncond + 4.5 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, guided, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative-prompt"):
        sd3_adapter.velocity(x, t, negative, guidance_scale=4.5)


def _param_grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_sd3_cfg_negative_no_grad_gradient(sd3_adapter):
    """With the negative branch under no_grad, d/dθ equals that of v_u.detach() + s·(v_c − v_u.detach())."""
    transformer = sd3_adapter.transformer
    cond = sd3_adapter.encode_prompts(PROMPTS[:2], negative_prompts=["blurry", "dark"])
    negative = Conditioning(prompt_embeds=cond.negative_prompt_embeds, pooled=cond.negative_pooled)
    x = sd3_adapter.prepare_noise(2, HEIGHT, WIDTH, [0, 1])
    t = torch.tensor([0.8, 0.3])
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    scale = 4.5

    def grads(loss_fn):
        transformer.zero_grad(set_to_none=True)
        loss_fn().backward()
        out = _param_grads(transformer)
        transformer.zero_grad(set_to_none=True)
        return out

    split = grads(
        lambda: (sd3_adapter.velocity(x, t, cond, guidance_scale=scale, cfg_negative_no_grad=True) * weight).sum()
    )

    def detached_formula():
        v_cond = sd3_adapter.velocity(x, t, cond, guidance_scale=1.0)
        v_uncond = sd3_adapter.velocity(x, t, negative, guidance_scale=1.0).detach()
        return ((v_uncond + scale * (v_cond - v_uncond)) * weight).sum()

    full = grads(lambda: (sd3_adapter.velocity(x, t, cond, guidance_scale=scale) * weight).sum())
    reference = grads(detached_formula)
    assert split.keys() == reference.keys() and split
    for name in reference:
        torch.testing.assert_close(split[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(split[n], full[n], rtol=1e-3, atol=1e-6) for n in full)


# -------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_decode_is_differentiable_and_in_unit_range(request, name):
    adapter = _adapter(request, name)
    x = adapter.prepare_noise(2, HEIGHT, WIDTH, [0, 1]).requires_grad_()
    images = adapter.decode(x, HEIGHT, WIDTH)
    assert images.shape == (2, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    (grad,) = torch.autograd.grad(images.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_decode_undoes_scaling_and_shift_like_pipeline(sd3_adapter):
    x = sd3_adapter.prepare_noise(1, HEIGHT, WIDTH, [5])
    vae = sd3_adapter.vae
    with torch.no_grad():
        raw = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
        expected = (raw / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(sd3_adapter.decode(x, HEIGHT, WIDTH), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_vae_gradient_checkpointing_same_gradient(request, name):
    adapter = _adapter(request, name)
    x0 = adapter.prepare_noise(2, HEIGHT, WIDTH, [0, 1])
    weight = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    calls = []
    # A pre-hook: non-reentrant checkpointing stops the recomputation early, before forward hooks would fire.
    hook = adapter.vae.decoder.up_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))

    def grad_and_calls(enabled):
        calls.clear()
        adapter.vae_gradient_checkpointing(enabled)
        x = x0.clone().requires_grad_()
        (grad,) = torch.autograd.grad((adapter.decode(x, HEIGHT, WIDTH) * weight).sum(), x)
        return grad, len(calls)

    try:
        plain, plain_calls = grad_and_calls(False)
        checkpointed, checkpointed_calls = grad_and_calls(True)
    finally:
        adapter.vae_gradient_checkpointing(False)
        hook.remove()
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    # Checkpointing recomputes the block in backward: a second forward call.
    assert (plain_calls, checkpointed_calls) == (1, 2)

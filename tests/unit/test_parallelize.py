"""Transforms applied from outside the model: attention backend choice and LoRA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.models import FluxAdapter
from engine.parallelize import apply_attention_backend, apply_lora
from tests.one_rank import run_in_one_rank


@pytest.fixture()
def transformer(tiny_flux_dir):
    return FluxAdapter.from_pretrained(tiny_flux_dir).transformer


@pytest.mark.parametrize("backend,package", [("xformers", "xformers"), ("flash", "flash_attn")])
def test_missing_or_unusable_backend_is_a_clear_error(transformer, backend, package):
    if importlib.util.find_spec(package) is not None and torch.cuda.is_available():
        pytest.skip(f"{package} is installed with CUDA here: the error path cannot be exercised")
    with pytest.raises(RuntimeError, match=f"attention_backend='{backend}' needs") as error:
        apply_attention_backend(transformer, backend)
    assert "\n" not in str(error.value) and "sdpa" in str(error.value)


def test_unknown_backend_is_rejected(transformer):
    with pytest.raises(ValueError, match="attention_backend='cudnn' is unknown"):
        apply_attention_backend(transformer, "cudnn")


def test_sdpa_is_the_default_and_changes_nothing(tiny_flux_dir, transformer):
    adapter = FluxAdapter.from_pretrained(tiny_flux_dir)
    cond = adapter.encode_prompts(["a red circle"])
    x = adapter.prepare_noise(1, 32, 32, [0])
    t = torch.tensor([0.7])
    before = adapter.velocity(x, t, cond, guidance_scale=3.5)
    apply_attention_backend(adapter.transformer, "sdpa")
    torch.testing.assert_close(adapter.velocity(x, t, cond, guidance_scale=3.5), before, rtol=0, atol=0)


def test_lora_starts_at_the_base_model_and_trains_only_adapters(tiny_flux_dir):
    adapter = FluxAdapter.from_pretrained(tiny_flux_dir)
    cond = adapter.encode_prompts(["a red circle"])
    x = adapter.prepare_noise(1, 32, 32, [0])
    t = torch.tensor([0.7])
    before = adapter.velocity(x, t, cond, guidance_scale=3.5)
    apply_lora(adapter.transformer, 4)
    trainable = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    torch.testing.assert_close(adapter.velocity(x, t, cond, guidance_scale=3.5), before)  # B = 0 at start
    with pytest.raises(ValueError, match="rank=0"):
        apply_lora(adapter.transformer, 0)


def _twin_vs_hooked(folder: str, lora: bool) -> dict:
    import deepspeed

    from engine.parallelize import hook_free_twin

    torch.manual_seed(0)
    adapter = FluxAdapter.from_pretrained(folder)
    if lora:
        apply_lora(adapter.transformer, 4)
        with torch.no_grad():  # B ≠ 0, so the adapters change the output and the twin must run them
            for name, p in adapter.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    cond = adapter.encode_prompts(["a red circle", "two blue squares"])
    x = adapter.prepare_noise(2, 32, 32, [0, 1])
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        plain = adapter.velocity(x, t, cond, guidance_scale=3.5)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        # configs/zero3.json's partitioning, with no persistent (always whole) parameter: every one is gathered
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "memory_efficient_linear": False},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    trainable = [p for p in adapter.transformer.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=adapter.transformer, model_parameters=trainable, config=config)
    module = engine.module
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        twin = hook_free_twin(module)
        # The twin first: a hooked forward releases the parameters it used when it ends, even inside the context.
        free = adapter.velocity(x, t, cond, guidance_scale=3.5, transformer=twin)
        hooked = adapter.velocity(x, t, cond, guidance_scale=3.5, transformer=module)
        shared = all(a is b for a, b in zip(module.parameters(), twin.parameters()))
    hooks = lambda m: sum(len(s._forward_pre_hooks) + len(s._forward_hooks) for s in m.modules())  # noqa: E731
    return {
        "twin_equals_hooked": bool(torch.equal(free, hooked)),
        "twin_equals_plain": bool(torch.equal(free, plain)),
        "max_diff_plain": float((free - plain).abs().max()),
        "shares_parameters": shared,
        "hooks_module": hooks(module),
        "hooks_twin": hooks(twin),
    }


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hook_free_twin_computes_exactly_what_the_zero3_module_does(tiny_flux_dir, lora):
    """The ZeRO-3 rollout runs a hook-free twin of the gathered module: the same outputs, bit for bit, from the
    same parameter objects, and none of ZeRO-3's per-submodule hooks."""
    found = run_in_one_rank(_twin_vs_hooked, str(tiny_flux_dir), lora)
    assert found["twin_equals_hooked"], found
    assert found["twin_equals_plain"] or found["max_diff_plain"] < 1e-6, found
    assert found["shares_parameters"], found
    assert found["hooks_module"] > 0 and found["hooks_twin"] == 0, found

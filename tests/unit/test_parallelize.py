"""Transforms applied from outside the model: attention backend choice and LoRA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.models import FluxAdapter
from engine.parallelize import apply_attention_backend, apply_lora


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

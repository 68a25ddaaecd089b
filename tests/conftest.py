"""Shared test set-up.

Triton kernels run on CPU through Triton's interpreter. The flag is read when a ``@triton.jit`` function is
created, so it must be in the environment before ``leap_kernels`` is first imported: set it here, at the top of the
root conftest, which pytest imports before any test module.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402  (the environment above must be set before anything imports triton)
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random FluxPipeline saved as a diffusers folder, built once per session."""
    from engine.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "model")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline saved as a diffusers folder, built once per session."""
    from engine.models.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "model")


@pytest.fixture(scope="session")
def flux_adapter(tiny_flux_dir):
    """The tiny FLUX model loaded through FluxAdapter.from_pretrained (fp32, CPU). Tests must not mutate it."""
    from engine.models import FluxAdapter

    return FluxAdapter.from_pretrained(tiny_flux_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def sd3_adapter(tiny_sd3_dir):
    """The tiny SD3 model loaded through SD3Adapter.from_pretrained (fp32, CPU). Tests must not mutate it."""
    from engine.models import SD3Adapter

    return SD3Adapter.from_pretrained(tiny_sd3_dir, device="cpu", dtype=torch.float32)

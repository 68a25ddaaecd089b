"""LeapAlign Engine: memory-efficient DeepSpeed post-training of flow-matching text-to-image models."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="leapalign-engine",
    version="0.1.0",
    description=(
        "DeepSpeed ZeRO-3 engine that post-trains flow-matching text-to-image models "
        "(FLUX.1-dev, SD3.5-M) on differentiable rewards with LeapAlign and its baselines."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "leap_kernels", "leap_kernels.*", "launch", "launch.*"]),
    # The embedded world's pretrained weights (a few MB) ship with the package: the default run needs no download.
    package_data={"engine": ["calibration.json"], "engine.world": ["assets/*", "assets/*/*", "assets/*/*/*"]},
    install_requires=[
        # Floors as tested (README, "Development"): each is the lowest release the suite passes with.
        "torch>=2.6",
        "deepspeed>=0.19.8",
        "diffusers>=0.35.2",
        "transformers>=5.6",
        "triton>=3.2",
        "open_clip_torch>=2.26",
        "peft>=0.18",
        "safetensors>=0.4.3",
        "sentencepiece",
        "protobuf",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6"],
        "gpu": ["xformers", "flash-attn"],
    },
)

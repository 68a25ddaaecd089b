"""Model adapters: FLUX and SD3 behind one interface (prompts, velocity, time grid, noise, decode, loading)."""

from engine.models.base import Conditioning, FlowModelAdapter
from engine.models.flux import FluxAdapter
from engine.models.loading import ModelFolderError, check_model_folder
from engine.models.sd3 import SD3Adapter

__all__ = [
    "Conditioning",
    "FlowModelAdapter",
    "FluxAdapter",
    "ModelFolderError",
    "SD3Adapter",
    "check_model_folder",
]

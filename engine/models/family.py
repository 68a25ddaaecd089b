"""What every model family's adapter shares: the folder layout (pipeline, components and the class that loads each,
the dimensions they must agree on) and the steps each adapter takes with it — check the folder, load the parts it
needs, drop the text encoders once prompts are cached. The adapters (``flux.py``, ``sd3.py``) keep what differs."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from engine.models.base import release_memory
from engine.models.loading import ComponentKind, Link, check_model_contents, check_model_folder, load_components

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One model family's diffusers folder.

    Attributes:
        label: its name in messages ("FLUX", "SD3").
        pipeline: the ``_class_name`` of its ``model_index.json``.
        components: component subfolder → what it holds.
        classes: component → the class that loads it (``transformer`` included).
        links: dimensions the components must agree on (``engine.models.loading.Link``).
    """

    label: str
    pipeline: str
    components: Mapping[str, ComponentKind]
    classes: Mapping[str, type]
    links: tuple[Link, ...]

    def check_folder(self, path: str | Path) -> Path:
        """The folder whole, without loading a weight: files present, every JSON, tokenizer and safetensors header
        read, names and shapes as each ``config.json`` says, the components' dimensions agreeing."""
        folder = check_model_folder(path, pipeline_class=self.pipeline, components=self.components)
        check_model_contents(folder, self.classes, self.links)
        return folder

    def load(
        self,
        path: str | Path,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        text_encoder_dtype: torch.dtype | None,
        parts: Collection[str] | None,
        transformer: nn.Module | None,
    ) -> tuple[Path, dict[str, Any]]:
        """Load the components ``parts`` names (None = all) from a local folder (never the hub).

        Args:
            path: the family's diffusers folder.
            device, dtype: where and in what dtype the transformer and VAE go.
            text_encoder_dtype: the text encoders' dtype; None = ``dtype``.
            parts: the components to load; a text-only adapter loads the encoders, tokenizers and scheduler.
            transformer: one built elsewhere (e.g. partitioned by ZeRO-3); not loaded here then.

        Returns:
            ``(folder, components)``: the checked folder and the adapter's keyword arguments (every component, None
            where not loaded, and ``transformer_config`` read from the folder).

        Raises:
            ModelFolderError: the folder is missing, incomplete or of another family.
        """
        folder = check_model_folder(path, pipeline_class=self.pipeline, components=self.components)
        text_dtype = text_encoder_dtype or dtype
        if transformer is not None:
            parts = set(parts if parts is not None else self.classes) - {"transformer"}
        loaded = load_components(folder, dict(self.classes), dtype=dtype, text_dtype=text_dtype, device=device,
                                 parts=parts)  # fmt: skip
        if transformer is not None:
            loaded["transformer"] = transformer
        loaded["transformer_config"] = FrozenDict(self.classes["transformer"].load_config(folder / "transformer"))
        logger.info("loaded %s model from %s (transformer %s, text encoders %s)", self.label, folder, dtype, text_dtype)
        return folder, loaded


def free_text_encoders(adapter: Any, label: str) -> None:
    """Drop an adapter's text encoders and tokenizers (after prompts are encoded and cached) to free their memory."""
    for name in list(vars(adapter)):
        if name.startswith(("text_encoder", "tokenizer")):
            setattr(adapter, name, None)
    release_memory()
    logger.info("%s text encoders freed", label)

"""Checks on a local diffusers model folder, run before any weight is loaded.

A training job that dies ten minutes in, after DeepSpeed has started, because ``text_encoder_2`` has no weights is
an expensive way to learn that a download was partial. Every check here fails with one line that names the path,
what is missing and the fix.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

ComponentKind = Literal["model", "tokenizer", "scheduler"]

# Files that hold weights in a diffusers / transformers component folder (sharded checkpoints have an index file).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
# Any one of these makes a tokenizer loadable (fast tokenizer file, CLIP BPE vocab, T5 sentencepiece model).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")

# Which adapter serves which diffusers pipeline class, to turn a wrong-type error into a concrete fix.
ADAPTER_FOR_PIPELINE = {"FluxPipeline": "FluxAdapter", "StableDiffusion3Pipeline": "SD3Adapter"}


class ModelFolderError(ValueError):
    """A local model folder is missing, incomplete or holds a different model type. The message is one line."""


def _one_line(message: str) -> str:
    # Paths with newlines are legal but would break the one-line contract that log scrapers rely on.
    return " ".join(message.split("\n"))


def check_model_folder(
    path: str | Path,
    *,
    pipeline_class: str,
    components: Mapping[str, ComponentKind],
) -> Path:
    """Checks that ``path`` is a complete local diffusers folder of the expected pipeline type.

    Args:
        path: The folder written by ``DiffusionPipeline.save_pretrained`` (or a hub snapshot downloaded to disk).
        pipeline_class: The expected ``_class_name`` in ``model_index.json``, e.g. ``"FluxPipeline"``.
        components: Subfolder name → what it holds; models need ``config.json`` and weights, tokenizers a vocabulary
            file, schedulers ``scheduler_config.json``.

    Returns:
        The folder as a resolved ``Path``.

    Raises:
        ModelFolderError: With a one-line message naming the path, what is missing or wrong, and the fix.
    """
    folder = Path(path).expanduser()
    fix = (
        f"fix: point the model path at a complete local {pipeline_class} folder written by save_pretrained() "
        "(or a full hub snapshot copied to disk; nothing is downloaded at run time)"
    )
    if not folder.exists():
        raise ModelFolderError(_one_line(f"model folder {folder} does not exist; {fix}"))
    if not folder.is_dir():
        raise ModelFolderError(_one_line(f"model path {folder} is a file, not a folder; {fix}"))
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(_one_line(f"model folder {folder} is missing model_index.json; {fix}"))
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFolderError(
            _one_line(f"model folder {folder} has an unreadable model_index.json ({error.msg}); {fix}")
        ) from error

    found = index.get("_class_name")
    if found != pipeline_class:
        expected_adapter = ADAPTER_FOR_PIPELINE.get(pipeline_class, "this adapter")
        other = ADAPTER_FOR_PIPELINE.get(found)
        hint = f"load it with {other} instead" if other else f"point the model path at a {pipeline_class} folder"
        raise ModelFolderError(
            _one_line(
                f"model folder {folder} holds a {found} (model_index.json _class_name) but {expected_adapter} "
                f"expects a {pipeline_class}; fix: {hint}"
            )
        )

    for name, kind in components.items():
        entry = index.get(name)
        if not entry or not isinstance(entry, list) or entry[0] is None:
            raise ModelFolderError(_one_line(f"model folder {folder} has no '{name}' entry in model_index.json; {fix}"))
        missing = _missing_in_component(folder / name, kind)
        if missing is not None:
            what = f"the {name}/ subfolder" if not missing else f"{name}/{missing}"
            raise ModelFolderError(_one_line(f"model folder {folder} is missing {what}; {fix}"))
    logger.debug("model folder %s holds a complete %s", folder, pipeline_class)
    return folder.resolve()


def _missing_in_component(subfolder: Path, kind: ComponentKind) -> str | None:
    """Returns what the component subfolder lacks (relative to it; "" for the subfolder itself), or None."""
    if not subfolder.is_dir():
        return ""
    files = [p.name for p in subfolder.iterdir() if p.is_file()]
    if kind == "scheduler":
        return None if "scheduler_config.json" in files else "scheduler_config.json"
    if kind == "tokenizer":
        return None if any(f in files for f in _TOKENIZER_FILES) else f"a vocabulary file (one of {_TOKENIZER_FILES})"
    if "config.json" not in files:
        return "config.json"
    if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        return "weights (*.safetensors or *.bin)"
    return None


def load_components(
    folder: Path,
    classes: Mapping[str, type],
    *,
    dtype: torch.dtype,
    text_dtype: torch.dtype,
    device: torch.device | str,
    parts: Collection[str] | None = None,
) -> dict[str, Any]:
    """Loads each component subfolder of a checked local folder with its class, local files only.

    Diffusers models (transformer, VAE) load in ``dtype``, transformers models (text encoders) in ``text_dtype``;
    both move to ``device``. Tokenizers and the scheduler load as they are.

    Args:
        folder: A folder that passed :func:`check_model_folder`.
        classes: Subfolder name → the class whose ``from_pretrained`` loads it (the name is also the adapter's
            constructor keyword).
        dtype: Dtype of the diffusers models.
        text_dtype: Dtype of the text encoders.
        device: Where the models go.
        parts: The subfolders to load (None = all); the others map to None.

    Returns:
        Subfolder name → loaded component (or None).
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from engine.models.base import transformers_dtype_kwargs

    local = {"local_files_only": True}
    loaded: dict[str, Any] = {}
    for name, cls in classes.items():
        if parts is not None and name not in parts:
            loaded[name] = None
            continue
        try:
            if issubclass(cls, ModelMixin):
                loaded[name] = cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype, **local).to(device)
            elif issubclass(cls, PreTrainedModel):
                kwargs = {**transformers_dtype_kwargs(text_dtype), **local}
                loaded[name] = cls.from_pretrained(folder, subfolder=name, **kwargs).to(device)
            else:
                loaded[name] = cls.from_pretrained(folder, subfolder=name, **local)
        except (OSError, ValueError, RuntimeError, KeyError) as error:  # corrupt or truncated files: a bad input
            if isinstance(error, RuntimeError) and "out of memory" in str(error).lower():
                raise
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise ModelFolderError(
                _one_line(
                    f"model folder {folder}: {name}/ cannot be loaded ({type(error).__name__}: {first}); fix: "
                    f"replace {folder / name} with a complete copy written by save_pretrained()"
                )
            ) from error
    return loaded


def strip_machine_paths(folder: str | Path) -> None:
    """Drops ``_name_or_path`` from every ``config.json`` under ``folder`` when it names a path on this machine.

    diffusers' ``save_pretrained``/``save_config`` record where a model was loaded from; a folder that is committed,
    shipped or copied to another machine must not carry that path.
    """
    for config in Path(folder).rglob("config.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        if Path(str(data.get("_name_or_path", ""))).is_absolute():
            del data["_name_or_path"]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real.

    Each parameter is still allocated for a moment as its module creates it (one parameter at a time), then
    replaced by a meta tensor of the same shape; weights then come in through ``load_state_dict(assign=True)``.
    Buffers, often computed in ``__init__`` and absent from checkpoints (rotary ``inv_freq``), keep their values.
    """
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original

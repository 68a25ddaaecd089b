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


# Weight files a component loads by default (diffusers models, transformers models), single or sharded.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")

# A dimension components must agree on: (component, config key, ((component, config key), ...), factor), meaning
# ``a.key == factor * sum(b.key for b)``; e.g. FLUX's transformer joint_attention_dim is T5's d_model.
Link = tuple[str, str, tuple[tuple[str, str], ...], int]


def weight_files(component: Path) -> list[Path] | None:
    """The safetensors files a component loads by default (the shards an index names), or None when it holds
    ``.bin`` weights only (their names and shapes cannot be read without loading them)."""
    for stem in _WEIGHT_STEMS:
        index = component / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, component.parent).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelFolderError(_one_line(f"{index} has no weight_map; {_replace(component)}"))
            files = sorted({component / str(name) for name in weight_map.values()})
            for file in files:
                if not file.is_file():
                    raise ModelFolderError(
                        _one_line(f"{index} names the shard {file.name}, which is missing; {_replace(component)}")
                    )
            return files
        single = component / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return None


def weight_headers(component: Path) -> dict[str, tuple[Path, Any]] | None:
    """Tensor name → (file, ``TensorInfo``) over the component's default safetensors (single or sharded), or None
    for ``.bin`` weights only. Raises ``SafetensorsError`` for an unreadable or truncated header."""
    from engine.models.safetensors_io import read_header

    files = weight_files(component)
    if files is None:
        return None
    return {key: (file, info) for file in files for key, info in read_header(file).items()}


def _cannot_load(folder: Path, name: str, error: Exception) -> ModelFolderError:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return ModelFolderError(
        _one_line(
            f"model folder {folder}: {name}/ cannot be loaded ({type(error).__name__}: {first}); "
            f"{_replace(folder / name)}"
        )
    )


def _replace(component: Path) -> str:
    return f"fix: replace {component} with a complete copy written by save_pretrained()"


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" at line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ModelFolderError(
            _one_line(
                f"model folder {folder}: {path.relative_to(folder)} is not valid JSON{where} ({reason}); "
                f"{_replace(path.parent)}"
            )
        ) from None
    except OSError as error:
        raise ModelFolderError(
            _one_line(f"model folder {folder}: {path.relative_to(folder)} cannot be read ({error.strerror or error})")
        ) from None


def check_model_contents(folder: str | Path, classes: Mapping[str, type], links: Collection[Link] = ()) -> None:
    """Checks what a folder that passed :func:`check_model_folder` holds, before anything heavy is loaded.

    - every JSON file parses (configs, indexes, tokenizer files);
    - tokenizers and the scheduler load (they are small);
    - every model's safetensors headers are read, and each tensor's name and shape are compared with the module its
      ``config.json`` describes, built on the meta device (no memory): a tensor of another shape, or a parameter the
      weights lack (tied parameters count once), is one line naming both files;
    - ``links``: dimensions two components must agree on (a text encoder swapped in from another model).

    Raises:
        ModelFolderError: One line naming the file(s) and the fix.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    folder = Path(folder)
    for path in sorted(folder.rglob("*.json")):
        _read_json(path, folder)
    configs: dict[str, dict] = {}
    for name, cls in classes.items():
        component = folder / name
        if issubclass(cls, ModelMixin):
            configs[name] = cls.load_config(component)
            with torch.device("meta"):
                module = cls.from_config(configs[name])
        elif issubclass(cls, PreTrainedModel):
            config = cls.config_class.from_pretrained(component, local_files_only=True)
            configs[name] = config.to_dict()
            with torch.device("meta"):
                module = cls(config)
        else:
            try:
                cls.from_pretrained(folder, subfolder=name, local_files_only=True)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
                raise _cannot_load(folder, name, error) from None
            continue
        _compare_weights(folder, name, module)
    for a, key_a, parts, factor in links:
        value_a = configs[a].get(key_a)
        values = [configs[b].get(key) for b, key in parts]
        if value_a is None or None in values or value_a == factor * sum(values):
            continue
        described = " + ".join(f"{b}/config.json {key}={v}" for (b, key), v in zip(parts, values, strict=True))
        scale = f"{factor} × " if factor != 1 else ""
        raise ModelFolderError(
            _one_line(
                f"model folder {folder}: {a}/config.json {key_a}={value_a} does not fit {scale}{described}; the "
                f"components come from different models: fix: take {a}/ and "
                f"{', '.join(sorted({b + '/' for b, _ in parts}))} from the same pipeline"
            )
        )
    logger.debug("model folder %s: every header, config and tokenizer checked", folder)


def _compare_weights(folder: Path, name: str, module: torch.nn.Module) -> None:
    """Names and shapes of ``module``'s state (built from ``name``/config.json) against ``name``'s safetensors."""
    from engine.models.safetensors_io import SafetensorsError

    component = folder / name
    try:
        headers = weight_headers(component)
    except SafetensorsError as error:
        raise ModelFolderError(_one_line(f"model folder {folder}: {error}; {_replace(component)}")) from None
    if headers is None:
        logger.info("%s holds .bin weights only: their names and shapes are checked when they load", component)
        return
    files = sorted({file for file, _ in headers.values()})
    aliases: dict[int, list[str]] = {}
    for key, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(key)
    expected = {key: tuple(t.shape) for key, t in module.state_dict(keep_vars=True).items()}
    for key, shape in expected.items():
        if key in headers:
            file, info = headers[key]
            if info.shape != shape:
                raise ModelFolderError(
                    _one_line(
                        f"model folder {folder}: {name}/config.json and {name}/{file.name} disagree: {key} is "
                        f"{list(info.shape)} in the weights but {list(shape)} by the config; fix: use the "
                        "config.json that came with these weights"
                    )
                )
    missing = []
    for key, param in module.named_parameters(remove_duplicate=False):
        if not any(alias in headers for alias in aliases[id(param)]):
            missing.append(key)
    if missing:
        shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
        files_named = files[0].name if len(files) == 1 else f"{len(files)} shards"
        raise ModelFolderError(
            _one_line(
                f"model folder {folder}: {name}/{files_named} lacks {shown}, which {name}/config.json describes "
                f"({len(missing)} of {len(expected)} tensors); fix: use the config.json that came with these "
                f"weights, or {_replace(component)[5:]}"
            )
        )


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
            raise _cannot_load(folder, name, error) from error
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

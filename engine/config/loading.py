"""Resolving a run config: dataclass defaults, then a YAML file, then ``key=value`` overrides with dotted keys; and
writing it back (``save_config``) and describing it (``config_help``)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import typing
from typing import Any

import yaml

from engine.config.schema import TrainConfig
from engine.sections import ConfigError, fail, hints, is_union, list_item, type_name

__all__ = ["config_help", "config_to_dict", "load_config", "save_config"]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain nested dicts and lists, in field order."""
    return dataclasses.asdict(cfg)


def _dotted(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


@functools.cache
def _all_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted leaf key of ``cls`` (list sections as ``rewards.0.*``), for suggestions."""
    keys: list[str] = []
    for name, hint in hints(cls).items():
        if name.startswith("_"):
            continue
        item = list_item(hint)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, _dotted(prefix, name))
        elif item is not None and dataclasses.is_dataclass(item):
            keys += _all_keys(item, _dotted(prefix, f"{name}.0"))
        else:
            keys.append(_dotted(prefix, name))
    return tuple(keys)


def _unknown_key(key: Any, cls: type, prefix: str) -> typing.NoReturn:
    name = _dotted(prefix, key)
    moved = getattr(cls, "_moved", {}).get(key)
    if moved is not None:  # a flat key of an older config, e.g. method.n_leaps -> method.leapalign.n_leaps
        raise ConfigError(f"config key {name!r} moved to {moved!r} (each objective owns its section); write {moved}")
    names = [f.name for f in dataclasses.fields(cls)]
    near = [_dotted(prefix, match) for match in difflib.get_close_matches(str(key), names, n=3)]
    if not near:  # a setting given in the wrong section, e.g. `alpha` for `method.leapalign.alpha`
        leaves = _all_keys(TrainConfig)
        near = [k for k in leaves if difflib.get_close_matches(str(key), [k.rsplit(".", 1)[-1]], cutoff=0.8)][:3]
    if near:
        raise ConfigError(f"unknown config key {name!r}; did you mean {' or '.join(repr(k) for k in near)}?")
    where = f"under {prefix!r}" if prefix else "at the top level"
    raise ConfigError(f"unknown config key {name!r}; valid keys {where}: {', '.join(names)}")


def _assign(hint: Any, current: Any, value: Any, name: str) -> Any:
    """The new value of a slot of type ``hint``: sections merge key by key, lists of sections replace the list."""
    if dataclasses.is_dataclass(hint):
        # An empty YAML section (`method:` with every line commented out) reads as null: keep the current values.
        return _merge(hint, copy.deepcopy(current), {} if value is None else value, name)
    item = list_item(hint)
    if item is not None and dataclasses.is_dataclass(item):
        if not isinstance(value, list):
            fail(name, value, f"has type {type(value).__name__}; expected {type_name(hint)}")
        return [_merge(item, config_to_dict(item()), element, f"{name}.{i}") for i, element in enumerate(value)]
    return value


def _merge(cls: type, base: dict[str, Any], update: Any, prefix: str) -> dict[str, Any]:
    """Merge a mapping from YAML or an override onto ``base`` (the dict form of ``cls``), rejecting unknown keys."""
    if not isinstance(update, dict):
        fail(prefix or "the config", update, f"has type {type(update).__name__}; expected {type_name(cls)}")
    field_hints = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in update.items():
        if key not in names:
            _unknown_key(key, cls, prefix)
        base[key] = _assign(field_hints[key], base[key], value, _dotted(prefix, key))
    return base


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Construct ``cls`` from its complete dict form; the sections' ``__post_init__`` checks every value."""
    kwargs: dict[str, Any] = {}
    for name, hint in hints(cls).items():
        if name.startswith("_"):
            continue
        value = data[name]
        item = list_item(hint)
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value)
        elif item is not None and dataclasses.is_dataclass(item):
            built = []
            for index, element in enumerate(value):
                try:
                    built.append(_build(item, element))
                except ConfigError as error:  # name the entry: `reward.lam=...` -> `rewards.1.lam=...`
                    message = str(error)
                    if message.startswith(f"{item._prefix}."):
                        message = f"{name}.{index}." + message[len(item._prefix) + 1 :]
                    raise ConfigError(message) from None
            value = built
        kwargs[name] = value
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.load(file, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from None


def _parse_override(item: str) -> tuple[str, Any, str]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. method.leapalign.alpha=0.1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"override {item!r}: cannot parse the value ({problem}); quote it") from None
    return key, value, raw


def _accepts_str(hint: Any) -> bool:
    return hint is str or (is_union(hint) and str in typing.get_args(hint))


def _apply_override(data: dict[str, Any], key: str, value: Any, raw: str) -> None:
    """Set one dotted key (``method.leapalign.alpha``, ``rewards.0.name``, ``rewards.1`` appends) in the dict form."""
    parts = key.split(".")
    hint: Any = TrainConfig
    node: Any = data
    prefix = ""
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        name = _dotted(prefix, part)
        if dataclasses.is_dataclass(hint):
            if part not in {f.name for f in dataclasses.fields(hint)}:
                _unknown_key(part, hint, prefix)
            hint, slot = hints(hint)[part], part
        elif list_item(hint) is not None:
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(
                    f"override key {name!r}: {part!r} is not an index of {prefix} ({len(node)} entries); "
                    f"use index {len(node)} to append one"
                )
            hint, slot = list_item(hint), int(part)
            if slot == len(node):  # append: a fresh default entry, then set into it
                node.append(config_to_dict(hint()) if dataclasses.is_dataclass(hint) else None)
        else:
            fail(prefix, node, f"is a value, not a section; {key!r} is not a config key")
        if last:
            # `output_dir=2024` or `model.path=123`: a string field takes the text as written.
            if _accepts_str(hint) and isinstance(value, bool | int | float):
                value = raw.strip()
            node[slot] = _assign(hint, node[slot], value, name)
            return
        node, prefix = node[slot], name


def load_config(yaml_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Resolve a run config: dataclass defaults, then a YAML file, then ``key=value`` overrides.

    Args:
        yaml_path: A YAML file with any subset of the tree (sections as mappings, ``rewards`` as a list of
            mappings, each merged onto the reward defaults), or None for the defaults.
        overrides: ``key=value`` strings with dotted keys (``method.leapalign.alpha=0.1``, ``rewards.0.name=pickscore``;
            index ``len(rewards)`` appends a reward). Values are parsed as YAML (``null``, ``true``, ``[a, b]``).

    Returns:
        The validated config.

    Raises:
        ConfigError: Unreadable YAML, an unknown key (with close matches), a wrong type or a bad value.
    """
    data = config_to_dict(TrainConfig())
    if yaml_path is not None:
        loaded = _read_yaml(yaml_path)
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(
                    f"config file {yaml_path}: expected a mapping at the top, got {type(loaded).__name__}"
                )
            data = _merge(TrainConfig, data, loaded, "")
    for item in overrides:
        key, value, raw = _parse_override(item)
        _apply_override(data, key, value, raw)
    return _build(TrainConfig, data)


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (``load_config(path, [])`` gives it back); parent folders are created."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write("# Resolved LeapAlign Engine config: defaults <- YAML <- overrides. Reload with --config.\n")
        yaml.safe_dump(config_to_dict(cfg), file, sort_keys=False, allow_unicode=True)


def config_help() -> str:
    """One line per dotted key: type, default and help, for ``--help``."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        field_hints = hints(cls)
        for f in dataclasses.fields(cls):
            hint, name = field_hints[f.name], _dotted(prefix, f.name)
            item = list_item(hint)
            if dataclasses.is_dataclass(hint):
                walk(hint, name)
            elif item is not None and dataclasses.is_dataclass(item):
                walk(item, f"{name}.N")
            else:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
                lines.append(f"{name} ({type_name(hint)}, default {default!r}): {f.metadata.get('help', '')}")

    walk(TrainConfig, "")
    return "\n".join(lines)

"""Typed settings sections: the machinery every part of the configuration uses.

A section is a dataclass whose fields carry a one-line help (:func:`setting`) and whose ``__post_init__`` checks
every value's type, then runs the section's own range checks (``_validate``). Every error is a :class:`ConfigError`
with a one-line message naming the dotted field and the fix. The run's tree (``engine.config``) and the components
that own their settings (each objective's section in ``engine.objectives``) are built from it; it imports nothing of
the engine, so any module may use it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal

__all__ = ["ConfigError", "Section", "check_type", "fail", "hints", "list_item", "setting", "type_name"]


class ConfigError(ValueError):
    """A bad setting. The message is one line: the dotted field, its value and the fix."""


def setting(default: Any, help_text: str) -> Any:
    """A dataclass field with a one-line help string; lists and sections get a fresh copy per instance."""
    metadata = {"help": help_text}
    if isinstance(default, type):  # a nested section: build its defaults per instance
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def fail(name: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={value!r} {why}")


class _TypeMismatch(ConfigError):
    """A value of the wrong type (a union tries its next member); other ConfigErrors are final."""


# PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string; accept such numbers for float fields.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def list_item(hint: Any) -> Any | None:
    """The item type of a ``list[...]`` hint, else None."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def type_name(hint: Any) -> str:
    if is_union(hint):
        return " or ".join("null" if arg is type(None) else type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    item = list_item(hint)
    if item is not None:
        return f"a list of {type_name(item)}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


def check_type(value: Any, hint: Any, name: str) -> Any:
    """Return ``value`` if it has type ``hint`` (ints widen to float), else raise a one-line ConfigError."""
    wrong = f"{name}={value!r} has type {type(value).__name__}; expected {type_name(hint)}"
    if is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        for option in options:
            try:
                return check_type(value, option, name)
            except _TypeMismatch:
                continue
        raise _TypeMismatch(wrong)
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint) or isinstance(value, bool):
            raise _TypeMismatch(f"{name}={value!r} is not a valid choice; choose {type_name(hint)}")
        return value
    item = list_item(hint)
    if item is not None:
        if not isinstance(value, list | tuple):
            raise _TypeMismatch(wrong)
        return [check_type(element, item, f"{name}.{index}") for index, element in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise _TypeMismatch(wrong)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _TypeMismatch(wrong)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _TypeMismatch(wrong)
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _TypeMismatch(wrong)
        if not math.isfinite(value):
            fail(name, value, "must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _TypeMismatch(wrong)
        return value
    raise TypeError(f"config field {name} has an unsupported type hint {hint!r}")  # a bug in this file


class Section:
    """Type-checks every field after ``__init__``, then runs the section's own range checks (``_validate``)."""

    _prefix: ClassVar[str] = ""  # the dotted name of the section in the tree, for error messages

    def __post_init__(self) -> None:
        field_hints = hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_type(getattr(self, f.name), field_hints[f.name], self._name(f.name)))
        self._validate()

    def _name(self, field_name: str) -> str:
        return f"{self._prefix}.{field_name}" if self._prefix else field_name

    def _validate(self) -> None:
        pass

    def _positive(self, *field_names: str, minimum: int = 1) -> None:
        for field_name in field_names:
            value = getattr(self, field_name)
            if value is not None and value < minimum:
                fail(self._name(field_name), value, f"must be >= {minimum}")

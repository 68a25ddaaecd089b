"""Reading safetensors files tensor by tensor (or a flat element range of one tensor) with plain file reads.

``safetensors.torch.load_file`` materialises every tensor at once, and a module built beside it is a second copy:
two copies of a 16 GB reward model per rank. Here a loader reads one tensor at a time into memory it then owns
(``load_state_dict(..., assign=True)`` makes it the parameter), so the host peak is one copy plus one tensor.
Plain reads, not a memory map: the bytes go through the page cache, which every rank of a host shares and which
does not count against a process.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data, offsets
relative to its start.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message is one line naming it."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name → :class:`TensorInfo` for every tensor of a safetensors file, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            raw = file.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100_000_000):
                raise SafetensorsError(f"{path}: header length {length} does not fit the file ({size} bytes)")
            header = json.loads(file.read(length))
    except OSError as error:
        raise SafetensorsError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SafetensorsError(f"{path}: the header is not JSON ({error}); the file is corrupt") from None
    data_start = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) + data_start for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise SafetensorsError(f"{path}: tensor {name!r} has an unreadable header entry ({error})") from None
        info = TensorInfo(name, dtype, shape, begin, end)
        if end - begin != info.numel * dtype.itemsize or end > size:
            what = "is truncated" if end > size else "has a byte range that does not match its shape"
            raise SafetensorsError(f"{path}: tensor {name!r} {what}; the file is corrupt or partly written")
        infos[name] = info
    return infos


def read_tensor(file: BinaryIO, info: TensorInfo, elements: tuple[int, int] | None = None) -> torch.Tensor:
    """Reads ``info``'s tensor from an open file, whole (its shape) or the flat elements ``[a, b)`` (1-D).

    The returned tensor owns freshly allocated memory: one allocation, no intermediate copy.
    """
    first, last = elements if elements is not None else (0, info.numel)
    if not 0 <= first <= last <= info.numel:
        raise ValueError(f"elements {elements} outside tensor {info.name!r} of {info.numel}")
    width = info.dtype.itemsize
    buffer = torch.empty((last - first) * width, dtype=torch.uint8)
    file.seek(info.begin + first * width)
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])
        if not got:
            raise SafetensorsError(f"{getattr(file, 'name', 'file')}: tensor {info.name!r} is truncated")
        done += got
    tensor = buffer.view(info.dtype)
    return tensor.view(info.shape) if elements is None else tensor


def iter_tensors(path: str | Path, names=None, dtype: torch.dtype | None = None):
    """Yields ``(name, tensor)`` one at a time (optionally only ``names``, optionally cast to ``dtype``)."""
    infos = read_header(path)
    with open(path, "rb") as file:
        for name, info in infos.items():
            if names is not None and name not in names:
                continue
            tensor = read_tensor(file, info)
            yield name, (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)

"""Measuring memory: bytes autograd saves for backward (:class:`SavedTensorCounter`) and a region's peak resident
set size (:class:`PeakRSS`). Used by ``benchmarks/memory_vs_depth.py``, ``benchmarks/reward_memory.py`` and the
tests; see ``engine.memory`` for what each counts."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

import torch
from torch import nn


class _Saved:
    """What the pack hook stores in the graph: the tensor plus a release callback run when autograd drops it."""

    __slots__ = ("tensor", "counter", "key")

    def __init__(self, tensor: torch.Tensor, counter: SavedTensorCounter, key):
        self.tensor = tensor
        self.counter = counter
        self.key = key

    def __del__(self):
        self.counter._release(self.key)


def _storage_key(tensor: torch.Tensor) -> tuple[tuple, int]:
    """(key, bytes) of the storage behind ``tensor``; tensors without a storage count their own bytes."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse, nested or tensor subclasses without a plain storage
        return ("id", id(tensor)), tensor.numel() * tensor.element_size()


class SavedTensorCounter:
    """Counts the bytes saved for backward inside a ``with`` block, one count per storage.

    Args:
        exclude: modules or tensors whose storages are not activations (the trainable model's parameters); their
            saved storages are summed into ``param_bytes`` instead.

    Attributes:
        peak_bytes: the largest total of live saved storages (parameters excluded).
        total_bytes: every storage saved at some point, summed once each (parameters excluded).
        param_bytes: parameter storages saved at some point, summed once each.
        live_bytes: saved bytes still held by a graph (0 after every graph was freed).
        region_peak_bytes: per named region (:meth:`region`, e.g. the transformer's forward), the peak of live bytes
            first saved inside it; a storage belongs to the region it was first saved in.
    """

    def __init__(self, exclude: Iterable[nn.Module | torch.Tensor] = ()):
        self._param_keys: set = set()
        for item in exclude:
            tensors = item.parameters() if isinstance(item, nn.Module) else [item]
            for tensor in tensors:
                self._param_keys.add(_storage_key(tensor)[0])
        self._refs: dict = {}
        self._sizes: dict = {}
        self._params_seen: set = set()
        self._lock = threading.Lock()
        self.live_bytes = self.peak_bytes = self.total_bytes = self.param_bytes = 0
        self._region: str | None = None
        self._region_of: dict = {}
        self.region_live_bytes: dict[str, int] = {}
        self.region_peak_bytes: dict[str, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        key, nbytes = _storage_key(tensor)
        if key in self._param_keys:
            if key not in self._params_seen:
                self._params_seen.add(key)
                self.param_bytes += nbytes
            return tensor
        with self._lock:
            if key in self._refs:
                self._refs[key] += 1
            else:
                self._refs[key] = 1
                self._sizes[key] = nbytes
                self.live_bytes += nbytes
                self.total_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                region = self._region_of[key] = self._region
                if region is not None:
                    live = self.region_live_bytes[region] = self.region_live_bytes.get(region, 0) + nbytes
                    self.region_peak_bytes[region] = max(self.region_peak_bytes.get(region, 0), live)
        return _Saved(tensor, self, key)

    def region(self, name: str):
        """Context manager: storages first saved inside it are attributed to ``name`` (not re-entrant per name)."""
        counter = self

        class _Region:
            def __enter__(self):
                self.previous, counter._region = counter._region, name

            def __exit__(self, *exc):
                counter._region = self.previous

        return _Region()

    def attribute_module(self, module: nn.Module, name: str) -> list:
        """Attribute everything saved inside ``module``'s forward to ``name``; returns the hook handles to remove."""
        state = {}

        def pre(*_):
            state["region"] = self.region(name)
            state["region"].__enter__()

        def post(*_):
            state.pop("region").__exit__(None, None, None)

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key) -> None:
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                nbytes = self._sizes.pop(key)
                self.live_bytes -= nbytes
                first_region = self._region_of.pop(key)
                if first_region is not None:
                    self.region_live_bytes[first_region] -= nbytes

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident set size of a ``with`` region above the RSS at entry (Linux), in bytes.

    Attributes:
        peak_bytes: peak RSS during the region minus RSS at entry (≥ 0), or None where /proc is missing.
        method: ``"vmhwm"`` (kernel high-water mark, reset at entry) or ``"sampled"`` (1 ms /proc/self/statm polls).
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.method = "vmhwm"
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        if not os.path.exists("/proc/self/statm"):
            self.method = "unavailable"
            return self
        self._start = self._rss()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.method = "sampled"
            self._sampled_peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "unavailable":
            return
        if self.method == "sampled":
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled_peak, self._rss())
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        self.peak_bytes = max(0, peak - self._start)

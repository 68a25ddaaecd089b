"""Host-allocator tuning for CPU ranks: applied on glibc, the user's own setting wins."""

from __future__ import annotations

import platform

import pytest

from engine.host import keep_heap_warm


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_heap_padding_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    assert keep_heap_warm()


def test_the_users_malloc_top_pad_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert not keep_heap_warm()


def test_cpu_ranks_pad_the_heap(monkeypatch):
    """``rank_device`` (every CPU rank of the trainer) asks for the padding."""
    import engine.components as components

    calls = []
    monkeypatch.setattr(components, "keep_heap_warm", lambda: calls.append(1) or True)
    monkeypatch.setattr(components.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(components.torch, "set_num_threads", lambda n: None)  # keep this process's threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert components.rank_device(1).type == "cpu"
    assert calls == [1]

"""Host-allocator tuning for CPU ranks: applied on glibc, the user's own setting wins."""

from __future__ import annotations

import platform

import pytest

from engine.host import keep_heap_warm


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_heap_padding_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    assert keep_heap_warm("cpu")


def test_the_users_malloc_top_pad_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert not keep_heap_warm("cpu")

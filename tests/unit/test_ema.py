"""Sharded EMA without DeepSpeed: each rank averages only its slice, in float32; swapping restores the weights.

The DeepSpeed layouts (ZeRO-3 partitions, persistent parameters, ZeRO-2 fragments) are tested against an
independently computed EMA in ``tests/distributed/test_ema_export.py``.
"""

from __future__ import annotations

import pytest
import torch

from engine.ema import ShardedEMA


def test_shards_cover_the_parameter_and_average_exactly():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(7, 5))
    emas = [ShardedEMA([param], 0.9, rank, 2) for rank in range(2)]
    assert sum(e.shards[0].numel() for e in emas) == param.numel()  # no rank holds the whole EMA
    reference = param.detach().clone()
    for _ in range(3):
        with torch.no_grad():
            param.add_(torch.randn_like(param))
        reference = 0.9 * reference + 0.1 * param.detach()
        for e in emas:
            e.update()
    full = torch.cat([e.shards[0] for e in emas]).view_as(param)
    torch.testing.assert_close(full, reference)


def test_full_on_one_rank_is_the_whole_average():
    param = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    ema = ShardedEMA([param], 0.5, 0, 1)
    with torch.no_grad():
        param.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.full(0), torch.arange(6.0).view(2, 3) + 1.0)


def test_swapped_in_loads_ema_and_restores_weights():
    param = torch.nn.Parameter(torch.arange(6, dtype=torch.bfloat16))
    ema = ShardedEMA([param], 0.5, 0, 1)
    original = param.detach().clone()
    ema.shards[0].fill_(3.0)
    with ema.swapped_in():
        assert torch.equal(param.detach(), torch.full_like(param, 3.0))
    assert torch.equal(param.detach(), original)
    assert ema.shards[0].dtype == torch.float32


def test_state_dict_round_trip_and_mismatch_error():
    param = torch.nn.Parameter(torch.randn(4))
    a, b = ShardedEMA([param], 0.99, 0, 1), ShardedEMA([param], 0.99, 0, 1)
    a.shards[0].add_(1.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.shards[0], b.shards[0])
    other = ShardedEMA([torch.nn.Parameter(torch.randn(5))], 0.99, 0, 1)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(a.state_dict())


def test_warmup_ramps_the_decay_and_survives_a_resume():
    """With warm-up the n-th update (from 0) uses min(decay, (1+n)/(10+n)), so the initial weights' share of the
    average falls as a product of those decays; a resumed EMA continues the ramp where it stopped."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6))
    ema = ShardedEMA([param], 0.99, 0, 1, warmup=True)
    plain = ShardedEMA([param], 0.99, 0, 1)
    reference, initial_share = param.detach().clone(), 1.0
    for n in range(40):
        if n == 20:  # resume half-way: a fresh EMA loaded from the state continues identically
            state = ema.state_dict()
            ema = ShardedEMA([param], 0.99, 0, 1, warmup=True)
            ema.load_state_dict(state)
        with torch.no_grad():
            param.add_(torch.randn_like(param))
        decay = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == decay and plain.current_decay() == 0.99
        reference = decay * reference + (1 - decay) * param.detach()
        initial_share *= decay
        ema.update()
        plain.update()
    torch.testing.assert_close(ema.shards[0], reference)
    assert initial_share < 1e-4  # without warm-up it is 0.99**40 ≈ 0.67
    assert not torch.allclose(plain.shards[0], reference)

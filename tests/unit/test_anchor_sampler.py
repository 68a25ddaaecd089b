"""Anchor sampling: order, coverage, rank agreement and the paper's ablation modes."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.leap import AnchorSampler, anchor_positions, anchor_times


@pytest.mark.parametrize("n_leaps", [1, 2, 3])
def test_levels_are_strictly_decreasing_and_end_at_x0(n_leaps):
    sampler = AnchorSampler(25, n_leaps, seed=0)
    for _ in range(500):
        levels = sampler.sample()
        assert len(levels) == n_leaps + 1 and levels[-1] == 0
        assert all(a > b for a, b in zip(levels[:-1], levels[1:]))
        assert levels[-2] >= 1 and levels[0] <= 25


def test_every_level_is_reachable_and_the_draw_is_uniform_over_pairs():
    num_steps = 10
    sampler = AnchorSampler(num_steps, 2, seed=1)
    draws = 20000
    pairs = Counter(sampler.sample()[:2] for _ in range(draws))
    all_pairs = {(k, j) for k in range(2, num_steps + 1) for j in range(1, k)}
    assert set(pairs) == all_pairs  # every (k, j) with T >= k > j >= 1 occurs, nothing else
    expected = draws / len(all_pairs)
    # Uniform over the 45 pairs: each count within 5 standard deviations of the binomial mean.
    sd = (expected * (1 - 1 / len(all_pairs))) ** 0.5
    assert all(abs(n - expected) < 5 * sd for n in pairs.values()), pairs


def test_same_seed_same_draws_regardless_of_global_rng():
    a, b = AnchorSampler(25, 2, seed=7), AnchorSampler(25, 2, seed=7)
    torch.manual_seed(0)
    seq_a = [a.sample() for _ in range(50)]
    torch.manual_seed(123)  # a different global stream (as each rank has) must not matter
    torch.rand(17)
    seq_b = [b.sample() for _ in range(50)]
    assert seq_a == seq_b
    assert [AnchorSampler(25, 2, seed=8).sample() for _ in range(50)] != seq_a


def test_state_dict_resumes_the_sequence():
    sampler = AnchorSampler(25, 3, seed=3)
    for _ in range(5):
        sampler.sample()
    state = sampler.state_dict()
    rest = [sampler.sample() for _ in range(10)]
    resumed = AnchorSampler(25, 3, seed=999)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(10)] == rest


def test_restricted_range_keeps_anchors_inside():
    sampler = AnchorSampler(25, 2, min_level=3, max_level=12, seed=0)
    seen = set()
    for _ in range(3000):
        levels = sampler.sample()
        assert all(3 <= level <= 12 for level in levels[:-1])
        seen.update(levels[:-1])
    assert seen == set(range(3, 13))


def test_fixed_distance_spaces_anchors_exactly():
    sampler = AnchorSampler(25, 3, fixed_distance=4, seed=0)
    tops = set()
    for _ in range(2000):
        k, j, i, zero = sampler.sample()
        assert k - j == 4 and j - i == 4 and i >= 1 and zero == 0
        tops.add(k)
    assert tops == set(range(9, 26))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=25, n_leaps=2, min_level=10, max_level=5), "empty"),
        (dict(num_steps=25, n_leaps=2, min_level=0), "min_level=0 must be >= 1"),
        (dict(num_steps=25, n_leaps=3, min_level=24, max_level=25), "3 leaps need 3 grid levels"),
        (dict(num_steps=1, n_leaps=2), "2 leaps need 2 grid levels"),
        (dict(num_steps=25, n_leaps=2, fixed_distance=25), "fixed_distance=25 does not fit"),
        (dict(num_steps=25, n_leaps=1, fixed_distance=3), "needs n_leaps >= 2"),
        (dict(num_steps=25, n_leaps=0), "n_leaps=0"),
    ],
)
def test_bad_configurations_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorSampler(**kwargs)


def test_levels_map_to_grid_positions_and_times():
    grid = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.0])  # T = 4, non-uniform
    assert anchor_positions((3, 1, 0), 4) == [1, 3, 4]
    assert anchor_times((3, 1, 0), grid) == pytest.approx([0.9, 0.4, 0.0])
    assert anchor_times((4, 0), grid) == pytest.approx([1.0, 0.0])


def _draw_on_rank(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(1000 + rank)  # each rank's own noise stream differs, as in training
        torch.rand(rank + 1)
        sampler = AnchorSampler(25, 2, seed=42)
        draws = [sampler.sample() for _ in range(100)]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, draws)
        if rank == 0:
            queue.put(gathered)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_draw_the_same_anchors():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_draw_on_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    gathered = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert gathered[0] == gathered[1]
    assert len(set(gathered[0])) > 10

"""The leap trajectory is the paper's: gradient identities in float64, exact connector values, validation."""

from __future__ import annotations

import pytest
import torch

from engine.leap import LeapPath, hinge, leap_path, similarity_weight

DIM = 6
BATCH = 3


class LinearVelocity(torch.nn.Module):
    """v_θ(x, t) = W x + t·u + b: ∂v/∂x = W everywhere, so the paper's closed-form gradient is exact."""

    def __init__(self, dim: int = DIM, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.u = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.W.T + t[:, None] * self.u + self.b


class MLPVelocity(torch.nn.Module):
    """A nonlinear velocity field (∂v/∂x depends on x) for identities that hold for any model."""

    def __init__(self, dim: int = DIM, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim))
        self.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def params_grad(model: torch.nn.Module, scalar: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(scalar, list(model.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(model.parameters(), grads)])


def vjp_params(model, x, t, y):
    """∂⟨y, v(x, t)⟩/∂θ with x held fixed: y^T ∂v(x)/∂θ."""
    return params_grad(model, (y * model(x.detach(), t)).sum())


def rollout_anchors(model, times, seed=0, noise_scale=0.05):
    """Anchors of a 'rollout': leaps plus a perturbation, so that rollout latents differ from the leap predictions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    latents = [x]
    with torch.no_grad():
        for t_prev, t_next in zip(times[:-1], times[1:]):
            t_prev_b = torch.as_tensor(t_prev, dtype=torch.float64).expand(BATCH)
            t_next_b = torch.as_tensor(t_next, dtype=torch.float64).expand(BATCH)
            x = x - (t_prev_b - t_next_b)[:, None] * model(x, t_prev_b)
            x = x + noise_scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
            latents.append(x)
    return latents


def per_sample(t):
    return torch.as_tensor(t, dtype=torch.float64).expand(BATCH) if not torch.is_tensor(t) or t.dim() == 0 else t


# Per-sample anchors on a non-uniform (FLUX-like shifted) grid: each sample has its own k, j.
TWO_LEAP_TIMES = [torch.tensor([0.97, 0.81, 0.55], dtype=torch.float64), torch.tensor([0.42, 0.13, 0.31]), 0.0]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_two_leap_gradient_is_the_papers_identity(alpha):
    model = LinearVelocity()
    k, j = per_sample(TWO_LEAP_TIMES[0]), per_sample(TWO_LEAP_TIMES[1]).double()
    latents = rollout_anchors(model, [k, j, 0.0])
    c = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    path = leap_path(model, latents, [k, j, 0.0], alpha)
    got = params_grad(model, (c * path.x0).sum())

    x_k, x_j = latents[0], latents[1]
    # ∂x_0/∂θ = -j ∂v(x_j)/∂θ - (k-j) ∂v(x_k)/∂θ + α j (k-j) (∂v/∂x) ∂v(x_k)/∂θ, contracted with c per sample.
    single_j = vjp_params(model, x_j, j, c * j[:, None])
    single_k = vjp_params(model, x_k, k, c * (k - j)[:, None])
    w_t_c = c @ model.W.detach()  # (∂v/∂x)^T c = W^T c, as rows
    nested = vjp_params(model, x_k, k, w_t_c * (j * (k - j))[:, None])
    expected = -single_j - single_k + alpha * nested
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert nested.abs().max() > 1e-3, "the nested term must be non-trivial for this test to mean anything"


def test_alpha_zero_removes_exactly_the_nested_term():
    model = LinearVelocity()
    times = TWO_LEAP_TIMES
    latents = rollout_anchors(model, times)
    c = torch.randn(BATCH, DIM, dtype=torch.float64)
    grads = {a: params_grad(model, (c * leap_path(model, latents, times, a).x0).sum()) for a in (0.0, 0.3, 1.0)}
    # Linear in α: g(α) = g(0) + α·nested.
    torch.testing.assert_close(grads[0.3] - grads[0.0], 0.3 * (grads[1.0] - grads[0.0]), rtol=1e-12, atol=1e-12)
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-3


def unconnected_leaps(model, x, times):
    """Plain autograd through the leaps with no connectors: x̂ feeds the next leap directly."""
    for t_prev, t_next in zip(times[:-1], times[1:]):
        t_prev, t_next = per_sample(t_prev), per_sample(t_next)
        x = x - (t_prev - t_next)[:, None] * model(x, t_prev)
    return x


@pytest.mark.parametrize("model_cls", [LinearVelocity, MLPVelocity])
@pytest.mark.parametrize("times", [[0.9, 0.0], TWO_LEAP_TIMES, [0.95, 0.7, 0.3, 0.0]], ids=["1leap", "2leap", "3leap"])
def test_alpha_one_equals_plain_autograd_through_unconnected_leaps(model_cls, times):
    model = model_cls()
    g = torch.Generator().manual_seed(3)
    x_start = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    # A rollout whose anchors *are* the leap predictions: the connectors change nothing, so α=1 must equal autograd.
    latents = [x_start]
    with torch.no_grad():
        for i in range(1, len(times)):
            latents.append(unconnected_leaps(model, x_start, times[: i + 1]))
    c = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    got = params_grad(model, (c * leap_path(model, latents, times, 1.0).x0).sum())
    expected = params_grad(model, (c * unconnected_leaps(model, x_start, times)).sum())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def closed_form_gradient(model, latents, times, alpha, c):
    """y^T ∂x_0/∂θ for a linear field, by the reverse recursion of the leap chain.

    x̂_{i+1} = x_i - Δ_i·v(α x_i + (1-α) sg(x_i)) with ∂v/∂x = W gives ∂x_{i+1} = (I - α Δ_i W) ∂x_i - Δ_i ∂_θ v(x_i)
    (α = 1 for the first leap is irrelevant: x_k is a constant). Walking back from x_0 with y ← (I - α Δ W)^T y.
    """
    ts = [per_sample(t).double() for t in times]
    y = c.clone()
    total = torch.zeros_like(params_grad(model, (c * model(latents[0], ts[0])).sum()))
    W = model.W.detach()
    for i in reversed(range(len(latents) - 1)):
        delta = (ts[i] - ts[i + 1])[:, None]
        total -= vjp_params(model, latents[i], ts[i], y * delta)
        y = y - alpha * delta * (y @ W)
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("times", [[0.9, 0.0], TWO_LEAP_TIMES, [0.95, 0.7, 0.3, 0.0]], ids=["1leap", "2leap", "3leap"])
def test_n_leap_gradient_matches_closed_form(alpha, times):
    model = LinearVelocity()
    latents = rollout_anchors(model, times)
    c = torch.randn(BATCH, DIM, dtype=torch.float64)
    got = params_grad(model, (c * leap_path(model, latents, times, alpha).x0).sum())
    torch.testing.assert_close(got, closed_form_gradient(model, latents, times, alpha, c), rtol=1e-12, atol=1e-12)


def test_one_leap_gradient_is_minus_k_dv():
    model = LinearVelocity()
    latents = rollout_anchors(model, [0.6, 0.0])
    c = torch.randn(BATCH, DIM, dtype=torch.float64)
    got = params_grad(model, (c * leap_path(model, latents, [0.6, 0.0], 0.3).x0).sum())
    torch.testing.assert_close(got, -0.6 * vjp_params(model, latents[0], per_sample(0.6), c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_leaps", [1, 2, 3])
def test_connected_latents_are_the_rollout_latents_bit_for_bit(dtype, n_leaps):
    model = MLPVelocity().to(dtype)
    times = [1.0, 0.7, 0.35, 0.0][-(n_leaps + 1) :]
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(BATCH, DIM, generator=g).to(dtype) for _ in times]
    path = leap_path(lambda x, t: model(x.to(dtype), t), latents, times, 0.3)
    assert isinstance(path, LeapPath) and path.n_leaps == n_leaps
    for connected, latent in zip(path.connected, latents[1:]):
        # Leap arithmetic runs in float32 (float64 for float64): the bf16 latent enters exactly.
        assert connected.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(connected, latent.to(connected.dtype))
    assert path.x0 is path.connected[-1]


def test_predictions_and_distances_match_a_direct_computation():
    model = MLPVelocity()
    times = [torch.tensor([0.9, 0.8, 0.99], dtype=torch.float64), 0.4, 0.0]
    latents = rollout_anchors(model, times, noise_scale=0.2)
    path = leap_path(model, latents, times, 0.3)
    with torch.no_grad():
        k = per_sample(times[0])
        x_hat_j = latents[0] - (k - 0.4)[:, None] * model(latents[0], k)
        x_hat_0 = latents[1] - 0.4 * model(latents[1], per_sample(0.4))
    torch.testing.assert_close(path.predictions[0].detach(), x_hat_j, rtol=0, atol=1e-14)
    torch.testing.assert_close(path.predictions[1].detach(), x_hat_0, rtol=0, atol=1e-14)
    expected = torch.stack([(latents[1] - x_hat_j).abs().mean(1), (latents[2] - x_hat_0).abs().mean(1)], dim=1)
    torch.testing.assert_close(path.distances.double(), expected, rtol=1e-6, atol=1e-7)
    assert path.distances.shape == (BATCH, 2) and not path.distances.requires_grad


def test_gradient_flows_only_through_the_leaps():
    """x_k is a constant; no gradient reaches the rollout latents, and the velocity is called once per leap."""
    model = MLPVelocity()
    times = [0.8, 0.5, 0.0]
    latents = [x.clone().requires_grad_(True) for x in rollout_anchors(model, times)]
    calls = []
    path = leap_path(lambda x, t: (calls.append(t), model(x, t))[1], latents, times, 0.3)
    path.x0.sum().backward()
    assert len(calls) == 2
    assert all(x.grad is None for x in latents)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_similarity_weight_and_hinge():
    d = torch.tensor([[0.05, 0.3], [0.2, 0.01], [0.5, 0.5]])
    torch.testing.assert_close(similarity_weight(d, 0.1), torch.tensor([1 / 0.4, 1 / 0.3, 1 / 1.0]))
    reward = torch.tensor([0.2, 0.6, 0.55], requires_grad=True)
    loss = hinge(reward, 0.55)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.35, 0.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(reward.grad, torch.tensor([-1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "latents,times,alpha,match",
    [
        (2, [0.5, 0.0, 0.0], 0.3, "2 latents but 3 times"),
        (1, [0.0], 0.3, "at least 2 anchors"),
        (3, [0.5, 0.6, 0.0], 0.3, "strictly decreasing"),
        (2, [0.5, 0.1], 0.3, "x_0 at time 0"),
        (2, [0.5, 0.0], 1.5, "alpha=1.5"),
    ],
)
def test_leap_path_rejects_bad_input(latents, times, alpha, match):
    xs = [torch.zeros(BATCH, DIM) for _ in range(latents)]
    with pytest.raises(ValueError, match=match):
        leap_path(lambda x, t: x, xs, times, alpha)

"""Every objective on the tiny FLUX and SD3 models: gradients, where they land, and exactness of the memory tricks."""

from __future__ import annotations

import pytest
import torch

from engine.models import FluxAdapter, SD3Adapter
from engine.objectives import OBJECTIVES, LeapAlign, Plan, StepBatch, build_objective
from engine.parallelize import apply_activation_checkpointing
from engine.rewards import RewardCriterion
from engine.rollout import rollout

STEPS = 6
SIZE = 32
PROMPTS = ["a red circle", "two blue squares"]
LAM = 10.0  # above any reward this test reward reaches: the hinge is active for every sample


def image_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """A differentiable stand-in reward: warm, bright, contrasted images score higher. images [B,3,H,W] in [0,1]."""
    red, blue = images[:, 0], images[:, 2]
    return red.mean(dim=(1, 2)) - 0.5 * blue.mean(dim=(1, 2)) + images.flatten(1).std(dim=1)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def adapter(request, tiny_flux_dir, tiny_sd3_dir):
    if request.param == "flux":
        model = FluxAdapter.from_pretrained(tiny_flux_dir, device="cpu", dtype=torch.float32)
    else:
        model = SD3Adapter.from_pretrained(tiny_sd3_dir, device="cpu", dtype=torch.float32)
    model.transformer.requires_grad_(True)
    return model


def guidance(adapter) -> float:
    return 3.5 if isinstance(adapter, FluxAdapter) else 4.0


def make_batch(adapter, objective, plan: Plan, seed: int = 0) -> StepBatch:
    negative = [""] * len(PROMPTS) if isinstance(adapter, SD3Adapter) else None
    cond = adapter.encode_prompts(PROMPTS, negative)
    x1 = adapter.prepare_noise(len(PROMPTS), SIZE, SIZE, [seed, seed + 1])
    grid = adapter.time_grid(STEPS, SIZE, SIZE)
    trajectory = rollout(
        adapter, cond, x1, grid, guidance_scale=guidance(adapter), keep=plan.positions, dtype=torch.float32
    )
    return StepBatch(
        adapter=adapter,
        cond=cond,
        prompts=PROMPTS,
        trajectory=trajectory,
        criterion=RewardCriterion.single(image_reward, LAM),
        height=SIZE,
        width=SIZE,
        guidance_scale=guidance(adapter),
        generator=torch.Generator().manual_seed(seed),
    )


def run_grads(adapter, objective, plan, batch=None):
    adapter.transformer.zero_grad(set_to_none=True)
    batch = batch or make_batch(adapter, objective, plan)
    out = objective.forward_backward(batch, plan)
    grads = {n: p.grad.clone() for n, p in adapter.transformer.named_parameters() if p.grad is not None}
    adapter.transformer.zero_grad(set_to_none=True)
    return out, grads


def flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize(
    "name,options",
    [
        ("leapalign", {"n_leaps": 1}),
        ("leapalign", {"n_leaps": 2}),
        ("leapalign", {"n_leaps": 3}),
        ("full_backprop", {}),
        ("full_backprop", {"truncate_steps": 2, "checkpoint_steps": False}),
        ("refl", {"last_steps": 3}),
        ("draft_lv", {}),
        ("drtune", {}),
    ],
)
def test_every_objective_gives_finite_nonzero_gradients(adapter, name, options):
    objective = build_objective(name, STEPS, **options)
    plan = objective.plan()
    out, grads = run_grads(adapter, objective, plan)
    total = flat(grads)
    assert torch.isfinite(total).all() and total.abs().sum() > 0
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.reward.shape == (len(PROMPTS),) and not out.reward.requires_grad


class GradRecorder:
    """Records the time of every transformer call whose output receives a non-zero gradient."""

    def __init__(self, module):
        self.times: list[float] = []
        self.handle = module.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        if out.requires_grad:
            t = float(kwargs["timestep"].flatten()[0])
            t = t / 1000 if t > 1.5 else t  # SD3 takes sigma·1000, FLUX sigma
            out.register_hook(lambda g: self.times.append(t) if g.abs().sum() > 0 else None)

    def close(self):
        self.handle.remove()


def gradient_times(adapter, objective, draws=8):
    recorder = GradRecorder(adapter.transformer)
    try:
        for _ in range(draws):
            plan = objective.plan()
            run_grads(adapter, objective, plan)
    finally:
        recorder.close()
    return recorder.times


def test_leapalign_reaches_early_steps_refl_and_draft_lv_only_late(adapter):
    grid = adapter.time_grid(STEPS, SIZE, SIZE)
    leap_times = gradient_times(adapter, LeapAlign(STEPS, seed=0), draws=10)
    # Uniform anchors over the full range: the noise end (t = 1) and early steps receive gradient.
    assert max(leap_times) == pytest.approx(1.0, abs=1e-3)
    refl_times = gradient_times(adapter, build_objective("refl", STEPS, last_steps=2))
    assert refl_times and max(refl_times) <= float(grid[STEPS - 2]) + 1e-4
    lv_times = gradient_times(adapter, build_objective("draft_lv", STEPS), draws=2)
    assert lv_times and all(t == pytest.approx(float(grid[STEPS - 1]), abs=1e-3) for t in lv_times)
    assert len(lv_times) == 2 * 3  # the last step plus two re-noisings, per draw


@pytest.mark.parametrize("n_leaps", [1, 2, 3])
def test_decoupled_reward_gradient_equals_coupled(adapter, n_leaps):
    coupled = LeapAlign(STEPS, n_leaps=n_leaps, decouple_reward=False, seed=3)
    decoupled = LeapAlign(STEPS, n_leaps=n_leaps, decouple_reward=True, seed=3)
    plan = coupled.plan()
    assert plan.draws == decoupled.plan().draws
    batch = make_batch(adapter, coupled, plan)
    out_c, grads_c = run_grads(adapter, coupled, plan, batch)
    out_d, grads_d = run_grads(adapter, decoupled, plan, batch)
    # float32, the same operations in a different association order: relative 1e-5 of the gradient's scale.
    scale = flat(grads_c).abs().max()
    torch.testing.assert_close(flat(grads_d), flat(grads_c), rtol=1e-5, atol=1e-5 * float(scale))
    torch.testing.assert_close(out_d.loss, out_c.loss, rtol=1e-6, atol=1e-7)


def test_several_leap_pairs_average_their_gradients(adapter):
    pairs = LeapAlign(STEPS, pairs_per_rollout=2, seed=5)
    plan = pairs.plan()
    batch = make_batch(adapter, pairs, plan)
    _, grads_pair = run_grads(adapter, pairs, plan, batch)
    singles = []
    for levels in plan.draws["levels"]:
        single_plan = Plan(positions=plan.positions, draws={"levels": [levels]})
        singles.append(flat(run_grads(adapter, LeapAlign(STEPS), single_plan, batch)[1]))
    expected = (singles[0] + singles[1]) / 2
    torch.testing.assert_close(flat(grads_pair), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["leapalign", "full_backprop"])
def test_activation_checkpointing_leaves_gradients_unchanged(adapter, name):
    objective = build_objective(name, STEPS)
    plan = objective.plan()
    batch = make_batch(adapter, objective, plan)
    _, plain = run_grads(adapter, objective, plan, batch)
    apply_activation_checkpointing(adapter.transformer, True)
    adapter.vae_gradient_checkpointing(True)
    try:
        _, checkpointed = run_grads(adapter, objective, plan, batch)
    finally:
        apply_activation_checkpointing(adapter.transformer, False)
        adapter.vae_gradient_checkpointing(False)
    assert plain.keys() == checkpointed.keys()
    torch.testing.assert_close(flat(checkpointed), flat(plain), rtol=1e-6, atol=1e-7)


def test_full_backprop_step_checkpointing_leaves_gradients_unchanged(adapter):
    plain = build_objective("full_backprop", STEPS, checkpoint_steps=False)
    stepped = build_objective("full_backprop", STEPS, checkpoint_steps=True)
    plan = plain.plan()
    batch = make_batch(adapter, plain, plan)
    _, g_plain = run_grads(adapter, plain, plan, batch)
    _, g_stepped = run_grads(adapter, stepped, plan, batch)
    torch.testing.assert_close(flat(g_stepped), flat(g_plain), rtol=1e-6, atol=1e-7)


def test_leapalign_without_similarity_weight_uses_unit_weight(adapter):
    objective = LeapAlign(STEPS, similarity_weight=False, seed=1)
    plan = objective.plan()
    out, _ = run_grads(adapter, objective, plan)
    assert float(out.metrics["w"]) == 1.0
    assert out.loss == pytest.approx(float(out.metrics["loss_raw"]))


def test_drtune_trains_on_its_no_grad_prediction_value(adapter):
    """The Σ Δ·(v − sg(v)) construction leaves x̂_0's value exactly the no-grad prediction at the stop step."""
    objective = build_objective("drtune", STEPS, seed=2)
    plan = objective.plan()
    assert len(plan.draws["train"]) == 2 and max(plan.draws["train"]) < plan.draws["stop"]
    batch = make_batch(adapter, objective, plan)
    out, _ = run_grads(adapter, objective, plan, batch)
    stop = plan.draws["stop"]
    with torch.no_grad():
        x_s = batch.latent(stop)
        x0_hat = x_s - batch.time(stop) * batch.velocity(x_s, batch.times(stop))
        expected = torch.clamp(LAM - image_reward(batch.adapter.decode(x0_hat, SIZE, SIZE), PROMPTS), min=0).mean()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)


def test_plans_use_a_shared_generator_and_resume():
    for name in OBJECTIVES:
        a, b = build_objective(name, 25, seed=4), build_objective(name, 25, seed=4)
        assert [a.plan().draws for _ in range(5)] == [b.plan().draws for _ in range(5)]
        state = a.state_dict()
        rest = [a.plan().draws for _ in range(3)]
        c = build_objective(name, 25, seed=99)
        c.load_state_dict(state)
        assert [c.plan().draws for _ in range(3)] == rest


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("leapalign", {"alpha": 1.2}, "alpha=1.2"),
        ("leapalign", {"tau": 0.0}, "tau=0.0"),
        ("leapalign", {"n_leaps": 3, "min_level": 5, "max_level": 6}, "3 leaps need 3 grid levels"),
        ("refl", {"last_steps": 30}, "last_steps=30"),
        ("full_backprop", {"truncate_steps": 0}, "truncate_steps=0"),
        ("drtune", {"stop_fraction": 0.0}, "stop_fraction=0.0"),
        ("grpo", {}, "objective 'grpo' is unknown"),
    ],
)
def test_bad_objective_options_raise_named_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_objective(name, 25, **options)

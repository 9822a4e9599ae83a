"""BatchRenorm1d against a separate transcription of Ioffe (2017), Algorithm 1 (forward, backward through
autograd, running statistics), gradcheck where r and d are clipped, BatchNorm1d when r_max = 1 and d_max = 0,
the warm-up schedule in closed form, and random shapes and options (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from normlab import nn as nnl

from .cases import assert_twin_close

DTYPE = torch.float64


def algorithm_1(x, gamma, beta, running_mean, running_var, r_max, d_max, eps, momentum, stop_gradient=True):
    """Ioffe 2017, Algorithm 1, one training step, per channel over every axis but 1 of (N, C) or (N, C, L) x.

    Returns y, the new running mean and variance, and r. As normlab (and BatchNorm) do, the running variance
    is averaged instead of the paper's σ, and it takes the unbiased batch variance; σ = √(running_var + ε).
    """
    dims = [0] if x.dim() == 2 else [0, 2]
    shape = [1, -1] + [1] * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    mu_b = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(eps + ((x - mu_b) ** 2).mean(dims, keepdim=True))
    mu, sigma = running_mean.view(shape), torch.sqrt(running_var + eps).view(shape)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    x_hat = (x - mu_b) / sigma_b * r + d
    y = x_hat if gamma is None else gamma.view(shape) * x_hat
    y = y if beta is None else y + beta.view(shape)
    var_b = ((x - mu_b) ** 2).sum(dims) / (m - 1)
    new_mean = running_mean + momentum * (mu_b.view(-1).detach() - running_mean)
    new_var = running_var + momentum * (var_b.detach() - running_var)
    return y, new_mean, new_var, r.view(-1)


def expected_limits(t, r_max, d_max, hold, warmup):
    """The schedule as the docstring states it, written out again."""
    if t < hold:
        return 1.0, 0.0
    progress = 1.0 if warmup == 0 else min((t - hold) / warmup, 1.0)
    return 1.0 + (r_max - 1.0) * progress, d_max * progress


def _layer(channels, seed=0, **options):
    """A BatchRenorm1d with running statistics far from a unit batch's, so that some r and d clip."""
    layer = nnl.BatchRenorm1d(channels, dtype=DTYPE, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(channels, dtype=DTYPE, generator=generator) * 3)
        layer.running_var.copy_(torch.rand(channels, dtype=DTYPE, generator=generator) * 8 + 0.05)
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5, generator=generator)
        if layer.bias is not None:
            layer.bias.normal_(0.0, 1.0, generator=generator)
    return layer


def _compare_with_algorithm_1(layer, shapes, seed=1):
    """Train `layer` on batches of `shapes`; every step against the transcription. Returns every step's r."""
    generator = torch.Generator().manual_seed(seed)
    rs = []
    for step, shape in enumerate(shapes):
        t = int(layer.num_batches_tracked)
        r_max, d_max = expected_limits(t, layer.r_max, layer.d_max, layer.hold_steps, layer.warmup_steps)
        assert (layer.current_r_max, layer.current_d_max) == pytest.approx((r_max, d_max))
        momentum = 1.0 / (t + 1) if layer.momentum is None else layer.momentum
        x = torch.randn(shape, dtype=DTYPE, generator=generator) * 2 + 0.5
        grad_output = torch.randn(shape, dtype=DTYPE, generator=generator)
        params = [p.detach().clone().requires_grad_() if p is not None else None for p in (layer.weight, layer.bias)]
        leaf = x.clone().requires_grad_()
        expected, new_mean, new_var, r = algorithm_1(leaf, *params, layer.running_mean.clone(),
                                                     layer.running_var.clone(), r_max, d_max, layer.eps, momentum)
        expected.backward(grad_output)
        rs.append((r, r_max))

        layer.zero_grad(set_to_none=True)
        actual_leaf = x.clone().requires_grad_()
        actual = layer(actual_leaf)
        actual.backward(grad_output)
        assert_twin_close(actual, expected.detach(), DTYPE, f"output at step {step}")
        assert_twin_close(actual_leaf.grad, leaf.grad, DTYPE, f"input gradient at step {step}")
        for name, mine, theirs in (("weight", layer.weight, params[0]), ("bias", layer.bias, params[1])):
            if theirs is not None:
                assert_twin_close(mine.grad, theirs.grad, DTYPE, f"gradient of {name} at step {step}")
        assert_twin_close(layer.running_mean, new_mean, DTYPE, f"running_mean after step {step}")
        assert_twin_close(layer.running_var, new_var, DTYPE, f"running_var after step {step}")
        assert int(layer.num_batches_tracked) == t + 1
    return rs


def test_training_follows_algorithm_1_through_the_warm_up():
    layer = _layer(4, r_max=1.5, d_max=1.0, warmup_steps=3, hold_steps=1, momentum=0.05)
    rs = _compare_with_algorithm_1(layer, [(8, 4)] * 3 + [(6, 4, 3)] * 4)
    clipped = [((r - r_max).abs() < 1e-12) | ((r - 1 / r_max).abs() < 1e-12) for r, r_max in rs]
    after_warm_up = torch.stack(clipped[4:])
    assert after_warm_up.any() and not after_warm_up.all()  # both branches of the clip were exercised


@pytest.mark.parametrize("options", [{"momentum": None}, {"affine": False}, {"bias": False},
                                     {"warmup_steps": 0, "r_max": 1.5, "d_max": 0.5}],
                         ids=["momentum-None", "affine-False", "bias-False", "no-warm-up"])
def test_options_follow_algorithm_1(options):
    _compare_with_algorithm_1(_layer(3, seed=2, **{"warmup_steps": 2, **options}), [(5, 3, 2)] * 4)


def test_no_gradient_flows_through_r_and_d():
    layer = _layer(3, r_max=4.0, d_max=4.0, warmup_steps=0)
    x = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(3)).requires_grad_()
    grad_output = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    buffers = layer.running_mean.clone(), layer.running_var.clone()
    (actual,) = torch.autograd.grad(layer(x), x, grad_output)
    gradients = {}
    for stop in (True, False):
        y = algorithm_1(x, layer.weight, layer.bias, *buffers, 4.0, 4.0, layer.eps, 0.1, stop_gradient=stop)[0]
        (gradients[stop],) = torch.autograd.grad(y, x, grad_output)
    assert_twin_close(actual, gradients[True], DTYPE, "input gradient")
    assert (actual - gradients[False]).abs().max() > 1e-3  # the check can tell the two apart


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2)], ids=str)
def test_gradcheck_where_r_and_d_are_clipped(shape):
    # Where r and d are clipped they are constant near x, so the stop-gradient backward is the true derivative
    # that gradcheck's finite differences measure; unclipped, the two differ by design (see the test above).
    layer = nnl.BatchRenorm1d(3, momentum=0.0, r_max=1.2, d_max=0.1, warmup_steps=0, dtype=DTYPE)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([5.0, -5.0, 5.0]))
        layer.running_var.copy_(torch.tensor([100.0, 0.01, 0.01]))
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, dtype=DTYPE, generator=generator) + 0.5).requires_grad_()
    weight = torch.rand(3, dtype=DTYPE, generator=generator).add(0.5).requires_grad_()
    bias = torch.randn(3, dtype=DTYPE, generator=generator).requires_grad_()

    def renorm(x, weight, bias):
        return functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(renorm, (x, weight, bias), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("t, hold, warmup", [(t, 2, 4) for t in range(8)] + [(0, 0, 0), (3, 5, 0), (5, 5, 0)])
def test_schedule_relaxes_the_limits_linearly_after_the_hold(t, hold, warmup):
    layer = nnl.BatchRenorm1d(2, r_max=3.0, d_max=4.0, warmup_steps=warmup, hold_steps=hold)
    layer.num_batches_tracked.fill_(t)
    assert (layer.current_r_max, layer.current_d_max) == pytest.approx(expected_limits(t, 3.0, 4.0, hold, warmup))


def test_schedule_reaches_the_final_limits_after_hold_plus_warm_up():
    layer = nnl.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=20_000, hold_steps=5_000)
    for t, limits in ((0, (1.0, 0.0)), (5_000, (1.0, 0.0)), (15_000, (2.0, 2.5)), (25_000, (3.0, 5.0))):
        layer.num_batches_tracked.fill_(t)
        assert (layer.current_r_max, layer.current_d_max) == pytest.approx(limits)


def _batch_norm_twins(**options):
    reference = torch.nn.BatchNorm1d(3, dtype=DTYPE, **options)
    twin = nnl.BatchRenorm1d(3, r_max=1.0, d_max=0.0, dtype=DTYPE, **options)
    return reference, twin


def test_eval_is_batch_norm_eval_whatever_the_limits():
    reference = torch.nn.BatchNorm1d(3, dtype=DTYPE)
    twin = _layer(3, r_max=5.0, d_max=5.0, warmup_steps=0)
    reference.load_state_dict(twin.state_dict())
    reference.eval()
    twin.eval()
    x = torch.randn(5, 3, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    assert_twin_close(twin(x), reference(x), DTYPE, "eval output")
    assert int(twin.num_batches_tracked) == 0


def test_batch_norm_state_dict_loads_and_resumes_the_schedule():
    source = torch.nn.BatchNorm1d(3)
    source.num_batches_tracked.fill_(150)
    layer = nnl.BatchRenorm1d(3, r_max=3.0, d_max=5.0, warmup_steps=300)
    layer.load_state_dict(source.state_dict(), strict=True)
    assert (layer.current_r_max, layer.current_d_max) == pytest.approx((2.0, 2.5))
    torch.nn.BatchNorm1d(3).load_state_dict(layer.state_dict(), strict=True)


def test_repr_shows_limits_and_schedule():
    assert repr(nnl.BatchRenorm1d(4, hold_steps=10)) == (
        "BatchRenorm1d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, r_max=3.0, "
        "d_max=5.0, warmup_steps=5000, hold_steps=10)")


@pytest.mark.parametrize("options, mentions", [
    ({"r_max": 0.5}, "r_max"), ({"r_max": float("inf")}, "r_max"), ({"d_max": -1.0}, "d_max"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 2.5}, "warmup_steps"), ({"hold_steps": -3}, "hold"),
])
def test_bad_options_are_named(options, mentions):
    with pytest.raises(ValueError, match=mentions):
        nnl.BatchRenorm1d(3, **options)


def test_training_single_value_and_missing_buffers_raise():
    layer = nnl.BatchRenorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    layer.running_var = None
    with pytest.raises(RuntimeError, match="needs running_mean and running_var"):
        layer(torch.randn(4, 3))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(2, 7), channels=st.integers(1, 4), length=st.sampled_from([None, 1, 3]),
       momentum=st.sampled_from([None, 0.1, 0.9]), affine=st.booleans(), bias=st.booleans(),
       r_max=st.sampled_from([1.0, 1.5, 3.0]), d_max=st.sampled_from([0.0, 0.5, 5.0]),
       warmup=st.integers(0, 3), hold=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_random_shapes_and_options_follow_algorithm_1(batch, channels, length, momentum, affine, bias, r_max,
                                                      d_max, warmup, hold, seed):
    shape = (batch, channels) if length is None else (batch, channels, length)
    layer = _layer(channels, seed=seed, momentum=momentum, affine=affine, bias=bias, r_max=r_max, d_max=d_max,
                   warmup_steps=warmup, hold_steps=hold)
    _compare_with_algorithm_1(layer, [shape] * 3, seed=seed)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(batch=st.integers(2, 7), length=st.sampled_from([None, 2]), momentum=st.sampled_from([None, 0.1]),
       affine=st.booleans(), seed=st.integers(0, 2**16))
def test_without_room_to_correct_it_is_batch_norm(batch, length, momentum, affine, seed):
    shape = (batch, 3) if length is None else (batch, 3, length)
    reference, twin = _batch_norm_twins(momentum=momentum, affine=affine)
    generator = torch.Generator().manual_seed(seed)
    for module in (reference, twin):
        module.running_mean.fill_(4.0)  # far from the batch's, so that any r ≠ 1 or d ≠ 0 would show
    for mode in ("train", "train", "eval"):
        x = torch.randn(shape, dtype=DTYPE, generator=generator)
        for module in (reference, twin):
            module.train(mode == "train")
        leaves = x.clone().requires_grad_(), x.clone().requires_grad_()
        outputs = reference(leaves[0]), twin(leaves[1])
        for output in outputs:
            output.backward(torch.ones_like(output) + x)
        assert_twin_close(outputs[1], outputs[0], DTYPE, f"{mode} output")
        assert_twin_close(leaves[1].grad, leaves[0].grad, DTYPE, f"{mode} input gradient")
        assert_twin_close(twin.state_dict()["running_var"], reference.state_dict()["running_var"], DTYPE, "var")
        assert torch.equal(twin.num_batches_tracked, reference.num_batches_tracked)

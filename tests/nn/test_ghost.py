"""GhostBatchNorm1d against torch.nn.BatchNorm1d called on the ghost batches one after another: outputs,
input and parameter gradients and buffers over several steps; the remainder chunk; the single-value error;
eval; random shapes and options (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import nn as nnl

from .cases import assert_twin_close, randomize_

STEPS = 3


def _twins(channels: int, ghost: int, dtype=torch.float64, **options):
    """torch's BatchNorm1d with random state, and a GhostBatchNorm1d loaded with it."""
    reference = torch.nn.BatchNorm1d(channels, dtype=dtype, **options)
    randomize_(reference, torch.Generator().manual_seed(0))
    twin = nnl.GhostBatchNorm1d(channels, ghost, dtype=dtype, **options)
    twin.load_state_dict(reference.state_dict())
    return reference, twin


def _chunked(reference: torch.nn.Module, ghost: int):
    """The reference: torch's BatchNorm1d applied to consecutive chunks of `ghost` examples."""
    return lambda x: torch.cat([reference(chunk) for chunk in x.split(ghost)])


def _step(forward, module, x, seed):
    module.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    output = forward(leaf)
    output.backward(torch.randn(output.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed)))
    return output.detach(), leaf.grad, {name: p.grad for name, p in module.named_parameters()}


def _assert_trains_like_chunked_batch_norm(shape, ghost, dtype=torch.float64, steps=STEPS, **options):
    reference, twin = _twins(shape[1], ghost, dtype, **options)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = (torch.randn(shape, dtype=torch.float64, generator=generator) * 2 + 0.5).to(dtype)
        expected, expected_dx, expected_grads = _step(_chunked(reference, ghost), reference, x, step)
        actual, actual_dx, actual_grads = _step(twin, twin, x, step)
        assert_twin_close(actual, expected, dtype, f"output at step {step}")
        assert_twin_close(actual_dx, expected_dx, dtype, f"input gradient at step {step}")
        assert actual_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            assert_twin_close(actual_grads[name], grad, dtype, f"gradient of {name} at step {step}")
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            assert_twin_close(twin.state_dict()[key], value, dtype, key)
        else:
            assert torch.equal(twin.state_dict()[key], value), key


CHUNKINGS = {
    "even-chunks": ((12, 3), 4, {}),
    "remainder-of-2": ((10, 3), 4, {}),
    "remainder-of-one-example-of-3-values": ((7, 2, 3), 2, {}),
    "(N,C,L)-momentum-None": ((9, 3, 2), 4, {"momentum": None}),
    "affine-False": ((8, 3), 3, {"affine": False}),
    "bias-False": ((8, 3), 3, {"bias": False}),
    "track_running_stats-False": ((8, 3), 3, {"track_running_stats": False}),
    "ghost-equals-batch": ((6, 3), 6, {}),
    "ghost-larger-than-batch": ((6, 3), 64, {}),
}


@pytest.mark.parametrize("shape, ghost, options", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_trains_like_batch_norm_on_consecutive_chunks(shape, ghost, options):
    _assert_trains_like_chunked_batch_norm(shape, ghost, **options)


def test_float32_trains_like_batch_norm_on_consecutive_chunks():
    _assert_trains_like_chunked_batch_norm((32, 4, 2), 8, torch.float32)


def test_one_momentum_update_per_chunk_in_closed_form():
    layer = nnl.GhostBatchNorm1d(2, 3, momentum=None, affine=False, dtype=torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layer(x)
    chunks = x.split(3)  # 3 + 3 + 2 examples: momentum None averages the three chunks with equal weight
    assert int(layer.num_batches_tracked) == math.ceil(8 / 3) == 3
    torch.testing.assert_close(layer.running_mean, torch.stack([c.mean(0) for c in chunks]).mean(0),
                               atol=1e-14, rtol=0)
    torch.testing.assert_close(layer.running_var, torch.stack([c.var(0) for c in chunks]).mean(0),
                               atol=1e-14, rtol=0)
    second_chunk = (chunks[1] - chunks[1].mean(0)) / torch.sqrt(chunks[1].var(0, correction=0) + layer.eps)
    layer.num_batches_tracked.zero_()
    torch.testing.assert_close(layer(x)[3:6], second_chunk, atol=1e-14, rtol=0)


def test_last_chunk_of_one_value_raises_before_touching_state():
    _, twin = _twins(3, 4)
    before = {key: value.clone() for key, value in twin.state_dict().items()}
    with pytest.raises(ValueError, match=r"last ghost batch .* holds 1 example"):
        twin(torch.randn(9, 3, dtype=torch.float64))  # 4 + 4 + 1
    for key, value in twin.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_single_chunk_of_one_value_is_counted_then_rejected_like_batch_norm():
    reference, twin = _twins(3, 4)
    for module in (reference, twin):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(torch.randn(1, 3, dtype=torch.float64))
    assert int(twin.num_batches_tracked) == int(reference.num_batches_tracked) == 4


@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
def test_eval_is_batch_norm_eval_on_the_whole_batch(track):
    reference, twin = _twins(3, 2, track_running_stats=track)
    reference.eval()
    twin.eval()
    x = torch.randn(6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected, expected_dx, _ = _step(reference, reference, x, 4)
    actual, actual_dx, _ = _step(twin, twin, x, 4)
    assert_twin_close(actual, expected, torch.float64, "eval output")
    assert_twin_close(actual_dx, expected_dx, torch.float64, "eval input gradient")


def test_state_dicts_load_both_ways_and_repr_names_the_ghost_batch_size():
    reference, twin = _twins(3, 5)
    twin(torch.randn(12, 3, dtype=torch.float64))
    torch.nn.BatchNorm1d(3, dtype=torch.float64).load_state_dict(twin.state_dict(), strict=True)
    nnl.GhostBatchNorm1d(3, 2, dtype=torch.float64).load_state_dict(reference.state_dict(), strict=True)
    assert repr(twin) == ("GhostBatchNorm1d(3, ghost_batch_size=5, eps=1e-05, momentum=0.1, affine=True, "
                          "bias=True, track_running_stats=True)")


@pytest.mark.parametrize("ghost, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)])
def test_ghost_batch_size_must_be_a_positive_int(ghost, error):
    with pytest.raises(error, match="ghost_batch_size"):
        nnl.GhostBatchNorm1d(3, ghost)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 2, 2)], ids=str)
def test_wrong_rank_raises_like_batch_norm_1d(shape):
    with pytest.raises(ValueError, match=f"got {len(shape)}D input.*GhostBatchNorm1d takes"):
        nnl.GhostBatchNorm1d(3, 2)(torch.randn(shape))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(0, 12), ghost=st.integers(1, 8), channels=st.integers(1, 4),
       length=st.sampled_from([None, 1, 3]), momentum=st.sampled_from([None, 0.1, 0.9]), affine=st.booleans(),
       track=st.booleans())
def test_random_chunkings_train_like_chunked_batch_norm(batch, ghost, channels, length, momentum, affine, track):
    shape = (batch, channels) if length is None else (batch, channels, length)
    chunks = torch.empty(shape).split(ghost)
    single_values = [c.shape[0] * (length or 1) == 1 for c in chunks]
    options = dict(momentum=momentum, affine=affine, track_running_stats=track)
    if any(single_values):  # only the last chunk can be that small; torch rejects it, and so must we
        _, twin = _twins(channels, ghost, **options)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            twin(torch.randn(shape, dtype=torch.float64))
        return
    _assert_trains_like_chunked_batch_norm(shape, ghost, steps=2, **options)

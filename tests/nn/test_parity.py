"""Generic parity tests: every case of the table against its torch.nn twin, in float32 and float64.

Forward output, input gradient and every parameter's gradient over several training steps; running buffers
after them; eval output; state dicts loaded both ways; registration order and repr.
"""

import pytest
import torch

from normlab import nn as nnl

from .cases import CASES_AND_DTYPES, assert_twin_close, build_twins, make_input

STEPS = 3

cases = pytest.mark.parametrize("case, dtype", CASES_AND_DTYPES, ids=str)


def _step(module: torch.nn.Module, batch: torch.Tensor, grad_output_seed: int):
    """One forward and backward pass: (output, input gradient or None, {parameter name: gradient})."""
    module.zero_grad(set_to_none=True)
    leaf = batch.clone().requires_grad_(batch.is_floating_point())
    output = module(leaf.clone())  # a non-leaf, so in-place layers may overwrite it
    generator = torch.Generator().manual_seed(grad_output_seed)
    grad_output = torch.randn(output.shape, dtype=output.dtype, generator=generator)
    output.backward(grad_output)
    return output.detach(), leaf.grad, {name: p.grad for name, p in module.named_parameters()}


def _train(reference, twin, case, dtype, steps=STEPS):
    """Run both modules through the same training batches, asserting each step agrees."""
    generator = torch.Generator().manual_seed(1)
    reference.train()
    twin.train()
    for step in range(steps):
        batch = make_input(case, dtype, generator)
        expected, expected_dx, expected_grads = _step(reference, batch, step)
        actual, actual_dx, actual_grads = _step(twin, batch, step)
        assert_twin_close(actual, expected, dtype, f"output at step {step}")
        if expected_dx is not None:
            assert_twin_close(actual_dx, expected_dx, dtype, f"input gradient at step {step}")
        assert actual_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            assert_twin_close(actual_grads[name], grad, dtype, f"gradient of {name} at step {step}")


@cases
def test_training_forward_and_gradients_match_torch(case, dtype):
    reference, twin = build_twins(case, dtype)
    _train(reference, twin, case, dtype)


@cases
def test_buffers_after_training_steps_match_torch(case, dtype):
    reference, twin = build_twins(case, dtype)
    _train(reference, twin, case, dtype)
    expected, actual = reference.state_dict(), twin.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert_twin_close(actual[key], value, dtype, key)
        else:
            assert torch.equal(actual[key], value), key


@cases
def test_eval_output_matches_torch_after_training(case, dtype):
    reference, twin = build_twins(case, dtype)
    _train(reference, twin, case, dtype)
    reference.eval()
    twin.eval()
    batch = make_input(case, dtype, torch.Generator().manual_seed(2))
    expected, expected_dx, _ = _step(reference, batch, 7)
    actual, actual_dx, _ = _step(twin, batch, 7)
    assert_twin_close(actual, expected, dtype, "eval output")
    if expected_dx is not None:
        assert_twin_close(actual_dx, expected_dx, dtype, "eval input gradient")


@cases
def test_state_dict_loads_both_ways_with_strict(case, dtype):
    reference, twin = build_twins(case, dtype)
    _train(reference, twin, case, dtype, steps=2)
    torch_from_normlab = case.make(torch.nn, dtype)
    torch_from_normlab.load_state_dict(twin.state_dict(), strict=True)
    normlab_from_torch = case.make(nnl, dtype, **case.normlab_kwargs)
    normlab_from_torch.load_state_dict(reference.state_dict(), strict=True)
    batch = make_input(case, dtype, torch.Generator().manual_seed(3))
    for module in (reference, twin, torch_from_normlab, normlab_from_torch):
        module.eval()
    expected = reference(batch.clone())
    assert_twin_close(torch_from_normlab(batch.clone()), expected, dtype, "torch module loaded from normlab")
    assert_twin_close(normlab_from_torch(batch.clone()), expected, dtype, "normlab module loaded from torch")
    assert twin.state_dict()._metadata == reference.state_dict()._metadata


@cases
def test_parameters_and_buffers_are_registered_like_torch(case, dtype):
    reference, twin = build_twins(case, dtype)
    for (name, expected), (twin_name, actual) in zip(
        reference.named_modules(), twin.named_modules(), strict=True
    ):
        assert twin_name == name
        assert list(actual._parameters) == list(expected._parameters), name  # None entries included
        assert list(actual._buffers) == list(expected._buffers), name
        for key, tensor in expected.state_dict(keep_vars=True).items():
            other = actual.state_dict(keep_vars=True)[key]
            assert (other.dtype, other.shape, other.requires_grad) == (
                tensor.dtype, tensor.shape, tensor.requires_grad
            ), key


@cases
def test_repr_matches_torch(case, dtype):
    reference, twin = build_twins(case, dtype)
    expected = case.normlab_repr(repr(reference))
    if case.normlab_kwargs.get("closed_form_backward"):
        expected = expected[:-1] + ", closed_form_backward=True)"
    assert repr(twin) == expected

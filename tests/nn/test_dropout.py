"""normlab.nn.Dropout against torch.nn.Dropout: the same masks under the same seed, the closed form of inverted
dropout, eval mode as the identity, and masks drawn only from the layer's own generator."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import nn as nnl


def _torch_dropout(x: torch.Tensor, p: float, seed: int, inplace: bool = False) -> torch.Tensor:
    """torch.nn.Dropout in training mode with torch's global generator seeded `seed`, leaving the global state as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Dropout(p, inplace=inplace)(x)


@settings(max_examples=40, deadline=None)
@given(p=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9, 1.0]), shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       seed=st.integers(0, 2**32), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_training_output_and_gradient_equal_torchs_bit_for_bit_under_the_same_seed(p, shape, seed, dtype):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ours_in, torch_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = nnl.Dropout(p, generator=torch.Generator().manual_seed(seed))(ours_in)
    theirs = _torch_dropout(torch_in, p, seed)
    assert torch.equal(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.equal(ours_in.grad, torch_in.grad)


def test_inplace_overwrites_its_input_like_torch():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    ours, theirs = x.clone(), x.clone()
    nnl.Dropout(0.3, inplace=True, generator=torch.Generator().manual_seed(5))(ours)
    _torch_dropout(theirs, 0.3, 5, inplace=True)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_each_element_is_zeroed_with_probability_p_and_the_rest_scaled_by_one_over_one_minus_p(p):
    n = 400_000
    x = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5  # never 0
    y = nnl.Dropout(p, generator=torch.Generator().manual_seed(1))(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)  # the closed form, exactly scaled
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # binomial: within 5 standard deviations
    assert abs(y.mean().item() - x.mean().item()) < 0.01  # inverted dropout keeps the expectation


def test_eval_mode_and_p_zero_are_the_identity_as_in_torch():
    x = torch.randn(4, 3, 2)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert nnl.Dropout(0.5, generator=generator).eval()(x) is x
    assert torch.equal(torch.nn.Dropout(0.5).eval()(x), x)
    assert nnl.Dropout(0.0, generator=generator)(x) is x
    assert torch.equal(generator.get_state(), state)  # nothing drawn


def test_masks_come_from_the_layers_generator_and_never_the_global_one():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    layer = nnl.Dropout(0.5, generator=torch.Generator().manual_seed(9))
    first = layer(torch.ones(100))
    layer.generator.manual_seed(9)
    assert torch.equal(layer(torch.ones(100)), first)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_a_probability_outside_zero_one_is_rejected_like_torch(p):
    with pytest.raises(ValueError) as theirs:
        torch.nn.Dropout(p)
    with pytest.raises(ValueError) as ours:
        nnl.Dropout(p)
    assert str(ours.value) == str(theirs.value)


def test_repr_and_state_dict_are_torchs():
    assert repr(nnl.Dropout(0.2)) == repr(torch.nn.Dropout(0.2))
    assert repr(nnl.Dropout(0.2, inplace=True)) == repr(torch.nn.Dropout(0.2, inplace=True))
    assert nnl.Dropout(0.2).state_dict() == torch.nn.Dropout(0.2).state_dict() == {}

"""The closed-form batch-norm backward: gradcheck against finite differences, and equal to autograd through
torch's own batch norm."""

import pytest
import torch
import torch.nn.functional as F

from normlab.nn.functional import batch_norm_train

SHAPES = [(5, 3), (4, 3, 2)]
AFFINE = {"affine": (True, True), "weight-only": (True, False), "none": (False, False)}


def _inputs(shape, affine, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, dtype=dtype, generator=generator) * 2 + 0.5).requires_grad_()
    has_weight, has_bias = affine
    channels = shape[1]
    weight = torch.rand(channels, dtype=dtype, generator=generator).add(0.5) if has_weight else None
    weight = weight.requires_grad_() if has_weight else None
    bias = torch.randn(channels, dtype=dtype, generator=generator).requires_grad_() if has_bias else None
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE.values(), ids=AFFINE.keys())
def test_closed_form_backward_passes_gradcheck(shape, affine):
    x, weight, bias = _inputs(shape, affine)
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def output_only(*tensors):
        x, rest = tensors[0], list(tensors[1:])
        weight = rest.pop(0) if affine[0] else None
        bias = rest.pop(0) if affine[1] else None
        return batch_norm_train(x, weight, bias, 1e-5)[0]

    assert torch.autograd.gradcheck(output_only, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE.values(), ids=AFFINE.keys())
def test_closed_form_matches_autograd_through_torch_batch_norm(shape, affine):
    x, weight, bias = _inputs(shape, affine, seed=1)
    grad_output = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tensors = [t for t in (x, weight, bias) if t is not None]

    output, mean, var = batch_norm_train(x, weight, bias, 1e-5)
    actual = torch.autograd.grad(output, tensors, grad_output)
    expected_output = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    expected = torch.autograd.grad(expected_output, tensors, grad_output)

    torch.testing.assert_close(output, expected_output, atol=1e-10, rtol=1e-10)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    dims = (0,) if len(shape) == 2 else (0, 2)
    torch.testing.assert_close(mean, x.mean(dims), atol=1e-12, rtol=0)
    torch.testing.assert_close(var, x.var(dims, correction=0), atol=1e-12, rtol=0)
    assert not mean.requires_grad and not var.requires_grad


def test_closed_form_backward_refuses_double_backward():
    x, weight, bias = _inputs((4, 3), (True, True))
    output = batch_norm_train(x, weight, bias, 1e-5)[0]
    (grad_x,) = torch.autograd.grad(output.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


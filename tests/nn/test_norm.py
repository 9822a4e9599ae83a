"""Normalisation layers: torch's batch-norm semantics case by case, hand-computed statistics, reduced
precision, and random shapes and options (hypothesis) against the torch.nn twins."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import nn as nnl

from .cases import DTYPES, assert_twin_close

FEW_EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True)


def _twins(class_name: str, *args, dtype=torch.float64, **kwargs):
    reference = getattr(torch.nn, class_name)(*args, dtype=dtype, **kwargs)
    twin = getattr(nnl, class_name)(*args, dtype=dtype, **kwargs)
    return reference, twin


def test_rejected_single_value_batch_still_counts_like_torch():
    reference, twin = _twins("BatchNorm1d", 3)
    for module in (reference, twin):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(torch.randn(1, 3, dtype=torch.float64))
    assert int(twin.num_batches_tracked) == int(reference.num_batches_tracked) == 1


def test_running_var_is_unbiased_while_normalisation_uses_the_biased_variance():
    layer = nnl.BatchNorm1d(1, momentum=1.0, affine=False, dtype=torch.float64)
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # mean 2, biased var 1, unbiased var 2
    output = layer(x)
    assert layer.running_mean.item() == 2.0
    assert layer.running_var.item() == 2.0
    expected = torch.tensor([[-1.0], [1.0]], dtype=torch.float64) / (1.0 + layer.eps) ** 0.5
    torch.testing.assert_close(output, expected, atol=1e-15, rtol=0)


def test_momentum_none_makes_running_statistics_the_average_over_batches():
    layer = nnl.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    batches = [_random_input((5, 3, 2), torch.float64, seed) for seed in range(4)]
    for batch in batches:
        layer(batch)
    means = torch.stack([b.mean(dim=(0, 2)) for b in batches])
    variances = torch.stack([b.var(dim=(0, 2), correction=1) for b in batches])
    torch.testing.assert_close(layer.running_mean, means.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.running_var, variances.mean(0), atol=1e-12, rtol=0)
    assert int(layer.num_batches_tracked) == 4


def test_momentum_none_counts_batches_already_tracked():
    reference, twin = _twins("BatchNorm1d", 2, momentum=None)
    for module in (reference, twin):
        module.num_batches_tracked.fill_(9)  # the next batch gets weight 1/10
        module(torch.arange(8.0, dtype=torch.float64).view(4, 2))
    assert_twin_close(twin.running_mean, reference.running_mean, torch.float64, "running_mean")
    assert_twin_close(twin.running_var, reference.running_var, torch.float64, "running_var")


def test_without_running_statistics_eval_normalises_with_the_batch():
    twin = nnl.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64)
    assert (twin.running_mean, twin.running_var, twin.num_batches_tracked) == (None, None, None)
    x = torch.randn(6, 3, dtype=torch.float64)
    training_output = twin(x)
    twin.eval()
    torch.testing.assert_close(twin(x), training_output, atol=0, rtol=0)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, correction=0) + twin.eps)
    torch.testing.assert_close(training_output, expected, atol=1e-12, rtol=0)


def test_empty_batch_leaves_running_statistics_but_counts_like_torch():
    reference, twin = _twins("BatchNorm1d", 3)
    twin.load_state_dict(reference.state_dict())
    for module in (reference, twin):
        module.running_mean.fill_(2.0)
        module.running_var.fill_(3.0)
        output = module(torch.randn(0, 3, dtype=torch.float64))
        assert output.shape == (0, 3)
    for key, value in reference.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_state_dict_of_version_1_without_num_batches_tracked_loads_like_torch():
    reference, twin = _twins("BatchNorm1d", 3)
    for module in (reference, twin):
        module(torch.randn(4, 3, dtype=torch.float64))
    old = copy.deepcopy(reference.state_dict())
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    reference.load_state_dict(copy.deepcopy(old))
    twin.load_state_dict(copy.deepcopy(old))
    assert int(twin.num_batches_tracked) == int(reference.num_batches_tracked) == 1  # kept, as torch keeps it


def test_state_dict_of_version_2_without_num_batches_tracked_fails_like_torch():
    reference, twin = _twins("BatchNorm1d", 3)
    partial = reference.state_dict()
    del partial["num_batches_tracked"]
    for module in (reference, twin):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            module.load_state_dict(partial)


def test_state_dict_carries_version_2_like_torch():
    assert nnl.BatchNorm1d(3).state_dict()._metadata[""] == torch.nn.BatchNorm1d(3).state_dict()._metadata[""]
    assert nnl.BatchNorm1d(3).state_dict()._metadata[""]["version"] == 2


@pytest.mark.parametrize("reset", ["reset_running_stats", "reset_parameters"])
def test_resets_match_torch(reset):
    reference, twin = _twins("BatchNorm1d", 3)
    for module in (reference, twin):
        with torch.no_grad():
            module.weight.fill_(2.0)
            module.bias.fill_(-1.0)
        module(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        getattr(module, reset)()
    for key, value in reference.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda nn, dtype: nn.BatchNorm1d(4, dtype=dtype),
    lambda nn, dtype: nn.BatchNorm1d(4),  # float32 parameters serve reduced-precision input, as in torch
    lambda nn, dtype: nn.LayerNorm(4, dtype=dtype),
    lambda nn, dtype: nn.LayerNorm(4),
    lambda nn, dtype: nn.GroupNorm(2, 4, dtype=dtype),
    lambda nn, dtype: nn.GroupNorm(2, 4),
    lambda nn, dtype: nn.RMSNorm(4, dtype=dtype),
    lambda nn, dtype: nn.RMSNorm(4),
], ids=["bn", "bn-float32-params", "ln", "ln-float32-params", "gn", "gn-float32-params", "rms",
        "rms-float32-params"])
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's, for RMSNorm
def test_reduced_precision_input_is_computed_in_float32_like_torch(make, dtype):
    x = (torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    reference, twin = make(torch.nn, dtype), make(nnl, dtype)
    expected, actual = reference(x), twin(x)
    assert actual.dtype == dtype
    # float16: within one ulp, as with float16 parameters torch rounds its batch statistics to float16 while
    # normlab keeps them in float32 (and lands closer to the float64 result); bfloat16: the default tolerance
    tolerance = {"atol": 1e-3, "rtol": 2e-3} if dtype == torch.float16 else {}
    torch.testing.assert_close(actual, expected, **tolerance)
    torch.testing.assert_close(twin.state_dict(), reference.state_dict())


@pytest.mark.parametrize("dtype, compute_dtype", [
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64),
])
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rms_norm_default_eps_is_the_machine_epsilon_of_the_compute_dtype(dtype, compute_dtype):
    x = torch.tensor([[1e-4, -2e-4, 3e-4], [0.5, 1.0, -1.5]]).to(dtype)  # row 0: mean(x²) is close to eps
    expected = x.to(compute_dtype) / torch.sqrt(x.to(compute_dtype).square().mean(-1, keepdim=True)
                                                + torch.finfo(compute_dtype).eps)
    actual = nnl.RMSNorm(3, elementwise_affine=False)(x)
    torch.testing.assert_close(actual, expected.to(dtype))
    torch.testing.assert_close(actual, torch.nn.RMSNorm(3, elementwise_affine=False)(x))


# Random shapes and options. Each example runs one training step (output, input and parameter gradients,
# buffers) and one eval step on both twins; when torch rejects the input, normlab must raise the same type.


def _compare(reference, twin, x: torch.Tensor, dtype: torch.dtype) -> None:
    twin.load_state_dict(reference.state_dict())
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        twin.train(mode == "train")
        expected_leaf, actual_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
        try:
            expected = reference(expected_leaf)
        except (ValueError, RuntimeError) as error:
            with pytest.raises(type(error)):
                twin(actual_leaf)
            continue
        actual = twin(actual_leaf)
        assert_twin_close(actual, expected, dtype, f"{mode} output")
        grad_output = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
        reference.zero_grad()
        twin.zero_grad()
        expected.backward(grad_output)
        actual.backward(grad_output)
        assert_twin_close(actual_leaf.grad, expected_leaf.grad, dtype, f"{mode} input gradient")
        for (name, p), q in zip(reference.named_parameters(), twin.parameters(), strict=True):
            assert_twin_close(q.grad, p.grad, dtype, f"{mode} gradient of {name}")
        for key, value in reference.state_dict().items():
            if value.is_floating_point():
                assert_twin_close(twin.state_dict()[key], value, dtype, key)
            else:
                assert torch.equal(twin.state_dict()[key], value), key


def _random_input(shape, dtype, seed):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _conditioned(shape, dtype, seed, sets):
    """A random input, and the dtype it can be held to the bar in.

    `sets(x)` views x as (number of normalising sets, values per set). float32 is held to 1e-5 only on sets
    of at least 3 values that are not bunched together: with one value x − mean is 0 exactly, with two
    x̂ = ±√(σ²/(σ²+ε)), and with nearly equal values the input gradient is mostly cancellation, so float32
    kernels (torch's included) land 1e-5 to 1e-2 away from the float64 result. Those cases run in float64.
    """
    x = _random_input(shape, torch.float64, seed)
    grouped = sets(x)
    if grouped.shape[1] <= 2 or grouped.std(1, correction=0).min() < 0.5:
        dtype = torch.float64
    return x.to(dtype), dtype


dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)


BATCH_NORM_BY_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


@FEW_EXAMPLES
@given(rank=st.sampled_from(sorted(BATCH_NORM_BY_RANK)), batch=st.integers(1, 6), channels=st.integers(1, 5),
       sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3), momentum=st.sampled_from([None, 0.1, 0.9]),
       affine=st.booleans(), bias=st.booleans(), track=st.booleans(), eps=st.sampled_from([1e-5, 1e-2]),
       closed_form=st.booleans(), dtype=dtypes, seed=seeds)
def test_batch_norm_matches_torch_on_random_shapes(rank, batch, channels, sizes, momentum, affine, bias, track,
                                                   eps, closed_form, dtype, seed):
    shape = (batch, channels, *sizes[:rank - 2])
    x, dtype = _conditioned(shape, dtype, seed, lambda x: x.transpose(0, 1).reshape(channels, -1))
    options = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype,
                   bias=bias)
    name = BATCH_NORM_BY_RANK[rank]
    reference = getattr(torch.nn, name)(channels, **options)
    twin = getattr(nnl, name)(channels, closed_form_backward=closed_form, **options)
    _compare(reference, twin, x, dtype)


@FEW_EXAMPLES
@given(rank=st.sampled_from(sorted(BATCH_NORM_BY_RANK)), batch=st.integers(1, 6), channels=st.integers(1, 5),
       sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3), momentum=st.sampled_from([None, 0.1, 0.9]),
       affine=st.booleans(), bias=st.booleans(), track=st.booleans(), dtype=dtypes, seed=seeds)
def test_sync_batch_norm_without_process_group_is_batch_norm_of_its_rank(rank, batch, channels, sizes, momentum,
                                                                        affine, bias, track, dtype, seed):
    shape = (batch, channels, *sizes[:rank - 2])
    x, dtype = _conditioned(shape, dtype, seed, lambda x: x.transpose(0, 1).reshape(channels, -1))
    options = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, bias=bias)
    reference = getattr(torch.nn, BATCH_NORM_BY_RANK[rank])(channels, **options)
    _compare(reference, nnl.SyncBatchNorm(channels, **options), x, dtype)


@FEW_EXAMPLES
@given(leading=st.lists(st.integers(1, 3), max_size=2), normalized=st.lists(st.integers(1, 4), min_size=1,
       max_size=2), affine=st.booleans(), bias=st.booleans(), eps=st.sampled_from([1e-5, 1e-2]), dtype=dtypes,
       seed=seeds)
def test_layer_norm_matches_torch_on_random_shapes(leading, normalized, affine, bias, eps, dtype, seed):
    shape = (*leading, *normalized)
    x, dtype = _conditioned(shape, dtype, seed, lambda x: x.reshape(-1, math.prod(normalized)))
    options = dict(eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    reference, twin = torch.nn.LayerNorm(normalized, **options), nnl.LayerNorm(normalized, **options)
    _compare(reference, twin, x, dtype)


@FEW_EXAMPLES
@given(batch=st.integers(1, 4), groups=st.integers(1, 3), channels_per_group=st.integers(1, 4),
       spatial=st.lists(st.integers(1, 4), max_size=2), affine=st.booleans(), bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-2]), dtype=dtypes, seed=seeds)
def test_group_norm_matches_torch_on_random_shapes(batch, groups, channels_per_group, spatial, affine, bias,
                                                   eps, dtype, seed):
    channels = groups * channels_per_group
    shape = (batch, channels, *spatial)
    x, dtype = _conditioned(shape, dtype, seed, lambda x: x.reshape(batch * groups, -1))
    options = dict(eps=eps, affine=affine, bias=bias, dtype=dtype)
    reference = torch.nn.GroupNorm(groups, channels, **options)
    twin = nnl.GroupNorm(groups, channels, **options)
    _compare(reference, twin, x, dtype)


@FEW_EXAMPLES
@given(leading=st.lists(st.integers(1, 3), max_size=2), normalized=st.lists(st.integers(1, 4), min_size=1,
       max_size=2), affine=st.booleans(), eps=st.sampled_from([None, 1e-6, 1e-2]), dtype=dtypes, seed=seeds)
def test_rms_norm_matches_torch_on_random_shapes(leading, normalized, affine, eps, dtype, seed):
    options = dict(eps=eps, elementwise_affine=affine, dtype=dtype)
    reference, twin = torch.nn.RMSNorm(normalized, **options), nnl.RMSNorm(normalized, **options)
    _compare(reference, twin, _random_input((*leading, *normalized), dtype, seed), dtype)

"""fold_batchnorm: the folded copy gives the original's eval outputs (float64 within 1e-10, float32 within 1e-5)
on the lesson's MLPs, the wavenet, conv nets and random MLPs (hypothesis); its weights equal torch's own
`fuse_linear_bn_eval`/`fuse_conv_bn_eval` where those apply; what must not fold stays; the input is untouched."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from normlab import nn as nnl
from normlab.config import PRESETS
from normlab.model import build_model

from .cases import DTYPES, assert_twin_close, randomize_


def _prepared(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random parameters and running statistics (variances in [0.5, 2]), in `dtype`, in eval mode."""
    model = model.to(dtype)
    randomize_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _assert_same_outputs(model, folded, x, dtype):
    with torch.no_grad():
        assert_twin_close(folded(x), model(x), dtype, "folded output")


def _state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def lesson_mlp(namespace):
    """The lesson-batchnorm shape: Embedding → Flatten → Linear(no bias) → BatchNorm1d → Tanh → Linear."""
    return namespace.Sequential(namespace.Embedding(27, 10), namespace.Flatten(),
                                namespace.Linear(30, 20, bias=False), namespace.BatchNorm1d(20), namespace.Tanh(),
                                namespace.Linear(20, 27))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("namespace", [nnl, torch.nn], ids=["normlab", "torch"])
def test_lesson_mlp_folds_to_the_same_outputs_leaving_the_input_untouched(namespace, dtype):
    model = _prepared(lesson_mlp(namespace), dtype)
    before = _state(model)
    folded = nnl.fold_batchnorm(model)
    x = torch.randint(0, 27, (64, 3), generator=torch.Generator().manual_seed(1))
    _assert_same_outputs(model, folded, x, dtype)
    assert [type(m).__name__ for m in folded] == ["Embedding", "Flatten", "Linear", "Identity", "Tanh", "Linear"]
    assert not any(m.training for m in folded.modules())
    assert folded[2].bias is not None and folded[2].weight.dtype == folded[2].bias.dtype == dtype
    assert sorted(folded.state_dict()) == ["0.weight", "2.bias", "2.weight", "5.bias", "5.weight"]
    assert type(model[3]).__name__ == "BatchNorm1d" and model[2].bias is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _calibrated(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    """The model in `dtype` and eval mode, its norms' running statistics those of `x`, their γ and β random.

    Random running statistics far from the data's would make a deep float32 net amplify rounding (the norms
    would scale pre-activations of variance ~100 by ~1): a trained model's statistics match its data.
    """
    model = model.to(dtype)
    norms = [m for m in model.modules() if isinstance(m, nnl.BatchNorm1d)]
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for norm in norms:
            norm.momentum = None  # a cumulative average: one batch sets the statistics
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.normal_(0.0, 0.5, generator=generator)
        model.train()(x)
    return model.eval()


@pytest.mark.parametrize("preset", ["lesson-batchnorm", "lesson-deep", "wavenet"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_presets_fold_every_batch_norm_including_after_the_output_layer_and_positionwise(preset, dtype):
    config = PRESETS[preset].model
    generator = torch.Generator().manual_seed(2)
    data = torch.randint(0, 27, (256, config.block_size), generator=generator)
    model = _calibrated(build_model(config, vocab_size=27, seed=3), data, dtype)
    norms = [name for name, m in model.named_modules() if isinstance(m, nnl.BatchNorm1d)]
    folded = nnl.fold_batchnorm(model)
    x = torch.randint(0, 27, (32, config.block_size), generator=generator)
    _assert_same_outputs(model, folded, x, dtype)
    assert not [m for m in folded.modules() if isinstance(m, nnl.BatchNorm1d)]
    # a BatchNorm wrapped in Positionwise is folded with its wrapper: both names lead to the same Identity
    assert [name.removesuffix(".norm") for name in norms] == nnl.foldable_batchnorms(model)


def _conv_net(dimensions: int):
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dimensions]
    norms = {1: (torch.nn.BatchNorm1d, nnl.BatchNorm1d), 2: (torch.nn.BatchNorm2d, nnl.BatchNorm2d),
             3: (torch.nn.BatchNorm3d, nnl.BatchNorm3d)}[dimensions]
    return torch.nn.Sequential(
        conv(2, 4, 3, padding=1), norms[0](4), torch.nn.ReLU(),
        conv(4, 6, 3, bias=False, groups=2, padding=1, padding_mode="reflect"), norms[1](6, affine=False),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3))


@pytest.mark.parametrize("dimensions", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_nets_fold_into_their_convolutions(dimensions, dtype):
    x = torch.randn((2, 2, *[5] * dimensions), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = _conv_net(dimensions)
    model(x.float())  # materialise the lazy Linear
    model = _prepared(model, dtype)
    folded = nnl.fold_batchnorm(model)
    _assert_same_outputs(model, folded, x.to(dtype), dtype)
    assert isinstance(folded[1], torch.nn.Identity) and isinstance(folded[4], torch.nn.Identity)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_weights_equal_torchs_own_fusion_where_it_applies(bias):
    linear, norm = torch.nn.Linear(5, 4, bias=bias).double(), torch.nn.BatchNorm1d(4).double()
    conv, conv_norm = torch.nn.Conv2d(3, 4, 2, bias=bias).double(), torch.nn.BatchNorm2d(4).double()
    linear_model = _prepared(torch.nn.Sequential(linear, norm), torch.float64)
    conv_model = _prepared(torch.nn.Sequential(conv, conv_norm), torch.float64, seed=1)
    for model, fuse in ((linear_model, fuse_linear_bn_eval), (conv_model, fuse_conv_bn_eval)):
        expected = fuse(model[0], model[1])
        actual = nnl.fold_batchnorm(model)[0]
        assert_twin_close(actual.weight, expected.weight, torch.float64, "weight")
        assert_twin_close(actual.bias, expected.bias, torch.float64, "bias")


def test_batch_norm_without_affine_folds_where_torch_fusion_raises():
    model = _prepared(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4, affine=False)),
                      torch.float64)
    with pytest.raises(TypeError):  # torch's fuse_linear_bn_eval multiplies by the norm's weight, here None
        fuse_linear_bn_eval(model[0], model[1])
    folded = nnl.fold_batchnorm(model)
    assert isinstance(folded[1], torch.nn.Identity)
    _assert_same_outputs(model, folded, torch.randn(6, 5, dtype=torch.float64), torch.float64)


def test_batch_norms_that_do_not_follow_a_foldable_layer_stay():
    model = _prepared(nnl.Sequential(
        nnl.BatchNorm1d(5),  # first in its Sequential
        nnl.Linear(5, 4), nnl.Tanh(), nnl.BatchNorm1d(4),  # after an activation
        nnl.Linear(4, 4), nnl.BatchNorm1d(4), nnl.BatchNorm1d(4),  # a second norm in a row
        nnl.Linear(4, 3), nnl.BatchNorm1d(3, track_running_stats=False),  # no running statistics
        nnl.Linear(3, 6), nnl.BatchNorm1d(5),  # a BatchNorm of other features: not a fold, whatever it does
    ), torch.float64)
    folded = nnl.fold_batchnorm(model)
    kinds = [type(m).__name__ for m in folded]
    assert kinds == ["BatchNorm1d", "Linear", "Tanh", "BatchNorm1d", "Linear", "Identity", "BatchNorm1d",
                     "Linear", "BatchNorm1d", "Linear", "BatchNorm1d"]
    assert nnl.foldable_batchnorms(model) == ["5"]
    _assert_same_outputs(model[:9], folded[:9], torch.randn(8, 5, dtype=torch.float64), torch.float64)


def test_ranks_and_wrappers_must_match_the_layer():
    from normlab.nn import Positionwise

    model = _prepared(torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1), nnl.BatchNorm1d(3),  # a Conv2d feeds 4-D input, a BatchNorm1d takes 2-D/3-D
        torch.nn.Conv1d(3, 3, 1), Positionwise(nnl.BatchNorm1d(3)),  # it would normalise the last axis
        torch.nn.ConvTranspose1d(3, 3, 1), nnl.BatchNorm1d(3),  # a transposed kernel is (in, out, k)
    ), torch.float64)
    assert nnl.foldable_batchnorms(model) == []


def test_a_layer_used_twice_is_not_folded():
    shared = nnl.Linear(4, 4)
    model = _prepared(nnl.Sequential(shared, nnl.BatchNorm1d(4), nnl.Tanh(), shared), torch.float64)
    assert nnl.foldable_batchnorms(model) == []
    folded = nnl.fold_batchnorm(model)
    _assert_same_outputs(model, folded, torch.randn(5, 4, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize("make", [
    lambda: nnl.GhostBatchNorm1d(4, 2), lambda: nnl.BatchRenorm1d(4), lambda: nnl.SyncBatchNorm(4),
    lambda: torch.nn.SyncBatchNorm(4), lambda: nnl.BatchNorm1d(4, closed_form_backward=True),
], ids=["ghost", "renorm", "sync", "torch-sync", "closed-form"])
def test_batch_norm_variants_fold_as_batch_norm_in_eval(make):
    model = _prepared(nnl.Sequential(nnl.Linear(3, 4), make(), nnl.Tanh(), nnl.Linear(4, 2)), torch.float64)
    folded = nnl.fold_batchnorm(model)
    assert isinstance(folded[1], torch.nn.Identity)
    _assert_same_outputs(model, folded, torch.randn(6, 3, dtype=torch.float64), torch.float64)


def test_nested_sequentials_fold():
    inner = nnl.Sequential(nnl.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4), nnl.ReLU())
    model = _prepared(torch.nn.Sequential(inner, torch.nn.Sequential(torch.nn.Linear(4, 4), nnl.BatchNorm1d(4))),
                      torch.float64)
    folded = nnl.fold_batchnorm(model)
    assert nnl.foldable_batchnorms(model) == ["0.1", "1.1"]
    assert isinstance(folded[0][1], torch.nn.Identity) and isinstance(folded[1][1], torch.nn.Identity)
    _assert_same_outputs(model, folded, torch.randn(6, 3, dtype=torch.float64), torch.float64)


def test_a_model_in_training_mode_is_refused_and_left_alone():
    model = _prepared(lesson_mlp(nnl), torch.float64)
    model[3].train()
    before = _state(model)
    with pytest.raises(ValueError, match=r"'3' is in training mode: call model.eval\(\)"):
        nnl.fold_batchnorm(model)
    assert model[3].training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=4), bias=st.booleans(), affine=st.booleans(),
       norm_bias=st.booleans(), eps=st.sampled_from([1e-5, 0.1]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_random_mlps_fold_to_the_same_outputs(widths, bias, affine, norm_bias, eps, dtype, seed):
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nnl.Linear(fan_in, fan_out, bias=bias), nnl.BatchNorm1d(fan_out, eps=eps, affine=affine,
                                                                           bias=norm_bias), nnl.Tanh()]
    model = _prepared(nnl.Sequential(*layers), dtype, seed)
    folded = nnl.fold_batchnorm(model)
    assert len(nnl.foldable_batchnorms(model)) == len(widths) - 1
    x = torch.randn(7, widths[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    _assert_same_outputs(model, folded, x, dtype)

"""The stacked model against M separate normlab models run through autograd, and its state-dict layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from normlab.config import ModelConfig
from normlab.model import build_model
from normlab.training.engines.stacked.layout import stacking_problem, state_layout, unstack_as
from normlab.training.engines.stacked.model import StackedMLP

VOCAB = 27


def _stack(models, configs):
    return StackedMLP.from_state_dicts(configs, [m.state_dict() for m in models], VOCAB)


def _configs(norm: str, activation: str, n_layers: int, count: int = 3, architecture: str = "mlp"
             ) -> list[ModelConfig]:
    block_size = 2**n_layers if architecture == "wavenet" else 3
    base = ModelConfig(norm=norm, activation=activation, n_layers=n_layers, n_hidden=12, n_embd=4, init="kaiming",
                       architecture=architecture, block_size=block_size,
                       norm_groups=3, bias_scale=0.1, output_weight_scale=0.5,
                       renorm_r_max=1.2, renorm_d_max=0.3, renorm_hold_steps=0, renorm_warmup_steps=0)
    return [dataclasses.replace(base, weight_scale=0.5 + i, bn_momentum=0.1 * (i + 1)) for i in range(count)]


def _batch(count: int, batch: int = 16, seed: int = 0, block_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (count, batch, block_size), generator=generator),
            torch.randint(0, VOCAB, (count, batch), generator=generator))


@pytest.mark.parametrize("norm", ["none", "batch", "batchrenorm", "layer", "group", "rms"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("n_layers, architecture", [(1, "mlp"), (2, "mlp"), (3, "wavenet")])
def test_loss_gradients_and_buffers_equal_autograd_on_separate_models(norm, activation, n_layers, architecture):
    configs = _configs(norm, activation, n_layers, architecture=architecture)
    models = [build_model(c, VOCAB, seed=i).double() for i, c in enumerate(configs)]
    for model in models:  # running statistics away from the batch's, so that batch renorm's r and d bind
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.mul_(0.3).add_(0.2)
    stacked = _stack(models, configs)
    contexts, targets = _batch(len(models), block_size=configs[0].block_size)
    loss, grads = stacked.loss_and_gradients(contexts, targets)
    for i, model in enumerate(models):
        reference = F.cross_entropy(model(contexts[i]), targets[i])
        reference.backward()
        torch.testing.assert_close(loss[i], reference, rtol=1e-10, atol=1e-10)
        for (name, p), mine in zip(model.named_parameters(), _unstacked_grads(stacked, grads, i)):
            torch.testing.assert_close(mine, p.grad, rtol=1e-9, atol=1e-10, msg=name)
        state = stacked.state_dict(i)
        for name, b in model.named_buffers():
            torch.testing.assert_close(state[name], b, rtol=1e-10, atol=1e-10, msg=name)


def _unstacked_grads(stacked, grads, index):
    return [unstack_as(layout, grad, index) for layout, grad in zip(stacked.parameter_layouts, grads)]


def test_eval_mode_uses_running_statistics_like_the_model():
    configs = _configs("batch", "tanh", 2)
    models = [build_model(c, VOCAB, seed=i) for i, c in enumerate(configs)]
    for model in models:  # move the running statistics away from their initial values
        model(torch.randint(0, VOCAB, (32, 3)))
        model.eval()
    stacked = _stack(models, configs)
    contexts, _ = _batch(len(models))
    logits, _ = stacked.forward(contexts, training=False)
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i], model(contexts[i]))


def test_round_trip_through_the_stack_keeps_every_tensor():
    configs = _configs("batch", "relu", 2)
    models = [build_model(c, VOCAB, seed=i) for i, c in enumerate(configs)]
    stacked = _stack(models, configs)
    for index, original in enumerate(models):
        copy = stacked.state_dict(index)
        assert list(copy) == list(original.state_dict())
        for name, value in original.state_dict().items():
            assert torch.equal(copy[name], value), name


@pytest.mark.parametrize("changes", [{}, {"norm": "batch"}, {"norm": "rms", "n_layers": 3}, {"norm": "layer"},
                                     {"norm": "group", "hidden_bias": True}, {"output_bias": False, "n_layers": 2},
                                     {"norm": "batch", "hidden_bias": True, "activation": "relu"},
                                     {"architecture": "wavenet", "block_size": 8, "n_layers": 3, "norm": "batch"},
                                     {"architecture": "wavenet", "block_size": 4, "n_layers": 2, "norm": "rms"},
                                     {"architecture": "wavenet", "block_size": 2, "n_layers": 1}])
def test_the_state_layout_lists_build_models_state_dict_in_order(changes):
    config = ModelConfig(n_hidden=16, **changes)
    state = build_model(config, VOCAB).state_dict()
    layout = state_layout(config)
    assert [entry.key for entry in layout] == list(state)
    parameters = dict(build_model(config, VOCAB).named_parameters())
    assert [entry.key for entry in layout if entry.parameter] == list(parameters)


def test_unsupported_configs_are_named():
    assert stacking_problem(ModelConfig(architecture="wavenet", block_size=8, n_layers=3)) is None
    assert "ghostbatch" in stacking_problem(ModelConfig(norm="ghostbatch"))
    assert "residual" in stacking_problem(ModelConfig(residual=True))
    assert stacking_problem(ModelConfig(norm="batch")) is None
    with pytest.raises(ValueError, match="share their architecture"):
        configs = [ModelConfig(n_hidden=8), ModelConfig(n_hidden=9)]
        _stack([build_model(c, VOCAB) for c in configs], configs)

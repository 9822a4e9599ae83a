"""The presets against the lesson: parameter counts it printed, its forward pass written out, its initial losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from normlab import nn
from normlab.config import NORMS, PRESETS, ModelConfig, get_preset
from normlab.errors import ConfigError
from normlab.model import build_model, dropout_seed, seed_dropout, state_shapes

VOCAB = 27


@pytest.mark.parametrize("preset, parameters", [
    ("lesson-original", 11_897),  # C 270 + W1 6000 + b1 200 + W2 5400 + b2 27
    ("lesson-batchnorm", 12_097),  # no b1; BatchNorm gain and bias 400
    ("lesson-deep", 47_024),  # the six-layer net the lesson printed
    ("wavenet", 76_579),  # the lesson's hierarchical model
])
def test_parameter_counts_match_the_lesson(preset, parameters):
    model = build_model(get_preset(preset).model, VOCAB)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_batchnorm_preset_computes_the_lessons_forward_written_out():
    model = build_model(get_preset("lesson-batchnorm").model, VOCAB, seed=3)
    embedding, _, linear, norm, _, output = model.layers
    x = torch.randint(0, VOCAB, (64, 3), generator=torch.Generator().manual_seed(0))
    # The lesson's code, with torch's biased variance and eps instead of its unbiased std.
    emb = embedding.weight[x]  # (64, 3, 10)
    hpreact = emb.view(64, -1) @ linear.weight.T  # (64, 200)
    mean, var = hpreact.mean(0, keepdim=True), hpreact.var(0, keepdim=True, unbiased=False)
    hpreact = norm.weight * (hpreact - mean) / torch.sqrt(var + 1e-5) + norm.bias
    logits = torch.tanh(hpreact) @ output.weight.T + output.bias
    torch.testing.assert_close(model(x), logits)


def test_wavenet_groups_pairs_of_positions():
    model = build_model(get_preset("wavenet").model, VOCAB)
    x = torch.randint(0, VOCAB, (5, 8))
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for layer in model.layers]
    assert model(x).shape == (5, VOCAB)
    for hook in hooks:
        hook.remove()
    assert shapes[:2] == [(5, 8, 24), (5, 4, 48)]  # embedding, then the first FlattenConsecutive(2)
    assert (5, 2, 256) in shapes and (5, 256) in shapes


def test_scaled_output_layer_starts_near_the_uniform_loss_and_naive_does_not():
    x = torch.randint(0, VOCAB, (2000, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(2))
    uniform = -math.log(1 / VOCAB)  # 3.2958
    fixed = F.cross_entropy(build_model(get_preset("lesson-softmax-fix").model, VOCAB)(x), y).item()
    naive = F.cross_entropy(build_model(get_preset("lesson-original").model, VOCAB)(x), y).item()
    assert abs(fixed - uniform) < 0.05
    assert naive > 5 * uniform  # the lesson's "confidently wrong" start (about 27)


def test_kaiming_init_gives_hidden_weights_the_tanh_gain_over_root_fan_in():
    model = build_model(get_preset("lesson-kaiming").model, VOCAB, seed=0)
    weight = model.layers[2].weight  # (200, 30)
    assert abs(weight.std().item() - (5 / 3) / math.sqrt(30)) < 0.01


def test_same_seed_same_model_and_different_seed_different_model():
    config = get_preset("lesson-kaiming").model
    a, b, c = build_model(config, VOCAB, seed=1), build_model(config, VOCAB, seed=1), build_model(config, VOCAB, 2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.any():  # zero-initialised biases are equal whatever the seed
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_every_norm_and_activation_builds_and_backpropagates(norm, activation):
    config = ModelConfig(norm=norm, activation=activation, n_layers=3, residual=True, init="kaiming",
                         n_hidden=16, n_embd=4)
    model = build_model(config, VOCAB)
    loss = F.cross_entropy(model(torch.randint(0, VOCAB, (8, 3))), torch.randint(0, VOCAB, (8,)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_residual_block_adds_its_input():
    model = build_model(ModelConfig(n_layers=2, residual=True, n_hidden=8, n_embd=2), VOCAB)
    residual = model.layers[4]  # embedding, flatten, linear, tanh, then the residual block
    x = torch.randn(4, 8)
    torch.testing.assert_close(residual(x), x + residual.block(x))


@pytest.mark.parametrize("changes, message", [
    (dict(norm="batchy"), "model.norm='batchy' is not one of"),
    (dict(architecture="wavenet", block_size=6, n_layers=3), "block_size must be 2\\*\\*n_layers=8"),
    (dict(norm="group", n_hidden=10, norm_groups=4), "divisible by norm_groups"),
    (dict(residual=True, architecture="wavenet", block_size=2), "residual"),
    (dict(n_hidden=0), "n_hidden must be at least 1"),
])
def test_inconsistent_configs_are_rejected_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(**changes), VOCAB)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*lesson-batchnorm"):
        get_preset("nope")
    assert "lesson-original" in PRESETS and "wavenet" in PRESETS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_state_shapes_list_the_state_dict_without_allocating(preset):
    config = get_preset(preset).model
    expected = {key: (tuple(v.shape), v.dtype) for key, v in build_model(config, VOCAB).state_dict().items()}
    assert state_shapes(config, VOCAB) == expected
    huge = state_shapes(ModelConfig(n_hidden=16_384, n_layers=128), VOCAB)  # the limits: 34 G weights, no memory
    assert huge["layers.4.weight"][0] == (16_384, 16_384)


def test_build_model_draws_only_from_its_generator():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    build_model(get_preset("lesson-deep").model, VOCAB, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    generator = torch.Generator().manual_seed(3)
    same = build_model(get_preset("lesson-deep").model, VOCAB, generator=generator)
    for (name, a), b in zip(build_model(get_preset("lesson-deep").model, VOCAB, seed=3).state_dict().items(),
                            same.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("norm, kind, options", [
    ("batchrenorm", "BatchRenorm1d", {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 7, "hold_steps": 3}),
    ("ghostbatch", "GhostBatchNorm1d", {"ghost_batch_size": 4}),
    ("syncbatch", "SyncBatchNorm", {}),
])
def test_the_batch_norm_variants_are_built_with_the_configs_settings(norm, kind, options):
    config = ModelConfig(norm=norm, bn_momentum=0.01, ghost_batch_size=4, renorm_r_max=2.0, renorm_d_max=1.0,
                         renorm_warmup_steps=7, renorm_hold_steps=3)
    layer = build_model(config, VOCAB).layers[3]
    assert type(layer).__name__ == kind and layer.momentum == 0.01
    for name, value in options.items():
        assert getattr(layer, name) == value, name
    wavenet = build_model(dataclasses.replace(get_preset("wavenet").model, norm=norm, ghost_batch_size=4), VOCAB)
    assert wavenet(torch.randint(0, VOCAB, (8, 8))).shape == (8, VOCAB)


def test_dropout_follows_every_hidden_activation_but_the_last():
    model = build_model(ModelConfig(n_layers=3, dropout=0.2), VOCAB)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Embedding", "Flatten", "Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear",
                     "Tanh", "Linear"]
    assert all(layer.p == 0.2 for layer in model.layers if isinstance(layer, nn.Dropout))
    assert "Dropout" not in [type(layer).__name__ for layer in build_model(ModelConfig(n_layers=3), VOCAB).layers]


def test_dropout_in_training_is_torchs_dropout_between_the_hidden_layers_and_eval_has_none():
    """The wavenet's forward written out, with torch.nn.functional.dropout as the reference."""
    model = build_model(dataclasses.replace(get_preset("wavenet").model, dropout=0.3), VOCAB, seed=5)
    x = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    seed_dropout([layer for layer in model.layers if isinstance(layer, nn.Dropout)], seed=11, step=4)
    trained = model(x)
    expected, dropped = x, 0
    for layer in model.layers:
        if isinstance(layer, nn.Dropout):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(dropout_seed(11, 4, 0, dropped))
                expected = F.dropout(expected, 0.3, training=True)  # (16, 4 or 2, 128)
            dropped += 1
        else:
            expected = layer(expected)
    assert dropped == 2 and torch.equal(trained, expected)
    model.eval()
    expected = x
    for layer in model.layers:
        expected = expected if isinstance(layer, nn.Dropout) else layer(expected)
    assert torch.equal(model(x), expected)  # eval: no dropout, whatever the generators hold


def test_dropout_masks_are_a_function_of_seed_step_rank_and_layer_alone():
    layers = [nn.Dropout(0.5, generator=torch.Generator()) for _ in range(2)]
    ones = torch.ones(64)

    def masks(seed, step, rank=0):
        seed_dropout(layers, seed, step, rank=rank)
        return [layer(ones) for layer in layers]

    first = masks(1, 7)
    masks(1, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, masks(1, 7)))  # whatever was drawn in between
    assert not torch.equal(first[0], first[1])  # each layer its own stream
    for other in (masks(2, 7), masks(1, 8), masks(1, 7, rank=1)):
        assert not torch.equal(first[0], other[0])

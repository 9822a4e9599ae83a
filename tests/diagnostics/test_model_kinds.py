"""The monitor on each kind of model of the issue: plain MLP, TransformerEncoder, GELU/SiLU/LayerNorm."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import Monitor
from normlab.diagnostics import metrics as m

from .models import VOCAB, batch, count_forward_hooks, lesson_mlp, train_step


class TinyTransformer(nn.Module):
    """A character model on torch.nn.TransformerEncoder: predicts the next token after each context."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        return self.head(self.encoder(self.embedding(tokens))[:, -1])  # (B, T, C) -> (B, VOCAB)


class ResidualBlock(nn.Module):
    """x + W2 act(W1 LayerNorm(x)), the pre-norm residual block."""

    def __init__(self, width: int, activation: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.act = activation
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class ResidualModel(nn.Module):
    """Embedding, a GELU block and a SiLU block with residual connections, LayerNorm, output layer."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.blocks = nn.Sequential(ResidualBlock(width, nn.GELU()), ResidualBlock(width, nn.SiLU()))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embedding(tokens))).mean(dim=1))


def _train(model, steps=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, optimizer, every=1, histogram_every=1) as monitor:
        for step in range(steps):
            train_step(model, optimizer, monitor, step, *batch(step))
    assert count_forward_hooks(model) == 0
    return monitor.diagnostics


def _assert_complete(diagnostics, expected_layers):
    recorded = diagnostics.layers(m.ACT_MEAN)
    for layer in expected_layers:
        assert layer in recorded, f"{layer} not recorded; got {recorded}"
        for metric in (m.ACT_MEAN, m.ACT_STD, m.GRAD_STD):
            steps, values = diagnostics.series(layer, metric)
            assert steps.tolist() == [0, 1, 2] and all(math.isfinite(v) for v in values), (layer, metric)
        assert diagnostics.histogram(layer, m.HIST_ACT, 2).counts.sum() > 0
    for name in diagnostics.parameters:
        assert math.isfinite(diagnostics.value(name, m.UPDATE_TO_DATA, 2)), name


def test_plain_mlp_with_embedding_batchnorm_and_tanh():
    diagnostics = _train(lesson_mlp())
    _assert_complete(diagnostics, ["0", "2", "3", "4", "5"])
    assert [diagnostics.modules[name].type for name in ("0", "2", "3", "4")] == [
        "Embedding",
        "Linear",
        "BatchNorm1d",
        "Tanh",
    ]
    assert 0 <= diagnostics.value("4", m.ACT_SATURATED, 2) <= 1


def test_transformer_encoder_model():
    diagnostics = _train(TinyTransformer())
    layers = [
        f"encoder.layers.{i}.{part}" for i in range(2) for part in ("linear1", "linear2", "norm1", "norm2")
    ]
    _assert_complete(diagnostics, ["embedding", "head", *layers])
    # the attention's output projection is called through its weight, never through forward: parameters only;
    # the attention module itself is recorded through its first output
    assert "encoder.layers.0.self_attn.out_proj.weight" in diagnostics.parameters
    _assert_complete(diagnostics, ["encoder.layers.0.self_attn"])


def test_model_with_gelu_silu_layernorm_and_residual_connections():
    diagnostics = _train(ResidualModel())
    _assert_complete(diagnostics, ["blocks.0.act", "blocks.1.act", "blocks.0.norm", "norm", "head"])
    assert [diagnostics.modules[name].type for name in ("blocks.0.act", "blocks.1.act")] == ["GELU", "SiLU"]
    for layer in ("blocks.0.act", "blocks.1.act"):  # never-positive share applies to GELU/SiLU, on 3-D outputs
        assert 0 <= diagnostics.value(layer, m.ACT_NEGATIVE, 0) <= 1
    assert diagnostics.layers(m.ACT_SATURATED) == [] and diagnostics.layers(m.ACT_DEAD) == []


@pytest.mark.parametrize("activation", [nn.Sigmoid(), nn.ReLU()])
def test_sigmoid_saturation_and_relu_dead_units_are_recorded(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), activation, nn.Linear(8, 2))
    inputs = torch.randn(16, 4) * 20
    with Monitor(model, every=1) as monitor:
        monitor.begin_step(0)
        loss = F.mse_loss(model(inputs), torch.zeros(16, 2))
        loss.backward()
        monitor.end_step(loss)
    hidden = model[1](model[0](inputs)).detach()
    if isinstance(activation, nn.Sigmoid):
        expected = ((hidden > 0.97) | (hidden < 0.03)).float().mean().item()
        assert monitor.diagnostics.value("1", m.ACT_SATURATED, 0) == pytest.approx(expected)
    else:
        expected = (hidden <= 0).all(dim=0).float().mean().item()
        assert monitor.diagnostics.value("1", m.ACT_DEAD, 0) == pytest.approx(expected)


@pytest.mark.parametrize("preset", ["lesson-batchnorm", "lesson-deep", "wavenet"])
def test_normlab_presets(preset):
    from normlab.config import get_preset
    from normlab.model import build_model

    config = get_preset(preset).model
    model = build_model(config, VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, every=1, histogram_every=1) as monitor:
        for step in range(3):
            tokens, targets = batch(step)
            tokens = tokens[:, :1].expand(-1, config.block_size).contiguous()  # contexts of the preset's length
            train_step(model, optimizer, monitor, step, tokens, targets)
    assert count_forward_hooks(model) == 0
    tanh_layers = [name for name, info in monitor.diagnostics.modules.items() if info.type == "Tanh"]
    assert len(tanh_layers) == config.n_layers
    _assert_complete(monitor.diagnostics, ["layers.0", *tanh_layers, f"layers.{len(model.layers) - 1}"])

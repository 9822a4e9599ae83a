"""No warning on healthy models trained as the lesson trains them; warnings on broken ones.

The lesson's presets train on the bundled names with plain SGD at lr 0.1 and batch 32 for 1,200 steps, recorded
every 20 steps; the torch.nn models (LayerNorm/GELU MLP, a small conv net) train on random data.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import get_preset
from normlab.data import Vocab, load_words, make_splits
from normlab.diagnostics import Monitor, find_issues
from normlab.model import build_model

from .models import VOCAB, batch, train_step

STEPS = 1200


def _warnings(diagnostics, vocab_size=None):
    return [f for f in find_issues(diagnostics, vocab_size) if f.severity in ("warning", "error")]


@pytest.fixture(scope="module")
def names():
    words = load_words()
    return words, Vocab.from_words(words)


@pytest.mark.parametrize("preset", ["lesson-kaiming", "lesson-batchnorm"])
def test_the_lessons_healthy_presets_get_no_warning_over_a_thousand_steps(preset, names):
    words, vocab = names
    config = get_preset(preset).model
    inputs, targets = make_splits(words, vocab, config.block_size).train
    model = build_model(config, len(vocab), seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    with Monitor(model, optimizer, every=20) as monitor:
        for step in range(STEPS):
            rows = torch.randint(0, len(inputs), (32,), generator=generator)
            train_step(model, optimizer, monitor, step, inputs[rows], targets[rows])
    diagnostics = monitor.diagnostics
    assert diagnostics.value("", "loss", STEPS - 20) < 2.6  # it did learn
    assert _warnings(diagnostics, len(vocab)) == []


def _layernorm_gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, 16), nn.Flatten(),
        nn.Linear(48, 64), nn.LayerNorm(64), nn.GELU(),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(),
        nn.Linear(64, VOCAB),
    )


class SmallConvNet(nn.Module):
    """Characters as a (N, C, L) sequence: two Conv1d + BatchNorm1d + ReLU blocks, pooling, a Linear head."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.features = nn.Sequential(
            nn.Conv1d(8, channels, 2, padding=1), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 2, padding=1), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Linear(channels, VOCAB)

    def forward(self, tokens):
        x = self.embedding(tokens).transpose(1, 2)  # (N, T, C) -> (N, C, T)
        return self.head(self.features(x).squeeze(-1))


@pytest.mark.parametrize("make", [_layernorm_gelu_mlp, SmallConvNet], ids=["layernorm-gelu-mlp", "conv-net"])
def test_healthy_torch_models_get_no_warning(make):
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, optimizer, every=10) as monitor:
        for step in range(300):
            train_step(model, optimizer, monitor, step, *batch(step % 50, 64))
    assert _warnings(monitor.diagnostics, VOCAB) == []


@pytest.mark.parametrize(
    ("broken", "rule"),
    [("tanh-weights-x5", "saturation"), ("relu-bias-minus-5", "dead-units"), ("lr-20", "update-to-data")],
)
def test_broken_models_get_a_warning(broken, rule):
    torch.manual_seed(0)
    activation = nn.ReLU() if broken.startswith("relu") else nn.Tanh()
    model = nn.Sequential(nn.Embedding(VOCAB, 10), nn.Flatten(), nn.Linear(30, 64), activation, nn.Linear(64, VOCAB))
    with torch.no_grad():
        if broken == "tanh-weights-x5":
            model[2].weight.mul_(5 * 3)  # preactivations with a std of about 5
        if broken == "relu-bias-minus-5":
            model[2].bias.fill_(-5.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0 if broken == "lr-20" else 0.1)
    with Monitor(model, optimizer, every=1) as monitor:
        for step in range(20):
            monitor.begin_step(step)
            loss = F.cross_entropy(model(batch(step)[0]), batch(step)[1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.end_step(loss)
    assert rule in {f.rule for f in _warnings(monitor.diagnostics)}

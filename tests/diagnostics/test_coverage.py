"""Every layer by default: conv, recurrent, attention and pooling layers are recorded, and the global gradient
norm is torch's over all parameters."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from normlab.diagnostics import Monitor
from normlab.diagnostics import metrics as m

from .models import VOCAB


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.conv2d = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(8 * 4 + 2 * 8 * 8, VOCAB)

    def forward(self, tokens):  # tokens (N, 8)
        x = self.pool(self.relu(self.conv(self.embedding(tokens).transpose(1, 2))))  # (N, 8, 4)
        image = self.conv2d(x.reshape(-1, 1, 8, 4).repeat(1, 1, 1, 2))  # (N, 2, 8, 8)
        return self.head(torch.cat([x.flatten(1), image.flatten(1)], dim=1))


class RecurrentModel(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 6)
        self.rnn = cell(6, 12, batch_first=True)
        self.attention = nn.MultiheadAttention(12, 2, batch_first=True)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, tokens):
        sequence, _ = self.rnn(self.embedding(tokens))  # (N, T, 12)
        attended, _ = self.attention(sequence, sequence, sequence)
        return self.head(attended[:, -1])


def _step(model, inputs, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = [p.detach().clone() for p in model.parameters()]
    monitor = Monitor(model, optimizer, every=1)
    monitor.begin_step(0)
    loss = F.cross_entropy(model(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    optimizer.step()
    monitor.end_step(loss)
    monitor.close()
    assert not any(torch.equal(a, b) for a, b in zip(reference, model.parameters()))  # it trained
    return monitor.diagnostics, total.item()


@pytest.mark.parametrize(
    ("make", "layers"),
    [
        (ConvModel, ["embedding", "conv", "relu", "pool", "conv2d", "head"]),
        (lambda: RecurrentModel(nn.GRU), ["embedding", "rnn", "attention", "head"]),
        (lambda: RecurrentModel(nn.LSTM), ["embedding", "rnn", "attention", "head"]),
        (lambda: RecurrentModel(nn.RNN), ["embedding", "rnn", "attention", "head"]),
    ],
    ids=["conv", "gru", "lstm", "rnn"],
)
def test_every_layer_and_every_parameter_is_recorded_and_the_gradient_norm_is_torchs(make, layers):
    torch.manual_seed(0)
    model = make()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, VOCAB, (16, 8), generator=generator)
    diagnostics, total = _step(model, inputs, torch.randint(0, VOCAB, (16,), generator=generator))
    assert diagnostics.layers(m.ACT_STD) == layers
    assert set(diagnostics.parameters) == {name for name, _ in model.named_parameters()}
    for name, parameter in model.named_parameters():
        assert diagnostics.value(name, m.PARAM_GRAD_NORM, 0) == pytest.approx(
            torch.linalg.vector_norm(parameter.grad).item(), rel=1e-5
        )
    assert diagnostics.value("", m.GRAD_NORM, 0) == pytest.approx(total, rel=1e-6)


def test_a_recurrent_layer_is_recorded_through_its_output_sequence():
    torch.manual_seed(0)
    model = RecurrentModel(nn.LSTM)
    inputs = torch.randint(0, VOCAB, (4, 5))
    sequence = model.rnn(model.embedding(inputs))[0].detach().double().numpy()
    diagnostics, _ = _step(model, inputs, torch.randint(0, VOCAB, (4,)))
    assert diagnostics.value("rnn", m.ACT_MEAN, 0) == pytest.approx(sequence.mean(), abs=1e-6)
    assert diagnostics.value("rnn", m.ACT_STD, 0) == pytest.approx(sequence.std(ddof=1), rel=1e-5)


def test_a_packed_sequence_is_recorded_through_its_data():
    torch.manual_seed(0)
    gru = nn.GRU(3, 5)
    packed = pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([4, 2]))
    expected = gru(packed)[0].data.detach().numpy()
    with Monitor(gru, every=1) as monitor:
        monitor.begin_step(0)
        gru(packed)[0].data.sum().backward()
        monitor.end_step()
    assert monitor.diagnostics.value("(root)", m.ACT_MEAN, 0) == pytest.approx(expected.mean(), abs=1e-6)
    assert monitor.diagnostics.histogram("(root)", m.HIST_ACT, 0).counts.sum() == expected.size


def test_modules_whose_outputs_are_not_tensors_are_named_in_one_warning():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return {"out": self.linear(x)}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.other = Pair(), Pair()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.pair(x)["out"] * self.scale + self.other(x)["out"]

    model = Model()
    with Monitor(model, every=1, include=["Pair", "Linear"]) as monitor, warnings.catch_warnings(
        record=True
    ) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            monitor.begin_step(step)
            model(torch.randn(2, 3)).sum().backward()
            monitor.end_step()
    messages = [str(w.message) for w in caught if "normlab Monitor" in str(w.message)]
    assert len(messages) == 1 and "other, pair" in messages[0]
    assert "pair.linear.weight" in monitor.diagnostics.parameters
    assert "pair.linear" in monitor.diagnostics.layers(m.ACT_MEAN)


def test_default_selection_owns_every_parameter_and_skips_parameterless_containers():
    torch.manual_seed(0)
    model = ConvModel()
    with Monitor(model, every=1) as monitor:
        names = list(monitor.diagnostics.modules)
    assert names == ["embedding", "conv", "relu", "pool", "conv2d", "head"]  # not the model itself
    assert np.isclose(
        sum(np.prod(info.shape) for info in monitor.diagnostics.parameters.values()),
        sum(p.numel() for p in model.parameters()),
    )

"""NormlabCallback in a real PyTorch Lightning run (CPU, a few steps): one line attaches the monitor, the report
is written at the end, and the records match the model's own gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

from normlab.diagnostics import load_diagnostics  # noqa: E402
from normlab.diagnostics import metrics as m  # noqa: E402
from normlab.integrations.lightning import NormlabCallback  # noqa: E402


class CharModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(27, 8), nn.Flatten(), nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 27))
        self.last_grad_norm = {}

    def forward(self, tokens):
        return self.net(tokens)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return F.cross_entropy(self(tokens), targets)

    def on_before_optimizer_step(self, optimizer):
        self.last_grad_norm[self.global_step] = torch.linalg.vector_norm(self.net[2].weight.grad).item()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(batches=12, accumulate=1):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 27, (batches * 16, 3), generator=generator)
    targets = torch.randint(0, 27, (batches * 16,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, targets), batch_size=16)


def _fit(tmp_path, callback, accumulate=1):
    model = CharModel()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, _loader())
    return model


def test_the_callback_records_a_lightning_run_and_writes_the_report(tmp_path):
    model = _fit(tmp_path, NormlabCallback(tmp_path / "diag", every=4, histogram_every=4))
    diagnostics = load_diagnostics(tmp_path / "diag")
    assert diagnostics.steps() == [0, 4, 8]
    assert (tmp_path / "diag" / "report.html").is_file()
    for step in diagnostics.steps():  # gradients read after Lightning's closure ran training_step and backward
        assert diagnostics.value("net.2.weight", m.PARAM_GRAD_NORM, step) == pytest.approx(
            model.last_grad_norm[step], rel=1e-6
        )
        assert diagnostics.value("net.2.weight", m.UPDATE_TO_DATA, step) > 0
    assert diagnostics.value("", m.LOSS, 0) == pytest.approx(3.3, abs=0.3)
    assert "net.3" in diagnostics.layers(m.ACT_SATURATED)
    assert not any(module._forward_hooks for module in model.modules())  # every hook removed


def test_with_gradient_accumulation_each_optimizer_step_is_recorded_once(tmp_path):
    _fit(tmp_path, NormlabCallback(tmp_path / "diag", every=1, report=False), accumulate=3)
    diagnostics = load_diagnostics(tmp_path / "diag")
    assert diagnostics.steps() == [0, 1, 2, 3]
    assert not any("#" in name for name in diagnostics.modules)  # one micro-batch of outputs per step

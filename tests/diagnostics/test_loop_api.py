"""The one-call loop API (three added lines), gradient accumulation and evaluation passes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.diagnostics import Monitor, load_diagnostics
from normlab.diagnostics import metrics as m

from .models import batch, lesson_mlp, train_step


def test_three_added_lines_record_the_same_as_the_explicit_protocol(tmp_path):
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=2).start()  # added line 1
    for step in range(6):
        loss = F.cross_entropy(model(batch(step)[0]), batch(step)[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(step, loss)  # added line 2
    monitor.save(tmp_path, report=True)  # added line 3
    monitor.close()

    reference = lesson_mlp()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    with Monitor(reference, reference_optimizer, every=2) as explicit:
        for step in range(6):
            train_step(reference, reference_optimizer, explicit, step, *batch(step))
    loaded = load_diagnostics(tmp_path)
    assert loaded.steps() == [0, 2, 4]
    assert [row[:3] for row in loaded.rows()] == [row[:3] for row in explicit.diagnostics.rows()]
    np.testing.assert_allclose([r[3] for r in loaded.rows()], [r[3] for r in explicit.diagnostics.rows()], rtol=1e-12)
    assert (tmp_path / "report.html").is_file()


def test_evaluation_under_no_grad_between_steps_is_not_recorded():
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=1).start()
    for step in range(2):
        loss = F.cross_entropy(model(batch(step)[0]), batch(step)[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(step, loss)
        with torch.no_grad():
            model.eval()
            model(batch(99, 500)[0])  # an evaluation pass while the next step is armed
            model.train()
    monitor.close()
    assert "4#1" not in monitor.diagnostics.modules  # each module once per step
    assert monitor.diagnostics.histogram("4", m.HIST_ACT, 0).counts.sum() == 32 * 32


def test_with_gradient_accumulation_one_micro_batch_of_outputs_is_recorded():
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, every=1) as monitor:
        monitor.begin_step(0)
        optimizer.zero_grad()
        for micro in range(3):
            F.cross_entropy(model(batch(micro)[0]), batch(micro)[1]).backward()
            if micro == 0:
                monitor.stop_activations()
        grad = model[2].weight.grad.clone()
        optimizer.step()
        monitor.end_step()
    diagnostics = monitor.diagnostics
    assert not any("#" in name for name in diagnostics.modules)
    assert diagnostics.histogram("4", m.HIST_ACT, 0).counts.sum() == 32 * 32  # the first micro-batch's outputs
    assert diagnostics.value("2.weight", m.PARAM_GRAD_NORM, 0) == pytest.approx(
        torch.linalg.vector_norm(grad).item(), rel=1e-6
    )  # the accumulated gradient


def test_a_closure_optimizer_gets_the_gradients_computed_inside_its_step():
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = batch()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    with Monitor(model, optimizer, every=1) as monitor:
        monitor.begin_step(0)
        loss = optimizer.step(closure)  # forward and backward inside the step, as Lightning runs them
        grad = model[2].weight.grad.clone()
        monitor.end_step(loss)
    assert monitor.diagnostics.value("2.weight", m.PARAM_GRAD_NORM, 0) == pytest.approx(
        torch.linalg.vector_norm(grad).item(), rel=1e-6
    )
    assert np.isfinite(monitor.diagnostics.value("2.weight", m.UPDATE_TO_DATA, 0))

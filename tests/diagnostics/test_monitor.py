"""The Monitor's records against independent recomputation, and its hooks' life cycle."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import Monitor, collect, load_diagnostics
from normlab.diagnostics import metrics as m
from normlab.diagnostics import monitor as monitor_module

from .models import CONTEXT, VOCAB, batch, count_forward_hooks, lesson_mlp, train_step


def _std(tensor: torch.Tensor) -> float:
    return float(np.std(tensor.detach().double().numpy(), ddof=1))


def test_records_only_every_n_steps_and_when_forced():
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = batch()
    with Monitor(model, optimizer, every=3) as monitor:
        for step in range(8):
            monitor.begin_step(step, force=step == 7)
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.end_step(loss)
    assert monitor.diagnostics.steps() == [0, 3, 6, 7]


def _optimizer_hooks(optimizer):
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


def test_off_steps_run_with_no_hooks_at_all():
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    unmonitored = count_forward_hooks(lesson_mlp())
    with Monitor(model, optimizer, every=10) as monitor:
        assert monitor.begin_step(3) is False
        assert count_forward_hooks(model) == unmonitored == 0
        assert _optimizer_hooks(optimizer) == 0
        monitor.end_step()
        assert monitor.begin_step(10) is True
        assert count_forward_hooks(model) == 5  # one per selected module, while recording
        assert _optimizer_hooks(optimizer) == 2  # around optimizer.step(), while recording
        train_step(model, optimizer, None, 10, *batch())
        monitor.end_step()
        assert count_forward_hooks(model) == 0 and _optimizer_hooks(optimizer) == 0


def test_close_removes_every_hook_from_model_and_optimizer():
    model = lesson_mlp()
    optimizer = torch.optim.Adam(model.parameters())
    monitor = Monitor(model, optimizer, every=1)
    monitor.begin_step(0)  # closed in the middle of a recording step, after the forward pass
    loss = F.cross_entropy(model(batch()[0]), batch()[1])
    assert count_forward_hooks(model) == 5 and _optimizer_hooks(optimizer) == 2
    monitor.close()
    assert count_forward_hooks(model) == 0 and _optimizer_hooks(optimizer) == 0
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    loss.backward()  # the tensor hooks on recorded outputs are gone too: nothing is recorded
    assert monitor.diagnostics.is_empty
    with pytest.raises(RuntimeError, match="closed"):
        monitor.begin_step(1)


def test_activation_statistics_match_a_recomputation_of_the_layer():
    model = lesson_mlp()
    inputs, targets = batch()
    reference = copy.deepcopy(model)
    with Monitor(model, every=1, bins=8) as monitor:
        train_step(model, None, monitor, 0, inputs, targets)
    tanh_output = reference[:5](inputs).detach().numpy().astype(np.float64)
    diagnostics = monitor.diagnostics
    assert diagnostics.value("4", m.ACT_MEAN, 0) == pytest.approx(tanh_output.mean(), abs=1e-6)
    assert diagnostics.value("4", m.ACT_STD, 0) == pytest.approx(tanh_output.std(ddof=1), rel=1e-5)
    assert diagnostics.value("4", m.ACT_SATURATED, 0) == pytest.approx(np.mean(np.abs(tanh_output) > 0.97))
    histogram = diagnostics.histogram("4", m.HIST_ACT, 0)
    expected, _ = np.histogram(tanh_output, bins=8, range=(histogram.lo, histogram.hi))
    np.testing.assert_array_equal(histogram.counts, expected)
    assert (histogram.lo, histogram.hi) == pytest.approx((tanh_output.min(), tanh_output.max()))


def test_gradient_of_a_layer_output_matches_autograd():
    model = lesson_mlp()
    inputs, targets = batch()
    reference = copy.deepcopy(model)
    with Monitor(model, every=1) as monitor:
        train_step(model, None, monitor, 0, inputs, targets)
    hidden = reference[:5](inputs)
    hidden.retain_grad()
    F.cross_entropy(reference[5](hidden), targets).backward()
    assert monitor.diagnostics.value("4", m.GRAD_STD, 0) == pytest.approx(_std(hidden.grad), rel=1e-5)
    assert monitor.diagnostics.value("4", m.GRAD_MEAN, 0) == pytest.approx(
        hidden.grad.mean().item(), abs=1e-9
    )


def test_parameter_statistics_and_gradient_norms_match_torch():
    model = lesson_mlp()
    reference = copy.deepcopy(model)
    inputs, targets = batch()
    with Monitor(model, every=1) as monitor:
        train_step(model, None, monitor, 0, inputs, targets)
    F.cross_entropy(reference(inputs), targets).backward()
    diagnostics = monitor.diagnostics
    weight = reference[2].weight
    assert diagnostics.value("2.weight", m.PARAM_STD, 0) == pytest.approx(_std(weight), rel=1e-6)
    assert diagnostics.value("2.weight", m.PARAM_GRAD_STD, 0) == pytest.approx(_std(weight.grad), rel=1e-5)
    assert diagnostics.value("2.weight", m.GRAD_TO_DATA, 0) == pytest.approx(
        _std(weight.grad) / _std(weight), rel=1e-5
    )
    assert diagnostics.value("5.bias", m.PARAM_GRAD_NORM, 0) == pytest.approx(
        torch.linalg.vector_norm(reference[5].bias.grad).item(), rel=1e-6
    )
    total = nn.utils.clip_grad_norm_(reference.parameters(), max_norm=float("inf"))
    assert diagnostics.value("", m.GRAD_NORM, 0) == pytest.approx(total.item(), rel=1e-5)


def test_update_to_data_with_sgd_is_lr_times_grad_std_over_weight_std():
    model = lesson_mlp()
    learning_rate = 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    weight = model[2].weight
    before = weight.detach().clone()
    with Monitor(model, optimizer, every=1) as monitor:
        train_step(model, optimizer, monitor, 0, *batch())
    expected = learning_rate * _std(weight.grad) / _std(before)
    assert monitor.diagnostics.value("2.weight", m.UPDATE_TO_DATA, 0) == pytest.approx(expected, rel=1e-4)
    assert monitor.diagnostics.value("", m.LEARNING_RATE, 0) == learning_rate


def test_update_to_data_with_adam_matches_a_before_and_after_snapshot():
    model = lesson_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with Monitor(model, optimizer, every=2) as monitor:
        for step in range(3):
            before = model[5].weight.detach().clone()
            train_step(model, optimizer, monitor, step, *batch(step))
    after = model[5].weight.detach()
    expected = _std(after - before) / _std(before)
    assert monitor.diagnostics.value("5.weight", m.UPDATE_TO_DATA, 2) == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(0.01 * _std(model[5].weight.grad) / _std(before), rel=0.1)  # not SGD's


def _lesson_loop(model, monitor, steps, learning_rate):
    """The lesson's own loop: no torch.optim, the update written out, bracketed for the monitor."""
    for step in range(steps):
        inputs, targets = batch(step)
        monitor.begin_step(step)
        loss = F.cross_entropy(model(inputs), targets)
        for parameter in model.parameters():
            parameter.grad = None
        loss.backward()
        monitor.before_update(learning_rate)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter += -learning_rate * parameter.grad
        monitor.after_update()
        monitor.end_step(loss)


@pytest.mark.parametrize("histogram_every", [1, 2])  # copies (numpy), then sums taken at once on step 1
@pytest.mark.parametrize("width", [16, 600])  # small: copied flat; large: one parameter at a time, snapshots
def test_a_loop_without_an_optimizer_records_update_to_data_as_torch_sgd_does(width, histogram_every):
    recorded = []
    for manual in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(VOCAB, 10), nn.Flatten(), nn.Linear(CONTEXT * 10, width), nn.Tanh(),
                              nn.Linear(width, width), nn.Tanh(), nn.Linear(width, VOCAB))
        optimizer = None if manual else torch.optim.SGD(model.parameters(), lr=0.1)
        with Monitor(model, optimizer, every=1, histogram_every=histogram_every) as monitor:
            if manual:
                _lesson_loop(model, monitor, 2, 0.1)
            else:
                for step in range(2):
                    train_step(model, optimizer, monitor, step, *batch(step))
        recorded.append(monitor.diagnostics)
    manual, with_sgd = recorded
    for step in (0, 1):
        for name in ("2.weight", "4.weight", "6.bias"):
            assert manual.value(name, m.UPDATE_TO_DATA, step) == pytest.approx(
                with_sgd.value(name, m.UPDATE_TO_DATA, step), rel=1e-5)
        assert manual.value("", m.LEARNING_RATE, step) == 0.1


def test_update_to_data_of_a_written_out_update_is_its_std_over_the_weights_std():
    model = lesson_mlp()
    weight = model[2].weight
    before = weight.detach().clone()
    with Monitor(model, every=1) as monitor:
        _lesson_loop(model, monitor, 1, 0.05)
    expected = _std(weight.detach() - before) / _std(before)
    assert monitor.diagnostics.value("2.weight", m.UPDATE_TO_DATA, 0) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rate", ["0.1", True, [0.1]])
def test_before_update_names_a_learning_rate_that_is_not_a_number(rate):
    with Monitor(lesson_mlp(), every=1) as monitor, pytest.raises(TypeError, match="learning_rate must be a number"):
        monitor.before_update(rate)


def test_before_update_without_after_update_records_no_update_and_keeps_no_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 600), nn.Tanh(), nn.Linear(600, 4))  # large: snapshots taken
    monitor = Monitor(model, every=1, histogram_every=2)
    for step in range(2):
        monitor.begin_step(step)
        model(torch.randn(8, 512)).square().mean().backward()
        monitor.before_update(0.1)
        monitor.end_step()
    assert all(not capture.snapshots for capture in monitor._pending)
    assert monitor.diagnostics.layers(m.UPDATE_TO_DATA) == []
    assert monitor.diagnostics.value("0.weight", m.PARAM_STD, 1) == pytest.approx(_std(model[0].weight), rel=1e-5)
    monitor.close()


def test_an_in_place_relu_does_not_change_what_was_recorded_for_the_linear_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    inputs = torch.randn(8, 4)
    expected = model[0](inputs).detach().numpy()
    with Monitor(model, every=1) as monitor:
        monitor.begin_step(0)
        model(inputs).sum().backward()
        monitor.end_step()
    assert monitor.diagnostics.value("0", m.ACT_MEAN, 0) == pytest.approx(expected.mean(), abs=1e-6)
    assert monitor.diagnostics.histogram("0", m.HIST_ACT, 0).lo < 0  # the pre-ReLU values, negatives included


def test_a_module_called_twice_is_recorded_once_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.linear(self.act(x)))

    model = Twice()
    inputs = torch.randn(5, 4) * 3
    with Monitor(model, every=1) as monitor:
        monitor.begin_step(0)
        model(inputs).sum().backward()
        monitor.end_step()
    diagnostics = monitor.diagnostics
    assert diagnostics.value("act", m.ACT_MEAN, 0) == pytest.approx(
        torch.tanh(inputs).mean().item(), abs=1e-6
    )
    assert diagnostics.layers(m.ACT_MEAN) == ["act", "linear", "act#1"]  # forward order


def test_without_an_optimizer_parameters_are_read_at_end_step():
    model = lesson_mlp()
    with Monitor(model, every=1) as monitor:
        train_step(model, None, monitor, 0, *batch())
    diagnostics = monitor.diagnostics
    assert diagnostics.value("2.weight", m.PARAM_GRAD_STD, 0) == pytest.approx(
        _std(model[2].weight.grad), rel=1e-5
    )
    assert diagnostics.layers(m.UPDATE_TO_DATA) == []
    assert diagnostics.layers(m.LEARNING_RATE) == []


def test_scalar_steps_take_torch_sums_that_agree_with_the_histogram_steps_numpy():
    inputs, targets = batch()
    recorded = []
    for histogram_every in (1, 100):  # step 1 with histograms (copies, numpy), then without (sums taken at once)
        model = lesson_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Monitor(model, optimizer, every=1, histogram_every=histogram_every, bins=8) as monitor:
            for step in range(2):
                train_step(model, optimizer, monitor, step, inputs, targets)
        recorded.append([row for row in monitor.diagnostics.rows() if row[0] == 1])
    with_histograms, without = recorded
    assert [row[:3] for row in without] == [row[:3] for row in with_histograms]
    # float32 sums against float64 ones: a mean near zero differs by about 1e-7 of the values' scale
    assert [row[3] for row in without] == pytest.approx([row[3] for row in with_histograms], rel=1e-6, abs=1e-8)


def test_a_large_model_is_not_copied_on_scalar_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 4))  # past parameters.SMALL_MODEL_ELEMENTS
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=1, histogram_every=2)
    inputs = torch.randn(8, 512)
    for step in range(2):
        monitor.begin_step(step)
        loss = model(inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.end_step(loss)
    histogram_step, scalar_step = monitor._pending
    assert histogram_step.numel() > 512 * 512 and scalar_step.numel() == 0
    diagnostics = monitor.diagnostics
    assert diagnostics.value("0.weight", m.PARAM_STD, 1) == pytest.approx(_std(model[0].weight), rel=1e-5)
    monitor.close()


def test_statistics_do_not_depend_on_how_the_copies_are_chunked(monkeypatch):
    inputs, targets = batch()
    recorded = []
    for chunk_elements in (collect.CHUNK_ELEMENTS, 300):  # one vector, or several (some pieces alone)
        monkeypatch.setattr(collect, "CHUNK_ELEMENTS", chunk_elements)
        model = lesson_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with Monitor(model, optimizer, every=1, bins=8) as monitor:
            train_step(model, optimizer, monitor, 0, inputs, targets)
        recorded.append(monitor.diagnostics)
    expected, actual = recorded
    assert [row[:3] for row in actual.rows()] == [row[:3] for row in expected.rows()]
    assert [row[3] for row in actual.rows()] == pytest.approx([row[3] for row in expected.rows()], rel=1e-12)
    for key, by_step in expected.histograms.items():
        np.testing.assert_array_equal(actual.histograms[key][0].counts, by_step[0].counts)


def _run(monitor_every: int, steps: int, monkeypatch, batch_recordings: int):
    """Train the lesson MLP with Adam and a tensor learning rate that a scheduler changes in place."""
    monkeypatch.setattr(monitor_module, "BATCH_RECORDINGS", batch_recordings)
    model = lesson_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    inputs, targets = batch()
    monitor = Monitor(model, optimizer, every=monitor_every, bins=8)
    for step in range(steps):
        train_step(model, optimizer, monitor, step, inputs, targets)
        scheduler.step()
    return monitor


def test_recordings_summarised_in_batches_equal_those_summarised_at_once(monkeypatch):
    one_by_one = _run(2, 13, monkeypatch, batch_recordings=1)
    assert not one_by_one._pending
    batched = _run(2, 13, monkeypatch, batch_recordings=3)
    assert [capture.step for capture in batched._pending] == [12]  # 7 recordings: two batches of 3, one pending
    expected, actual = one_by_one.diagnostics, batched.diagnostics
    assert not batched._pending
    assert actual.steps() == expected.steps() == list(range(0, 13, 2))
    assert [row[:3] for row in actual.rows()] == [row[:3] for row in expected.rows()]
    np.testing.assert_array_equal([row[3] for row in actual.rows()], [row[3] for row in expected.rows()])
    for key, by_step in expected.histograms.items():
        for step, histogram in by_step.items():
            np.testing.assert_array_equal(actual.histograms[key][step].counts, histogram.counts)
    # the rate of each recorded step, though the scheduler changed the tensor in place since
    assert actual.series("", m.LEARNING_RATE)[1] == pytest.approx([0.01 / (1 + step) for step in range(0, 13, 2)])


def test_save_and_close_summarise_the_pending_recordings(monkeypatch, tmp_path):
    monitor = _run(1, 3, monkeypatch, batch_recordings=16)
    assert len(monitor._pending) == 3
    monitor.save(tmp_path)
    assert load_diagnostics(tmp_path).steps() == [0, 1, 2]
    monitor = _run(1, 3, monkeypatch, batch_recordings=16)
    monitor.close()
    assert not monitor._pending and monitor._diagnostics.steps() == [0, 1, 2]


def test_a_capture_beyond_the_chunk_size_is_summarised_at_once(monkeypatch):
    monkeypatch.setattr(collect, "CHUNK_ELEMENTS", 100)
    monitor = _run(1, 2, monkeypatch, batch_recordings=16)
    assert not monitor._pending and monitor._diagnostics.steps() == [0, 1]


def test_off_steps_still_check_the_step_and_the_monitor():
    model = lesson_mlp()
    monitor = Monitor(model, every=10)
    assert monitor.begin_step(np.int64(3)) is False
    with pytest.raises(ValueError, match="True"):
        monitor.begin_step(True)
    with pytest.raises(ValueError, match="-3"):
        monitor.begin_step(-3)
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.begin_step(3)


def test_invalid_arguments_raise_with_the_value():
    model = lesson_mlp()
    with pytest.raises(ValueError, match="every"):
        Monitor(model, every=0)
    with pytest.raises(ValueError, match="saturation_threshold"):
        Monitor(model, saturation_threshold=0.3)
    with pytest.raises(ValueError, match="bins"):
        Monitor(model, bins=1)
    with pytest.raises(TypeError, match="optimizer"):
        Monitor(model, "sgd")
    with Monitor(model, every=1) as monitor:
        with pytest.raises(ValueError, match="step"):
            monitor.begin_step(-1)
        monitor.begin_step(0)
        with pytest.raises(ValueError, match="scalar"):
            monitor.end_step(torch.zeros(3))

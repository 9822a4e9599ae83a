"""Plots: every PNG is written and decodes; helpers against hand computations."""

import matplotlib.image
import numpy as np
import pytest

from normlab.diagnostics import Diagnostics, Histogram, load_diagnostics, plot_all
from normlab.diagnostics.figures import distribution_layers
from normlab.diagnostics.storage import ModuleInfo
from normlab.diagnostics.timeplots import rebin
from normlab.runs.metrics import read_metrics


def test_plot_all_draws_the_lesson_plots_and_the_rest(run_dir, tmp_path):
    paths = plot_all(load_diagnostics(run_dir), tmp_path, read_metrics(run_dir))
    assert [path.name for path in paths] == [
        "activations_step0.png",
        "activations_step7.png",
        "gradients_step0.png",
        "gradients_step7.png",
        "weight_gradients_step0.png",
        "weight_gradients_step7.png",
        "update_to_data.png",
        "loss.png",
        "gradient_norms.png",
        "saturation.png",
        "activation_heatmaps_1.png",
    ]
    for path in paths:
        image = matplotlib.image.imread(path)  # decodes, so it is a real PNG
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_nothing_recorded_means_no_plots_but_the_loss_from_metrics(tmp_path):
    assert plot_all(Diagnostics(), tmp_path) == []
    rows = [{"step": 0, "train_loss": 3.3}, {"step": 1, "train_loss": 3.1}, {"event": "final", "test": 3.0}]
    assert [path.name for path in plot_all(Diagnostics(), tmp_path, rows)] == ["loss.png"]


def test_rebin_spreads_counts_uniformly_within_bins():
    histogram = Histogram(np.array([2, 2]), 0.0, 2.0)  # two values in [0, 1), two in [1, 2]
    shares = rebin(histogram, np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0]))
    np.testing.assert_allclose(shares, [0.0, 0.25, 0.25, 0.5, 0.0])


def test_distributions_show_nonlinearities_or_else_all_layers_but_the_output():
    diagnostics = Diagnostics()
    for order, (name, kind) in enumerate((("linear1", "linear"), ("norm", "norm"), ("head", "linear"))):
        diagnostics.modules[name] = ModuleInfo(name, "Linear", kind, order=order)
        diagnostics.add_histogram(0, name, "act", Histogram(np.array([1, 1]), 0.0, 1.0))
    assert distribution_layers(diagnostics) == ["linear1", "norm"]
    diagnostics.modules["act"] = ModuleInfo("act", "GELU", "activation", None, True, 3)
    diagnostics.add_histogram(0, "act", "act", Histogram(np.array([1, 1]), 0.0, 1.0))
    assert distribution_layers(diagnostics) == ["act"]


@pytest.mark.parametrize("step", [0, 7])
def test_distribution_plots_exist_for_a_chosen_step(run_dir, tmp_path, step):
    from normlab.diagnostics.plots import plot_activation_distributions

    path = plot_activation_distributions(load_diagnostics(run_dir), tmp_path / "a.png", step)
    assert path is not None and matplotlib.image.imread(path).size > 0
    assert plot_activation_distributions(load_diagnostics(run_dir), tmp_path / "b.png", step=5) is None

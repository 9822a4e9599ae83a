"""Names of the recorded metrics: one place, shared by the monitor, storage, plots, findings and exports.

Scalars of a module's output ("activation") and of the gradient flowing into it ("grad"), of a parameter's
values ("param") and gradient ("param_grad"), and global ones (empty layer name). Shares of units count units
along the layer's unit axis (see :mod:`normlab.diagnostics.layers`).
"""

GLOBAL = ""

LOSS = "loss"
LEARNING_RATE = "lr"
GRAD_NORM = "grad_norm"

ACT_MEAN = "act_mean"
ACT_STD = "act_std"
ACT_SATURATED = "act_saturated"
"""Share of a tanh/sigmoid-like layer's output elements in the flat tails."""
ACT_SATURATED_UNITS = "act_saturated_units"
"""Share of a tanh/sigmoid-like layer's units saturated for every example and position (the lesson's white
columns)."""
ACT_DEAD = "act_dead"
"""Share of a ReLU/ReLU6 layer's units never positive: their local gradient is exactly zero (dead units)."""
ACT_NEGATIVE = "act_negative"
"""Share of a GELU/SiLU/ELU/LeakyReLU-like layer's units never positive: near zero, with a small gradient."""
ACT_NONFINITE = "act_nonfinite"

GRAD_MEAN = "grad_mean"
GRAD_STD = "grad_std"
GRAD_NONFINITE = "grad_nonfinite"

PARAM_MEAN = "param_mean"
PARAM_STD = "param_std"
PARAM_NONFINITE = "param_nonfinite"
PARAM_GRAD_MEAN = "param_grad_mean"
PARAM_GRAD_STD = "param_grad_std"
PARAM_GRAD_NORM = "param_grad_norm"
PARAM_GRAD_NONFINITE = "param_grad_nonfinite"
GRAD_TO_DATA = "grad_to_data"
UPDATE_TO_DATA = "update_to_data"

NONFINITE_METRICS = (ACT_NONFINITE, GRAD_NONFINITE, PARAM_NONFINITE, PARAM_GRAD_NONFINITE)

HIST_ACT = "act"
HIST_GRAD = "grad"
HIST_PARAM = "param"
HIST_PARAM_GRAD = "param_grad"
HISTOGRAM_METRICS = frozenset({HIST_ACT, HIST_GRAD, HIST_PARAM, HIST_PARAM_GRAD})

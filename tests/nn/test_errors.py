"""Bad inputs through torch.nn and normlab.nn alike: the same exception type, and a message naming the fault.

Each row builds its module from a namespace (`torch.nn` or `normlab.nn`, which share class names), so one row
states the bad input once for both implementations.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from normlab import nn as nnl


@dataclass(frozen=True)
class BadInput:
    """Build a module from a namespace and call it on `input`; torch must reject it, and so must normlab."""

    name: str
    build: Callable
    input: Callable[[], object] = lambda: torch.randn(4, 3)
    eval: bool = False
    mentions: str = ""  # a piece of normlab's message that names the fault

    def __str__(self) -> str:
        return self.name


def _without(buffer: str) -> Callable:
    def build(namespace):
        module = namespace.BatchNorm1d(3)
        setattr(module, buffer, None)
        return module

    return build


def _leaf(shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(shape, requires_grad=True)


def _integers(shape: tuple[int, ...], dtype: torch.dtype = torch.long) -> Callable[[], torch.Tensor]:
    return lambda: torch.ones(shape, dtype=dtype)


BAD_INPUTS = [
    # BatchNorm1d
    BadInput("bn-1d-input", lambda nn: nn.BatchNorm1d(3), lambda: torch.randn(3), mentions="got 1D"),
    BadInput("bn-4d-input", lambda nn: nn.BatchNorm1d(3), lambda: torch.randn(2, 3, 4, 5), mentions="got 4D"),
    BadInput("bn-one-value-per-channel", lambda nn: nn.BatchNorm1d(3), lambda: torch.randn(1, 3),
             mentions="more than 1 value"),
    BadInput("bn-one-value-per-channel-3d", lambda nn: nn.BatchNorm1d(3), lambda: torch.randn(1, 3, 1),
             mentions="more than 1 value"),
    BadInput("bn-eval-without-running-stats-one-value",
             lambda nn: nn.BatchNorm1d(3, track_running_stats=False), lambda: torch.randn(1, 3), eval=True,
             mentions="more than 1 value"),
    BadInput("bn-eps-0-training", lambda nn: nn.BatchNorm1d(3, eps=0.0), mentions="got 0.0"),
    BadInput("bn-eps-negative-eval", lambda nn: nn.BatchNorm1d(3, eps=-1e-3), eval=True, mentions="-0.001"),
    BadInput("bn-channels-training", lambda nn: nn.BatchNorm1d(5),
             mentions="should contain 3 elements not 5"),
    BadInput("bn-channels-eval", lambda nn: nn.BatchNorm1d(5), eval=True, mentions="not 5"),
    BadInput("bn-channels-weight-only", lambda nn: nn.BatchNorm1d(5, track_running_stats=False),
             mentions="weight should contain 3"),
    BadInput("bn-float64-input-float32-layer", lambda nn: nn.BatchNorm1d(3),
             lambda: torch.randn(4, 3, dtype=torch.float64), mentions="torch.float64"),
    BadInput("bn-float32-input-float16-layer", lambda nn: nn.BatchNorm1d(3, dtype=torch.float16),
             mentions="torch.float16"),
    BadInput("bn-integer-input", lambda nn: nn.BatchNorm1d(3), _integers((4, 3)), mentions="torch.int64"),
    BadInput("bn-integer-input-eval", lambda nn: nn.BatchNorm1d(3, affine=False, track_running_stats=False),
             _integers((4, 3)), eval=True, mentions="torch.int64"),
    BadInput("bn-running_var-None-training", _without("running_var"), mentions="both be None"),
    BadInput("bn-running_mean-None-eval", _without("running_mean"), eval=True, mentions="evaluation mode"),
    BadInput("bn-negative-num_features", lambda nn: nn.BatchNorm1d(-1), mentions="negative dimension"),
    BadInput("bn-float-num_features", lambda nn: nn.BatchNorm1d(2.5)),
    # BatchNorm2d, BatchNorm3d
    BadInput("bn2d-3d-input", lambda nn: nn.BatchNorm2d(3), lambda: torch.randn(2, 3, 4), mentions="got 3D"),
    BadInput("bn2d-5d-input", lambda nn: nn.BatchNorm2d(3), lambda: torch.randn(2, 3, 1, 2, 2),
             mentions="(N, C, H, W)"),
    BadInput("bn2d-one-value-per-channel", lambda nn: nn.BatchNorm2d(3), lambda: torch.randn(1, 3, 1, 1),
             mentions="more than 1 value"),
    BadInput("bn2d-channels-eval", lambda nn: nn.BatchNorm2d(5), lambda: torch.randn(2, 3, 2, 2), eval=True,
             mentions="not 5"),
    BadInput("bn3d-4d-input", lambda nn: nn.BatchNorm3d(3), lambda: torch.randn(2, 3, 4, 4), mentions="got 4D"),
    BadInput("bn3d-integer-input", lambda nn: nn.BatchNorm3d(3), _integers((2, 3, 1, 2, 2)),
             mentions="torch.int64"),
    # SyncBatchNorm, without a process group
    BadInput("sync-1d-input", lambda nn: nn.SyncBatchNorm(3), lambda: torch.randn(3), mentions="got 1D"),
    BadInput("sync-zero-channels", lambda nn: nn.SyncBatchNorm(0), lambda: torch.randn(2, 0),
             mentions="non-zero"),
    BadInput("sync-one-value-per-channel", lambda nn: nn.SyncBatchNorm(3), lambda: torch.randn(1, 3, 1),
             mentions="more than 1 value"),
    BadInput("sync-channels-eval", lambda nn: nn.SyncBatchNorm(5), lambda: torch.randn(2, 3, 2, 2), eval=True,
             mentions="not 5"),
    # LayerNorm
    BadInput("ln-trailing-shape", lambda nn: nn.LayerNorm(4), mentions="[4, 3]"),
    BadInput("ln-too-few-axes", lambda nn: nn.LayerNorm((2, 3)), lambda: torch.randn(3), mentions="size [3]"),
    BadInput("ln-empty-normalized_shape", lambda nn: nn.LayerNorm([]), mentions="normalized_shape = []"),
    BadInput("ln-float64-input", lambda nn: nn.LayerNorm(3), lambda: torch.randn(4, 3, dtype=torch.float64),
             mentions="torch.float64"),
    BadInput("ln-integer-input", lambda nn: nn.LayerNorm(3), _integers((4, 3)), mentions="torch.int64"),
    BadInput("ln-integer-input-no-affine", lambda nn: nn.LayerNorm(3, elementwise_affine=False),
             _integers((4, 3)), mentions="torch.int64"),
    BadInput("ln-float-shape", lambda nn: nn.LayerNorm(2.0)),
    # GroupNorm
    BadInput("gn-groups-do-not-divide", lambda nn: nn.GroupNorm(2, 3), mentions="num_channels (3)"),
    BadInput("gn-zero-groups", lambda nn: nn.GroupNorm(0, 4)),
    BadInput("gn-negative-groups", lambda nn: nn.GroupNorm(-1, 3), mentions="got -1"),
    BadInput("gn-1d-input", lambda nn: nn.GroupNorm(1, 3), lambda: torch.randn(3), mentions="received 1"),
    BadInput("gn-one-value-per-group", lambda nn: nn.GroupNorm(3, 3), lambda: torch.randn(1, 3),
             mentions="more than 1 value"),
    BadInput("gn-channels", lambda nn: nn.GroupNorm(1, 4), mentions="weight of shape [4]"),
    BadInput("gn-channels-not-divisible-no-affine", lambda nn: nn.GroupNorm(2, 4, affine=False),
             mentions="num_groups=2"),
    BadInput("gn-float64-input", lambda nn: nn.GroupNorm(1, 3),
             lambda: torch.randn(4, 3, dtype=torch.float64), mentions="torch.float64"),
    BadInput("gn-integer-input-no-affine", lambda nn: nn.GroupNorm(1, 3, affine=False), _integers((4, 3)),
             mentions="torch.int64"),
    # RMSNorm
    BadInput("rms-trailing-shape", lambda nn: nn.RMSNorm(4), mentions="[4, 3]"),
    BadInput("rms-too-few-axes", lambda nn: nn.RMSNorm((2, 3)), lambda: torch.randn(3), mentions="got 1"),
    BadInput("rms-empty-normalized_shape", lambda nn: nn.RMSNorm([]), mentions="normalized_shape = []"),
    BadInput("rms-integer-input", lambda nn: nn.RMSNorm(3), _integers((4, 3)), mentions="torch.int64"),
    # Linear
    BadInput("linear-in-features", lambda nn: nn.Linear(2, 3), mentions="4x3 and 2x3"),
    BadInput("linear-0d-input", lambda nn: nn.Linear(2, 3), lambda: torch.tensor(1.0), mentions="0D"),
    BadInput("linear-float64-input", lambda nn: nn.Linear(3, 2),
             lambda: torch.randn(4, 3, dtype=torch.float64)),
    BadInput("linear-integer-input", lambda nn: nn.Linear(3, 2), _integers((4, 3))),
    BadInput("linear-negative-size", lambda nn: nn.Linear(-1, 2), mentions="negative dimension"),
    # Embedding
    BadInput("embedding-index-too-large", lambda nn: nn.Embedding(5, 2), lambda: torch.tensor([0, 5]),
             mentions="out of range"),
    BadInput("embedding-negative-index", lambda nn: nn.Embedding(5, 2), lambda: torch.tensor([-1]),
             mentions="out of range"),
    BadInput("embedding-float-indices", lambda nn: nn.Embedding(5, 2), lambda: torch.tensor([1.0]),
             mentions="torch.float32"),
    BadInput("embedding-int16-indices", lambda nn: nn.Embedding(5, 2), _integers((2,), torch.int16),
             mentions="torch.int16"),
    BadInput("embedding-bool-indices", lambda nn: nn.Embedding(5, 2), _integers((2,), torch.bool),
             mentions="torch.bool"),
    BadInput("embedding-list-of-indices", lambda nn: nn.Embedding(5, 2), lambda: [0, 1], mentions="list"),
    BadInput("embedding-padding_idx-too-large", lambda nn: nn.Embedding(5, 2, padding_idx=5),
             mentions="padding_idx=5"),
    BadInput("embedding-padding_idx-too-small", lambda nn: nn.Embedding(5, 2, padding_idx=-6),
             mentions="padding_idx=-6"),
    BadInput("embedding-_weight-shape", lambda nn: nn.Embedding(5, 2, _weight=torch.zeros(4, 2)),
             mentions="[4, 2]"),
    # Flatten, ReLU, Sequential
    BadInput("flatten-1d-input", lambda nn: nn.Flatten(), lambda: torch.randn(3)),
    BadInput("flatten-start-after-end", lambda nn: nn.Flatten(2, 1), lambda: torch.randn(2, 3, 4)),
    BadInput("relu-inplace-on-leaf", lambda nn: nn.ReLU(inplace=True), _leaf((2, 3))),
    BadInput("sequential-index-out-of-range", lambda nn: nn.Sequential(nn.Tanh())[1], mentions="index 1"),
    BadInput("sequential-index-negative-out-of-range", lambda nn: nn.Sequential(nn.Tanh())[-2],
             mentions="index -2"),
    BadInput("sequential-index-str", lambda nn: nn.Sequential(nn.Tanh())["0"]),
    BadInput("sequential-not-a-module", lambda nn: nn.Sequential(nn.Tanh(), 3), mentions="int"),
    BadInput("sequential-append-not-a-module", lambda nn: nn.Sequential().append(lambda x: x)),
]


def _raised(namespace, case: BadInput) -> BaseException | None:
    try:
        module = case.build(namespace)
        if case.eval:
            module.eval()
        module(case.input())
    except Exception as error:  # the row's whole point is to catch what each implementation raises
        return error
    return None


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's, for RMSNorm rows
@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_raises_the_exception_type_torch_raises(case):
    expected = _raised(torch.nn, case)
    assert expected is not None, "torch accepts this input: the row is not a bad input"
    actual = _raised(nnl, case)
    assert type(actual) is type(expected), f"torch raised {expected!r}, normlab raised {actual!r}"
    assert case.mentions in str(actual)

"""The table of module cases fed to the generic parity tests, after pytorch's common_modules.py.

A case names a torch.nn module and its normlab twin, the constructor arguments they share, the options only
normlab has, and the input to feed. `build_twins` draws random parameters and buffers into the torch module
and copies them into the normlab one, so every comparison starts from the same non-trivial state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn as tnn

from normlab import nn as nnl

DTYPES = (torch.float32, torch.float64)


def tolerance(dtype: torch.dtype) -> float:
    """The issue's bar: float64 within 1e-10, float32 within 1e-5."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_twin_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Equal shape and dtype, values within the dtype's tolerance (absolute and relative)."""
    tol = tolerance(dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@dataclass(frozen=True)
class Case:
    """One constructor call on both namespaces, and the input it takes."""

    name: str
    make: Callable  # make(namespace, dtype) → module, namespace being torch.nn or normlab.nn
    input_shape: tuple[int, ...]
    normlab_kwargs: dict = field(default_factory=dict)  # options torch does not have
    index_range: int | None = None  # integer input drawn from [0, index_range) (Embedding)
    dtypes: tuple[torch.dtype, ...] = DTYPES
    normlab_repr: Callable[[str], str] = str  # normlab's repr from torch's, for a twin of another class

    def __str__(self) -> str:
        return self.name


def layer(class_name: str, *args: object, takes_dtype: bool = True, **kwargs: object) -> Callable:
    """make(namespace, dtype) for `namespace.<class_name>(*args, **kwargs)` in `dtype`."""

    def make(namespace, dtype: torch.dtype, **extra: object) -> tnn.Module:
        cls = getattr(namespace, class_name)
        if takes_dtype:
            return cls(*args, dtype=dtype, **kwargs, **extra)
        return cls(*args, **kwargs, **extra).to(dtype)

    return make


def stand_in(torch_class: str, normlab_class: str, *args: object, **kwargs: object) -> Callable:
    """make(namespace, dtype) for a normlab layer whose torch twin is another class it equals in this setting."""

    def make(namespace, dtype: torch.dtype, **extra: object) -> tnn.Module:
        cls = getattr(namespace, torch_class if namespace is tnn else normlab_class)
        return cls(*args, dtype=dtype, **kwargs, **extra)

    return make


def renamed(torch_class: str, normlab_class: str, extra_repr: str = "", after_features: str = "") -> Callable:
    """normlab's repr from its stand-in's: the class renamed, options added after the features or at the end."""

    def normlab_repr(text: str) -> str:
        features, rest = text.removeprefix(f"{torch_class}(").split(", ", 1)
        return f"{normlab_class}({features}, {after_features}{rest[:-1]}{extra_repr})"

    return normlab_repr


def mlp(namespace, dtype: torch.dtype) -> tnn.Module:
    """The lesson's block: Linear → BatchNorm1d → Tanh → Linear, in `namespace`'s Sequential."""
    return namespace.Sequential(
        namespace.Linear(6, 5, bias=False, dtype=dtype),
        namespace.BatchNorm1d(5, dtype=dtype),
        namespace.Tanh(),
        namespace.Linear(5, 3, dtype=dtype),
    )


def embedding_mlp(namespace, dtype: torch.dtype) -> tnn.Module:
    """Embedding → Flatten → Linear → LayerNorm → ReLU: the character-level model's shape."""
    return namespace.Sequential(
        namespace.Embedding(7, 3, dtype=dtype),
        namespace.Flatten(),
        namespace.Linear(12, 5, dtype=dtype),
        namespace.LayerNorm(5, dtype=dtype),
        namespace.ReLU(),
    )


_BATCH_NORM_OPTIONS = {
    "default": {},
    "momentum-None": {"momentum": None},
    "momentum-0.5": {"momentum": 0.5},
    "affine-False": {"affine": False},
    "bias-False": {"bias": False},
    "affine-False-bias-False": {"affine": False, "bias": False},
    "track_running_stats-False": {"track_running_stats": False},
    "eps-0.1": {"eps": 0.1},
}

_SYNC_OPTIONS = ("default", "momentum-None", "affine-False", "bias-False", "track_running_stats-False")

CASES: list[Case] = [
    *(Case(f"BatchNorm1d-{name}-2d", layer("BatchNorm1d", 4, **kwargs), (7, 4))
      for name, kwargs in _BATCH_NORM_OPTIONS.items()),
    *(Case(f"BatchNorm1d-{name}-3d", layer("BatchNorm1d", 3, **kwargs), (4, 3, 5))
      for name, kwargs in _BATCH_NORM_OPTIONS.items()),
    *(Case(f"BatchNorm1d-closed-form-{name}-{rank}d", layer("BatchNorm1d", 3, **kwargs), shape,
           normlab_kwargs={"closed_form_backward": True})
      for name, kwargs in _BATCH_NORM_OPTIONS.items()
      for rank, shape in ((2, (6, 3)), (3, (3, 3, 4)))),
    *(Case(f"BatchNorm2d-{name}", layer("BatchNorm2d", 3, **kwargs), (3, 3, 2, 4))
      for name, kwargs in _BATCH_NORM_OPTIONS.items()),
    *(Case(f"BatchNorm3d-{name}", layer("BatchNorm3d", 3, **kwargs), (2, 3, 2, 3, 2))
      for name, kwargs in _BATCH_NORM_OPTIONS.items()),
    Case("BatchNorm2d-closed-form", layer("BatchNorm2d", 3), (3, 3, 2, 2),
         normlab_kwargs={"closed_form_backward": True}),
    Case("BatchNorm3d-closed-form-momentum-None", layer("BatchNorm3d", 2, momentum=None), (2, 2, 2, 2, 3),
         normlab_kwargs={"closed_form_backward": True}),
    Case("BatchNorm2d-one-value-per-image", layer("BatchNorm2d", 3), (4, 3, 1, 1)),
    *(Case(f"SyncBatchNorm-without-process-group-{name}-{len(shape)}d", layer("SyncBatchNorm", 3, **kwargs), shape)
      for name, kwargs in _BATCH_NORM_OPTIONS.items() if name in _SYNC_OPTIONS
      for shape in ((6, 3), (3, 3, 4), (2, 3, 2, 2), (2, 3, 1, 2, 2))),
    # ghost batches at least as large as the batch, and renorm without room to correct: BatchNorm1d
    *(Case(f"GhostBatchNorm1d-one-ghost-batch-{name}", stand_in("BatchNorm1d", "GhostBatchNorm1d", 4, **kwargs),
           (7, 4), normlab_kwargs={"ghost_batch_size": 7},
           normlab_repr=renamed("BatchNorm1d", "GhostBatchNorm1d", after_features="ghost_batch_size=7, "))
      for name, kwargs in _BATCH_NORM_OPTIONS.items()),
    Case("GhostBatchNorm1d-larger-than-batch-3d", stand_in("BatchNorm1d", "GhostBatchNorm1d", 3), (4, 3, 5),
         normlab_kwargs={"ghost_batch_size": 64},
         normlab_repr=renamed("BatchNorm1d", "GhostBatchNorm1d", after_features="ghost_batch_size=64, ")),
    *(Case(f"BatchRenorm1d-r_max-1-d_max-0-{name}-{rank}d", stand_in("BatchNorm1d", "BatchRenorm1d", 3, **kwargs),
           shape, normlab_kwargs={"r_max": 1.0, "d_max": 0.0},
           normlab_repr=renamed("BatchNorm1d", "BatchRenorm1d", ", r_max=1.0, d_max=0.0, warmup_steps=5000"))
      for name, kwargs in _BATCH_NORM_OPTIONS.items() if name != "track_running_stats-False"
      for rank, shape in ((2, (6, 3)), (3, (3, 3, 4)))),
    # with two values per channel x̂ = ±√(σ²/(σ²+ε)) and dx is all cancellation: float32 results (torch's
    # included) are off by ~1e-2 from the float64 truth, so only float64 can be held to the bar
    Case("BatchNorm1d-batch-of-2", layer("BatchNorm1d", 3), (2, 3), dtypes=(torch.float64,)),
    Case("LayerNorm-int", layer("LayerNorm", 5), (4, 5)),
    Case("LayerNorm-2-axes", layer("LayerNorm", (3, 4)), (2, 5, 3, 4)),
    Case("LayerNorm-elementwise_affine-False", layer("LayerNorm", 5, elementwise_affine=False), (3, 2, 5)),
    Case("LayerNorm-bias-False", layer("LayerNorm", [5], bias=False), (4, 5)),
    Case("LayerNorm-eps-0.1", layer("LayerNorm", torch.Size([5]), eps=0.1), (4, 5)),
    Case("GroupNorm-2d", layer("GroupNorm", 2, 6), (4, 6)),
    Case("GroupNorm-3d", layer("GroupNorm", 3, 6), (2, 6, 4)),
    Case("GroupNorm-4d", layer("GroupNorm", 2, 4), (2, 4, 3, 2)),
    Case("GroupNorm-one-group", layer("GroupNorm", 1, 4), (3, 4, 2)),
    Case("GroupNorm-affine-False", layer("GroupNorm", 2, 4, affine=False), (3, 4, 2)),
    Case("GroupNorm-bias-False", layer("GroupNorm", 2, 4, bias=False), (3, 4, 2)),
    Case("GroupNorm-eps-0.1", layer("GroupNorm", 4, 4, eps=0.1), (3, 4, 2)),
    Case("RMSNorm-eps-None", layer("RMSNorm", 5), (4, 5)),
    Case("RMSNorm-2-axes", layer("RMSNorm", (2, 5)), (3, 2, 5)),
    Case("RMSNorm-eps-0.1", layer("RMSNorm", 5, eps=0.1), (4, 5)),
    Case("RMSNorm-elementwise_affine-False", layer("RMSNorm", 5, elementwise_affine=False), (2, 3, 5)),
    Case("Linear", layer("Linear", 4, 3), (5, 4)),
    Case("Linear-bias-False", layer("Linear", 4, 3, bias=False), (5, 4)),
    Case("Linear-3d-input", layer("Linear", 4, 3), (2, 5, 4)),
    Case("Linear-1d-input", layer("Linear", 4, 3), (4,)),
    Case("Embedding", layer("Embedding", 6, 3), (4, 5), index_range=6),
    Case("Embedding-padding_idx", layer("Embedding", 6, 3, padding_idx=2), (4, 5), index_range=6),
    Case("Embedding-padding_idx-negative", layer("Embedding", 6, 3, padding_idx=-1), (9,), index_range=6),
    Case("Flatten", layer("Flatten", takes_dtype=False), (2, 3, 4)),
    Case("Flatten-1-2", layer("Flatten", 1, 2, takes_dtype=False), (2, 3, 4, 2)),
    Case("Tanh", layer("Tanh", takes_dtype=False), (3, 4)),
    Case("ReLU", layer("ReLU", takes_dtype=False), (3, 4)),
    Case("ReLU-inplace", layer("ReLU", inplace=True, takes_dtype=False), (3, 4)),
    Case("Sequential-mlp", mlp, (8, 6)),
    Case("Sequential-embedding-mlp", embedding_mlp, (6, 4), index_range=7),
]


CASES_AND_DTYPES = [(case, dtype) for case in CASES for dtype in case.dtypes]


def randomize_(module: tnn.Module, generator: torch.Generator) -> None:
    """Draw every parameter and buffer afresh: weights around 1, biases and means around 0, variances > 0."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                tensor.fill_(3)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("weight") and tensor.dim() < 2:
                tensor.uniform_(0.5, 1.5, generator=generator)
            else:
                tensor.normal_(0.0, 1.0, generator=generator)


def build_twins(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[tnn.Module, tnn.Module]:
    """The torch module with random state, and the normlab module loaded with that state (strict)."""
    reference = case.make(tnn, dtype)
    randomize_(reference, torch.Generator().manual_seed(seed))
    twin = case.make(nnl, dtype, **case.normlab_kwargs)
    twin.load_state_dict(reference.state_dict())
    return reference, twin


def make_input(case: Case, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A batch for `case`: indices for lookups, else values of mean 0.5 and scale 2 (not yet normalised)."""
    if case.index_range is not None:
        return torch.randint(case.index_range, case.input_shape, generator=generator)
    return torch.randn(case.input_shape, dtype=dtype, generator=generator) * 2 + 0.5

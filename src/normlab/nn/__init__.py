"""normlab.nn: the lesson's layers with their math written out, drop-in twins of torch.nn's.

Every layer with a torch.nn namesake is a `torch.nn.Module` with torch 2.13's constructor signature, parameter and
buffer names, repr and state-dict format, so `normlab.nn.X(*args, **kwargs)` can replace
`torch.nn.X(*args, **kwargs)` and state dicts load both ways; that includes `SyncBatchNorm`, written out over
`torch.distributed` (gloo or NCCL). `GhostBatchNorm1d` and `BatchRenorm1d` have no torch namesake; they keep
BatchNorm1d's parameters, buffers and state dicts. `Dropout` draws its masks from the generator it is given
(torch's own from the global one). normlab's own options are keyword-only. `init` holds the
initialisers, `functional` the batch norm with a hand-derived backward, `fold_batchnorm` folds eval-mode batch
norms into the Linear or convolution before them. `Module` is torch's, re-exported for models built on these
layers.
"""

from torch.nn import Module

from normlab.nn import functional, init
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.dropout import Dropout
from normlab.nn.fold import fold_batchnorm, foldable_batchnorms
from normlab.nn.ghost import GhostBatchNorm1d
from normlab.nn.layers import (
    Embedding,
    Flatten,
    FlattenConsecutive,
    Linear,
    Positionwise,
    ReLU,
    Sequential,
    Tanh,
)
from normlab.nn.norm import GroupNorm, LayerNorm, RMSNorm
from normlab.nn.renorm import BatchRenorm1d
from normlab.nn.sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "Dropout",
    "Embedding",
    "Flatten",
    "FlattenConsecutive",
    "GhostBatchNorm1d",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "Module",
    "Positionwise",
    "RMSNorm",
    "ReLU",
    "Sequential",
    "SyncBatchNorm",
    "Tanh",
    "fold_batchnorm",
    "foldable_batchnorms",
    "functional",
    "init",
]

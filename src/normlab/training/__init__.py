"""Training: one loop (`loop.train_loop`) over interchangeable engines (`engines`), the schedule and batches
(`schedule`), optimizers, evaluation and BatchNorm calibration (`evaluation`), and thread choice (`threads`)."""

from normlab.training.engines import Engine, choose_engine, create_engine
from normlab.training.evaluation import batchnorm_layers, calibrate_batchnorm, evaluate
from normlab.training.loop import Divergence, Interrupted, LoopEvents, train_loop
from normlab.training.schedule import learning_rate

__all__ = [
    "Divergence",
    "Engine",
    "Interrupted",
    "LoopEvents",
    "batchnorm_layers",
    "calibrate_batchnorm",
    "choose_engine",
    "create_engine",
    "evaluate",
    "learning_rate",
    "train_loop",
]

"""The stacked engine's compiled steps: a chunk of steps compiled ahead of time (AOTInductor), cached on disk.

A call of `steps_per_call` training steps is a pure function of tensors: the stacked weights, norm buffers and
optimizer state (updated in place), the training set, the chunk's batch indices and learning rates. It is
exported (`torch.export`) and compiled by AOTInductor into a shared library, then run through torch's C++
package loader. Compared with `torch.compile` the first call of a later process costs milliseconds, not the
~5 s of re-tracing a warm `torch.compile` (and no import of dynamo or inductor): `normlab compile` (which
`make setup` runs) prepares the presets' kernels, so even short runs start compiled.

A kernel is specific to everything it bakes in: the architecture, the number of models, the batch size, the
optimizer and its constant hyperparameters, the dtype, this torch and this engine's source; the key hashes all
of them. The number of training examples is a dynamic dimension, so one kernel serves any words file.

The cache lives in `$NORMLAB_CACHE/kernels` (default `~/.cache/normlab/kernels`); it holds shared libraries that
this machine compiled for itself, never files from elsewhere. Each kernel is written under a temporary name and
renamed into place, so a killed build leaves no half-written kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from normlab.config import ModelConfig, TrainConfig
from normlab.files import umask

# The train settings a compiled step bakes in (the rest, e.g. the learning rate schedule, stay outside: the
# rates are an input of each call).
BAKED_TRAIN_FIELDS = ("batch_size", "optimizer", "momentum", "weight_decay", "beta1", "beta2", "grad_clip")
# Model fields that only choose the initial weights: models differing only in them share a kernel.
INIT_FIELDS = ("init", "weight_scale", "bias_scale", "output_init", "output_weight_scale", "output_bias_scale",
               "output_norm_gain")
SOURCES = ("model.py", "optim.py", "engine.py", "layout.py", "kernels.py")


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$NORMLAB_CACHE/kernels`, else `$XDG_CACHE_HOME/normlab/kernels`, else
    `~/.cache/normlab/kernels`."""
    root = os.environ.get("NORMLAB_CACHE")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normlab" / "kernels"


def _source_fingerprint() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def kernel_key(models: Sequence[ModelConfig], train: TrainConfig, dtype: torch.dtype, block_size: int,
               vocab_size: int, steps: int, options: dict) -> str:
    """The name of the kernel for these models trained with `train`'s baked settings, `steps` steps per call."""
    description = {
        "torch": torch.__version__,
        "source": _source_fingerprint(),
        "models": [{name: value for name, value in dataclasses.asdict(model).items() if name not in INIT_FIELDS}
                   | {"has_hidden_bias": model.has_hidden_bias} for model in models],
        "train": {name: getattr(train, name) for name in BAKED_TRAIN_FIELDS},
        "threads": torch.get_num_threads(),  # inductor writes its parallel loops for this many
        "dtype": str(dtype), "block_size": block_size, "vocab_size": vocab_size, "steps": steps,
        "options": options,
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Kernel:
    """A loaded compiled chunk: `kernel(tensors)` runs it (inputs updated in place) and returns its outputs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._loader.run(list(tensors))


def load_kernel(key: str) -> Kernel | None:
    """The cached kernel `key`, or None when there is none (or it cannot be loaded: then it is rebuilt)."""
    path = cache_dir() / f"{key}.pt2"
    if not path.is_file():
        return None
    try:
        return Kernel(path)
    except Exception:  # e.g. a library built against another libtorch: build a new one
        return None


def build_kernel(key: str, function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                 dynamic: Sequence[int | None], options: dict) -> Kernel:
    """Export `function(*inputs)` (which may update its inputs in place), compile it with AOTInductor, store it
    as kernel `key` and load it. `dynamic[i]` names the dimension of input i that may vary (or None)."""
    import torch._inductor

    class Chunk(torch.nn.Module):
        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return function(*tensors)

    examples = torch.export.Dim("examples", min=2)
    shapes = tuple(None if axis is None else {axis: examples} for axis in dynamic)
    with warnings.catch_warnings():  # torch's own deprecation notices from inside export
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(Chunk(), tuple(inputs), dynamic_shapes=(shapes,), strict=False)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".pt2", prefix=f".{key}.", dir=directory)
    os.close(handle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=temporary, inductor_configs=options)
        os.chmod(temporary, 0o666 & ~umask())  # as any file the user creates (mkstemp's is private)
        os.replace(temporary, directory / f"{key}.pt2")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return Kernel(directory / f"{key}.pt2")

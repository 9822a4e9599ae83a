"""`normlab export RUN --out FILE.safetensors [--fold]`: a run's weights for inference, in one file that holds
everything needed to rebuild the model.

The file is the model's state dict in safetensors (nothing pickled), with metadata:

    format      normlab-export-1
    model       the ModelConfig as JSON          vocab   the characters, "." first, as JSON
    folded      the batch norms folded into the Linear before them, as a JSON list (empty without --fold)
    step        the training step of the weights calibrated   "true" if they are BatchNorm-calibrated
    source      the run directory it came from

With `fold`, every eval-mode batch norm that follows a Linear is folded into it (`normlab.nn.fold_batchnorm`):
the folded norms are `torch.nn.Identity` in the rebuilt model and have no tensors in the file. `load_exported`
rebuilds the model in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save as save_safetensors

from normlab.config import ModelConfig, RunConfig
from normlab.data import Vocab
from normlab.errors import CheckpointError, ConfigError, NormlabError
from normlab.files import atomic_write
from normlab.model import LanguageModel, build_model
from normlab.nn import fold_batchnorm, foldable_batchnorms
from normlab.runs.rundir import RunDir
from normlab.runs.tensors import read_safetensors

EXPORT_FORMAT = "normlab-export-1"


@dataclass
class Exported:
    """Where the weights went, from which step, and which batch norms were folded."""

    path: Path
    step: int
    folded: list[str]
    calibrated: bool


def _check_target(out: Path, force: bool) -> None:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {str(out)!r}: the exported file's name must end in .safetensors")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder: give a file name ending in .safetensors")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise ConfigError(f"the folder {str(out.parent)!r} of --out does not exist: create it first")


def export_weights(run: RunDir, out: str | Path, *, fold: bool = False, force: bool = False) -> Exported:
    """Write the run's current weights (calibrated, if it was) to `out`; see the module notes."""
    out = Path(out)
    _check_target(out, force)
    model, step = run.load_model()
    current = run.checkpoint()
    calibrated = bool(current and current.calibrated)
    model.eval()
    folded = foldable_batchnorms(model) if fold else []
    if fold:
        model = fold_batchnorm(model)
    metadata = {"format": EXPORT_FORMAT, "model": json.dumps(dataclasses.asdict(run.config.model)),
                "vocab": json.dumps(list(run.vocab.itos), ensure_ascii=False), "folded": json.dumps(folded),
                "step": str(step), "calibrated": "true" if calibrated else "false", "source": str(run.path)}
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    try:
        atomic_write(out, save_safetensors(tensors, metadata=metadata))
    except OSError as error:
        raise CheckpointError(f"cannot write {out} ({error.strerror or error})") from None
    return Exported(out, step, folded, calibrated)


def load_exported(path: str | Path) -> tuple[LanguageModel, Vocab]:
    """The model (in eval mode, folded as it was exported) and the vocabulary of an exported file."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, "")
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a normlab export (format {metadata.get('format')!r})")
    try:
        config: ModelConfig = RunConfig.from_dict({"model": json.loads(metadata["model"])}).model
        vocab = Vocab(tuple(json.loads(metadata["vocab"])))
        folded = json.loads(metadata["folded"])
    except (KeyError, ValueError, TypeError, NormlabError) as error:
        raise CheckpointError(f"{path} has damaged metadata ({error})") from None
    model = build_model(config, len(vocab)).eval()
    if folded:
        if foldable_batchnorms(model) != folded:
            raise CheckpointError(f"{path} lists folded batch norms {folded} that its model does not have")
        model = fold_batchnorm(model)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the weights do not fit the model in its metadata ({str(error)[:200]})"
                              ) from None
    return model, vocab

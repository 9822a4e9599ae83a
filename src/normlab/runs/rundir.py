"""The run directory (with `metrics` and `records`, the only modules that know its files): config, checkpoints.

    RUN/config.json                 the RunConfig
    RUN/vocab.json                  {"itos": [".", "a", ...]}
    RUN/checkpoint.json             which checkpoint is current: {"directory", "step", "metrics_bytes", ...}
    RUN/checkpoint-<step>/          the current checkpoint, written whole before checkpoint.json names it:
        model.safetensors               the model's state_dict; metadata: format, step (calibrated)
        optimizer.safetensors           the optimizer's tensors; metadata: format, step, the rest as JSON
        model.uncalibrated.safetensors  after `calibrate`: the weights as training left them
    RUN/metrics.jsonl               one JSON object a line: periodic losses, then {"event": "final", ...}
    RUN/diagnostics/                with --diagnose: what `normlab.diagnostics` recorded
    RUN/report.html                 the report
    RUN/.lock                       held (flock) by the process that writes the run: train, resume, calibrate

Crash safety: a checkpoint is committed by one atomic rename, that of `checkpoint.json`, after its folder is
complete on disk; the previous checkpoint's folder is deleted only after that. A process killed at any instant
therefore leaves the previous checkpoint or the new one, never a mixture; what it left half-written (a
checkpoint folder that `checkpoint.json` does not name, temporary files) is deleted the next time the run is
opened for writing. `metrics_bytes` is the length of `metrics.jsonl` at the checkpoint: resuming cuts the file
back to it, dropping the rows (even a torn last line) written after the checkpoint.

Runs written before checkpoint folders existed (`model.safetensors` and `optimizer.safetensors` beside
`config.json`) open as they are; their next checkpoint moves them to the new layout. No operation follows a
symbolic link out of the run directory, and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normlab.config import RunConfig
from normlab.data import Vocab
from normlab.errors import CheckpointError, NormlabError
from normlab.files import TEMPORARY_SUFFIX, atomic_write, remove_stale_temporaries, sync_folder
from normlab.model import LanguageModel, build_model, state_shapes
from normlab.runs import records
from normlab.runs import tensors as disk
from normlab.runs.lock import LOCK_FILE, RunLock
from normlab.runs.metrics import METRICS, MetricsFile
from normlab.runs.records import refuse_outside_link

CONFIG, VOCAB, CHECKPOINT = "config.json", "vocab.json", "checkpoint.json"
MODEL, OPTIMIZER, UNCALIBRATED = "model.safetensors", "optimizer.safetensors", "model.uncalibrated.safetensors"
DIAGNOSTICS, REPORT = "diagnostics", "report.html"
OPTIMIZER_CLASSES = {"sgd": "SGD", "adamw": "AdamW"}
MODEL_FORMAT, OPTIMIZER_FORMAT = disk.MODEL_FORMAT, disk.OPTIMIZER_FORMAT
CHECKPOINT_FOLDER = records.CHECKPOINT_FOLDER
LEFT_BY_CREATE = (LOCK_FILE, VOCAB)  # what a creation killed before config.json can leave: it may be created again
NO_WEIGHTS = (": the run directory holds no weights (training was interrupted, or diverged, before its first "
              "checkpoint: see its metrics.jsonl)")


@dataclass(frozen=True)
class Checkpoint:
    """The current checkpoint: its folder (the run directory itself for the old layout), its step, the length
    of `metrics.jsonl` when it was written (None: unknown, old layout) and whether `calibrate` changed it."""

    folder: Path
    step: int
    metrics_bytes: int | None
    calibrated: bool = False

    @property
    def keeps_uncalibrated(self) -> bool:
        """Whether the weights training left before `calibrate` are kept (always, but in the old layout)."""
        return (self.folder / UNCALIBRATED).is_file()


def read_vocab_size(run_path: str | Path) -> int | None:
    """The number of symbols in `RUN/vocab.json`, or None if it is missing or unreadable (for display)."""
    try:
        itos = json.loads((Path(run_path) / VOCAB).read_text(encoding="utf-8"))["itos"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(itos) if isinstance(itos, list) else None


def read_config_json(run_path: str | Path) -> dict[str, Any] | None:
    """The raw JSON object of `RUN/config.json`, or None if it is missing or unreadable (for display)."""
    try:
        value = json.loads((Path(run_path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class RunDir(MetricsFile):
    """A run directory on disk, with its config and vocabulary loaded and checked.

    Opened for writing (`create`, or `open(path, lock=...)`), it holds the run's lock until `release` (or the
    end of a `with` block, or of the process).
    """

    path: Path
    config: RunConfig
    vocab: Vocab
    lock: RunLock = field(init=False, repr=False, compare=False)
    made_folder: bool = field(default=False, init=False, repr=False, compare=False)  # by `create`

    def __post_init__(self) -> None:
        self.lock = RunLock(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @classmethod
    def create(cls, path: str | Path, config: RunConfig, vocab: Vocab) -> RunDir:
        """Make a new run directory and hold its lock; refuses one that already holds files (nothing is ever
        overwritten; what a creation killed before it wrote `config.json`, its last file, left does not count)
        and names a folder that cannot be created."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} already exists and is not a folder: choose another --out")
        made = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"cannot create the run directory {path} ({error.strerror or error}): choose "
                                  "another --out, in a folder you can write to") from None
        run = cls(path, config, vocab)
        run.made_folder = made
        run._refuse_taken()
        run.lock.acquire("train")
        try:
            run._refuse_taken()  # again, now that no other process can be creating it
        except CheckpointError:
            run.release()
            raise
        try:
            remove_stale_temporaries(path)  # of a creation killed before it wrote config.json, its last file
            atomic_write(path / VOCAB, vocab.to_json())
            atomic_write(path / CONFIG, config.to_json())
        except OSError as error:
            run.release()
            raise CheckpointError(f"cannot write to {path} ({error.strerror or error})") from None
        return run

    def _refuse_taken(self) -> None:
        if (self.path / CONFIG).exists() or any(entry.name not in LEFT_BY_CREATE and not entry.name.endswith(
                TEMPORARY_SUFFIX) for entry in self.path.iterdir()):
            raise CheckpointError(f"{self.path} already exists and is not empty: choose another --out, or continue "
                                  "that run with --resume")

    @classmethod
    def open(cls, path: str | Path, *, lock: str | None = None) -> RunDir:
        """Open an existing run directory; `CheckpointError` if it is missing or its config/vocab are bad.

        With `lock` (what the caller does, e.g. "resume"), take the run's lock first and delete what a killed
        process left half-written. Without, the run is only read (several readers and one writer may share it).
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"run directory {path} does not exist: give the --out of a `normlab train`")
        for name in (CONFIG, VOCAB):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name} is missing: {path} is not a normlab run directory")
            refuse_outside_link(path / name, path)
        try:
            config = RunConfig.from_json((path / CONFIG).read_text(encoding="utf-8"))
            vocab = Vocab.from_json((path / VOCAB).read_text(encoding="utf-8"))
        except (NormlabError, UnicodeDecodeError, OSError, RecursionError) as error:
            raise CheckpointError(f"{path}: {error}") from None
        run = cls(path, config, vocab)
        for name in (METRICS, CHECKPOINT, MODEL, OPTIMIZER, DIAGNOSTICS, REPORT):
            refuse_outside_link(path / name, path)
        if lock is not None:
            run.lock.acquire(lock)
            try:
                run.remove_stale_files()
            except BaseException:
                run.release()
                raise
        return run

    def release(self) -> None:
        """Give back the run's lock, if this object holds it."""
        self.lock.release()

    def save_config(self) -> None:
        """Write `self.config` to `config.json` (e.g. after extending the run's steps)."""
        with self._writing():
            atomic_write(self.path / CONFIG, self.config.to_json())

    def discard_new(self) -> None:
        """Remove what `create` wrote (a run that failed before its first checkpoint, so that the same `--out`
        can be used again), and the folder itself if `create` made it and nothing else is left in it."""
        for name in (CONFIG, VOCAB, METRICS):
            (self.path / name).unlink(missing_ok=True)
        self.release()
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        if self.made_folder and not any(self.path.iterdir()):
            self.path.rmdir()

    # ------------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self) -> Checkpoint | None:
        """The current checkpoint, or None before the first one; `CheckpointError` if `checkpoint.json` is
        damaged."""
        pointer = self.path / CHECKPOINT
        if not pointer.exists():
            if (self.path / MODEL).is_file():  # the layout before checkpoint folders
                _, metadata = disk.read_safetensors(self.path / MODEL, NO_WEIGHTS)
                return Checkpoint(self.path, disk.step_of(metadata, self.path / MODEL), None,
                                  metadata.get("calibrated") == "true")
            return None
        try:
            text = pointer.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        committed = records.Pointer.from_json(text, pointer)
        folder = committed.folder
        if not (self.path / folder).is_dir() or (self.path / folder).is_symlink():
            raise CheckpointError(f"{pointer} names {folder}/, which is missing (or a link): restore it, or train "
                                  "again")
        return Checkpoint(self.path / folder, committed.step, committed.metrics_bytes, committed.calibrated)

    def save_checkpoint(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
                        step: int) -> None:
        """Commit the model's and the optimizer's state (torch's state-dict format) after `step` steps, with the
        current length of `metrics.jsonl`, as one checkpoint."""
        files = {MODEL: disk.model_bytes(model_state, step)}
        if optimizer_state is not None:
            class_name = OPTIMIZER_CLASSES[self.config.train.optimizer]
            files[OPTIMIZER] = disk.optimizer_bytes(optimizer_state, class_name, step)
        self._commit(files, {}, step, self.metrics_size())

    def save_model(self, model_state: dict[str, torch.Tensor], step: int, **metadata: str) -> None:
        """Commit new weights from a state dict as the run's checkpoint; the optimizer state of the current
        checkpoint is kept when it is of the same step."""
        current = self.checkpoint()
        same = current is not None and current.step == step
        carried = {OPTIMIZER: current.folder / OPTIMIZER} if same and (current.folder / OPTIMIZER).is_file() else {}
        self._commit({MODEL: disk.model_bytes(model_state, step, **metadata)}, carried, step,
                     current.metrics_bytes if same else self.metrics_size())

    def save_calibrated(self, model_state: dict[str, torch.Tensor]) -> None:
        """Commit calibrated weights in place of the current checkpoint's, keeping the weights training left
        (`model.uncalibrated.safetensors`, kept from the first calibration on), the optimizer state and the
        metrics position, so that resuming or extending the run continues exactly from training's weights."""
        current = self._require_checkpoint()
        carried = {UNCALIBRATED: current.folder / (UNCALIBRATED if (current.folder / UNCALIBRATED).is_file()
                                                   else MODEL)}
        if (current.folder / OPTIMIZER).is_file():
            carried[OPTIMIZER] = current.folder / OPTIMIZER
        files = {MODEL: disk.model_bytes(model_state, current.step, calibrated="true")}
        self._commit(files, carried, current.step, current.metrics_bytes, calibrated=True)

    def _commit(self, files: dict[str, bytes], carried: dict[str, Path], step: int, metrics_bytes: int | None,
                calibrated: bool = False) -> None:
        """Write a complete checkpoint folder, then name it in `checkpoint.json` (the commit), then delete the
        previous one."""
        with self._writing():
            name = self._free_folder_name(step)
            folder = self.path / name
            shutil.rmtree(folder, ignore_errors=True)  # a half-written folder of a killed process
            folder.mkdir()
            for file_name, data in files.items():
                atomic_write(folder / file_name, data)
            for file_name, source in carried.items():
                _link_or_copy(source, folder / file_name)
            sync_folder(folder)
            atomic_write(self.path / CHECKPOINT, records.Pointer(name, step, metrics_bytes, calibrated).to_json())
            self._remove_old_checkpoints(keep=name)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the run's lock for the block: already held, or taken for it (a library caller's save)."""
        taken_here = not self.lock.held
        self.lock.acquire("save")
        try:
            yield
        finally:
            if taken_here:
                self.release()

    def _free_folder_name(self, step: int) -> str:
        current = self.checkpoint()
        name = f"checkpoint-{step}"
        return name + ".1" if current is not None and current.folder.name == name else name

    def _remove_old_checkpoints(self, keep: str | None) -> None:
        """Delete every checkpoint folder but `keep`; with a `keep`, the files of the old layout too."""
        for entry in self.path.iterdir():
            if CHECKPOINT_FOLDER.fullmatch(entry.name) and entry.name != keep and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        for name in (MODEL, OPTIMIZER) if keep is not None else ():
            if (self.path / name).is_file() and not (self.path / name).is_symlink():
                (self.path / name).unlink()

    def remove_stale_files(self) -> None:
        """Delete what a killed process left half-written: temporary files, checkpoint folders that
        `checkpoint.json` does not name, and the old layout's files once it names one. Call only while holding
        the lock."""
        current = self.checkpoint()
        for folder in (self.path, self.path / DIAGNOSTICS, *([current.folder] if current else [])):
            if folder.is_dir() and not folder.is_symlink():
                remove_stale_temporaries(folder)
        new_layout = current is not None and current.folder != self.path
        self._remove_old_checkpoints(keep=current.folder.name if new_layout else None)

    def _require_checkpoint(self) -> Checkpoint:
        current = self.checkpoint()
        if current is None:
            raise CheckpointError(f"{self.path / MODEL} is missing{NO_WEIGHTS}")
        return current

    def model_step(self) -> int:
        """The step of the current checkpoint."""
        return self._require_checkpoint().step

    def load_state(self, *, uncalibrated: bool = False) -> tuple[dict[str, torch.Tensor], int]:
        """The weights of the current checkpoint as a state dict, and their step (no module is built); with
        `uncalibrated`, the weights training left before any `calibrate`. Every key, shape and dtype is checked
        against the model of `config.json` first, and every value must be finite."""
        current, path, tensors, metadata = self._read_current((UNCALIBRATED, MODEL) if uncalibrated else (MODEL,))
        if metadata.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{path} is not a normlab model checkpoint (format {metadata.get('format')!r}, "
                                  f"expected {MODEL_FORMAT!r})")
        step = disk.step_of(metadata, path)
        if step != current.step:
            raise CheckpointError(f"{path} is from step {step}, {self.path / CHECKPOINT} says {current.step}: "
                                  "restore the checkpoint, or train again")
        records.check_weights(tensors, state_shapes(self.config.model, len(self.vocab)), path, self.path / CONFIG)
        return tensors, step

    def _read_current(self, names: tuple[str, ...]) -> tuple[Checkpoint, Path, dict[str, torch.Tensor],
                                                           dict[str, str]]:
        """The first file of `names` present in the current checkpoint, read (tensors and metadata). Readers take
        no lock, so a writer may replace the checkpoint between finding it and reading it: then it is read again."""
        current, tries = self._require_checkpoint(), 3
        while True:
            path = next((current.folder / name for name in names if (current.folder / name).is_file()),
                        current.folder / names[-1])
            try:
                return current, path, *disk.read_safetensors(path, NO_WEIGHTS)
            except CheckpointError:
                newer, tries = self._require_checkpoint(), tries - 1
                if newer == current or tries == 0:  # damaged, not replaced
                    raise
                current = newer

    def load_model(self, device: str = "cpu", *, uncalibrated: bool = False) -> tuple[LanguageModel, int]:
        """Build the model of `config.json` and load the current weights into it; returns (model, step)."""
        tensors, step = self.load_state(uncalibrated=uncalibrated)
        model = build_model(self.config.model, len(self.vocab), seed=self.config.train.seed)
        model.load_state_dict(tensors, strict=True)
        return model.to(device), step

    def load_optimizer_state(self, expected_step: int) -> dict[str, Any]:
        """The optimizer state of the current checkpoint in torch's state-dict format; its step must equal
        `expected_step` (the model's)."""
        current = self._require_checkpoint()
        path = current.folder / OPTIMIZER
        tensors, metadata = disk.read_safetensors(path, ": the run holds no optimizer state, so it cannot be "
                                                  "resumed (the model is usable for sample, eval and export)")
        class_name = OPTIMIZER_CLASSES[self.config.train.optimizer]
        if metadata.get("format") != OPTIMIZER_FORMAT or metadata.get("class") != class_name:
            raise CheckpointError(f"{path} holds no {class_name} state for this run's config")
        step = disk.step_of(metadata, path)
        if step != expected_step:
            raise CheckpointError(f"{path} is from step {step} but the model is from step {expected_step}: it "
                                  "cannot be resumed exactly (the model is still usable for sample and eval)")
        with torch.device("meta"):
            shapes = [tuple(p.shape) for p in build_model(self.config.model, len(self.vocab)).parameters()]
        return disk.optimizer_state(tensors, metadata, shapes, path)

def _link_or_copy(source: Path, target: Path) -> None:
    """Give `target` the contents of the finished, never-modified file `source`: a hard link where possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)

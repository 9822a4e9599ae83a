"""The Ray backend on a local Ray instance of two CPUs: every run of a sweep ends exactly where the local process
pool ends it (same losses, rows and divergences), and `use_backend` routes sweeps that name no backend to it."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import tiny_command

from normlab.config import ModelConfig, TrainConfig
from normlab.data import Vocab, load_words, make_splits
from normlab.runs.rundir import RunDir
from normlab.sweeps.backends import LocalBackend, RayBackend
from normlab.sweeps.runner import SweepRun, run_sweep, use_backend

ray = pytest.importorskip("ray")

MODEL = ModelConfig(n_embd=4, n_hidden=16, init="kaiming", output_weight_scale=0.1, output_bias_scale=0.0)
TRAIN = TrainConfig(steps=120, batch_size=8, eval_every=40, eval_examples=200, checkpoint_every=1000)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with two worker CPUs for the module."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _runs() -> list[SweepRun]:
    """Two lockstep groups (no norm; BatchNorm) and a run that trains alone on the reference engine."""
    return [SweepRun("lr 0.1", MODEL, TRAIN),
            SweepRun("lr 0.3 seed 5", MODEL, dataclasses.replace(TRAIN, lr=0.3, seed=5)),
            SweepRun("batch", dataclasses.replace(MODEL, norm="batch"), TRAIN),
            SweepRun("batch momentum", dataclasses.replace(MODEL, norm="batch", bn_momentum=0.01), TRAIN),
            SweepRun("ghost", dataclasses.replace(MODEL, norm="ghostbatch", ghost_batch_size=4), TRAIN)]


def test_ray_tasks_give_the_results_of_the_local_process_pool(local_ray, words_file):
    words = load_words(words_file)
    vocab = Vocab.from_words(words)
    splits = make_splits(words, vocab, 3)
    pool = run_sweep(_runs(), splits, len(vocab), progress=False, backend=LocalBackend(2), keep_models=True)
    with use_backend(RayBackend()):
        on_ray = run_sweep(_runs(), splits, len(vocab), progress=False, keep_models=True)
    assert [r.name for r in on_ray] == [r.name for r in pool]
    for local, remote in zip(pool, on_ray):
        losses = (local.train_loss, local.val_loss)
        assert (remote.train_loss, remote.val_loss) == pytest.approx(losses, rel=1e-12), local.name
        assert _untimed(remote.rows) == _untimed(local.rows) and remote.engine == local.engine, local.name
        for key, value in (local.state or {}).items():
            assert remote.state[key].equal(value), (local.name, key)


def _untimed(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "elapsed_s"} for row in rows]


def test_normlab_sweep_ray_writes_the_same_run_directories(local_ray, tmp_path, words_file, capsys):
    assert tiny_command("sweep", "lesson-kaiming", tmp_path / "pool", words_file, "--vary", "lr=0.05,0.1") == 0
    assert tiny_command("sweep", "lesson-kaiming", tmp_path / "ray", words_file, "--vary", "lr=0.05,0.1",
                        "--ray") == 0
    for name in ("lr-0.05", "lr-0.1"):
        pool, on_ray = (RunDir.open(tmp_path / where / name) for where in ("pool", "ray"))
        assert on_ray.read_metrics()[-1] == pool.read_metrics()[-1]  # the final full-split losses
        for key, value in pool.load_state()[0].items():
            assert on_ray.load_state()[0][key].equal(value), key

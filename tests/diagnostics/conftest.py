"""Shared fixture: a small run directory with recorded diagnostics, metrics, config and vocabulary."""

import json

import pytest
import torch

from normlab.diagnostics import Monitor

from .models import VOCAB, batch, lesson_mlp, train_step


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one torch thread, and on a shared machine more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A run directory as training writes it: config.json, vocab.json, metrics.jsonl and diagnostics/."""
    run = tmp_path_factory.mktemp("run")
    model = lesson_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = []
    with Monitor(model, optimizer, every=3, histogram_every=3, bins=32) as monitor:
        for step in range(8):
            monitor.begin_step(step, force=step == 7)
            loss = train_step(model, optimizer, None, step, *batch(step))
            monitor.end_step(loss)
            rows.append({"step": step, "train_loss": loss.item(), "lr": 0.1, "elapsed_s": 0.01 * step})
            if step % 4 == 3:
                rows[-1]["val_loss"] = loss.item() + 0.1
        monitor.save(run)
    rows.append({"event": "final", "step": 8, "train": 3.1, "val": 3.2, "test": 3.3})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "config.json").write_text(json.dumps({"preset": "tiny <test>", "lr": 0.1, "layers": [32, 27]}))
    (run / "vocab.json").write_text(
        json.dumps({"itos": [chr(ord("a") + i) for i in range(VOCAB - 1)] + ["."]})
    )
    return run

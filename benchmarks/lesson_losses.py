"""Quality benchmark: do the presets reproduce the lesson's loss log?

Trains every lesson preset with its full recipe on a words file and prints the final train/val losses (full
splits) next to the lesson's published figures, plus an independent plain-PyTorch implementation of the
batchnorm recipe (the lesson's own code: raw tensors, manual SGD) run in the same benchmark. Ends with one JSON line.
The presets train through normlab's sweep runner: the stacked engine where the model allows it (lockstep for the
presets that share an architecture), the reference path for lesson-deep and wavenet, over two processes.

    python benchmarks/lesson_losses.py --data ../shared/anchors/names.txt            # the lesson's file
    python benchmarks/lesson_losses.py                                               # the bundled names
    python benchmarks/lesson_losses.py --presets lesson-batchnorm --steps 20000      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

# The lesson's loss log (train, val), measured on its 2018 names file with its split.
PUBLISHED = {
    "lesson-original": (2.1245, 2.1682),
    "lesson-softmax-fix": (2.07, 2.13),
    "lesson-tanh-fix": (2.0356, 2.1027),
    "lesson-kaiming": (2.0377, 2.1070),
    "lesson-batchnorm": (2.0668, 2.1048),
    "wavenet": (1.769, 1.993),
}
TOLERANCE = 0.015


def run_presets(names: list[str], data: str | None, steps: int | None) -> list[dict]:
    """Train the presets with normlab's sweep runner (the stacked engine where the model allows it, lockstep for
    presets of one architecture, two processes); full-split losses with running and calibrated statistics."""
    from normlab.config import config_for_preset
    from normlab.runs.commands import load_data
    from normlab.sweeps.runner import SweepRun, run_sweep
    from normlab.training import calibrate_batchnorm, evaluate

    runs = []
    for name in names:
        config = config_for_preset(name, [f"steps={steps}"] if steps else [])
        if steps and config.train.lr_decay_step:  # keep the decay at the same fraction of a shortened run
            config.train.lr_decay_step = int(config.train.lr_decay_step * steps / 200_000)
        config.data.path = data
        runs.append((config, SweepRun(name, config.model, config.train)))
    results = []
    for block_size in sorted({config.model.block_size for config, _ in runs}):
        group = [(config, run) for config, run in runs if config.model.block_size == block_size]
        vocab, splits = load_data(group[0][0])
        for result in run_sweep([run for _, run in group], splits, len(vocab), keep_models=True):
            row = {"name": result.name, "train": result.train_loss, "val": result.val_loss,
                   "seconds": result.seconds}
            if calibrate_batchnorm(result.model, splits.train[0]):
                row["train_calibrated"] = evaluate(result.model, *splits.train)
                row["val_calibrated"] = evaluate(result.model, *splits.val)
            results.append(row)
    return results


def run_plain_batchnorm(data: str | None, steps: int | None) -> dict:
    """The lesson's batchnorm recipe written as the lesson writes it: raw tensors and a manual SGD loop."""
    from normlab.data import Vocab, build_dataset, load_words, split_words

    words = load_words(data)
    vocab = Vocab.from_words(words)
    train_words, val_words, _ = split_words(words, 42)
    xtr, ytr = build_dataset(train_words, vocab, 3)
    xval, yval = build_dataset(val_words, vocab, 3)
    steps = steps or 200_000
    n_embd, n_hidden, vocab_size = 10, 200, len(vocab)
    g = torch.Generator().manual_seed(2147483647)
    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((n_embd * 3, n_hidden), generator=g) * (5 / 3) / (n_embd * 3) ** 0.5
    W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.01
    b2 = torch.randn(vocab_size, generator=g) * 0
    bngain, bnbias = torch.ones((1, n_hidden)), torch.zeros((1, n_hidden))
    bnmean_running, bnvar_running = torch.zeros((1, n_hidden)), torch.ones((1, n_hidden))
    parameters = [C, W1, W2, b2, bngain, bnbias]
    for p in parameters:
        p.requires_grad = True
    started = time.perf_counter()
    for i in range(steps):
        ix = torch.randint(0, xtr.shape[0], (32,), generator=g)
        hpreact = C[xtr[ix]].view(32, -1) @ W1
        mean, var = hpreact.mean(0, keepdim=True), hpreact.var(0, keepdim=True, unbiased=False)
        hpreact = bngain * (hpreact - mean) / torch.sqrt(var + 1e-5) + bnbias
        with torch.no_grad():
            bnmean_running.mul_(0.999).add_(0.001 * mean)
            bnvar_running.mul_(0.999).add_(0.001 * var * 32 / 31)  # torch tracks the unbiased variance
        loss = F.cross_entropy(torch.tanh(hpreact) @ W2 + b2, ytr[ix])
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < steps // 2 else 0.01
        for p in parameters:
            p.data += -lr * p.grad
    seconds = time.perf_counter() - started

    @torch.no_grad()
    def split_loss(x: torch.Tensor, y: torch.Tensor) -> float:
        h = C[x].view(len(x), -1) @ W1
        h = bngain * (h - bnmean_running) / torch.sqrt(bnvar_running + 1e-5) + bnbias
        return F.cross_entropy(torch.tanh(h) @ W2 + b2, y).item()

    return {"name": "plain-pytorch-batchnorm", "train": split_loss(xtr, ytr), "val": split_loss(xval, yval),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="words file (default: the bundled names)")
    parser.add_argument("--presets", nargs="*", default=list(PUBLISHED) + ["lesson-deep"])
    parser.add_argument("--steps", type=int, help="override the 200,000 steps (the decay step scales along)")
    args = parser.parse_args()
    results = [run_plain_batchnorm(args.data, args.steps)] + run_presets(args.presets, args.data, args.steps)
    compare = args.data is not None and os.path.basename(args.data) == "names.txt" and not args.steps
    print(f"{'run':28} {'train':>8} {'val':>8} {'lesson':>16} {'|Δ| ≤ 0.015':>12} {'calibrated':>16} {'time':>7}")
    for row in results:
        published = PUBLISHED.get(row["name"].replace("plain-pytorch-batchnorm", "lesson-batchnorm"))
        lesson = f"{published[0]:.4f}/{published[1]:.4f}" if published else "-"
        within = "-"
        if published and compare:
            row["within_tolerance"] = bool(abs(row["train"] - published[0]) <= TOLERANCE
                                           and abs(row["val"] - published[1]) <= TOLERANCE)
            within = "yes" if row["within_tolerance"] else "NO"
        calibrated = (f"{row['train_calibrated']:.4f}/{row['val_calibrated']:.4f}"
                      if "val_calibrated" in row else "-")
        print(f"{row['name']:28} {row['train']:8.4f} {row['val']:8.4f} {lesson:>16} {within:>12} {calibrated:>16} "
              f"{row['seconds']:6.0f}s")
    print(json.dumps({"benchmark": "lesson_losses", "data": args.data or "bundled", "steps": args.steps or 200_000,
                      "results": results}))


if __name__ == "__main__":
    main()

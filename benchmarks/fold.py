"""Benchmark: eval-mode inference of a model with its BatchNorms, folded by ``normlab.nn.fold_batchnorm``, and
the same architecture in plain torch.nn, side by side in one process.

Models: normlab's ``lesson-batchnorm`` preset (Embedding(27, 10) → Flatten → Linear(30, 200, no bias) →
BatchNorm1d(200) → Tanh → Linear(200, 27)) and ``lesson-deep`` (five [Linear(100, no bias) → BatchNorm1d → Tanh]
blocks, then Linear → BatchNorm1d), their running statistics set from a batch of random contexts. For each model
and batch size, three variants answer the same contexts under ``torch.inference_mode()``: normlab unfolded,
normlab folded, and the plain torch.nn twin (torch's layers, the same state dict, unfolded). The folded output is
checked against the unfolded one first. Timing: rounds of blocks of calls (about ``--block-ms`` each), the
variants' order rotating every round so a shared machine's changing load hits all alike; the median time per
call over rounds is reported. One torch thread by default. Prints a table with ratios and one JSON line.

    python benchmarks/fold.py [--batches 1 1024] [--rounds 15] [--block-ms 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from normlab import nn
from normlab.config import PRESETS
from normlab.model import build_model

VOCAB = 27
PRESET_NAMES = ("lesson-batchnorm", "lesson-deep")


def calibrated_model(preset: str) -> torch.nn.Module:
    """The preset's model in eval mode, its BatchNorms' running statistics those of 4096 random contexts."""
    config = PRESETS[preset].model
    model = build_model(config, VOCAB, seed=0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = None  # a cumulative average: one batch sets the statistics
    contexts = torch.randint(0, VOCAB, (4096, config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(contexts)
    return model.eval()


def torch_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same layers from torch.nn, loaded with the model's state dict: the plain PyTorch baseline."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, nn.Embedding):
            layers.append(torch.nn.Embedding(layer.num_embeddings, layer.embedding_dim))
        elif isinstance(layer, nn.Flatten):
            layers.append(torch.nn.Flatten(layer.start_dim, layer.end_dim))
        elif isinstance(layer, nn.Linear):
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None))
        elif isinstance(layer, nn.BatchNorm1d):
            layers.append(torch.nn.BatchNorm1d(layer.num_features, layer.eps, layer.momentum))
        elif isinstance(layer, nn.Tanh):
            layers.append(torch.nn.Tanh())
        else:
            raise TypeError(f"no torch.nn twin for {type(layer).__name__}")
    twin = torch.nn.Sequential(*layers)
    twin.load_state_dict(model.layers.state_dict())
    return twin.eval()


def time_per_call(variants: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, block_s: float
                  ) -> dict[str, float]:
    """Median seconds per call of each variant on `x`, over `rounds` rotating rounds of ~block_s blocks."""
    calls = {}
    with torch.inference_mode():
        for name, model in variants.items():  # warm up, then size the block to about block_s
            for _ in range(20):
                model(x)
            started = time.perf_counter()
            for _ in range(50):
                model(x)
            calls[name] = max(1, round(block_s / ((time.perf_counter() - started) / 50)))
        per_call: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                model, count = variants[name], calls[name]
                started = time.perf_counter()
                for _ in range(count):
                    model(x)
                per_call[name].append((time.perf_counter() - started) / count)
    return {name: statistics.median(times) for name, times in per_call.items()}


def main() -> None:
    """Time every preset and batch size; print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 1024], help="batch sizes to time")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of blocks per variant")
    parser.add_argument("--block-ms", type=float, default=40.0, help="approximate length of one block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noisy)")
    args = parser.parse_args()
    if min(*args.batches, args.rounds, args.threads) < 1 or args.block_ms <= 0:
        parser.error("--batches, --rounds and --threads must be >= 1 and --block-ms > 0")
    torch.set_num_threads(args.threads)

    rows = []
    for preset in PRESET_NAMES:
        model = calibrated_model(preset)
        folded = nn.fold_batchnorm(model)
        variants = {"unfolded": model, "folded": folded, "torch.nn": torch_twin(model)}
        folds = len(nn.foldable_batchnorms(model))
        for batch in args.batches:
            x = torch.randint(0, VOCAB, (batch, model.block_size), generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():
                difference = (folded(x) - model(x)).abs().max().item()
            if difference > 1e-4:
                raise AssertionError(f"{preset}: folded logits differ by {difference:.2e} from the unfolded ones")
            seconds = time_per_call(variants, x, args.rounds, args.block_ms / 1e3)
            rows.append({"preset": preset, "batch": batch, "batchnorms_folded": folds,
                         **{f"{name}_us": value * 1e6 for name, value in seconds.items()},
                         "speedup_folded": seconds["unfolded"] / seconds["folded"],
                         "speedup_folded_vs_torch": seconds["torch.nn"] / seconds["folded"],
                         "max_abs_logit_difference": difference})

    print(f"eval-mode inference, µs per call (median of {args.rounds} rounds), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'preset':18}{'batch':>6}{'BN folded':>10}{'unfolded':>11}{'folded':>10}{'torch.nn':>10}"
          f"{'unfolded/folded':>17}{'torch.nn/folded':>17}")
    for row in rows:
        print(f"{row['preset']:18}{row['batch']:6}{row['batchnorms_folded']:10}{row['unfolded_us']:11.1f}"
              f"{row['folded_us']:10.1f}{row['torch.nn_us']:10.1f}{row['speedup_folded']:16.2f}x"
              f"{row['speedup_folded_vs_torch']:16.2f}x")
    print(json.dumps({"benchmark": "fold", "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()

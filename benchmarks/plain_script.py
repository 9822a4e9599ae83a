"""The competitor as a user runs it: one plain PyTorch script, start to finish in its own process.

Reads a words file, builds the lesson's context windows and 80/10/10 split (`random.Random(42)`), trains the
lesson's BatchNorm MLP in torch.nn with torch.optim.SGD (lr 0.1, then 0.01 from half of the steps, batch 32),
and prints the final train/val/test losses in eval mode. Nothing of normlab is imported.

    python benchmarks/plain_script.py --data words.txt --steps 20000 [--batch 32] [--layers 1] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from plain_loop import plain_model, plain_train


def dataset(words: list[str], stoi: dict[str, int], block_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The lesson's build_dataset: every window of `block_size` characters and the character that follows."""
    xs, ys = [], []
    for word in words:
        context = [0] * block_size
        for ch in word + ".":
            xs.append(context)
            ys.append(stoi[ch])
            context = context[1:] + [stoi[ch]]
    return torch.tensor(xs), torch.tensor(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    words = [line.strip() for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    chars = sorted(set("".join(words)))
    stoi = {ch: i + 1 for i, ch in enumerate(chars)} | {".": 0}
    random.Random(42).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    splits = [dataset(part, stoi) for part in (words[:n1], words[n1:n2], words[n2:])]
    model = plain_model(len(stoi), n_layers=args.layers)
    seconds = plain_train(model, *splits[0], steps=args.steps, batch_size=args.batch)
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y).item() for x, y in splits]
    print(f"final loss  train {losses[0]:.4f}  val {losses[1]:.4f}  test {losses[2]:.4f}  "
          f"(training {seconds:.1f} s, whole script {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()

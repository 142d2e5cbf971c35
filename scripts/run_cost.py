"""Seconds per small training run, as the training tests run them: the tests' recipe (two stages of one epoch,
32 then 48 px, TTA none and hflip) on two classes of data/sample, for each backbone named, several runs in one
process so that the runs after the first show the cost a test pays once the process has traced its shared
functions.

    .venv/bin/python scripts/run_cost.py tiny_cnn mobilenet_v2 --runs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="+", help="registered backbone names")
    parser.add_argument("--runs", type=int, default=3, help="runs per backbone, taken in turn (default 3)")
    args = parser.parse_args(argv)

    from carclf.train import loop
    from carclf.train.recipe import parse_recipe
    from tests.train.conftest import make_two_class_data, tiny_recipe

    with tempfile.TemporaryDirectory() as work:
        data = make_two_class_data(Path(work) / "data")
        seconds: dict[str, list[float]] = {name: [] for name in args.backbones}
        for i in range(args.runs):
            for name in args.backbones:
                recipe = parse_recipe(tiny_recipe(data, backbone=name), source=name)
                start = time.perf_counter()
                loop.train(recipe, runs_root=Path(work) / f"runs{i}", verbose=0)
                seconds[name].append(time.perf_counter() - start)
                print(f"run {i + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)
    for name, taken in seconds.items():
        print(f"{name}: " + ", ".join(f"{s:.1f}" for s in taken) + " s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs the whole benchmark suite: ``python benchmarks/run.py [--quick] [--tag NAME]``.

Step benchmark (bench_step.py) then hyperparameter-grid benchmark (bench_grid.py); each prints
its table and writes JSON under ``benchmarks/results/`` (``<name>[_<tag>].json``).
The full run takes about 6-8 minutes on a 2-core machine, ``--quick`` about 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_grid, bench_step


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--tag", default="", help="suffix of the JSON file names")
  args = ap.parse_args(argv)
  results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  suffix = f"_{args.tag}" if args.tag else ""
  quick = ["--quick"] if args.quick else []
  bench_step.main(quick + ["--out", os.path.join(results, f"bench_step{suffix}.json")])
  bench_grid.main(quick + ["--out", os.path.join(results, f"bench_grid{suffix}.json")])


if __name__ == "__main__":
  main()

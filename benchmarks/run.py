"""Runs the whole benchmark suite: ``python benchmarks/run.py [--quick] [--tag NAME]``.

Step benchmark (bench_step.py) then hyperparameter-grid benchmark (bench_grid.py); each prints
its table and writes JSON:

* with ``--tag NAME``: a canonical run, ``benchmarks/results/<name>_NAME.json`` (the files
  ``python -m benchmarks.report NAME`` reads, kept in the repository);
* without: ``out/benchmarks/<name>.json``, which git ignores.

The full run takes about 6-8 minutes on a 2-core machine, ``--quick`` about 2. ``--quick``
runs fewer sizes and rounds: its timings are noisy and its MISS lines are not verdicts (the
targets are judged on full runs).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _timing, bench_grid, bench_step


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="fewer sizes and rounds (about 2 minutes): noisy, a smoke run")
  ap.add_argument("--tag", default="",
                  help="a canonical run: write benchmarks/results/<name>_TAG.json (default: "
                  "out/benchmarks/<name>.json, ignored by git)")
  args = ap.parse_args(argv)
  if args.tag:
    results, suffix = _timing.RESULTS_DIR, f"_{args.tag}"
  else:
    results, suffix = _timing.SCRATCH_DIR, ""
  quick = ["--quick"] if args.quick else []
  if args.quick:
    print(_timing.QUICK_NOTE)
  bench_step.main(quick + ["--out", os.path.join(results, f"bench_step{suffix}.json")])
  bench_grid.main(quick + ["--out", os.path.join(results, f"bench_grid{suffix}.json")])


if __name__ == "__main__":
  main()

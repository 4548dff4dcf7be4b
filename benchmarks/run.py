"""Runs the benchmark suite: ``python benchmarks/run.py [--quick] [--tag NAME] [--gpu-only]``.

Step benchmark (bench_step.py), hyperparameter-grid benchmark (bench_grid.py) and, when JAX
sees a GPU, the GPU step benchmark (bench_gpu.py: od.adamw, optax.adamw, od.fused_step and
torch's fused AdamW on the device, with effective GB/s and % of the device's memory
bandwidth); each prints its table and writes JSON:

* with ``--tag NAME``: a canonical run, ``benchmarks/results/<name>_NAME.json`` (the files
  ``python -m benchmarks.report NAME`` reads, kept in the repository);
* without: ``out/benchmarks/<name>.json``, which git ignores.

The full run takes about 6-8 minutes on a 2-core machine, ``--quick`` about 2. ``--quick``
runs fewer sizes and rounds: its timings are noisy and its MISS lines are not verdicts (the
targets are judged on full runs).

On a GPU machine, ``python benchmarks/run.py --gpu-only --quick`` is the short command: only
the GPU table, one flat leaf of 1e7 parameters, a few rounds (a few minutes at most, mostly
CUDA start-up and compilation); ``--gpu-only`` without ``--quick`` runs 1e6, 1e7 and 3e7.
Without a GPU, ``--gpu-only`` says so in one line and times nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _timing, bench_gpu, bench_grid, bench_step


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="fewer sizes and rounds (about 2 minutes): noisy, a smoke run")
  ap.add_argument("--tag", default="",
                  help="a canonical run: write benchmarks/results/<name>_TAG.json (default: "
                  "out/benchmarks/<name>.json, ignored by git)")
  ap.add_argument("--gpu-only", action="store_true",
                  help="only the GPU benchmark (bench_gpu.py); with --quick, the short command "
                  "for a GPU machine")
  args = ap.parse_args(argv)
  if args.tag:
    results, suffix = _timing.RESULTS_DIR, f"_{args.tag}"
  else:
    results, suffix = _timing.SCRATCH_DIR, ""
  quick = ["--quick"] if args.quick else []
  if not args.gpu_only:
    if args.quick:
      print(_timing.QUICK_NOTE)
    bench_step.main(quick + ["--out", os.path.join(results, f"bench_step{suffix}.json")])
    bench_grid.main(quick + ["--out", os.path.join(results, f"bench_grid{suffix}.json")])
  if args.gpu_only or bench_gpu.gpu_available():
    # Without a GPU, bench_gpu says so in one line and times nothing.
    bench_gpu.main(quick + ["--out", os.path.join(results, f"bench_gpu{suffix}.json")])
  else:
    print("\nbench_gpu: skipped, no GPU visible to JAX")


if __name__ == "__main__":
  main()

"""``python -m benchmarks [--quick]``: the whole suite (see run.py)."""

from benchmarks.run import main

main()

"""Timing helpers shared by the benchmarks: interleaved, randomised, median-based.

Small shared machines are noisy: absolute times
move by tens of percent from one minute to the next, and the order in which contenders run
matters (whatever runs right after torch's fused step was measured ~30% slower). So every
comparison here is made *inside one process*, with all contenders visited in a fresh random
order each round; each visit makes one untimed call (to settle caches and thread pools) and
then times a few back-to-back calls. We report the median over all timed calls and ratios of
medians; only ratios measured side by side mean anything.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time
from collections.abc import Callable


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Canonical runs, kept in the repository: written only when a run is given a --tag.
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
# Everything else (untagged and --quick runs): under out/, which .gitignore ignores.
SCRATCH_DIR = os.path.join(ROOT, "out", "benchmarks")

QUICK_NOTE = (
    "NOTE (--quick): fewer sizes and rounds, so these timings are noisy; a 'MISS' line here is "
    "not a verdict. The targets are judged on full runs "
    "(python benchmarks/run.py --tag NAME).")


@dataclasses.dataclass
class Timing:
  """Per-call wall times (seconds) of one contender."""

  name: str
  times: list[float] = dataclasses.field(default_factory=list)
  visits: list[float] = dataclasses.field(default_factory=list)  # median of each round's visit

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def iqr(self) -> tuple[float, float]:
    qs = statistics.quantiles(self.times, n=4) if len(self.times) > 1 else self.times * 3
    return qs[0], qs[2]


def interleaved(
    contenders: dict[str, Callable[[], None]],
    *,
    rounds: int = 10,
    calls_per_visit: int = 3,
    warmup: int = 2,
    seed: int = 0,
    slow_s: float = 0.25,
    pause_s: float = 0.02,
) -> dict[str, Timing]:
  """Times each ``contenders[name]()`` (a blocking call) interleaved in random order.

  Every contender is first called ``warmup`` times (untimed; this also compiles). Then, for
  each of ``rounds`` rounds, the contenders are visited in a freshly shuffled order; a visit is
  one untimed call followed by ``calls_per_visit`` individually timed calls (one only for a
  contender whose warm-up call took more than ``slow_s`` seconds, to bound the run time).
  Each visit starts after a ``pause_s`` sleep, so that the previous contender's worker threads
  (XLA's and torch's pools spin for a while after their work) are idle again: without it,
  torch's OpenMP threads measured ~8 ms for a 0.4 ms step when they ran right after XLA.
  """
  rng = random.Random(seed)
  names = list(contenders)
  calls = {}
  for name in names:
    t0 = time.perf_counter()
    for _ in range(warmup):
      contenders[name]()
    slow = (time.perf_counter() - t0) / max(warmup, 1) > slow_s
    calls[name] = 1 if slow else calls_per_visit
  out = {name: Timing(name) for name in names}
  for _ in range(rounds):
    rng.shuffle(names)
    for name in names:
      fn = contenders[name]
      time.sleep(pause_s)
      fn()  # untimed: whoever ran before us must not be charged to us.
      visit = []
      for _ in range(calls[name]):
        t0 = time.perf_counter()
        fn()
        visit.append(time.perf_counter() - t0)
      out[name].times.extend(visit)
      out[name].visits.append(statistics.median(visit))
  return out


def paired_ratio(a: Timing, b: Timing) -> float:
  """Median over rounds of (a's visit / b's visit in the same round).

  Pairing by round cancels the slow drift of a shared machine's load, which a ratio of two
  overall medians does not.
  """
  return statistics.median(x / y for x, y in zip(a.visits, b.visits))


def rows_ratio(rows: dict, a: str, b: str) -> float | None:
  """:func:`paired_ratio` of two rows of a results table (their ``visits_s``), None if absent."""
  if a not in rows or b not in rows:
    return None
  return paired_ratio(Timing(a, visits=rows[a]["visits_s"]), Timing(b, visits=rows[b]["visits_s"]))

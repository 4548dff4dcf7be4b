"""Compile and trace time of ``od.fused_step(od.adamw)`` against the plain step, by leaf count.

``python benchmarks/bench_compile.py [--sizes 10 100 1000 5000]`` prints, per number of
leaves (each a 64-float vector), the seconds to trace and lower, and to compile, the plain
jitted step (``tx.update`` + ``optax.apply_updates``) and the fused step, and their ratio.
The kernel step calls the C++ kernel on groups of leaves (``_kernel._GROUP``), so its
compile time grows linearly with the leaves, as the plain step's does.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import optax_decoupled as od


def measure(n: int) -> dict[str, float]:
  params = {f"leaf{i}": jnp.ones((64,)) for i in range(n)}
  tx = od.adamw(1e-3, weight_decay=0.1)
  state = tx.init(params)

  def plain(p, g, s):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  out = {}
  for name, fn in (("plain", plain), ("fused", od.fused_step(tx))):
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(params, params, state)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    out[f"{name}_trace"], out[f"{name}_compile"] = t1 - t0, t2 - t1
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 5000],
                 help="numbers of leaves (default 10 100 1000 5000; 5000 takes ~5 minutes)")
  args = p.parse_args(argv)
  print(f"{'leaves':>7} {'plain trace':>12} {'plain compile':>14} {'fused trace':>12} "
        f"{'fused compile':>14} {'compile ratio':>14} {'total ratio':>12}")
  for n in args.sizes:
    m = measure(n)
    plain, fused = m["plain_trace"] + m["plain_compile"], m["fused_trace"] + m["fused_compile"]
    print(f"{n:>7} {m['plain_trace']:>12.2f} {m['plain_compile']:>14.2f} {m['fused_trace']:>12.2f} "
          f"{m['fused_compile']:>14.2f} {m['fused_compile'] / m['plain_compile']:>14.2f} "
          f"{fused / plain:>12.2f}", flush=True)


if __name__ == "__main__":
  main()

"""Compile and trace time of ``od.fused_step(od.adamw)`` against the plain step, by leaf count.

``python benchmarks/bench_compile.py [--sizes 10 100 1000 5000]`` prints, per number of
leaves (each a 64-float vector), the seconds to trace and lower, and to compile, the plain
jitted step (``tx.update`` + ``optax.apply_updates``) and the fused step, and their ratio.
The kernel step calls the C++ kernel on groups of leaves (``_kernel._GROUP``), so its
compile time grows linearly with the leaves, as the plain step's does.

``python benchmarks/bench_compile.py --chunks [--sizes 10 100 200 1000]`` measures the trace
time of the pure-JAX chunk path (``od.fused_step(tx, kernel="off")``) on that many large
leaves of shape (2048, 1100) plus a bias each (excluded from decay by name), against the
plain step's: inputs are ``jax.ShapeDtypeStruct`` (nothing allocated), each trace with a
new transformation and the chunk loops' cache emptied (cold), plain and fused interleaved.
Two protocols: the best of five with the garbage collector off during the timed trace and
a full collection before it (``timeit``'s convention: the work itself), and the mean of
five with the collector on (what a training script pays on average; a full collection of
JAX's heap takes ~0.1 s here and lands in whichever trace crosses its threshold).
``--recipe`` picks the transformation (default ``od.adamw``; also ``od.sgdw``, a global-norm
clip in front of ``od.sgdw``, one after ``od.adamw``, and ``optax.lamb``).
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import optax

import optax_decoupled as od
from optax_decoupled import _chunks


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


RECIPES = {
    "adamw": lambda: od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias")),
    "sgdw": lambda: od.sgdw(1e-2, momentum=0.9, weight_decay=1e-3,
                            mask=od.exclude_names("bias")),
    "clip-sgdw": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                     od.sgdw(1e-2, momentum=0.9, weight_decay=1e-3)),
    "adamw-clip": lambda: optax.chain(od.adamw(1e-3, weight_decay=1e-2),
                                      optax.clip_by_global_norm(1.0)),
    "lamb": lambda: optax.lamb(1e-3, weight_decay=1e-2),
}


def chunk_trace(n: int, reps: int = 5, recipe: str = "adamw") -> dict[str, float]:
  """Trace times of the plain and the chunk-loop step on n large leaves: best of ``reps``
  with the collector off (``plain``, ``fused``), mean of ``reps`` with it on (``*_gc``)."""
  params = {f"layer{i:04d}": {"kernel": jax.ShapeDtypeStruct((2048, 1100), jnp.float32),
                              "bias": jax.ShapeDtypeStruct((1100,), jnp.float32)}
            for i in range(n)}
  out = {"plain": float("inf"), "fused": float("inf"), "plain_gc": 0.0, "fused_gc": 0.0}
  for collector in (False, True):
    for _ in range(reps):
      tx = RECIPES[recipe]()
      state = jax.eval_shape(tx.init, params)

      def plain(p, g, s, tx=tx):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

      _chunks._BODIES.clear()
      for name, fn in (("plain", plain), ("fused", od.fused_step(tx, kernel="off"))):
        if not collector:
          gc.collect()
          gc.disable()
        try:
          t0 = time.perf_counter()
          jax.jit(fn).trace(params, params, state)
          seconds = time.perf_counter() - t0
        finally:
          gc.enable()
        if collector:
          out[f"{name}_gc"] += seconds / reps
        else:
          out[name] = min(out[name], seconds)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 5000],
                 help="numbers of leaves (default 10 100 1000 5000; 5000 takes ~5 minutes)")
  p.add_argument("--chunks", action="store_true",
                 help="trace time of the pure-JAX chunk path on large leaves instead")
  p.add_argument("--recipe", choices=sorted(RECIPES), default="adamw",
                 help="with --chunks: the transformation traced (default adamw)")
  args = p.parse_args(argv)
  if args.chunks:
    print(f"{'large leaves':>12} {'plain trace':>12} {'chunks trace':>13} {'ratio':>6}   "
          f"{'collector on: plain':>19} {'chunks':>7} {'ratio':>6}")
    for n in args.sizes:
      b = chunk_trace(n, recipe=args.recipe)
      print(f"{n:>12} {b['plain']:>12.3f} {b['fused']:>13.3f} {b['fused'] / b['plain']:>6.2f}   "
            f"{b['plain_gc']:>19.3f} {b['fused_gc']:>7.3f} {b['fused_gc'] / b['plain_gc']:>6.2f}",
            flush=True)
    return
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

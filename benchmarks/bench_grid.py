"""Hyperparameter grid benchmark: K configurations trained in one vmapped program vs a loop.

Run (from the repository root)::

    python benchmarks/bench_grid.py           # K = 64 (8 learning rates × 8 weight decays)
    python benchmarks/bench_grid.py --quick   # the same grid, fewer repeats (noisy)

Writes ``out/benchmarks/bench_grid.json`` (ignored by git; ``--out`` to change, and
``benchmarks/run.py --tag NAME`` for a canonical run in ``benchmarks/results/``).

The model is a small MLP (64-32-10) on scikit-learn's digits (ships with the package, no
download), trained full-batch for ``--steps`` steps with ``od.adamw`` whose learning rate and
weight decay are injected hyperparameters (``optax.inject_hyperparams``), so one compiled
program serves every configuration. Three ways to run the same K trainings:

* ``vmapped``: ``jax.jit(jax.vmap(train))(lrs, wds)``, one program for the whole grid;
* ``python loop``: what a script usually does, a fresh ``od.adamw(lr, weight_decay=wd)`` and a
  jitted step per configuration, stepped from Python (pays a compilation per configuration);
* ``loop of jitted train``: one ``jax.jit(train)`` (steps in ``lax.scan``), called K times: the
  strongest loop.

All three give the same final losses (checked and printed). The two fast ways are timed as
medians over rounds, visited in a random order each round; the python loop, which includes
its K compilations by design, is timed once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_decoupled as od
from benchmarks import _timing


def data():
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  return jnp.asarray(x[:1500], jnp.float32), jnp.asarray(y[:1500], jnp.int32)


def init_params(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
      "hidden": {"kernel": jnp.asarray(rng.normal(size=(64, 32)) / 8, jnp.float32),
                 "bias": jnp.zeros(32, jnp.float32)},
      "out": {"kernel": jnp.asarray(rng.normal(size=(32, 10)) / np.sqrt(32), jnp.float32),
              "bias": jnp.zeros(10, jnp.float32)},
  }


def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = h @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


MASK = od.exclude_names("bias")


def make_train(x, y, steps: int):
  # mask is static: a callable hyperparameter would otherwise be taken for a schedule.
  tx = optax.inject_hyperparams(od.adamw, static_args=("mask",))(
      learning_rate=1e-3, weight_decay=0.0, mask=MASK)

  def train(lr, wd):
    params = init_params()
    state = tx.init(params)
    state.hyperparams["learning_rate"] = lr
    state.hyperparams["weight_decay"] = wd

    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, _), _ = jax.lax.scan(step, (params, state), None, length=steps)
    return loss_fn(params, x, y)

  return train


def python_loop(x, y, steps, lrs, wds):
  out = []
  for lr, wd in zip(lrs, wds):
    tx = od.adamw(float(lr), weight_decay=float(wd), mask=MASK)
    params = init_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state, tx=tx):
      grads = jax.grad(loss_fn)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for _ in range(steps):
      params, state = step(params, state)
    out.append(float(loss_fn(params, x, y)))
  return np.asarray(out)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--out", default=os.path.join(_timing.SCRATCH_DIR, "bench_grid.json"),
                 help="JSON output (default: out/benchmarks/bench_grid.json, ignored by git)")
  args = ap.parse_args(argv)
  rounds = args.rounds or (2 if args.quick else 5)
  x, y = data()
  lr_axis = np.logspace(-3.5, -1.5, 8)
  wd_axis = np.logspace(-4, -0.5, 8)
  lrs = jnp.asarray(np.repeat(lr_axis, 8), jnp.float32)
  wds = jnp.asarray(np.tile(wd_axis, 8), jnp.float32)
  k = len(lrs)
  train = make_train(x, y, args.steps)

  t0 = time.perf_counter()
  vmapped = jax.jit(jax.vmap(train)).lower(lrs, wds).compile()
  compile_vmapped = time.perf_counter() - t0
  t0 = time.perf_counter()
  single = jax.jit(train).lower(lrs[0], wds[0]).compile()
  compile_single = time.perf_counter() - t0

  def run_vmapped():
    return np.asarray(vmapped(lrs, wds))

  def run_single_loop():
    return np.asarray([single(a, b) for a, b in zip(lrs, wds)])

  def run_python_loop():
    return python_loop(x, y, args.steps, np.asarray(lrs), np.asarray(wds))

  runs = {"vmapped (one program)": run_vmapped, "loop of jitted train": run_single_loop,
          "python loop": run_python_loop}
  times = {name: [] for name in runs}
  finals = {}
  # The python loop compiles a step per configuration by design (that is its cost), so its
  # first run is a timed run, and it runs once: it takes ~20x longer than the others.
  t0 = time.perf_counter()
  finals["python loop"] = run_python_loop()
  times["python loop"].append(time.perf_counter() - t0)
  fast = {name: fn for name, fn in runs.items() if name != "python loop"}
  for name, fn in fast.items():  # warm-up (and results for the equality check)
    finals[name] = fn()
  rng = random.Random(0)
  for _ in range(rounds):
    names = list(fast)
    rng.shuffle(names)
    for name in names:
      t0 = time.perf_counter()
      fast[name]()
      times[name].append(time.perf_counter() - t0)
  med = {name: statistics.median(t) for name, t in times.items()}
  ref = med["vmapped (one program)"]
  print(f"\n## Grid of K={k} configurations (8 lr × 8 wd), {args.steps} full-batch steps each, "
        f"MLP 64-32-10 on digits; medians of {rounds} round(s)")
  print(f"{'way':26s} {'median s':>9s} {'x vmapped':>10s}")
  for name, t in sorted(med.items(), key=lambda kv: kv[1]):
    print(f"{name:26s} {t:9.3f} {t / ref:10.1f}")
  print(f"compile: vmapped program {compile_vmapped:.2f} s, single train {compile_single:.2f} s")
  diff = {name: float(np.max(np.abs(v - finals["vmapped (one program)"])))
          for name, v in finals.items()}
  print("max |final loss - vmapped final loss|: " +
        ", ".join(f"{n}: {d:.2e}" for n, d in diff.items()))
  best = int(np.argmin(finals["vmapped (one program)"]))
  print(f"best config: lr={float(lrs[best]):.2e}, wd={float(wds[best]):.2e}, "
        f"final train loss {finals['vmapped (one program)'][best]:.4f}")
  speedup = med["python loop"] / ref
  print(f"{'met ' if speedup >= 10 else 'MISS'} vmapped grid vs python loop: {speedup:.1f}x "
        f"(target >= 10x); vs loop of one jitted train: "
        f"{med['loop of jitted train'] / ref:.1f}x")
  result = {"K": k, "steps": args.steps, "rounds": rounds, "median_s": med, "times_s": times,
            "compile_s": {"vmapped": compile_vmapped, "single": compile_single},
            "max_abs_final_loss_diff": diff, "speedup_vs_python_loop": speedup,
            "speedup_vs_jitted_loop": med["loop of jitted train"] / ref,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "loadavg": os.getloadavg()}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  if args.quick:
    print(_timing.QUICK_NOTE)
  return result


if __name__ == "__main__":
  main()

"""Measurement: which rounding keeps a bfloat16 AdamW run closest to float32?

A 64-64-10 tanh MLP on scikit-learn's digits (ships with the package, no
download), trained with AdamW (lr-coupled, η = 1e-3) from the same float32
initial weights and the same minibatch order, five ways:

  f32          float32 parameters and moments: the reference trajectory.
  bf16-naive   bfloat16 parameters, bfloat16 moments (od.adamw defaults).
  bf16-f32m    bfloat16 parameters, float32 moments (mu_dtype=nu_dtype=float32):
               the decay and the whole update in float32, θ + u rounded to
               bfloat16 once per step (round-to-nearest).
  bf16-f32m-sr as bf16-f32m, but θ + u rounded stochastically
               (od.stochastic_rounding), three seeds.

For each weight decay λ it prints, after the last step: the relative distance
‖θ − θ_f32‖/‖θ_f32‖, the ratio of the decayed weights' norm to the f32 run's,
and the test accuracy. A second table runs pure decay (zero gradient): the
norm after T steps against the exact (1 − ηλ)^T.

Run:  python examples/precision_decay.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_decoupled as od

LR = 1e-3
STEPS = 1500
BATCH = 64


def data():
  from sklearn.datasets import load_digits  # imported here: --help needs no scikit-learn.

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  rng = np.random.default_rng(0)
  idx = rng.permutation(len(x))
  x, y = x[idx], y[idx]
  return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def init_params():
  rng = np.random.default_rng(1)
  return {
      "l1": {"kernel": rng.normal(size=(64, 64)).astype(np.float32) / 8.0,
             "bias": np.zeros(64, np.float32)},
      "l2": {"kernel": rng.normal(size=(64, 10)).astype(np.float32) / 8.0,
             "bias": np.zeros(10, np.float32)},
  }


def logits(params, x):
  h = jnp.tanh(x @ params["l1"]["kernel"].astype(jnp.float32)
               + params["l1"]["bias"].astype(jnp.float32))
  return h @ params["l2"]["kernel"].astype(jnp.float32) + params["l2"]["bias"].astype(jnp.float32)


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def make_tx(variant: str, wd: float, seed: int = 0, mask=None):
  f32m = variant.startswith("bf16-f32m")
  tx = optax.chain(
      od.scale_by_adam(mu_dtype=jnp.float32 if f32m else None,
                       nu_dtype=jnp.float32 if f32m else None),
      od.add_decoupled_decay(wd, mask),
      optax.scale_by_learning_rate(LR),
  )
  return od.stochastic_rounding(tx, seed=seed) if variant.endswith("-sr") else tx


def train(variant: str, wd: float, batches, seed: int = 0):
  dtype = jnp.float32 if variant == "f32" else jnp.bfloat16
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), init_params())
  tx = make_tx(variant, wd, seed, mask=od.exclude_names("bias"))

  def step(carry, batch):
    p, s = carry
    x, y = batch
    g = jax.grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
    state = tx.init(params)
  (params, _), _ = jax.jit(lambda c, b: jax.lax.scan(step, c, b))((params, state), batches)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def flat(p):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])


def kernels_norm(p):
  return float(np.sqrt(sum(np.sum(p[k]["kernel"] ** 2) for k in ("l1", "l2"))))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Run without options: it trains every variant and prints two tables "
             "(about a minute on 2 CPU cores).")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  parse_args(argv)
  (xtr, ytr), (xte, yte) = data()
  rng = np.random.default_rng(2)
  idx = np.stack([rng.choice(len(xtr), BATCH, replace=False) for _ in range(STEPS)])
  batches = (jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))

  def acc(p):
    p32 = jax.tree.map(jnp.asarray, p)
    return float((np.argmax(np.asarray(logits(p32, jnp.asarray(xte))), -1) == yte).mean())

  print(f"MLP on digits, AdamW lr={LR}, {STEPS} steps of {BATCH}; bias not decayed; "
        "distances and norms after the last step")
  print(f"{'λ':>6} {'η·λ':>8} {'variant':>14} {'rel. dist to f32':>17} "
        f"{'|W|/|W_f32|':>12} {'test acc':>9}")
  for wd in (1e-2, 1e-1, 1.0):
    ref = train("f32", wd, batches)
    rows = [("f32", [ref])]
    rows.append(("bf16-naive", [train("bf16-naive", wd, batches)]))
    rows.append(("bf16-f32m", [train("bf16-f32m", wd, batches)]))
    rows.append(("bf16-f32m-sr", [train("bf16-f32m-sr", wd, batches, seed=s) for s in range(3)]))
    for name, runs in rows:
      dist = [np.linalg.norm(flat(r) - flat(ref)) / np.linalg.norm(flat(ref)) for r in runs]
      ratio = [kernels_norm(r) / kernels_norm(ref) for r in runs]
      accs = [acc(r) for r in runs]
      pm = (lambda v: f"{np.mean(v):.4f}±{np.std(v):.4f}") if len(runs) > 1 else (
          lambda v: f"{v[0]:.4f}")
      print(f"{wd:>6g} {LR * wd:>8.0e} {name:>14} {pm(dist):>17} {pm(ratio):>12} {pm(accs):>9}")

  print()
  print("Pure decay (zero gradient), 4096 weights = 1.0, η=1e-3, 3000 steps: mean weight")
  print(f"{'λ':>6} {'exact':>9} {'f32':>9} {'bf16-f32m':>10} {'bf16-f32m-sr':>13}")
  for wd in (1e-2, 1e-1, 1.0):
    exact = (1 - LR * wd) ** 3000
    out = []
    for variant in ("f32", "bf16-f32m", "bf16-f32m-sr"):
      dtype = jnp.float32 if variant == "f32" else jnp.bfloat16
      p = {"w": jnp.ones(4096, dtype)}
      tx = make_tx(variant, wd)
      zeros = jax.tree.map(jnp.zeros_like, p)

      def step(c, _, tx=tx, zeros=zeros):
        q, s = c
        u, s = tx.update(zeros, s, q)
        return (optax.apply_updates(q, u), s), None

      with warnings.catch_warnings():
        warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
        s0 = tx.init(p)
      (p, _), _ = jax.jit(lambda c, step=step: jax.lax.scan(step, c, None, length=3000))((p, s0))
      out.append(float(np.mean(np.asarray(p["w"], np.float64))))
    print(f"{wd:>6g} {exact:>9.5f} {out[0]:>9.5f} {out[1]:>10.5f} {out[2]:>13.5f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

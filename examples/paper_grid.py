"""The paper's central experiment: the (learning rate, weight decay) grid of Fig. 2.

Loshchilov & Hutter (ICLR 2019, Fig. 2) train one network over a grid of initial
learning rates α × weight decays λ for SGD and Adam, each with L2 regularization and
with decoupled weight decay. With L2 the good region is a diagonal (the best λ depends
on α); with decoupled decay it is axis-aligned; and AdamW beats Adam+L2.

This script repeats that on data that ships with a package (mnist1d generated offline,
the default, or scikit-learn's digits) with a small MLP with LayerNorm, for five
optimizers, all from optax_decoupled's public API:

  SGD+L2            od.sgd_l2(cosine(α), momentum=0.9, weight_decay=λ)     coupled L2
  SGDW              od.sgdw(cosine(α), momentum=0.9, weight_decay=λ,       schedule-coupled
                            coupling="schedule", peak_learning_rate=α)
  Adam+L2           od.adam_l2(cosine(α), weight_decay=λ)                  coupled L2
  AdamW (lr)        od.adamw(cosine(α), weight_decay=λ, coupling="lr")     lr-coupled
  AdamW (schedule)  od.adamw(cosine(α), weight_decay=λ,                    schedule-coupled
                            coupling="schedule", peak_learning_rate=α)

Every grid cell and seed of one optimizer trains inside ONE jitted program: the
optimizer is built inside a function of traced (α, λ, seed) that is ``jax.vmap``-ed over
all cells, and the epochs run in ``lax.scan``. Outputs (default ``out/paper_grid/``):
``heatmaps.png``, ``results.json``, and a printed table with the slope of log λ* against
log α and the PASS/FAIL lines of the paper's claims.

Run:  python examples/paper_grid.py            (default: 5-8 minutes on 2 CPU cores)
      python examples/paper_grid.py --quick    (a smoke run, about 30 seconds)

Definitions (λ*, which rows enter the slope fit, the standard errors) are in the
docstrings of ``best_lambda_per_row``, ``summarize`` and ``criteria``, and in
BUILD_NOTES.md, "Paper reproduction".
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_decoupled as od

# Only the matrices decay (biases and LayerNorm parameters do not), the common practice.
DECAY_MASK = od.min_ndim(2)
MOMENTUM = 0.9

# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Data:
  """A classification set, standardised with the training statistics."""

  name: str
  x_train: np.ndarray  # (n_train, d) float32
  y_train: np.ndarray  # (n_train,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  n_classes: int


def load_data(name: str = "mnist1d", n_train: int | None = None,
              mnist1d_samples: int = 5000) -> Data:
  """mnist1d (generated offline, 4000/1000) or scikit-learn's digits (1797 images, 8×8).

  Never downloads: mnist1d's ``make_dataset`` builds the set from its templates with a
  fixed seed; ``load_digits`` ships with scikit-learn. ``n_train`` keeps the first
  ``n_train`` training points (for small tests); ``mnist1d_samples`` is mnist1d's
  ``num_samples`` (80 % train, 20 % test).
  """
  if name == "mnist1d":
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = mnist1d_samples
    d = make_dataset(args)  # seed 42 inside the default args: deterministic.
    x_tr, y_tr, x_te, y_te = d["x"], d["y"], d["x_test"], d["y_test"]
  elif name == "digits":
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n_te = 597  # 1200 train / 597 test
    x_tr, y_tr, x_te, y_te = x[n_te:], y[n_te:], x[:n_te], y[:n_te]
  else:
    raise ValueError(f"unknown data set {name!r}: use 'mnist1d' or 'digits'.")
  if n_train is not None:
    x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
  mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
  f = lambda a: ((a - mean) / std).astype(np.float32)
  return Data(name, f(x_tr), y_tr.astype(np.int32), f(x_te), y_te.astype(np.int32),
              int(max(y_tr.max(), y_te.max()) + 1))


# ----------------------------------------------------------------------------- model


def init_mlp(seed: int, sizes: Sequence[int], layernorm: bool = True) -> dict:
  """MLP params: ``dense_i`` (kernel, bias) and, between hidden layers, ``norm_i``.

  Drawn with numpy (``default_rng(seed)``): every cell of a grid row shares its seed's
  initialisation, and no random-number program has to be compiled.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
    params[f"dense_{i}"] = {
        "kernel": (rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32),
        "bias": np.zeros((n_out,), np.float32),
    }
    if layernorm and i < len(sizes) - 2:
      params[f"norm_{i}"] = {"scale": np.ones((n_out,), np.float32),
                             "bias": np.zeros((n_out,), np.float32)}
  return params


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
  """dense → LayerNorm (if ``norm_i`` is there) → relu, repeated; a final dense layer."""
  n_layers = sum(k.startswith("dense_") for k in params)
  for i in range(n_layers):
    x = x @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
    if f"norm_{i}" in params:
      mu = x.mean(-1, keepdims=True)
      var = ((x - mu) ** 2).mean(-1, keepdims=True)
      x = (x - mu) * jax.lax.rsqrt(var + 1e-5)
      x = x * params[f"norm_{i}"]["scale"] + params[f"norm_{i}"]["bias"]
    if i < n_layers - 1:
      x = jax.nn.relu(x)
  return x


# ----------------------------------------------------------------------------- optimizers

# A builder maps (peak learning rate α, weight decay λ, total steps) to an optax optimizer;
# α and λ may be traced (they are, inside the vmapped program).
Builder = Callable[[Any, Any, int], optax.GradientTransformation]


def _cosine(alpha: Any, total_steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(alpha, total_steps)


def build_sgd_l2(alpha, wd, total_steps):
  return od.sgd_l2(_cosine(alpha, total_steps), momentum=MOMENTUM, weight_decay=wd,
                   mask=DECAY_MASK)


def build_sgdw(alpha, wd, total_steps):
  return od.sgdw(_cosine(alpha, total_steps), momentum=MOMENTUM, weight_decay=wd,
                 coupling="schedule", mask=DECAY_MASK, peak_learning_rate=alpha)


def build_adam_l2(alpha, wd, total_steps):
  return od.adam_l2(_cosine(alpha, total_steps), weight_decay=wd, mask=DECAY_MASK)


def build_adamw_lr(alpha, wd, total_steps):
  return od.adamw(_cosine(alpha, total_steps), weight_decay=wd, mask=DECAY_MASK, coupling="lr")


def build_adamw_schedule(alpha, wd, total_steps):
  return od.adamw(_cosine(alpha, total_steps), weight_decay=wd, mask=DECAY_MASK,
                  coupling="schedule", peak_learning_rate=alpha)


def log2_grid(lo: int, hi: int, step: int = 1) -> tuple[float, ...]:
  """2**lo, 2**(lo+step), ..., 2**hi."""
  return tuple(2.0**e for e in range(lo, hi + 1, step))


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One panel of the figure: an optimizer and its (α, λ) grid.

  ``wds`` are the λ>0 columns; a λ=0 column is always added in front of them.
  ``expected_slope`` is the paper's claim for the slope of log λ* on log α:
  -1 (diagonal valley) or 0 (axis-aligned).
  """

  key: str
  label: str
  build: Builder
  lrs: tuple[float, ...]
  wds: tuple[float, ...]
  wd_units: str
  expected_slope: float


def default_specs(quick: bool = False) -> list[OptimizerSpec]:
  """The five optimizers and their grids.

  λ is in each optimizer's own units: the L2 coefficient (coupled L2), λ_torch
  (lr-coupled: per-step shrink η_t·λ) or λ_paper (schedule-coupled: per-step shrink
  s_t·λ with s_t = η_t/α). At the peak, λ_paper = α·λ_torch, which is why the λ ranges
  differ. Ranges were chosen so the paper's predicted valley falls inside every grid.
  """
  sgd_lr, adam_lr = log2_grid(-8, -1), log2_grid(-10, -3)
  l2, l2_adam = log2_grid(-15, -1, 2), log2_grid(-17, -3, 2)
  lr_c, sched_c = log2_grid(-8, 6, 2), log2_grid(-16, -2, 2)
  if quick:  # every other row and column of the default grid
    sgd_lr, adam_lr, l2, l2_adam, lr_c, sched_c = (
        g[1::2] for g in (sgd_lr, adam_lr, l2, l2_adam, lr_c, sched_c))
  return [
      OptimizerSpec("sgd_l2", "SGD+L2", build_sgd_l2, sgd_lr, l2,
                    "L2 coefficient λ (coupled L2)", -1.0),
      OptimizerSpec("sgdw", "SGDW (schedule-coupled)", build_sgdw, sgd_lr, sched_c,
                    "λ_paper: per-step shrink s_t·λ (schedule-coupled)", 0.0),
      OptimizerSpec("adam_l2", "Adam+L2", build_adam_l2, adam_lr, l2_adam,
                    "L2 coefficient λ (coupled L2)", math.nan),
      OptimizerSpec("adamw_lr", "AdamW (lr-coupled)", build_adamw_lr, adam_lr, lr_c,
                    "λ_torch: per-step shrink η_t·λ (lr-coupled)", -1.0),
      OptimizerSpec("adamw_schedule", "AdamW (schedule-coupled)", build_adamw_schedule,
                    adam_lr, sched_c, "λ_paper: per-step shrink s_t·λ (schedule-coupled)",
                    0.0),
  ]


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  hidden: tuple[int, ...] = (64, 64)
  layernorm: bool = True
  epochs: int = 40
  batch_size: int = 128
  n_seeds: int = 5
  chunks: int = 8  # the epochs run in this many calls of one compiled program (progress bar)


def _one_run_fns(build: Builder, data: Data, cfg: TrainConfig):
  """Functions of ONE configuration (α, λ, seed): init, train some epochs, evaluate."""
  n = len(data.x_train)
  steps_per_epoch = n // cfg.batch_size
  total_steps = steps_per_epoch * cfg.epochs
  sizes = (data.x_train.shape[1], *cfg.hidden, data.n_classes)
  x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

  def loss_fn(params, x, y):
    logits = mlp_apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def init(params, alpha, wd):
    return params, build(alpha, wd, total_steps).init(params)

  def train(state, alpha, wd, seed, epoch0, n_epochs: int):
    tx = build(alpha, wd, total_steps)
    data_key = jax.random.fold_in(jax.random.key(1), seed)

    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x_tr[idx], y_tr[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, e):
      perm = jax.random.permutation(jax.random.fold_in(data_key, e), n)
      batches = perm[: steps_per_epoch * cfg.batch_size].reshape(steps_per_epoch, -1)
      return jax.lax.scan(step, carry, batches)[0], None

    return jax.lax.scan(epoch, state, epoch0 + jnp.arange(n_epochs))[0]

  def evaluate(state):
    params = state[0]
    logits = mlp_apply(params, x_te)
    finite = jnp.all(jnp.isfinite(logits))
    err = jnp.mean(jnp.argmax(logits, -1) != y_te)
    train_loss = loss_fn(params, x_tr, y_tr)
    # A diverged run (non-finite outputs) counts as 100% error.
    return jnp.where(finite, err, 1.0), jnp.where(finite, train_loss, jnp.inf)

  return init, train, evaluate, sizes


def grid_configs(spec: OptimizerSpec, n_seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flat arrays (α, λ, seed) of every cell × seed, in (lr, wd incl. 0, seed) C order."""
  wds = (0.0, *spec.wds)
  a, w, s = np.meshgrid(np.asarray(spec.lrs), np.asarray(wds), np.arange(n_seeds),
                        indexing="ij")
  return (a.ravel().astype(np.float32), w.ravel().astype(np.float32),
          s.ravel().astype(np.int32))


def train_grid(spec: OptimizerSpec, data: Data, cfg: TrainConfig,
               progress: Callable[[int], None] | None = None,
               return_params: bool = False) -> dict[str, Any]:
  """Trains every (α, λ, seed) of ``spec`` in one vmapped, jitted program.

  Returns ``error`` (final test error) and ``train_loss`` (final full-batch training
  loss) of shape (n_lr, 1 + n_wd, n_seeds), the first λ column being λ=0; with
  ``return_params`` also the final parameters, leaves of leading size
  n_lr·(1 + n_wd)·n_seeds in :func:`grid_configs` order. ``progress(k)`` is called after
  each chunk of k epochs.
  """
  if cfg.epochs % cfg.chunks:
    raise ValueError(f"epochs={cfg.epochs} must be a multiple of chunks={cfg.chunks}.")
  init, train, evaluate, sizes = _one_run_fns(spec.build, data, cfg)
  alphas, wds, seeds = grid_configs(spec, cfg.n_seeds)
  per_seed = [init_mlp(int(s), sizes, cfg.layernorm) for s in range(cfg.n_seeds)]
  params = jax.tree.map(lambda *p: jnp.asarray(np.stack(p)[seeds]), *per_seed)
  alphas, wds, seeds = map(jnp.asarray, (alphas, wds, seeds))
  per_chunk = cfg.epochs // cfg.chunks
  v_init = jax.jit(jax.vmap(init))
  v_train = jax.jit(
      jax.vmap(lambda st, a, w, s, e0: train(st, a, w, s, e0, per_chunk),
               in_axes=(0, 0, 0, 0, None)),
      donate_argnums=0,
  )
  v_eval = jax.jit(jax.vmap(evaluate))
  state = v_init(params, alphas, wds)
  for c in range(cfg.chunks):
    state = v_train(state, alphas, wds, seeds, jnp.int32(c * per_chunk))
    jax.block_until_ready(state)
    if progress is not None:
      progress(per_chunk)
  err, loss = v_eval(state)
  shape = (len(spec.lrs), 1 + len(spec.wds), cfg.n_seeds)
  out = {"error": np.asarray(err).reshape(shape), "train_loss": np.asarray(loss).reshape(shape)}
  if return_params:
    out["params"] = state[0]
  return out


def train_separately(spec: OptimizerSpec, data: Data, cfg: TrainConfig,
                     configs: Sequence[tuple[float, float, int]]) -> list[dict[str, Any]]:
  """Each (α, λ, seed) trained on its own, without vmap: the oracle of :func:`train_grid`.

  The same per-run functions, jitted for one configuration (α, λ, seed are arguments, so
  one compilation serves every configuration).
  """
  init, train, evaluate, sizes = _one_run_fns(spec.build, data, cfg)
  per_chunk = cfg.epochs // cfg.chunks
  j_init = jax.jit(init)
  j_train = jax.jit(lambda st, a, w, s, e0: train(st, a, w, s, e0, per_chunk))
  j_eval = jax.jit(evaluate)
  outs = []
  for alpha, wd, seed in configs:
    a, w, s = jnp.float32(alpha), jnp.float32(wd), jnp.int32(seed)
    state = j_init(jax.tree.map(jnp.asarray, init_mlp(seed, sizes, cfg.layernorm)), a, w)
    for c in range(cfg.chunks):
      state = j_train(state, a, w, s, jnp.int32(c * per_chunk))
    err, loss = j_eval(state)
    outs.append({"error": float(err), "train_loss": float(loss), "params": state[0]})
  return outs


# ----------------------------------------------------------------------------- analysis


def best_lambda_per_row(mean_err: np.ndarray, wds: Sequence[float],
                        max_row_error: float) -> list[dict[str, Any]]:
  """λ* of each α row: argmin over the λ>0 columns of the seed-mean test error.

  ``mean_err`` is (n_lr, 1 + n_wd) with column 0 the λ=0 column. For each row:
  - λ* is the argmin over λ>0 (λ=0 cannot enter a log-log fit); the row records
    whether λ=0 was as good or better (``zero_best``).
  - an interior argmin is refined by a parabola through the three neighbouring points
    in log2 λ (clipped to ± half a grid step);
  - a row is ``used`` in the fit only if its argmin is interior (not on the first or
    last λ>0 column: there the true optimum may lie outside the grid) and its best
    error is at most ``max_row_error`` (rows that did not train are left out).
  """
  logw = np.log2(np.asarray(wds))
  rows = []
  for i, row in enumerate(mean_err):
    pos = row[1:]
    j = int(np.argmin(pos))
    lw = float(logw[j])
    interior = 0 < j < len(pos) - 1
    if interior:
      y0, y1, y2 = pos[j - 1], pos[j], pos[j + 1]
      denom = y0 - 2 * y1 + y2
      h = logw[j + 1] - logw[j]
      if denom > 0:
        lw += float(np.clip(0.5 * (y0 - y2) / denom, -0.5, 0.5) * h)
    rows.append({
        "row": i,
        "log2_wd_star": lw,
        "best_error": float(pos[j]),
        "zero_error": float(row[0]),
        "zero_best": bool(row[0] <= pos[j]),
        "interior": interior,
        "used": bool(interior and pos[j] <= max_row_error),
    })
  return rows


def fit_slope(lrs: Sequence[float], rows: list[dict[str, Any]]) -> tuple[float, int]:
  """Least-squares slope of log2 λ* on log2 α over the used rows (NaN if fewer than 3)."""
  x = np.log2(np.asarray(lrs))[[r["row"] for r in rows if r["used"]]]
  y = np.asarray([r["log2_wd_star"] for r in rows if r["used"]])
  if len(x) < 3:
    return math.nan, len(x)
  return float(np.polyfit(x, y, 1)[0]), len(x)


def summarize(spec: OptimizerSpec, out: dict[str, np.ndarray]) -> dict[str, Any]:
  """Best cell (by seed-mean error), its standard error, λ* per row and the slope."""
  err = out["error"]
  n_seeds = err.shape[-1]
  mean = err.mean(-1)
  se = err.std(-1, ddof=1) / math.sqrt(n_seeds) if n_seeds > 1 else np.zeros_like(mean)
  i, j = np.unravel_index(int(np.argmin(mean)), mean.shape)
  i0 = int(np.argmin(mean[:, 0]))
  pos = mean[:, 1:]
  ip, jp = np.unravel_index(int(np.argmin(pos)), pos.shape)
  best = float(mean[i, j])
  # Rows enter the slope fit if their best error is within half the way from the
  # optimizer's best error to chance (90 %: both data sets have 10 classes): the rows
  # that trained at all.
  chance = 0.9
  rows = best_lambda_per_row(mean, spec.wds, best + 0.5 * (chance - best))
  slope, n_used = fit_slope(spec.lrs, rows)
  wds = (0.0, *spec.wds)
  return {
      "label": spec.label,
      "wd_units": spec.wd_units,
      "lrs": list(spec.lrs),
      "wds": list(wds),
      "best_error": best,
      "best_error_se": float(se[i, j]),
      "best_lr": float(spec.lrs[i]),
      "best_wd": float(wds[j]),
      "best_error_wd0": float(mean[i0, 0]),
      "best_error_wd0_se": float(se[i0, 0]),
      "best_lr_wd0": float(spec.lrs[i0]),
      "best_error_wd_pos": float(pos[ip, jp]),
      "best_error_wd_pos_se": float(se[ip, jp + 1]),
      "slope": slope,
      "slope_rows_used": n_used,
      "rows": rows,
      "mean_error": mean.tolist(),
      "se_error": se.tolist(),
      "errors": err.tolist(),
      "train_loss": out["train_loss"].tolist(),
      "diverged": int(np.sum(~np.isfinite(out["train_loss"]))),
  }


SLOPE_MINUS_ONE = (-1.5, -0.5)  # "slope ≈ -1", fixed before any run.
SLOPE_FLAT = 0.35  # "|slope| < 0.35", fixed before any run.


def criteria(results: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
  """The paper's claims (Loshchilov & Hutter 2019, Sec. 4.1 and Fig. 2): (name, passed, detail)."""
  lines = []
  for key in ("sgd_l2", "adamw_lr"):
    if key in results:
      s = results[key]["slope"]
      ok = SLOPE_MINUS_ONE[0] <= s <= SLOPE_MINUS_ONE[1]
      lines.append(((f"{results[key]['label']}: slope of log λ* on log α in "
                    f"[{SLOPE_MINUS_ONE[0]}, {SLOPE_MINUS_ONE[1]}] (diagonal valley)"), ok,
                    f"slope = {s:+.2f} over {results[key]['slope_rows_used']} rows"))
  for key in ("sgdw", "adamw_schedule"):
    if key in results:
      s = results[key]["slope"]
      ok = abs(s) < SLOPE_FLAT
      lines.append((f"{results[key]['label']}: |slope| < {SLOPE_FLAT} (axis-aligned)", ok,
                    f"slope = {s:+.2f} over {results[key]['slope_rows_used']} rows"))
  if "adam_l2" in results:
    a = results["adam_l2"]
    for key in ("adamw_lr", "adamw_schedule"):
      if key in results:
        w = results[key]
        diff = a["best_error"] - w["best_error"]
        se = math.hypot(a["best_error_se"], w["best_error_se"])
        lines.append((f"best {w['label']} error below best Adam+L2 by > 2 SE", diff > 2 * se,
                      (f"{100 * w['best_error']:.2f}% vs {100 * a['best_error']:.2f}%, "
                      f"difference {100 * diff:+.2f} pts, 2 SE = {200 * se:.2f} pts")))
    diff = a["best_error_wd0"] - a["best_error_wd_pos"]
    se = math.hypot(a["best_error_wd0_se"], a["best_error_wd_pos_se"])
    lines.append(("Adam+L2: best λ>0 not better than λ=0 by > 2 SE", not diff > 2 * se,
                  (f"λ>0 {100 * a['best_error_wd_pos']:.2f}% vs λ=0 "
                  f"{100 * a['best_error_wd0']:.2f}%, difference {100 * diff:+.2f} pts, "
                  f"2 SE = {200 * se:.2f} pts")))
  return lines


# ----------------------------------------------------------------------------- output


def format_table(results: dict[str, dict[str, Any]]) -> str:
  head = f"{'optimizer':<26} {'best test error':>17} {'at α':>9} {'at λ':>9} {'slope':>7}"
  lines = [head, "-" * len(head)]
  for r in results.values():
    err = f"{100 * r['best_error']:.2f} ± {100 * r['best_error_se']:.2f}%"
    lines.append(f"{r['label']:<26} {err:>17} {r['best_lr']:>9.2g} {r['best_wd']:>9.2g} "
                 f"{r['slope']:>+7.2f}")
  return "\n".join(lines)


# The colour scale shared by every panel runs from the lowest cell of all panels to this
# percentile of all cells (in %); cells above it take the top colour and keep their number.
COLOR_CAP_PERCENTILE = 75


def color_range(results: dict[str, dict[str, Any]],
                percentile: float = COLOR_CAP_PERCENTILE) -> tuple[float, float]:
  """(vmin, vmax) in % of the one colour scale shared by all panels.

  vmin is the best seed-mean cell over all panels, vmax the ``percentile``-th percentile
  of every panel's seed-mean cells (at least vmin + 1 point): the cap keeps diverged and
  untrained cells (up to 100 %) from flattening the differences near the optimum.
  """
  cells = np.concatenate([100 * np.ravel(r["mean_error"]) for r in results.values()])
  vmin = float(cells.min())
  return vmin, max(float(np.percentile(cells, percentile)), vmin + 1.0)


def text_color(rgba: Sequence[float]) -> str:
  """Black on light cells, white on dark ones (by the cell colour's relative luminance)."""
  r, g, b = rgba[:3]
  return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def plot_heatmaps(results: dict[str, dict[str, Any]], path: str, title: str = "",
                  notes: Sequence[str] = ()) -> tuple[float, float]:
  """Fig. 2 layout: SGD row (L2 | decoupled), Adam row (L2 | lr-coupled | schedule-coupled).

  All panels share one colour scale (:func:`color_range`) and one colour bar; returns its
  (vmin, vmax) in %.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cmap = plt.get_cmap("viridis_r")
  vmin, vmax = color_range(results)
  norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax, clip=True)
  layout = [["sgd_l2", "sgdw", None], ["adam_l2", "adamw_lr", "adamw_schedule"]]
  fig, axes = plt.subplots(2, 3, figsize=(16, 10.5))
  im = None
  for r_i, row in enumerate(layout):
    for c_i, key in enumerate(row):
      ax = axes[r_i][c_i]
      if key is None or key not in results:
        ax.axis("off")
        if key is None and notes:
          ax.text(0.0, 1.0, "\n".join(notes), va="top", ha="left", fontsize=8.5,
                  family="monospace", transform=ax.transAxes)
        continue
      res = results[key]
      mean = 100 * np.asarray(res["mean_error"])
      im = ax.imshow(mean, origin="lower", cmap=cmap, norm=norm, aspect="auto")
      # Each cell's number sits in its lower half: the λ* dots are drawn on the row's centre.
      for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
          ax.text(j, i - 0.22, f"{mean[i, j]:.1f}", ha="center", va="center", fontsize=8,
                  color=text_color(cmap(norm(mean[i, j]))))
      bi, bj = np.unravel_index(int(np.argmin(mean)), mean.shape)
      ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
      ax.axvline(0.5, color="white", lw=3)
      # λ* per row and the fitted line, in column coordinates (λ>0 column k is at k + 1).
      logw = np.log2(np.asarray(res["wds"][1:]))
      step = logw[1] - logw[0]
      used = [r for r in res["rows"] if r["used"]]
      xs = [1 + (r["log2_wd_star"] - logw[0]) / step for r in used]
      ax.plot(xs, [r["row"] for r in used], "o", color="red", ms=4)
      if math.isfinite(res["slope"]) and used:
        rows_i = np.asarray([r["row"] for r in used], float)
        log_a = np.log2(np.asarray(res["lrs"]))[rows_i.astype(int)]
        intercept = np.mean([r["log2_wd_star"] for r in used]) - res["slope"] * log_a.mean()
        ii = np.linspace(-0.5, mean.shape[0] - 0.5, 20)
        la = np.log2(res["lrs"][0]) + ii * (np.log2(res["lrs"][1]) - np.log2(res["lrs"][0]))
        ax.plot(1 + (intercept + res["slope"] * la - logw[0]) / step, ii, "--", color="red",
                lw=1.2)
      ax.set_xlim(-0.5, mean.shape[1] - 0.5)
      ax.set_ylim(-0.5, mean.shape[0] - 0.5)
      ax.set_xticks(range(mean.shape[1]))
      ax.set_xticklabels(["0"] + [f"$2^{{{round(v)}}}$" for v in logw], fontsize=8.5)
      ax.set_yticks(range(mean.shape[0]))
      ax.set_yticklabels([f"$2^{{{round(v)}}}$" for v in np.log2(res["lrs"])],
                         fontsize=8.5)
      ax.set_xlabel(f"weight decay: {res['wd_units']}", fontsize=9)
      ax.set_ylabel("initial learning rate α", fontsize=9)
      ax.set_title(f"{res['label']}: best {res['best_error'] * 100:.2f}% "
                   f"± {res['best_error_se'] * 100:.2f}, slope {res['slope']:+.2f}",
                   fontsize=10.5)
  scale = (f"one colour scale for all panels, {vmin:.1f}% to {vmax:.1f}% (the "
           f"{COLOR_CAP_PERCENTILE}th percentile of all cells); cells above it take the "
           "darkest colour")
  fig.suptitle(f"{title}\n{scale}" if title else scale, fontsize=10.5)
  fig.tight_layout(rect=(0, 0, 0.93, 1))
  if im is not None:
    # One colour bar for all panels, right of the grid; "extend" marks the clipped top.
    cax = fig.add_axes((0.94, 0.08, 0.013, 0.82))
    bar = fig.colorbar(im, cax=cax, extend="max" if vmax < 100 else "neither")
    bar.set_label("test error (%)", fontsize=11)
    bar.ax.tick_params(labelsize=9)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return vmin, vmax


def _wrap(lines: Sequence[str], width: int) -> list[str]:
  import textwrap

  out = []
  for line in lines:
    for part in line.split("\n"):
      out.extend(textwrap.wrap(part, width, subsequent_indent="     ",
                               break_on_hyphens=False) or [""])
  return out


def _json_safe(x: Any) -> Any:
  """NaN and ±inf (an undefined slope, a diverged run's loss) become null: strict JSON."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def run(specs: Sequence[OptimizerSpec], data: Data, cfg: TrainConfig, out_dir: str,
        show_progress: bool = True) -> dict[str, Any]:
  """Trains every optimizer's grid, writes results.json and heatmaps.png, returns results."""
  os.makedirs(out_dir, exist_ok=True)
  results, timings = {}, {}
  for spec in specs:
    t0 = time.perf_counter()
    if show_progress:
      from tqdm import tqdm

      n_runs = len(spec.lrs) * (1 + len(spec.wds)) * cfg.n_seeds
      with tqdm(total=cfg.epochs, desc=f"{spec.label:<25} ({n_runs} runs)", unit="epoch",
                file=sys.stdout, leave=True) as bar:
        out = train_grid(spec, data, cfg, progress=bar.update)
    else:
      out = train_grid(spec, data, cfg)
    timings[spec.key] = time.perf_counter() - t0
    results[spec.key] = summarize(spec, out)
    results[spec.key]["seconds"] = timings[spec.key]
  checks = criteria(results)
  payload = {
      "data": data.name,
      "n_train": len(data.x_train),
      "n_test": len(data.x_test),
      "config": dataclasses.asdict(cfg),
      "decay_mask": repr(DECAY_MASK),
      "momentum": MOMENTUM,
      "optimizers": results,
      "criteria": [{"claim": c, "pass": ok, "detail": d} for c, ok, d in checks],
  }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(_json_safe(payload), f, indent=1, allow_nan=False)
  title, notes = figure_text(data.name, cfg, checks)
  plot_heatmaps(results, os.path.join(out_dir, "heatmaps.png"), title, notes)
  return payload


def figure_text(data_name: str, cfg: TrainConfig,
                checks: Sequence[tuple[str, bool, str]]) -> tuple[str, list[str]]:
  """The figure's title and its notes panel (the claims with their PASS/FAIL lines)."""
  norm = " + LayerNorm" if cfg.layernorm else " (no LayerNorm)"
  title = (f"{data_name}: test error (%) after {cfg.epochs} epochs, MLP {cfg.hidden}{norm}, "
           f"cosine schedule, mean of {cfg.n_seeds} seeds; red box: best cell; "
           "dots: λ* per row; dashed: fit")
  notes = ["The paper's claims (Loshchilov & Hutter 2019,", "Sec. 4.1 and Fig. 2):", ""] + [
      f"{'PASS' if ok else 'FAIL'} {c}\n     {d}" for c, ok, d in checks]
  return title, _wrap(notes, 60)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small grid and short training (< 1 min)")
  p.add_argument("--data", default="mnist1d", choices=["mnist1d", "digits"])
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument("--mnist1d-samples", type=int, default=5000,
                 help="mnist1d's num_samples, 80%% train (for the investigation in BUILD_NOTES)")
  p.add_argument("--no-layernorm", action="store_true",
                 help="plain MLP (for the investigation in BUILD_NOTES)")
  p.add_argument("--only", default=None, help="comma-separated optimizer keys to run")
  p.add_argument("--out", default=os.path.join("out", "paper_grid"))
  args = p.parse_args(argv)
  cfg = TrainConfig(epochs=8, chunks=4, n_seeds=2) if args.quick else TrainConfig()
  if args.epochs is not None:
    cfg = dataclasses.replace(cfg, epochs=args.epochs, chunks=math.gcd(args.epochs, cfg.chunks))
  if args.seeds is not None:
    cfg = dataclasses.replace(cfg, n_seeds=args.seeds)
  if args.no_layernorm:
    cfg = dataclasses.replace(cfg, layernorm=False)
  specs = default_specs(args.quick)
  if args.only:
    keys = args.only.split(",")
    unknown = set(keys) - {s.key for s in specs}
    if unknown:
      p.error(f"--only: unknown {sorted(unknown)}; choose from {[s.key for s in specs]}")
    specs = [s for s in specs if s.key in keys]
  data = load_data(args.data, mnist1d_samples=args.mnist1d_samples)
  print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test; "
        f"MLP {cfg.hidden}{' + LayerNorm' if cfg.layernorm else ', no LayerNorm'}; "
        f"{cfg.epochs} epochs of batch {cfg.batch_size}, "
        f"cosine schedule; {cfg.n_seeds} seeds; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  t0, c0 = time.perf_counter(), time.process_time()
  payload = run(specs, data, cfg, args.out)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  res = payload["optimizers"]
  print()
  print(format_table(res))
  print()
  for c in payload["criteria"]:
    print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['claim']}: {c['detail']}")
  print()
  if args.quick:
    print("--quick is a smoke run (8 epochs, 2 seeds, every other row and column of the "
          "grid):\nits PASS/FAIL lines are not the reproduction; run without --quick.")
  print(f"wall time {wall:.0f} s (process CPU time {cpu:.0f} s); "
        f"outputs in {args.out}/ (heatmaps.png, results.json)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Update-step benchmark: od chains vs optax, a hand-written function, torch, and the memory limit.

Run (from the repository root)::

    python benchmarks/bench_step.py            # full run (~2 min on 2 cores)
    python benchmarks/bench_step.py --quick    # ~1 min: 1e6 and 1e7 and a smaller tree

Prints one table per problem size and a summary of the performance targets, and writes every
number to ``out/benchmarks/bench_step.json`` (ignored by git; ``--out`` to change, and
``benchmarks/run.py --tag NAME`` for a canonical run in ``benchmarks/results/``). ``--quick``
numbers are noisy: its MISS lines are not verdicts, the targets are judged on full runs.
Every contender of a table runs in the same process, interleaved in a fresh random order
each round (see ``_timing.py``); read the ratios, not the absolute times.

The step measured is the whole optimizer step on donated buffers,
``(θ, g, state) -> (θ', state')``: for the JAX contenders ``jax.jit(step, donate_argnums=(0, 2))``
with ``step = tx.update + optax.apply_updates`` (or ``od.fused_step(tx)``: the C++ kernel when it
is built, else the plain step; ``layout=`` the flat-buffer mode); for torch
``opt.step()`` with ``.grad`` set.
Effective bandwidth counts the 28 bytes per float32 parameter an AdamW step must move
(read θ, g, m, v; write θ, m, v). The streaming reference is a jitted, donated ``x ← a·x + y``
(12 bytes per element) in the same run: ``limit = 28 B·n / its bandwidth``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_decoupled as od
from benchmarks import _timing
from optax_decoupled import _kernel_build as od_kernel

LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-2
BERT_EPS = 1e-6
BYTES_PER_PARAM = 28  # read θ, g, m, v; write θ, m, v (float32)


# ----------------------------------------------------------------------------- problems


def flat_params(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(size=n), jnp.float32)}


def dense_params(n: int, seed: int = 0) -> dict:
  """A dense layer of about n parameters (kernel, bias, LayerNorm): masks have names to match."""
  rng = np.random.default_rng(seed)
  h = 256
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(n - 3 * h) // h * h).reshape(-1, h),
                                      jnp.float32),
                "bias": jnp.asarray(rng.normal(size=h), jnp.float32)},
      "LayerNorm": {"scale": jnp.ones(h, jnp.float32), "bias": jnp.zeros(h, jnp.float32)},
  }


def transformer_params(d: int = 256, layers: int = 12, vocab: int = 8192, seed: int = 0) -> dict:
  """A BERT-shaped tree: 12 layers × 16 leaves + embeddings; d=256 gives ~1e7 parameters."""
  rng = np.random.default_rng(seed)

  def arr(*shape):
    return jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)

  def dense(n_in, n_out):
    return {"kernel": arr(n_in, n_out), "bias": arr(n_out)}

  def norm():
    return {"scale": jnp.ones(d, jnp.float32), "bias": jnp.zeros(d, jnp.float32)}

  tree = {"embeddings": {"word_embeddings": {"embedding": arr(vocab, d)},
                         "position_embeddings": {"embedding": arr(512, d)},
                         "LayerNorm": norm()}}
  for i in range(layers):
    tree[f"layer_{i}"] = {
        "attention": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d),
                      "output": dense(d, d)},
        "attention_LayerNorm": norm(),
        "intermediate": dense(d, 4 * d), "output": dense(4 * d, d),
        "output_LayerNorm": norm(),
    }
  tree["pooler"] = dense(d, d)
  return tree


def stack_layers(tree: dict) -> dict:
  """The same parameters with the layers stacked on a leading axis (as nnx.scan / linen.scan
  lay them out): ~20 leaves instead of ~200."""
  layers = [tree[k] for k in sorted(tree) if k.startswith("layer_")]
  rest = {k: v for k, v in tree.items() if not k.startswith("layer_")}
  return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def grads_like(params, seed: int = 1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(1e-2 * rng.normal(size=x.shape), x.dtype), params)


# ----------------------------------------------------------------------------- contenders


def plain_step(tx: optax.GradientTransformation) -> Callable:
  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def hand_init(params):
  zeros = jax.tree.map(jnp.zeros_like, params)
  return (jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))


def hand_step(params, grads, state):
  """AdamW written out as one jnp function (the math of torch.optim.AdamW / optax.adamw)."""
  c, m, v = state
  c = c + 1
  t = c.astype(jnp.float32)

  def leaf(p, g, m, v):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    p = p - LR * ((m / (1 - B1**t)) / (jnp.sqrt(v / (1 - B2**t)) + EPS) + WD * p)
    return p, m, v

  out = jax.tree.map(leaf, params, grads, m, v)
  is_t = lambda x: isinstance(x, tuple)
  pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=is_t)
  return pick(0), (c, pick(1), pick(2))


class JaxStepper:
  """One donated, jitted step on its own copy of the problem; ``__call__`` blocks.

  Compiled once, ahead of time (``lower().compile()``), which also gives the compile time and
  ``memory_analysis()``; the timed calls run that same executable.
  """

  def __init__(self, step: Callable, params, grads, state):
    self.params = jax.tree.map(jnp.copy, params)
    self.grads = grads
    self.state = state
    lowered = jax.jit(step, donate_argnums=(0, 2)).lower(self.params, self.grads, self.state)
    t0 = time.perf_counter()
    self.fn = lowered.compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self) -> None:
    self.params, self.state = self.fn(self.params, self.grads, self.state)
    jax.block_until_ready((self.params, self.state))

  def compile_info(self) -> dict:
    ma = self.fn.memory_analysis()
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes)
    return {"compile_s": self.compile_s, "peak_bytes": int(peak),
            "temp_bytes": int(ma.temp_size_in_bytes),
            "argument_bytes": int(ma.argument_size_in_bytes),
            "alias_bytes": int(ma.alias_size_in_bytes)}


def jax_contender(step, tx_or_init, params, grads):
  init = tx_or_init.init if hasattr(tx_or_init, "init") else tx_or_init
  return JaxStepper(step, params, grads, init(params))


class TorchStepper:
  def __init__(self, params, grads, **kw):
    import torch  # only the benchmark imports torch.

    self.ps = []
    for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads)):
      t = torch.nn.Parameter(torch.from_numpy(np.array(p)))
      t.grad = torch.from_numpy(np.array(g))
      self.ps.append(t)
    self.opt = torch.optim.AdamW(self.ps, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, **kw)

  def __call__(self) -> None:
    self.opt.step()


class TorchClipStepper(TorchStepper):
  """``clip_grad_norm_(foreach=True)`` then the optimizer, as a torch training step does."""

  def __init__(self, params, grads, max_norm: float, optimizer: str = "adamw", **kw):
    super().__init__(params, grads, **kw)
    self.max_norm = max_norm
    if optimizer == "sgd":
      import torch
      self.opt = torch.optim.SGD(self.ps, lr=LR, momentum=0.9, **kw)

  def __call__(self) -> None:
    import torch
    if self.max_norm:
      torch.nn.utils.clip_grad_norm_(self.ps, self.max_norm, foreach=True)
    self.opt.step()


class StreamStepper:
  """x ← a·x + y, jitted and donated: 12 bytes per element, the streaming reference."""

  def __init__(self, n: int):
    self.fn = jax.jit(lambda x, y: x * 1.000001 + y, donate_argnums=(0,))
    self.x = jnp.ones(n, jnp.float32)
    self.y = jnp.full(n, 1e-6, jnp.float32)

  def __call__(self) -> None:
    self.x = self.fn(self.x, self.y)
    self.x.block_until_ready()


def bert_unmasked():
  """od.bert_adamw's chain with the mask removed (decay on every leaf): the mask's baseline."""
  return optax.chain(od.scale_by_adam(B1, B2, BERT_EPS, bias_correction=False),
                     od.add_decoupled_decay(WD), optax.scale_by_learning_rate(LR))


def optax_adam_l2():
  """The optax spelling of torch's Adam(weight_decay): decay added before the moments."""
  return optax.chain(optax.add_decayed_weights(WD), optax.scale_by_adam(B1, B2, EPS),
                     optax.scale_by_learning_rate(LR))


def build_bf16(n: int, torch_ok: bool) -> tuple[dict, int, int]:
  """Mixed precision: bfloat16 θ and g, float32 moments (od.adamw(mu_dtype=nu_dtype=f32)).

  The reference rows are float32 torch fused AdamW and the stream on the same n (the
  bfloat16 step moves 22 bytes per parameter, not 28: its "x limit" is conservative)."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), flat_params(n))
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads_like(flat_params(n)))
  tx = od.adamw(LR, B1, B2, EPS, weight_decay=WD, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  # η·λ = 1e-5 is below bfloat16's rounding step, so init warns that the decay alone rounds to
  # nothing (od.LowPrecisionDecayWarning). Intended here: this row times the step of a
  # bfloat16 model (its cost does not depend on whether the shrink survives rounding) and
  # trains nothing; a bfloat16 training run would add od.stochastic_rounding.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
    c: dict[str, Any] = {
        "od.adamw": jax_contender(plain_step(tx), tx, params, grads),
        "od.fused_step(od.adamw)": jax_contender(od.fused_step(tx), tx, params, grads),
    }
  if torch_ok:
    c["torch AdamW fused"] = TorchStepper(flat_params(n), grads_like(flat_params(n)), fused=True)
  c["stream a*x+y"] = StreamStepper(n)
  return c, n, 1


CLIP = 1.0  # below the gradients' global norm: every step clips.


def build_recipes(n: int, torch_ok: bool) -> tuple[dict, int, int]:
  """The recipes people run, one flat leaf of n: a global-norm clip in front of AdamW,
  injected hyperparameters, optax.adamw and SGDW, each fused against its plain step and
  against torch (clip_grad_norm_(foreach=True) + AdamW(fused=True); SGD(foreach=True))."""
  params, grads = flat_params(n), grads_like(flat_params(n))
  recipes = {
      "clip + od.adamw": optax.chain(optax.clip_by_global_norm(CLIP),
                                     od.adamw(LR, B1, B2, EPS, weight_decay=WD)),
      "inject(od.adamw)": optax.inject_hyperparams(od.adamw)(LR, B1, B2, EPS, weight_decay=WD),
      "optax.adamw": optax.adamw(LR, B1, B2, EPS, weight_decay=WD),
      "od.sgdw": od.sgdw(LR, 0.9, weight_decay=WD),
  }
  c: dict[str, Any] = {}
  for name, tx in recipes.items():
    c[f"{name}, fused"] = jax_contender(od.fused_step(tx), tx, params, grads)
    c[f"{name}, plain"] = jax_contender(plain_step(tx), tx, params, grads)
  if torch_ok:
    c["torch AdamW fused"] = TorchStepper(params, grads, fused=True)
    c["torch clip + AdamW fused"] = TorchClipStepper(params, grads, CLIP, fused=True)
    c["torch SGD foreach"] = TorchClipStepper(params, grads, 0.0, "sgd", foreach=True)
  c["stream a*x+y"] = StreamStepper(n)
  return c, n, 1


def build(problem: str, n: int, torch_ok: bool) -> tuple[dict, int, int]:
  """All contenders for one problem: (name -> stepper, parameters, leaves)."""
  if problem == "bf16":
    return build_bf16(n, torch_ok)
  if problem == "recipes":
    return build_recipes(n, torch_ok)
  if problem == "flat":
    params = flat_params(n)
  else:
    params = transformer_params(**({} if n >= 5_000_000 else {"d": 128, "vocab": 4096}))
  n = count(params)
  grads = grads_like(params)
  c: dict[str, Any] = {}
  adamw = od.adamw(LR, B1, B2, EPS, weight_decay=WD)
  c["optax.adamw"] = jax_contender(plain_step(optax.adamw(LR, B1, B2, EPS, weight_decay=WD)),
                                   optax.adamw(LR, weight_decay=WD), params, grads)
  # An A/A control: a second, identical optax.adamw program. Its ratio to the first measures
  # the noise floor of this run (any "difference" below it means nothing).
  c["optax.adamw (A/A copy)"] = jax_contender(
      plain_step(optax.adamw(LR, B1, B2, EPS, weight_decay=WD)), optax.adamw(LR, weight_decay=WD),
      params, grads)
  c["od.adamw"] = jax_contender(plain_step(adamw), adamw, params, grads)
  c["od.fused_step(od.adamw)"] = jax_contender(od.fused_step(adamw), adamw, params, grads)
  c["hand-written jnp"] = jax_contender(hand_step, hand_init, params, grads)
  l2 = od.adam_l2(LR, B1, B2, EPS, weight_decay=WD)
  c["od.adam_l2"] = jax_contender(plain_step(l2), l2, params, grads)
  c["optax adam+L2 chain"] = jax_contender(plain_step(optax_adam_l2()), optax_adam_l2(), params,
                                           grads)
  dparams = params if problem == "tree" else dense_params(n)
  dgrads = grads if problem == "tree" else grads_like(dparams)
  bert = od.bert_adamw(LR, WD, B1, B2, BERT_EPS)
  c["od.bert_adamw (masked)"] = jax_contender(plain_step(bert), bert, dparams, dgrads)
  c["bert chain unmasked"] = jax_contender(plain_step(bert_unmasked()), bert_unmasked(), dparams,
                                           dgrads)
  if problem == "tree":
    masked = od.adamw(LR, B1, B2, EPS, weight_decay=WD, mask=od.exclude_names(*od.BERT_EXCLUDE))
    c["od.adamw (masked)"] = jax_contender(plain_step(masked), masked, params, grads)
    stacked = stack_layers(params)
    c["od.adamw, layers stacked"] = jax_contender(plain_step(adamw), adamw, stacked,
                                                  grads_like(stacked))
    flat = flat_params(n)
    c["od.adamw, 1 flat leaf"] = jax_contender(plain_step(adamw), adamw, flat, grads_like(flat))
    c["od.fused_step, 1 flat leaf"] = jax_contender(od.fused_step(adamw), adamw, flat,
                                                    grads_like(flat))
    # Flat-buffer mode: the same 198-leaf tree packed into one buffer (od.FlatLayout); the
    # BERT name mask still decides per original leaf.
    layout = od.FlatLayout.of(params)
    c["od.fused_step, flat buffer (masked)"] = JaxStepper(
        od.fused_step(masked, layout=layout), layout.pack(params), layout.pack(grads),
        layout.pack_state(masked.init(params)))
  if torch_ok:
    c["torch AdamW fused"] = TorchStepper(params, grads, fused=True)
    if problem == "flat":  # torch's own noise floor (its two OpenMP threads share the cores)
      c["torch AdamW fused (A/A copy)"] = TorchStepper(params, grads, fused=True)
    c["torch AdamW foreach"] = TorchStepper(params, grads, foreach=True)
  c["stream a*x+y"] = StreamStepper(n)
  return c, n, len(jax.tree.leaves(params))


# ----------------------------------------------------------------------------- compile counts


def compile_counts(n: int = 100_000, steps: int = 100) -> dict:
  """Compilations of a jitted step over ``steps`` steps, with hyperparameters changed each step."""
  params = flat_params(n)
  grads = grads_like(params)
  out = {}
  for name, make in [
      ("od.adamw", lambda: od.adamw(LR, weight_decay=WD)),
      ("inject_hyperparams(od.adamw), lr and wd changed every step",
       lambda: optax.inject_hyperparams(od.adamw)(learning_rate=LR, weight_decay=WD)),
  ]:
    for kind, stepf in [("plain", plain_step), ("fused_step", od.fused_step)]:
      tx = make()
      fn = jax.jit(stepf(tx), donate_argnums=(0, 2))
      p, s = jax.tree.map(jnp.copy, params), tx.init(params)
      for t in range(steps):
        if "inject" in name:
          s.hyperparams["learning_rate"] = jnp.asarray(LR / (1 + t), jnp.float32)
          s.hyperparams["weight_decay"] = jnp.asarray(WD * (1 + t % 3), jnp.float32)
        p, s = fn(p, grads, s)
      jax.block_until_ready(p)
      out[f"{name} [{kind}]"] = fn._cache_size()
  return out


# ----------------------------------------------------------------------------- report


def table(title: str, n: int, res: dict, infos: dict, min_bytes: int | None = None) -> dict:
  """Prints one problem's table; ``min_bytes``: θ+g+m+v (default float32: 16·n)."""
  min_bytes = 16 * n if min_bytes is None else min_bytes
  res = dict(res)
  stream = res.pop("stream a*x+y")
  bw = 12 * n / stream.median
  limit = BYTES_PER_PARAM * n / bw
  torch_ref = res.get("torch AdamW fused")
  print(f"\n## {title}: {n:,} parameters; streaming reference {bw / 1e9:.1f} GB/s "
        f"(x <- a*x + y), so an AdamW step cannot beat {limit * 1e3:.2f} ms")
  head = f"{'contender':30s} {'median ms':>10s} {'IQR ms':>15s} {'eff GB/s':>9s} " \
         f"{'x optax':>8s} {'x torch':>8s} {'x limit':>8s} {'peak/min':>9s} {'compile s':>9s}"
  print(head)
  print("-" * len(head))
  ref = res[next(k for k in ("optax.adamw", "optax.adamw, plain", "od.adamw") if k in res)].median
  rows = {}
  for name, t in sorted(res.items(), key=lambda kv: kv[1].median):
    info = infos.get(name, {})
    lo, hi = t.iqr
    row = {"median_s": t.median, "iqr_s": [lo, hi], "n_times": len(t.times),
           "visits_s": t.visits,
           "eff_GBps": BYTES_PER_PARAM * n / t.median / 1e9, "x_optax": t.median / ref,
           "x_torch_fused": t.median / torch_ref.median if torch_ref else None,
           "x_limit": t.median / limit, **info}
    if "peak_bytes" in info:
      row["peak_over_min"] = info["peak_bytes"] / min_bytes
      row["peak_extra_bytes"] = info["peak_bytes"] - min_bytes
    rows[name] = row
    tt = f"{row['x_torch_fused']:8.2f}" if torch_ref else f"{'-':>8s}"
    pk = f"{row['peak_over_min']:9.3f}" if "peak_over_min" in row else f"{'-':>9s}"
    cs = f"{info['compile_s']:9.2f}" if "compile_s" in info else f"{'-':>9s}"
    print(f"{name:30s} {t.median * 1e3:10.3f} {f'{lo * 1e3:.2f}-{hi * 1e3:.2f}':>15s} "
          f"{row['eff_GBps']:9.1f} {row['x_optax']:8.3f} {tt} {row['x_limit']:8.2f} {pk} {cs}")
  return {"n": n, "stream_GBps": bw / 1e9, "limit_s": limit, "stream_median_s": stream.median,
          "rows": rows}


def summary(results: dict) -> dict:
  print("\n## Targets (paired ratios: median over rounds of a/b within a round; "
        "<= target is met)")
  checks = []
  for key, r in results["tables"].items():
    rows = r["rows"]
    for a, b, target in [
        ("optax.adamw (A/A copy)", "optax.adamw", 1.02),
        ("torch AdamW fused (A/A copy)", "torch AdamW fused", 1.02),
        ("od.adamw", "optax.adamw", 1.02), ("od.adamw", "hand-written jnp", 1.02),
        ("od.adam_l2", "optax adam+L2 chain", 1.02),
        ("od.bert_adamw (masked)", "bert chain unmasked", 1.02),
        ("od.adamw (masked)", "od.adamw", 1.02),
        ("od.fused_step(od.adamw)", "torch AdamW fused", 1.0),
        ("od.adamw", "torch AdamW fused", 1.0), ("optax.adamw", "torch AdamW fused", 1.0),
        ("od.fused_step(od.adamw)", "od.adamw", 1.0),
        ("od.adamw", "od.adamw, 1 flat leaf", 1.2),
        ("od.adamw, layers stacked", "od.adamw, 1 flat leaf", 1.2),
        ("od.fused_step(od.adamw)", "od.fused_step, 1 flat leaf", 1.2),
        ("od.fused_step, flat buffer (masked)", "od.fused_step, 1 flat leaf", 1.2),
        ("od.fused_step, flat buffer (masked)", "torch AdamW fused", 1.0),
        ("clip + od.adamw, fused", "torch clip + AdamW fused", 1.0),
        ("inject(od.adamw), fused", "torch AdamW fused", 1.0),
        ("optax.adamw, fused", "torch AdamW fused", 1.0),
        ("od.sgdw, fused", "torch SGD foreach", 1.0),
        ("od.sgdw, fused", "od.sgdw, plain", 1.02),
    ]:
      x = _timing.rows_ratio(rows, a, b)
      if x is not None:
        checks.append({"table": key, "a": a, "b": b, "ratio": x, "target": target,
                       "met": x <= target})
    for a in ("od.fused_step(od.adamw)",
              "od.fused_step, flat buffer (masked)", "od.adamw"):
      if a in rows:
        x = rows[a]["x_limit"]  # against the stream's median (not paired)
        checks.append({"table": key, "a": a, "b": "streaming limit", "ratio": x, "target": 1.2,
                       "met": x <= 1.2})
      if a in rows and "peak_over_min" in rows[a]:
        # "θ+g+m+v + O(1)": the extra bytes must not grow with n.
        x, extra = rows[a]["peak_over_min"], rows[a]["peak_extra_bytes"]
        checks.append({"table": key, "a": a + " peak memory", "b": "θ+g+m+v", "ratio": x,
                       "extra_bytes": extra, "target": "extra <= 4 MiB",
                       "met": extra <= 4 * 2**20})
  for key, r in results["tables"].items():
    aa = _timing.rows_ratio(r["rows"], "optax.adamw (A/A copy)", "optax.adamw")
    if aa is not None:
      print(f"noise floor {key}: two identical optax.adamw programs measured {aa:.3f}x apart")
  for c in checks:
    extra = f", extra {c['extra_bytes'] / 2**20:.2f} MiB" if "extra_bytes" in c else ""
    target = c["target"] if isinstance(c["target"], str) else f"<= {c['target']}"
    print(f"{'met ' if c['met'] else 'MISS'} {c['table']:15s} {c['a']:36s} / {c['b']:27s} "
          f"{c['ratio']:7.3f} (target {target}{extra})")
  return {"checks": checks}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="1e6, 1e7 and a small tree, fewer rounds")
  ap.add_argument("--sizes", default=None, help="comma-separated flat sizes, e.g. 1e5,1e6")
  ap.add_argument("--no-tree", action="store_true")
  ap.add_argument("--rounds", type=int, default=None)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--out", default=os.path.join(_timing.SCRATCH_DIR, "bench_step.json"),
                 help="JSON output (default: out/benchmarks/bench_step.json, ignored by git)")
  args = ap.parse_args(argv)
  sizes = ([1e6, 1e7] if args.quick else [1e5, 1e6, 1e7, 3e7]) if args.sizes is None else \
      [float(s) for s in args.sizes.split(",")]
  rounds = args.rounds or (4 if args.quick else 8)
  torch_ok = not args.no_torch
  if torch_ok:
    try:
      import torch
    except ImportError:
      torch_ok = False
  problems = [("flat", int(s)) for s in sizes]
  if 1e7 in sizes:
    problems += [("bf16", 10_000_000), ("recipes", 10_000_000)]
  if not args.no_tree:
    problems.append(("tree", 2_000_000 if args.quick else 10_000_000))
  results: dict[str, Any] = {
      "command": "python benchmarks/bench_step.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                  "jax": jax.__version__, "optax": optax.__version__,
                  "backend": jax.default_backend()},
      "rounds": rounds, "tables": {},
  }
  if torch_ok:
    import torch
    results["machine"]["torch"] = torch.__version__
    results["machine"]["torch_threads"] = torch.get_num_threads()
  for problem, n in problems:
    contenders, n, leaves = build(problem, n, torch_ok)
    infos = {name: c.compile_info() for name, c in contenders.items()
             if isinstance(c, JaxStepper)}
    # The tree costs torch ~200 per-tensor kernels per step: fewer rounds keep the run short.
    res = _timing.interleaved(contenders, rounds=rounds if problem != "tree" else
                              max(3, rounds * 5 // 8), calls_per_visit=3, warmup=2,
                              seed=len(results["tables"]))
    key = {"flat": f"flat {n:.0e}", "bf16": f"bf16 {n:.0e}", "recipes": f"recipes {n:.0e}"}.get(
        problem, f"tree {leaves} leaves")
    title = {"flat": f"one leaf of {n:.0e} float32",
             "bf16": f"one leaf of {n:.0e} bfloat16, float32 moments (torch: float32)",
             "recipes": f"recipes on one leaf of {n:.0e} float32 (clip: max_norm={CLIP})"}.get(
                 problem, f"transformer-shaped tree ({key})")
    # bfloat16 θ and g, float32 m and v: 12 bytes per parameter at rest.
    results["tables"][key] = table(title, n, res, infos, 12 * n if problem == "bf16" else None)
    del contenders
  print("\n## Compilations over 100 steps (jax.jit cache size after the loop)")
  cc = compile_counts()
  for k, v in cc.items():
    print(f"{v:3d}  {k}")
  results["machine"]["cpu_kernel"] = od_kernel.unavailable() or "built and loaded"
  results["compilations_over_100_steps"] = cc
  results["summary"] = summary(results)
  results["machine"]["loadavg_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {args.out}; load average start {results['machine']['loadavg_start']}, "
        f"end {results['machine']['loadavg_end']}")
  if args.quick:
    print(_timing.QUICK_NOTE)
  return results


if __name__ == "__main__":
  main()

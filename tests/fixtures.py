"""Shared fixtures for the tests: parameter trees shaped like real models, and the plain
step (``tx.update`` + ``optax.apply_updates``) the fused-step tests compare against.

Reference optimizers (torch runners, numpy transcriptions of BERT and the
paper) live in ``tests/references.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def bert_linen_params(seed: int = 0, hidden: int = 8, layers: int = 2) -> dict:
  """A BERT-shaped Flax linen parameter dict (names as Flax/HF-Flax write them)."""
  rng = np.random.default_rng(seed)

  def dense(n_in, n_out):
    return {
        "kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(n_out,)), jnp.float32),
    }

  def norm(n):
    return {
        "scale": jnp.asarray(1 + 0.1 * rng.normal(size=(n,)), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.normal(size=(n,)), jnp.float32),
    }

  encoder = {}
  for i in range(layers):
    encoder[f"layer_{i}"] = {
        "attention": {
            "query": dense(hidden, hidden),
            "key": dense(hidden, hidden),
            "value": dense(hidden, hidden),
            "output": dense(hidden, hidden),
        },
        "LayerNorm_0": norm(hidden),
        "intermediate": dense(hidden, 4 * hidden),
        "output": dense(4 * hidden, hidden),
        "LayerNorm_1": norm(hidden),
    }
  return {
      "embeddings": {
          "word_embeddings": {
              "embedding": jnp.asarray(rng.normal(size=(32, hidden)), jnp.float32)
          },
          "LayerNorm": norm(hidden),
      },
      "encoder": encoder,
      "pooler": dense(hidden, hidden),
  }


def multiscale_grads(params, step: int, seed: int = 0):
  """Gradients whose leaves differ by orders of magnitude (1e-4 .. 1e2), new each step."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed * 100_003 + step)
  out = []
  for i, leaf in enumerate(leaves):
    scale = 10.0 ** (i % 7 - 4)
    out.append(jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def small_named_params(seed: int = 0) -> dict:
  """Seven float32 leaves named like a small Flax model (kernels, biases, a LayerNorm, an
  embedding); with ``multiscale_grads`` their gradient scales run from 1e-4 to 1e2."""
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
      "LayerNorm": {"bias": a(3), "scale": 1 + 0.1 * a(3)},
      "dense": {"bias": a(3), "kernel": a(4, 3)},
      "embed": {"embedding": a(5, 4)},
      "head": {"bias": a(2), "kernel": a(3, 2)},
  }


def plain_step(tx):
  """The oracle step of every fused-step test: ``tx.update`` then ``optax.apply_updates``."""

  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def assert_kernel_close(actual, desired, err_msg: str = "") -> None:
  """The kernel tests' tolerance, leaf by leaf: 5 float32 eps of the array's largest value.

  The kernel rounds each operation as written; XLA's plain step contracts
  ``b1·m + (1-b1)·g`` into a fused multiply-add, so the two agree to a few ulp of the
  array's scale (moments mix gradients of very different scales), not bitwise.
  """
  for a, b in zip(jax.tree.leaves(desired), jax.tree.leaves(actual), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(a).max(initial=0.0)
    np.testing.assert_allclose(b, a, rtol=0, atol=5 * np.finfo(np.float32).eps * scale,
                               err_msg=err_msg)


def run_script(path: str, timeout: int = 300) -> list[str]:
  """Runs a test file as a script in a fresh CPU-only process (e.g. to emulate 8 devices,
  which JAX fixes at first use) and returns the second word of its ``OK ...`` lines."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, os.path.abspath(path)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("OK ")]


def assert_fused_equals_plain(tx, fused, params, state, steps: int = 3) -> None:
  """Runs the plain step of ``tx`` and ``fused`` side by side (jitted) on the same gradients,
  sin(θ·(t+3))·10^(t−2) (scales 1e-2 to 10), and asserts the same state structure, shapes,
  dtypes, and values to rtol 2e-6, atol 1e-7 (float32 round-off of a few steps)."""
  plain, fast = jax.jit(plain_step(tx)), jax.jit(fused)
  p1 = p2 = params
  s1 = s2 = state
  for t in range(steps):
    grads = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 3.0)) * 10.0 ** (t - 2), params)
    p1, s1 = plain(p1, grads, s1)
    p2, s2 = fast(p2, grads, s2)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2e-6, atol=1e-7)

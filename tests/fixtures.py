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

"""Quickstart: Adam+L2 and AdamW are different optimizers; BERT's mask by names.

Run:  python examples/quickstart.py
"""

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import optax_decoupled as od


def main(argv: Sequence[str] | None = None) -> int:
  argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Run without options: prints a mask table and the two optimizers' shrink "
      "(a few seconds).").parse_args(argv)
  # A BERT-shaped parameter tree (Flax linen naming).
  key = jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  params = {
      "encoder": {
          "layer_0": {
              "attention": {"kernel": jax.random.normal(k1, (16, 16)), "bias": jnp.zeros(16)},
              "LayerNorm_0": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
          }
      },
      "classifier": {"kernel": jax.random.normal(k2, (16, 2)), "bias": jnp.zeros(2)},
  }

  mask = od.exclude_names(*od.BERT_EXCLUDE)
  print(od.describe_mask(params, mask))
  print()

  # Same λ, same learning rate, zero data gradient: only the decay acts.
  lr, wd, steps = 1e-2, 1e-1, 100
  optimizers = {
      "Adam+L2 (od.adam_l2)": od.adam_l2(lr, weight_decay=wd, mask=mask),
      "AdamW   (od.adamw)": od.adamw(lr, weight_decay=wd, mask=mask),
  }
  zeros = jax.tree.map(jnp.zeros_like, params)
  kernel0 = params["classifier"]["kernel"]
  for name, tx in optimizers.items():
    state = tx.init(params)

    @jax.jit
    def step(p, s, tx=tx):
      u, s = tx.update(zeros, s, p)
      return optax.apply_updates(p, u), s

    p = params
    for _ in range(steps):
      p, state = step(p, state)
    kernel = p["classifier"]["kernel"]
    ratio = kernel / kernel0
    print(
        f"{name}: after {steps} zero-gradient steps, kernel/kernel_0 ranges "
        f"{float(ratio.min()):.4f} .. {float(ratio.max()):.4f}"
    )
  print(f"AdamW's geometric shrink (1 - lr*wd)^{steps} = {(1 - lr * wd) ** steps:.4f}: "
        "every weight shrinks by the same factor.")
  print("Adam+L2 normalises the L2 'gradient' by its own sqrt(v): each weight moves by "
        "about lr per step whatever its size, so small weights overshoot and large ones "
        "are not shrunk more.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

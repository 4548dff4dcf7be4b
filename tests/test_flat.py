"""Flat-buffer mode (``od.FlatLayout`` + ``od.fused_step(tx, layout=...)``).

Claims: packing is lossless and refuses trees that do not fit; the optimizer state packs and
unpacks to exactly ``tx.init``'s; a step on the packed buffers equals the plain step on the
tree (oracle: ``tx.update`` + ``optax.apply_updates``) whichever path runs; name masks still
decide per original leaf (checked against the closed form of a zero-gradient step); and the
kernel path is one in-place call over one buffer per array.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from optax_decoupled import _kernel, _kernel_build
from tests.fixtures import plain_step


def _tree(seed=0):
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {"encoder": {"layer_0": {"kernel": a(32, 700), "bias": a(700)},
                      "LayerNorm": {"scale": a(700), "bias": a(700)}},
          "embedding": a(50, 40), "temperature": a(), "unused": jnp.zeros((0, 4), jnp.float32)}


def _close(a, b, steps=4):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype
    scale = np.abs(x).max(initial=0.0)
    np.testing.assert_allclose(y, x, rtol=0, atol=steps * 2 * np.finfo(np.float32).eps * scale)


def test_pack_then_unpack_is_the_identity_and_the_layout_is_a_frozen_value():
  params = _tree()
  layout = od.FlatLayout.of(params)
  flat = layout.pack(params)
  assert flat.shape == (layout.size,) and layout.size == sum(x.size for x in
                                                            jax.tree.leaves(params))
  back = layout.unpack(flat)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert layout == od.FlatLayout.of(_tree(1)) and hash(layout) == hash(od.FlatLayout.of(_tree(1)))
  assert "encoder/LayerNorm/bias" in layout.paths
  with pytest.raises(dataclasses.FrozenInstanceError):
    layout.dtype = "bfloat16"


def test_layout_refuses_trees_that_do_not_fit():
  params = _tree()
  layout = od.FlatLayout.of(params)
  mixed = dict(params, embedding=params["embedding"].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="one dtype.*bfloat16.*float32"):
    od.FlatLayout.of(mixed)
  with pytest.raises(ValueError, match="floating point"):
    od.FlatLayout.of({"steps": jnp.arange(3)})
  with pytest.raises(ValueError, match="leaf 'embedding' has shape"):
    layout.pack(dict(params, embedding=jnp.zeros((40, 50))))
  with pytest.raises(ValueError, match="structure"):
    layout.pack({"encoder": params["encoder"]})
  with pytest.raises(ValueError, match=rf"shape \({layout.size},\)"):
    layout.unpack(jnp.zeros(layout.size + 1))
  with pytest.raises(TypeError, match="od.FlatLayout"):
    od.fused_step(od.adamw(1e-3), layout=params)


@pytest.mark.parametrize("tx", [od.adamw(1e-3, weight_decay=1e-2),
                                od.with_decay_toward(optax.sgd(1e-2), 1e-3)])
def test_state_packs_and_unpacks_to_tx_init(tx):
  params = _tree()
  layout = od.FlatLayout.of(params)
  state = tx.init(params)
  packed = layout.pack_state(state)
  # every parameter-shaped subtree (moments, a reference θ) is now one buffer
  assert all(np.ndim(x) <= 1 for x in jax.tree.leaves(packed))
  assert any(np.shape(x) == (layout.size,) for x in jax.tree.leaves(packed))
  back = layout.unpack_state(packed)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TRANSFORMS = {
    "od.adamw, BERT mask, schedule": lambda: od.adamw(
        optax.cosine_decay_schedule(1e-2, 10), weight_decay=1e-1,
        mask=od.exclude_names(*od.BERT_EXCLUDE)),
    "od.adamw, ndim mask": lambda: od.adamw(1e-2, weight_decay=1e-1, mask=od.min_ndim(2)),
    "od.adamw, decay_multipliers": lambda: od.adamw(1e-2, weight_decay=1e-1, mask=od.decay_multipliers(
        [(".*bias", 0.0), (".*LayerNorm.*", 0.5)], default=1.0)),
    "clip + od.adamw (the clip folded into the kernel)": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), od.adamw(1e-2, weight_decay=1e-1)),
    "od.adamw + clip after it (plain step on the unpacked tree)": lambda: optax.chain(
        od.adamw(1e-2, weight_decay=1e-1), optax.clip_by_global_norm(1.0)),
    "od.adam_l2": lambda: od.adam_l2(1e-2, weight_decay=1e-1),
}


@pytest.mark.slow  # over a second: the quick suite leaves it out
@pytest.mark.parametrize("kernel", ["auto", "off"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_step_on_flat_buffers_equals_the_plain_step_on_the_tree(name, kernel):
  tx = TRANSFORMS[name]()
  params = _tree()
  layout = od.FlatLayout.of(params)
  step = od.fused_step(tx, kernel=kernel, layout=layout)
  flat, state = layout.pack(params), layout.pack_state(tx.init(params))
  kernel_computes = name != "od.adamw + clip after it (plain step on the unpacked tree)"
  expect = "kernel" if (kernel == "auto" and kernel_computes
                        and _kernel_build.unavailable() is None) else "plain"
  assert step.explain(flat, flat, state).split(":")[0] == expect
  fn, plain = jax.jit(step), jax.jit(plain_step(tx))
  p, s = params, tx.init(params)
  for t in range(4):
    grads = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 3.0)) * 10.0 ** (t - 2), params)
    p, s = plain(p, grads, s)
    flat, state = fn(flat, layout.pack(grads), state)
  _close(p, layout.unpack(flat))
  _close(s, layout.unpack_state(state))


def test_masks_decide_per_original_leaf_inside_the_buffer():
  # With g = 0 (and m = v = 0), Adam's direction is 0/(0 + ε) = 0, so one step of lr-coupled
  # AdamW is θ ← θ + (-η)·(0 + λθ) = θ - ηλθ on decayed leaves and θ + (-η)·0 = θ, bitwise,
  # on excluded ones (torch.optim.AdamW's formula with a zero gradient).
  eta, lam = 1e-2, 0.5
  tx = od.adamw(eta, weight_decay=lam, mask=od.exclude_names(*od.BERT_EXCLUDE))
  params = _tree()
  layout = od.FlatLayout.of(params)
  flat, _ = jax.jit(od.fused_step(tx, layout=layout))(
      layout.pack(params), jnp.zeros(layout.size), layout.pack_state(tx.init(params)))
  new = dict(zip(layout.paths, jax.tree.leaves(layout.unpack(flat))))
  old = dict(zip(layout.paths, jax.tree.leaves(params)))
  for path in layout.paths:
    theta = np.asarray(old[path])
    if "bias" in path or "LayerNorm" in path:
      np.testing.assert_array_equal(np.asarray(new[path]), theta, err_msg=path)
    else:
      expected = theta + np.float32(-eta) * (np.float32(lam) * theta)
      np.testing.assert_allclose(np.asarray(new[path]), expected, rtol=2e-7, err_msg=path)
      assert not np.array_equal(np.asarray(new[path]), theta) or theta.size <= 1


def test_kernel_on_flat_buffers_is_one_in_place_call_over_four_arrays():
  if _kernel_build.unavailable() is not None:  # the unpacked path is covered above
    assert "not available" in _kernel_build.unavailable() or "OPTAX_DECOUPLED_NO_KERNEL" in (
        _kernel_build.unavailable())
    return
  params = _tree()
  layout = od.FlatLayout.of(params)
  tx = od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias"))
  step = jax.jit(od.fused_step(tx, kernel="require", layout=layout), donate_argnums=(0, 2))
  state = layout.pack_state(tx.init(params))
  flat = layout.pack(params)
  compiled = step.lower(flat, flat, state).compile()
  hlo = compiled.as_text()
  calls = [line for line in hlo.splitlines() if "custom-call(" in line]
  assert len(calls) == 1
  n = layout.size
  # operands: the scalars and θ, g, m, v, each the whole buffer
  assert len(re.findall(rf"f32\[{n}\]", calls[0].split("custom-call(")[1])) == 4
  assert not re.search(rf"= f32\[{n}\]\{{0\}} (fusion|copy|slice|concatenate)\(", hlo)
  ma = compiled.memory_analysis()
  assert ma.alias_size_in_bytes >= 12 * n and ma.temp_size_in_bytes <= 4096


@pytest.mark.slow  # over a second: the quick suite leaves it out
def test_a_train_step_can_differentiate_with_respect_to_the_flat_buffer():
  # What the README shows: the loss reads layout.unpack(flat), jax.grad gives the flat
  # gradient directly; it equals the packed tree gradient (oracle: grad on the tree).
  params = _tree()
  layout = od.FlatLayout.of(params)
  x = jnp.linspace(-1.0, 1.0, 700)

  def loss(tree):
    layer = tree["encoder"]["layer_0"]
    h = jnp.tanh(layer["kernel"] @ x + layer["bias"][:32])
    return jnp.sum(h ** 2) + jnp.sum(tree["embedding"] ** 2) * tree["temperature"]

  flat_grads = jax.grad(lambda f: loss(layout.unpack(f)))(layout.pack(params))
  np.testing.assert_allclose(np.asarray(flat_grads),
                             np.asarray(layout.pack(jax.grad(loss)(params))), rtol=1e-6)
  tx = od.adamw(1e-2, weight_decay=1e-1, mask=od.exclude_names(*od.BERT_EXCLUDE))

  @jax.jit
  def train_step(flat, state):
    g = jax.grad(lambda f: loss(layout.unpack(f)))(flat)
    return od.fused_step(tx, layout=layout)(flat, g, state), g

  flat, state = layout.pack(params), layout.pack_state(tx.init(params))
  p, s = params, tx.init(params)
  for _ in range(3):
    # The oracle steps with the same gradient (Adam divides by √v: gradients that differ in
    # the last bit, from another order of the same sums, can move a weight by far more).
    (flat, state), g = train_step(flat, state)
    p, s = jax.jit(plain_step(tx))(p, layout.unpack(g), s)
  _close(p, layout.unpack(flat), steps=3)

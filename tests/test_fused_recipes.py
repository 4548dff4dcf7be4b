"""The fast path for the recipes people run: each equals ``tx.update`` + ``apply_updates``.

``od.fused_step`` computes, in one pass over θ, g and the moments (the C++ kernel):

* ``optax.chain(optax.clip_by_global_norm(c), od.adamw(...))``: the global norm in one read
  of g, the clip applied as the kernel reads g (both when the clip triggers and when not);
* ``optax.inject_hyperparams(od.adamw)(...)``, with the learning rate and λ changed
  mid-run by writing the state's hyperparameters;
* both at once, and the flat-buffer mode with a clip;
* ``optax.adamw`` itself (the same step; read from its chain), with a mask function and
  with a learning-rate schedule; ``od.bert_adamw`` (no bias correction: the kernel divides
  by 1, which is exact); ``od.adam_l2`` (λθ added to g before the moments, also behind a
  clip); ``od.decay_multipliers`` (one coefficient c·mult per distinct multiplier, rounded
  as ``_decay.decay`` rounds it); ``od.adamw``'s other couplings (θ shrinks by c_t after the
  finished step: ``"schedule"``, ``"none"``, ``"corrected"``); Nesterov (optax's NAdam m̂);
* a clip in front of a transformation the kernel does not compute (``od.sgdw``): the plain
  step.

Oracle: the plain step of the same transformation (``tests.fixtures.plain_step``), to the
kernel tests' tolerance (a few float32 ulp of each array's scale: XLA's plain step fuses
multiply-adds, the kernel rounds each operation as optax writes it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests.fixtures import assert_kernel_close, plain_step
from tests.test_kernel import needs_kernel

MASK = od.exclude_names("bias", "LayerNorm")
# Three distinct multipliers and an excluded leaf (big_vision's rule form).
MULTS = od.decay_multipliers([(".*kernel", 1.0), ("big", 0.3), (".*LayerNorm.*", 0.0)],
                             default=2.5)


def _tree(seed=0):
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {"dense": {"kernel": a(64, 700), "bias": a(700)}, "LayerNorm": {"scale": a(700)},
          "big": a(3000, 40)}


def _grads(params, t, scale):
  return jax.tree.map(lambda x: scale * jnp.cos(x * (t + 2.0)), params)


def _run(step, tx, params, steps, scale, edit=None):
  p, s = params, tx.init(params)
  fn = jax.jit(step)
  for t in range(steps):
    if edit is not None:
      s = edit(s, t)
    p, s = fn(p, _grads(params, t, scale), s)
  return p, s


def _inject_edit(inner_path):
  """Changes lr and λ at step 2 (as a training loop would), through the state."""
  def edit(state, t):
    if t != 2:
      return state
    inj = state[inner_path] if inner_path is not None else state
    hp = dict(inj.hyperparams, learning_rate=jnp.float32(3e-3), weight_decay=jnp.float32(0.3))
    inj = inj._replace(hyperparams=hp)
    if inner_path is None:
      return inj
    return (*state[:inner_path], inj, *state[inner_path + 1:])
  return edit


def _inject():
  return optax.inject_hyperparams(od.adamw, static_args=("mask",))(
      learning_rate=1e-3, weight_decay=0.1, mask=MASK)


CASES = {
    # name: (tx factory, gradient scale, state edit, expected path)
    "clip+adamw, clipping": (lambda: optax.chain(
        optax.clip_by_global_norm(1.0), od.adamw(1e-3, weight_decay=0.1, mask=MASK)),
        1.0, None, "kernel"),
    "clip+adamw, not clipping": (lambda: optax.chain(
        optax.clip_by_global_norm(1e6), od.adamw(1e-3, weight_decay=0.1, mask=MASK)),
        1.0, None, "kernel"),
    "inject(adamw), lr and λ changed": (_inject, 1.0, _inject_edit(None), "kernel"),
    "clip+inject(adamw)": (lambda: optax.chain(optax.clip_by_global_norm(0.5), _inject()),
                           1.0, _inject_edit(1), "kernel"),
    "optax.adamw, callable mask": (lambda: optax.adamw(
        1e-3, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        1.0, None, "kernel"),
    "optax.adamw, schedule": (lambda: optax.adamw(
        optax.cosine_decay_schedule(1e-2, 4), weight_decay=0.1), 1.0, None, "kernel"),
    "clip+optax.adamw": (lambda: optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(1e-3, weight_decay=0.1)),
        1.0, None, "kernel"),
    "od.bert_adamw (no bias correction)": (lambda: od.bert_adamw(1e-3, 0.1), 1.0, None,
                                           "kernel"),
    "od.adam_l2 (λθ added to g)": (lambda: od.adam_l2(1e-3, weight_decay=0.1, mask=MASK), 1.0,
                                   None, "kernel"),
    "clip+od.adam_l2": (lambda: optax.chain(optax.clip_by_global_norm(1.0), od.adam_l2(
        1e-3, weight_decay=0.1)), 1.0, None, "kernel"),
    "od.adamw, decay_multipliers": (lambda: od.adamw(1e-3, weight_decay=0.1, mask=MULTS), 1.0,
                                    None, "kernel"),
    "od.adam_l2, decay_multipliers, schedule": (lambda: od.adam_l2(
        optax.linear_schedule(1e-3, 1e-4, 5), weight_decay=0.1, mask=MULTS), 1.0, None,
        "kernel"),
    "od.adamw, coupling='schedule'": (lambda: od.adamw(
        optax.cosine_decay_schedule(1e-3, 5), weight_decay=0.05, coupling="schedule",
        peak_learning_rate=1e-3, mask=MASK), 1.0, None, "kernel"),
    "od.adamw, coupling='none', multipliers": (lambda: od.adamw(
        1e-3, weight_decay=1e-3, coupling="none", mask=MULTS), 1.0, None, "kernel"),
    "clip+od.adamw, coupling='corrected'": (lambda: optax.chain(
        optax.clip_by_global_norm(1.0), od.adamw(optax.linear_schedule(1e-2, 1e-3, 5),
                                                 weight_decay=0.1, coupling="corrected",
                                                 peak_learning_rate=1e-2)), 1.0, None,
        "kernel"),
    "od.adamw, Nesterov (= optax.nadamw)": (lambda: od.adamw(
        1e-3, weight_decay=0.1, nesterov=True, mask=MASK), 1.0, None, "kernel"),
    "optax.adamw, Nesterov": (lambda: optax.adamw(1e-3, weight_decay=0.1, nesterov=True), 1.0,
                              None, "kernel"),
    "clip+od.adam_l2, Nesterov": (lambda: optax.chain(optax.clip_by_global_norm(1.0), od.adam_l2(
        1e-3, weight_decay=0.1, nesterov=True)), 1.0, None, "kernel"),
    "od.adamw, Nesterov, coupling='schedule'": (lambda: od.adamw(
        optax.cosine_decay_schedule(1e-3, 5), weight_decay=0.05, nesterov=True,
        coupling="schedule", peak_learning_rate=1e-3), 1.0, None, "kernel"),
    "clip+sgdw (the plain step)": (lambda: optax.chain(
        optax.clip_by_global_norm(1.0), od.sgdw(0.1, 0.9, weight_decay=1e-2, mask=MASK)),
        1.0, None, "plain"),
}


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_recipe_takes_the_fast_path_and_equals_the_plain_step(name):
  make, scale, edit, path = CASES[name]
  tx = make()
  params = _tree()
  fast = od.fused_step(tx)
  assert fast.explain(params, params, tx.init(params)).startswith(path)
  p1, s1 = _run(plain_step(tx), tx, params, 5, scale, edit)
  p2, s2 = _run(fast, tx, params, 5, scale, edit)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  assert_kernel_close((p2, s2), (p1, s1), name)


@pytest.mark.slow  # over a second: the quick suite leaves it out
@needs_kernel
def test_clipped_step_in_the_flat_buffer_mode_equals_the_plain_step():
  tx = optax.chain(optax.clip_by_global_norm(1.0), od.adamw(1e-3, weight_decay=0.1, mask=MASK))
  params = _tree()
  layout = od.FlatLayout.of(params)
  state = tx.init(params)
  step = od.fused_step(tx, layout=layout)
  flat, flat_state = layout.pack(params), layout.pack_state(state)
  assert step.explain(flat, flat, flat_state).startswith("kernel")
  p1, s1 = params, state
  for t in range(3):
    g = _grads(params, t, 1.0)
    p1, s1 = jax.jit(plain_step(tx))(p1, g, s1)
    flat, flat_state = jax.jit(step)(flat, layout.pack(g), flat_state)
  assert_kernel_close((layout.unpack(flat), layout.unpack_state(flat_state)), (p1, s1))


@needs_kernel
def test_optax_adamw_with_an_array_zero_decay_adds_zero_times_theta_as_optax_does():
  # optax.add_decayed_weights (optax 0.2.7 and later) skips the term only for a Python 0; an
  # array 0 adds 0·θ, so an infinite weight becomes NaN there (0·inf), and must in the kernel
  # step too. (optax 0.2.6 and earlier add 0·θ for a Python 0 too: the probe check then sees
  # the NaN the kernel would not make, and the step is the plain one.)
  params = {"w": jnp.array([1.0, jnp.inf, -2.0] * 30000, jnp.float32)}
  for weight_decay in (0.0, jnp.float32(0.0)):
    tx = optax.adamw(1e-3, weight_decay=weight_decay)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    why = od.fused_step(tx).explain(params, grads, state)
    assert why.startswith("kernel") or "does not compute what the kernel would" in why, why
    want = jax.jit(plain_step(tx))(params, grads, state)[0]["w"]
    got = jax.jit(od.fused_step(tx))(params, grads, state)[0]["w"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=why)
    if not isinstance(weight_decay, float):  # an array 0 adds 0·θ in every optax release
      assert bool(np.isnan(want).any())

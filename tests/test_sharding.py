"""SPMD on one host: 8 emulated CPU devices, FSDP-style sharded parameters.

JAX fixes the device count at first use and the pytest process has one CPU
device, so the check runs in a subprocess (this file as a script, with
``jax_num_cpu_devices=8``; bounded timeout). For each optimizer it asserts:

* the optimizer state is created *with* the parameters' shardings: ``init``
  is jitted with ``out_shardings`` derived from ``jax.eval_shape(tx.init)`` by
  ``optax.tree_map_params`` (params-shaped state gets the parameter's
  NamedSharding, counters are replicated), and every state leaf ends up with
  exactly the sharding of its parameter;
* the compiled update step contains no cross-device communication: its HLO
  has no all-gather, all-reduce, reduce-scatter, all-to-all or
  collective-permute (masks are resolved at trace time and every op is
  elementwise per leaf);
* three sharded steps give bit for bit the parameters and state of the same
  three steps on a single device;
* ``jax.jit(tx.init)(params)``, without ``out_shardings``, returns the moments of every
  alias with the parameters' shardings (optax.adamw's do not: the contrast).

A negative control (``optax.clip_by_global_norm`` in front, which must reduce
across shards) shows that the HLO check does detect communication.
"""

from __future__ import annotations

import pytest

from tests.fixtures import run_script

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
NAMES = ("adamw", "adam_l2", "sgd_l2", "bert_adamw", "adamw_bf16_sr")


def _worker() -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
  import warnings

  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_decoupled as od

  warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
  assert len(jax.devices()) == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("fsdp",))
  rng = np.random.default_rng(0)

  def host_params(dtype):
    return {
        "embed": {"embedding": rng.normal(size=(64, 16)).astype(dtype)},
        "layer": {"kernel": rng.normal(size=(16, 32)).astype(dtype),
                  "bias": rng.normal(size=(32,)).astype(dtype),
                  "LayerNorm": {"scale": (1 + 0.1 * rng.normal(size=(16,))).astype(dtype)}},
        "head": {"kernel": rng.normal(size=(32, 10)).astype(dtype),  # 10: not divisible by 8
                 "bias": rng.normal(size=(10,)).astype(dtype)},
    }

  specs = {
      "embed": {"embedding": P("fsdp", None)},
      "layer": {"kernel": P(None, "fsdp"), "bias": P("fsdp"), "LayerNorm": {"scale": P("fsdp")}},
      "head": {"kernel": P("fsdp", None), "bias": P()},
  }
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())
  mask = od.exclude_names(*od.BERT_EXCLUDE)
  lr = optax.cosine_decay_schedule(1e-2, 100)
  optimizers = {
      "adamw": (od.adamw(lr, weight_decay=0.05, mask=mask), np.float32),
      "adam_l2": (od.adam_l2(1e-2, weight_decay=1e-3, mask=mask), np.float32),
      "sgd_l2": (od.sgd_l2(0.1, momentum=0.9, weight_decay=1e-3, mask=od.min_ndim(2)),
                 np.float32),
      "bert_adamw": (od.bert_adamw(1e-2), np.float32),
      "adamw_bf16_sr": (od.stochastic_rounding(optax.chain(
          od.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32),
          od.add_decoupled_decay(0.05, mask), optax.scale_by_learning_rate(lr))), jnp.bfloat16),
  }
  assert tuple(optimizers) == NAMES

  for name, (tx, dtype) in optimizers.items():
    hp = host_params(dtype)
    grads = [jax.tree.map(lambda x, dt=dtype: rng.normal(size=x.shape).astype(dt), hp)
             for _ in range(3)]

    def step(params, state, g, tx=tx):
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state

    # -- sharded run
    params = jax.device_put(hp, shardings)
    abstract = jax.eval_shape(tx.init, params)
    state_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract, shardings, transform_non_params=lambda _: replicated)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    # every params-shaped state leaf carries its parameter's sharding
    checked = optax.tree_map_params(
        tx, lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, shardings,
        transform_non_params=lambda x: x.sharding.is_equivalent_to(replicated, x.ndim))
    assert all(jax.tree.leaves(checked)), f"{name}: state shardings {checked}"
    n_param_like = sum(1 for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract))
                       if a.ndim >= 1 and a.shape[0] in (64, 16, 32, 10))
    assert n_param_like >= len(jax.tree.leaves(hp)), name

    jstep = jax.jit(step, in_shardings=(shardings, state_shardings, shardings),
                    out_shardings=(shardings, state_shardings))
    hlo = jstep.lower(params, state, jax.device_put(grads[0], shardings)).compile().as_text()
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"{name}: the compiled update communicates: {found}"
    for g in grads:
      params, state = jstep(params, state, jax.device_put(g, shardings))
    assert all(p.sharding.is_equivalent_to(s, p.ndim) for p, s in
               zip(jax.tree.leaves(params), jax.tree.leaves(shardings))), name

    # -- single-device run, same data
    dev0 = jax.devices()[0]
    p1 = jax.device_put(hp, dev0)
    s1 = jax.jit(tx.init)(p1)
    for g in grads:
      p1, s1 = jax.jit(step)(p1, s1, jax.device_put(g, dev0))
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p1, s1))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    print("OK", name, flush=True)

  # Negative control: the HLO check does see communication when there is some. A global
  # gradient-norm clip reduces over every shard, so its compiled update must all-reduce.
  tx = optax.chain(optax.clip_by_global_norm(1.0), od.adamw(1e-2, weight_decay=0.05, mask=mask))
  params = jax.device_put(host_params(np.float32), shardings)
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract, shardings, transform_non_params=lambda _: replicated)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  hlo = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(params, state, params).compile().as_text()
  assert any(c in hlo for c in COLLECTIVES), "negative control: expected a collective"
  print("OK control", flush=True)

  from optax_decoupled import _sharding
  if not _sharding.TIES_STATE:  # a jax without shard_alike: nothing ties the state (documented)
    return
  # init under plain jax.jit (no out_shardings): every od alias places its parameter-shaped
  # state like the parameters. optax.adamw's init is the contrast: its zeros_like moments do
  # not read θ, so XLA puts them on one device (the check below can fail).
  auto_mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
  auto = jax.tree.map(lambda s: NamedSharding(auto_mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))
  params = jax.device_put(host_params(np.float32), auto)
  aliases = {
      "adamw": od.adamw(1e-2, weight_decay=0.05, mask=mask),
      "adamw-schedule": od.adamw(lr, weight_decay=1e-4, coupling="schedule",
                                 peak_learning_rate=1e-2),
      "adam_l2": od.adam_l2(1e-2, weight_decay=1e-3),
      "sgd_l2": od.sgd_l2(0.1, 0.9, weight_decay=1e-3),
      "sgdw": od.sgdw(0.1, 0.9, weight_decay=1e-4),
      "bert_adamw": od.bert_adamw(1e-2),
  }

  def placed_like_params(tx, state):
    ok = optax.tree_map_params(
        tx, lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, auto,
        transform_non_params=lambda _: True)
    return all(jax.tree.leaves(ok))

  for name, tx in aliases.items():
    state = jax.jit(tx.init)(params)
    assert placed_like_params(tx, state), f"{name}: jit(init) state not sharded like params"
    u, _ = jax.jit(tx.update)(params, state, params)  # and the state works in a step
  tx = optax.adamw(1e-2)
  assert not placed_like_params(tx, jax.jit(tx.init)(params)), "contrast: optax.adamw"
  print("OK init", flush=True)


@pytest.mark.slow  # runs in a fresh process
def test_fsdp_sharded_update_has_no_communication_and_equals_single_device():
  from optax_decoupled import _sharding
  placed = ["init"] if _sharding.TIES_STATE else []  # else: jit(init) is not tied (documented)
  assert run_script(__file__) == [*NAMES, "control", *placed]


if __name__ == "__main__":
  _worker()

"""The chunk loop of ``od.fused_step(tx, kernel="off")`` runs the whole tree's one trace.

Claim: the pure-JAX chunk path traces ``tx.update`` once, on the real tree, whatever the
number of large leaves (its checks, its loops and its plain fallback share that trace),
splits that program per leaf and runs each large leaf's part on chunks, and still computes
exactly what ``tx.update`` + ``optax.apply_updates`` computes: with name, ndim and
multiplier masks, masks that read shapes and sizes (they decide on the real leaves),
constant arrays of a leaf's size (read chunk by chunk), custom-derivative functions,
schedules, Nesterov, ``optax.inject_hyperparams``, inside ``jax.shard_map``. What cannot be
split per leaf (an array shared by several leaves) or is not elementwise on a large leaf
takes the plain step, and ``explain`` says why.

Oracles:
* the plain step, ``tx.update`` + ``optax.apply_updates`` of the same transformation (optax's
  own application), on trees with many large leaves, ragged tails, small leaves and masks;
* the number of ``tx.update`` calls made while tracing the step (a wrapping transformation
  counts them), and the size of the traced step's program, for 10 and 40 large leaves: no
  timing here (``benchmarks/bench_compile.py --chunks`` measures the trace time).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from optax_decoupled import _step_trace
from tests.fixtures import assert_fused_equals_plain, plain_step, run_script

CHUNK = 1024
MIN_LEAF = 4096


def _tree(layers, seed=0):
  """``layers`` blocks of large leaves (ragged, an exact multiple of the chunk, 3-D) and
  small ones (biases, a LayerNorm scale, a scalar)."""
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  tree = {f"layer_{i}": {"kernel": a(4, 1100 + i), "bias": a(1100 + i)} for i in range(layers)}
  tree["embedding"] = {"embedding": a(2, 3, 1500)}  # 3-D, ragged
  tree["head"] = {"kernel": a(8192), "bias": a(3)}  # an exact multiple of the chunk
  tree["LayerNorm"] = {"scale": a(1100), "temperature": a()}
  return tree


TRANSFORMS = {
    "od.adamw, name mask": lambda: od.adamw(
        1e-2, weight_decay=1e-1, mask=od.exclude_names("bias", "LayerNorm")),
    "od.adamw, ndim mask, schedule, Nesterov": lambda: od.adamw(
        optax.cosine_decay_schedule(1e-2, 10), weight_decay=1e-1, mask=od.min_ndim(2),
        nesterov=True),
    "od.sgdw, momentum": lambda: od.sgdw(1e-2, momentum=0.9, weight_decay=1e-3),
    "od.sgdw, Nesterov, no coupling": lambda: od.sgdw(
        1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3, coupling="none"),
    "optax.adamw": lambda: optax.adamw(1e-2, weight_decay=1e-1),
    "inject_hyperparams(od.adamw)": lambda: optax.inject_hyperparams(od.adamw)(
        learning_rate=1e-2, weight_decay=1e-1),
    "od.adamw, decay multipliers": lambda: od.adamw(
        1e-2, weight_decay=1e-1,
        mask=od.decay_multipliers([(".*head/kernel", 2.0), (".*/kernel", 1.0)], default=0.0)),
    # The new state reads θ (λθ enters the momentum / the moments): the loop carries each
    # chunk's θ as it was before the chunk is written.
    "od.sgd_l2, momentum (state reads θ)": lambda: od.sgd_l2(
        1e-2, momentum=0.9, weight_decay=1e-2, mask=od.min_ndim(2)),
    "od.adam_l2, Nesterov (state reads θ)": lambda: od.adam_l2(
        1e-3, nesterov=True, weight_decay=1e-2),
    # A cond over every leaf, inlined as a select per output; the new moments read the
    # accumulated gradient, another state leaf. Three steps: the third is a boundary step.
    "optax.MultiSteps(od.adamw, 3)": lambda: optax.MultiSteps(
        od.adamw(1e-2, weight_decay=1e-1), 3),
    # Reductions to a scalar, taken in one pass over the whole arrays before the loops: a
    # global-norm clip in front of a longer chain, one after the optimizer (of the updates,
    # so of m, v and g; small max_norm: it clips), and LAMB's per-leaf trust ratios.
    "clip, then scale_by_adam, decay, scale": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.add_decayed_weights(1e-2),
        optax.scale(-1e-2)),
    "od.adamw, then a clip of the updates": lambda: optax.chain(
        od.adamw(1e-2, weight_decay=1e-1), optax.clip_by_global_norm(1e-3)),
    "optax.lamb": lambda: optax.lamb(1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_chunk_path_with_many_large_leaves_equals_the_plain_step(name):
  tx = TRANSFORMS[name]()
  params = _tree(layers=8)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  assert step.explain(params, params, state).startswith("chunks")
  # ... from the whole tree's one program, split per leaf (not the per-leaf traces).
  tree = _step_trace.StepTree(params, params, state, MIN_LEAF)
  assert len(tree.big) == 10
  assert _step_trace.analysis(tx, tree).mixes_leaves(tree) is None
  _assert_equals_the_plain_step(tx, step, params, state)


def _assert_equals_the_plain_step(tx, step, params, state):
  assert_fused_equals_plain(tx, step, params, state)


def test_an_array_shared_by_several_leaves_takes_the_plain_path():
  # One (1,) array multiplies every non-scalar leaf: the program does not split per leaf, so
  # the step is the plain one, and explain says why (oracle: the plain step).
  def shared_scale():
    def update(updates, state, params=None):
      half = jnp.full((1,), 0.5, jnp.float32)
      return jax.tree.map(lambda u: u * half if u.ndim else u * 0.5, updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  tx = optax.chain(shared_scale(), od.adamw(1e-2, weight_decay=1e-1))
  params = _tree(layers=3)
  state = tx.init(params)
  tree = _step_trace.StepTree(params, params, state, MIN_LEAF)
  assert "feeds several leaves" in _step_trace.analysis(tx, tree).mixes_leaves(tree)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  why = step.explain(params, params, state)
  assert why.startswith("plain") and "does not split per leaf" in why
  _assert_equals_the_plain_step(tx, step, params, state)


MASKS_READING_SHAPES = {
    # Decay a leaf when it is five times smaller than the largest leaf: on the real tree the
    # 1100-element leaves are (largest: 9000 elements); among chunks of 1024 they would not be.
    "size against the largest leaf": lambda params: jax.tree.map(
        lambda x, largest=max(x.size for x in jax.tree.leaves(params)): x.size * 5 < largest,
        params),
    # The large kernels are (4, 1100 + i): a chunk is (1, 1024), so a chunk would not decay.
    "a large leaf's first axis": lambda params: jax.tree.map(
        lambda x: x.ndim == 2 and x.shape[0] == 4, params),
}


@pytest.mark.parametrize("name", list(MASKS_READING_SHAPES))
def test_a_mask_reading_shapes_decides_on_the_real_leaves(name):
  # The program is traced on the real tree, so the mask sees the real shapes and sizes; the
  # chunk loop runs its decisions (oracle: the plain step, which runs the same mask).
  tx = od.adamw(1e-2, weight_decay=1e-1, mask=MASKS_READING_SHAPES[name])
  params = _tree(layers=3)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  assert step.explain(params, params, state).startswith("chunks")
  _assert_equals_the_plain_step(tx, step, params, state)


def _ramp(flat):
  """Multiplies each leaf by a ramp over its elements made with numpy from its shape: a
  constant of the traced program (of the leaf's shape, or flat and reshaped in the trace)."""
  def update(updates, state, params=None):
    def one(x):
      ramp = np.linspace(0.5, 1.5, x.size, dtype=np.float32)
      return x * (jnp.reshape(ramp, x.shape) if flat else ramp.reshape(x.shape))
    return jax.tree.map(one, updates), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


@pytest.mark.parametrize("flat", [False, True], ids=["leaf-shaped", "flat, reshaped"])
def test_a_constant_array_of_a_leaf_size_is_read_chunk_by_chunk(flat):
  # Each chunk reads its own part of the ramp (the per-leaf traces once gave every chunk
  # the same ramp, silently). Oracle: the plain step.
  tx = optax.chain(_ramp(flat), optax.sgd(0.1, momentum=0.9))
  params = _tree(layers=2)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  assert step.explain(params, params, state).startswith("chunks")
  _assert_equals_the_plain_step(tx, step, params, state)


def test_a_constant_of_another_size_on_a_large_leaf_takes_the_plain_path():
  # A row broadcast over a (4, 1100) kernel is not elementwise over the leaf's elements:
  # plain path, and explain says which leaf (oracle: the plain step).
  def row_scale():
    def update(updates, state, params=None):
      return jax.tree.map(
          lambda x: x * np.linspace(0.5, 1.5, x.shape[-1], dtype=np.float32)
          if x.ndim == 2 else x, updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  tx = optax.chain(row_scale(), optax.sgd(0.1))
  params = _tree(layers=2)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  why = step.explain(params, params, state)
  assert why.startswith("plain") and "chunk by chunk" in why and "['layer_0']" in why, why
  _assert_equals_the_plain_step(tx, step, params, state)


def _softplus_scaled():
  """Scales each update by softplus(θ): jax.nn.softplus is a custom-derivative call."""
  def update(updates, state, params):
    return jax.tree.map(lambda u, p: u * jax.nn.softplus(p), updates, params), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_custom_derivative_calls_run_on_chunks_and_the_step_differentiates_the_plain_one():
  # The loop runs a custom_jvp call's primal program; the step's derivative is the plain
  # step's (oracle: jax.jvp of the plain step, here through softplus's custom rule).
  tx = optax.chain(_softplus_scaled(), od.adamw(1e-2, weight_decay=1e-1))
  params = _tree(layers=2)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  assert step.explain(params, params, state).startswith("chunks")
  _assert_equals_the_plain_step(tx, step, params, state)
  tangent = jax.tree.map(jnp.ones_like, params)
  got = jax.jit(lambda p, t: jax.jvp(lambda q: step(q, params, state)[0], (p,), (t,)))(
      params, tangent)
  want = jax.jit(lambda p, t: jax.jvp(lambda q: plain_step(tx)(q, params, state)[0], (p,),
                                      (t,)))(params, tangent)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_grad_through_the_chunk_loop_is_the_plain_steps_grad():
  # Meta-learning differentiates through the step (with respect to θ and g). Without a
  # custom rule inside, the chunk loop is differentiated itself: the same operations, so
  # the same derivative (oracle: jax.grad of the plain step).
  # A state a few steps in: at the first step Adam's update is about -lr·sign(g), whose
  # derivative in g cancels to rounding noise.
  tx = od.adamw(1e-2, weight_decay=1e-1, mask=od.exclude_names("bias"))
  params = _tree(layers=2)
  state = tx.init(params)
  for seed in range(3):
    noise = _tree(layers=2, seed=seed + 1)
    params, state = jax.jit(plain_step(tx))(params, noise, state)
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x), params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  assert step.explain(params, grads, state).startswith("chunks")

  def loss(p, g, step):
    new = step(p, g, state)[0]
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(new))

  got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, grads, step)
  want = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, grads,
                                                                   plain_step(tx))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_a_global_norm_is_one_pass_before_the_loops_and_no_second_trace():
  # optax.clip_by_global_norm in front of od.sgdw: tx.update itself is traced once (the
  # norm is a value of that program, evaluated on the whole gradient before the loops), and
  # the accelerator branch shares that trace. Oracle: the plain step.
  calls = []
  tx = _counting(optax.chain(optax.clip_by_global_norm(0.5),
                             od.sgdw(1e-2, momentum=0.9, weight_decay=1e-2)), calls)
  params = _tree(layers=3)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  why = step.explain(params, params, state)
  assert why.startswith("chunks") and "reduced over whole arrays" in why, why
  jax.jit(step).trace(params, params, state)
  assert len(calls) == 1
  _assert_equals_the_plain_step(tx, step, params, state)


def _counting(tx, calls):
  """``tx`` whose ``update`` appends to ``calls`` each time it is traced or run."""

  def update(updates, state, params=None):
    calls.append(1)
    return tx.update(updates, state, params)

  return optax.GradientTransformation(tx.init, update)


def _traced(layers, calls):
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(layers))
  tx = _counting(od.adamw(1e-2, weight_decay=1e-1, mask=od.exclude_names("bias")), calls)
  state = jax.eval_shape(tx.init, params)
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF)
  return jax.jit(step).trace(params, params, state).jaxpr


def _equations(jaxpr, seen=None) -> int:
  """Equations of a traced program, each sub-program counted once (a shared one too)."""
  seen = set() if seen is None else seen
  count = len(jaxpr.eqns)
  for eqn in jaxpr.eqns:
    values = list(eqn.params.values())
    values += [b for v in values if isinstance(v, (tuple, list)) for b in v]
    subs = [getattr(v, "jaxpr", v) for v in values if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
    for sub in subs:
      if id(sub) not in seen:
        seen.add(id(sub))
        count += _equations(sub, seen)
  return count


def test_trace_work_does_not_grow_faster_than_the_leaves():
  small_calls, big_calls = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", od.LowPrecisionDecayWarning)
    small = _traced(10, small_calls)
    big = _traced(40, big_calls)
  # tx.update is traced once, on the whole tree: the plan's checks, the loops and the plain
  # fallback share that trace (not per large leaf, which was 3 per large leaf and more).
  assert len(small_calls) == len(big_calls) == 1
  # The traced step grows at most linearly: 4x the leaves, at most 4x the equations (each
  # leaf's loop body reads only its own slice, not a tree of stand-ins for every other leaf).
  assert _equations(big.jaxpr) <= 4 * _equations(small.jaxpr)


def test_plain_step_reuses_the_whole_tree_trace():
  # _chunks.plain_step runs the jitted program whose trace whole_program analysed: with the
  # same avals jax.jit's cache answers and tx.update is not traced again (the hook through
  # which fused_step's plain fallback can share the planning trace). Oracle: the plain step.
  calls = []
  tx = _counting(od.sgdw(1e-2, momentum=0.9, weight_decay=1e-3), calls)
  params = _tree(layers=2)
  state = tx.init(params)
  _step_trace.whole_program(tx, _step_trace.StepTree(params, params, state))
  assert len(calls) == 1
  jax.make_jaxpr(lambda p, g, s: _step_trace.plain_step(tx, p, g, s))(params, params, state)
  assert len(calls) == 1
  got = jax.jit(lambda p, g, s: _step_trace.plain_step(tx, p, g, s))(params, params, state)
  want = jax.jit(plain_step(tx))(params, params, state)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_trace_cache_does_not_keep_the_transformation_alive():
  # The traces are cached per transformation, keyed weakly by tx.update; the cached program
  # holds tx.update weakly too, so dropping the transformation drops its traces.
  tx = od.adamw(1e-2, weight_decay=1e-1)
  params = _tree(layers=2)
  state = tx.init(params)
  od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=MIN_LEAF).explain(
      params, params, state)
  update = weakref.ref(tx.update)
  assert update() in _step_trace._TRACES
  del tx, state
  gc.collect()
  assert update() is None


def _worker() -> None:
  """Inside ``jax.shard_map`` (default ``check_vma=True``, 4 emulated devices): the traced
  programs keep the inputs' varying axes, so the chunk path's split program binds on the
  per-shard values (scalar hyperparameters unvarying, leaves varying)."""
  jax.config.update("jax_num_cpu_devices", 4)
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  params = {f"layer_{i}": {"kernel": jnp.asarray(rng.normal(size=(4, 1100 + i)), jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
            for i in range(3)}
  tx = optax.inject_hyperparams(od.adamw)(learning_rate=1e-2, weight_decay=0.1)
  state = tx.init(params)
  specs = jax.tree.map(lambda x: P("fsdp") if np.ndim(x) else P(), state)

  def mapped(step):
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("fsdp"), P("fsdp"), specs),
                                 out_specs=(P("fsdp"), specs)))

  grads = jax.tree.map(lambda x: jnp.sin(3.0 * x), params)
  args = jax.device_put((params, grads, state), (NamedSharding(mesh, P("fsdp")),) * 2 + (
      jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)),))
  # Per shard the kernels are (1, 1100+i): min_leaf_size=1024 makes them large leaves.
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=CHUNK)
  got, want = mapped(step)(*args), mapped(plain_step(tx))(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
  print("OK shard_map", flush=True)


def test_chunk_path_inside_shard_map_equals_the_plain_step():
  assert run_script(__file__) == ["shard_map"]


if __name__ == "__main__":
  _worker()

"""What makes the step fast, asserted structurally (no timing here; see benchmarks/).

* The plain jitted, donated ``od.adamw`` step compiles to exactly as many full-size passes as
  ``optax.adamw`` (three on XLA:CPU: m, v and θ; XLA:CPU has no multi-output loop fusion), so
  composing our transforms costs nothing over optax's own chain.
* ``od.fused_step``'s pure-JAX path (``kernel="off"``, and the fallback wherever the C++
  kernel is not built or does not apply) moves every full-size pass into one in-place chunk
  loop per leaf: no full-size fusion outside the loop, no full-size copy anywhere, three
  in-place dynamic-update-slice fusions (θ, m, v) per loop iteration. (The kernel path is
  tested in ``test_kernel.py``.)
* Neither step recompiles across steps or across changes of injected hyperparameters.
* With donation, the compiled step's peak memory is θ + g + m + v plus a constant (no
  full-size temporary): from ``compiled.memory_analysis()``.
* ``od.fused_step`` equals ``tx.update`` + ``optax.apply_updates`` (the oracle: optax's own
  application of the same transformation) to float32 round-off.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_decoupled as od
from tests.fixtures import assert_fused_equals_plain, plain_step

N = 2**20 + 12_345  # one large leaf with a ragged tail (not a multiple of the chunk size).
CHUNK = 65_536


def _compile(step, params, grads, state):
  return jax.jit(step, donate_argnums=(0, 2)).lower(params, grads, state).compile()


def _problem(n=N):
  params = {"kernel": jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)}
  grads = {"kernel": jnp.cos(jnp.arange(n, dtype=jnp.float32))}
  return params, grads


def _computations(hlo: str) -> dict[str, str]:
  """Splits HLO text into {computation name: body}."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%(\S+) ", line)
    if m and line.rstrip().endswith("{"):
      name, lines = ("ENTRY" if m.group(1) else m.group(2)), []
    elif line.startswith("}") and name is not None:
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def _full_size_ops(body: str, op: str, n: int = N) -> list[str]:
  """Instructions of kind ``op`` (e.g. 'fusion', 'copy') whose result has n elements (of
  any shape: a 2-D leaf's buffer is f32[r,c], its flat view f32[r·c])."""
  pat = re.compile(rf"= f32\[([\d,]+)\]\{{[\d,]*\}} {op}\(")
  return [line for line in body.splitlines()
          if (m := pat.search(line)) and math.prod(int(d) for d in m.group(1).split(",")) == n]


def test_plain_step_has_as_many_full_size_passes_as_optax():
  params, grads = _problem()
  counts = {}
  for name, tx in [("od", od.adamw(1e-3, weight_decay=1e-2)),
                   ("optax", optax.adamw(1e-3, weight_decay=1e-2))]:
    hlo = _compile(plain_step(tx), params, grads, tx.init(params)).as_text()
    entry = _computations(hlo)["ENTRY"]
    counts[name] = len(_full_size_ops(entry, "fusion"))
    assert not _full_size_ops(hlo, "copy"), f"{name}: a full-size copy defeats donation"
  # XLA:CPU emits one loop fusion per output array (m, v, θ): 3 passes, 10 array streams.
  assert counts["od"] == counts["optax"] == 3


@pytest.mark.parametrize("shape, tx_name", [
    ((N,), "adamw"), ((N // 239, 239), "adamw"), ((23, 193, 239), "adamw"), ((N,), "adam_l2"),
    ((23, 193, 239), "adam_l2"), ((23, 193, 239), "multisteps"),
    ((23, 193, 239), "clip_after")])  # N = 23·193·239
def test_fused_step_is_one_in_place_chunk_loop(shape, tx_name):
  # A ragged last chunk (N is not a multiple of CHUNK) on a 1-, 2- and 3-D leaf: a static
  # offset into the reshaped 2-D buffer once made XLA copy it whole. With coupled L2 the new
  # moments read θ, with optax.MultiSteps the accumulated gradient: the loop carries each
  # chunk's old values, still without a full-size copy. A clip of the updates after the
  # optimizer reads m, v and g in one pass before the loop, which then writes m and v in
  # place: still no copy.
  params, grads = jax.tree.map(lambda x: x.reshape(shape), _problem())
  tx = {"adamw": lambda: od.adamw(1e-3, weight_decay=1e-2),
        "adam_l2": lambda: od.adam_l2(1e-3, weight_decay=1e-2),
        "multisteps": lambda: optax.MultiSteps(od.adamw(1e-3, weight_decay=1e-2), 3),
        "clip_after": lambda: optax.chain(od.adamw(1e-3, weight_decay=1e-2),
                                          optax.clip_by_global_norm(1e-3))}[tx_name]()
  step = od.fused_step(tx, kernel="off", chunk_size=CHUNK, min_leaf_size=CHUNK)
  hlo = _compile(step, params, grads, tx.init(params)).as_text()
  comps = _computations(hlo)
  assert not _full_size_ops(hlo, "copy"), "a full-size copy: the loop is not in place"
  assert hlo.count(" while(") == 1
  bodies = [b for name, b in comps.items()
            if re.search(r"while\(.*body=%" + re.escape(name) + r"\b", hlo)]
  assert len(bodies) == 1
  # θ and each state array (m and v; and the accumulated gradient for MultiSteps) are each
  # written once per chunk, in place (a dynamic-update-slice fusion of the full buffer);
  # nothing else in the loop touches a full-size array.
  body_fusions = _full_size_ops(bodies[0], "fusion")
  assert len(body_fusions) == (4 if tx_name == "multisteps" else 3)
  assert all("dynamic-update-slice" in line for line in body_fusions)
  # Outside the loop nothing touches the full buffers (the ragged chunk is in the loop).
  assert not _full_size_ops(comps["ENTRY"], "fusion")


def _array_ops(tx, params) -> collections.Counter:
  """Multiset of (result shape, opcode) of every non-scalar instruction of the compiled step,
  fused computations included (names and metadata dropped)."""
  grads = jax.tree.map(jnp.ones_like, params)
  hlo = _compile(plain_step(tx), params, grads, tx.init(params)).as_text()
  ops = collections.Counter()
  for line in hlo.splitlines():
    m = re.match(r"\s+(?:ROOT )?%\S+ = (\S+) ([\w-]+)\(", line)
    if m and not m.group(1).endswith("[]"):
      ops[(m.group(1), m.group(2))] += 1
  return ops


@pytest.mark.parametrize("name", ["adamw", "adam_l2", "adamw masked"])
def test_composition_is_free_same_array_instructions_as_optax(name):
  """The od chain compiles to the same array instructions as optax's own equivalent (only the
  scalar step counter of the decay transform is extra): composition costs nothing."""
  params = {"dense": {"kernel": jnp.ones((1000, 1003)), "bias": jnp.ones(1003)}}
  if name == "adamw":
    ours, theirs = od.adamw(1e-3, weight_decay=1e-2), optax.adamw(1e-3, weight_decay=1e-2)
  elif name == "adam_l2":
    ours = od.adam_l2(1e-3, weight_decay=1e-2)
    # optax has no Adam+L2 alias; this is its spelling of torch's Adam(weight_decay).
    theirs = optax.chain(optax.add_decayed_weights(1e-2), optax.scale_by_adam(),
                         optax.scale_by_learning_rate(1e-3))
  else:
    mask = od.exclude_names("bias")
    ours = od.adamw(1e-3, weight_decay=1e-2, mask=mask)
    theirs = optax.adamw(1e-3, weight_decay=1e-2, mask=mask)
  assert _array_ops(ours, params) == _array_ops(theirs, params)


def test_mask_is_free_masked_step_has_no_more_array_instructions():
  params = {"dense": {"kernel": jnp.ones((1000, 1003)), "bias": jnp.ones(1003)}}
  masked = _array_ops(od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias")), params)
  unmasked = _array_ops(od.adamw(1e-3, weight_decay=1e-2), params)
  assert sum(masked.values()) < sum(unmasked.values())
  assert not any(op == "select" for (_, op) in masked - unmasked)  # no per-element select


@pytest.mark.parametrize("kind", ["plain", "chunks", "kernel"])
def test_donated_step_peak_memory_is_theta_g_m_v_plus_constant(kind):
  params, grads = _problem()
  tx = od.adamw(1e-3, weight_decay=1e-2)
  step = (plain_step(tx) if kind == "plain" else od.fused_step(
      tx, kernel="off" if kind == "chunks" else "auto", chunk_size=CHUNK,
      min_leaf_size=CHUNK))
  ma = _compile(step, params, grads, tx.init(params)).memory_analysis()
  minimum = 16 * N  # θ, g, m, v in float32
  peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)
  # θ, m, v are donated and aliased to the outputs: only g and scalars are not.
  assert ma.alias_size_in_bytes >= 12 * N
  assert peak - minimum <= 8 * 4 * CHUNK + 4096, (peak, minimum)
  assert ma.temp_size_in_bytes <= 8 * 4 * CHUNK + 4096


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_no_recompilation_across_steps_or_injected_hyperparameters(kind):
  params, grads = _problem(3 * 4096 + 7)
  tx = optax.inject_hyperparams(od.adamw)(learning_rate=1e-3, weight_decay=1e-2)
  traces = []

  def traced(p, g, s):
    traces.append(1)  # runs once per trace, i.e. per compilation
    step = (plain_step(tx) if kind == "plain"
            else od.fused_step(tx, chunk_size=4096, min_leaf_size=4096))
    return step(p, g, s)

  fn = jax.jit(traced, donate_argnums=(0, 2))
  p, s = params, tx.init(params)
  for t in range(6):
    s.hyperparams["learning_rate"] = jnp.asarray(1e-3 / (t + 1), jnp.float32)
    s.hyperparams["weight_decay"] = jnp.asarray(1e-2 * (t % 3), jnp.float32)
    p, s = fn(p, grads, s)
  jax.block_until_ready(p)
  assert len(traces) == 1
  assert fn._cache_size() == 1


def _tree(seed=0):
  rng = np.random.default_rng(seed)

  def a(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  # leaves below, at, and above the chunk size, with ragged tails and several ndims.
  return {"encoder": {"kernel": a(33, 200), "bias": a(200)},
          "LayerNorm": {"scale": a(4096), "bias": a(7)},
          "embedding": {"embedding": a(3, 5, 1001)},
          "head": a(9000)}


TRANSFORMS = {
    "od.adamw masked, schedule": lambda: od.adamw(
        optax.cosine_decay_schedule(1e-2, 10), weight_decay=1e-1, mask=od.min_ndim(2)),
    "od.bert_adamw": lambda: od.bert_adamw(1e-2, weight_decay=1e-1),
    "od.adamw schedule-coupled": lambda: od.adamw(
        optax.cosine_decay_schedule(1e-2, 10), weight_decay=1e-3, coupling="schedule",
        peak_learning_rate=1e-2),
    "od.sgdw": lambda: od.sgdw(1e-2, weight_decay=1e-3),
    "od.adam_l2 (moments read θ)": lambda: od.adam_l2(1e-2, weight_decay=1e-1),
    "optax.adamw": lambda: optax.adamw(1e-2, weight_decay=1e-1),
    "inject_hyperparams(od.adamw)": lambda: optax.inject_hyperparams(od.adamw)(
        learning_rate=1e-2, weight_decay=1e-1),
    "od.adamw bf16 moments": lambda: od.adamw(1e-2, weight_decay=1e-1, mu_dtype=jnp.bfloat16),
    # moments kept for a subset of leaves only: not laid out like params, plain path.
    "optax.masked(optax.adam)": lambda: optax.masked(optax.adam(1e-2), od.min_ndim(2)),
}


@pytest.mark.parametrize("kernel", ["auto", "off"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_fused_step_equals_update_then_apply_updates(name, kernel):
  tx = TRANSFORMS[name]()
  params = _tree()
  fused = od.fused_step(tx, kernel=kernel, chunk_size=1024, min_leaf_size=1024)
  assert_fused_equals_plain(tx, fused, params, tx.init(params), steps=4)


def test_fused_step_refuses_a_transform_that_is_not_elementwise():
  # Each row of a matrix scaled by its own norm: a reduction to an array (one norm per
  # row), which no chunk can compute. (Reductions to one scalar, such as a global-norm
  # clip, are taken in one pass before the loops: tests/test_fused_chunks_trace.py.)
  def row_normalized():
    def update(u, s, p=None):
      return jax.tree.map(lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True), u), s
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  tx = optax.chain(row_normalized(), od.adamw(1e-3))
  params = _tree()
  with pytest.raises(ValueError, match="not elementwise"):
    jax.jit(od.fused_step(tx, chunk_size=1024, min_leaf_size=1024))(params, params, tx.init(params))


def test_fused_step_rejects_a_tiny_chunk_size():
  with pytest.raises(ValueError, match="chunk_size"):
    od.fused_step(od.adamw(1e-3), chunk_size=10)
  with pytest.raises(ValueError, match="min_leaf_size"):
    od.fused_step(od.adamw(1e-3), chunk_size=4096, min_leaf_size=100)


def test_fused_step_leaves_small_leaves_to_the_plain_path():
  params, grads = _problem(3 * 4096 + 7)
  tx = od.adamw(1e-3, weight_decay=1e-2)
  step = od.fused_step(tx, kernel="off", chunk_size=4096)
  hlo = _compile(step, params, grads, tx.init(params)).as_text()
  assert " while(" not in hlo  # below the default min_leaf_size: XLA's own fusions


@pytest.mark.filterwarnings("ignore::optax_decoupled.LowPrecisionDecayWarning")
@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_fused_step_leaves_non_float32_leaves_to_the_plain_path(moments):
  # With dtype conversions in the chunk's fusions XLA copied the whole bfloat16 buffer on
  # every loop iteration (1.5 s for a 1e7 step); such leaves take XLA's own fusions instead.
  n = 3 * 4096 + 7
  params = {"kernel": jnp.linspace(-1.0, 1.0, n, dtype=jnp.bfloat16)}
  grads = {"kernel": jnp.cos(jnp.arange(n, dtype=jnp.float32)).astype(jnp.bfloat16)}
  dtype = None if moments == "bfloat16" else jnp.float32
  tx = od.adamw(1e-3, weight_decay=1e-2, mu_dtype=dtype, nu_dtype=dtype)
  step = od.fused_step(tx, kernel="off", chunk_size=4096, min_leaf_size=4096)
  hlo = _compile(step, params, grads, tx.init(params)).as_text()
  assert " while(" not in hlo
  assert not re.search(rf"\[{n}\]\{{0\}} copy\(", hlo)


def _shape_mask(p):
  return jax.tree.map(lambda x: x.shape[0] > 100, p)  # reads the shape, not only ndim


@pytest.mark.parametrize("name", ["od.sgdw", "optax.adamw", "od.adamw-kernel-off", "od.adamw"])
def test_fused_step_with_a_mask_that_reads_shapes_equals_the_plain_step(name):
  # A chunk (1, 32768) or a zero-size stand-in would make this mask drop the decay. The fast
  # path traces the step on the real tree, so the chunk loop runs the real leaves' decisions:
  # the plain step's numbers (oracle: tx.update + optax.apply_updates).
  import warnings

  txs = {"od.sgdw": od.sgdw(0.1, weight_decay=0.1, coupling="none", mask=_shape_mask),
         "optax.adamw": optax.adamw(0.1, weight_decay=0.01, mask=_shape_mask),
         "od.adamw-kernel-off": od.adamw(0.1, weight_decay=0.01, mask=_shape_mask),
         "od.adamw": od.adamw(0.1, weight_decay=0.01, mask=_shape_mask)}
  tx = txs[name]
  params = {"w": jnp.ones((4096, 520)), "b": jnp.ones(8)}
  grads = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off" if name != "od.adamw" else "auto")
  if name != "od.adamw":
    assert step.explain(params, grads, state).startswith("chunks")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "decays no parameter" from stand-ins or chunks
    new_params, _ = jax.jit(step)(params, grads, state)
  u, _ = tx.update(grads, state, params)
  want = optax.apply_updates(params, u)
  np.testing.assert_allclose(new_params["w"], want["w"], rtol=1e-6)
  assert float(want["w"][0, 0]) < 1.0  # the big leaf is decayed


def test_fused_step_refuses_random_draws_from_scalar_keys():
  def noise():
    def update(u, s, p=None):
      key = jax.random.key(0)  # a typed key: every input of the draw is a scalar
      return jax.tree.map(lambda x: x + jax.random.normal(key, x.shape), u), s
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  tx = optax.chain(noise(), optax.sgd(0.1))
  params = {"w": jnp.ones(8)}
  with pytest.raises(ValueError, match="not elementwise"):
    od.fused_step(tx).explain(params, params, tx.init(params))
  iota = optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None: (jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype), u), s))
  with pytest.raises(ValueError, match="'iota'"):
    od.fused_step(iota).explain(params, params, iota.init(params))

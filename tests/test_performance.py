"""What makes the step fast, asserted structurally (no timing here; see benchmarks/).

* The plain jitted, donated ``od.adamw`` step compiles to exactly as many full-size passes as
  ``optax.adamw`` (three on XLA:CPU: m, v and θ; XLA:CPU has no multi-output loop fusion), so
  composing our transforms costs nothing over optax's own chain.
* ``od.fused_step``'s kernel path is one in-place custom call (``test_kernel.py``); every
  other transformation is the plain step (``test_fused_step.py``).
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

N = 2**20 + 12_345  # one large leaf


def _compile(step, params, grads, state):
  return jax.jit(step, donate_argnums=(0, 2)).lower(params, grads, state).compile()


def _problem(n=N):
  params = {"kernel": jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)}
  grads = {"kernel": jnp.cos(jnp.arange(n, dtype=jnp.float32))}
  return params, grads


# HLO-text patterns, tolerant of printer changes across XLA releases: the '%' before names
# is optional, layouts ({0}, {1,0:T(8,128)}) and memory-space suffixes are optional.
_NAME = r"%?[\w.\-]+"
_LAYOUT = r"(?:\{[^}]*\})?"


def _computations(hlo: str) -> dict[str, str]:
  """Splits HLO text into {computation name: body}."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY )?%?(\S+) ", line)
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
  pat = re.compile(rf"= f32\[([\d,]+)\]{_LAYOUT} {op}\(")
  return [line for line in body.splitlines()
          if (m := pat.search(line)) and math.prod(int(d) for d in m.group(1).split(",")) == n]


@pytest.mark.hlo
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


def _array_ops(tx, params) -> collections.Counter:
  """Multiset of (result shape, opcode) of every non-scalar instruction of the compiled step,
  fused computations included (names and metadata dropped)."""
  grads = jax.tree.map(jnp.ones_like, params)
  hlo = _compile(plain_step(tx), params, grads, tx.init(params)).as_text()
  ops = collections.Counter()
  for line in hlo.splitlines():
    m = re.match(rf"\s+(?:ROOT )?{_NAME} = (\w+\[[\d,]*\]){_LAYOUT} ([\w-]+)\(", line)
    if m and not m.group(1).endswith("[]"):
      ops[(m.group(1), m.group(2))] += 1
  assert ops["f32[1000,1003]", "fusion"], "no array fusion parsed: did the HLO printer change?"
  return ops


@pytest.mark.hlo
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


@pytest.mark.hlo
def test_mask_is_free_masked_step_has_no_more_array_instructions():
  params = {"dense": {"kernel": jnp.ones((1000, 1003)), "bias": jnp.ones(1003)}}
  masked = _array_ops(od.adamw(1e-3, weight_decay=1e-2, mask=od.exclude_names("bias")), params)
  unmasked = _array_ops(od.adamw(1e-3, weight_decay=1e-2), params)
  assert sum(masked.values()) < sum(unmasked.values())
  assert not any(op == "select" for (_, op) in masked - unmasked)  # no per-element select


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_donated_step_peak_memory_is_theta_g_m_v_plus_constant(kind):
  params, grads = _problem()
  tx = od.adamw(1e-3, weight_decay=1e-2)
  step = plain_step(tx) if kind == "plain" else od.fused_step(tx)
  ma = _compile(step, params, grads, tx.init(params)).memory_analysis()
  minimum = 16 * N  # θ, g, m, v in float32
  peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)
  # θ, m, v are donated and aliased to the outputs: only g and scalars are not.
  assert ma.alias_size_in_bytes >= 12 * N
  assert peak - minimum <= 4096, (peak, minimum)
  assert ma.temp_size_in_bytes <= 4096


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_no_recompilation_across_steps_or_injected_hyperparameters(kind):
  params, grads = _problem(3 * 4096 + 7)
  tx = optax.inject_hyperparams(od.adamw)(learning_rate=1e-3, weight_decay=1e-2)
  traces = []

  def traced(p, g, s):
    traces.append(1)  # runs once per trace, i.e. per compilation
    step = plain_step(tx) if kind == "plain" else od.fused_step(tx)
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

  # leaves of several sizes and ndims, with a BERT-style mask to decide.
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
  fused = od.fused_step(tx, kernel=kernel)
  assert_fused_equals_plain(tx, fused, params, tx.init(params), steps=4)


def _shape_mask(p):
  return jax.tree.map(lambda x: x.shape[0] > 100, p)  # reads the shape, not only ndim


@pytest.mark.parametrize("name", ["od.sgdw", "optax.adamw", "od.adamw-kernel-off", "od.adamw"])
def test_fused_step_with_a_mask_that_reads_shapes_equals_the_plain_step(name):
  # A zero-size stand-in would make this mask drop the decay; the kernel resolves the mask
  # on the real leaves: the plain step's numbers (oracle: tx.update + optax.apply_updates).
  import warnings

  txs = {"od.sgdw": od.sgdw(0.1, weight_decay=0.1, coupling="none", mask=_shape_mask),
         "optax.adamw": optax.adamw(0.1, weight_decay=0.01, mask=_shape_mask),
         "od.adamw-kernel-off": od.adamw(0.1, weight_decay=0.01, mask=_shape_mask),
         "od.adamw": od.adamw(0.1, weight_decay=0.01, mask=_shape_mask)}
  tx = txs[name]
  params = {"w": jnp.ones((4096, 520)), "b": jnp.ones(8)}
  grads = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  step = od.fused_step(tx, kernel="off" if name.endswith("off") else "auto")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "decays no parameter" from stand-ins
    new_params, _ = jax.jit(step)(params, grads, state)
  u, _ = tx.update(grads, state, params)
  want = optax.apply_updates(params, u)
  np.testing.assert_allclose(new_params["w"], want["w"], rtol=1e-6)
  assert float(want["w"][0, 0]) < 1.0  # the big leaf is decayed

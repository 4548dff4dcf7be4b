"""The kernel step on sharded arrays: per shard, no collective, shardings kept.

``od.fused_step(od.adamw(...))`` under ``jax.jit`` with FSDP-sharded parameters (8 emulated
CPU devices, in a subprocess: JAX fixes the device count at first use). For meshes of both
axis types (``Auto`` and ``Explicit``), the tree mode and the flat-buffer mode (whose shards
cut the packed segments, so each shard must find its own decay flags), it asserts:

* the compiled step calls the kernel and contains no all-gather, all-reduce, reduce-scatter,
  all-to-all or collective-permute;
* parameters and moments come back with the shardings they came in with;
* the result equals, bit for bit, the same kernel step on one device (the kernel rounds
  every operation as written, so the cut into shards cannot change a bit), and the plain
  step ``tx.update`` + ``optax.apply_updates`` (oracle) to the kernel tests' tolerance;
* under ``jax.set_mesh`` with ``Explicit`` axes (array types carry their sharding), the
  step is the plain one, bit for bit, and ``explain`` says why.

And inside ``jax.shard_map`` (default ``check_vma=True``) the kernel step traces, runs the
kernel and equals the plain step.
"""

from __future__ import annotations

import pytest

from tests.fixtures import run_script

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
KERNEL = "optax_decoupled_adam_step"


def _worker() -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P


  import optax_decoupled as od

  assert len(jax.devices()) == 8, jax.devices()
  rng = np.random.default_rng(0)
  # 4096*64 + 56 + 8 = 262208 = 8 * 32776: the last shard of the packed buffer holds the end
  # of "w" (decayed) and all of "bias" (not decayed) and "scale".
  host = {"w": rng.normal(size=(4096, 64)).astype(np.float32),
          "bias": rng.normal(size=(56,)).astype(np.float32),
          "scale": (1 + 0.1 * rng.normal(size=(8,))).astype(np.float32)}
  host_g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), host)
  tx = od.adamw(1e-2, weight_decay=0.1, mask=od.exclude_names("bias"))

  from tests.fixtures import assert_kernel_close as close
  from tests.fixtures import plain_step
  plain = plain_step(tx)

  def equal(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)

  def check_compiled(fn, args, what):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"{what}: the compiled kernel step communicates: {found}"
    assert KERNEL in hlo, f"{what}: the kernel is not called"

  # One-device references: the kernel step and the plain step.
  state0 = tx.init(host)
  one_kernel = jax.jit(od.fused_step(tx))(host, host_g, state0)
  one_plain = jax.jit(plain)(host, host_g, state0)
  close(one_kernel, one_plain, "one device")
  layout = od.FlatLayout.of(host)
  flat_args = (layout.pack(host), layout.pack(host_g), layout.pack_state(state0))
  one_flat = jax.jit(od.fused_step(tx, layout=layout))(*flat_args)

  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    rep = NamedSharding(mesh, P())
    shardings = {"w": NamedSharding(mesh, P("fsdp", None)), "bias": rep, "scale": rep}
    params, grads = jax.device_put(host, shardings), jax.device_put(host_g, shardings)
    state = jax.jit(tx.init)(params)
    step = od.fused_step(tx)
    assert step.explain(params, grads, state).startswith("kernel"), axis_type
    check_compiled(step, (params, grads, state), f"tree {axis_type}")
    new_params, new_state = jax.jit(step)(params, grads, state)
    for tree in (new_params, new_state[0].mu, new_state[0].nu):
      for name, x in tree.items():
        assert x.sharding.is_equivalent_to(shardings[name], x.ndim), (axis_type, name,
                                                                      x.sharding)
    equal((new_params, new_state), one_kernel, f"tree {axis_type} vs one device")

    # The flat-buffer mode: one 1-D buffer sharded in 8, segments cut by the shards.
    cut = NamedSharding(mesh, P("fsdp"))
    n = flat_args[0].shape[0]
    fp, fg = jax.device_put(flat_args[0], cut), jax.device_put(flat_args[1], cut)
    fs = jax.device_put(flat_args[2], jax.tree.map(
        lambda x, cut=cut, n=n, rep=rep: cut if x.shape == (n,) else rep, flat_args[2]))
    fstep = od.fused_step(tx, layout=layout)
    check_compiled(fstep, (fp, fg, fs), f"flat {axis_type}")
    q, qs = jax.jit(fstep)(fp, fg, fs)
    assert q.sharding.is_equivalent_to(cut, 1) and qs[0].mu.sharding.is_equivalent_to(cut, 1)
    equal((q, qs), one_flat, f"flat {axis_type} vs one device")
    close(layout.unpack(q), one_plain[0], f"flat {axis_type} vs plain")

    # Under jax.set_mesh with Explicit axes, array types carry their sharding: the step is
    # the plain one (said by explain), with the plain step's values and shardings.
    if axis_type == AxisType.Explicit:
      with jax.set_mesh(mesh):
        seen = []
        got = jax.jit(lambda p, g, s: (seen.append(step.explain(p, g, s)), step(p, g, s))[1])(
            params, grads, state)
        assert seen[0].startswith("plain") and "set_mesh" in seen[0], seen
        equal(got, jax.jit(plain)(params, grads, state), "set_mesh vs plain")
    print("OK", axis_type.name, flush=True)

  # jax.shard_map with its default check_vma=True: the kernel's results vary like its inputs.
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  only_w = {"w": host["w"]}
  tx_w = od.adamw(1e-2, weight_decay=0.1)
  state_w = tx_w.init(only_w)
  specs = jax.tree.map(lambda x: P("fsdp") if np.ndim(x) else P(), state_w)

  def mapped(step):
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("fsdp"), P("fsdp"), specs),
                                 out_specs=(P("fsdp"), specs)))

  args = jax.device_put((only_w, {"w": host_g["w"]}, state_w),
                        (NamedSharding(mesh, P("fsdp")),) * 2 + (
                            jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                         is_leaf=lambda x: isinstance(x, P)),))
  kernel_fn = mapped(od.fused_step(tx_w))
  assert KERNEL in kernel_fn.lower(*args).as_text()
  close(kernel_fn(*args), mapped(plain_step(tx_w))(*args), "shard_map")
  print("OK shard_map", flush=True)


@pytest.mark.slow  # runs in a fresh process
def test_kernel_step_runs_per_shard_without_collectives_and_keeps_shardings():
  # Imported here: the script run must set the device count before any backend starts.
  from tests.test_kernel import needs_kernel
  if needs_kernel.args[0]:
    pytest.skip(needs_kernel.kwargs["reason"])
  assert run_script(__file__) == ["Auto", "Explicit", "shard_map"]


if __name__ == "__main__":
  _worker()

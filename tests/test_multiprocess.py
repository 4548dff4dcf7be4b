"""Multi-process data parallelism: 2 local processes with ``jax.distributed.initialize``.

Runs ``examples/multiprocess_train.py`` twice with a loopback coordinator on a
free port (CPU collectives: gloo, jax's default ``jax_cpu_collectives_implementation``),
and once with ``--single`` (one process, the whole global batch). Every
subprocess has a bounded timeout and is killed if it overruns.

Promises held:
* the parameters are bit for bit identical across the two processes (also
  asserted inside the example with ``multihost_utils.process_allgather``);
* they equal the single-process run with the same global batches up to
  float32 summation order (the global-batch mean is a local sum plus an
  all-reduce in the 2-process run, one sum on one device otherwise), i.e.
  rtol 1e-5 after 20 AdamW steps;
* the optimizer really is AdamW with BERT's name mask: the single-process run
  equals optax.adamw with the equivalent boolean mask tree
  (``test_single_process_matches_optax_with_the_same_mask``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # starts several processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "multiprocess_train.py")
TIMEOUT = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return env


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
  pytest.importorskip("sklearn")
  port = _free_port()
  procs = []
  try:
    for pid in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, EXAMPLE, "--num-processes", "2", "--process-id", str(pid),
           "--coordinator", f"127.0.0.1:{port}", "--steps", "20",
           "--out", str(tmp_path / f"p{pid}.npz")],
          env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:  # only the processes this test started
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "params identical across processes: True" in out, out[-3000:]
  single = subprocess.run(
      [sys.executable, EXAMPLE, "--single", "--steps", "20", "--out", str(tmp_path / "s.npz")],
      env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert single.returncode == 0, single.stderr[-3000:]

  p0, p1, s = (_load(tmp_path / n) for n in ("p0.npz", "p1.npz", "s.npz"))
  assert sorted(p0) == sorted(p1) == sorted(s)
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)  # identical across processes
    np.testing.assert_allclose(p0[k], s[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_single_process_matches_optax_with_the_same_mask():
  """The example's optimizer is od.adamw with BERT's name mask; oracle: optax.adamw with
  the equivalent boolean mask tree (optax/_src/alias.py adamw), same data, in-process."""
  pytest.importorskip("sklearn")
  import jax
  import optax

  sys.path.insert(0, os.path.join(ROOT, "examples"))
  try:
    import multiprocess_train as ex
  finally:
    sys.path.pop(0)
  ours = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(ex.train(5)[0])[0]}

  import jax.numpy as jnp

  params = jax.tree.map(jnp.asarray, ex.init_params())
  mask = {"dense": {"kernel": True, "bias": False}, "LayerNorm": {"scale": False, "bias": False},
          "head": {"kernel": True, "bias": False}}
  tx = optax.adamw(1e-2, weight_decay=0.05, mask=mask)
  state = tx.init(params)

  def loss_fn(p, x, y):
    h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    h = jnp.tanh(h * p["LayerNorm"]["scale"] + p["LayerNorm"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(
        h @ p["head"]["kernel"] + p["head"]["bias"], y).mean()

  for x, y in ex.global_batches(5):
    g = jax.grad(loss_fn)(params, jnp.asarray(x), jnp.asarray(y))
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  ref = {jax.tree_util.keystr(k): np.asarray(v)
         for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for k, v in ref.items():
    np.testing.assert_allclose(ours[k], v, rtol=1e-5, atol=1e-7, err_msg=k)

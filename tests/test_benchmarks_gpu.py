"""The GPU benchmark (``benchmarks/bench_gpu.py``) and its short command, on a machine without one.

What is checked:
- ``bench_gpu --device cpu`` (the GPU code path on the CPU, tiny sizes, one round) prints a
  table and writes JSON with every row (od.adamw, optax.adamw and its A/A copy,
  od.fused_step, torch's fused AdamW when torch is installed, the stream), each with a
  positive median time and a finite effective bandwidth and % of the measured stream;
- without a GPU, ``bench_gpu.main([])`` prints one line saying so and times nothing, and
  ``gpu_available()`` is False (also when JAX raises instead of listing devices);
- the nominal peak bandwidth comes from the memory clock and bus width when torch reports
  them, else from the table of common GPUs by name, else is unknown (no % of peak);
- ``benchmarks/run.py --gpu-only`` runs only bench_gpu, and the whole suite runs bench_gpu
  when a GPU is present and skips it otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_ROWS = {"od.adamw", "optax.adamw", "optax.adamw (A/A copy)", "od.fused_step(od.adamw)",
            "stream a*x+y"}
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture()
def bench(monkeypatch):
  monkeypatch.syspath_prepend(ROOT)
  from benchmarks import bench_gpu

  return bench_gpu


def test_cpu_smoke_run_has_every_row_and_field(bench, tmp_path, capsys):
  """One tiny size, one round, on the CPU: the rows, fields and table a GPU run produces."""
  out = tmp_path / "bench_gpu.json"
  results = bench.main(["--device", "cpu", "--sizes", "1e4", "--rounds", "1",
                        "--out", str(out)])
  printed = capsys.readouterr().out
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  assert results["device"] == "cpu" and list(results["tables"]) == ["flat 1e+04"]
  table = results["tables"]["flat 1e+04"]
  rows = table["rows"]
  expected = JAX_ROWS | ({"torch AdamW fused"} if HAS_TORCH else set())
  assert set(rows) == expected
  assert table["n"] == 10_000 and table["stream_GBps"] > 0
  assert table["peak_GBps"] is None  # no nominal peak for a CPU: % of the stream only
  for name, row in rows.items():
    assert row["median_s"] > 0 and row["n_times"] >= 1, name
    assert math.isfinite(row["eff_GBps"]) and row["eff_GBps"] > 0, name
    assert math.isfinite(row["pct_stream"]) and row["pct_stream"] > 0, name
    assert row["pct_peak"] is None, name
    if HAS_TORCH and name != "stream a*x+y":
      assert math.isfinite(row["x_torch_fused"]) and row["x_torch_fused"] > 0, name
  assert rows["stream a*x+y"]["pct_stream"] == pytest.approx(100)
  assert rows["stream a*x+y"]["bytes_per_param"] == 12
  assert rows["od.adamw"]["bytes_per_param"] == 28
  assert "calls the CPU kernel: " in table["fused_step_path"]
  for text in ["% stream", "% peak", "x torch", "eff GB/s", "measured bandwidth", *expected]:
    assert text in printed, text
  if not HAS_TORCH:
    assert "torch rows skipped: torch is not installed" in printed


def test_without_a_gpu_main_says_so_and_times_nothing(bench, monkeypatch, capsys):
  """``main([])`` on a machine without a GPU: one line, exit without timing or writing."""
  if bench.gpu_available():
    pytest.skip("this machine has a GPU")

  def must_not_run(*args, **kwargs):
    raise AssertionError("nothing may be built or timed without a GPU")

  monkeypatch.setattr(bench, "build", must_not_run)
  monkeypatch.setattr(bench._timing, "interleaved", must_not_run)
  monkeypatch.setattr(bench.json, "dump", must_not_run)
  assert bench.main([]) is None
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and "no GPU visible to JAX" in lines[0] and "nothing timed" in lines[0]


def test_gpu_available_is_false_when_jax_has_no_gpu_backend(bench, monkeypatch):
  def no_backend(*args):
    raise RuntimeError("Unknown backend: 'cuda' requested, but no platforms that are "
                       "instances of cuda are present.")

  monkeypatch.setattr(bench.jax, "devices", no_backend)
  assert bench.gpu_available() is False
  monkeypatch.setattr(bench.jax, "devices", lambda *a: [types.SimpleNamespace(platform="cpu")])
  assert bench.gpu_available() is False
  monkeypatch.setattr(bench.jax, "devices", lambda *a: [types.SimpleNamespace(platform="gpu")])
  assert bench.gpu_available() is True


def test_nominal_peak_from_torch_properties_then_the_table(bench):
  """2 × memory clock × bus width / 8 when torch reports both, else the name table."""
  a100 = types.SimpleNamespace(name="NVIDIA A100-SXM4-40GB", memory_clock_rate=1_215_000,
                               memory_bus_width=5120)
  gbps, source = bench.nominal_peak(a100.name, a100)
  assert gbps == pytest.approx(1555.2) and "bus width" in source
  older_torch = types.SimpleNamespace(name="Tesla T4")  # no memory_* attributes
  assert bench.nominal_peak(older_torch.name, older_torch)[0] == 320
  for name, expected in [("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-PCIE-40GB", 1555),
                         ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000),
                         ("Tesla V100-SXM2-16GB", 900), ("NVIDIA L4", 300), ("NVIDIA A10", 600),
                         ("NVIDIA GeForce RTX 4090", 1008), ("NVIDIA GeForce RTX 3090", 936)]:
    assert bench.nominal_peak(name)[0] == expected, name
  for name in ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA L40S", "Some Future GPU"]:
    gbps, source = bench.nominal_peak(name)
    assert gbps is None and "measured stream only" in source, name


@pytest.mark.parametrize("gpu", [False, True])
def test_run_runs_bench_gpu_when_a_gpu_is_present_and_gpu_only_runs_only_it(bench, monkeypatch,
                                                                           gpu):
  from benchmarks import bench_grid, bench_step, run

  calls = []
  for module in (bench_step, bench_grid, bench):
    name = module.__name__.rsplit(".", 1)[1]
    monkeypatch.setattr(module, "main", lambda argv, name=name: calls.append((name, argv)))
  monkeypatch.setattr(bench, "gpu_available", lambda: gpu)
  scratch = os.path.join(ROOT, "out", "benchmarks")
  results = os.path.join(ROOT, "benchmarks", "results")
  run.main(["--gpu-only", "--quick"])
  assert calls == [("bench_gpu", ["--quick", "--out", os.path.join(scratch, "bench_gpu.json")])]
  calls.clear()
  run.main(["--tag", "t1"])
  expected = [("bench_step", ["--out", os.path.join(results, "bench_step_t1.json")]),
              ("bench_grid", ["--out", os.path.join(results, "bench_grid_t1.json")])]
  if gpu:
    expected.append(("bench_gpu", ["--out", os.path.join(results, "bench_gpu_t1.json")]))
  assert calls == expected


def test_the_short_command_without_a_gpu_prints_one_line(bench, monkeypatch, capsys):
  """``python benchmarks/run.py --gpu-only --quick`` here: the no-GPU line, nothing else run."""
  if bench.gpu_available():
    pytest.skip("this machine has a GPU")
  from benchmarks import bench_grid, bench_step, run

  monkeypatch.setattr(bench_step, "main", lambda argv: pytest.fail("bench_step ran"))
  monkeypatch.setattr(bench_grid, "main", lambda argv: pytest.fail("bench_grid ran"))
  monkeypatch.setattr(bench, "build", lambda *a: pytest.fail("bench_gpu built contenders"))
  run.main(["--gpu-only", "--quick"])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and "no GPU visible to JAX" in lines[0]

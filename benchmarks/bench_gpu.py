"""GPU step benchmark: od.adamw, optax.adamw, od.fused_step and torch's fused AdamW on a GPU.

Run (from the repository root, on a machine with a CUDA GPU)::

    python benchmarks/run.py --gpu-only --quick   # the short command: 1e7 only, a few rounds
    python benchmarks/bench_gpu.py                # 1e6, 1e7 and 3e7 parameters
    python benchmarks/bench_gpu.py --quick        # 1e7 only, a few rounds (noisy)

Without a GPU it says so in one line and times nothing (``--device cpu`` runs the same code
on the CPU with tiny sizes: a smoke run of the code path, not a measurement). Writes
``out/benchmarks/bench_gpu.json`` (ignored by git; ``--out`` to change, and
``benchmarks/run.py --tag NAME`` for a canonical run in ``benchmarks/results/``).

The problem is one flat float32 leaf of n parameters. The contenders, timed in one process,
interleaved in a fresh random order each round (``_timing.py``), with the hyperparameters of
``bench_step.py``:

* ``od.adamw`` and ``optax.adamw``: ``jax.jit(tx.update + optax.apply_updates,
  donate_argnums=(0, 2))``, plus a second, identical ``optax.adamw`` program (an A/A control:
  its ratio to the first is the noise floor of the run);
* ``od.fused_step(od.adamw)``: on a GPU, ``lax.platform_dependent`` selects the plain XLA step
  (the C++ kernel is a CPU path), so this row should match ``od.adamw``;
* ``torch AdamW fused``: ``torch.optim.AdamW(fused=True)`` on the same device (skipped, with the
  reason printed, when torch or its CUDA support is missing);
* ``stream a*x+y``: a jitted, donated ``x ← a·x + y`` (12 bytes per element), the measured
  memory bandwidth of the device.

Every timed call waits for the device (``jax.block_until_ready``, ``torch.cuda.synchronize``).
Effective bandwidth counts the 28 bytes per float32 parameter an AdamW step must move (read
θ, g, m, v; write θ, m, v). Each row gives it as a percentage of the measured stream and, where
known, of the device's nominal peak: ``2 × memory clock × bus width / 8`` from
``torch.cuda.get_device_properties`` when torch exposes both, else a table of common GPUs by
name. At 1e6 parameters a step takes tens of microseconds: launch and dispatch costs dominate,
and the 28 MB working set may sit in a large GPU's L2 cache (percentages can then pass 100).

JAX would reserve 75% of the GPU's memory when it starts, leaving little to torch in the same
process: importing this module sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless it is
already set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_decoupled as od
from benchmarks import _timing
from optax_decoupled import _kernel_build as od_kernel
from benchmarks.bench_step import (B1, B2, BYTES_PER_PARAM, EPS, LR, WD, JaxStepper,
                                   StreamStepper, flat_params, grads_like, plain_step)

GPU_PLATFORMS = ("gpu", "cuda")
SIZES = (1e6, 1e7, 3e7)
QUICK_SIZES = (1e7,)
CPU_SIZES = (1e4, 1e5)  # --device cpu: a smoke run of the code path
STREAM_BYTES = 12  # x ← a·x + y: read x, y; write x
TORCH = "torch AdamW fused"
STREAM = "stream a*x+y"
NO_GPU = ("bench_gpu: no GPU visible to JAX (jax.devices(): {devices}); nothing timed. "
          "Run it on a machine where jax.devices() lists a CUDA GPU.")
QUICK_NOTE = ("NOTE (--quick): one size and a few rounds, so these timings are noisy; read "
              "them as indications (python benchmarks/bench_gpu.py for the full run).")

# Nominal memory bandwidth (GB/s) of common GPUs, matched in order on the lower-cased device
# name; used when torch does not report the memory clock and bus width.
PEAK_GBPS: tuple[tuple[str, float, str], ...] = (
    (r"a100.*80gb", 2039.0, "A100 80GB"),
    (r"a100", 1555.0, "A100 40GB"),
    (r"h100.*pcie", 2000.0, "H100 PCIe"),
    (r"h100.*(sxm|hbm3)", 3350.0, "H100 SXM"),
    (r"v100", 900.0, "V100"),
    (r"\bt4\b", 320.0, "T4"),
    (r"\bl4\b", 300.0, "L4"),
    (r"\ba10\b", 600.0, "A10"),
    (r"rtx 4090", 1008.0, "RTX 4090"),
    (r"rtx 3090(?! ti)", 936.0, "RTX 3090"),
)


# ----------------------------------------------------------------------------- the device


def gpu_available() -> bool:
  """Whether JAX's devices include a GPU (False, not an error, when JAX has no GPU backend)."""
  try:
    return any(d.platform in GPU_PLATFORMS for d in jax.devices())
  except RuntimeError:  # e.g. JAX_PLATFORMS=cuda on a machine without one
    return False


def _device_names() -> str:
  try:
    return ", ".join(sorted({d.platform for d in jax.devices()}))
  except RuntimeError as e:
    return f"none ({e})"


def nominal_peak(name: str, props: Any = None) -> tuple[float | None, str]:
  """The device's nominal memory bandwidth in GB/s, and where that number comes from.

  Args:
    name: the device's name (``torch.cuda.get_device_properties(i).name`` or JAX's
      ``device_kind``).
    props: ``torch.cuda.get_device_properties(i)``, or None without torch. When it has
      ``memory_clock_rate`` (kHz) and ``memory_bus_width`` (bits), the peak is
      ``2 × clock × bus width / 8`` (double data rate).

  Returns:
    ``(GB/s, source)``; ``(None, reason)`` for a device neither torch nor the table knows.
  """
  if (props is not None and hasattr(props, "memory_clock_rate")
      and hasattr(props, "memory_bus_width")
      and props.memory_clock_rate > 0 and props.memory_bus_width > 0):
    gbps = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9
    return gbps, ("2 x memory clock x bus width / 8 (torch.cuda.get_device_properties: "
                  f"{props.memory_clock_rate / 1e3:.0f} MHz, {props.memory_bus_width} bits)")
  for pattern, gbps, label in PEAK_GBPS:
    if re.search(pattern, name.lower()):
      return gbps, f"nominal for {label} (bench_gpu.PEAK_GBPS, matched on the device name)"
  return None, f"not known for {name!r}: percentages of the measured stream only"


def torch_status(device: str) -> tuple[bool, str]:
  """Whether torch can run on ``device`` ("cuda:0", "cpu"): (ok, its version or why not)."""
  try:
    import torch  # only the benchmark imports torch.
  except ImportError:
    return False, "torch is not installed"
  if device.startswith("cuda") and not torch.cuda.is_available():
    return False, f"torch {torch.__version__} has no usable CUDA (torch.cuda.is_available())"
  return True, torch.__version__


# ----------------------------------------------------------------------------- contenders


class TorchDeviceStepper:
  """``torch.optim.AdamW`` with its parameters on ``device``; ``__call__`` waits for it."""

  def __init__(self, params, grads, device: str, **kw):
    import torch

    self.ps = []
    for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads)):
      t = torch.nn.Parameter(torch.from_numpy(np.array(p)).to(device))
      t.grad = torch.from_numpy(np.array(g)).to(device)
      self.ps.append(t)
    self.opt = torch.optim.AdamW(self.ps, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, **kw)
    dev = torch.device(device)
    self.sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

  def __call__(self) -> None:
    self.opt.step()
    self.sync()


def build(n: int, torch_device: str | None, on_gpu: bool) -> tuple[dict, str]:
  """The contenders for one flat leaf of n float32 parameters, on JAX's default device.

  Args:
    n: the number of parameters.
    torch_device: where torch's optimizer runs ("cuda:0", "cpu"), None for no torch row.
    on_gpu: whether JAX's default device is a GPU (only for the description of the path
      ``od.fused_step`` takes).

  Returns:
    ``(name -> blocking callable, which path od.fused_step takes here)``.
  """
  params = flat_params(n)
  grads = grads_like(params)
  adamw = od.adamw(LR, B1, B2, EPS, weight_decay=WD)
  c: dict[str, Any] = {}
  c["od.adamw"] = JaxStepper(plain_step(adamw), params, grads, adamw.init(params))
  for name in ("optax.adamw", "optax.adamw (A/A copy)"):
    tx = optax.adamw(LR, B1, B2, EPS, weight_decay=WD)
    c[name] = JaxStepper(plain_step(tx), params, grads, tx.init(params))
  fused = od.fused_step(adamw)
  c["od.fused_step(od.adamw)"] = JaxStepper(fused, params, grads, adamw.init(params))
  cpu_path = fused.explain(params, grads, adamw.init(params))
  # Whether the compiled program calls the C++ kernel (it does on a CPU when it is built).
  kernel = od_kernel.TARGET in c["od.fused_step(od.adamw)"].fn.as_text()
  if on_gpu:
    path = ("the plain XLA step (lax.platform_dependent's default branch on this device); "
            f"calls the CPU kernel: {'yes (unexpected)' if kernel else 'no'}; on a CPU it "
            f"would take: {cpu_path}")
  else:
    path = f"{cpu_path}; calls the CPU kernel: {'yes' if kernel else 'no'}"
  if torch_device is not None:
    c[TORCH] = TorchDeviceStepper(params, grads, torch_device, fused=True)
  c[STREAM] = StreamStepper(n)
  return c, path


# ----------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
  return f"{x:8.1f}" if x is not None else f"{'-':>8s}"


def table(title: str, n: int, res: dict, infos: dict, peak_gbps: float | None,
          peak_source: str) -> dict:
  """Prints one size's table and returns its JSON (every row, the stream's included)."""
  stream = res[STREAM]
  stream_gbps = STREAM_BYTES * n / stream.median / 1e9
  torch_ref = res.get(TORCH)
  print(f"\n## {title}: {n:,} parameters")
  print(f"measured bandwidth: {stream_gbps:.1f} GB/s (x <- a*x + y, 12 B/element, jitted and "
        f"donated; '% stream' is relative to it)")
  if peak_gbps is not None:
    print(f"nominal peak: {peak_gbps:.1f} GB/s, {peak_source} ('% peak' is relative to it)")
  else:
    print(f"nominal peak: {peak_source}")
  head = (f"{'contender':26s} {'median ms':>10s} {'IQR ms':>15s} {'eff GB/s':>9s} "
          f"{'x torch':>8s} {'% stream':>8s} {'% peak':>8s} {'compile s':>9s}")
  print("eff GB/s: 28 B per parameter (stream: 12 B per element) / median time; x torch: "
        "round-paired ratio to torch AdamW(fused=True) on the same device")
  print(head)
  print("-" * len(head))
  rows = {}
  for name, t in sorted(res.items(), key=lambda kv: kv[1].median):
    lo, hi = t.iqr
    nbytes = STREAM_BYTES if name == STREAM else BYTES_PER_PARAM
    gbps = nbytes * n / t.median / 1e9
    x_torch = (_timing.paired_ratio(t, torch_ref) if torch_ref is not None and name != STREAM
               else None)
    row = {"median_s": t.median, "iqr_s": [lo, hi], "n_times": len(t.times),
           "visits_s": t.visits, "bytes_per_param": nbytes, "eff_GBps": gbps,
           "x_torch_fused": x_torch, "pct_stream": 100 * gbps / stream_gbps,
           "pct_peak": 100 * gbps / peak_gbps if peak_gbps else None, **infos.get(name, {})}
    rows[name] = row
    tt = f"{x_torch:8.3f}" if x_torch is not None else f"{'-':>8s}"
    cs = f"{row['compile_s']:9.2f}" if "compile_s" in row else f"{'-':>9s}"
    print(f"{name:26s} {t.median * 1e3:10.3f} {f'{lo * 1e3:.3f}-{hi * 1e3:.3f}':>15s} "
          f"{gbps:9.1f} {tt} {_pct(row['pct_stream'])} {_pct(row['pct_peak'])} {cs}")
  aa = _timing.rows_ratio(rows, "optax.adamw (A/A copy)", "optax.adamw")
  if aa is not None:
    print(f"noise floor: two identical optax.adamw programs measured {aa:.3f}x apart")
  return {"n": n, "stream_GBps": stream_gbps, "stream_median_s": stream.median,
          "peak_GBps": peak_gbps, "peak_source": peak_source, "rows": rows}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict | None:
  """Runs the benchmark; returns its results (None when there is no GPU and nothing ran)."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="1e7 only, a few rounds (noisy)")
  ap.add_argument("--sizes", default=None,
                  help="comma-separated sizes, e.g. 1e6,1e7 (default 1e6,1e7,3e7; --device cpu: "
                  "1e4,1e5)")
  ap.add_argument("--rounds", type=int, default=None, help="default 10 (--quick: 3)")
  ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                  help="cpu: the same code path on the CPU with tiny sizes, a smoke test only")
  ap.add_argument("--no-torch", action="store_true", help="skip the torch rows")
  ap.add_argument("--out", default=os.path.join(_timing.SCRATCH_DIR, "bench_gpu.json"),
                  help="JSON output (default: out/benchmarks/bench_gpu.json, ignored by git)")
  args = ap.parse_args(argv)
  if args.device == "gpu":
    if not gpu_available():
      print(NO_GPU.format(devices=_device_names()))
      return None
    device = next(d for d in jax.devices() if d.platform in GPU_PLATFORMS)
    torch_device = "cuda:0"  # JAX's first GPU: the same device under CUDA_VISIBLE_DEVICES
  else:
    device = jax.devices("cpu")[0]
    torch_device = "cpu"
    print("bench_gpu --device cpu: a smoke run of the GPU benchmark's code path on the CPU, "
          "not a GPU measurement")
  default_sizes = CPU_SIZES if args.device == "cpu" else QUICK_SIZES if args.quick else SIZES
  sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes else
           [int(s) for s in default_sizes])
  rounds = args.rounds or (3 if args.quick else 10)
  torch_ok, torch_info = (False, "--no-torch") if args.no_torch else torch_status(torch_device)
  if not torch_ok:
    print(f"torch rows skipped: {torch_info}")

  name, props = getattr(device, "device_kind", str(device)), None
  if torch_ok and args.device == "gpu":
    import torch

    props = torch.cuda.get_device_properties(0)
    name = props.name
  if args.device == "gpu":
    peak_gbps, peak_source = nominal_peak(name, props)
  else:
    peak_gbps, peak_source = None, "not known for a CPU: percentages of the measured stream only"
  results: dict[str, Any] = {
      "command": "python benchmarks/bench_gpu.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "jax": jax.__version__, "optax": optax.__version__,
                  "device": str(device), "device_platform": device.platform,
                  "device_name": name, "torch": torch_info if torch_ok else None,
                  "torch_skipped": None if torch_ok else torch_info},
      "device": args.device, "rounds": rounds, "peak_GBps": peak_gbps,
      "peak_source": peak_source, "tables": {},
  }
  if torch_ok and args.device == "gpu":
    import torch

    results["machine"]["torch_cuda"] = torch.version.cuda
  print(f"device: {device} ({name}); rounds {rounds}; torch "
        f"{torch_info if torch_ok else 'skipped'}")
  with jax.default_device(device):
    for i, n in enumerate(sizes):
      contenders, path = build(n, torch_device if torch_ok else None, args.device == "gpu")
      infos = {k: c.compile_info() for k, c in contenders.items() if isinstance(c, JaxStepper)}
      res = _timing.interleaved(contenders, rounds=rounds, calls_per_visit=3, warmup=2, seed=i)
      key = f"flat {n:.0e}"
      results["tables"][key] = table(f"one leaf of {n:.0e} float32 on {device} ({name})", n,
                                     res, infos, peak_gbps, peak_source)
      results["tables"][key]["fused_step_path"] = path
      print(f"od.fused_step(od.adamw) here: {path}")
      del contenders, res
      if torch_ok and args.device == "gpu":
        import torch

        torch.cuda.empty_cache()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nwrote {args.out}")
  if args.quick:
    print(QUICK_NOTE)
  return results


if __name__ == "__main__":
  main()

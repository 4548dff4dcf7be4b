"""The examples' command lines: ``--help`` and the checks of nnx_transformer's flags.

What is checked:
- every ``examples/*.py`` has an argparse CLI whose ``--help`` prints the usage and exits 0
  in a few seconds, without running anything (no other output, no file written);
- ``nnx_transformer.py --resume`` with flags other than the saved run's stops with a
  one-line error naming each mismatching flag (no traceback, nothing restored); without a
  checkpoint it says so in one line;
- ``nnx_transformer.py --stop-after N`` with N at or beyond the run's length is refused
  before anything is built.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # runs the examples in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


def test_every_example_is_listed():
  names = {os.path.basename(p) for p in EXAMPLES}
  assert {"paper_grid.py", "precision_decay.py", "nnx_transformer.py", "quickstart.py",
          "multiprocess_train.py"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_help_exits_without_running(path, tmp_path):
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path, check=False)
  elapsed = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("usage: "), proc.stdout[:500]
  assert "-h, --help" in proc.stdout
  # Nothing ran: the help is all there is, nothing was written (outputs go under the cwd).
  assert "Traceback" not in proc.stderr
  assert list(tmp_path.iterdir()) == []
  # Importing jax takes a few seconds; the shortest experiment takes far longer than this.
  assert elapsed < 60, f"--help took {elapsed:.0f} s"


# Packages an example may use but its --help must not need: importing one raises.
HEAVY = ("flax", "orbax", "sklearn", "matplotlib", "torch", "tqdm", "mnist1d",
         "optax_decoupled.flax")
_BLOCKING = """
import importlib.abc, runpy, sys
HEAVY = {heavy!r}
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == h or name.startswith(h + ".") for h in HEAVY):
      raise ImportError(f"{{name}} is blocked: --help must not import it")
    return None
sys.meta_path.insert(0, Block())
try:
  import sklearn
except ImportError:
  pass
else:
  raise SystemExit("the blocker did not block sklearn")
sys.argv = [{path!r}, "--help"]
runpy.run_path({path!r}, run_name="__main__")
"""


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_help_needs_no_heavy_package(path, tmp_path):
  """``--help`` parses the arguments before any heavy optional package is imported."""
  code = _BLOCKING.format(heavy=HEAVY, path=path)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("usage: "), proc.stdout[:500]
  assert "blocked" not in proc.stderr


# ------------------------------------------------------------------------- nnx_transformer


@pytest.fixture(scope="module")
def nnx_example():
  pytest.importorskip("flax")
  pytest.importorskip("orbax.checkpoint")
  path = os.path.join(ROOT, "examples", "nnx_transformer.py")
  spec = importlib.util.spec_from_file_location("nnx_transformer_cli_example", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


COMMON = ["--quick", "--steps", "6", "--no-progress"]


@pytest.fixture(scope="module")
def stopped_run(nnx_example, tmp_path_factory):
  """A --quick run of 6 steps, checkpointed at step 3."""
  out = str(tmp_path_factory.mktemp("nnx_stopped"))
  assert nnx_example.main([*COMMON, "--out", out, "--stop-after", "3"]) == {"stopped_at": 3}
  return out


def test_checkpoint_saves_the_run_flags(stopped_run):
  with open(os.path.join(stopped_run, "checkpoints", "config_3.json")) as f:
    saved = json.load(f)
  assert saved == {"quick": True, "steps": 6, "optimizer": "adamw", "weight_decay": 0.1,
                   "mask": "bert", "seed": 0}


def test_resume_with_other_flags_is_a_one_line_error(stopped_run):
  script = os.path.join(ROOT, "examples", "nnx_transformer.py")
  proc = subprocess.run(
      [sys.executable, script, *COMMON, "--out", stopped_run, "--resume",
       "--weight-decay", "0.01", "--optimizer", "adam_l2", "--no-mask"],
      capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
  assert proc.returncode == 1
  err = proc.stderr.strip()
  assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
  assert "--weight-decay 0.1 (this run: --weight-decay 0.01)" in err
  assert "--optimizer adamw (this run: --optimizer adam_l2)" in err
  assert "--mask bert (this run: --no-mask)" in err
  assert "--steps" not in err and "--seed" not in err  # only the flags that differ
  assert "resumed" not in proc.stdout


@pytest.mark.parametrize("flags, named", [
    (["--steps", "8"], "--steps 6 (this run: --steps 8)"),
    (["--seed", "1"], "--seed 0 (this run: --seed 1)"),
    (["--mask", "hf"], "--mask bert (this run: --mask hf)"),
])
def test_resume_names_each_mismatch(nnx_example, stopped_run, flags, named):
  steps = [] if "--steps" in flags else ["--steps", "6"]
  argv = ["--quick", "--no-progress", "--out", stopped_run, "--resume", *steps, *flags]
  with pytest.raises(SystemExit) as e:
    nnx_example.main(argv)
  msg = str(e.value.code)
  assert named in msg and "\n" not in msg, msg


def test_resume_without_checkpoint(nnx_example, tmp_path):
  with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
    nnx_example.main([*COMMON, "--out", str(tmp_path), "--resume"])


@pytest.mark.parametrize("argv, length", [
    (["--quick", "--stop-after", "600"], "20 steps with --quick"),
    (["--quick", "--steps", "6", "--stop-after", "6"], "6 steps"),
])
def test_stop_after_beyond_the_run_is_refused(nnx_example, tmp_path, argv, length):
  with pytest.raises(SystemExit) as e:
    nnx_example.main([*argv, "--no-progress", "--out", str(tmp_path / "run")])
  msg = str(e.value.code)
  assert f"--stop-after {argv[-1]} is not before the end of the run ({length})" in msg
  assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_stop_after_at_or_before_the_resumed_step_is_refused(nnx_example, stopped_run):
  with pytest.raises(SystemExit, match="already at step 3"):
    nnx_example.main([*COMMON, "--out", stopped_run, "--resume", "--stop-after", "3"])


# ------------------------------------------------------------------------- benchmarks


def test_benchmark_runner_keeps_untagged_runs_out_of_the_tree(monkeypatch, capsys):
  """Untagged and --quick runs write under out/ (ignored); only --tag writes the canonical
  benchmarks/results/ files. --quick says its MISS lines are not verdicts."""
  monkeypatch.syspath_prepend(ROOT)
  from benchmarks import bench_gpu, bench_grid, bench_step, run

  calls = []
  monkeypatch.setattr(bench_step, "main", lambda argv: calls.append(argv))
  monkeypatch.setattr(bench_grid, "main", lambda argv: calls.append(argv))
  monkeypatch.setattr(bench_gpu, "gpu_available", lambda: False)  # the same on a GPU host
  run.main(["--quick"])
  assert "not a verdict" in capsys.readouterr().out
  run.main(["--tag", "t1"])
  scratch = os.path.join(ROOT, "out", "benchmarks")
  results = os.path.join(ROOT, "benchmarks", "results")
  assert calls == [
      ["--quick", "--out", os.path.join(scratch, "bench_step.json")],
      ["--quick", "--out", os.path.join(scratch, "bench_grid.json")],
      ["--out", os.path.join(results, "bench_step_t1.json")],
      ["--out", os.path.join(results, "bench_grid_t1.json")],
  ]
  ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(scratch, "x.json")],
                           cwd=ROOT, check=False)
  if ignored.returncode != 128:  # 128: not a git checkout
    assert ignored.returncode == 0, "out/benchmarks/ must be ignored by git"

"""The documentation site (docs/): its code runs, its torch port matches torch, and it builds.

1. Every ```python block of the guide pages (``docs/*.md``) runs: a page's blocks in order,
   in one namespace, in a fresh Python process (with a timeout) whose working directory is
   a temporary directory. A block whose first line is ``# not run`` is only illustrative and
   is skipped; a block whose first line is ``# requires: torch`` (any importable module
   name) runs only where that module is installed.
2. The full torch port of ``docs/migrating_torch.md``: the page's torch loop
   (``torch.optim.AdamW`` with two parameter groups, ``LambdaLR`` warmup then linear decay,
   ``clip_grad_norm_``) and its ``od``/optax port, 20 steps each from the same initial
   weights and batches, agree to float32 round-off; and the check has teeth: the port with
   decay on every parameter, or without clipping, does not agree.
3. ``sphinx-build -W --keep-going -b html docs <tmp>`` passes (skipped without sphinx), and
   the generated API reference documents every name of ``od.__all__`` and ``odf.__all__``.
4. The benchmark numbers live in one generated file, ``benchmarks/results/summary.md``:
   README.md and docs/performance.md quote it verbatim, and it is what ``benchmarks.report``
   generates from the runs it names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the documentation build and every guide's code, in subprocesses

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md"))
TIMEOUT = 900  # seconds per page process; the machine may be shared.

FENCE = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
REQUIRES = re.compile(r"#\s*requires:\s*([\w.]+)")

# Runs the blocks of one page in one namespace; reports which block failed.
RUNNER = r"""
import json, os, sys, traceback, warnings
job = json.load(open(sys.argv[1]))
os.chdir(job["cwd"])
namespace = {"__name__": "__main__"}
for block in job["blocks"]:
  code = compile(block["code"], f"{job['page']}, block at line {block['line']}", "exec")
  try:
    exec(code, namespace)
  except BaseException:
    traceback.print_exc()
    sys.exit(f"FAILED: {job['page']}, the block at line {block['line']}")
"""


def python_blocks(page: Path) -> list[dict]:
  """``[{"line": n, "code": str}]``: the ```python blocks of ``page``, in order."""
  text = page.read_text(encoding="utf-8")
  return [{"line": text.count("\n", 0, m.start()) + 2, "code": textwrap.dedent(m.group(2))}
          for m in FENCE.finditer(text)]


def first_line(code: str) -> str:
  return next((line.strip() for line in code.splitlines() if line.strip()), "")


def runnable(blocks: list[dict]) -> tuple[list[dict], list[str]]:
  """The blocks to run, and why the others are not run."""
  run, skipped = [], []
  for block in blocks:
    head = first_line(block["code"])
    needs = REQUIRES.match(head)
    if head.startswith("# not run"):
      skipped.append(f"line {block['line']}: # not run")
    elif needs and importlib.util.find_spec(needs.group(1)) is None:
      skipped.append(f"line {block['line']}: needs {needs.group(1)}")
    else:
      run.append(block)
  return run, skipped


def run_blocks(page: str, blocks: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
  job = tmp_path / "job.json"
  work = tmp_path / "work"
  work.mkdir()
  job.write_text(json.dumps({"page": page, "blocks": blocks, "cwd": str(work)}))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             MPLBACKEND="Agg")
  proc = subprocess.run(
      [sys.executable, "-W", "error::DeprecationWarning:optax_decoupled", "-c", RUNNER, str(job)],
      cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
  if proc.returncode != 0:
    pytest.fail(f"{page}: exit code {proc.returncode}\n--- stdout (tail)\n"
                f"{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}")
  return proc


def test_every_guide_has_code_and_the_fence_parser_sees_it():
  names = {p.name for p in PAGES}
  for expected in ("index.md", "getting_started.md", "which_decay.md", "migrating_torch.md",
                   "migrating_keras_optax.md", "flax.md", "equinox.md", "presets.md",
                   "performance.md", "reliability.md", "faq.md", "api.md"):
    assert expected in names, f"docs/{expected} is missing"
  for page in PAGES:
    if page.name == "api.md":
      continue
    text = page.read_text(encoding="utf-8")
    assert text.count("```python") == len(python_blocks(page)), page.name
    assert python_blocks(page), f"{page.name} has no python block"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "api.md"], ids=lambda p: p.name)
def test_page_code_runs(page: Path, tmp_path: Path):
  blocks, skipped = runnable(python_blocks(page))
  not_run = [s for s in skipped if "# not run" in s]
  assert len(not_run) <= 3, f"{page.name}: too many '# not run' blocks: {not_run}"
  run_blocks(page.name, blocks, tmp_path)


def test_guides_cite_nothing_outside_the_repository():
  for page in PAGES:
    if page.name == "api.md":
      continue
    text = page.read_text(encoding="utf-8")
    links = re.findall(r"https?://\S+", text)
    assert not links, f"{page.name} links outside the repository: {links}"
    assert not re.search(r"(?<![\w/])#\d{2,}\b", text), f"{page.name} cites an issue number"


# Appended to the torch page's blocks: compares the torch loop with the port, then shows
# that the comparison would catch a wrong port (decay on every leaf, or no clipping).
TORCH_CHECK = textwrap.dedent('''
    import numpy as np
    import jax, jax.numpy as jnp, optax
    import optax_decoupled as od

    assert len(batches) == 20 and len(losses) == len(torch_losses) == 20

    def as_torch_names(p):
      return {"fc1.weight": np.asarray(p["fc1"]["kernel"]).T, "fc1.bias": np.asarray(p["fc1"]["bias"]),
              "LayerNorm.weight": np.asarray(p["LayerNorm"]["scale"]),
              "LayerNorm.bias": np.asarray(p["LayerNorm"]["bias"]),
              "fc2.weight": np.asarray(p["fc2"]["kernel"]).T, "fc2.bias": np.asarray(p["fc2"]["bias"])}

    reference = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    RTOL, ATOL = 2e-5, 2e-6  # float32 round-off, accumulated over 20 Adam steps

    def max_err(port):
      return max(float(np.max(np.abs(port[k] - reference[k]) / (ATOL + RTOL * np.abs(reference[k]))))
                 for k in reference)

    port = as_torch_names(params)
    assert set(port) == set(reference)
    for k in reference:
      np.testing.assert_allclose(port[k], reference[k], rtol=RTOL, atol=ATOL, err_msg=k)
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-5, atol=1e-7)
    moved = max(float(np.max(np.abs(reference[k] - init[k]))) for k in reference)
    assert moved > 1e-2, moved
    print("torch vs port: max error / tolerance =", max_err(port))

    params0 = {"fc1": {"kernel": init["fc1.weight"].T, "bias": init["fc1.bias"]},
               "LayerNorm": {"scale": init["LayerNorm.weight"], "bias": init["LayerNorm.bias"]},
               "fc2": {"kernel": init["fc2.weight"].T, "bias": init["fc2.bias"]}}
    params0 = jax.tree.map(jnp.asarray, params0)

    # Clipping is active in this run (else the no-clip variant below would prove nothing).
    g0 = jax.grad(loss_fn)(params0, *map(jnp.asarray, batches[0]))
    assert float(optax.global_norm(g0)) > 1.0

    def port_with(tx):
      @jax.jit
      def step(p, s, x, y):
        u, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

      p, s = params0, tx.init(params0)
      for x, y in batches:
        p, s = step(p, s, x, y)
      return as_torch_names(p)

    same = port_with(optax.chain(optax.clip_by_global_norm(1.0),
                                 od.adamw(schedule, weight_decay=0.1, mask=mask)))
    assert max_err(same) <= 1.0
    for name, wrong in {
        "decay on every leaf": optax.chain(optax.clip_by_global_norm(1.0),
                                           od.adamw(schedule, weight_decay=0.1)),
        "no clipping": od.adamw(schedule, weight_decay=0.1, mask=mask),
        "Adam + L2": optax.chain(optax.clip_by_global_norm(1.0),
                                 od.adam_l2(schedule, weight_decay=0.1, mask=mask)),
    }.items():
      err = max_err(port_with(wrong))
      print(f"{name}: max error / tolerance = {err:.3g}")
      assert err > 50, (name, err)
    print("TORCH CHECK PASSED")
''')


def test_torch_port_matches_torch(tmp_path: Path):
  pytest.importorskip("torch")
  page = DOCS / "migrating_torch.md"
  blocks, skipped = runnable(python_blocks(page))
  assert not skipped, skipped
  proc = run_blocks(page.name, blocks + [{"line": 0, "code": TORCH_CHECK}], tmp_path)
  assert "TORCH CHECK PASSED" in proc.stdout, proc.stdout[-2000:]


def test_sphinx_build(tmp_path: Path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  api = (out / "api.html").read_text(encoding="utf-8")
  import optax_decoupled as od
  import optax_decoupled.flax as odf
  for module in (od, odf):
    for name in module.__all__:
      anchor = f'id="{module.__name__}.{name}"'
      assert anchor in api, f"the API reference does not document {module.__name__}.{name}"
  for page in PAGES:
    assert (out / page.with_suffix(".html").name).exists(), page.name


def test_benchmark_numbers_are_the_one_generated_summary_quoted_verbatim():
  from benchmarks import report

  summary = report.SUMMARY.read_text()
  for path in report.QUOTED_IN:
    assert report.quoted(path.read_text()) == summary.strip("\n"), (
        f"{path.name} does not quote {report.SUMMARY.name}: run python -m benchmarks.report "
        "--quote")
  tags = re.search(r"--tag ([\w|]+)`", summary).group(1).split("|")
  regenerated = subprocess.run(
      [sys.executable, "-c", "import sys; from benchmarks import report; "
       "report.summary(sys.argv[1:])", *tags], cwd=ROOT, capture_output=True, text=True,
      check=True).stdout
  assert regenerated.strip("\n") == summary.strip("\n"), "summary.md is not what the runs give"

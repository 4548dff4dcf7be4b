"""Markdown for BUILD_NOTES from benchmark JSON: ``python -m benchmarks.report TAG [TAG ...]``.

``python -m benchmarks.report --summary TAG [TAG ...]`` writes the short table of those runs
to ``benchmarks/results/summary.md`` (and prints it): the one generated place every number
of README.md and docs/performance.md comes from. ``python -m benchmarks.report --quote``
copies that file into both, between the markers ``<!-- summary.md -->`` and
``<!-- /summary.md -->`` (``tests/test_docs.py`` checks that the copies are current).

For each tag, reads ``benchmarks/results/bench_step_TAG.json`` (and ``bench_grid_TAG.json`` if
present) and prints: the runs (command, date, load), one table of the targets with the
round-paired ratio of every run side by side, and the per-problem tables of the last run.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from benchmarks._timing import rows_ratio

RESULTS = Path(__file__).parent / "results"
SUMMARY = RESULTS / "summary.md"
QUOTED_IN = [Path(__file__).parents[1] / "README.md",
             Path(__file__).parents[1] / "docs" / "performance.md"]
BEGIN, END = "<!-- summary.md -->", "<!-- /summary.md -->"


def quoted(text: str) -> str:
  """The part of ``text`` between the summary markers."""
  return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def quote() -> None:
  """Copies ``summary.md`` between the markers of every file in ``QUOTED_IN``."""
  table = SUMMARY.read_text().strip("\n")
  for path in QUOTED_IN:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def _load(kind: str, tag: str) -> dict | None:
  path = RESULTS / f"bench_{kind}_{tag}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _runs(tags: list[str]) -> None:
  print("| tag | command | date (UTC) | load start → end | CPU kernel | grid speed-up |")
  print("|---|---|---|---|---|---|")
  for tag in tags:
    s, g = _load("step", tag), _load("grid", tag)
    m = s["machine"]
    grid = f"{g['speedup_vs_python_loop']:.1f}×" if g else "-"
    print(f"| {tag} | `{s['command']}` | {s['date_utc']} | {m['loadavg_start'][0]:.1f} → "
          f"{m['loadavg_end'][0]:.1f} | {m.get('cpu_kernel', '-')} | {grid} |")


def _targets(tags: list[str]) -> None:
  runs = [_load("step", tag)["summary"]["checks"] for tag in tags]
  keys = []
  for checks in runs:
    for c in checks:
      key = (c["table"], c["a"], c["b"], str(c["target"]))
      if key not in keys:
        keys.append(key)
  print("| problem | a | b | target | " + " | ".join(tags) + " |")
  print("|---|---|---|---|" + "---|" * len(tags))
  for key in keys:
    cells = []
    for checks in runs:
      c = next((c for c in checks if (c["table"], c["a"], c["b"], str(c["target"])) == key),
               None)
      cells.append("-" if c is None else f"{c['ratio']:.3f}{'' if c['met'] else ' ✗'}")
    target = key[3] if not key[3].replace(".", "").isdigit() else f"≤ {key[3]}"
    print(f"| {key[0]} | {key[1]} | {key[2]} | {target} | " + " | ".join(cells) + " |")


def _tables(tag: str) -> None:
  s = _load("step", tag)
  for key, t in s["tables"].items():
    print(f"\n**{key}** ({t['n']:,} params; stream {t['stream_GBps']:.1f} GB/s → limit "
          f"{t['limit_s'] * 1e3:.2f} ms), run `{tag}`\n")
    print("| contender | median ms | eff GB/s | × torch fused | × limit | peak − (θ+g+m+v) |"
          " compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in sorted(t["rows"].items(), key=lambda kv: kv[1]["median_s"]):
      tf = f"{r['x_torch_fused']:.2f}" if r.get("x_torch_fused") else "-"
      extra = (f"{r['peak_extra_bytes'] / 2**20:.2f} MiB" if "peak_extra_bytes" in r else "-")
      comp = f"{r['compile_s']:.2f}" if "compile_s" in r else "-"
      print(f"| {name} | {r['median_s'] * 1e3:.3f} | {r['eff_GBps']:.1f} | {tf} | "
            f"{r['x_limit']:.2f} | {extra} | {comp} |")


def summary(tags: list[str]) -> None:
  """The README's short table: one row per problem, "run 1 / run 2 / ..." in each cell."""
  runs = [_load("step", tag) for tag in tags]
  fused, torch, optax = "od.fused_step(od.adamw)", "torch AdamW fused", "optax.adamw"
  m = runs[0]["machine"]
  loads = ", ".join(f"{r['machine']['loadavg_start'][0]:.1f}-{r['machine']['loadavg_end'][0]:.1f}"
                    for r in runs)
  print(f"{len(runs)} run(s) of `python benchmarks/run.py --tag {'|'.join(tags)}`, "
        f"{', '.join(r['date_utc'] for r in runs)} UTC, on {m['cpus']} cores "
        f"({m['platform']}), jax {m['jax']}, optax {m['optax']}, torch {m.get('torch', '-')} "
        f"({m.get('torch_threads', '-')} threads), kernel {m.get('cpu_kernel', '-')}; load "
        f"average {loads}. \"run 1 / run 2 / ...\" in each cell; times are medians, ratios "
        "round-paired medians (`od.fused_step` is the kernel here; the `bf16` row has bfloat16 "
        "weights and gradients with float32 moments, against torch's float32 step).\n")
  cols = [
      ("od.fused_step ms", lambda r: r[fused]["median_s"] * 1e3, "{:.2f}"),
      ("torch fused ms", lambda r: r[torch]["median_s"] * 1e3, "{:.2f}"),
      ("optax.adamw ms", lambda r: r[optax]["median_s"] * 1e3, "{:.2f}"),
      ("fused ÷ torch fused", lambda r: rows_ratio(r, fused, torch), "{:.2f}"),
      ("fused ÷ stream limit", lambda r: r[fused]["x_limit"], "{:.2f}"),
      ("od.adamw ÷ optax", lambda r: rows_ratio(r, "od.adamw", optax), "{:.2f}"),
      ("A/A noise", lambda r: rows_ratio(r, "optax.adamw (A/A copy)", optax), "{:.2f}"),
  ]
  print("| problem | " + " | ".join(c[0] for c in cols) + " |")
  print("|---|" + "---|" * len(cols))
  for key in runs[0]["tables"]:
    if key.startswith("recipes"):  # other contenders: their own lines below
      continue
    cells = []
    for _, fn, fmt in cols:
      vals = []
      for run in runs:
        try:
          vals.append(fn(run["tables"][key]["rows"]))
        except KeyError:  # a table without that contender (e.g. the bfloat16 one)
          vals.append(None)
      cells.append(" / ".join("-" if v is None else fmt.format(v) for v in vals))
    print(f"| {key} | " + " | ".join(cells) + " |")
  tree = [run["tables"].get("tree 198 leaves", {}).get("rows", {}) for run in runs]
  for a, b in [("od.fused_step, flat buffer (masked)", "od.fused_step, 1 flat leaf"),
               ("od.fused_step, flat buffer (masked)", torch),
               ("od.fused_step(od.adamw)", "od.fused_step, 1 flat leaf"),
               ("od.adamw", "od.adamw, 1 flat leaf")]:
    vals = [rows_ratio(rows, a, b) for rows in tree]
    print(f"\nTree of 198 leaves: {a} ÷ {b}: "
          + " / ".join("-" if v is None else f"{v:.2f}" for v in vals))
  recipes = [next((t["rows"] for k, t in run["tables"].items() if k.startswith("recipes")), {})
             for run in runs]
  for a, b in [("clip + od.adamw, fused", "torch clip + AdamW fused"),
               ("inject(od.adamw), fused", torch), ("optax.adamw, fused", torch),
               ("od.sgdw, fused", "torch SGD foreach"), ("od.sgdw, fused", "od.sgdw, plain")]:
    vals = [rows_ratio(rows, a, b) for rows in recipes]
    if any(v is not None for v in vals):
      print(f"\nRecipes, one leaf of 1e7: {a} ÷ {b}: "
            + " / ".join("-" if v is None else f"{v:.2f}" for v in vals))
  grids = [_load("grid", tag) for tag in tags]
  if any(grids):
    k = next(g["K"] for g in grids if g)
    print(f"\nGrid of K={k} optimizers, vmapped ÷ a Python loop over them (speed-up): "
          + " / ".join("-" if g is None else f"{g['speedup_vs_python_loop']:.1f}×"
                       for g in grids))
  compiles = [max(c.values()) for run in runs if (c := run.get("compilations_over_100_steps"))]
  if compiles:
    print("\nMost compilations of any step over 100 steps (od.adamw, plain and fused; also "
          "with the learning rate and weight decay injected and changed every step): "
          + " / ".join(str(c) for c in compiles))


def main(argv: list[str] | None = None) -> None:
  args = argv if argv is not None else sys.argv[1:]
  if args and args[0] == "--summary":
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      summary(args[1:])
    SUMMARY.write_text(out.getvalue())
    print(out.getvalue(), end="")
    return
  if args == ["--quote"]:
    quote()
    return
  tags = args or ["run1"]
  _runs(tags)
  print("\nTargets: round-paired ratios (median over rounds of a/b within a round); "
        "✗ = missed.\n")
  _targets(tags)
  _tables(tags[-1])


if __name__ == "__main__":
  main()

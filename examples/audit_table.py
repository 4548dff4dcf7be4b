"""The README's audit table: ``od.audit_decay`` on every optax optimizer that takes a decay.

Each optimizer of optax and ``optax.contrib`` with a weight-decay argument is built with
λ = 0.1 (Adafactor's ``weight_decay_rate`` 1e-3) and audited on a small BERT-like tree
(a kernel, a bias, a LayerNorm scale). The table has one row per optimizer: the kind of
decay on the kernel and on the 1-D leaves, the kernel's first-step shrink, and what was seen.
``tests/test_audit.py`` checks each label against the optimizer's source.

Run:  python examples/audit_table.py            (prints the table, about a minute)
      python examples/audit_table.py --write    (replaces the table in README.md)
"""

from __future__ import annotations

import argparse
import pathlib
import warnings

START, END = "<!-- audit-table:start -->", "<!-- audit-table:end -->"
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def optimizers():
  """``{name: optimizer}``: every optax and optax.contrib optimizer taking a weight decay."""
  import optax
  c = optax.contrib
  return {
      "optax.adadelta": optax.adadelta(1.0, weight_decay=0.1),
      "optax.adafactor": optax.adafactor(1e-2, weight_decay_rate=1e-3),
      "optax.adamaxw": optax.adamaxw(1e-3, weight_decay=0.1),
      "optax.adamw": optax.adamw(1e-3, weight_decay=0.1),
      "optax.adan": optax.adan(1e-3, weight_decay=0.1),
      "optax.lamb": optax.lamb(1e-3, weight_decay=0.1),
      "optax.lars": optax.lars(1e-3, weight_decay=0.1),
      "optax.lion": optax.lion(1e-3, weight_decay=0.1),
      "optax.nadamw": optax.nadamw(1e-3, weight_decay=0.1),
      "optax.novograd": optax.novograd(1e-3, weight_decay=0.1),
      "contrib.acprop": c.acprop(1e-3, weight_decay=0.1),
      "contrib.ademamix": c.ademamix(1e-3, weight_decay=0.1),
      "contrib.cocob": c.cocob(1.0, weight_decay=0.1),
      "contrib.dadapt_adamw": c.dadapt_adamw(1.0, weight_decay=0.1),
      "contrib.dog": c.dog(1.0, weight_decay=0.1),
      "contrib.dowg": c.dowg(1.0, weight_decay=0.1),
      "contrib.galore": c.galore(1e-3, weight_decay=0.1),
      "contrib.madgrad": c.madgrad(1e-2, weight_decay=0.1),
      "contrib.mechanize(sgd)": c.mechanize(optax.sgd(1e-2), weight_decay=0.1),
      "contrib.momo": c.momo(1.0, weight_decay=0.1),
      "contrib.momo_adam": c.momo_adam(1e-2, weight_decay=0.1),
      "contrib.muon": c.muon(1e-3, weight_decay=0.1),
      "contrib.prodigy": c.prodigy(1.0, weight_decay=0.1),
      "contrib.schedule_free_adamw": c.schedule_free_adamw(1e-3, weight_decay=0.1),
      "contrib.schedule_free_sgd": c.schedule_free_sgd(1.0, weight_decay=0.1),
      "contrib.simplified_ademamix": c.simplified_ademamix(1e-3, weight_decay=0.1),
      "contrib.sophia": c.sophia(1e-3, weight_decay=0.1),
  }


def table() -> str:
  """The markdown table (one line per optimizer)."""
  import jax.numpy as jnp

  import optax_decoupled as od

  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
            "LayerNorm": {"scale": jnp.ones(2)}}
  lines = ["| optimizer (λ = 0.1) | kernel | bias, LayerNorm scale | kernel shrink | seen |",
           "|---|---|---|---|---|"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name, tx in optimizers().items():
      try:
        report = od.audit_decay(tx, params, probe_steps=())
      except ValueError as e:
        if "cannot be audited from gradients alone" not in str(e):
          raise
        lines.append(f"| `{name}` | — | — | — | refused: its update needs the loss |")
        continue
      rows = {r.path: r for r in report.rows}
      kernel, vectors = rows["dense/kernel"], {rows["dense/bias"].kind,
                                               rows["LayerNorm/scale"].kind}
      shrink = "" if kernel.shrink is None else f"{kernel.shrink:.3g}"
      lines.append(f"| `{name}` | {kernel.kind} | {', '.join(sorted(vectors))} | {shrink} | "
                   f"{kernel.detail.split(';')[0]} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--write", action="store_true",
                      help=f"replace the table between {START} and {END} in README.md")
  args = parser.parse_args(argv)
  text = table()
  if not args.write:
    print(text)
    return
  readme = README.read_text(encoding="utf-8")
  if START not in readme or END not in readme:
    raise SystemExit(f"README.md has no {START} ... {END} block to replace")
  head, rest = readme.split(START, 1)
  _, tail = rest.split(END, 1)
  README.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")
  print(f"wrote {len(text.splitlines()) - 2} rows to {README}")


if __name__ == "__main__":
  main()

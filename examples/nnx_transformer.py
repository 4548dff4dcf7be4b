"""A small BERT-style encoder in Flax nnx, trained with name-masked AdamW.

Task: masked-character modelling (BERT's MLM objective, one character per token)
on Python's own standard-library sources, read from the installed module files
(no download). Training text comes from one set of modules, the held-out text
from others. The script prints the weight-decay mask table, trains with a tqdm
progress bar (showing the running loss), evaluates on the held-out split, writes
``loss_curve.png`` and ``metrics.json`` into ``--out``, and can checkpoint and resume
with orbax (bitwise-identical to an uninterrupted run). Each checkpoint is saved with the
flags that define the run (``config_<step>.json``); ``--resume`` with other flags stops
with a one-line error naming them.

Run (about two minutes on 2 CPU cores)::

    python examples/nnx_transformer.py                        # AdamW, BERT mask
    python examples/nnx_transformer.py --no-mask              # decay every parameter
    python examples/nnx_transformer.py --mask hf              # HF Trainer's rule
    python examples/nnx_transformer.py --optimizer adam_l2    # Adam + coupled L2
    python examples/nnx_transformer.py --stop-after 600       # checkpoint at 600, stop
    python examples/nnx_transformer.py --resume               # continue from it
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import time
from typing import Any


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
  p.add_argument("--quick", action="store_true", help="tiny model and 20 steps (tests)")
  p.add_argument("--optimizer", choices=("adamw", "adam_l2"), default="adamw")
  p.add_argument("--weight-decay", type=float, default=0.1, help="λ (default 0.1)")
  p.add_argument("--mask", choices=("bert", "hf", "nanogpt", "stacked"), default="bert",
                 help="exclusion preset: BERT names (default), HF Trainer (LayerNorm modules "
                 "and norm/bias names), nanoGPT (ndim >= 2), stacked (ndim >= 2 minus norms "
                 "and biases, safe for stacked layers)")
  p.add_argument("--no-mask", action="store_true", help="decay every parameter")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="out/nnx_transformer", help="output directory")
  p.add_argument("--checkpoint-every", type=int, default=0,
                 help="save a checkpoint every N steps (0: only with --stop-after)")
  p.add_argument("--stop-after", type=int, default=0,
                 help="save a checkpoint after this many steps and exit (simulates a crash); "
                 "N must be below the run's length (--steps)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in OUT/checkpoints; the flags that "
                 "define the run (--quick, --steps, --optimizer, --weight-decay, --mask, "
                 "--no-mask, --seed) must be those of the saved run")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
  return p.parse_args(argv)


if __name__ == "__main__":
  parse_args()  # --help and usage errors answer before jax, flax and orbax are imported.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import optax_decoupled as od  # noqa: E402
import optax_decoupled.flax as odf  # noqa: E402

# ---------------------------------------------------------------------------- data

TRAIN_MODULES = (
    "os", "inspect", "argparse", "typing", "functools", "collections", "pathlib",
    "subprocess", "logging", "threading", "tarfile", "email.message", "json.decoder",
)
HELD_OUT_MODULES = ("dataclasses", "textwrap", "shutil", "tempfile")

# Printable ASCII (32..126), newline, then [UNK], [MASK]; id 0 is [PAD] (unused).
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(_CHARS) + 3
UNK, MASK = len(_CHARS) + 1, len(_CHARS) + 2
_TABLE = np.full(256, UNK, np.int32)
_TABLE[[ord(c) for c in _CHARS]] = np.arange(1, len(_CHARS) + 1)


def read_sources(modules: tuple[str, ...]) -> np.ndarray:
  """Token ids of the source files of ``modules`` (from the running Python)."""
  texts = []
  for name in modules:
    path = inspect.getsourcefile(importlib.import_module(name))
    with open(path, "rb") as f:
      texts.append(f.read())
  data = np.frombuffer(b"\n".join(texts), np.uint8)
  return _TABLE[data]


def masked_batch(tokens: np.ndarray, seed: int, step: int, batch: int, seq: int, rate: float):
  """BERT's masking for one batch, a pure function of (seed, step).

  Windows start at random offsets; ``rate`` of the positions are targets, of
  which 80% become [MASK], 10% a random character, 10% stay (BERT's
  ``create_masked_lm_predictions``). Returns inputs, targets, target weights.
  """
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq, size=batch)
  x = tokens[starts[:, None] + np.arange(seq)]
  is_target = rng.random((batch, seq)) < rate
  roll = rng.random((batch, seq))
  inputs = np.where(is_target & (roll < 0.8), MASK, x)
  random_chars = rng.integers(1, len(_CHARS) + 1, size=(batch, seq))
  inputs = np.where(is_target & (roll >= 0.8) & (roll < 0.9), random_chars, inputs)
  return inputs.astype(np.int32), x.astype(np.int32), is_target.astype(np.float32)


# --------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class Config:
  dim: int = 128
  heads: int = 4
  layers: int = 2
  mlp: int = 512
  seq: int = 64
  batch: int = 32
  steps: int = 1500
  lr: float = 2e-3
  warmup: int = 100
  mask_rate: float = 0.15
  eval_batches: int = 20


QUICK = Config(dim=32, heads=2, layers=1, mlp=64, seq=32, batch=8, steps=20, warmup=4,
               eval_batches=2)


class EncoderLayer(nnx.Module):
  """Post-LN BERT layer: attention, add & LayerNorm, GELU MLP, add & LayerNorm."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.attention = nnx.MultiHeadAttention(
        num_heads=cfg.heads, in_features=cfg.dim, decode=False, rngs=rngs)
    self.attention_layer_norm = nnx.LayerNorm(cfg.dim, epsilon=1e-12, rngs=rngs)
    self.intermediate = nnx.Linear(cfg.dim, cfg.mlp, rngs=rngs)
    self.output = nnx.Linear(cfg.mlp, cfg.dim, rngs=rngs)
    self.output_layer_norm = nnx.LayerNorm(cfg.dim, epsilon=1e-12, rngs=rngs)

  def __call__(self, x):
    x = self.attention_layer_norm(x + self.attention(x))
    return self.output_layer_norm(x + self.output(jax.nn.gelu(self.intermediate(x))))


class Encoder(nnx.Module):
  """Token + position embeddings, LayerNorm, encoder layers, an MLM head."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.token_embeddings = nnx.Embed(VOCAB, cfg.dim, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.seq, cfg.dim, rngs=rngs)
    self.embeddings_layer_norm = nnx.LayerNorm(cfg.dim, epsilon=1e-12, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.layers)])
    self.head_transform = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.head_layer_norm = nnx.LayerNorm(cfg.dim, epsilon=1e-12, rngs=rngs)
    self.decoder = nnx.Linear(cfg.dim, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[-1])
    x = self.token_embeddings(tokens) + self.position_embeddings(positions)
    x = self.embeddings_layer_norm(x)
    for layer in self.layers:
      x = layer(x)
    x = self.head_layer_norm(jax.nn.gelu(self.head_transform(x)))
    return self.decoder(x)


def masked_loss(model, inputs, targets, weights):
  """Mean cross-entropy over the target positions, and their accuracy."""
  logits = model(inputs)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n = jnp.maximum(weights.sum(), 1.0)
  acc = ((logits.argmax(-1) == targets) * weights).sum() / n
  return (ce * weights).sum() / n, acc


# ---------------------------------------------------------------------- training

def make_optimizer(args, cfg: Config, model: Encoder):
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps)
  presets = {"bert": odf.bert_mask, "hf": lambda: odf.hf_trainer_mask(model),
             "nanogpt": odf.nanogpt_mask, "stacked": lambda: odf.stacked_ndim_mask(model)}
  mask = None if args.no_mask else presets[args.mask]()
  if args.optimizer == "adamw":
    tx = od.adamw(schedule, weight_decay=args.weight_decay, mask=mask)
  else:
    tx = od.adam_l2(schedule, weight_decay=args.weight_decay, mask=mask)
  return nnx.Optimizer(model, tx, wrt=nnx.Param), mask


def evaluate(eval_step, model, tokens, cfg: Config, seed: int):
  losses, accs = [], []
  for i in range(cfg.eval_batches):
    loss, acc = eval_step(model, *masked_batch(tokens, seed + 1, i, cfg.batch, cfg.seq,
                                               cfg.mask_rate))
    losses.append(float(loss))
    accs.append(float(acc))
  return float(np.mean(losses)), float(np.mean(accs))


def plot(history: dict, path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  steps = np.arange(1, len(history["train_loss"]) + 1)
  ax.plot(steps, history["train_loss"], lw=0.6, alpha=0.5, label="train (per step)")
  k = max(1, len(steps) // 50)
  smooth = np.convolve(history["train_loss"], np.ones(k) / k, mode="valid")
  ax.plot(steps[k - 1:], smooth, label=f"train ({k}-step mean)")
  if history["eval"]:
    ax.plot(*zip(*[(s, loss) for s, loss, _ in history["eval"]]), "o-", label="held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("masked-char cross-entropy")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# The flags that define a run: a checkpoint only continues the run that had the same ones.
RUN_FLAGS = {"quick": "--quick", "steps": "--steps", "optimizer": "--optimizer",
             "weight_decay": "--weight-decay", "mask": "--mask/--no-mask", "seed": "--seed"}


def run_flags(args, cfg: Config) -> dict[str, Any]:
  """The values of :data:`RUN_FLAGS` for this run (``steps`` as resolved, ``mask`` None for
  --no-mask), saved next to every checkpoint and compared on --resume."""
  return {"quick": args.quick, "steps": cfg.steps, "optimizer": args.optimizer,
          "weight_decay": args.weight_decay, "mask": None if args.no_mask else args.mask,
          "seed": args.seed}


def _flag_text(key: str, value: Any) -> str:
  if key == "quick":
    return "--quick" if value else "no --quick"
  if key == "mask":
    return "--no-mask" if value is None else f"--mask {value}"
  return f"{RUN_FLAGS[key]} {value}"


def flag_mismatches(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """``"--weight-decay 0.01 (this run: --weight-decay 0.1)"`` for each flag that differs."""
  return [f"{_flag_text(k, saved.get(k))} (this run: {_flag_text(k, now[k])})"
          for k in RUN_FLAGS if saved.get(k) != now[k]]


def latest_checkpoint_step(ckpt_dir: str) -> int | None:
  """The newest step with a complete checkpoint (its history file is written last)."""
  steps = []
  if os.path.isdir(ckpt_dir):
    for name in os.listdir(ckpt_dir):
      stem, ext = os.path.splitext(name)
      if name.startswith("history_") and ext == ".json" and stem[8:].isdigit():
        steps.append(int(stem[8:]))
  return max(steps, default=None)


def fail(message: str) -> None:
  """Exits with a one-line error (exit status 1, no traceback)."""
  raise SystemExit(f"{os.path.basename(__file__)}: error: {message}")


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = QUICK if args.quick else Config()
  if args.steps is not None:
    cfg = dataclasses.replace(cfg, steps=args.steps, warmup=min(cfg.warmup, args.steps // 4))
  if args.stop_after < 0 or args.checkpoint_every < 0:
    fail("--stop-after and --checkpoint-every take N >= 0 (0: off).")
  if args.stop_after >= cfg.steps:
    fail(f"--stop-after {args.stop_after} is not before the end of the run ({cfg.steps} steps"
         f"{' with --quick' if args.quick and args.steps is None else ''}): nothing would be "
         f"stopped or checkpointed. Use --stop-after N with N < {cfg.steps}, or drop it.")
  flags = run_flags(args, cfg)
  ckpt_dir = os.path.join(args.out, "checkpoints")
  resume_step = None
  if args.resume:  # checked before anything is built or restored
    resume_step = latest_checkpoint_step(ckpt_dir)
    if resume_step is None:
      fail(f"--resume: no checkpoint in {ckpt_dir}; make one with --stop-after N or "
           "--checkpoint-every N (same --out).")
    config_path = os.path.join(ckpt_dir, f"config_{resume_step}.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        bad = flag_mismatches(json.load(f), flags)
      if bad:
        fail(f"--resume: the checkpoint at step {resume_step} in {ckpt_dir} belongs to another "
             f"run: {'; '.join(bad)}. Resume with the saved flags.")
    else:
      print(f"note: no {os.path.basename(config_path)} next to the checkpoint; the flags are "
            "not checked against the saved run")
    if args.stop_after and args.stop_after <= resume_step:
      fail(f"--stop-after {args.stop_after}: the checkpoint is already at step {resume_step}; "
           f"use N between {resume_step + 1} and {cfg.steps - 1}, or drop it.")
  os.makedirs(args.out, exist_ok=True)

  train_tokens, eval_tokens = read_sources(TRAIN_MODULES), read_sources(HELD_OUT_MODULES)
  print(f"data: {len(train_tokens):,} training characters ({len(TRAIN_MODULES)} stdlib "
        f"modules), {len(eval_tokens):,} held-out ({', '.join(HELD_OUT_MODULES)})")

  model = Encoder(cfg, nnx.Rngs(args.seed))
  optimizer, mask = make_optimizer(args, cfg, model)
  print(od.describe_mask(nnx.state(model, nnx.Param), mask))

  train_step = odf.nnx_train_step(masked_loss, has_aux=True)
  eval_step = nnx.jit(masked_loss)
  history = {"train_loss": [], "eval": []}
  start = 0
  if args.resume:
    start, state = odf.restore_checkpoint(ckpt_dir, nnx.state((model, optimizer)),
                                          step=resume_step)
    nnx.update((model, optimizer), state)
    with open(os.path.join(ckpt_dir, f"history_{start}.json")) as f:
      history = json.load(f)
    print(f"resumed from step {start} ({ckpt_dir})")

  def checkpoint(step: int) -> None:
    odf.save_checkpoint(ckpt_dir, step, nnx.state((model, optimizer)))
    with open(os.path.join(ckpt_dir, f"config_{step}.json"), "w") as f:
      json.dump(flags, f)
    with open(os.path.join(ckpt_dir, f"history_{step}.json"), "w") as f:  # written last
      json.dump(history, f)

  from tqdm import tqdm

  end = min(cfg.steps, args.stop_after) if args.stop_after else cfg.steps
  t0 = time.perf_counter()
  bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=args.no_progress,
             file=sys.stdout, mininterval=1.0)
  for step in bar:
    batch = masked_batch(train_tokens, args.seed, step, cfg.batch, cfg.seq, cfg.mask_rate)
    loss, _ = train_step(model, optimizer, *batch)
    history["train_loss"].append(float(loss))
    if (step + 1) % max(1, cfg.steps // 5) == 0 or step + 1 == cfg.steps:
      history["eval"].append((step + 1, *evaluate(eval_step, model, eval_tokens, cfg, args.seed)))
    # The running loss (mean of the last 20 steps), shown at the bar's next redraw.
    bar.set_postfix(loss=f"{np.mean(history['train_loss'][-20:]):.3f}", refresh=False)
    if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
      checkpoint(step + 1)
  bar.close()
  seconds = time.perf_counter() - t0

  if args.stop_after and end < cfg.steps:
    checkpoint(end)
    print(f"stopped after step {end}; checkpoint in {ckpt_dir}; continue with --resume")
    return {"stopped_at": end}

  eval_loss, eval_acc = evaluate(eval_step, model, eval_tokens, cfg, args.seed)
  label = f"{args.optimizer}, λ={args.weight_decay}, mask={'none' if args.no_mask else args.mask}"
  result = {
      "optimizer": args.optimizer,
      "weight_decay": args.weight_decay,
      "mask": None if args.no_mask else repr(mask),
      "steps": cfg.steps,
      "seed": args.seed,
      "held_out_loss": eval_loss,
      "held_out_accuracy": eval_acc,
      "train_loss_last_100": float(np.mean(history["train_loss"][-100:])),
      "train_seconds_this_run": seconds,
      "resumed_from": start if args.resume else None,
  }
  print(f"held-out masked-char loss {eval_loss:.4f}, accuracy {eval_acc:.4f} ({label}; "
        f"{cfg.steps} steps, {seconds:.1f} s of training in this run)")
  with open(os.path.join(args.out, "metrics.json"), "w") as f:
    json.dump({**result, "history": history}, f)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state((model, optimizer))))
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
  np.savez(os.path.join(args.out, "final_state.npz"), **flat)
  plot(history, os.path.join(args.out, "loss_curve.png"), label)
  print(f"wrote {args.out}/loss_curve.png, metrics.json, final_state.npz")
  return result


if __name__ == "__main__":
  main()

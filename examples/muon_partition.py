"""Muon on the hidden matrices, AdamW on the rest: optimizer groups from mask predicates.

The Moonlight / modded-nanoGPT split: ``optax.contrib.muon`` for every 2-D weight matrix
inside the blocks, AdamW (BERT's exclusions: no decay on LayerNorm parameters nor biases)
for the embeddings, the output head, norms and biases. The groups are written with the
same predicates as decay masks and handed to ``optax.multi_transform`` through
``labels``::

    hidden = (od.min_ndim(2) & ~od.min_ndim(3)                # exactly 2-D,
              & odf.exclude_module_types(model, nnx.Embed)    # not an embedding,
              & od.exclude_names(r"^head/"))                  # not the output head
    tx = optax.multi_transform(
        {"muon": optax.contrib.muon(lr, weight_decay=0.1, consistent_rms=0.2),
         "adamw": od.adamw(lr, weight_decay=0.1, mask=odf.bert_mask())},
        od.labels({"muon": hidden}, default="adamw"))

Task: next-character prediction on the source of Python's ``inspect`` module, read from
the running interpreter (no download); the last tenth of the file is held out. A small
pre-LN transformer (token and position embeddings, causal attention and MLP blocks with
biases, an output head) is trained twice from the same initialization, with AdamW alone
and with the Muon/AdamW split, and both losses are printed with the label table.

Run (about a minute on 2 CPU cores)::

    python examples/muon_partition.py                # 300 steps
    python examples/muon_partition.py --steps 1000
    python examples/muon_partition.py --quick        # a tiny model, a few steps (the test)

References: Jordan, modded-nanogpt (2024), https://github.com/KellerJordan/modded-nanogpt;
Liu et al., Muon is Scalable for LLM Training (Moonlight), https://arxiv.org/abs/2502.16982.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import time

QUICK_STEPS = 25  # the --quick run's length


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
  p.add_argument("--quick", action="store_true",
                 help=f"tiny model, {QUICK_STEPS} steps (tests)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)



if __name__ == "__main__":
  parse_args()  # --help and usage errors answer before jax and flax are imported.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import optax_decoupled as od  # noqa: E402
import optax_decoupled.flax as odf  # noqa: E402

# Printable ASCII (32..126) and newline; id 0 is any other byte.
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(_CHARS) + 1
_TABLE = np.zeros(256, np.int32)
_TABLE[[ord(c) for c in _CHARS]] = np.arange(1, VOCAB)


def read_text() -> tuple[np.ndarray, np.ndarray]:
  """Token ids of ``inspect``'s source: the first 90% for training, the rest held out."""
  with open(inspect.getsourcefile(inspect), "rb") as f:
    tokens = _TABLE[np.frombuffer(f.read(), np.uint8)]
  cut = int(0.9 * len(tokens))
  return tokens[:cut], tokens[cut:]


def batch(tokens: np.ndarray, seed: int, step: int, size: int, seq: int):
  """Random windows, a pure function of (seed, step): inputs and next-character targets."""
  starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq - 1, size=size)
  x = tokens[starts[:, None] + np.arange(seq + 1)]
  return jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:])


@dataclasses.dataclass(frozen=True)
class Config:
  dim: int = 64
  heads: int = 4
  layers: int = 2
  seq: int = 64
  batch: int = 32
  steps: int = 300
  warmup: int = 30
  lr: float = 3e-3
  weight_decay: float = 0.1


QUICK = Config(dim=32, heads=2, layers=2, seq=32, batch=16, steps=QUICK_STEPS, warmup=3)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal attention from four ``nnx.Linear`` layers (2-D kernels, biases)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.heads = cfg.heads
    self.query = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.key = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.value = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
    self.out = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.out(y.reshape(b, t, d))


class Block(nnx.Module):
  """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.attention_layer_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.attention = CausalSelfAttention(cfg, rngs)
    self.mlp_layer_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.mlp_in = nnx.Linear(cfg.dim, 4 * cfg.dim, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * cfg.dim, cfg.dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.attention_layer_norm(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_layer_norm(x))))


class CharModel(nnx.Module):
  """Token + position embeddings, blocks, a final LayerNorm and an output head."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.token_embedding = nnx.Embed(VOCAB, cfg.dim, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.seq, cfg.dim, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
    self.final_layer_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
    self.head = nnx.Linear(cfg.dim, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.token_embedding(tokens) + self.position_embedding(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.final_layer_norm(x))


def loss_fn(model, inputs, targets):
  return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()


def muon_labels(model: CharModel):
  """The split: "muon" for exactly-2-D matrices outside embeddings and the head, else
  "adamw". Built from the same predicates as weight-decay masks."""
  hidden = (od.min_ndim(2) & ~od.min_ndim(3)
            & odf.exclude_module_types(model, nnx.Embed)
            & od.exclude_names(r"^head/"))
  return od.labels({"muon": hidden}, default="adamw")


def make_tx(kind: str, cfg: Config, model: CharModel) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps)
  adamw = od.adamw(schedule, weight_decay=cfg.weight_decay, mask=odf.bert_mask())
  if kind == "adamw":
    return adamw
  # Moonlight: Muon's update scaled to AdamW's RMS (0.2·sqrt(max(fan_in, fan_out))), so both
  # groups share the learning rate and λ; optax's Muon decay is lr-coupled, like od.adamw's.
  muon = optax.contrib.muon(schedule, weight_decay=cfg.weight_decay, consistent_rms=0.2)
  return optax.multi_transform({"muon": muon, "adamw": adamw}, muon_labels(model))


def train(kind: str, cfg: Config, data: np.ndarray, held_out: np.ndarray, seed: int) -> dict:
  model = CharModel(cfg, nnx.Rngs(seed))  # the same initialization for every optimizer
  optimizer = nnx.Optimizer(model, make_tx(kind, cfg, model), wrt=nnx.Param)
  step_fn = odf.nnx_train_step(loss_fn)
  t0 = time.perf_counter()
  losses = [float(step_fn(model, optimizer, *batch(data, seed, t, cfg.batch, cfg.seq)))
            for t in range(cfg.steps)]
  seconds = time.perf_counter() - t0
  eval_fn = nnx.jit(loss_fn)
  held = float(np.mean([eval_fn(model, *batch(held_out, seed + 1, i, cfg.batch, cfg.seq))
                        for i in range(4)]))
  return {"losses": losses, "held_out_loss": held, "seconds": seconds}


def main(argv=None) -> dict:
  """Trains both optimizers; returns their losses and the label of every parameter path."""
  args = parse_args(argv)
  cfg = QUICK if args.quick else Config()
  if args.steps is not None:
    if args.steps < 1:
      raise SystemExit("muon_partition.py: error: --steps takes N >= 1.")
    cfg = dataclasses.replace(cfg, steps=args.steps, warmup=min(cfg.warmup, args.steps // 4))
  data, held_out = read_text()
  print(f"data: {len(data):,} training / {len(held_out):,} held-out characters of "
        f"{inspect.getsourcefile(inspect)}")

  model = CharModel(cfg, nnx.Rngs(args.seed))
  params = nnx.state(model, nnx.Param)
  split = muon_labels(model)
  print(split.describe(params))
  label_of = {p: lab for p, _, lab, _ in split.decisions(params)}

  results = {}
  for kind, name in (("adamw", "AdamW (BERT exclusions)"),
                     ("muon", "Muon on hidden matrices + AdamW on the rest")):
    r = train(kind, cfg, data, held_out, args.seed)
    results[kind] = r
    print(f"{name}: loss {r['losses'][0]:.3f} at step 1 -> "
          f"{np.mean(r['losses'][-10:]):.3f} (mean of the last 10 of {cfg.steps} steps), "
          f"held-out {r['held_out_loss']:.3f}; {r['seconds']:.1f} s")
  return {**results, "labels": label_of, "steps": cfg.steps}


if __name__ == "__main__":
  main()

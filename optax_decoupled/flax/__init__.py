"""Flax helpers: module-type masks, presets, jitted train steps, orbax checkpoints.

The only module of ``optax_decoupled`` that imports flax (install the
``flax`` extra); the core imports without it. Import it as::

    import optax_decoupled as od
    import optax_decoupled.flax as odf

nnx, the pattern this module supports end to end::

    model = MyModel(rngs=nnx.Rngs(0))
    mask = odf.hf_trainer_mask(model)            # transformers' Trainer rule
    optimizer = nnx.Optimizer(model, od.adamw(1e-3, weight_decay=0.01, mask=mask),
                              wrt=nnx.Param)
    train_step = odf.nnx_train_step(loss_fn)     # nnx.jit, donated buffers
    loss = train_step(model, optimizer, x, y)

linen, with ``flax.training.train_state.TrainState``::

    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=od.adamw(1e-3, weight_decay=0.01,
                                          mask=od.exclude_names(*od.BERT_EXCLUDE)))
    train_step = odf.linen_train_step(loss_fn)   # jax.jit, donated state
    state, loss = train_step(state, x, y)

Mask paths are the strings ``od`` builds from key paths (``_paths.path_to_str``):
for nnx, the attribute path in ``nnx.state(model, nnx.Param)``, e.g.
``blocks/0/attn_norm/scale``; for linen, the key path in ``params``. A linen
model whose submodules carry the same names as the nnx attributes has the
same paths, hence the same mask, under any name predicate.
"""

from optax_decoupled.flax._checkpoints import restore_checkpoint as restore_checkpoint
from optax_decoupled.flax._checkpoints import save_checkpoint as save_checkpoint
from optax_decoupled.flax._name_presets import bert_mask as bert_mask
from optax_decoupled.flax._name_presets import nanogpt_mask as nanogpt_mask
from optax_decoupled.flax._name_presets import timm_mask as timm_mask
from optax_decoupled.flax._presets import NORM_TYPES as NORM_TYPES
from optax_decoupled.flax._presets import exclude_module_types as exclude_module_types
from optax_decoupled.flax._presets import hf_trainer_mask as hf_trainer_mask
from optax_decoupled.flax._presets import norm_and_bias_mask as norm_and_bias_mask
from optax_decoupled.flax._presets import stacked_ndim_mask as stacked_ndim_mask
from optax_decoupled.flax._train import linen_train_step as linen_train_step
from optax_decoupled.flax._train import nnx_train_step as nnx_train_step

__all__ = [
    "NORM_TYPES",
    "bert_mask",
    "exclude_module_types",
    "hf_trainer_mask",
    "linen_train_step",
    "nanogpt_mask",
    "nnx_train_step",
    "norm_and_bias_mask",
    "restore_checkpoint",
    "save_checkpoint",
    "stacked_ndim_mask",
    "timm_mask",
]

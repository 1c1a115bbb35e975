"""Training: the train state, the compiled step, and the loop.

**Where the EMA target lives** (everything ``jepa_ema`` does in the demo, in
:func:`build` and nowhere else):

* ``ema_of(momenta)`` makes the target: ``jepa_ema.ema(schedule, drift=True)``
  whose schedule is a lookup in ``momenta``, the run's table of per-step
  momenta. The table is an *argument* of the compiled step, so every momentum
  (the EMA run, the momentum-0 run, every point of the sweep) shares one
  compilation.
* ``init_state`` starts the target as a copy of the context encoder
  (``ema_of(...).init(params["encoder"])``, in :class:`TrainState` ``.ema``).
* ``loss_fn`` reads it (``state.ema.target``) as the target encoder's
  parameters, under ``stop_gradient``.
* ``train_step`` advances it after the optimizer step
  (``ema_of(momenta).update(params["encoder"], state.ema)``), inside the
  jitted, state-donating ``train_chunk`` (``lax.scan`` over 100 steps).

:func:`train_run` drives one run (checkpoints, curves, progress bar) and
evaluates its frozen target encoder; :func:`encoder_metrics` evaluates any
encoder's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jepa_ema
from ijepa_digits.checkpoints import Checkpointer, tree_digest
from ijepa_digits.config import Config
from ijepa_digits.data import NUM_TOKENS, PATCH_DIM
from ijepa_digits.evaluation import embedding_std, evaluate
from ijepa_digits.masks import sample_masks
from ijepa_digits.model import Encoder, Predictor


# --8<-- [start:state]
class TrainState(NamedTuple):
  step: jax.Array
  params: Any  # {"encoder": ..., "predictor": ...}
  opt_state: Any
  ema: jepa_ema.EmaState  # EMA of params["encoder"]: the target encoder
  rng: jax.Array  # raw uint32 key (checkpoint-friendly)
  curves: dict[str, jax.Array]
  tracked: tuple = ()  # power EMAs of params["encoder"] (Config.track)


# --8<-- [end:state]


class Model(NamedTuple):
  """What every run of one architecture shares, each compiled once."""

  init_state: Callable[[int], TrainState]
  train_chunk: Callable[..., tuple[TrainState, jax.Array]]
  embed: Callable[[Any, jax.Array], jax.Array]


def optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay to 1 % of the peak lr."""
  lr = optax.warmup_cosine_decay_schedule(
    0.0,
    cfg.lr,
    cfg.warmup,
    max(cfg.steps, cfg.warmup + 1),
    end_value=cfg.lr / 100,
  )
  return optax.adamw(lr, weight_decay=cfg.weight_decay)


def draw_batch(
  cfg: Config, rng: jax.Array, step: jax.Array, x_train: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Step ``step``'s batch of images and masks, ``(x, ctx_idx, tgt_idx)``:
  a pure function of the run's key and the step (so a resume redraws it)."""
  k_batch, k_mask = jax.random.split(jax.random.fold_in(rng, step))
  x = x_train[
    jax.random.randint(k_batch, (cfg.batch_size,), 0, x_train.shape[0])
  ]
  ctx_idx, tgt_idx = sample_masks(
    k_mask, cfg.batch_size, cfg.context, cfg.target_block
  )
  return x, ctx_idx, tgt_idx


def as_targets(z: jax.Array, tgt_idx: jax.Array) -> jax.Array:
  """The target encoder's outputs ``z`` at the target tokens, layer-normed
  (as in I-JEPA) and behind ``stop_gradient``: what the predictor regresses."""
  z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(
    z.var(-1, keepdims=True) + 1e-6
  )
  return jax.lax.stop_gradient(
    jnp.take_along_axis(z, tgt_idx[..., None], axis=1)
  )


def curve_steps(cfg: Config) -> list[int]:
  """The steps at which the target's embedding std is recorded."""
  return sorted(set(range(0, cfg.steps, cfg.chunk)) | {cfg.steps})


@functools.lru_cache(maxsize=4)
def build(cfg: Config) -> Model:
  """Builds the model, optimizer and compiled functions for ``cfg`` (the
  momentum and seed are arguments of the compiled functions, not part of
  them: call with ``dataclasses.replace(cfg, momentum="", seed=0)``)."""
  encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
  predictor = Predictor(
    cfg.pred_width, cfg.pred_depth, cfg.heads, cfg.mlp_ratio, cfg.width
  )
  tx = optimizer(cfg)
  n_tgt = cfg.target_block**2
  tracked_ema = (
    jepa_ema.ema(tuple(jepa_ema.power_momentum(sigma_rel=s) for s in cfg.track))
    if cfg.track
    else None
  )

  # --8<-- [start:make]
  def table_schedule(momenta: jax.Array) -> jepa_ema.Schedule:
    # Any callable step -> momentum is a schedule: here a lookup in the
    # run's table, so the table can be a traced argument (one compilation).
    last = momenta.shape[0] - 1
    return lambda step: momenta[jnp.minimum(step, last)]

  def ema_of(momenta: jax.Array) -> jepa_ema.EmaTransformation:
    return jepa_ema.ema(table_schedule(momenta), drift=True)

  # --8<-- [end:make]

  @jax.jit
  def init_state(seed: jax.typing.ArrayLike) -> TrainState:
    k_enc, k_pred, k_run = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
      "encoder": encoder.init(k_enc, jnp.zeros((1, NUM_TOKENS, PATCH_DIM)))[
        "params"
      ],
      "predictor": predictor.init(
        k_pred,
        jnp.zeros((1, cfg.context, cfg.width)),
        jnp.zeros((1, cfg.context), jnp.int32),
        jnp.zeros((1, n_tgt), jnp.int32),
      )["params"],
    }
    curves = {
      "loss": jnp.full(cfg.steps, jnp.nan),
      "momentum": jnp.full(cfg.steps, jnp.nan),
      "drift": jnp.full(cfg.steps, jnp.nan),
      "emb_std": jnp.full(len(curve_steps(cfg)), jnp.nan),
    }
    # --8<-- [start:init]
    ema = ema_of(jnp.zeros(1)).init(params["encoder"])
    # --8<-- [end:init]
    tracked = (
      tracked_ema.init(params["encoder"]) if tracked_ema is not None else ()
    )
    return TrainState(
      jnp.zeros([], jnp.int32),
      params,
      tx.init(params),
      ema,
      k_run,
      curves,
      tracked,
    )

  # --8<-- [start:read]
  def loss_fn(params, target_params, x, ctx_idx, tgt_idx):
    target = encoder.apply({"params": target_params}, x)
    target = as_targets(target, tgt_idx)  # layer-normed, stop-gradient
    # --8<-- [end:read]
    ctx = encoder.apply({"params": params["encoder"]}, x, ctx_idx)
    pred = predictor.apply(
      {"params": params["predictor"]}, ctx, ctx_idx, tgt_idx
    )
    return jnp.mean((pred - target) ** 2)

  def train_step(
    state: TrainState, momenta: jax.Array, x_train: jax.Array
  ) -> tuple[TrainState, jax.Array]:
    x, ctx_idx, tgt_idx = draw_batch(cfg, state.rng, state.step, x_train)
    # --8<-- [start:update]
    loss, grads = jax.value_and_grad(loss_fn)(
      state.params, state.ema.target, x, ctx_idx, tgt_idx
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_ema = ema_of(momenta).update(params["encoder"], state.ema)
    # --8<-- [end:update]
    at = state.step
    curves = {
      **state.curves,
      "loss": state.curves["loss"].at[at].set(loss),
      "momentum": state.curves["momentum"]
      .at[at]
      .set(table_schedule(momenta)(state.ema.step)),
      "drift": state.curves["drift"].at[at].set(new_ema.drift["global"]),
    }
    tracked = (
      tracked_ema.update(params["encoder"], state.tracked)
      if tracked_ema is not None
      else ()
    )
    return TrainState(
      state.step + 1, params, opt_state, new_ema, state.rng, curves, tracked
    ), loss

  # --8<-- [start:chunk]
  @functools.partial(jax.jit, static_argnames="length", donate_argnums=0)
  def train_chunk(
    state: TrainState, momenta: jax.Array, x_train: jax.Array, *, length: int
  ) -> tuple[TrainState, jax.Array]:
    """``length`` train steps in one compiled call."""
    return jax.lax.scan(
      lambda s, _: train_step(s, momenta, x_train), state, None, length=length
    )

  # --8<-- [end:chunk]

  @jax.jit
  def embed(enc_params: Any, patches: jax.Array) -> jax.Array:
    return encoder.apply({"params": enc_params}, patches).mean(axis=1)

  return Model(init_state, train_chunk, embed)


def shared_key(cfg: Config) -> Config:
  """The part of ``cfg`` that the compiled functions depend on."""
  return dataclasses.replace(cfg, momentum="", seed=0)


def train_run(
  name: str,
  cfg: Config,
  momentum: str,
  data: dict,
  ckpt_dir: pathlib.Path | None = None,
  ckpt_every: int = 250,
  progress: bool = True,
  kill_at: tuple[str, int] | None = None,
  on_chunk: Callable[[TrainState], None] | None = None,
  keep_state: bool = False,
) -> dict[str, Any]:
  """Trains one run and evaluates its frozen target encoder.

  ``momentum`` is a ``--momentum`` spec or a schedule; ``on_chunk(state)`` is
  called after every compiled call; ``keep_state`` returns the final state
  under ``"state"``; ``kill_at`` is the :class:`Checkpointer`'s test hook."""
  from tqdm.auto import tqdm

  model = build(shared_key(cfg))
  momenta = jnp.asarray(cfg.momenta(momentum))
  x_train = jnp.asarray(data["x_train"])
  curve_x = jnp.asarray(data["x_train"][:512])
  state = model.init_state(cfg.seed)
  checkpointer = None
  if ckpt_dir is not None:
    fingerprint = json.loads(
      json.dumps(  # as it reads back from disk
        {**dataclasses.asdict(cfg), "momentum": momentum, "run": name},
        default=repr,
      )
    )
    checkpointer = Checkpointer(
      ckpt_dir / name, ckpt_every, fingerprint, kill_at
    )
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state
    )
    restored = checkpointer.restore(abstract)
    if restored is not None:
      state = restored
      print(
        f"[{name}] resumed from step {int(state.step)} in {checkpointer.dir}"
      )

  def with_emb_std(state: TrainState, index: int) -> TrainState:
    """Records the target's embedding std at curve position ``index``."""
    z = np.asarray(model.embed(state.ema.target, curve_x))
    curves = dict(state.curves)
    curves["emb_std"] = curves["emb_std"].at[index].set(embedding_std(z))
    return state._replace(curves=curves)

  # Calls end at multiples of the chunk and of the checkpoint interval.
  stops = set(range(cfg.chunk, cfg.steps, cfg.chunk)) | {cfg.steps}
  if checkpointer is not None:
    stops |= set(range(ckpt_every, cfg.steps, ckpt_every))
  start = int(state.step)
  bar = tqdm(
    total=cfg.steps,
    initial=start,
    desc=f"{name:>8}",
    disable=not progress,
    file=sys.stdout,
    mininterval=0.5,
    dynamic_ncols=True,
  )
  t0 = time.time()
  step = start
  curve_at = curve_steps(cfg)
  if step == 0:
    state = with_emb_std(state, 0)
  for stop in sorted(s for s in stops if s > start):
    state, losses = model.train_chunk(
      state, momenta, x_train, length=stop - step
    )
    step = stop
    if step in curve_at:
      state = with_emb_std(state, curve_at.index(step))
    bar.set_postfix(
      loss=f"{float(losses[-1]):.4f}",
      momentum=f"{float(momenta[step - 1]):.4f}",
      refresh=False,
    )
    bar.update(stop - bar.n)
    if on_chunk is not None:
      on_chunk(state)
    if checkpointer is not None and step < cfg.steps:
      checkpointer.maybe_save(state)  # the last step is saved with its curves
  bar.close()
  if checkpointer is not None:
    checkpointer.maybe_save(state, final=True)
    checkpointer.close()
  train_seconds = time.time() - t0
  # --8<-- [start:evaluate]
  z_train = np.asarray(model.embed(state.ema.target, x_train))
  z_test = np.asarray(
    model.embed(state.ema.target, jnp.asarray(data["x_test"]))
  )
  # --8<-- [end:evaluate]
  result = {
    "metrics": evaluate(
      z_train, z_test, data["y_train"], data["y_test"], cfg.seed
    ),
    "curves": {k: np.asarray(v).tolist() for k, v in state.curves.items()},
    "ema_step": int(state.ema.step),
    "optimizer_step": _optimizer_count(state.opt_state),
    "train_step": int(state.step),
    "target_online_rel_dist": float(state.ema.drift["global"]),
    "target_online_rel_dist_per_module": {
      k: float(v) for k, v in state.ema.drift["per_module"].items()
    },
    "final_state_sha256": tree_digest(state._replace(curves={})),
    "train_seconds": train_seconds,
  }
  if keep_state:
    result["state"] = state
  return result


def _optimizer_count(opt_state: Any) -> int:
  counts = [
    int(s.count)
    for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: hasattr(s, "count") and hasattr(s, "mu")
    )
    if hasattr(s, "count")
  ]
  return counts[0] if counts else -1


def encoder_metrics(
  cfg: Config, enc_params: Any, data: dict
) -> dict[str, float]:
  """:func:`evaluate` of any encoder's parameters (same architecture)."""
  model = build(shared_key(cfg))
  return evaluate(
    np.asarray(model.embed(enc_params, jnp.asarray(data["x_train"]))),
    np.asarray(model.embed(enc_params, jnp.asarray(data["x_test"]))),
    data["y_train"],
    data["y_test"],
    cfg.seed,
  )


def random_init_metrics(cfg: Config, data: dict) -> dict[str, float]:
  """The evaluation of the target encoder before training (its init)."""
  model = build(shared_key(cfg))
  return encoder_metrics(cfg, model.init_state(cfg.seed).ema.target, data)

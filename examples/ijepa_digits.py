"""A tiny I-JEPA on scikit-learn's 8x8 digits, trained on a laptop CPU.

What ``make demo`` runs. It shows ``jepa_ema`` doing its real job: the target
encoder of a JEPA is an EMA of the context encoder (stop-gradient). The EMA
target learns a representation far better than its random initialisation,
and without the EMA (momentum 0: the target is a plain stop-gradient copy of
the online encoder) the representation collapses.

* Data: ``sklearn.datasets.load_digits`` (1797 images, bundled with
  scikit-learn, no download); a fixed stratified 80/20 split; pretraining uses
  only the 1437 training images, without labels. Pixels are standardised with
  the training set's mean and std.
* Model (Flax Linen, optax AdamW, warm-up + cosine decay to 1 % of the peak):
  2x2 patches give 16 tokens on a 4x4 grid with fixed 2-D sin-cos position
  embeddings. The target is one 2x2 block of patches; the context is 6 patches
  drawn at random from the other 12. A ViT context encoder (width 64, 3 blocks,
  4 heads, MLP x4) sees only the context tokens; a narrower predictor (width
  32, 2 blocks) gets them plus positional mask tokens and predicts the target
  encoder's layer-normed outputs at the target block (L2 loss), as in I-JEPA
  (arXiv:2301.08243).
* The target encoder is ``jepa_ema.ema(schedule, drift=True)`` of the context
  encoder, advanced inside the jitted, state-donating train step (100 steps
  per call under ``lax.scan``). The schedule is read from a table of momenta
  that is an *argument* of the compiled step, so every momentum (the EMA run,
  the momentum-0 run, every point of the sweep) shares one compilation.
* Two runs with the same seed: the EMA target (``--momentum``, default
  constant 0.996; ``cosine`` / ``linear`` select the BYOL and I-JEPA ramps to
  1) and the momentum-0 contrast. Each frozen target encoder, the random-init
  encoder and raw pixels get the same evaluation (:func:`evaluate`): cosine
  k-NN (k=5), 1-/5-shot logistic regression (mean over label draws), a
  full-label linear probe, embedding std and effective rank.
* Outputs: a table on stdout, ``ijepa_digits.png`` and ``ijepa_digits.json``.
* ``--checkpoint-dir DIR`` saves the whole train state (params, optimizer
  state, EMA state, step, RNG, curves) with orbax every ``--checkpoint-every``
  steps; running again with the same directory resumes, bit-identically.
* ``--sweep`` trains the momenta 0, 0.9, 0.99, 0.996, 0.999, 0.9999, 1 and the
  cosine and linear ramps over ``--seeds`` and draws ``momentum_sweep.png``.

Usage::

  python examples/ijepa_digits.py                 # 3000 steps per run
  python examples/ijepa_digits.py --quick         # CI smoke run
  python examples/ijepa_digits.py --momentum cosine --checkpoint-dir /tmp/ck
  python examples/ijepa_digits.py --sweep --seeds 0 1 2 --out-dir docs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jepa_ema

GRID = 4  # 8x8 image, 2x2 patches -> 4x4 tokens
NUM_TOKENS = GRID * GRID
PATCH_DIM = 4
SWEEP_MOMENTA = (
  "0.0",
  "0.9",
  "0.99",
  "0.996",
  "0.999",
  "0.9999",
  "1.0",
  "cosine",
  "linear",
)


# --------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 3000
  batch_size: int = 128
  lr: float = 3e-3
  weight_decay: float = 0.05
  warmup: int = 150
  width: int = 64
  depth: int = 3
  heads: int = 4
  mlp_ratio: int = 4
  pred_width: int = 32
  pred_depth: int = 2
  context: int = 6  # context patches, drawn from those outside the target
  target_block: int = 2  # the target is one target_block x target_block block
  chunk: int = 100  # train steps per compiled call (lax.scan)
  # Widths (sigma_rel) of extra power-function EMAs of the context encoder,
  # for post-hoc EMA (examples/posthoc_digits.py); none in the demo.
  track: tuple[float, ...] = ()
  momentum: str = "0.996"
  seed: int = 0

  def schedule(
    self, momentum: str | jepa_ema.Schedule | None = None
  ) -> jepa_ema.Schedule:
    """``momentum`` (default: the config's): a schedule, or a spec string:
    'cosine', 'linear' or a float."""
    spec = self.momentum if momentum is None else momentum
    if callable(spec):
      return spec
    if spec == "cosine":  # BYOL / DINO
      return jepa_ema.cosine_momentum(0.996, 1.0, total_steps=self.steps)
    if spec == "linear":  # I-JEPA
      return jepa_ema.linear_momentum(0.996, 1.0, total_steps=self.steps)
    try:
      value = float(spec)
    except ValueError:
      raise SystemExit(
        f"--momentum must be 'cosine', 'linear' or a float in [0, 1], "
        f"got {spec!r}"
      ) from None
    try:
      return jepa_ema.constant_momentum(value)
    except ValueError as e:
      raise SystemExit(f"--momentum: {e}") from None

  def momenta(
    self, momentum: str | jepa_ema.Schedule | None = None
  ) -> np.ndarray:
    """The schedule's momentum at every step, float32 ``(steps,)``."""
    return np.asarray(
      self.schedule(momentum)(jnp.arange(self.steps)), np.float32
    )


# ----------------------------------------------------------------------- data


def load_data() -> dict[str, np.ndarray]:
  """Digits as (N, 16, 4) standardised patch arrays, with a fixed 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8)
  tr, te = train_test_split(
    np.arange(len(images)),
    test_size=0.2,
    random_state=0,
    stratify=digits.target,
  )
  # One mean and std over all training pixels (per-pixel statistics would
  # divide the always-blank border pixels by ~0).
  images = (images - images[tr].mean()) / images[tr].std()
  patches = images.reshape(-1, GRID, 2, GRID, 2).transpose(0, 1, 3, 2, 4)
  patches = patches.reshape(-1, NUM_TOKENS, PATCH_DIM)
  return {
    "x_train": patches[tr],
    "y_train": digits.target[tr],
    "x_test": patches[te],
    "y_test": digits.target[te],
    "pix_train": images[tr].reshape(len(tr), -1),
    "pix_test": images[te].reshape(len(te), -1),
  }


# ---------------------------------------------------------------------- model


def sincos_positions(width: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings (MAE / I-JEPA), ``(16, width)``:
  half the channels encode the row, half the column."""
  if width % 4:
    raise ValueError(f"width must be a multiple of 4, got {width}")
  freqs = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
  rows, cols = np.divmod(np.arange(NUM_TOKENS), GRID)
  parts = []
  for coord in (rows, cols):
    angle = coord[:, None] * freqs[None, :]
    parts += [np.sin(angle), np.cos(angle)]
  return np.concatenate(parts, axis=1).astype(np.float32)


class Block(nn.Module):
  width: int
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.Dense(self.mlp_ratio * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(h))


class Encoder(nn.Module):
  """ViT over the patch tokens listed in ``idx`` (all 16 if ``idx`` is None)."""

  width: int
  depth: int
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(
    self, patches: jax.Array, idx: jax.Array | None = None
  ) -> jax.Array:
    x = nn.Dense(self.width)(patches) + sincos_positions(self.width)
    if idx is not None:
      x = jnp.take_along_axis(x, idx[..., None], axis=1)
    for _ in range(self.depth):
      x = Block(self.width, self.heads, self.mlp_ratio)(x)
    return nn.LayerNorm()(x)


class Predictor(nn.Module):
  """Context tokens + positional mask tokens -> predictions at the targets."""

  width: int
  depth: int
  heads: int
  mlp_ratio: int
  out: int

  @nn.compact
  def __call__(
    self, ctx: jax.Array, ctx_idx: jax.Array, tgt_idx: jax.Array
  ) -> jax.Array:
    pos = jnp.asarray(sincos_positions(self.width))
    mask_token = self.param(
      "mask_token", nn.initializers.normal(0.02), (self.width,)
    )
    x = jnp.concatenate(
      [nn.Dense(self.width)(ctx) + pos[ctx_idx], mask_token + pos[tgt_idx]],
      axis=1,
    )
    for _ in range(self.depth):
      x = Block(self.width, self.heads, self.mlp_ratio)(x)
    x = nn.LayerNorm()(x[:, ctx.shape[1] :])
    return nn.Dense(self.out)(x)


def sample_masks(
  key: jax.Array, batch: int, context: int = 6, block: int = 2
) -> tuple[jax.Array, jax.Array]:
  """Per image: a random ``block x block`` target block of patches and
  ``context`` context patches drawn uniformly from the rest.

  Returns:
    ``(ctx_idx, tgt_idx)``, int32 token indices of shapes ``(batch, context)``
    and ``(batch, block * block)``.
  """
  if not 1 <= context <= NUM_TOKENS - block * block:
    raise ValueError(
      f"context must be in [1, {NUM_TOKENS - block * block}], got {context}"
    )
  k_pos, k_ctx = jax.random.split(key)
  top_left = jax.random.randint(k_pos, (batch, 2), 0, GRID - block + 1)
  dr, dc = np.divmod(np.arange(block * block), block)
  tgt_idx = (top_left[:, :1] + dr) * GRID + top_left[:, 1:] + dc
  in_target = (
    jnp.zeros((batch, NUM_TOKENS), bool)
    .at[jnp.arange(batch)[:, None], tgt_idx]
    .set(True)
  )
  # Random order of the non-target tokens (targets sorted last).
  noise = jax.random.uniform(k_ctx, (batch, NUM_TOKENS)) + in_target
  ctx_idx = jnp.argsort(noise, axis=1)[:, :context]
  return ctx_idx.astype(jnp.int32), tgt_idx.astype(jnp.int32)


# ---------------------------------------------------------------- train state


class TrainState(NamedTuple):
  step: jax.Array
  params: Any  # {"encoder": ..., "predictor": ...}
  opt_state: Any
  ema: jepa_ema.EmaState  # EMA of params["encoder"]: the target encoder
  rng: jax.Array  # raw uint32 key (checkpoint-friendly)
  curves: dict[str, jax.Array]
  tracked: tuple = ()  # power EMAs of params["encoder"] (Config.track)


class Model(NamedTuple):
  """What every run of one architecture shares, each compiled once."""

  init_state: Callable[[int], TrainState]
  train_chunk: Callable[..., tuple[TrainState, jax.Array]]
  embed: Callable[[Any, jax.Array], jax.Array]


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
  lr = optax.warmup_cosine_decay_schedule(
    0.0,
    cfg.lr,
    cfg.warmup,
    max(cfg.steps, cfg.warmup + 1),
    end_value=cfg.lr / 100,
  )
  tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  n_tgt = cfg.target_block**2
  tracked_ema = (
    jepa_ema.ema(tuple(jepa_ema.power_momentum(sigma_rel=s) for s in cfg.track))
    if cfg.track
    else None
  )

  def table_schedule(momenta: jax.Array) -> jepa_ema.Schedule:
    # Any callable step -> momentum is a schedule: here a lookup in the
    # run's table, so the table can be a traced argument (one compilation).
    last = momenta.shape[0] - 1
    return lambda step: momenta[jnp.minimum(step, last)]

  def ema_of(momenta: jax.Array) -> jepa_ema.EmaTransformation:
    return jepa_ema.ema(table_schedule(momenta), drift=True)

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
    ema = ema_of(jnp.zeros(1)).init(params["encoder"])
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

  def loss_fn(params, target_params, x, ctx_idx, tgt_idx):
    target = encoder.apply({"params": target_params}, x)
    target = (target - target.mean(-1, keepdims=True)) / jnp.sqrt(
      target.var(-1, keepdims=True) + 1e-6
    )  # layer-normed, as in I-JEPA
    target = jax.lax.stop_gradient(
      jnp.take_along_axis(target, tgt_idx[..., None], axis=1)
    )
    ctx = encoder.apply({"params": params["encoder"]}, x, ctx_idx)
    pred = predictor.apply(
      {"params": params["predictor"]}, ctx, ctx_idx, tgt_idx
    )
    return jnp.mean((pred - target) ** 2)

  def train_step(
    state: TrainState, momenta: jax.Array, x_train: jax.Array
  ) -> tuple[TrainState, jax.Array]:
    key = jax.random.fold_in(state.rng, state.step)
    k_batch, k_mask = jax.random.split(key)
    x = x_train[
      jax.random.randint(k_batch, (cfg.batch_size,), 0, x_train.shape[0])
    ]
    ctx_idx, tgt_idx = sample_masks(
      k_mask, cfg.batch_size, cfg.context, cfg.target_block
    )
    loss, grads = jax.value_and_grad(loss_fn)(
      state.params, state.ema.target, x, ctx_idx, tgt_idx
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_ema = ema_of(momenta).update(params["encoder"], state.ema)
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

  @functools.partial(jax.jit, static_argnames="length", donate_argnums=0)
  def train_chunk(
    state: TrainState, momenta: jax.Array, x_train: jax.Array, *, length: int
  ) -> tuple[TrainState, jax.Array]:
    """``length`` train steps in one compiled call."""
    return jax.lax.scan(
      lambda s, _: train_step(s, momenta, x_train), state, None, length=length
    )

  @jax.jit
  def embed(enc_params: Any, patches: jax.Array) -> jax.Array:
    return encoder.apply({"params": enc_params}, patches).mean(axis=1)

  return Model(init_state, train_chunk, embed)


def shared_key(cfg: Config) -> Config:
  """The part of ``cfg`` that the compiled functions depend on."""
  return dataclasses.replace(cfg, momentum="", seed=0)


# ---------------------------------------------------------------- evaluation


def _unit(z: np.ndarray) -> np.ndarray:
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def embedding_std(z: np.ndarray) -> float:
  """RMS per-dimension std of the L2-normalised embeddings: 0 when they
  collapse to one direction, ``1/sqrt(dim)`` at most (isotropic). Rotation
  invariant (it is ``sqrt(trace(cov) / dim)``)."""
  u = _unit(np.asarray(z, np.float64))
  return float(np.sqrt(np.mean(np.var(u, axis=0))))


def effective_rank(z: np.ndarray) -> float:
  """RankMe (Garrido et al., arXiv:2210.02885): exp entropy of the singular
  values of the (uncentred) embedding matrix; ~1 for collapsed embeddings."""
  s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
  p = s / max(s.sum(), 1e-300) + 1e-12
  return float(np.exp(-np.sum(p * np.log(p))))


def knn_accuracy(
  z_train: np.ndarray,
  y_train: np.ndarray,
  z_test: np.ndarray,
  y_test: np.ndarray,
  k: int = 5,
) -> float:
  """Cosine k-NN, majority vote (ties: the smaller label), stable order."""
  sim = _unit(z_test) @ _unit(z_train).T
  nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(z_test), int(y_train.max()) + 1))
  np.add.at(votes, (np.arange(len(z_test))[:, None], y_train[nearest]), 1)
  return float(np.mean(votes.argmax(1) == y_test))


def evaluate(
  z_train: np.ndarray,
  z_test: np.ndarray,
  y_train: np.ndarray,
  y_test: np.ndarray,
  seed: int = 0,
  draws: int = 10,
) -> dict[str, float]:
  """The one evaluation every encoder (and raw pixels) gets.

  Embeddings are centred on the training mean and scaled by one number (so
  that the mean per-dimension variance on the training set is 1), so every
  score is invariant to a rotation (and a rescaling) of the embedding space.
  Then: cosine k-NN (k=5) with all training labels;
  logistic regression (C=1) on 1 and 5 labelled images per class (mean over
  ``draws`` label draws, the same draws for every encoder) and on all of
  them; and, on the raw test embeddings, :func:`embedding_std` and
  :func:`effective_rank`.
  """
  from sklearn.linear_model import LogisticRegression

  z_train = np.asarray(z_train, np.float64)
  z_test = np.asarray(z_test, np.float64)
  mean = z_train.mean(0)
  scale = max(float(np.sqrt(np.mean((z_train - mean) ** 2))), 1e-12)
  a, b = (z_train - mean) / scale, (z_test - mean) / scale

  def probe(idx: np.ndarray) -> float:
    clf = LogisticRegression(C=1.0, max_iter=3000)
    return float(clf.fit(a[idx], y_train[idx]).score(b, y_test))

  rng = np.random.default_rng(seed + 1234)
  classes = np.unique(y_train)
  shots = {}
  for n in (1, 5):
    picks = [
      np.concatenate(
        [
          rng.choice(np.flatnonzero(y_train == c), n, replace=False)
          for c in classes
        ]
      )
      for _ in range(draws)
    ]
    shots[n] = float(np.mean([probe(p) for p in picks]))
  return {
    "knn5": knn_accuracy(a, y_train, b, y_test, 5),
    "1shot": shots[1],
    "5shot": shots[5],
    "linear": probe(np.arange(len(a))),
    "emb_std": embedding_std(z_test),
    "eff_rank": effective_rank(z_test),
  }


# --------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed from (never ignored)."""


def _tree_digest(tree: Any) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def _kill_self() -> None:
  """SIGKILLs this process, as ``kill -9`` would (test hook)."""
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _killed_before_commit(ocp: Any, step: int) -> type:
  """orbax's local temporary-path class, SIGKILLing the process when it is
  about to commit checkpoint ``step``: its data are written, but its folder
  still has its temporary name (test hook)."""

  class KilledBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
    async def finalize(self, *args, **kwargs):
      if self.get_final().name == str(step):  # the step folder, not an item
        _kill_self()
      return await super().finalize(*args, **kwargs)

  return KilledBeforeCommit


class Checkpointer:
  """orbax CheckpointManager + a config fingerprint that must match on resume.

  ``kill_at`` is a test hook (``--test-kill-at``) for a real ``kill -9`` at a
  known point: ``("after", n)`` SIGKILLs the process once checkpoint ``n``
  is committed, ``("commit", n)`` inside the save of checkpoint ``n``, after
  its data are written and before orbax commits them."""

  def __init__(
    self,
    directory: pathlib.Path,
    every: int,
    fingerprint: dict,
    kill_at: tuple[str, int] | None = None,
  ):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.dir = directory.resolve()
    self.dir.mkdir(parents=True, exist_ok=True)
    meta = self.dir / "config.json"
    if meta.exists():
      try:
        saved = json.loads(meta.read_text())
      except json.JSONDecodeError as e:
        raise CheckpointError(
          f"{meta} is corrupt ({e}); remove {self.dir} to start over."
        ) from e
      if saved != fingerprint:
        diff = {
          k: (saved.get(k), fingerprint.get(k))
          for k in set(saved) | set(fingerprint)
          if saved.get(k) != fingerprint.get(k)
        }
        raise CheckpointError(
          f"checkpoint in {self.dir} was written by a different "
          f"configuration (saved vs now: {diff}); use another "
          "--checkpoint-dir or the same settings."
        )
    else:
      meta.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    self.every = every
    self.kill_at = kill_at
    options = {"max_to_keep": 2, "enable_async_checkpointing": False}
    if kill_at is not None and kill_at[0] == "commit":
      options["temporary_path_class"] = _killed_before_commit(ocp, kill_at[1])
    self.mngr = ocp.CheckpointManager(
      self.dir / "state", options=ocp.CheckpointManagerOptions(**options)
    )

  def restore(self, abstract: TrainState) -> TrainState | None:
    step = self.mngr.latest_step()
    if step is None:
      if any((self.dir / "state").glob("*")):
        raise CheckpointError(
          f"{self.dir / 'state'} holds files but no complete checkpoint; "
          "it is corrupt. Remove it to start over."
        )
      return None
    try:
      state = self.mngr.restore(
        step, args=self._ocp.args.StandardRestore(abstract)
      )
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
        f"cannot restore step {step} from {self.dir / 'state'}: "
        f"{type(e).__name__}: {e}"
      ) from e
    if int(state.step) != step:
      raise CheckpointError(
        f"checkpoint {step} in {self.dir} holds step "
        f"{int(state.step)}; it is corrupt."
      )
    return state

  def maybe_save(self, state: TrainState, final: bool = False) -> None:
    step = int(state.step)
    if step in self.mngr.all_steps():
      return  # e.g. a finished run resumed again: nothing new to save
    if final or step % self.every == 0:
      self.mngr.save(step, args=self._ocp.args.StandardSave(state), force=final)
      if self.kill_at == ("after", step):
        self.mngr.wait_until_finished()
        _kill_self()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


# ----------------------------------------------------------------------- runs


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
  z_train = np.asarray(model.embed(state.ema.target, x_train))
  z_test = np.asarray(
    model.embed(state.ema.target, jnp.asarray(data["x_test"]))
  )
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
    "final_state_sha256": _tree_digest(state._replace(curves={})),
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


# ----------------------------------------------------------------------- plots

METRIC_LABELS = {
  "knn5": "k-NN (5)",
  "1shot": "1-shot",
  "5shot": "5-shot",
  "linear": "linear probe",
}


def plot(results: dict, cfg: Config, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
  colors = {"ema": "tab:blue", "no_ema": "tab:red"}
  labels = {
    "ema": f"EMA target (momentum {cfg.momentum})",
    "no_ema": "no EMA (momentum 0)",
  }
  for run, res in results["runs"].items():
    loss = np.asarray(res["curves"]["loss"])
    k = max(len(loss) // 60, 1)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax[0, 0].plot(
      np.arange(len(smooth)) + k - 1,
      smooth,
      color=colors[run],
      label=labels[run],
    )
    std = np.asarray(res["curves"]["emb_std"])
    ax[0, 1].plot(
      curve_steps(cfg), std, "o-", ms=3, color=colors[run], label=labels[run]
    )
    one_minus = 1.0 - np.asarray(res["curves"]["momentum"], np.float64)
    ax[1, 0].plot(
      np.maximum(one_minus, 1e-6),
      color=colors[run],
      label=f"1 - m(t), {labels[run]}",
    )
    if run == "ema":
      ax[1, 0].plot(
        res["curves"]["drift"],
        color=colors[run],
        ls="--",
        lw=1,
        label="drift ||target - online|| / ||online||",
      )
  ax[0, 0].set(
    title="I-JEPA loss (smoothed); low + no EMA = collapse",
    xlabel="step",
    yscale="log",
  )
  ax[0, 1].axhline(
    1 / math.sqrt(cfg.width), ls=":", c="gray", label="isotropic maximum"
  )
  ax[0, 1].set(
    title="target embedding std (0 = collapse)", xlabel="step", yscale="log"
  )
  ax[1, 0].set(
    title="1 - momentum and the target's drift (log)",
    xlabel="step",
    yscale="log",
  )
  names = list(results["table"])
  colors_bar = ["tab:blue", "tab:red", "tab:gray", "tab:olive"]
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    vals = [results["table"][name][m] for m in METRIC_LABELS]
    bars = ax[1, 1].bar(
      np.arange(len(METRIC_LABELS)) + i * width,
      vals,
      width,
      label=name,
      color=colors_bar[i % 4],
    )
    ax[1, 1].bar_label(bars, [f"{100 * v:.0f}" for v in vals], fontsize=6)
  ax[1, 1].set(
    title="test accuracy (%) of each frozen encoder",
    xticks=np.arange(len(METRIC_LABELS)) + 0.4 - width / 2,
    xticklabels=list(METRIC_LABELS.values()),
    ylim=(0, 1.22),
  )
  for a in ax.flat[:3]:
    a.legend(fontsize=7)
  ax[1, 1].legend(fontsize=7, ncol=2, loc="upper center")
  fig.suptitle(
    f"tiny I-JEPA on 8x8 digits, seed {cfg.seed}, {cfg.steps} steps",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _sweep_x(spec: str) -> float:
  """Where a sweep entry sits on the 1 - m axis (ramps: at their start)."""
  return 1.0 - (0.996 if spec in ("cosine", "linear") else float(spec))


def plot_sweep(sweep: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = [
    ("knn5", "k-NN (5) accuracy"),
    ("1shot", "1-shot accuracy"),
    ("emb_std", "embedding std"),
    ("eff_rank", "effective rank"),
  ]
  floor = 1e-5  # where m = 1 (1 - m = 0) is drawn on the log axis
  fig, ax = plt.subplots(1, 4, figsize=(15, 3.9))
  const = [s for s in sweep["momenta"] if s not in ("cosine", "linear")]
  xs = np.array([max(_sweep_x(s), floor) for s in const])
  random = sweep["random_init"]
  for a, (key, title) in zip(ax, metrics):
    vals = np.array([[r[key] for r in sweep["results"][s]] for s in const])
    mean, lo, hi = vals.mean(1), vals.min(1), vals.max(1)
    a.fill_between(xs, lo, hi, alpha=0.2, color="tab:blue")
    a.plot(xs, mean, "o-", color="tab:blue", label="constant m (mean, range)")
    for s, marker, color in (
      ("cosine", "^", "tab:green"),
      ("linear", "s", "tab:orange"),
    ):
      if s in sweep["results"]:
        v = np.array([r[key] for r in sweep["results"][s]])
        a.errorbar(
          [_sweep_x(s) * (1.15 if s == "linear" else 0.87)],
          [v.mean()],
          yerr=[[v.mean() - v.min()], [v.max() - v.mean()]],
          fmt=marker,
          color=color,
          capsize=3,
          label=f"{s} 0.996 -> 1",
        )
    r = np.array([x[key] for x in random])
    a.axhspan(
      r.min(), r.max(), color="gray", alpha=0.25, label="random-init encoder"
    )
    a.axvspan(
      1 - 0.9995,
      1 - 0.996,
      color="tab:purple",
      alpha=0.08,
      label="papers' range (0.996-0.9995)",
    )
    a.set(xscale="log", title=title, xlabel="1 - m  (m = 1 drawn at left)")
    a.set_xticks([floor, 1e-4, 1e-3, 1e-2, 1e-1, 1])
    a.set_xticklabels(["m=1", "1e-4", "1e-3", "0.01", "0.1", "m=0"])
  handles, labels = ax[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
  seeds = sweep["seeds"]
  fig.suptitle(
    f"momentum sweep, tiny I-JEPA on digits, {sweep['steps']} "
    f"steps, seeds {seeds}: target encoder after training",
    fontsize=10,
  )
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_sweep(
  cfg: Config,
  seeds: list[int],
  data: dict,
  out_dir: pathlib.Path,
  progress: bool,
) -> dict[str, Any]:
  from tqdm.auto import tqdm

  sweep = {
    "steps": cfg.steps,
    "seeds": seeds,
    "momenta": list(SWEEP_MOMENTA),
    "results": {s: [] for s in SWEEP_MOMENTA},
    "random_init": [],
    "config": dataclasses.asdict(cfg),
  }
  total = len(seeds) * len(SWEEP_MOMENTA)
  bar = tqdm(total=total, desc="sweep", disable=not progress, file=sys.stdout)
  t0 = time.time()
  for seed in seeds:
    cfg_s = dataclasses.replace(cfg, seed=seed)
    sweep["random_init"].append(random_init_metrics(cfg_s, data))
    for spec in SWEEP_MOMENTA:
      res = train_run(spec, cfg_s, spec, data, progress=False)
      sweep["results"][spec].append(
        {
          **res["metrics"],
          "seed": seed,
          "drift": res["target_online_rel_dist"],
          "train_seconds": res["train_seconds"],
        }
      )
      m = res["metrics"]
      bar.write(
        f"seed {seed} m={spec:>7}: k-NN {m['knn5']:.3f} 1-shot "
        f"{m['1shot']:.3f} std {m['emb_std']:.4f} rank "
        f"{m['eff_rank']:.1f} ({res['train_seconds']:.0f} s)"
      )
      bar.update(1)
  bar.close()
  sweep["seconds"] = time.time() - t0
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "momentum_sweep.json").write_text(json.dumps(sweep, indent=1))
  plot_sweep(sweep, out_dir / "momentum_sweep.png")
  print(
    "\n| momentum | k-NN (5) | 1-shot | 5-shot | linear | emb std | "
    "eff. rank |\n|---|---|---|---|---|---|---|"
  )
  rows = {**sweep["results"], "random init": sweep["random_init"]}
  for spec, rs in rows.items():
    cells = []
    for key in ("knn5", "1shot", "5shot", "linear", "emb_std", "eff_rank"):
      v = np.array([r[key] for r in rs])
      scale, fmt = (
        (100, ".1f")
        if key in METRIC_LABELS
        else (1, ".3f" if key == "emb_std" else ".1f")
      )
      cells.append(
        f"{scale * v.mean():{fmt}} ± {scale * v.std(ddof=1) if len(v) > 1 else 0:{fmt}}"
      )
    print(f"| {spec} | " + " | ".join(cells) + " |")
  print(
    f"\nwrote {out_dir / 'momentum_sweep.json'} and "
    f"{out_dir / 'momentum_sweep.png'} ({sweep['seconds']:.0f} s)"
  )
  return sweep


# ----------------------------------------------------------------------- main


def _kill_point(spec: str) -> tuple[str, int]:
  """``--test-kill-at``: ``after:N`` or ``commit:N``."""
  when, _, step = spec.partition(":")
  if when not in ("after", "commit") or not step.isdigit():
    raise argparse.ArgumentTypeError(
      f"expected after:STEP or commit:STEP, got {spec!r}"
    )
  return when, int(step)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawTextHelpFormatter,
  )
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="training steps per run (default 3000; 150 --quick;\n1500 --sweep)",
  )
  p.add_argument(
    "--momentum",
    default="0.996",
    help="'cosine' (BYOL), 'linear' (I-JEPA) or a float",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="short CI run (150 steps, a smaller model)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--lr",
    type=float,
    default=3e-3,
    help="peak AdamW learning rate (momentum-0 collapse needs a\n"
    "high one: at 1e-3 it does not collapse)",
  )
  p.add_argument(
    "--runs", default="ema,no_ema", help="comma-separated subset of ema,no_ema"
  )
  p.add_argument("--out-dir", default="outputs", type=pathlib.Path)
  p.add_argument("--checkpoint-dir", default=None, type=pathlib.Path)
  p.add_argument("--checkpoint-every", type=int, default=250)
  p.add_argument(
    "--no-eval-baselines",
    action="store_true",
    help="skip the random-init and raw-pixel baselines",
  )
  p.add_argument("--no-progress", action="store_true")
  p.add_argument(
    "--sweep",
    action="store_true",
    help="momentum sweep over --seeds instead of the two runs;\n"
    "writes momentum_sweep.{png,json} to --out-dir",
  )
  p.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=[0, 1, 2],
    help="seeds of --sweep (default 0 1 2)",
  )
  p.add_argument(  # tests: SIGKILL at a known point (see Checkpointer)
    "--test-kill-at",
    type=_kill_point,
    default=None,
    metavar="{after,commit}:STEP",
    help=argparse.SUPPRESS,
  )
  args = p.parse_args(argv)

  steps = (
    args.steps
    if args.steps is not None
    else (150 if args.quick else 1500 if args.sweep else 3000)
  )
  if steps < 1:
    p.error("--steps must be >= 1")
  if args.checkpoint_every < 1:
    p.error("--checkpoint-every must be >= 1")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  if not runs or any(r not in ("ema", "no_ema") for r in runs):
    p.error(f"--runs must be a subset of ema,no_ema, got {args.runs!r}")
  if args.sweep and args.checkpoint_dir is not None:
    p.error("--sweep does not checkpoint; drop --checkpoint-dir")
  cfg = Config(
    steps=steps,
    lr=args.lr,
    momentum=args.momentum,
    seed=args.seed,
    warmup=max(steps // 10, 1),
    chunk=min(100, steps),
    # --quick: 2 + 1 blocks instead of 3 + 2 (compiles faster)
    depth=2 if args.quick else 3,
    pred_depth=1 if args.quick else 2,
  )
  cfg.schedule()  # validate --momentum early
  data = load_data()
  print(
    f"digits: {len(data['x_train'])} train / {len(data['x_test'])} test "
    f"images, {NUM_TOKENS} tokens of 2x2 pixels; {steps} steps per run; "
    f"jax {jax.__version__} on {jax.devices()[0].platform}"
  )
  if args.sweep:
    return run_sweep(cfg, args.seeds, data, args.out_dir, not args.no_progress)

  results: dict[str, Any] = {
    "config": dataclasses.asdict(cfg),
    "runs": {},
    "table": {},
  }
  for run in runs:
    momentum = args.momentum if run == "ema" else "0.0"
    res = train_run(
      run,
      cfg,
      momentum,
      data,
      args.checkpoint_dir,
      args.checkpoint_every,
      not args.no_progress,
      args.test_kill_at,
    )
    results["runs"][run] = res
    label = (
      f"EMA target (m={args.momentum})"
      if run == "ema"
      else "no-EMA target (m=0)"
    )
    results["table"][label] = res["metrics"]

  if not args.no_eval_baselines:
    results["table"]["random-init encoder"] = random_init_metrics(cfg, data)
    results["table"]["raw pixels"] = evaluate(
      data["pix_train"],
      data["pix_test"],
      data["y_train"],
      data["y_test"],
      cfg.seed,
    )

  print(
    "\n| encoder | k-NN (5) | 1-shot | 5-shot | linear | emb std | "
    "eff. rank |\n|---|---|---|---|---|---|---|"
  )
  for name, m in results["table"].items():
    print(
      f"| {name} | {m['knn5']:.3f} | {m['1shot']:.3f} | {m['5shot']:.3f} "
      f"| {m['linear']:.3f} | {m['emb_std']:.4f} | {m['eff_rank']:.1f} |"
    )

  for run, res in results["runs"].items():
    per = ", ".join(
      f"{k} {v:.3f}"
      for k, v in res["target_online_rel_dist_per_module"].items()
    )
    print(
      f"{run}: target drift ||target - online|| / ||online|| = "
      f"{res['target_online_rel_dist']:.4f} (per module: {per}); "
      f"trained in {res['train_seconds']:.1f} s"
    )

  args.out_dir.mkdir(parents=True, exist_ok=True)
  json_path = args.out_dir / "ijepa_digits.json"
  json_path.write_text(json.dumps(results, indent=1))
  png_path = args.out_dir / "ijepa_digits.png"
  plot(results, cfg, png_path)
  print(f"\nwrote {json_path} and {png_path}")
  return results


if __name__ == "__main__":
  main()

"""A tiny I-JEPA on scikit-learn's 8x8 digits, trained on a laptop CPU.

What ``make demo`` runs. It shows ``jepa_ema`` doing its real job: the target
encoder of a JEPA is an EMA of the context encoder (stop-gradient), and without
it (momentum 0: the target is a plain stop-gradient copy of the online
encoder) the representation tends to collapse.

* Data: ``sklearn.datasets.load_digits`` (1797 images, bundled with
  scikit-learn, no download); a fixed stratified 80/20 split; pretraining uses
  only the training images, without labels.
* Model (Flax Linen, optax AdamW with warm-up + cosine decay): 2x2 patches give
  16 tokens on a 4x4 grid; a ViT context encoder (width 64, 3 blocks, 4 heads)
  sees the context tokens; a narrower predictor (width 32, 2 blocks) gets the
  context tokens plus positional mask tokens for one rectangular block of target
  patches and predicts the target encoder's layer-normed outputs there (L2
  loss), as in I-JEPA (arXiv:2301.08243).
* The target encoder is ``jepa_ema.ema(momentum)`` of the context encoder,
  advanced inside the jitted, state-donating train step.
* Two runs with the same seed: the EMA target (``--momentum``, default constant
  0.996; ``cosine`` / ``linear`` select the BYOL and I-JEPA schedules) and the
  momentum-0 contrast. Each frozen target encoder, a random-init encoder and raw
  pixels are then evaluated: k-NN (k=5), 1-/5-shot nearest-centroid accuracy
  (mean over label draws), a full-label linear probe, embedding std (of
  L2-normalised embeddings; 1/sqrt(64) = 0.125 is the maximum, 0 is collapse)
  and effective rank (RankMe).
* Outputs: a table on stdout, ``ijepa_digits.png`` (loss, embedding std and
  momentum over training, accuracy bars) and ``ijepa_digits.json``.
* ``--checkpoint-dir DIR`` saves the whole train state (params, optimizer
  state, EMA state, step, RNG, curves) with orbax every ``--checkpoint-every``
  steps; running again with the same directory resumes, bit-identically.

Usage::

  python examples/ijepa_digits.py                 # ~1500 steps per run
  python examples/ijepa_digits.py --quick         # CI smoke run
  python examples/ijepa_digits.py --momentum cosine --checkpoint-dir /tmp/ck
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
import sys
import time
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


# --------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 1500
  batch_size: int = 64
  lr: float = 3e-3
  weight_decay: float = 0.05
  warmup: int = 100
  width: int = 64
  depth: int = 3
  heads: int = 4
  pred_width: int = 32
  pred_depth: int = 2
  target_blocks: int = 1
  momentum: str = "0.996"
  seed: int = 0
  curve_every: int = 25

  def schedule(self, momentum: str | None = None) -> jepa_ema.Schedule:
    spec = self.momentum if momentum is None else momentum
    if spec == "cosine":  # BYOL / DINO
      return jepa_ema.cosine_momentum(0.996, 1.0, total_steps=self.steps)
    if spec == "linear":  # I-JEPA
      return jepa_ema.linear_momentum(0.996, 1.0, total_steps=self.steps)
    try:
      value = float(spec)
    except ValueError:
      raise SystemExit(
          f"--momentum must be 'cosine', 'linear' or a float in [0, 1], "
          f"got {spec!r}") from None
    return jepa_ema.constant_momentum(value)


# ----------------------------------------------------------------------- data


def load_data(seed: int = 0) -> dict[str, np.ndarray]:
  """Digits as (N, 16, 4) patch arrays in [0, 1], with a fixed 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8)
  patches = images.reshape(-1, GRID, 2, GRID, 2).transpose(0, 1, 3, 2, 4)
  patches = patches.reshape(-1, NUM_TOKENS, PATCH_DIM)
  idx = np.arange(len(images))
  tr, te = train_test_split(idx, test_size=0.2, random_state=seed,
                            stratify=digits.target)
  return {"x_train": patches[tr], "y_train": digits.target[tr],
          "x_test": patches[te], "y_test": digits.target[te],
          "pix_train": images[tr].reshape(len(tr), -1),
          "pix_test": images[te].reshape(len(te), -1)}


# ---------------------------------------------------------------------- model


class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array | None) -> jax.Array:
    mask = None if keep is None else keep[:, None, None, :]
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h,
                                                                   mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(2 * self.width)(h)
    return x + nn.Dense(self.width)(nn.gelu(h))


class Encoder(nn.Module):
  """ViT over the 16 patch tokens; ``keep`` hides the other tokens' keys."""
  width: int
  depth: int
  heads: int

  @nn.compact
  def __call__(self, patches: jax.Array, keep: jax.Array | None = None
               ) -> jax.Array:
    pos = self.param("pos", nn.initializers.normal(0.02),
                     (NUM_TOKENS, self.width))
    x = nn.Dense(self.width)(patches) + pos
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x, keep)
    return nn.LayerNorm()(x)


class Predictor(nn.Module):
  """Context tokens + positional mask tokens -> predictions at the targets."""
  width: int
  depth: int
  heads: int
  out: int

  @nn.compact
  def __call__(self, ctx: jax.Array, target_mask: jax.Array) -> jax.Array:
    pos = self.param("pos", nn.initializers.normal(0.02),
                     (NUM_TOKENS, self.width))
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (self.width,))
    x = nn.Dense(self.width)(ctx)
    x = jnp.where(target_mask[..., None], mask_token, x) + pos
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x, None)
    return nn.Dense(self.out)(nn.LayerNorm()(x))


def sample_target_masks(key: jax.Array, batch: int, blocks: int = 1
                        ) -> jax.Array:
  """The union of ``blocks`` rectangles of h x w patches (h, w in {2, 3});
  the context is the complement (I-JEPA samples 4 target blocks)."""
  kh, kw, kt, kl = jax.random.split(key, 4)
  shape = (batch, blocks, 1, 1)
  h = jax.random.randint(kh, shape, 2, 4)
  w = jax.random.randint(kw, shape, 2, 4)
  top = jnp.floor(jax.random.uniform(kt, shape) * (GRID + 1 - h))
  left = jnp.floor(jax.random.uniform(kl, shape) * (GRID + 1 - w))
  rows = jnp.arange(GRID)[None, None, :, None]
  cols = jnp.arange(GRID)[None, None, None, :]
  mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  mask = mask.any(axis=1).reshape(batch, NUM_TOKENS)
  # Keep at least one context token per image (token 0 if all are targets).
  all_masked = jnp.all(mask, axis=1, keepdims=True)
  return mask & ~(all_masked & (jnp.arange(NUM_TOKENS) == 0))


# ---------------------------------------------------------------- train state


class TrainState(NamedTuple):
  step: jax.Array
  params: Any            # {"encoder": ..., "predictor": ...}
  opt_state: Any
  ema: jepa_ema.EmaState  # EMA of params["encoder"]: the target encoder
  rng: jax.Array          # raw uint32 key (checkpoint-friendly)
  curves: dict[str, jax.Array]


@functools.lru_cache(maxsize=4)
def build_shared(cfg: Config):
  """What both runs share (compiled once): the modules, the optimizer, the
  state initialiser (an EMA's init does not depend on its momentum) and the
  embedding function."""
  encoder = Encoder(cfg.width, cfg.depth, cfg.heads)
  predictor = Predictor(cfg.pred_width, cfg.pred_depth, cfg.heads, cfg.width)
  lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup,
                                          max(cfg.steps, cfg.warmup + 1))
  tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
  n_curve = cfg.steps // cfg.curve_every + 1

  @jax.jit  # one compilation instead of ~170 small eager ones
  def init_state(seed: jax.typing.ArrayLike) -> TrainState:
    k_enc, k_pred, k_run = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((1, NUM_TOKENS, PATCH_DIM))
    params = {"encoder": encoder.init(k_enc, dummy)["params"],
              "predictor": predictor.init(
                  k_pred, jnp.zeros((1, NUM_TOKENS, cfg.width)),
                  jnp.zeros((1, NUM_TOKENS), bool))["params"]}
    curves = {"loss": jnp.full(cfg.steps, jnp.nan),
              "momentum": jnp.full(cfg.steps, jnp.nan),
              "emb_std": jnp.full(n_curve, jnp.nan),
              "drift": jnp.full(cfg.steps, jnp.nan)}
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params),
                      jepa_ema.ema(1.0, drift=True).init(params["encoder"]),
                      k_run, curves)

  @jax.jit
  def embed(enc_params, patches):
    return encoder.apply({"params": enc_params}, patches).mean(axis=1)

  return encoder, predictor, tx, init_state, embed


def build(cfg: Config, momentum: str, data: dict[str, np.ndarray]):
  """Returns (init_state, train_step, embed, schedule) for one run."""
  encoder, predictor, tx, init_state, embed = build_shared(cfg)
  schedule = cfg.schedule(momentum)
  # drift=True: the state also carries ||target - online|| / ||online||,
  # global and per top-level module, computed with the update.
  ema = jepa_ema.ema(schedule, drift=True)
  x_train = jnp.asarray(data["x_train"])

  def loss_fn(params, target_params, x, target_mask):
    target = encoder.apply({"params": target_params}, x)
    target = jax.lax.stop_gradient(
        (target - target.mean(-1, keepdims=True))
        / jnp.sqrt(target.var(-1, keepdims=True) + 1e-6))  # layer-normed
    ctx = encoder.apply({"params": params["encoder"]}, x, ~target_mask)
    pred = predictor.apply({"params": params["predictor"]}, ctx, target_mask)
    err = jnp.mean((pred - target) ** 2, axis=-1)
    return jnp.sum(err * target_mask) / jnp.sum(target_mask)

  def train_step(state: TrainState) -> tuple[TrainState, jax.Array]:
    key = jax.random.fold_in(state.rng, state.step)
    k_batch, k_mask = jax.random.split(key)
    idx = jax.random.randint(k_batch, (cfg.batch_size,), 0, x_train.shape[0])
    x = x_train[idx]
    target_mask = sample_target_masks(k_mask, cfg.batch_size,
                                      cfg.target_blocks)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.ema.target,
                                              x, target_mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = jnp.asarray(schedule(state.ema.step), jnp.float32)
    new_ema = ema.update(params["encoder"], state.ema)
    curves = {**state.curves,
              "loss": state.curves["loss"].at[state.step].set(loss),
              "momentum": state.curves["momentum"].at[state.step].set(m),
              "drift": state.curves["drift"].at[state.step].set(
                  new_ema.drift["global"])}
    return TrainState(state.step + 1, params, opt_state, new_ema, state.rng,
                      curves), loss

  return init_state, jax.jit(train_step, donate_argnums=0), embed, schedule


# ---------------------------------------------------------------- evaluation


def embedding_std(z: np.ndarray) -> float:
  z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.std(z, axis=0)))


def effective_rank(z: np.ndarray) -> float:
  """RankMe (Garrido et al., arXiv:2210.02885): exp entropy of the singular
  values of the (uncentred) embedding matrix; ~1 for collapsed embeddings."""
  s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
  p = s / max(s.sum(), 1e-12) + 1e-12
  return float(np.exp(-np.sum(p * np.log(p))))


def evaluate(z_train: np.ndarray, z_test: np.ndarray, y_train: np.ndarray,
             y_test: np.ndarray, seed: int = 0, draws: int = 20
             ) -> dict[str, float]:
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  def unit(z):
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

  zt, ze = unit(z_train.astype(np.float64)), unit(z_test.astype(np.float64))
  knn = KNeighborsClassifier(5).fit(zt, y_train).score(ze, y_test)
  rng = np.random.default_rng(seed)
  shots = {}
  for n in (1, 5):
    accs = []
    for _ in range(draws):
      pick = np.concatenate([rng.choice(np.flatnonzero(y_train == c), n,
                                        replace=False) for c in range(10)])
      centroids = np.stack([zt[pick][y_train[pick] == c].mean(0)
                            for c in range(10)])
      accs.append(np.mean(np.argmax(ze @ centroids.T, 1) == y_test))
    shots[n] = float(np.mean(accs))
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
  linear = probe.fit(z_train, y_train).score(z_test, y_test)
  return {"knn5": float(knn), "1shot": shots[1], "5shot": shots[5],
          "linear": float(linear), "emb_std": embedding_std(z_test),
          "eff_rank": effective_rank(z_test)}


# --------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed from (never ignored)."""


def _tree_digest(tree: Any) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


class Checkpointer:
  """orbax CheckpointManager + a config fingerprint that must match on resume."""

  def __init__(self, directory: pathlib.Path, every: int, fingerprint: dict):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = directory.resolve()
    self.dir.mkdir(parents=True, exist_ok=True)
    meta = self.dir / "config.json"
    if meta.exists():
      try:
        saved = json.loads(meta.read_text())
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta} is corrupt ({e}); remove {self.dir} "
                              "to start over.") from e
      if saved != fingerprint:
        diff = {k: (saved.get(k), fingerprint.get(k))
                for k in set(saved) | set(fingerprint)
                if saved.get(k) != fingerprint.get(k)}
        raise CheckpointError(
            f"checkpoint in {self.dir} was written by a different "
            f"configuration (saved vs now: {diff}); use another "
            "--checkpoint-dir or the same settings.")
    else:
      meta.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    self.every = every
    self.mngr = ocp.CheckpointManager(
        self.dir / "state",
        options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                             enable_async_checkpointing=False))

  def restore(self, abstract: TrainState) -> TrainState | None:
    step = self.mngr.latest_step()
    if step is None:
      if any((self.dir / "state").glob("*")):
        raise CheckpointError(
            f"{self.dir / 'state'} holds files but no complete checkpoint; "
            "it is corrupt. Remove it to start over.")
      return None
    try:
      state = self.mngr.restore(
          step, args=self._ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(
          f"cannot restore step {step} from {self.dir / 'state'}: "
          f"{type(e).__name__}: {e}") from e
    if int(state.step) != step:
      raise CheckpointError(f"checkpoint {step} in {self.dir} holds step "
                            f"{int(state.step)}; it is corrupt.")
    return state

  def maybe_save(self, state: TrainState, final: bool = False) -> None:
    step = int(state.step)
    if step in self.mngr.all_steps():
      return  # e.g. a finished run resumed again: nothing new to save
    if final or step % self.every == 0:
      self.mngr.save(step, args=self._ocp.args.StandardSave(state),
                     force=final)

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


# ----------------------------------------------------------------------- main


def train_run(name: str, cfg: Config, momentum: str, data: dict,
              ckpt_dir: pathlib.Path | None, ckpt_every: int,
              progress: bool, step_delay: float = 0.0) -> dict[str, Any]:
  from tqdm.auto import tqdm

  init_state, train_step, embed, schedule = build(cfg, momentum, data)
  state = init_state(cfg.seed)
  checkpointer = None
  if ckpt_dir is not None:
    fingerprint = {**dataclasses.asdict(cfg), "momentum": momentum,
                   "run": name}
    checkpointer = Checkpointer(ckpt_dir / name, ckpt_every, fingerprint)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpointer.restore(abstract)
    if restored is not None:
      state = restored
      print(f"[{name}] resumed from step {int(state.step)} in "
            f"{checkpointer.dir}")
  curve_x = jnp.asarray(data["x_train"][:512])
  start = int(state.step)
  bar = tqdm(total=cfg.steps, initial=start, desc=f"{name:>6}",
             disable=not progress, file=sys.stdout, mininterval=0.5,
             dynamic_ncols=True)
  t0 = time.time()
  def with_emb_std(state: TrainState, index: int) -> TrainState:
    """Records the target's embedding std at curve position ``index``."""
    z = np.asarray(embed(state.ema.target, curve_x))
    curves = dict(state.curves)
    curves["emb_std"] = curves["emb_std"].at[index].set(embedding_std(z))
    return state._replace(curves=curves)

  for step in range(start, cfg.steps):
    if step % cfg.curve_every == 0:
      state = with_emb_std(state, step // cfg.curve_every)
    state, loss = train_step(state)
    if step % 25 == 0 or step == cfg.steps - 1:
      bar.set_postfix(loss=f"{float(loss):.4f}",
                      momentum=f"{float(schedule(step)):.4f}", refresh=False)
    bar.update(1)
    if checkpointer is not None and step + 1 < cfg.steps:
      checkpointer.maybe_save(state)  # the last step is saved with its curves
    if step_delay:
      time.sleep(step_delay)
  bar.close()
  state = with_emb_std(state, -1)
  if checkpointer is not None:
    checkpointer.maybe_save(state, final=True)
    checkpointer.close()
  z_train = np.asarray(embed(state.ema.target, jnp.asarray(data["x_train"])))
  z_test = np.asarray(embed(state.ema.target, jnp.asarray(data["x_test"])))
  return {
      "metrics": evaluate(z_train, z_test, data["y_train"], data["y_test"],
                          cfg.seed),
      "curves": {k: np.asarray(v).tolist() for k, v in state.curves.items()},
      "ema_step": int(state.ema.step),
      "optimizer_step": _optimizer_count(state.opt_state),
      "train_step": int(state.step),
      "target_online_rel_dist": float(state.ema.drift["global"]),
      "target_online_rel_dist_per_module": {
          k: float(v) for k, v in state.ema.drift["per_module"].items()},
      "final_state_sha256": _tree_digest(state._replace(curves={})),
      "train_seconds": time.time() - t0,
  }


def _optimizer_count(opt_state: Any) -> int:
  counts = [int(s.count) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: hasattr(s, "count") and hasattr(s, "mu"))
            if hasattr(s, "count")]
  return counts[0] if counts else -1


def plot(results: dict, cfg: Config, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
  colors = {"ema": "tab:blue", "no_ema": "tab:red"}
  labels = {"ema": f"EMA target (momentum {cfg.momentum})",
            "no_ema": "no EMA (momentum 0)"}
  for run, res in results["runs"].items():
    loss = np.asarray(res["curves"]["loss"])
    k = max(len(loss) // 60, 1)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax[0, 0].plot(np.arange(len(smooth)) + k - 1, smooth, color=colors[run],
                  label=labels[run])
    std = np.asarray(res["curves"]["emb_std"])
    ax[0, 1].plot(np.arange(len(std)) * cfg.curve_every, std,
                  color=colors[run], label=labels[run])
    ax[1, 0].plot(res["curves"]["momentum"], color=colors[run],
                  label=labels[run])
    if run == "ema":
      twin = ax[1, 0].twinx()
      twin.plot(res["curves"]["drift"], color=colors[run], ls="--", lw=1,
                label="drift ||target - online|| / ||online|| (right)")
      twin.set(yscale="log", ylabel="drift")
      twin.legend(fontsize=8, loc="lower right")
  ax[0, 0].set(title="I-JEPA loss (smoothed)", xlabel="step", yscale="log")
  ax[0, 1].axhline(1 / math.sqrt(cfg.width), ls=":", c="gray",
                   label="max (isotropic)")
  ax[0, 1].set(title="target embedding std (0 = collapse)", xlabel="step")
  ax[1, 0].set(title="EMA momentum m(t) and the target's drift",
               xlabel="step", ylim=(-0.05, 1.05))
  names = list(results["table"])
  metrics = ["knn5", "1shot", "5shot", "linear"]
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    vals = [results["table"][name][m] for m in metrics]
    ax[1, 1].bar(np.arange(len(metrics)) + i * width, vals, width, label=name)
  ax[1, 1].set(title="test accuracy", xticks=np.arange(len(metrics)) + 0.4 -
               width / 2, xticklabels=["k-NN (5)", "1-shot", "5-shot",
                                       "linear"], ylim=(0, 1))
  for a in ax.flat:
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--steps", type=int, default=None,
                 help="training steps per run (default 1500; 150 --quick)")
  p.add_argument("--momentum", default="0.996",
                 help="'cosine' (BYOL), 'linear' (I-JEPA) or a float")
  p.add_argument("--quick", action="store_true", help="short CI run")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=3e-3,
                 help="peak AdamW learning rate (momentum-0 collapse needs a\n"
                 "high one: at 1e-3 it collapses mid-run and recovers)")
  p.add_argument("--target-blocks", type=int, default=1,
                 help="target blocks per image (their union is predicted)")
  p.add_argument("--runs", default="ema,no_ema",
                 help="comma-separated subset of ema,no_ema")
  p.add_argument("--out-dir", default="outputs", type=pathlib.Path)
  p.add_argument("--checkpoint-dir", default=None, type=pathlib.Path)
  p.add_argument("--checkpoint-every", type=int, default=250)
  p.add_argument("--no-eval-baselines", action="store_true",
                 help="skip the random-init and raw-pixel baselines")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--step-delay", type=float, default=0.0,
                 help=argparse.SUPPRESS)  # tests: slow down to kill mid-run
  args = p.parse_args(argv)

  steps = args.steps if args.steps is not None else (150 if args.quick
                                                      else 1500)
  if steps < 1:
    p.error("--steps must be >= 1")
  if args.checkpoint_every < 1:
    p.error("--checkpoint-every must be >= 1")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  if not runs or any(r not in ("ema", "no_ema") for r in runs):
    p.error(f"--runs must be a subset of ema,no_ema, got {args.runs!r}")
  cfg = Config(steps=steps, lr=args.lr, momentum=args.momentum,
               seed=args.seed, warmup=min(100, max(steps // 10, 1)),
               target_blocks=args.target_blocks,
               curve_every=max(min(25, steps // 6), 1),
               # --quick: 2 + 1 blocks instead of 3 + 2 (compiles faster)
               depth=2 if args.quick else 3,
               pred_depth=1 if args.quick else 2)
  cfg.schedule()  # validate --momentum early
  data = load_data()
  print(f"digits: {len(data['x_train'])} train / {len(data['x_test'])} test "
        f"images, {NUM_TOKENS} tokens of 2x2 pixels; {steps} steps per run; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")

  results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "runs": {},
                             "table": {}}
  for run in runs:
    momentum = args.momentum if run == "ema" else "0.0"
    res = train_run(run, cfg, momentum, data, args.checkpoint_dir,
                    args.checkpoint_every, not args.no_progress,
                    args.step_delay)
    results["runs"][run] = res
    label = (f"EMA target (m={args.momentum})" if run == "ema"
             else "no-EMA target (m=0)")
    results["table"][label] = res["metrics"]

  if not args.no_eval_baselines:
    init_state, _, embed, _ = build(cfg, "0.0", data)
    rand = init_state(cfg.seed).ema.target
    results["table"]["random-init encoder"] = evaluate(
        np.asarray(embed(rand, jnp.asarray(data["x_train"]))),
        np.asarray(embed(rand, jnp.asarray(data["x_test"]))),
        data["y_train"], data["y_test"], cfg.seed)
    results["table"]["raw pixels"] = evaluate(
        data["pix_train"], data["pix_test"], data["y_train"], data["y_test"],
        cfg.seed)

  print("\n| encoder | k-NN (5) | 1-shot | 5-shot | linear | emb std | "
        "eff. rank |\n|---|---|---|---|---|---|---|")
  for name, m in results["table"].items():
    print(f"| {name} | {m['knn5']:.3f} | {m['1shot']:.3f} | {m['5shot']:.3f} "
          f"| {m['linear']:.3f} | {m['emb_std']:.4f} | {m['eff_rank']:.1f} |")

  for run, res in results["runs"].items():
    per = ", ".join(f"{k} {v:.3f}" for k, v in
                    res["target_online_rel_dist_per_module"].items())
    print(f"{run}: target drift ||target - online|| / ||online|| = "
          f"{res['target_online_rel_dist']:.4f} (per module: {per})")

  args.out_dir.mkdir(parents=True, exist_ok=True)
  json_path = args.out_dir / "ijepa_digits.json"
  json_path.write_text(json.dumps(results, indent=1))
  png_path = args.out_dir / "ijepa_digits.png"
  plot(results, cfg, png_path)
  print(f"\nwrote {json_path} and {png_path}")
  return results


if __name__ == "__main__":
  main()

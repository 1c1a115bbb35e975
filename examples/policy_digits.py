"""Does the target's batch-norm policy matter? The digits I-JEPA with BN.

The demo's I-JEPA (``examples/ijepa_digits/``: same data, masks, predictor,
optimizer and evaluation, momentum 0.996) with one change: a ``BatchNorm``
after the encoder's patch embedding (statistics over the batch and the 16
tokens), so the target encoder has batch statistics besides its parameters.
The target is ``jepa_ema.ema(0.996, policy={"params": "average",
"batch_stats": ACTION})`` of the online encoder's variables, and the target's
statistics are treated four ways:

* ``average``: an EMA of the online encoder's running statistics (nfnets,
  timm ``ModelEmaV3()``, Flax ``nnx.EMA``'s default);
* ``copy``: the online encoder's running statistics, copied at every update
  (timm ``exclude_buffers=True``, ema-pytorch ``param_or_buffer_names_no_ema``);
* ``keep``: their initial values (mean 0, variance 1) for ever: the bug of
  cosmix-uda#21, BN buffers that are never updated;
* ``own`` (BYOL): ``"exclude"`` them from the EMA; the target runs its batch
  norm in train mode, on the statistics of each batch it sees, and keeps its
  own running average of them (``get_target(ema_state, online=...)`` fills
  the excluded statistics).

In the first three the target makes the loss's targets in eval mode, with its
stored statistics. Every frozen target encoder is evaluated as in the demo,
in eval mode (its stored statistics): cosine k-NN and 1-shot logistic
regression (and the rest of the demo's metrics in the JSON), over ``--seeds``.

Outputs ``policy.png`` and ``policy.json``.

Usage::

  python examples/policy_digits.py --out-dir docs      # ~10 min on 2 cores
  python examples/policy_digits.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ijepa_digits.config import Config  # noqa: E402  (the demo's pieces)
from ijepa_digits.data import NUM_TOKENS, PATCH_DIM, load_data  # noqa: E402
from ijepa_digits.evaluation import evaluate  # noqa: E402
from ijepa_digits.model import Encoder, Predictor  # noqa: E402
from ijepa_digits.training import as_targets, draw_batch, optimizer  # noqa: E402

import jepa_ema  # noqa: E402

MOMENTUM = 0.996
VARIANTS = ("average", "copy", "keep", "own")
ACTIONS = {
  "average": "average",
  "copy": "copy",
  "keep": "keep",
  "own": "exclude",
}


class State(NamedTuple):
  step: jax.Array
  params: Any  # {"encoder": {"params", "batch_stats"}, "predictor": ...}
  opt_state: Any
  ema: jepa_ema.EmaState  # of params["encoder"] (the online variables)
  target_stats: Any  # "own": the target's own BN statistics
  rng: jax.Array


class Runner(NamedTuple):
  init: Any
  train_chunk: Any
  embed: Any
  target_variables: Any


@functools.lru_cache(maxsize=8)
def build(cfg: Config, variant: str) -> Runner:
  """The train step of one variant (the demo's, with BN in the encoder)."""
  encoder = Encoder(
    cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, batch_norm=True
  )
  predictor = Predictor(
    cfg.pred_width, cfg.pred_depth, cfg.heads, cfg.mlp_ratio, cfg.width
  )
  tx = optimizer(cfg)
  # The policy: a prefix of the encoder's variables.
  ema = jepa_ema.ema(
    MOMENTUM, policy={"params": "average", "batch_stats": ACTIONS[variant]}
  )
  own = variant == "own"

  def init(seed: jax.typing.ArrayLike) -> State:
    k_enc, k_pred, k_run = jax.random.split(jax.random.PRNGKey(seed), 3)
    enc = encoder.init(k_enc, jnp.zeros((1, NUM_TOKENS, PATCH_DIM)))
    pred = predictor.init(
      k_pred,
      jnp.zeros((1, cfg.context, cfg.width)),
      jnp.zeros((1, cfg.context), jnp.int32),
      jnp.zeros((1, cfg.target_block**2), jnp.int32),
    )["params"]
    params = {"encoder": enc, "predictor": pred}
    trainable = {"encoder": enc["params"], "predictor": pred}
    return State(
      jnp.zeros([], jnp.int32),
      params,
      tx.init(trainable),
      ema.init(enc),
      enc["batch_stats"],
      k_run,
    )

  def target_variables(state: State) -> Any:
    """The target encoder's variables: for "own", its own statistics fill
    the ones the EMA excludes."""
    online = {  # only its excluded part is read
      "params": state.params["encoder"]["params"],
      "batch_stats": state.target_stats,
    }
    return (
      jepa_ema.get_target(state.ema, online=online)
      if own
      else (state.ema.target)
    )

  def loss_fn(trainable, batch_stats, target, x, ctx_idx, tgt_idx):
    if own:  # BYOL: the target normalises with the batch's statistics
      z, new = encoder.apply(target, x, train=True, mutable=["batch_stats"])
      target_stats = new["batch_stats"]
    else:
      z, target_stats = encoder.apply(target, x), None
    z = as_targets(z, tgt_idx)
    ctx, new = encoder.apply(
      {"params": trainable["encoder"], "batch_stats": batch_stats},
      x,
      ctx_idx,
      train=True,
      mutable=["batch_stats"],
    )
    pred = predictor.apply(
      {"params": trainable["predictor"]}, ctx, ctx_idx, tgt_idx
    )
    loss = jnp.mean((pred - z) ** 2)
    return loss, (new["batch_stats"], target_stats)

  def train_step(state: State, x_train: jax.Array) -> tuple[State, jax.Array]:
    x, ctx_idx, tgt_idx = draw_batch(cfg, state.rng, state.step, x_train)
    trainable = {
      "encoder": state.params["encoder"]["params"],
      "predictor": state.params["predictor"],
    }
    (loss, (batch_stats, target_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
    )(
      trainable,
      state.params["encoder"]["batch_stats"],
      target_variables(state),
      x,
      ctx_idx,
      tgt_idx,
    )
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    encoder_vars = {"params": trainable["encoder"], "batch_stats": batch_stats}
    params = {"encoder": encoder_vars, "predictor": trainable["predictor"]}
    new = State(
      state.step + 1,
      params,
      opt_state,
      ema.update(encoder_vars, state.ema),
      target_stats if own else state.target_stats,
      state.rng,
    )
    return new, loss

  @functools.partial(jax.jit, static_argnames="length", donate_argnums=0)
  def train_chunk(state: State, x_train: jax.Array, *, length: int):
    return jax.lax.scan(
      lambda s, _: train_step(s, x_train), state, None, length=length
    )

  @jax.jit
  def embed(variables: Any, patches: jax.Array) -> jax.Array:
    return encoder.apply(variables, patches).mean(axis=1)  # eval mode

  return Runner(jax.jit(init), train_chunk, embed, target_variables)


def _stats_gap(target: Any, online: Any) -> float:
  """``||target stats - online stats|| / ||online stats||`` (mean and var)."""
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(target)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(online)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def one_run(cfg: Config, variant: str, data: dict) -> dict[str, Any]:
  runner = build(dataclasses.replace(cfg, seed=0), variant)
  x_train = jnp.asarray(data["x_train"])
  state = runner.init(cfg.seed)
  t0 = time.time()
  losses = []
  for start in range(0, cfg.steps, cfg.chunk):
    length = min(cfg.chunk, cfg.steps - start)
    state, loss = runner.train_chunk(state, x_train, length=length)
    losses.append(float(loss[-1]))
  seconds = time.time() - t0
  target = runner.target_variables(state)
  online = state.params["encoder"]
  return {
    "target": metrics(runner, target, data, cfg.seed),
    "final_loss": losses[-1],
    "stats_gap": _stats_gap(target["batch_stats"], online["batch_stats"]),
    "train_seconds": seconds,
  }


def init_metrics(cfg: Config, data: dict) -> dict[str, float]:
  """The evaluation of the encoder at its initialisation (eval mode, the
  initial statistics), the same for every variant."""
  runner = build(dataclasses.replace(cfg, seed=0), "average")
  variables = runner.init(cfg.seed).params["encoder"]
  return metrics(runner, variables, data, cfg.seed)


def metrics(
  runner: Runner, variables: Any, data: dict, seed: int
) -> dict[str, float]:
  """The demo's evaluation of an encoder's variables (eval mode)."""
  return evaluate(
    np.asarray(runner.embed(variables, jnp.asarray(data["x_train"]))),
    np.asarray(runner.embed(variables, jnp.asarray(data["x_test"]))),
    data["y_train"],
    data["y_test"],
    seed,
  )


def summary(result: dict) -> str:
  """The markdown table: mean ± std over the seeds."""
  keys = ("knn5", "1shot", "5shot", "linear", "emb_std", "eff_rank")
  lines = [
    "| target BN statistics | `batch_stats` action | k-NN (5) | 1-shot | "
    "5-shot | linear | emb. std | eff. rank | stats gap |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  rows = [
    (
      v,
      ACTIONS[v],
      [r[v]["target"] for r in result["per_seed"]],
      [r[v]["stats_gap"] for r in result["per_seed"]],
    )
    for v in VARIANTS
  ]
  rows.append(
    (
      "random-init encoder",
      "",
      [r["random_init"] for r in result["per_seed"]],
      None,
    )
  )
  for name, action, ms, gaps in rows:
    cells = []
    for key in keys:
      v = np.array([m[key] for m in ms])
      scale, fmt = (
        (1, ".4f")
        if key == "emb_std"
        else (1, ".1f")
        if key == "eff_rank"
        else (100, ".1f")
      )
      sd = v.std(ddof=1) if len(v) > 1 else 0.0
      cells.append(f"{scale * v.mean():{fmt}} ± {scale * sd:{fmt}}")
    gap = "" if gaps is None else f"{np.mean(gaps):.3f}"
    lines.append(
      f"| {name} | {action and f'`{action}`'} | "
      + " | ".join(cells)
      + f" | {gap} |"
    )
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
  x = np.arange(len(VARIANTS))
  for a, (key, title) in zip(ax, (("knn5", "k-NN (5)"), ("1shot", "1-shot"))):
    per_seed = np.array(
      [[r[v]["target"][key] for v in VARIANTS] for r in result["per_seed"]]
    )
    random = np.array([r["random_init"][key] for r in result["per_seed"]])
    a.bar(x, 100 * per_seed.mean(0), 0.6, color="tab:blue", alpha=0.6)
    for row in per_seed:  # one line per seed: the variants are paired
      a.plot(x, 100 * row, "o-", color="black", ms=4, lw=0.6, alpha=0.7)
    a.axhspan(
      100 * random.min(),
      100 * random.max(),
      color="gray",
      alpha=0.3,
      label="random-init encoder (range)",
    )
    a.set(
      xticks=x,
      xticklabels=[f"{v}\n({ACTIONS[v]})" for v in VARIANTS],
      title=f"{title} test accuracy (%) of the target encoder",
      ylim=(0, 100),
    )
    a.legend(fontsize=7, loc="lower right")
  fig.suptitle(
    f"target BN statistics on the digits I-JEPA with batch norm: "
    f"bars = mean, dots = seeds {result['seeds']}, {result['steps']} steps",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument(
    "--out-dir", type=pathlib.Path, default=pathlib.Path("outputs")
  )
  args = p.parse_args(argv)
  from tqdm.auto import tqdm

  steps = 40 if args.quick else args.steps
  if steps < 1:
    p.error("--steps must be >= 1")
  cfg = Config(
    steps=steps,
    warmup=max(steps // 10, 1),
    chunk=min(100, steps),
    depth=2 if args.quick else 3,
    pred_depth=1 if args.quick else 2,
  )
  data = load_data()
  t0 = time.time()
  per_seed = []
  bar = tqdm(
    total=len(args.seeds) * len(VARIANTS),
    desc="policy",
    disable=args.no_progress,
    file=sys.stdout,
  )
  for seed in args.seeds:
    cfg_s = dataclasses.replace(cfg, seed=seed)
    row: dict[str, Any] = {
      "seed": seed,
      "random_init": init_metrics(cfg_s, data),
    }
    per_seed.append(row)
    for variant in VARIANTS:
      row[variant] = one_run(cfg_s, variant, data)
      m = row[variant]["target"]
      bar.write(
        f"seed {seed} {variant:>7}: k-NN {m['knn5']:.3f} 1-shot "
        f"{m['1shot']:.3f} std {m['emb_std']:.4f} rank {m['eff_rank']:.1f}"
        f" stats gap {row[variant]['stats_gap']:.3f}"
      )
      bar.update(1)
  bar.close()
  result = {
    "seeds": args.seeds,
    "steps": steps,
    "momentum": MOMENTUM,
    "per_seed": per_seed,
    "config": dataclasses.asdict(cfg),
    "seconds": time.time() - t0,
  }
  args.out_dir.mkdir(parents=True, exist_ok=True)
  (args.out_dir / "policy.json").write_text(json.dumps(result, indent=1))
  plot(result, args.out_dir / "policy.png")
  print("\n" + summary(result))
  print(f"\nwrote {args.out_dir / 'policy.png'} ({result['seconds']:.0f} s)")
  return result


if __name__ == "__main__":
  main()

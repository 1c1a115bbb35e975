"""Layouts of the EMA target at scale: per-device memory, collectives and the
EMA's share of an I-JEPA-like train step, on 8 simulated CPU devices.

The train step: a ViT-B/16-sized context encoder (the timm parameter tree of
``ema_bench.vit_shapes``: 85.8 M params), a narrow predictor, AdamW (optax),
and the target encoder as an EMA of the context encoder (``jepa_ema.ema``),
read every step by the teacher's forward pass as in I-JEPA. The blocks'
leaves are stacked and run in a ``lax.scan`` (same parameter count, short
compilation). Memory and collectives come from the full-size step compiled
from abstract arrays (``ShapeDtypeStruct`` s with shardings: nothing is
allocated). The times come from the same layout with the encoder cut to
``--time-depth`` blocks (default 2), run for real: 8 replicas of the full
tree and its AdamW state would need ~15 GB here. The *compute* is shrunk too
(a few tokens per image, one image per device), so the EMA's share of the
step is far larger than in a real I-JEPA step.

Layouts (a mesh of 8 devices on one axis, ``data``, with Auto axes):

* (a) ``dp``: data-parallel (params replicated), EMA laid out like the params;
* (b) ``dp_zero``: data-parallel, EMA sharded over ``data`` (``target_sharding=``);
* (c) ``fsdp``: params (and AdamW state) sharded over ``data``, EMA like the
  params;
* (d) ``dp_zero_eval``: (b) plus evaluation EMAs (several momenta) in
  ``memory_kind="pinned_host"`` updated with ``every=10``;
* (e) ``lora``: a frozen base encoder with LoRA adapters, the EMA holding the
  adapters only (``policy=`` excluding the base), data-parallel.

For each: the per-device sizes XLA reports for the compiled step
(``compiled.memory_analysis()``: arguments, outputs, temporaries, aliased),
the target's bytes per device (from its arrays' shards), the collectives of
the compiled step (counted by kind in ``compiled.as_text()``) with and
without the EMA update, and the step's time with and without it, measured
side by side (interleaved rounds, median). The step *without* the EMA is the
same step with the target passed in and read by the teacher but not updated,
so the difference is the update alone.

On CPU, host and device memory are the same RAM: layout (d) shows the
semantics (where the arrays live, what the program transfers), not what
offloading saves on an accelerator.

Usage::

  python benchmarks/scale_bench.py            # ~10 min; writes scale_results.*
  python benchmarks/scale_bench.py --tiny --out /tmp/sb   # ~1 min of CPU

``--tiny`` lowers LLVM's optimisation level (the HLO, so memory and
collectives, is unchanged; checked) because its cost is compilation.
"""

from __future__ import annotations

import os
import sys

_FLAGS = ["--xla_force_host_platform_device_count=8"]
if "--tiny" in sys.argv:
  # LLVM's effort only (the HLO, hence memory and collectives, is the same;
  # checked): the tiny run's cost is compilation.
  _FLAGS += [
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
  ]
for _flag in _FLAGS:  # before jax is imported
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _flag
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import gc
import json
import math
import pathlib
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ema_bench  # the ViT tree shapes

import jepa_ema

HERE = pathlib.Path(__file__).resolve().parent
N_DEVICES = 8
T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------ config


@dataclass(frozen=True)
class Config:
  width: int = 768  # ViT-B/16
  depth: int = 12
  mlp: int = 3072
  patch: int = 16
  heads: int = 12
  pred_width: int = 384
  pred_depth: int = 4
  pred_heads: int = 6
  tokens: int = 8  # patches per image seen by the teacher (a real one: 196)
  context: int = 6  # of which the context encoder sees the first ones
  batch_per_device: int = 1
  lora_rank: int = 8
  rounds: int = 5  # interleaved timing rounds (median)
  eval_rounds: int = 2  # rounds of `every` steps for layout (d)
  time_depth: int = 2  # encoder depth of the timed steps (memory: `depth`)
  every: int = 10  # of the evaluation EMAs of layout (d)


FULL = Config()
TINY = Config(
  width=64,
  depth=1,
  mlp=256,
  heads=4,
  pred_width=32,
  pred_depth=1,
  pred_heads=2,
  tokens=8,
  context=6,
  rounds=3,
  eval_rounds=2,
  time_depth=1,
  every=10,
)

LAYOUTS = {
  "dp": "(a) data-parallel, EMA like the params",
  "dp_zero": "(b) data-parallel, EMA sharded over data",
  "fsdp": "(c) FSDP params, EMA like the params",
  "dp_zero_eval": "(d) (b) + 2 evaluation EMAs in pinned_host, every=10",
  "lora": "(e) LoRA adapters only in the EMA (policy excludes the base)",
}

MOMENTUM = jepa_ema.linear_momentum(0.996, 1.0, total_steps=10_000)
EVAL_MOMENTA = (0.999, 0.9999)


# ------------------------------------------------------------- the model


def stacked(
  shapes: dict[str, tuple[int, ...]], depth: int
) -> dict[str, tuple[int, ...]]:
  """The per-block leaves ``blocksNN/...`` of a timm-layout tree stacked
  into ``blocks/...`` leaves of leading dimension ``depth`` (same parameter
  count; the blocks then run in a ``lax.scan``, which keeps compilation
  short at any depth)."""
  out = {k: v for k, v in shapes.items() if not k.startswith("blocks")}
  for k, v in shapes.items():
    if k.startswith("blocks00/"):
      out["blocks/" + k.split("/", 1)[1]] = (depth, *v)
  return out


def encoder_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """ViT/16 at 224 px (ViT-B by default: 85.8 M params), blocks stacked."""
  return stacked(
    ema_bench.vit_shapes(cfg.width, cfg.depth, cfg.mlp, cfg.patch), cfg.depth
  )


def predictor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  w, tokens = cfg.pred_width, (224 // cfg.patch) ** 2
  sh = {
    "embed/kernel": (cfg.width, w),
    "embed/bias": (w,),
    "mask_token": (1, 1, w),
    "pos_embed": (1, tokens, w),
    "norm/scale": (w,),
    "norm/bias": (w,),
    "proj/kernel": (w, cfg.width),
    "proj/bias": (cfg.width,),
  }
  block = ema_bench.vit_shapes(w, cfg.pred_depth, 4 * w, cfg.patch)
  blk = stacked(block, cfg.pred_depth)
  sh.update({k: v for k, v in blk.items() if k.startswith("blocks/")})
  return sh


def lora_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """Rank-``lora_rank`` adapters of qkv, proj, fc1 and fc2 in every block."""
  r, w, m, d = cfg.lora_rank, cfg.width, cfg.mlp, cfg.depth
  sh = {}
  for name, (din, dout) in {
    "attn/qkv": (w, 3 * w),
    "attn/proj": (w, w),
    "mlp/fc1": (w, m),
    "mlp/fc2": (m, w),
  }.items():
    sh[f"blocks/{name}/lora_a"] = (d, din, r)
    sh[f"blocks/{name}/lora_b"] = (d, r, dout)
  return sh


def init_tree(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict:
  """numpy values (no compilation): kernels ~ N(0, 0.02), norms' scales 1,
  biases and LoRA's ``B`` 0."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in sorted(shapes.items()):
    if k.endswith("/scale"):
      out[k] = np.ones(s, np.float32)
    elif k.endswith("/bias") or k.endswith("lora_b"):
      out[k] = np.zeros(s, np.float32)
    else:
      out[k] = 0.02 * rng.standard_normal(s, dtype=np.float32)
  return out


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def dense(p: dict, name: str, x: jax.Array, lora: dict | None) -> jax.Array:
  y = x @ p[name + "/kernel"] + p[name + "/bias"]
  if lora is not None and name + "/lora_a" in lora:
    y = y + (x @ lora[name + "/lora_a"]) @ lora[name + "/lora_b"]
  return y


def batch_sharded(h: jax.Array) -> jax.Array:
  """Activations stay sharded over the batch (under FSDP XLA would otherwise
  shard them like the weights and reshuffle them between layers)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return h
  return jax.lax.with_sharding_constraint(h, P("data"))


def blocks(
  p: dict, h: jax.Array, heads: int, lora: dict | None = None
) -> jax.Array:
  """The transformer blocks (pre-norm), in a ``lax.scan`` over the stacked
  ``blocks/...`` leaves of ``p`` (and of the LoRA adapters)."""
  b_, n, w = h.shape
  stack = {
    k[len("blocks/") :]: v for k, v in p.items() if k.startswith("blocks/")
  }
  ad = {} if lora is None else {k[len("blocks/") :]: v for k, v in lora.items()}

  def block(h: jax.Array, layer: tuple[dict, dict]) -> tuple[jax.Array, None]:
    q, lo = layer
    lo_ = lo if lora is not None else None
    h = batch_sharded(h)
    y = layer_norm(h, q["norm1/scale"], q["norm1/bias"])
    qkv = dense(q, "attn/qkv", y, lo_).reshape(b_, n, 3, heads, -1)
    qs, ks, vs = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum("bnhd,bmhd->bhnm", qs, ks) / math.sqrt(w // heads)
    y = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(att, -1), vs)
    h = h + dense(q, "attn/proj", y.reshape(b_, n, w), lo_)
    y = layer_norm(h, q["norm2/scale"], q["norm2/bias"])
    y = jax.nn.gelu(dense(q, "mlp/fc1", y, lo_))
    return h + dense(q, "mlp/fc2", y, lo_), None

  return jax.lax.scan(block, h, (stack, ad))[0]


def encode(
  p: dict, x: jax.Array, idx: jax.Array, cfg: Config, lora: dict | None = None
) -> jax.Array:
  """ViT encoder over the patches ``x`` (batch, len(idx), patch dim) at the
  positions ``idx``."""
  h = dense(p, "patch_embed", x, None) + p["pos_embed"][:, 1 + idx]
  h = blocks(p, h, cfg.heads, lora)
  return layer_norm(h, p["norm/scale"], p["norm/bias"])


def predict(
  p: dict, z: jax.Array, ctx: jax.Array, tgt: jax.Array, cfg: Config
) -> jax.Array:
  """I-JEPA predictor: context embeddings and mask tokens at the target
  positions in, predicted target embeddings out."""
  h = dense(p, "embed", z, None) + p["pos_embed"][:, ctx]
  m = jnp.broadcast_to(
    p["mask_token"] + p["pos_embed"][:, tgt],
    (z.shape[0], tgt.size, h.shape[-1]),
  )
  h = blocks(p, jnp.concatenate([h, m], 1), cfg.pred_heads)
  h = layer_norm(h, p["norm/scale"], p["norm/bias"])
  return dense(p, "proj", h[:, ctx.size :], None)


def ijepa_loss(
  trainable: dict,
  teacher: dict,
  x: jax.Array,
  cfg: Config,
  base: dict | None = None,
) -> jax.Array:
  """``trainable`` = {"encoder" | "lora", "predictor"}; ``teacher`` = the
  target encoder's params ({"base", "lora"} for LoRA)."""
  idx = jnp.arange(cfg.tokens)
  ctx, tgt = idx[: cfg.context], idx[cfg.context :]
  if base is None:
    t_out = encode(teacher, x, idx, cfg)
    z = encode(trainable["encoder"], x[:, ctx], ctx, cfg)
  else:
    t_out = encode(teacher["base"], x, idx, cfg, teacher["lora"])
    z = encode(base, x[:, ctx], ctx, cfg, trainable["lora"])
  h = jax.lax.stop_gradient(t_out)
  h = layer_norm(h, 1.0, 0.0)[:, tgt]  # I-JEPA normalises the targets
  pred = predict(trainable["predictor"], z, ctx, tgt, cfg)
  return optax.huber_loss(pred, h, delta=1.0).mean()


# ----------------------------------------------------------------- layouts


def zero_spec(shape: tuple[int, ...], n: int = N_DEVICES) -> P:
  """Shard the largest dimension divisible by ``n`` over ``data``."""
  dims = [d for d in range(len(shape)) if shape[d] % n == 0]
  if not dims:
    return P()
  d = max(dims, key=lambda i: shape[i])
  return P(*[("data" if i == d else None) for i in range(len(shape))])


def zero_shardings(mesh: jax.sharding.Mesh) -> Callable[[Any], Any]:
  """A callable ``target_sharding``: every leaf over ``data`` (ZeRO-style)."""

  def fn(params: Any) -> Any:
    return jax.tree.map(
      lambda x: NamedSharding(mesh, zero_spec(tuple(x.shape))), params
    )

  return fn


def put(tree: Any, shardings: Any) -> Any:
  return jax.block_until_ready(jax.device_put(tree, shardings))


def shardings_of(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Each leaf's sharding; scalars committed to one device (optax's counts)
  become replicated on the mesh."""

  def one(x: Any) -> Any:
    s = x.sharding
    if isinstance(s, NamedSharding):
      return s
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


def device_bytes(tree: Any, device: Any) -> int:
  """Bytes of ``tree``'s shards on ``device``."""
  total = 0
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      if s.device == device:
        total += s.data.nbytes
  return total


def abstract_state(ema: jepa_ema.EmaTransformation, params: Any) -> Any:
  """``ema.init(params)`` as ``ShapeDtypeStruct`` s with their shardings
  (``jax.eval_shape`` drops shardings on Auto meshes; the EMA's own
  ``state_shardings`` gives them, memory kinds included)."""
  return jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
    jax.eval_shape(ema.init, params),
    ema.state_shardings(params),
  )


def sharded_bytes(tree: Any) -> int:
  """Bytes per device of ``tree``'s leaves (arrays or ``ShapeDtypeStruct``
  s), from their shardings' shard shapes."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for x in jax.tree.leaves(tree)
  )


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_kinds(tree: Any) -> list[str]:
  return sorted({str(x.sharding.memory_kind) for x in jax.tree.leaves(tree)})


COLLECTIVES = re.compile(
  r"= (\S.*?) \b(all-reduce|all-gather|all-to-all|collective-permute"
  r"|reduce-scatter)(-start)?\("
)
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collectives(compiled: Any) -> dict[str, dict[str, int]]:
  """Per kind of collective instruction in the compiled program: how many,
  and the bytes of their results (per device)."""
  out: dict[str, dict[str, int]] = {}
  for m in COLLECTIVES.finditer(compiled.as_text()):
    kind = m.group(2)
    nbytes = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
      size = math.prod(int(d) for d in dims.split(",") if d)
      nbytes += size * DTYPE_BYTES.get(dt, 4)
    row = out.setdefault(kind, {"count": 0, "bytes": 0})
    row["count"] += 1
    row["bytes"] += nbytes
  return dict(sorted(out.items()))


def memory(compiled: Any) -> dict[str, int]:
  """``compiled.memory_analysis()``, per device, as a dict of byte sizes."""
  ma = compiled.memory_analysis()
  names = [
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
    "host_argument_size_in_bytes",
    "host_output_size_in_bytes",
    "host_temp_size_in_bytes",
    "host_alias_size_in_bytes",
  ]
  return {n: int(getattr(ma, n)) for n in names if hasattr(ma, n)}


# ---------------------------------------------------------------- one layout


class Layout:
  """Builds the state and the two compiled steps (with and without the EMA
  update) of one layout."""

  def __init__(self, name: str, cfg: Config, mesh: jax.sharding.Mesh):
    self.name, self.cfg, self.mesh = name, cfg, mesh
    self.repl = NamedSharding(mesh, P())
    self.fsdp = name == "fsdp"
    self.lora = name == "lora"
    self.zero = name in ("dp_zero", "dp_zero_eval")
    self.eval = name == "dp_zero_eval"
    self.opt = optax.adamw(1e-4, weight_decay=0.05)
    self.pin = True
    kw: dict[str, Any] = {}
    if self.zero:
      kw["target_sharding"] = zero_shardings(mesh)
    if self.lora:
      kw["policy"] = {"base": "exclude", "lora": "average"}
    self.ema = jepa_ema.ema(MOMENTUM, **kw)
    self.eval_ema = (
      jepa_ema.ema(
        EVAL_MOMENTA,
        every=cfg.every,
        target_sharding=zero_shardings(mesh),
        memory_kind="pinned_host",
      )
      if self.eval
      else None
    )

  def param_sharding(self, shapes: dict[str, tuple[int, ...]]) -> dict:
    if self.fsdp:
      return {
        k: NamedSharding(self.mesh, zero_spec(s)) for k, s in shapes.items()
      }
    return {k: self.repl for k in shapes}

  def build(self, abstract: bool) -> None:
    """The state: real arrays (to run the step), or ``ShapeDtypeStruct`` s
    with their shardings (to compile it without allocating anything)."""
    cfg = self.cfg
    enc_sh, pred_sh = encoder_shapes(cfg), predictor_shapes(cfg)

    def init(shapes: dict, seed: int) -> dict:
      sh = self.param_sharding(shapes)
      if abstract:
        return {
          k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=sh[k])
          for k, v in shapes.items()
        }
      return put(init_tree(seed, shapes), sh)

    encoder, predictor = init(enc_sh, 0), init(pred_sh, 1)
    if self.lora:
      self.base = encoder
      lora = init(lora_shapes(cfg), 2)
      trainable = {"lora": lora, "predictor": predictor}
      tracked = {"base": encoder, "lora": lora}
    else:
      self.base = None
      trainable = {"encoder": encoder, "predictor": predictor}
      tracked = encoder
    self.trainable = trainable
    batch = (cfg.batch_per_device * N_DEVICES, cfg.tokens, cfg.patch**2 * 3)
    x_sh = NamedSharding(self.mesh, P("data"))
    if abstract:
      self.opt_state = optax.tree_map_params(
        self.opt,
        lambda a, x: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=x.sharding
        ),
        jax.eval_shape(self.opt.init, trainable),
        trainable,
        transform_non_params=lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=self.repl
        ),
      )
      self.ema_state = abstract_state(self.ema, tracked)
      self.eval_state = (
        abstract_state(self.eval_ema, tracked) if self.eval_ema else None
      )
      self.x = jax.ShapeDtypeStruct(batch, jnp.float32, sharding=x_sh)
    else:
      self.opt_state = self.opt.init(trainable)
      self.ema_state = self.ema.init(tracked)
      self.eval_state = self.eval_ema.init(tracked) if self.eval_ema else None
      x = np.random.default_rng(3).standard_normal(batch, dtype=np.float32)
      self.x = put(x, x_sh)
    self.abstract = abstract
    self.params_bytes = tree_bytes(trainable) + (
      tree_bytes(self.base) if self.lora else 0
    )
    self.tracked_bytes = tree_bytes(tracked)
    self.adapter_bytes = tree_bytes(trainable["lora"]) if self.lora else None

  # -- the steps

  def _tracked(self, trainable: dict, base: Any) -> Any:
    """What the EMA averages: the context encoder (for LoRA: the frozen
    base, excluded by the policy, and the adapters)."""
    if self.lora:
      return {"base": base, "lora": trainable["lora"]}
    return trainable["encoder"]

  def _train(
    self, trainable: dict, opt_state: Any, ema_state: Any, x: Any, base: Any
  ) -> tuple:
    target = jepa_ema.get_target(ema_state)
    if self.lora:  # the excluded base comes from the online model
      target = jepa_ema.policy.fill(target, self._tracked(trainable, base))
    loss, grads = jax.value_and_grad(ijepa_loss)(
      trainable, target, x, self.cfg, base
    )
    updates, opt_state = self.opt.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if self.pin:  # the new params and AdamW state where they live
      trainable, opt_state = jax.lax.with_sharding_constraint(
        (trainable, opt_state), self.train_sh
      )
    return trainable, opt_state, loss

  def compile(self, analysis: bool) -> None:
    """The steps with and without the EMA update; with ``analysis``, also
    (b)'s step without pinning the new params and the update alone."""

    def with_ema(train: tuple, emas: tuple, x: Any, base_: Any) -> tuple:
      trainable, opt_state = train
      ema_state, eval_state = emas
      trainable, opt_state, loss = self._train(
        trainable, opt_state, ema_state, x, base_
      )
      tracked = self._tracked(trainable, base_)
      ema_state = self.ema.update(tracked, ema_state)
      if self.eval_ema is not None:
        eval_state = self.eval_ema.update(tracked, eval_state)
      return (trainable, opt_state), (ema_state, eval_state), loss

    def without(train: tuple, emas: tuple, x: Any, base_: Any) -> tuple:
      trainable, opt_state = train
      trainable, opt_state, loss = self._train(
        trainable, opt_state, emas[0], x, base_
      )
      return (trainable, opt_state), loss

    train = (self.trainable, self.opt_state)
    emas = (self.ema_state, self.eval_state)
    train_sh = shardings_of(train, self.mesh)
    self.train_sh = train_sh
    emas_sh = shardings_of(emas, self.mesh)
    args = (train, emas, self.x, self.base)
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):  # for the activations' sharding constraint
      self._compile(with_ema, without, args, train_sh, emas_sh, analysis)
    self.compile_s = time.perf_counter() - t0

  def _compile(
    self,
    with_ema: Callable,
    without: Callable,
    args: tuple,
    train_sh: Any,
    emas_sh: Any,
    analysis: bool,
  ) -> None:
    self.step_ema = (
      jax.jit(
        with_ema,
        donate_argnums=(0, 1),
        out_shardings=(train_sh, emas_sh, self.repl),
      )
      .lower(*args)
      .compile()
    )
    self.step_base = (
      jax.jit(without, donate_argnums=(0,), out_shardings=(train_sh, self.repl))
      .lower(*args)
      .compile()
    )
    self.step_unpinned = self.update_alone = None
    if not analysis:
      return
    if self.zero and not self.eval:
      # The same step without pinning the new params and AdamW state to their
      # layout: what the update's sharding constraint does to XLA's choices.
      self.pin = False
      self.step_unpinned = (
        jax.jit(
          with_ema,
          donate_argnums=(0, 1),
          out_shardings=(train_sh, emas_sh, self.repl),
        )
        .lower(*args)
        .compile()
      )
      self.pin = True
    # The update alone, on params in the layout of the post-step params.
    self.update_alone = (
      jax.jit(self.ema.update, donate_argnums=1)
      .lower(self._tracked(self.trainable, self.base), self.ema_state)
      .compile()
    )

  # -- running

  def run_ema(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      train, emas, loss = self.step_ema(
        (self.trainable, self.opt_state),
        (self.ema_state, self.eval_state),
        self.x,
        self.base,
      )
      (self.trainable, self.opt_state), (self.ema_state, self.eval_state) = (
        train,
        emas,
      )
    jax.block_until_ready((train, emas, loss))
    return (time.perf_counter() - t0) / steps

  def run_base(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      train, loss = self.step_base(
        (self.trainable, self.opt_state),
        (self.ema_state, self.eval_state),
        self.x,
        self.base,
      )
      self.trainable, self.opt_state = train
    jax.block_until_ready((train, loss))
    return (time.perf_counter() - t0) / steps

  def timing(self) -> dict[str, Any]:
    """The steps with and without the update, interleaved (ABBA) rounds of
    one step (of ``every`` steps for layout (d)), medians."""
    window = self.cfg.every if self.eval else 1
    rounds = self.cfg.eval_rounds if self.eval else self.cfg.rounds
    self.run_ema(1)  # warm-up (first-call allocations)
    self.run_base(1)
    with_ema, without = [], []
    for r in range(rounds):
      if r % 2 == 0:  # ABBA: neither variant always runs first
        with_ema.append(self.run_ema(window))
        without.append(self.run_base(window))
      else:
        without.append(self.run_base(window))
        with_ema.append(self.run_ema(window))
    t_ema, t_base = statistics.median(with_ema), statistics.median(without)
    res: dict[str, Any] = {
      "timed encoder depth": self.cfg.depth,
      "ms per step with EMA": 1e3 * t_ema,
      "ms per step without EMA update": 1e3 * t_base,
      "EMA share of step time": (t_ema - t_base) / t_ema,
      "rounds with EMA (ms)": [1e3 * t for t in with_ema],
      "rounds without EMA update (ms)": [1e3 * t for t in without],
      "steps per round": window,
      "timing compile s": self.compile_s,
    }
    if self.eval_state is not None:
      res["eval steps done"] = int(self.eval_state[0].step)
    return res

  def analysis(self) -> dict[str, Any]:
    """Memory and collectives of the compiled programs, and the state's
    bytes per device (exact)."""
    target = jepa_ema.get_target(self.ema_state)
    res: dict[str, Any] = {
      "description": LAYOUTS[self.name],
      "encoder depth": self.cfg.depth,
      "params bytes (global)": self.params_bytes,
      "tracked bytes (global)": self.tracked_bytes,
      "target bytes per device": sharded_bytes(target),
      "target bytes (global)": tree_bytes(target),
      "target memory kinds": memory_kinds(target),
      "target specs": sorted(
        {str(x.sharding.spec) for x in jax.tree.leaves(target)}
      ),
      "memory per device, step with EMA": memory(self.step_ema),
      "memory per device, step without EMA update": memory(self.step_base),
      "collectives, step with EMA": collectives(self.step_ema),
      "collectives, step without EMA update": collectives(self.step_base),
      "collectives, EMA update alone": collectives(self.update_alone),
      "compile s": self.compile_s,
    }
    if not self.abstract:  # the arrays themselves, shard by shard
      res["target bytes on device 0 (its shards)"] = device_bytes(
        target, self.mesh.devices.flat[0]
      )
    cb = res["collectives, step without EMA update"]
    res["collectives added by the EMA update"] = added(
      res["collectives, step with EMA"], cb
    )
    if self.step_unpinned is not None:
      cu = collectives(self.step_unpinned)
      res["collectives, step with EMA, new params not pinned"] = cu
      res["collectives added by the EMA update, new params not pinned"] = added(
        cu, cb
      )
    if self.eval_state is not None:
      ev = [s.target for s in self.eval_state]
      res["eval targets"] = len(ev)
      res["eval bytes per device"] = sharded_bytes(ev)
      res["eval memory kinds"] = memory_kinds(ev)
    if self.lora:
      res["adapter bytes (global)"] = self.adapter_bytes
    return res


def added(
  step: dict[str, dict[str, int]], base: dict[str, dict[str, int]]
) -> dict[str, int]:
  """Collective instructions per kind in ``step`` minus those in ``base``."""
  return {
    k: step.get(k, {"count": 0})["count"] - base.get(k, {"count": 0})["count"]
    for k in sorted(set(step) | set(base))
  }


# -------------------------------------------------------------------- output


def mb(x: float) -> str:
  return f"{x / 2**20:,.1f}"


def fmt_coll(c: dict[str, Any]) -> str:
  if not c:
    return "none"
  return ", ".join(
    f"{v['count']} {k}" + (f" ({mb(v['bytes'])} MB)" if "bytes" in v else "")
    for k, v in c.items()
  )


def markdown(res: dict[str, Any]) -> str:
  m = res["meta"]
  lines = [
    f"Measured on {m['machine']}; {m['devices']}; jax {m['jax']}, optax "
    f"{m['optax']}; {m['model']}. Command: `{m['command']}` "
    f"({m['seconds']:.0f} s). Memory and collectives are exact (XLA's "
    f"per-device figures, encoder depth {m['depth']}); times are medians of "
    f"{m['rounds']} interleaved rounds (encoder depth {m['time depth']}) on "
    "a shared 2-core host: noisy, compare within a row. MB = 2^20 bytes, "
    "per device.",
    "",
    "| layout | target per device (MB) | step args / outputs / temp / "
    "aliased (MB) | collectives in the step | added by the EMA update | "
    "step ms with / without the update | EMA share |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in res["layouts"].values():
    mem = r["memory per device, step with EMA"]
    target = mb(r["target bytes per device"])
    if "eval bytes per device" in r:
      target += f" + {mb(r['eval bytes per device'])} pinned_host"
    added = {k: v for k, v in r["collectives added by the EMA update"].items()}
    added_s = ", ".join(f"{v:+d} {k}" for k, v in added.items() if v) or "none"
    lines.append(
      f"| {r['description']} | {target} | "
      f"{mb(mem['argument_size_in_bytes'])} / "
      f"{mb(mem['output_size_in_bytes'])} / "
      f"{mb(mem['temp_size_in_bytes'])} / "
      f"{mb(mem['alias_size_in_bytes'])} | "
      f"{fmt_coll(r['collectives, step with EMA'])} | {added_s} | "
      f"{r['ms per step with EMA']:.0f} / "
      f"{r['ms per step without EMA update']:.0f} | "
      f"{100 * r['EMA share of step time']:.1f} % |"
    )
  lines += ["", *[f"* {n}" for n in res["notes"]]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="a tiny model: seconds")
  p.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help="directory for scale_results.{json,md} (default: benchmarks/ for a "
    "full run; nothing is written for --tiny without --out)",
  )
  p.add_argument(
    "--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS)
  )
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument(
    "--time-depth",
    type=int,
    default=None,
    help="encoder depth of the timed steps (default 2; memory and "
    "collectives are always those of the full depth)",
  )
  args = p.parse_args(argv)
  cfg = TINY if args.tiny else FULL
  if args.rounds:
    cfg = replace(cfg, rounds=args.rounds)
  if args.time_depth:
    cfg = replace(cfg, time_depth=args.time_depth)
  out = args.out if args.out is not None else (None if args.tiny else HERE)
  devices = jax.devices()
  assert len(devices) == N_DEVICES, f"need {N_DEVICES} devices: {devices}"
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  n_enc = sum(math.prod(s) for s in encoder_shapes(cfg).values())
  n_pred = sum(math.prod(s) for s in predictor_shapes(cfg).values())
  log(
    f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices; "
    f"encoder {n_enc / 1e6:.1f} M params, predictor {n_pred / 1e6:.1f} M"
  )
  res: dict[str, Any] = {"config": asdict(cfg), "layouts": {}}
  tcfg = replace(cfg, depth=cfg.time_depth)
  for name in args.layouts:
    log(f"{LAYOUTS[name]}: compiling (depth {cfg.depth})")
    lay = Layout(name, cfg, mesh)
    # The full-size state is never allocated when only the timing's is run.
    lay.build(abstract=tcfg != cfg)
    lay.compile(analysis=True)
    r = lay.analysis()
    log(
      f"{name}: compiled in {lay.compile_s:.1f} s; target "
      f"{mb(r['target bytes per device'])} MB per device; collectives "
      f"{fmt_coll(r['collectives, step with EMA'])}; added by the update: "
      f"{r['collectives added by the EMA update']}"
    )
    if tcfg != cfg:
      del lay
      gc.collect()
      log(f"{name}: compiling the timed steps (depth {tcfg.depth})")
      lay = Layout(name, tcfg, mesh)
      lay.build(abstract=False)
      lay.compile(analysis=False)
    log(f"{name}: timing")
    r.update(lay.timing())
    res["layouts"][name] = r
    log(
      f"{name}: step {r['ms per step with EMA']:.0f} ms with the update, "
      f"{r['ms per step without EMA update']:.0f} ms without "
      f"({100 * r['EMA share of step time']:.1f} %)"
    )
    del lay
    gc.collect()
  res["notes"] = [
    "Memory and collectives: the compiled step of the full-size model "
    f"(encoder depth {cfg.depth}), compiled from abstract arrays (nothing "
    "allocated); times: the same layout with the encoder cut to "
    f"{tcfg.depth} blocks (run for real; 8 replicas of the full tree and "
    "its AdamW state would not fit this host's RAM next to other jobs).",
    "Collectives are instructions of the compiled program, counted by kind; "
    "the blocks run in a lax.scan, so an instruction in the loop body runs "
    "once per block, and its MB are one execution's result per device.",
    "The step without the EMA update is the same step, the teacher reading "
    "the target, minus the update: the difference is the update alone "
    "(reading a sharded target, as in (b) and (d), costs the teacher's "
    "all-gathers in both).",
    "The new params and AdamW state are constrained to their layout in the "
    "step; without that constraint XLA may follow the target's sharding "
    "into the optimizer update (see '... new params not pinned' in the "
    "JSON).",
    "On CPU, host and device memory are the same RAM, and XLA:CPU counts "
    "the pinned_host arguments with the others: (d) shows the semantics "
    "(where the evaluation EMAs live, that the step runs and adds no "
    "collective), not the device memory offloading saves on an accelerator.",
    f"The compute is shrunk ({cfg.tokens} tokens per image, "
    f"{cfg.batch_per_device} image per device) while the parameter tree has "
    "its full size, so the EMA's share is far larger than in a real I-JEPA "
    "step (196 tokens, large batches). This 2-core host is shared and "
    "8 simulated devices share its cores: the shares are noisy (within a "
    "few % of 0 is noise; a negative one is).",
  ]
  res["meta"] = {
    "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
    "devices": f"{N_DEVICES} simulated CPU devices "
    "(--xla_force_host_platform_device_count=8)",
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": sys.version.split()[0],
    "model": f"encoder {n_enc / 1e6:.1f} M params (width {cfg.width}, depth "
    f"{cfg.depth}), predictor {n_pred / 1e6:.1f} M, AdamW",
    "command": "python benchmarks/scale_bench.py"
    + (" --tiny" if args.tiny else ""),
    "rounds": cfg.rounds,
    "depth": cfg.depth,
    "time depth": tcfg.depth,
    "full encoder params": sum(
      math.prod(v) for v in encoder_shapes(FULL).values()
    ),
    "seconds": time.perf_counter() - T0,
    "max RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }
  md = markdown(res)
  print(md)
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "scale_results.md").write_text(md)
    log(f"wrote {out / 'scale_results.json'} and {out / 'scale_results.md'}")
  return res


if __name__ == "__main__":
  main()

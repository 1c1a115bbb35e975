"""The networks (Flax Linen): a ViT context encoder and a narrower predictor.

Fixed 2-D sin-cos position embeddings (MAE / I-JEPA). The :class:`Encoder`
sees only the tokens listed in ``idx`` (the context) or all 16 (the target
encoder); the :class:`Predictor` gets the context tokens plus positional mask
tokens and predicts the target encoder's outputs at the target block, as in
I-JEPA (arXiv:2301.08243).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ijepa_digits.data import GRID, NUM_TOKENS


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
  """ViT over the patch tokens listed in ``idx`` (all 16 if ``idx`` is None).

  ``batch_norm=True`` adds a BatchNorm after the patch embedding (statistics
  over the batch and all 16 tokens, before the context is selected; batch
  statistics when ``train``, the running ones otherwise), so the encoder has
  ``batch_stats`` besides its ``params`` (examples/policy_digits.py). The
  demo's encoder has none."""

  width: int
  depth: int
  heads: int
  mlp_ratio: int
  batch_norm: bool = False

  @nn.compact
  def __call__(
    self, patches: jax.Array, idx: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    x = nn.Dense(self.width)(patches)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = x + sincos_positions(self.width)
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

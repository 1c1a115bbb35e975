"""I-JEPA's masks on the 4x4 token grid: one target block, a random context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ijepa_digits.data import GRID, NUM_TOKENS


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

"""The run's configuration: one frozen dataclass, and the momentum spec.

:class:`Config` holds every hyperparameter of a run. ``momentum`` is a spec
string (``"cosine"``, ``"linear"`` or a float); :meth:`Config.schedule` turns
it into a ``jepa_ema`` schedule and :meth:`Config.momenta` into the table of
per-step momenta that the compiled train step reads (see
:mod:`ijepa_digits.training`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import jepa_ema


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

"""jepa_ema: the EMA target encoder of JEPA-style self-supervised models, in JAX.

``target <- m(t) * target + (1 - m(t)) * online`` for every floating leaf of a
parameter pytree, with the momentum schedules of I-JEPA, V-JEPA, BYOL, DINO and
MoCo. Data flows one way (docs/architecture.md): :mod:`jepa_ema.schedules` ->
the kernel -> :mod:`jepa_ema.policy` and :mod:`jepa_ema.placement` -> the
per-leaf plan -> :mod:`jepa_ema.update` (the pure update) and
:mod:`jepa_ema.state` -> :mod:`jepa_ema.transform` (``ema``, ``track_ema``) ->
:mod:`jepa_ema.posthoc`.
"""

from jepa_ema.placement import sharded_over
from jepa_ema.policy import policy_by_path
from jepa_ema.posthoc import (
  PostHocSnapshots,
  SnapshotError,
  posthoc_coefficients,
  posthoc_reconstruct,
)
from jepa_ema.schedules import (
  Schedule,
  checked_momentum,
  constant_momentum,
  cosine_momentum,
  diffusers_momentum,
  ema_pytorch_momentum,
  exp_warmup_momentum,
  gamma_to_sigma_rel,
  halflife_momentum,
  linear_momentum,
  power_momentum,
  scale_momentum,
  sigma_rel_to_gamma,
  tf_warmup_momentum,
  timm_momentum,
  warmup_momentum,
)
from jepa_ema.state import EmaState, get_target, state_shardings
from jepa_ema.transform import (
  EmaTransformation,
  PrecisionWarning,
  TrackEmaTransformation,
  ema,
  track_ema,
)
from jepa_ema.update import ShardingMismatchWarning, ema_update, make_ema_update

__version__ = "0.5.0"

__all__ = [
  "Schedule",
  "constant_momentum",
  "cosine_momentum",
  "linear_momentum",
  "warmup_momentum",
  "tf_warmup_momentum",
  "exp_warmup_momentum",
  "ema_pytorch_momentum",
  "timm_momentum",
  "diffusers_momentum",
  "checked_momentum",
  "scale_momentum",
  "halflife_momentum",
  "power_momentum",
  "gamma_to_sigma_rel",
  "sigma_rel_to_gamma",
  "posthoc_coefficients",
  "posthoc_reconstruct",
  "PostHocSnapshots",
  "SnapshotError",
  "ema_update",
  "make_ema_update",
  "ShardingMismatchWarning",
  "EmaState",
  "EmaTransformation",
  "TrackEmaTransformation",
  "ema",
  "track_ema",
  "get_target",
  "policy_by_path",
  "sharded_over",
  "state_shardings",
  "PrecisionWarning",
]

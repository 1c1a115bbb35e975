"""Shared test configuration.

Every test runs under JAX's *strict* dtype promotion (no implicit promotion
between e.g. bfloat16 and float32), so the library has to cast explicitly.
Tests that drive optax / flax internals, which rely on standard promotion,
are marked ``@pytest.mark.standard_promotion``.
"""

import jax
import pytest
from hypothesis import settings

# Scripts run in subprocesses by the tests (e.g. with 8 simulated devices).
collect_ignore = ["scripts"]

settings.register_profile(
  "ci", max_examples=60, deadline=None, derandomize=True
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
  if request.node.get_closest_marker("standard_promotion"):
    yield
    return
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """Returns ``f`` or ``jax.jit(f, static_argnames=...)`` (both paths)."""

  def wrap(f, **jit_kwargs):
    return jax.jit(f, **jit_kwargs) if request.param else f

  return wrap

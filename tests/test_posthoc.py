"""Post-hoc EMA: EDM2's formulas against numerical integration and hand
cases, exact recovery of tracked profiles, a real trajectory, streaming,
shardings (8 simulated devices) and the snapshot directory."""

import gc
import json
import os
import pathlib
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jepa_ema
from jepa_ema import posthoc

pytestmark = pytest.mark.standard_promotion  # orbax inside


# ------------------------------------------------------------------ weights


def profile(t, gamma, tau):
  """EDM2's power-function profile p(tau) = (g+1) tau^g / t^(g+1) on [0, t]."""
  return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)


def quad_dot(ta, ga, tb, gb, n=400_001):
  tau = np.linspace(0.0, min(ta, tb), n)  # the product is 0 beyond
  f = profile(ta, ga, tau) * profile(tb, gb, tau)
  return float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(tau)))


def test_profile_inner_products_against_quadrature():
  for ta, ga, tb, gb in [
    (100, 6.94, 100, 6.94),
    (50, 6.94, 100, 16.97),
    (100, 16.97, 30, 2.0),
    (7, 1.0, 7, 3.0),
  ]:
    want = quad_dot(ta, ga, tb, gb)
    got = posthoc._p_dot_p(
      np.float64(ta), np.float64(ga), np.float64(tb), np.float64(gb)
    )
    assert got == pytest.approx(want, rel=1e-5)
  # By hand: <p, p> = (g+1)^2 / ((2g+1) t).
  assert posthoc._p_dot_p(10.0, 2.0, 10.0, 2.0) == pytest.approx(9 / 50)


def test_coefficients_against_an_independent_solve():
  steps = [200, 400, 600, 800, 200, 400, 600, 800]
  sigmas = [0.05] * 4 + [0.10] * 4
  gammas = [jepa_ema.sigma_rel_to_gamma(s) for s in sigmas]
  for want_sigma, want_step in [(0.07, 800), (0.15, 600), (0.03, 800)]:
    g = jepa_ema.sigma_rel_to_gamma(want_sigma)
    a = np.array(
      [
        [quad_dot(ti, gi, tj, gj) for tj, gj in zip(steps, gammas)]
        for ti, gi in zip(steps, gammas)
      ]
    )
    b = np.array(
      [quad_dot(ti, gi, want_step, g) for ti, gi in zip(steps, gammas)]
    )
    ref = np.linalg.solve(a, b)
    ref /= ref.sum()
    got = jepa_ema.posthoc_coefficients(
      steps, sigmas, sigma_rel=want_sigma, step=want_step
    )
    assert got.dtype == np.float64 and got.shape == (8,)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    # The profile the weights build matches the reference's.
    tau = np.linspace(0, 800, 4001)
    build = lambda x: sum(
      w * profile(t, gm, tau)  # noqa: E731
      for w, t, gm in zip(x, steps, gammas)
    )
    np.testing.assert_allclose(
      build(got), build(ref), atol=2e-3 * np.max(np.abs(build(ref)))
    )


@pytest.mark.parametrize("index", range(6))
def test_tracked_profile_is_recovered_exactly(index):
  steps = [100, 200, 300, 100, 200, 300]
  sigmas = [0.05, 0.05, 0.05, 0.10, 0.10, 0.10]
  x = jepa_ema.posthoc_coefficients(
    steps, sigmas, sigma_rel=sigmas[index], step=steps[index]
  )
  np.testing.assert_allclose(x, np.eye(6)[index], atol=1e-8)


def test_identical_snapshots_share_the_weight():
  x = jepa_ema.posthoc_coefficients(
    [100, 100, 100], [0.05, 0.05, 0.10], sigma_rel=0.05
  )
  np.testing.assert_allclose(x, [0.5, 0.5, 0.0], atol=1e-8)
  x = jepa_ema.posthoc_coefficients(
    [100, 100, 100], [0.05, 0.05, 0.10], sigma_rel=0.07
  )
  assert np.all(np.isfinite(x)) and x[0] == pytest.approx(x[1], abs=1e-9)
  assert np.max(np.abs(x)) < 100


@pytest.mark.parametrize(
  "args,kwargs,exc,match",
  [
    (([], []), dict(sigma_rel=0.1), ValueError, "empty"),
    (([1, 2], [0.1]), dict(sigma_rel=0.1), ValueError, "same length"),
    (([10], [0.4]), dict(sigma_rel=0.1), ValueError, "sigma_rel"),
    (([10], [0.1]), dict(sigma_rel=0.0), ValueError, "sigma_rel"),
    (([0, 10], [0.1, 0.1]), dict(sigma_rel=0.1), ValueError, ">= 1"),
    (([10], [0.1]), dict(sigma_rel=0.1, step=11), ValueError, "beyond"),
    (([10], [0.1]), dict(sigma_rel=0.1, step=0), ValueError, "step"),
    ((["a"], [0.1]), dict(sigma_rel=0.1), TypeError, "steps"),
    (([10], [0.1]), dict(sigma_rel=0.1, step="five"), TypeError, "step"),
  ],
)
def test_coefficients_bad_inputs(args, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jepa_ema.posthoc_coefficients(*args, **kwargs)


# ------------------------------------------------------- a real trajectory


def test_reconstruction_on_a_random_walk_beats_the_tracked_profiles():
  """Params follow a random walk with drift; EMAs of sigma_rel 0.05 and 0.10
  are snapshotted every 50 steps, sigma_rel 0.07 and 0.14 are tracked
  directly as ground truth. Measured here: the reconstruction's distance to
  the ground truth is 8.7e-5 (0.07) and 8.3e-5 (0.14, outside the tracked
  range) of the nearest tracked profile's distance."""
  n, every, dim = 2000, 50, 256
  rng = np.random.default_rng(0)
  walk = np.cumsum(rng.normal(size=(n, dim)) + 0.05, axis=0).astype(np.float32)
  sigmas = (0.05, 0.10, 0.07, 0.14)
  ema = jepa_ema.ema(
    tuple(jepa_ema.power_momentum(sigma_rel=s) for s in sigmas)
  )
  update = ema.jit()
  state = ema.init({"w": jnp.zeros(dim)})
  snaps = []
  for t in range(n):
    state = update({"w": jnp.asarray(walk[t])}, state)
    if (t + 1) % every == 0:
      snaps += [
        (t + 1, sigmas[i], jax.tree.map(jnp.copy, state[i].target))
        for i in range(2)
      ]
  ratios = []
  for k, want in ((2, 0.07), (3, 0.14)):
    truth = np.asarray(state[k].target["w"], np.float64)
    rec = np.asarray(
      jepa_ema.posthoc_reconstruct(snaps, sigma_rel=want)["w"], np.float64
    )
    err = np.linalg.norm(rec - truth)
    nearest = min(
      np.linalg.norm(np.asarray(state[i].target["w"]) - truth) for i in range(2)
    )
    ratios.append(err / nearest)
  # The quoted figures with a margin of 25 % (float32 summation order may
  # differ across machines; a wrong coefficient costs orders of magnitude).
  assert ratios[0] < 8.7e-5 * 1.25 and ratios[1] < 8.3e-5 * 1.25, ratios


# --------------------------------------------------------------- streaming


def test_reconstruct_streams_one_snapshot_at_a_time():
  live, loads, peak = set(), [], [0]

  def loader(i):
    def load():
      loads.append(i)
      # Device arrays, as orbax restores them. (NumPy leaves are not a
      # fair probe: jit's argument conversion on CPU may keep the last
      # NumPy buffer it saw alive, whatever the caller does.)
      tree = {"w": jnp.full((1000,), float(i), jnp.float32), "n": jnp.int32(i)}
      live.add(i)
      weakref.finalize(tree["w"], live.discard, i)
      peak[0] = max(peak[0], len(live))
      return tree

    return load

  snaps = [
    (s, sig, loader(i))
    for i, (s, sig) in enumerate([(10, 0.05), (20, 0.05), (10, 0.1), (20, 0.1)])
  ]
  gc.collect()
  out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.08)
  assert loads == [0, 1, 2, 3]  # each read once, in order
  assert peak[0] == 1  # never two snapshots alive at once
  x = jepa_ema.posthoc_coefficients(
    [10, 20, 10, 20], [0.05, 0.05, 0.1, 0.1], sigma_rel=0.08
  )
  np.testing.assert_allclose(out["w"], np.dot(x, np.arange(4.0)), atol=1e-5)
  assert out["w"].dtype == jnp.float32
  assert int(out["n"]) == 3  # non-floating leaves: from the last snapshot


def test_reconstruct_dtypes_and_structure_errors():
  snaps = [
    (10, 0.05, {"w": jnp.ones(3, jnp.bfloat16)}),
    (10, 0.10, {"w": jnp.zeros(3, jnp.bfloat16)}),
  ]
  out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.05)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), 1.0)
  with pytest.raises(ValueError, match="different tree structure"):
    jepa_ema.posthoc_reconstruct(
      [(10, 0.05, {"w": jnp.ones(3)}), (10, 0.1, {"v": jnp.ones(3)})],
      sigma_rel=0.07,
    )
  with pytest.raises(ValueError, match="tuple"):
    jepa_ema.posthoc_reconstruct([{"w": jnp.ones(3)}], sigma_rel=0.07)


def test_reconstruct_keeps_shardings_on_eight_devices(on_eight_devices):
  result = on_eight_devices("sharded_posthoc.py")
  assert result["devices"] == 8
  assert result["keeps"] is True
  assert result["values_ok"] is True
  # The programs the call compiled include the accumulation (a check that
  # read no program would pass whatever the code does), and none of them
  # holds a collective instruction.
  assert any("_axpy" in p for p in result["programs"]), result["programs"]
  assert result["collectives"] == 0


# ------------------------------------------------------------------ on disk

SIGMAS = (0.05, 0.10)
POWER = tuple(jepa_ema.power_momentum(sigma_rel=s) for s in SIGMAS)


def _train(directory, steps=12, every=4, dtype=None, snaps=None):
  ema = jepa_ema.ema(
    tuple(jepa_ema.power_momentum(sigma_rel=s) for s in SIGMAS)
  )
  params = {"w": jnp.zeros((3, 2)), "count": jnp.int32(0)}
  state = ema.init(params)
  snaps = (
    snaps
    if snaps is not None
    else jepa_ema.PostHocSnapshots(directory, SIGMAS, every=every, dtype=dtype)
  )
  saved = []
  for t in range(steps):
    params = {"w": params["w"] + 1.0 + 0.1 * t, "count": params["count"] + 1}
    state = ema.update(params, state)
    saved.append(snaps.maybe_save(state, ema))
  return state, snaps, saved


def test_snapshots_round_trip(tmp_path):
  state, snaps, saved = _train(tmp_path / "s")
  assert saved == [t % 4 == 3 for t in range(12)]
  listed = [(s, r) for s, r, _ in snaps]
  assert listed == [
    (4, 0.05),
    (4, 0.1),
    (8, 0.05),
    (8, 0.1),
    (12, 0.05),
    (12, 0.1),
  ]
  # The last snapshots are the tracked targets, bitwise.
  last = [load() for s, _, load in snaps if s == 12]
  for i in range(2):
    np.testing.assert_array_equal(last[i]["w"], state[i].target["w"])
    assert int(last[i]["count"]) == 12
  # Reopened from the path alone (read side), reconstruction of a tracked
  # profile returns it.
  out = jepa_ema.posthoc_reconstruct(str(tmp_path / "s"), sigma_rel=0.10)
  np.testing.assert_allclose(out["w"], state[1].target["w"], rtol=1e-6)
  # Saving again at the same step writes nothing.
  assert not snaps.maybe_save(state, jepa_ema.ema(POWER))


def test_snapshots_storage_dtype(tmp_path):
  state, snaps, _ = _train(tmp_path / "h", dtype=jnp.float16)
  tree = next(iter(snaps))[2]()
  assert tree["w"].dtype == np.float16 and tree["count"].dtype == np.int32
  out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.05)
  assert out["w"].dtype == jnp.float16
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float32), state[0].target["w"], rtol=2e-3
  )
  # The directory remembers its dtype: reopened bare, with the same dtype,
  # or with another (refused, naming both).
  assert jepa_ema.PostHocSnapshots(tmp_path / "h").dtype == jnp.float16
  same = jepa_ema.PostHocSnapshots(tmp_path / "h", SIGMAS, dtype=jnp.float16)
  assert same.dtype == jnp.float16
  with pytest.raises(
    jepa_ema.SnapshotError, match="dtype='float16', not 'bfloat16'"
  ):
    jepa_ema.PostHocSnapshots(tmp_path / "h", dtype=jnp.bfloat16)


def test_killed_writer_is_reported_then_rewritten(tmp_path):
  state, snaps, _ = _train(tmp_path / "k", steps=8)
  # What a writer killed mid-save leaves: a folder without its metadata.
  partial = tmp_path / "k" / "0000000012-00"
  (partial / "target").mkdir(parents=True)
  (partial / "target" / "half-written").write_bytes(b"\0" * 10)
  with pytest.raises(jepa_ema.SnapshotError, match="incomplete snapshot"):
    list(snaps)
  with pytest.raises(jepa_ema.SnapshotError, match="0000000012-00"):
    jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07)
  # Resuming training rewrites it.
  _train(tmp_path / "k", steps=12, snaps=snaps)
  assert [s for s, _, _ in snaps] == [4, 4, 8, 8, 12, 12]


def test_writer_killed_mid_save_never_loses_a_snapshot_silently(tmp_path):
  """A real writer, SIGKILLed at a known point of a save (a hook of the test
  script: between the array data and the metadata of step 4's second width;
  no timed wait): that snapshot, and only it, is reported incomplete by
  name; the others load and reconstruct; a resumed writer rewrites it."""
  import re
  import shutil
  import signal

  script = pathlib.Path(__file__).parent / "scripts" / "posthoc_writer.py"
  directory = tmp_path / "snaps"

  def size(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())

  def writer(*args):  # the timeout is a safety net, not a deadline
    return subprocess.run(
      [sys.executable, str(script), str(directory), *args],
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )

  killed = writer("6", "4-1")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  partial = directory / "0000000004-01"
  assert killed.stdout.split("\n")[-2:] == [
    f"killed before {partial / 'meta.json'}",
    "",
  ]
  # Its array data are written (as large as its complete twin's), its
  # metadata are not.
  assert not (partial / "meta.json").exists()
  assert size(partial) > 0.9 * size(directory / "0000000004-00")
  snaps = jepa_ema.PostHocSnapshots(directory)
  incomplete = re.escape(str(partial)) + " is an incomplete snapshot"
  with pytest.raises(jepa_ema.SnapshotError, match=incomplete):
    list(snaps)
  with pytest.raises(jepa_ema.SnapshotError, match=incomplete):
    jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07)
  # Without it, nothing else is reported and everything left loads.
  shutil.move(partial, tmp_path / "aside")
  entries = list(snaps)
  assert [(s, sigma) for s, sigma, _ in entries] == [
    (s, sigma) for s in (1, 2, 3) for sigma in (0.05, 0.10)
  ] + [(4, 0.05)]
  for _, _, load in entries:
    tree = load()
    assert set(tree) == {f"w{i}" for i in range(16)}
  out = jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07)
  assert out["w0"].shape == (256, 256)
  # Put back and resumed, the writer rewrites it (and saves only what is
  # missing).
  shutil.move(tmp_path / "aside", partial)
  resumed = writer("6")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert resumed.stdout.split() == [
    w for s in range(1, 7) for w in ("step", str(s), "wrote", str(s >= 4))
  ]
  entries = list(snaps)
  assert [s for s, _, _ in entries] == [s for s in range(1, 7) for _ in "ab"]
  assert set(entries[7][2]()) == {f"w{i}" for i in range(16)}  # 4, 0.10


def test_damaged_and_mixed_up_directories(tmp_path):
  _, snaps, _ = _train(tmp_path / "d", steps=8)
  with pytest.raises(jepa_ema.SnapshotError, match="sigma_rels"):
    jepa_ema.PostHocSnapshots(tmp_path / "d", (0.05, 0.2), every=4)
  with pytest.raises(jepa_ema.SnapshotError, match="every"):
    jepa_ema.PostHocSnapshots(tmp_path / "d", SIGMAS, every=5)
  with pytest.raises(jepa_ema.SnapshotError, match="no snapshots"):
    jepa_ema.PostHocSnapshots(tmp_path / "empty")
  (tmp_path / "d" / "notes.txt").write_text("hi")
  with pytest.raises(jepa_ema.SnapshotError, match="does not belong"):
    len(snaps)
  os.remove(tmp_path / "d" / "notes.txt")
  # A stray folder, and a file named like a snapshot: neither belongs (not
  # "an incomplete snapshot", which would invite deleting real data).
  (tmp_path / "d" / "plots").mkdir()
  with pytest.raises(jepa_ema.SnapshotError, match="does not belong"):
    len(snaps)
  (tmp_path / "d" / "plots").rmdir()
  (tmp_path / "d" / "0000000012-00").write_text("not a folder")
  with pytest.raises(jepa_ema.SnapshotError, match="does not belong"):
    len(snaps)
  os.remove(tmp_path / "d" / "0000000012-00")
  meta = tmp_path / "d" / "0000000004-01" / "meta.json"
  meta.write_text(json.dumps({"step": 4, "sigma_rel": 0.05, "index": 1}))
  with pytest.raises(jepa_ema.SnapshotError, match="mixed up"):
    list(snaps)
  meta.write_text("{broken")
  with pytest.raises(jepa_ema.SnapshotError, match="damaged"):
    list(snaps)
  meta.write_text(json.dumps({"step": 4, "sigma_rel": 0.1, "index": 1}))
  for f in (tmp_path / "d" / "0000000008-00" / "target").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0garbage")
  with pytest.raises(jepa_ema.SnapshotError, match="cannot restore"):
    jepa_ema.posthoc_reconstruct(snaps, sigma_rel=0.07)


def test_a_new_snapshot_directory_is_made_with_its_parents(tmp_path):
  where = tmp_path / "runs" / "vit" / "snapshots"
  snaps = jepa_ema.PostHocSnapshots(where, SIGMAS, every=4)
  assert (where / "posthoc.json").is_file()
  assert jepa_ema.PostHocSnapshots(where).sigma_rels == snaps.sigma_rels


def test_snapshot_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="sigma_rel"):
    jepa_ema.PostHocSnapshots(tmp_path / "a", (0.05, 0.5), every=4)
  with pytest.raises(ValueError, match="every"):
    jepa_ema.PostHocSnapshots(tmp_path / "b", SIGMAS, every=0)
  snaps = jepa_ema.PostHocSnapshots(tmp_path / "c", SIGMAS, every=1)
  one = snaps.ema().init({"w": jnp.zeros(2)})[0]
  with pytest.raises(ValueError, match="2 EmaState"):
    snaps.maybe_save(one)


def test_core_import_does_not_need_orbax():
  code = (
    "import sys; sys.modules['orbax'] = None; "
    "sys.modules['orbax.checkpoint'] = None; import jepa_ema; "
    "print(jepa_ema.posthoc_coefficients([5], [0.1], sigma_rel=0.1))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[1.]" in proc.stdout


# ------------------------------------------- one source of truth (round 4)


@pytest.mark.parametrize(
  "momenta,every,match",
  [
    ((0.99, 0.999), 1, "momentum 0 is not that of power_momentum"),
    ((0.10, 0.05), 1, "momentum 0 is not that of power_momentum"),  # swapped
    ((0.05, 0.07), 1, "momentum 1 is not that of power_momentum"),
    ((0.05, 0.10), 3, None),  # every=3: the window's product, accepted
    ((0.05, 0.10, 0.2), 1, None),  # more momenta after the widths
    ((0.05,), 1, "1 momenta"),
  ],
)
def test_maybe_save_refuses_the_states_of_another_ema(
  tmp_path, momenta, every, match
):
  snaps = jepa_ema.PostHocSnapshots(tmp_path / "s", SIGMAS, every=6)
  schedules = tuple(  # above 0.5: a constant momentum; else a width
    m if m > 0.5 else jepa_ema.power_momentum(sigma_rel=m) for m in momenta
  )
  ema = jepa_ema.ema(schedules, every=every)
  params = {"w": jnp.zeros(2)}
  state = ema.init(params)
  for _ in range(6):
    state = ema.update({"w": state[0].target["w"] + 1.0}, state)
  if match is None:
    assert snaps.maybe_save(state[: len(SIGMAS)], ema)
    assert len(snaps) == 2
    return
  with pytest.raises(ValueError, match=match):
    snaps.maybe_save(state[: len(SIGMAS)], ema)
  assert not (tmp_path / "s" / "0000000006-00").exists()  # nothing saved


def test_maybe_save_refuses_a_momentum_off_late_in_the_window(tmp_path):
  # The check's tolerance shrinks with 1 - m (1e-6 + 1e-4 (1 - m)): a
  # momentum 2e-4 too high from update 100 on (where 1 - m is about 0.18)
  # is refused; a tolerance growing with 1 / (1 - m) would let it pass.
  snaps = jepa_ema.PostHocSnapshots(tmp_path / "s", SIGMAS, every=200)
  width0, width1 = (jepa_ema.power_momentum(sigma_rel=s) for s in SIGMAS)

  def off(t):
    return jnp.where(t >= 100, width0(t) + 2e-4, width0(t))

  ema = jepa_ema.ema((off, width1))
  params = {"w": jnp.zeros(2)}
  state = jax.jit(
    lambda s: jax.lax.fori_loop(0, 200, lambda i, s: ema.update(params, s), s)
  )(ema.init(params))
  with pytest.raises(ValueError, match="momentum 0 is not that of"):
    snaps.maybe_save(state, ema)


def test_snapshots_build_the_matching_ema(tmp_path):
  snaps = jepa_ema.PostHocSnapshots(tmp_path / "s", SIGMAS, every=2)
  with pytest.raises(TypeError, match="snaps.ema"):
    snaps.maybe_save(jepa_ema.ema(POWER).init({"w": jnp.zeros(2)}))
  ema = snaps.ema(dtype=jnp.float32, every=2)
  assert [float(m) for m in ema.momentum(3)] == pytest.approx(
    [float(jepa_ema.ema(POWER, every=2).momentum(3)[i]) for i in range(2)]
  )
  state = ema.init({"w": jnp.zeros(2)})
  for _ in range(4):
    state = ema.update({"w": jnp.ones(2)}, state)
    snaps.maybe_save(state)  # the EMA it built: no argument
  assert [s for s, _, _ in snaps] == [2, 2, 4, 4]
  with pytest.raises(TypeError, match="sigma_rels"):
    snaps.ema(momentum=0.9)
  # A track_ema of the widths passes the check too.
  tx = jepa_ema.track_ema(POWER)
  snaps2 = jepa_ema.PostHocSnapshots(tmp_path / "t", SIGMAS, every=2)
  assert not snaps2.maybe_save(tx.init({"w": jnp.zeros(2)}), tx)

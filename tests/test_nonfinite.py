"""`skip_nonfinite`, `zero_nonfinite` and `check` (issue 3), single device.

Every expected value comes from NumPy or closed-form reasoning written here:
which steps are skipped, the per-layer NaN/Inf counts, the counters, and the
inner optimizer's state (compared bit for bit with the state before a skipped
step, and with `optax` run on the accepted steps only). Multi-device cases are
in `test_multidevice_skip.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import pickle
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _nonfinite
from optax_guard import _skip

F32_MAX = float(np.finfo(np.float32).max)

# Layer names in `jax.tree.leaves` order (dict keys sorted), written by hand.
LAYERS = ("dense/bias", "dense/kernel", "head")


# ---------------------------------------------------------------- helpers


def _tree(bias, kernel, head):
  return {"dense": {"bias": bias, "kernel": kernel}, "head": head}


def _leaf(tree, name):
  node = tree
  for part in name.split("/"):
    node = node[part]
  return node


def _params():
  return _tree(np.zeros((4,), np.float32),
               np.full((3, 4), 0.5, np.float32),
               np.ones((2,), np.float32))


def _grads(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return _tree((scale * rng.normal(size=(4,))).astype(np.float32),
               (scale * rng.normal(size=(3, 4))).astype(np.float32),
               (scale * rng.normal(size=(2,))).astype(np.float32))


def _np_counts(grads):
  """Non-finite elements per layer, from NumPy."""
  return {name: int(np.sum(~np.isfinite(np.asarray(_leaf(grads, name)))))
          for name in LAYERS}


def _assert_bit_identical(a, b, what=""):
  """Same tree structure, and every leaf equal byte for byte."""
  la, ta = jax.tree.flatten(jax.device_get(a))
  lb, tb = jax.tree.flatten(jax.device_get(b))
  assert ta == tb, f"{what}: tree structures differ: {ta} vs {tb}"
  for i, (x, y) in enumerate(zip(la, lb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
    assert x.tobytes() == y.tobytes(), (
        f"{what}: leaf {i} differs bit-wise: {x!r} vs {y!r}")


def _assert_exact_zero(updates, like):
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(like)):
    u = np.asarray(u)
    assert u.shape == np.shape(g)
    assert np.all(u == 0) and np.all(np.isfinite(u)), u


def _runner(tx):
  """One jitted update for `tx` (retraces only when the extra args change)."""

  @jax.jit
  def step(grads, state, params, extra):
    return tx.update(grads, state, params, **extra)

  return step


@functools.lru_cache(maxsize=None)
def _cached(name):
  """A transformation and its jitted update, shared between tests (tracing
  and compiling are most of the cost of these small tests)."""
  make = {
      "adam": lambda: og.skip_nonfinite(optax.adam(0.1)),
      "sgd": lambda: og.skip_nonfinite(optax.sgd(0.1)),
  }[name]
  tx = make()
  return tx, _runner(tx)


def _layers_clause(counts):
  """The `; first bad layers: ...` part of og.check's sentence, written out
  for at most three bad layers, in `LAYERS` order (the name order)."""
  bad = [f"{name} ({n} NaN/Inf)" for name, n in counts.items() if n > 0]
  assert len(bad) <= 3
  return f"; first bad layers: {', '.join(bad)}" if bad else ""


def _reciprocal():
  """A custom inner transformation that divides by the gradient: an element
  equal to 0 gives an Inf update from perfectly finite gradients."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (
          jax.tree.map(lambda g: 1.0 / g, updates), state))


# ------------------------------------------------- one bad step, every kind


def _bad_case(kind):
  """(grads, extra args) for one bad step; counts come from NumPy later."""
  g = _grads(11)
  nan, inf = np.float32(np.nan), np.float32(np.inf)
  extra = {}
  if kind == "nan_one_leaf":
    g["dense"]["kernel"][1, 2] = nan
  elif kind == "inf_one_leaf":
    g["head"][0] = inf
  elif kind == "neg_inf_one_leaf":
    g["dense"]["bias"][3] = -inf
  elif kind == "nan_every_leaf":
    g["dense"]["kernel"][0, 0] = nan
    g["dense"]["kernel"][2, 3] = nan
    g["dense"]["bias"][1] = nan
    g["head"][:] = nan
  elif kind == "mixed_every_leaf":
    g["dense"]["kernel"][0, 1] = inf
    g["dense"]["bias"][0] = -inf
    g["head"][1] = nan
  elif kind == "all_nan":
    g = jax.tree.map(lambda x: np.full_like(x, np.nan), g)
  elif kind == "nan_loss":
    extra = {"loss": jnp.float32(np.nan)}
  elif kind == "inf_loss":
    extra = {"loss": jnp.float32(np.inf)}
  elif kind == "neg_inf_loss":
    extra = {"loss": jnp.float32(-np.inf)}
  elif kind == "nan_value":  # optax's line-search name for the loss
    extra = {"value": jnp.float32(np.nan)}
  else:
    raise AssertionError(kind)
  return g, extra


BAD_KINDS = ["nan_one_leaf", "inf_one_leaf", "neg_inf_one_leaf",
             "nan_every_leaf", "mixed_every_leaf", "all_nan", "nan_loss",
             "inf_loss", "neg_inf_loss", "nan_value"]


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_step_is_skipped_exactly(kind):
  """good, BAD, good: the bad step gives exact zeros, adam's mu/nu/count do
  not move by a single bit, the guard's counters advance, and the next good
  step continues exactly as adam would have without the bad step."""
  params = _params()
  tx, step = _cached("adam")
  g0, g2 = _grads(1), _grads(2)
  bad, bad_extra = _bad_case(kind)
  finite_loss = ({} if not bad_extra else
                 {k: jnp.ones(np.shape(v), jnp.float32)
                  for k, v in bad_extra.items()})

  s0 = tx.init(params)
  u0, s1 = step(g0, s0, params, finite_loss)
  u1, s2 = step(bad, s1, params, bad_extra)
  u2, s3 = step(g2, s2, params, finite_loss)

  # The bad step: exact zeros, inner state untouched bit for bit.
  _assert_exact_zero(u1, params)
  _assert_bit_identical(s2.inner_state, s1.inner_state, "adam state")
  assert bool(s2.skipped) and not bool(s1.skipped) and not bool(s3.skipped)
  assert int(s2.num_skipped) == 1 and int(s3.num_skipped) == 1
  assert int(s2.consecutive) == 1 and int(s3.consecutive) == 0
  assert int(s3.step) == 3
  assert int(s3.first_bad_step) == 1 and int(s3.last_bad_step) == 1
  assert not bool(s3.halted)

  # Per-layer non-finite counts of the last bad step, from NumPy; still there
  # after the following good step.
  want = _np_counts(bad)
  for state in (s2, s3):
    m = og.metrics(state)
    for name in LAYERS:
      assert int(m[f"optim/last_bad_nonfinite/{name}"]) == want[name], name

  # The good steps are exactly adam's, as if the bad step never happened.
  ref = optax.adam(0.1)
  r_state = ref.init(params)
  r0, r_state = ref.update(g0, r_state, params)
  r2, r_state = ref.update(g2, r_state, params)
  for got, want_u in ((u0, r0), (u2, r2)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 got, want_u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               s3.inner_state, r_state)
  assert int(s3.inner_state[0].count) == 2


def _overflow_grads(seed):
  """Finite gradients in the `_params` tree whose global norm overflows
  float32: `head` is [3e38, 3e38] (float64 norm 4.2e38)."""
  g = _grads(seed)
  g["head"][:] = np.float32(3e38)
  return g


def test_reason_codes_are_the_documented_ones():
  """docs/guide.rst: 0 none, 1 non-finite gradients, 2 non-finite output of
  the inner optimizer, 3 non-finite loss, 4 finite gradients whose global
  norm overflows float32."""
  assert (_nonfinite.REASON_NONE, _nonfinite.REASON_GRADS,
          _nonfinite.REASON_INNER, _nonfinite.REASON_LOSS,
          _nonfinite.REASON_OVERFLOW) == (0, 1, 2, 3, 4)


@pytest.mark.standard_promotion
def test_first_and_last_bad_step_and_reason_track_the_history():
  params = _params()
  tx, step = _cached("adam")
  state = tx.init(params)
  one = {"loss": jnp.float32(1.0)}
  nan_grads, _ = _bad_case("nan_one_leaf")
  inf_grads, _ = _bad_case("inf_one_leaf")
  overflow = _overflow_grads(5)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(overflow))
  assert math.sqrt(sum(float(np.sum(np.square(x.astype(np.float64))))
                       for x in jax.tree.leaves(overflow))) > F32_MAX
  plan = [(_grads(0), one), (nan_grads, one), (_grads(1), one),
          (_grads(2), {"loss": jnp.float32(np.nan)}), (_grads(3), one),
          (inf_grads, one), (_grads(4), one), (overflow, one),
          (_grads(6), one)]
  reasons, metric_reasons = [], []
  for g, extra in plan:
    _, state = step(g, state, params, extra)
    reasons.append(int(state.last_bad_reason))
    metric_reasons.append(int(og.metrics(state)["optim/last_bad_reason"]))
  assert int(state.first_bad_step) == 1
  assert int(state.last_bad_step) == 7
  assert int(state.num_skipped) == 4
  assert int(state.step) == 9
  # Reason codes: none before the first bad step; gradients at 1 and 5, the
  # loss at 3, the overflowing norm at 7; unchanged by good steps.
  none, grads = _nonfinite.REASON_NONE, _nonfinite.REASON_GRADS
  loss, overflow_ = _nonfinite.REASON_LOSS, _nonfinite.REASON_OVERFLOW
  want = [none, grads, grads, loss, loss, grads, grads, overflow_, overflow_]
  assert reasons == want
  assert metric_reasons == want
  # adam moved on the five good steps only.
  assert int(state.inner_state[0].count) == 5


@pytest.mark.standard_promotion
def test_loss_priority_nan_grads_and_nan_loss_counts_layers():
  params = _params()
  tx, step = _cached("adam")
  state = tx.init(params)
  bad, _ = _bad_case("nan_every_leaf")
  u, state = step(bad, state, params, {"loss": jnp.float32(np.nan)})
  _assert_exact_zero(u, params)
  counts = _np_counts(bad)
  assert counts == {"dense/bias": 1, "dense/kernel": 2, "head": 2}
  m = og.metrics(state)
  assert int(m["optim/last_bad_reason"]) == _nonfinite.REASON_GRADS
  for name in LAYERS:
    assert int(m[f"optim/last_bad_nonfinite/{name}"]) == counts[name], name
  # The gradients are named (with their layers), not the loss.
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value) == (
      "Step 0: non-finite gradients; first bad layers: dense/bias (1 NaN/Inf)"
      ", dense/kernel (2 NaN/Inf), head (2 NaN/Inf). The guard skipped the "
      "step (1 bad in a row, 1 skipped in total).")


@pytest.mark.standard_promotion
def test_overflowing_norm_and_nan_loss_name_the_gradients():
  """As NaN gradients do (above), an overflowing gradient norm is named
  before a NaN loss of the same step: the gradients are the cause to fix."""
  params = _params()
  tx, step = _cached("adam")
  _, state = step(_overflow_grads(9), tx.init(params), params,
                  {"loss": jnp.float32(np.nan)})
  assert int(og.metrics(state)["optim/last_bad_reason"]) == (
      _nonfinite.REASON_OVERFLOW)
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value) == (
      "Step 0: finite gradients whose global norm overflows float32. The "
      "guard skipped the step (1 bad in a row, 1 skipped in total).")


# ------------------------------------------- the inner optimizer goes bad


@pytest.fixture(params=["cpu", "cpu_recount", "fused"])
def backend_path(request, monkeypatch):
  """Runs a test on the CPU's path, or on the one GPU/TPU take ("fused").

  Both are chosen by `lax.platform_dependent` when the step is compiled;
  "fused" makes it pick the default branch here, as it does off the CPU.
  "cpu_recount" takes the CPU's way for large updates: a bad update is
  counted by running the optimizer again (`_skip.RECOUNT_ABOVE`).
  """
  if request.param == "fused":
    monkeypatch.setattr(
        jax.lax, "platform_dependent",
        lambda *args, default, **branches: default(*args))
  if request.param == "cpu_recount":
    monkeypatch.setattr(_skip, "RECOUNT_ABOVE", -1)
  return request.param


@pytest.mark.standard_promotion
def test_inner_turning_finite_grads_non_finite_is_skipped(backend_path):
  """Finite gradients with zeros, an inner chain that divides by them and then
  runs adam: the update is non-finite, so the step is skipped and adam's
  moments (which would have become Inf/NaN) stay exactly as they were."""
  params = _params()
  inner = optax.chain(_reciprocal(), optax.adam(0.1))
  tx = og.skip_nonfinite(inner)
  step = _runner(tx)
  g0 = _grads(3)
  g1 = _grads(4)
  g1["dense"]["kernel"][2, 1] = 0.0
  g1["head"][:] = 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g1))
  # What the inner chain would output: 1/0 = Inf where g == 0, after adam
  # Inf/Inf = NaN there; elsewhere finite. So the bad counts are the zeros.
  want = {name: int(np.sum(np.asarray(_leaf(g1, name)) == 0))
          for name in LAYERS}
  assert want == {"dense/bias": 0, "dense/kernel": 1, "head": 2}

  s0 = tx.init(params)
  _, s1 = step(g0, s0, params, {})
  u, s2 = step(g1, s1, params, {})
  _assert_exact_zero(u, params)
  _assert_bit_identical(s2.inner_state, s1.inner_state, "inner state")
  assert bool(s2.skipped) and int(s2.num_skipped) == 1
  assert int(s2.last_bad_step) == 1
  m = og.metrics(s2)
  for name in LAYERS:
    assert int(m[f"optim/last_bad_nonfinite/{name}"]) == want[name], name
  # Without the guard the inner state really is poisoned by this step.
  _, poisoned = inner.update(jax.tree.map(jnp.asarray, g1), s1.inner_state,
                             params)
  assert not np.all(np.isfinite(np.asarray(poisoned[1][0].mu["head"])))
  assert int(m["optim/last_bad_reason"]) == _nonfinite.REASON_INNER
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(s2)
  assert str(info.value) == (
      "Step 1: non-finite output of the inner optimizer; first bad layers: "
      "dense/kernel (1 NaN/Inf), head (2 NaN/Inf). The guard skipped the "
      "step (1 bad in a row, 1 skipped in total).")
  assert info.value.step == 1
  assert info.value.layers == {"dense/kernel": 1, "head": 2}


@pytest.mark.standard_promotion
def test_huge_finite_inner_update_is_not_mistaken_for_overflow(backend_path):
  """An inner update of finite elements near float32's maximum (its sum of
  squares overflows) is applied as it is: only NaN/Inf make it bad."""
  params = _params()
  tx = og.skip_nonfinite(optax.scale(3e37))
  step = _runner(tx)
  g = _grads(5)
  want = jax.tree.map(lambda x: np.float32(3e37) * x, g)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(want))
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.sum(np.square(np.concatenate(
        [x.ravel() for x in jax.tree.leaves(want)]), dtype=np.float32)))
  u, s = step(g, tx.init(params), params, {})
  assert not bool(s.skipped) and int(s.num_skipped) == 0
  for got, expected in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), expected)


# ------------------------------------------ overflow of the global norm


def _overflow_cases():
  """Finite float32 gradients whose true global L2 norm exceeds float32 max.

  Five leaves of 64 elements (one tree structure, so one compilation);
  `elements` of magnitude `v` have the norm `v * sqrt(elements)`, leaves
  combine as the root of the sum of squares (float64 in the test).
  """
  def tree(**filled):
    out = {f"l{i}": np.zeros((64,), np.float32) for i in range(5)}
    for name, (value, count) in filled.items():
      out[name][:count] = value
    return out

  return {
      # the example: 3e38 in many elements (norm 3e38 * 8 = 2.4e39).
      "3e38_x64_one_leaf": tree(l0=(3e38, 64)),
      # elements well below float32 max, norm 5e37 * 8 = 4e38.
      "5e37_x64_one_leaf": tree(l2=(5e37, 64)),
      # every leaf's own norm finite (1.6e38), together sqrt(5) * 1.6e38.
      "8e37_five_leaves": tree(**{f"l{i}": (8e37, 4) for i in range(5)}),
  }


@pytest.mark.standard_promotion
@pytest.mark.parametrize("case", sorted(_overflow_cases()))
def test_global_norm_overflow_from_finite_values_is_skipped(case):
  grads = _overflow_cases()[case]
  true_norm = math.sqrt(sum(float(np.sum(np.square(g.astype(np.float64))))
                            for g in grads.values()))
  assert true_norm > F32_MAX  # the norm overflows float32 ...
  assert all(np.all(np.isfinite(g)) for g in grads.values())  # ... elements don't
  params = {k: np.zeros_like(v) for k, v in grads.items()}
  tx, step = _cached("adam")
  s0 = tx.init(params)
  u, s1 = step(grads, s0, params, {})
  _assert_exact_zero(u, params)
  _assert_bit_identical(s1.inner_state, s0.inner_state, "adam state")
  assert bool(s1.skipped) and int(s1.num_skipped) == 1
  assert int(s1.first_bad_step) == 0
  # Why: reason 4 (docs/guide.rst), no layer holds a NaN/Inf, and og.check
  # says so in words.
  m = og.metrics(s1)
  assert int(m["optim/last_bad_reason"]) == _nonfinite.REASON_OVERFLOW == 4
  for name in grads:
    assert int(m[f"optim/last_bad_nonfinite/{name}"]) == 0, name
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(s1)
  assert str(info.value) == (
      "Step 0: finite gradients whose global norm overflows float32. The "
      "guard skipped the step (1 bad in a row, 1 skipped in total).")
  assert info.value.step == 0 and info.value.layers == {}


# --------------------------------------------------- halting and resuming


def _halt_run(resume, steps=None):
  """The pattern below, or its first `steps` steps."""
  params = _params()
  tx = og.skip_nonfinite(optax.adam(0.1), max_consecutive=3,
                         resume_after_halt=resume)
  step = _runner(tx)
  nan_grads, _ = _bad_case("nan_one_leaf")
  pattern = "BGBBBGGBBBG"[:steps]  # B: NaN gradients, G: finite gradients
  state = tx.init(params)
  rows = []
  for i, c in enumerate(pattern):
    g = nan_grads if c == "B" else _grads(100 + i)
    before = state.inner_state
    u, state = step(g, state, params, {})
    applied = not bool(state.skipped)
    if not applied:
      _assert_exact_zero(u, params)
      _assert_bit_identical(state.inner_state, before, f"step {i}")
    rows.append((applied, int(state.consecutive), bool(state.halted),
                 int(state.num_skipped), int(state.inner_state[0].count)))
  return rows, state


@pytest.mark.standard_promotion
def test_halts_after_max_consecutive_and_does_not_resume():
  rows, state = _halt_run(resume=False)
  # Worked out by hand from the rule, max_consecutive = 3, pattern
  #            B  G  B  B  B  G  G  B  B  B  G
  applied = [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  consec = [1, 0, 1, 2, 3, 0, 0, 1, 2, 3, 0]
  halted = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
  skipped = [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
  adam_count = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
  assert [r[0] for r in rows] == [bool(a) for a in applied]
  assert [r[1] for r in rows] == consec
  assert [r[2] for r in rows] == [bool(h) for h in halted]
  assert [r[3] for r in rows] == skipped
  assert [r[4] for r in rows] == adam_count
  m = og.metrics(state)
  assert bool(m["optim/halted"]) and int(m["optim/num_skipped"]) == 10
  # The message names the last step (a finite one, skipped because the
  # guard has halted), the counters after it, the last bad step (the last
  # B) and its NaN layer.
  pattern = "BGBBBGGBBBG"
  last_bad = pattern.rindex("B")
  nan_grads, _ = _bad_case("nan_one_leaf")
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value) == (
      f"Step {len(pattern) - 1}: skipped: the guard has halted "
      f"({skipped[-1]} skipped in total). The last bad step was step "
      f"{last_bad}: non-finite gradients"
      f"{_layers_clause(_np_counts(nan_grads))}. It applies no update until "
      "the optimizer state is re-initialised (`resume_after_halt=True` would "
      "have resumed at this finite step).")
  assert consec[-1] == 0  # the last step was finite: no run to report
  assert info.value.step == len(pattern) - 1
  # On the step that halted it, that step is named, with its run.
  rows, state = _halt_run(resume=False, steps=5)
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "Step 4: non-finite gradients")) as info:
    og.check(state)
  assert str(info.value).endswith(
      "The guard has halted (3 bad in a row, 4 skipped in total): it "
      "applies no update until the optimizer state is re-initialised, or, "
      "with `resume_after_halt=True`, until a finite step.")
  assert info.value.step == 4


@pytest.mark.standard_promotion
def test_resume_after_halt_resumes_on_a_finite_step():
  rows, state = _halt_run(resume=True)
  #            B  G  B  B  B  G  G  B  B  B  G
  applied = [0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1]
  consec = [1, 0, 1, 2, 3, 0, 0, 1, 2, 3, 0]
  halted = [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
  skipped = [1, 1, 2, 3, 4, 4, 4, 5, 6, 7, 7]
  adam_count = [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4]
  assert [r[0] for r in rows] == [bool(a) for a in applied]
  assert [r[1] for r in rows] == consec
  assert [r[2] for r in rows] == [bool(h) for h in halted]
  assert [r[3] for r in rows] == skipped
  assert [r[4] for r in rows] == adam_count
  og.check(state)  # the last step was fine: quiet


@pytest.mark.standard_promotion
def test_unlike_apply_if_finite_the_state_is_never_poisoned():
  """optax.apply_if_finite applies the NaN update once max_consecutive_errors
  is exceeded; adam's moments and then the parameters become NaN for good.
  skip_nonfinite halts instead and keeps everything finite."""
  params = {"w": np.ones((3,), np.float32)}
  nan = {"w": np.array([1.0, np.nan, 2.0], np.float32)}
  good = {"w": np.array([0.5, -0.5, 0.25], np.float32)}
  plan = [nan, nan, nan, good, good]
  theirs = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
  ours = og.skip_nonfinite(optax.adam(0.1), max_consecutive=2)
  results = {}
  for name, tx in (("theirs", theirs), ("ours", ours)):
    step = _runner(tx)
    p, s = params, tx.init(params)
    for g in plan:
      u, s = step(g, s, p, {})
      p = optax.apply_updates(p, u)
    results[name] = (p, s)

  p, s = results["theirs"]
  assert np.isnan(np.asarray(s.inner_state[0].mu["w"])).any()  # poisoned
  assert np.isnan(np.asarray(p["w"])).any()
  p, s = results["ours"]
  assert bool(s.halted)
  np.testing.assert_array_equal(np.asarray(p["w"]), params["w"])
  for leaf in jax.tree.leaves(s.inner_state):
    assert np.all(np.isfinite(np.asarray(leaf)))
  _assert_bit_identical(s.inner_state, optax.adam(0.1).init(params),
                        "adam state never moved")


# ------------------------------------------------------- zero_nonfinite


def _zero_tree():
  rng = np.random.default_rng(5)
  kernel = rng.normal(size=(3, 5)).astype(np.float32)
  kernel[0, 1], kernel[2, 2], kernel[2, 4] = np.nan, np.inf, -np.inf
  bias = rng.normal(size=(5,)).astype(np.float32)
  half = rng.normal(size=(6,)).astype(jnp.bfloat16)
  half[3] = np.nan
  half[5] = -np.inf
  clean = rng.normal(size=(2, 2)).astype(np.float32)
  return {"a": {"kernel": kernel, "bias": bias}, "half": half, "z": clean}


def test_zero_nonfinite_matches_numpy():
  grads = _zero_tree()
  tx = og.zero_nonfinite()
  step = _runner(tx)
  state = tx.init(grads)
  out, state = step(grads, state, None, {})
  for (path, g), o in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(out)):
    g, o = np.asarray(g), np.asarray(o)
    want = np.where(np.isfinite(g), g, np.zeros_like(g))
    assert o.dtype == g.dtype, path
    assert o.tobytes() == want.tobytes(), path  # finite values bit for bit
  m = og.metrics(state)
  want_counts = {"a/bias": 0, "a/kernel": 3, "half": 2, "z": 0}
  for name, n in want_counts.items():
    assert int(m[f"grad/nonfinite_zeroed/{name}"]) == n, name
  assert int(m["grad/nonfinite_zeroed"]) == 5
  assert int(m["optim/num_zeroed_steps"]) == 1

  # A clean step: counts back to zero, the step counter does not move.
  clean = jax.tree.map(lambda x: np.where(np.isfinite(x), x, 1).astype(
      x.dtype), grads)
  out, state = step(clean, state, None, {})
  for g, o in zip(jax.tree.leaves(clean), jax.tree.leaves(out)):
    assert np.asarray(o).tobytes() == np.asarray(g).tobytes()
  m = og.metrics(state)
  assert all(int(m[f"grad/nonfinite_zeroed/{n}"]) == 0 for n in want_counts)
  assert int(m["optim/num_zeroed_steps"]) == 1
  # and once more a bad one
  _, state = step(grads, state, None, {})
  assert int(og.metrics(state)["optim/num_zeroed_steps"]) == 2


def test_zero_nonfinite_replaces_inf_that_optax_zero_nans_keeps():
  g = {"w": np.array([1.0, np.nan, np.inf, -np.inf, -2.0], np.float32)}
  ours, _ = og.zero_nonfinite().update(g, og.zero_nonfinite().init(g))
  theirs, _ = optax.zero_nans().update(g, optax.zero_nans().init(g))
  np.testing.assert_array_equal(np.asarray(ours["w"]),
                                np.array([1.0, 0.0, 0.0, 0.0, -2.0]))
  assert np.isinf(np.asarray(theirs["w"])).sum() == 2  # for the record


def test_check_says_what_zero_nonfinite_did():
  """Ahead of it a monitor counts the NaN, behind it a skip sees zeros, and
  after a clip the clip saw the NaN: og.check reports the zeroing (which
  layers, and that the step went on), not 'nothing skips' or the clip."""
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  grads = {"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan, jnp.inf])}
  for tx in (optax.chain(og.monitor(), og.zero_nonfinite(), optax.sgd(0.1)),
             optax.chain(og.monitor(), og.zero_nonfinite(),
                         og.skip_nonfinite(optax.sgd(0.1))),
             optax.chain(og.clip_by_global_norm(1.0), og.zero_nonfinite(),
                         optax.sgd(0.1))):
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.all(np.isfinite(updates["b"]))
    with pytest.raises(og.NonFiniteGradientError, match=(
        r"^The last step's gradients held 2 NaN/Inf elements; first bad "
        r"layers: b \(2 NaN/Inf\): og.zero_nonfinite replaced them with zeros "
        r"and the step went on\.$")) as e:
      og.check(state)
    assert e.value.step == -1 and e.value.layers == {"b": 2}
    _, state = jax.jit(tx.update)(params, state, params)  # a clean step: quiet
    og.check(state)


# ----------------------------------------------------------- metric names


def test_metric_names_and_values():
  """The decision metrics of DESIGN §4, read through og.metrics."""
  params = _params()
  spikes = og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2)
  tx = og.skip_nonfinite(spikes)
  step = _runner(tx)
  state = tx.init(params)
  m = og.metrics(state)
  for name in ("optim/skipped", "optim/num_skipped", "optim/num_spikes",
               "optim/halted"):
    assert name in m, (name, sorted(m))
  for name in LAYERS:
    assert f"optim/last_bad_nonfinite/{name}" in m
  bad, _ = _bad_case("nan_one_leaf")
  _, state = step(bad, state, params, {})
  m = og.metrics(state)
  assert bool(m["optim/skipped"]) and int(m["optim/num_skipped"]) == 1
  assert not bool(m["optim/halted"])
  # The inner skip_spikes also saw the NaN (a spike for it), but its state is
  # inside skip_nonfinite's inner state and was restored bit for bit.
  assert int(m["optim/num_spikes"]) == 0
  assert int(m["optim/last_bad_nonfinite/dense/kernel"]) == 1
  for key, value in m.items():
    assert np.ndim(value) == 0, key


@functools.lru_cache(maxsize=None)
def _halting_sgd():
  tx = og.skip_nonfinite(optax.sgd(0.1), max_consecutive=3,
                         resume_after_halt=True)
  return tx, _runner(tx)


def _history_plan():
  """(kind, grads, loss) per step: NaN/Inf planted in different layers with
  different counts, a NaN loss alone after a NaN-gradient step, an
  overflowing norm, three bad steps in a row (a halt at max_consecutive=3),
  and good steps between them."""
  nan_two = _grads(21)
  nan_two["dense"]["kernel"][0, :2] = np.nan
  nan_two["head"][1] = np.inf
  nan_bias = _grads(22)
  nan_bias["dense"]["bias"][1:] = -np.inf
  return [("good", _grads(20), 1.0),
          ("grads", nan_two, 1.0),
          ("good", _grads(23), 1.0),
          ("loss", _grads(24), np.nan),
          ("grads", nan_bias, 1.0),
          ("overflow", _overflow_grads(25), 1.0),
          ("good", _grads(26), 1.0),
          ("loss", _grads(27), np.inf),
          ("good", _grads(28), 1.0)]


@pytest.mark.standard_promotion
def test_skip_nonfinite_metrics_follow_the_history():
  """Every decision metric read through og.metrics, after every step, against
  the rule worked out here from the planted history: a mapping of a name to
  the wrong counter, or per-layer counts kept from an older bad step, fail."""
  params = _params()
  tx, step = _halting_sgd()
  state = tx.init(params)
  reason_of = {"grads": _nonfinite.REASON_GRADS,
               "loss": _nonfinite.REASON_LOSS,
               "overflow": _nonfinite.REASON_OVERFLOW}
  names = ({"optim/skipped", "optim/num_skipped", "optim/consecutive_skipped",
            "optim/first_bad_step", "optim/last_bad_step",
            "optim/last_bad_reason", "optim/halted"} |
           {f"optim/last_bad_nonfinite/{n}" for n in LAYERS})
  assert set(og.metrics(state)) == names
  # The reference: the rule as documented (max_consecutive=3, resuming).
  first = last = -1
  run = num_skipped = 0
  halted = False
  reason = _nonfinite.REASON_NONE
  counts = dict.fromkeys(LAYERS, 0)
  seen = []
  for t, (kind, grads, loss) in enumerate(_history_plan()):
    _, state = step(grads, state, params, {"loss": jnp.float32(loss)})
    bad = kind != "good"
    run = run + 1 if bad else 0
    halted = (halted and bad) or run >= 3
    num_skipped += bad or halted
    if bad:
      first = t if first < 0 else first
      last, reason = t, reason_of[kind]
      counts = _np_counts(grads)  # NumPy: zeros on a loss/overflow step
    want = {"optim/skipped": bad or halted, "optim/num_skipped": num_skipped,
            "optim/consecutive_skipped": run, "optim/first_bad_step": first,
            "optim/last_bad_step": last, "optim/last_bad_reason": reason,
            "optim/halted": halted,
            **{f"optim/last_bad_nonfinite/{n}": c for n, c in counts.items()}}
    got = {k: v.item() for k, v in jax.device_get(og.metrics(state)).items()}
    assert got == want, (t, kind)
    seen.append(tuple(want.values()))
    if kind == "loss" and t == 3:
      # After the NaN-gradient step 1, the loss alone was bad: no layer.
      assert all(got[f"optim/last_bad_nonfinite/{n}"] == 0 for n in LAYERS)
    if bad and not halted:
      with pytest.raises(og.NonFiniteGradientError) as info:
        og.check(state)
      assert str(info.value) == (
          f"Step {t}: {_nonfinite.REASONS[reason]}{_layers_clause(counts)}. "
          f"The guard skipped the step ({run} bad in a row, {num_skipped} "
          "skipped in total)."), t
      assert info.value.layers == {k: v for k, v in counts.items() if v}
    elif not bad:
      og.check(state)
  # The plan exercises what it is meant to: distinct counts in several
  # layers, a halt that resumes, and every metric taking several values.
  assert _np_counts(_history_plan()[1][1]) == {
      "dense/bias": 0, "dense/kernel": 2, "head": 1}
  assert _np_counts(_history_plan()[4][1]) == {
      "dense/bias": 3, "dense/kernel": 0, "head": 0}
  assert [row[6] for row in seen] == [False] * 5 + [True] + [False] * 3
  for column in zip(*seen):
    assert len(set(column)) >= 2


@pytest.mark.standard_promotion
def test_check_after_a_nan_loss_names_no_layer_of_an_older_bad_step():
  """NaN gradients in two layers, a good step, then a NaN loss with finite
  gradients: the last bad step's per-layer counts are all zero, and the
  sentence names the loss and no layer."""
  params = _params()
  tx, step = _cached("sgd")
  state = tx.init(params)
  bad, _ = _bad_case("mixed_every_leaf")
  plan = [(bad, 1.0), (_grads(31), 1.0), (_grads(32), np.nan)]
  for g, loss in plan:
    _, state = step(g, state, params, {"loss": jnp.float32(loss)})
  m = og.metrics(state)
  for name in LAYERS:
    assert int(m[f"optim/last_bad_nonfinite/{name}"]) == 0, name
  assert int(m["optim/last_bad_reason"]) == _nonfinite.REASON_LOSS
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value) == (
      "Step 2: non-finite loss. The guard skipped the step (1 bad in a row, "
      "2 skipped in total).")
  assert info.value.layers == {}


# ------------------------------------------------------------------ check


def test_check_quiet_on_good_states():
  params = _params()
  tx, step = _cached("sgd")
  state = tx.init(params)
  og.check(state)
  og.check(jax.device_get(state))
  _, state = step(_grads(0), state, params, {})
  og.check(state)
  og.check(jax.device_get(state))


def test_check_warns_when_the_state_holds_nothing_to_check():
  params = _params()
  for state in (optax.adam(0.1).init(params),  # no optax_guard part
                {"mu": params, "count": np.int32(0)}):
    with pytest.warns(UserWarning, match=r"^og\.check found no optax_guard "
                      r"state in `opt_state`, so it checks nothing: put "
                      r"og\.guard"):
      og.check(state)
  # optax_guard parts that watch for nothing: a NaN step went through.
  tx = optax.chain(og.clip_by_value(1.0), og.add_decayed_weights(1e-2),
                   og.adam(0.1))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(lambda p: p * np.nan, params), state,
                       params)
  with pytest.warns(UserWarning, match=(
      r"^og\.check found no optax_guard state in `opt_state` that watches "
      r"for NaN/Inf or spikes \(only AddDecayedWeightsState, "
      r"ClipByValueState\), so it checks nothing: put og\.guard")):
    og.check(state)
  with warnings.catch_warnings():  # and none where one part watches
    warnings.simplefilter("error")
    og.check(optax.chain(og.monitor(), tx).init(params))
    og.check(optax.MultiSteps(
        tx, 2, should_skip_update_fn=og.skip_nonfinite_microbatch())
             .init(params))
  # Nor does an optax.MultiSteps without a `should_skip_update_fn`.
  with pytest.warns(UserWarning, match=r"that watches for NaN/Inf"):
    og.check(optax.MultiSteps(tx, 2).init(params))
  # A guard's state turned into plain mappings (a target-less restore).
  tx = og.guard(optax.sgd(0.1))
  state = tx.init(params)
  flat = {"inner_state": (), **{name: dict(part._asdict())
                                for name, part in state._asdict().items()
                                if name != "inner_state" and part is not None}}
  with pytest.warns(UserWarning, match=r"so it checks nothing: pass the "
                    r"state itself .*`jax\.eval_shape\(tx\.init, params\)`"):
    og.check(flat)


def test_check_message_names_step_layers_counts_and_action():
  params = {f"layer{i}": np.ones((3,), np.float32) for i in range(5)}
  tx = og.skip_nonfinite(optax.sgd(0.1))
  step = _runner(tx)
  state = tx.init(params)
  _, state = step({k: v * 2 for k, v in params.items()}, state, params, {})
  bad = {f"layer{i}": np.ones((3,), np.float32) for i in range(5)}
  bad["layer1"][:2] = np.nan       # 2 bad
  bad["layer2"][0] = np.inf        # 1 bad
  bad["layer3"][:] = -np.inf       # 3 bad
  bad["layer4"][1] = np.nan        # 1 bad
  _, state = step(bad, state, params, {})
  for s in (state, jax.device_get(state)):
    with pytest.raises(og.NonFiniteGradientError) as info:
      og.check(s)
    err = info.value
    message = str(err)
    assert isinstance(err, og.GuardError) and isinstance(err, RuntimeError)
    assert message.startswith("Step 1:"), message
    assert "non-finite gradients" in message
    # The first three bad layers in order, with their counts.
    assert "layer1 (2 NaN/Inf)" in message
    assert "layer2 (1 NaN/Inf)" in message
    assert "layer3 (3 NaN/Inf)" in message
    assert "layer0" not in message
    assert "and 1 more, the last being layer4 (1 NaN/Inf)." in message
    assert "skipped the step" in message
    assert "1 skipped in total" in message and "1 bad in a row" in message
    assert message == (
        "Step 1: non-finite gradients; first bad layers: layer1 (2 NaN/Inf), "
        "layer2 (1 NaN/Inf), layer3 (3 NaN/Inf) and 1 more, the last being "
        "layer4 (1 NaN/Inf). The guard skipped the step (1 bad in a row, 1 "
        "skipped in total).")
    assert err.step == 1
    assert err.layers == {"layer1": 2, "layer2": 1, "layer3": 3, "layer4": 1}
    # Whole across processes (pickle) and copies, a note added too.
    err.add_note("epoch 7")
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
      assert type(again) is og.NonFiniteGradientError
      assert (str(again), again.step, again.layers, again.__notes__) == (
          message, err.step, err.layers, ["epoch 7"])
  # The next good step clears it.
  _, state = step({k: v * 3 for k, v in params.items()}, state, params, {})
  og.check(state)


def test_check_names_bad_layers_in_numeric_order():
  """Flax numbers its layers `Dense_0 ... Dense_11`; the tree sorts the
  names as strings (`Dense_10` before `Dense_2`), the message must not."""
  params = {f"Dense_{i}": {"kernel": np.ones((2,), np.float32)}
            for i in range(12)}
  tx = og.skip_nonfinite(optax.sgd(0.1))
  bad = jax.tree.map(np.copy, params)
  for i, n in ((11, 1), (10, 2), (3, 1), (2, 2)):
    bad[f"Dense_{i}"]["kernel"][:n] = np.nan
  _, state = _runner(tx)(bad, tx.init(params), params, {})
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value).startswith(
      "Step 0: non-finite gradients; first bad layers: "
      "Dense_2/kernel (2 NaN/Inf), Dense_3/kernel (1 NaN/Inf), "
      "Dense_10/kernel (2 NaN/Inf) and 1 more, the last being "
      "Dense_11/kernel (1 NaN/Inf)."), str(info.value)
  assert list(info.value.layers.items()) == [
      ("Dense_2/kernel", 2), ("Dense_3/kernel", 1), ("Dense_10/kernel", 2),
      ("Dense_11/kernel", 1)]


@dataclasses.dataclass
class _Block:  # an Equinox-style module: fields in the order they run
  attn: Any
  mlp: Any


@dataclasses.dataclass
class _Model:
  embed: Any
  blocks: list[_Block]
  unembed: Any


for _cls in (_Block, _Model):
  jax.tree_util.register_dataclass(
      _cls, data_fields=[f.name for f in dataclasses.fields(_cls)],
      meta_fields=[])


def test_check_names_bad_layers_of_a_module_tree_in_field_order():
  """A module's fields come in the order they were declared (the order they
  run), not sorted: a NaN made in `blocks[1].mlp`'s backward pass reaches
  every layer before it, and the message lists them in the tree's order,
  the one it started in last (not `blocks/...` before `embed`)."""
  ones = lambda *shape: np.ones(shape, np.float32)
  params = _Model(ones(4, 2), [_Block(ones(2, 2), ones(2, 2))
                               for _ in range(3)], ones(2, 4))
  grads = jax.tree.map(np.copy, params)
  for leaf in (grads.embed, grads.blocks[0].attn, grads.blocks[0].mlp,
               grads.blocks[1].attn, grads.blocks[1].mlp):
    leaf[0] = np.nan
  tx = og.guard(og.sgd(0.1))
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  bad = [og._metrics.path_name(path)  # pylint: disable=protected-access
         for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
         if np.isnan(leaf).any()]
  assert list(info.value.layers) == bad == [
      "embed", "blocks/0/attn", "blocks/0/mlp", "blocks/1/attn",
      "blocks/1/mlp"]
  assert "and 2 more, the last being blocks/1/mlp (2 NaN/Inf)" in str(
      info.value)


def test_check_looks_at_every_member_of_a_vmapped_ensemble():
  """Three models trained at once under `vmap`: member 1's NaN is reported
  and named (a pmap replica reads the same message with no prefix)."""
  params = {"w": np.ones((3, 2), np.float32)}  # 3 members of shape (2,)
  tx = og.guard(og.sgd(0.1))
  states = jax.vmap(tx.init)(params)
  grads = {"w": np.full((3, 2), 0.5, np.float32)}
  grads["w"][1, 0] = np.nan
  step = jax.jit(jax.vmap(tx.update))
  _, states = step(grads, states, params)
  skipped = og.metrics(states)["optim/skipped"]
  np.testing.assert_array_equal(skipped, [False, True, False])
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(states)
  assert str(info.value).startswith(
      "Member 1 of the state's leading axis (3 members, 1 of them bad): "
      "Step 0: non-finite gradients; first bad layers: w (1 NaN/Inf)."), (
          str(info.value))
  assert info.value.step == 0 and info.value.layers == {"w": 1}
  # Every member bad alike (as pmap replicas are): no member is named.
  grads["w"][:, 0] = np.nan
  _, states = step(grads, jax.vmap(tx.init)(params), params)
  with pytest.raises(og.NonFiniteGradientError, match=r"^Step 0: "):
    og.check(states)


@pytest.mark.standard_promotion  # traces optax.sgd
def test_metrics_and_check_of_an_ensemble_vmapped_inside_pmap():
  """Two leading axes (2 devices x 4 members): every per-layer metric keeps
  both, each member's norms are its own, and og.check names the one bad
  member by its place on both axes."""
  devices, members = 2, 4
  params = {"a": jnp.zeros((devices, members, 2)),
            "b": jnp.zeros((devices, members, 3))}
  # Layer i of member (d, k) has one element 100 d + 10 k + i + 1.
  value = (100.0 * np.arange(devices)[:, None] +
           10.0 * np.arange(members)[None, :])
  grads = {n: np.zeros(p.shape, np.float32) for n, p in params.items()}
  for i, n in enumerate(grads):
    grads[n][:, :, 0] = value + i + 1
  grads["b"][1, 3, 1] = np.nan
  tx = og.guard(optax.sgd(0.1), max_norm=1e6, spike_sigma=None)
  mapped = lambda f: jax.pmap(jax.vmap(f), devices=jax.devices()[:devices])
  states = mapped(tx.init)(params)
  _, states = mapped(tx.update)(grads, states, params)
  m = og.metrics(states)
  np.testing.assert_array_equal(m["grad/norm/a"], value + 1)
  np.testing.assert_array_equal(m["grad/norm/b"][0], value[0] + 2)
  want = np.zeros((devices, members), bool)
  want[1, 3] = True
  np.testing.assert_array_equal(m["optim/skipped"], want)
  np.testing.assert_array_equal(m["grad/nonfinite/b"], want.astype(int))
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(states)
  assert str(info.value).startswith(
      "Member (1, 3) of the state's 2 leading axes (8 members, 1 of them "
      "bad): Step 0: non-finite gradients; first bad layers: b (1 NaN/Inf)."
  ), str(info.value)


def test_check_inside_jit_is_a_sentence():
  """og.check reads on the host; inside the step it says what to do
  instead (a ConcretizationTypeError about `is_fully_addressable` before)."""
  tx = og.guard(og.sgd(0.1))
  params = {"w": jnp.ones(2)}

  @jax.jit
  def step(state):
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    og.check(state)
    return state

  with pytest.raises(ValueError, match=re.escape(
      "og.check reads the state on the host, after a step, but got traced "
      "(or abstract) values: call it on the state the jitted step returned, "
      "outside jit (inside the step, return og.metrics(opt_state) "
      "instead).")):
    step(tx.init(params))
  with pytest.raises(ValueError, match=re.escape("got traced (or abstract) "
                                                 "values")):
    og.check(jax.eval_shape(tx.init, params))


def test_resume_after_halt_needs_a_halt():
  with pytest.raises(ValueError, match=re.escape(
      "`resume_after_halt=True` sets how a halt ends, but "
      "`max_consecutive=None` never halts")):
    og.skip_nonfinite(optax.sgd(0.1), resume_after_halt=True)
  with pytest.raises(ValueError, match=re.escape(
      "`resume_after_halt` must be True or False, but got 'yes'.")):
    og.skip_nonfinite(optax.sgd(0.1), max_consecutive=2,
                      resume_after_halt="yes")


def test_check_names_the_loss():
  params = _params()
  tx, step = _cached("sgd")
  _, state = step(_grads(0), tx.init(params), params,
                         {"loss": jnp.float32(np.nan)})
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert info.value.step == 0
  assert str(info.value) == (
      "Step 0: non-finite loss. The guard skipped the step (1 bad in a row, "
      "1 skipped in total).")
  assert info.value.layers == {}


def test_check_on_monitor_alone():
  params = _params()
  tx = optax.chain(og.monitor(), optax.sgd(0.1))
  bad, _ = _bad_case("nan_every_leaf")
  _, state = _runner(tx)(bad, tx.init(params), params, {})
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(jax.device_get(state))
  want = _np_counts(bad)
  # The count, the layers, and what would help.
  assert str(info.value) == (
      f"Step 0: the gradients hold {sum(want.values())} NaN/Inf elements"
      f"{_layers_clause(want)}. Nothing in this chain skips such a step "
      "unless a `skip_nonfinite` or `guard` stands around the optimizer.")
  assert info.value.layers == {k: v for k, v in want.items() if v}


def test_check_without_per_layer_statistics():
  """`per_layer=False`: the message gives the total, and a skipper beside
  the monitor still reports its skip (nothing reads the absent counts)."""
  params = _params()
  bad, _ = _bad_case("nan_every_leaf")
  total = sum(_np_counts(bad).values())
  tx = optax.chain(og.monitor(per_layer=False), optax.sgd(0.1))
  _, state = _runner(tx)(bad, tx.init(params), params, {})
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value) == (
      f"Step 0: the gradients hold {total} NaN/Inf elements. Nothing in this "
      "chain skips such a step unless a `skip_nonfinite` or `guard` stands "
      "around the optimizer.")
  for tx in (og.guard(optax.sgd(0.1), per_layer=False),
             optax.chain(og.monitor(per_layer=False),
                         og.skip_nonfinite(optax.sgd(0.1)))):
    _, state = _runner(tx)(bad, tx.init(params), params, {})
    with pytest.raises(og.NonFiniteGradientError,
                       match=r"^Step 0: non-finite gradients; first bad "
                       r"layers: .*The guard skipped the step"):
      og.check(state)


# -------------------------------------------------------------- arguments


def _inner():
  return optax.sgd(0.1)


_MAX_CONSECUTIVE = "`max_consecutive` must be an integer >= 1 or None, "
_AXIS_NAME = ("`axis_name` must be None, a mesh axis name or a tuple of "
              "them, ")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_consecutive": 0}, _MAX_CONSECUTIVE + "but got 0."),
    ({"max_consecutive": -2}, _MAX_CONSECUTIVE + "but got -2."),
    ({"max_consecutive": 2.5}, _MAX_CONSECUTIVE + "but got 2.5."),
    ({"max_consecutive": True}, _MAX_CONSECUTIVE + "but got True."),
    ({"axis_name": 3}, _AXIS_NAME + "but got 3."),
    ({"axis_name": ("data", 2)}, _AXIS_NAME + "but got ('data', 2)."),
    ({"axis_name": ("data", "model", "data")},
     "`axis_name` names the mesh axis 'data' more than once "
     "(('data', 'model', 'data')); name each axis once."),
])
def test_skip_nonfinite_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    og.skip_nonfinite(_inner(), **kwargs)


@pytest.mark.parametrize("inner", [3, None, "adam", optax.adam],
                         ids=["int", "None", "str", "factory_not_called"])
@pytest.mark.parametrize("factory", [og.skip_nonfinite, og.skip_spikes])
def test_inner_not_a_transformation(factory, inner):
  with pytest.raises(ValueError) as info:
    factory(inner)
  message = str(info.value)
  assert message.startswith("`inner` must be an optax GradientTransformation")
  assert "`init`" in message and "`update`" in message
  assert f"but got {inner!r}" in message
  assert message.endswith(".")


# ------------------------------------------------------------------ Flax


# Flax is imported inside the tests, so that without it only they are skipped.


@pytest.mark.standard_promotion
def test_linen_train_state_skips_a_nan_step():
  pytest.importorskip("flax")
  from flax import linen as nn
  from flax.training import train_state

  class Mlp(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.tanh(nn.Dense(4)(x)))

  model = Mlp()
  x = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=og.skip_nonfinite(optax.adam(1e-2)))

  @jax.jit
  def step(state, xs):
    def loss_fn(p):
      return jnp.mean(jnp.square(state.apply_fn({"params": p}, xs) - 1.0))
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  s1 = step(state, x)
  bad_x = x.at[2, 1].set(jnp.nan)
  s2 = step(s1, bad_x)
  _assert_bit_identical(s2.params, s1.params, "params")
  _assert_bit_identical(s2.opt_state.inner_state, s1.opt_state.inner_state,
                        "adam state")
  assert int(s2.step) == 2  # TrainState counts calls
  m = og.metrics(s2.opt_state)
  assert bool(m["optim/skipped"]) and int(m["optim/num_skipped"]) == 1
  # The NaN input row reaches every weight through the sums over the batch
  # (x^T delta, h^T delta, sum delta), so every gradient element is NaN: the
  # per-layer counts are the layers' sizes.
  for layer in ("Dense_0", "Dense_1"):
    for leaf in ("kernel", "bias"):
      assert int(m[f"optim/last_bad_nonfinite/{layer}/{leaf}"]) == np.size(
          params[layer][leaf]), (layer, leaf)
  s3 = step(s2, x)
  assert not bool(s3.opt_state.skipped)
  assert int(s3.opt_state.inner_state[0].count) == 2
  assert not np.array_equal(np.asarray(s3.params["Dense_0"]["kernel"]),
                            np.asarray(s2.params["Dense_0"]["kernel"]))


@pytest.mark.standard_promotion
def test_nnx_optimizer_nan_loss_skips():
  pytest.importorskip("flax")
  from flax import nnx

  class Mlp(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 4, rngs=rngs)
      self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  model = Mlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, og.skip_nonfinite(optax.adam(1e-2)),
                            wrt=nnx.Param)
  x = jnp.ones((4, 3), jnp.float32)

  @nnx.jit
  def step(model, optimizer, poison):
    def loss_fn(m):
      return jnp.mean(jnp.square(m(x) - 1.0))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    # Finite gradients; the reported loss is NaN when `poison` is set.
    loss = jnp.where(poison, jnp.float32(np.nan), loss)
    optimizer.update(model, grads, loss=loss)

  def snapshot():
    return (jax.device_get(nnx.state(model, nnx.Param)),
            jax.device_get(nnx.as_pure(optimizer.opt_state)))

  step(model, optimizer, jnp.bool_(False))
  params1, opt1 = snapshot()
  step(model, optimizer, jnp.bool_(True))
  params2, opt2 = snapshot()
  _assert_bit_identical(params2, params1, "params")
  _assert_bit_identical(opt2.inner_state, opt1.inner_state, "adam state")
  m = og.metrics(optimizer.opt_state)
  assert bool(m["optim/skipped"]) and int(m["optim/num_skipped"]) == 1
  with pytest.raises(og.NonFiniteGradientError, match="non-finite loss"):
    og.check(optimizer.opt_state)
  step(model, optimizer, jnp.bool_(False))
  params3, _ = snapshot()
  assert not np.array_equal(
      np.asarray(jax.tree.leaves(params3)[0]),
      np.asarray(jax.tree.leaves(params2)[0]))
  og.check(optimizer.opt_state)


@pytest.mark.parametrize("key", ["x²", "²"])
def test_check_names_a_layer_whose_name_holds_a_superscript_digit(key):
  """`"²".isdigit()` holds but `int("²")` fails: og.check crashed."""
  params = {key: jnp.ones(2), "b": jnp.ones(2)}
  tx = og.skip_nonfinite(optax.sgd(0.1))
  grads = {key: jnp.array([jnp.nan, 1.0]), "b": jnp.ones(2)}
  _, state = tx.update(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError) as e:
    og.check(state)
  assert e.value.layers == {key: 1}

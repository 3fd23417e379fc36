"""`skip_spikes` (issue 3) against an independent NumPy re-implementation.

The rule, as the issue states it: a step is a spike when its global gradient
norm (and, when `loss=` is passed, its loss) exceeds `mean + sigma * std`
(population std, ddof=0) of the last `window` ACCEPTED values; only once
`warmup_steps` values were accepted (default `window // 2`); spikes do not
enter the history; a non-finite norm or loss is always a spike; with
`max_consecutive`, after that many spikes in a row the history is cleared and
the warm-up restarts. `_reference` below implements exactly that in float64;
the tests feed gradients whose norms follow a synthetic stream and compare
every decision, every threshold and the inner optimizer's state.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _spikes

T = 400
SHAPES = {"a": (3, 4), "b": (5,)}
B1, B2 = 0.9, 0.999  # optax.adam's defaults, used by the reference moments


# ------------------------------------------------------- the reference rule


def _reference(norms, losses=None, *, sigma, window, warmup=None,
               max_consecutive=None, ddof=0, spikes_enter_history=False):
  """Decisions and thresholds of the rule, step by step, in float64.

  Returns (skip[T] bool, norm_threshold[T], loss_threshold[T], runs[T]); a
  threshold is +inf while fewer than `warmup` values have been accepted;
  `runs` is the count of finite spikes in a row after each step.
  `ddof` and `spikes_enter_history` give deliberately WRONG variants, used
  to show that the streams tell the right rule from near misses.
  """
  warmup = max(2, window // 2) if warmup is None else warmup
  hist_n, hist_l = [], []
  consecutive = 0
  skip = np.zeros(len(norms), bool)
  runs = np.zeros(len(norms), np.int64)  # finite spikes in a row after t
  thr_n = np.full(len(norms), np.inf)
  thr_l = np.full(len(norms), np.inf)

  def threshold(hist):
    if len(hist) < warmup:
      return math.inf
    last = np.asarray(hist[-window:], np.float64)
    return float(last.mean() + sigma * last.std(ddof=ddof))

  for t, n in enumerate(norms):
    thr_n[t] = threshold(hist_n)
    spike = not np.isfinite(n) or n > thr_n[t]
    if losses is not None:
      thr_l[t] = threshold(hist_l)
      spike = spike or not np.isfinite(losses[t]) or losses[t] > thr_l[t]
    skip[t] = spike
    finite = np.isfinite(n) and (losses is None or np.isfinite(losses[t]))
    if not finite:
      pass  # a NaN/Inf step neither extends nor breaks a run of spikes
    elif spike:
      consecutive += 1
    elif n != 0:  # nor does a taken step without gradient
      consecutive = 0
    if not spike or (spikes_enter_history and np.isfinite(n) and (
        losses is None or np.isfinite(losses[t]))):
      if n != 0:  # a zero norm (no gradient) says nothing about the scale
        hist_n.append(n)
      if losses is not None:
        hist_l.append(losses[t])
    if max_consecutive is not None and finite and (
        consecutive >= max_consecutive):
      hist_n, hist_l = [], []  # the count stays until the next finite step
    runs[t] = consecutive
  return skip, thr_n, thr_l, runs


def _margins(values, thresholds):
  """Relative distance of each finite value to its finite threshold."""
  ok = np.isfinite(values) & np.isfinite(thresholds)
  return np.abs(values[ok] - thresholds[ok]) / np.abs(thresholds[ok])


# ------------------------------------------------------------- the streams


def _lognormal(rng, n, spread):
  return np.exp(rng.normal(0.0, spread, n))


def _norm_stream(seed):
  """400 norms around 1 with planted spikes (20x, some in a row, one during
  the warm-up), moderate 3x outliers, an Inf and a NaN."""
  rng = np.random.default_rng(seed)
  x = _lognormal(rng, T, 0.25)
  for t in (10, 100, 150, 151, 152, 230, 300, 301, 350):
    x[t] *= 20.0
  for t in (120, 260, 330):
    x[t] *= 3.0
  x[200] = np.inf
  x[270] = np.nan
  return x


def _loss_stream(seed):
  rng = np.random.default_rng(seed)
  x = 3.0 * _lognormal(rng, T, 0.1)
  for t in (90, 140, 141, 230, 310, 311, 312, 313):  # 230 spikes both
    x[t] *= 4.0
  x[250] = np.nan
  x[290] = np.inf
  return x


def _direction(seed=0):
  rng = np.random.default_rng(seed)
  d = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  total = math.sqrt(sum(float(np.sum(v * v)) for v in d.values()))
  return {k: v / total for k, v in d.items()}


def _grad_stream(norms, seed=0):
  """Float32 gradient trees [T, ...] along a fixed direction scaled to the
  given norms (Inf/NaN planted into one element), and the float64 norms of
  the float32 trees actually fed, from NumPy."""
  d = _direction(seed)
  grads = {}
  for k, v in d.items():
    finite = np.where(np.isfinite(norms), norms, 1.0)
    grads[k] = (finite[:, None] * v.reshape(1, -1)).reshape(
        (len(norms),) + v.shape).astype(np.float32)
  bad = ~np.isfinite(norms)
  grads["a"][bad, 0, 0] = norms[bad].astype(np.float32)
  fed = np.sqrt(sum(np.sum(np.square(g.astype(np.float64)).reshape(
      len(norms), -1), axis=1) for g in grads.values()))
  return grads, fed


# ------------------------------------------------------------- the runner


@functools.lru_cache(maxsize=None)
def _scan_runner(sigma, window, warmup, max_consecutive, with_loss):
  """One jitted lax.scan of skip_spikes(adam) over a whole stream."""
  if sigma == "defaults":
    tx = og.skip_spikes(optax.adam(0.1))  # documented: 6.0, 128, 128 // 2
  else:
    kwargs = dict(sigma=sigma, window=window, max_consecutive=max_consecutive)
    if warmup is not None:
      kwargs["warmup_steps"] = warmup
    tx = og.skip_spikes(optax.adam(0.1), **kwargs)
  params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}

  @jax.jit
  def run(grads, losses):
    def body(state, xs):
      g, loss = xs
      extra = {"loss": loss} if with_loss else {}
      updates, new = tx.update(g, state, params, **extra)
      return new, (updates, new.skipped, new.norm_threshold,
                   new.loss_threshold, new.inner_state[0], new.consecutive)

    init = tx.init(params)
    final, ys = lax.scan(body, init, (grads, losses))
    return init, final, ys

  return run


def _check_stream(norms, losses, *, sigma, window, warmup, max_consecutive,
                  defaults=False):
  grads, fed = _grad_stream(norms)
  fed_loss = None if losses is None else losses.astype(np.float32).astype(
      np.float64)
  skip, thr_n, thr_l, runs = _reference(fed, fed_loss, sigma=sigma,
                                        window=window, warmup=warmup,
                                        max_consecutive=max_consecutive)
  # Precondition: no decision hangs on float32 rounding.
  assert _margins(fed, thr_n).min() > 2e-5
  if losses is not None:
    assert _margins(fed_loss, thr_l).min() > 2e-5

  run = _scan_runner("defaults" if defaults else sigma, window, warmup,
                     max_consecutive, losses is not None)
  loss_in = (np.zeros(len(norms), np.float32) if losses is None else
             losses.astype(np.float32))
  init, final, ys = jax.device_get(run(grads, loss_in))
  updates, skipped, got_thr_n, got_thr_l, adam, consecutive = ys

  # 1. Every decision.
  skipped = np.asarray(skipped)
  wrong = np.flatnonzero(skipped != skip)
  assert wrong.size == 0, (
      f"decisions differ at steps {wrong[:10]}: library {skipped[wrong[:10]]}"
      f", reference {skip[wrong[:10]]}, norms {fed[wrong[:10]]}, "
      f"thresholds {thr_n[wrong[:10]]}")
  # 2. Every threshold (+inf during the warm-up).
  for got, want in ((got_thr_n, thr_n),) + (
      ((got_thr_l, thr_l),) if losses is not None else ()):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(want)],
                               want[np.isfinite(want)], rtol=1e-4)
  # 3. Skipped steps: exact zeros and adam's state untouched, bit for bit.
  prev = jax.tree.map(lambda x, y: np.concatenate([np.asarray(x)[None],
                                                np.asarray(y)[:-1]]),
                      init.inner_state[0], adam)
  for t in np.flatnonzero(skip):
    for u in jax.tree.leaves(updates):
      assert np.all(np.asarray(u)[t] == 0), t
    for a, b in zip(jax.tree.leaves(adam), jax.tree.leaves(prev)):
      assert np.asarray(a)[t].tobytes() == np.asarray(b)[t].tobytes(), t
  # 4. Accepted steps: adam's moments follow the accepted gradients only.
  mu = {k: np.zeros(s) for k, s in SHAPES.items()}
  nu = {k: np.zeros(s) for k, s in SHAPES.items()}
  count = np.cumsum(~skip)
  np.testing.assert_array_equal(np.asarray(adam.count), count)
  for t in range(len(norms)):
    if skip[t]:
      continue
    for k in SHAPES:
      g = grads[k][t].astype(np.float64)
      mu[k] = B1 * mu[k] + (1 - B1) * g
      nu[k] = B2 * nu[k] + (1 - B2) * g * g
      if t > 0 or fed[t] != 0:  # a first zero gradient moves nothing
        assert np.all(np.asarray(updates[k])[t] != 0), (t, k)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(adam.mu[k])[-1], mu[k], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(adam.nu[k])[-1], nu[k], rtol=1e-5)
  # 5. The counters, the run of finite spikes at every step too.
  np.testing.assert_array_equal(np.asarray(consecutive), runs)
  assert int(final.num_spikes) == int(skip.sum())
  assert int(final.step) == len(norms)
  assert int(final.last_spike_step) == int(np.flatnonzero(skip)[-1])
  m = og.metrics(final)
  assert int(m["optim/num_spikes"]) == int(skip.sum())
  return skip, fed, fed_loss


# ------------------------------------------------------------------ tests


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.parametrize("sigma, window, warmup, defaults", [
    # og.skip_spikes(inner) with no arguments: the reference with the
    # documented defaults sigma 6, window 128, warm-up 128 // 2 = 64 and a
    # restart after 32 spikes in a row.
    (6.0, 128, None, True),
    (3.0, 32, 32, False),
    (2.0, 16, 8, False),  # many natural outliers: the rule's details matter
])
def test_norm_stream_matches_reference(sigma, window, warmup, defaults):
  norms = _norm_stream(seed=1)
  skip, fed, _ = _check_stream(norms, None, sigma=sigma, window=window,
                               warmup=warmup,
                               max_consecutive=32 if defaults else None,
                               defaults=defaults)
  # The planted 20x spikes after the warm-up and the non-finite steps are
  # caught, the one during the warm-up is accepted.
  for t in (100, 150, 151, 152, 200, 230, 270, 300, 301, 350):
    assert skip[t], t
  effective_warmup = window // 2 if warmup is None else warmup
  assert skip[10] == (effective_warmup <= 10)
  if sigma == 2.0:
    # This stream tells the rule from near misses: sample std (ddof=1), or
    # letting spikes into the history, decide differently somewhere.
    for wrong in (dict(ddof=1), dict(spikes_enter_history=True)):
      other = _reference(fed, sigma=sigma, window=window, warmup=warmup,
                         **wrong)[0]
      assert np.any(other != skip), wrong


@pytest.mark.standard_promotion
@pytest.mark.parametrize("sigma, window, warmup", [(2.5, 16, 8)])
def test_loss_stream_matches_reference(sigma, window, warmup):
  norms = _norm_stream(seed=3)
  losses = _loss_stream(seed=4)
  skip, _, fed_loss = _check_stream(norms, losses, sigma=sigma, window=window,
                                    warmup=warmup, max_consecutive=None)
  # Planted loss spikes (on steps where the norm is ordinary) are caught.
  for t in (140, 141, 250, 290, 310, 311, 312, 313):
    assert skip[t], t
  # and the loss alone decides some steps: without it they would be taken.
  alone = _reference(_grad_stream(norms)[1], sigma=sigma, window=window,
                     warmup=warmup)[0]
  assert np.any(skip & ~alone)


def _regime_stream(seed):
  """~1 for 150 steps, then a lasting 10x regime, with a 20x spike (on the
  new scale) at 220 and a few ordinary ones."""
  rng = np.random.default_rng(seed)
  x = _lognormal(rng, 300, 0.1)
  x[150:] *= 10.0
  x[220] *= 20.0
  x[60] *= 20.0
  return x


@pytest.mark.standard_promotion
def test_max_consecutive_restarts_the_warmup_after_a_regime_change():
  norms = _regime_stream(seed=5)
  skip, _, _ = _check_stream(norms, None, sigma=4.0, window=32, warmup=8,
                             max_consecutive=4)
  # Worked out by hand: steps 150..153 are spikes; the 4th in a row clears the
  # history; 154..161 are the new warm-up (taken); then the rule is active
  # again on the new scale, and still catches the 20x spike at 220.
  assert list(skip[148:163]) == [False, False, True, True, True, True] + [
      False] * 9
  assert skip[60] and skip[220]


@pytest.mark.standard_promotion
def test_by_default_a_regime_change_is_learned_after_32_spikes():
  """The defaults must not stop training for good on a lasting jump."""
  rng = np.random.default_rng(5)
  norms = _lognormal(rng, 300, 0.1)
  norms[150:] *= 10.0  # no outlier before: the warm-up would take it in
  skip, _, _ = _check_stream(norms, None, sigma=6.0, window=128, warmup=None,
                             max_consecutive=32, defaults=True)
  # 150..181 skipped, the 32nd in a row clears the history, 182..245 are the
  # new warm-up of 64 (taken), then the rule runs on the new scale.
  assert np.all(skip[150:182]) and not np.any(skip[182:246])
  assert not np.any(skip[246:])


@pytest.mark.standard_promotion
def test_non_finite_steps_neither_count_nor_break_a_run_of_spikes():
  rng = np.random.default_rng(7)
  norms = _lognormal(rng, 120, 0.1)
  norms[40:80] = np.nan        # 40 NaN steps: no restart at 3 in a row
  norms[90:92] *= 20.0         # two finite spikes,
  norms[92] = np.inf           # a non-finite step inside the run,
  norms[93] *= 20.0            # and the third finite spike restarts
  skip, _, _ = _check_stream(norms, None, sigma=4.0, window=16, warmup=8,
                             max_consecutive=3)
  assert np.all(skip[40:80]) and not np.any(skip[80:90])
  assert np.all(skip[90:94]) and not np.any(skip[94:102])  # new warm-up


@pytest.mark.standard_promotion
def test_steps_without_gradient_do_not_break_a_run_of_spikes():
  """A lasting 10x jump with a step of norm 0 (no gradient) every 5 steps:
  those steps are taken but do not break the run, so the 4th finite spike
  in a row clears the history and the new scale is learned (they broke it,
  and the jump was skipped for ever)."""
  rng = np.random.default_rng(5)
  norms = _lognormal(rng, 200, 0.1)
  norms[100:] *= 10.0
  norms[::5] = 0.0
  skip, _, _ = _check_stream(norms, None, sigma=4.0, window=16, warmup=8,
                             max_consecutive=4)
  # 101..104 are the 4 spikes in a row (100 and 105 are zero steps), then
  # 12 steps of the new warm-up (8 of them with a gradient) are taken.
  assert np.flatnonzero(skip[95:]).tolist() == [6, 7, 8, 9]
  assert not np.any(skip[110:])


@pytest.mark.standard_promotion
def test_without_max_consecutive_a_regime_change_is_skipped_for_ever():
  norms = _regime_stream(seed=5)
  skip, _, _ = _check_stream(norms, None, sigma=4.0, window=32, warmup=8,
                             max_consecutive=None)
  assert np.all(skip[150:])


@pytest.mark.standard_promotion
def test_max_consecutive_with_loss_clears_both_histories():
  norms = _norm_stream(seed=6)[:200]
  norms[~np.isfinite(norms)] = 1.0
  losses = _loss_stream(seed=8)[:200]
  losses[120:] *= 5.0  # a lasting change of the loss only
  losses[~np.isfinite(losses)] = 3.0
  skip, _, _ = _check_stream(norms, losses, sigma=4.0, window=16, warmup=4,
                             max_consecutive=3)
  assert skip[120] and skip[121] and skip[122] and not skip[123]


@pytest.mark.standard_promotion
def test_inject_sigma():
  """sigma injected as a hyperparameter: changing it in the state changes the
  decision, with no retrace."""
  make = optax.inject_hyperparams(
      og.skip_spikes, static_args=("inner", "window", "warmup_steps"))
  tx = make(inner=optax.sgd(0.1), sigma=6.0, window=8, warmup_steps=4)
  params = {"w": jnp.zeros((1,), jnp.float32)}
  traces = []

  @jax.jit
  def step(norm, state):
    traces.append(1)
    return tx.update({"w": jnp.reshape(norm, (1,))}, state, params)

  state = tx.init(params)
  history = [1.0, 1.1, 0.9, 1.0]
  for n in history:
    _, state = step(jnp.float32(n), state)
  h = np.asarray(history, np.float32).astype(np.float64)
  mean, std = h.mean(), h.std()
  probe = np.float32(1.3)  # z = 4.24: a spike at sigma 3, not at sigma 6
  z = (float(probe) - mean) / std
  assert 3.0 < z < 6.0

  results = {}
  for sigma in (6.0, 3.0, 4.0, 5.0):
    s = state._replace(hyperparams={**state.hyperparams,
                                    "sigma": jnp.asarray(sigma, jnp.float32)})
    updates, new = step(jnp.float32(probe), s)
    inner = new.inner_state
    assert isinstance(inner, og.SkipSpikesState)
    np.testing.assert_allclose(float(inner.norm_threshold),
                               mean + sigma * std, rtol=1e-4)
    results[sigma] = bool(inner.skipped)
    assert bool(og.metrics(new)["optim/skipped"]) == results[sigma]
    if results[sigma]:
      assert float(updates["w"][0]) == 0.0
    else:
      np.testing.assert_allclose(float(updates["w"][0]), -0.1 * probe,
                                 rtol=1e-6)
  assert results == {6.0: False, 3.0: True, 4.0: True, 5.0: False}
  assert len(traces) == 1


@pytest.mark.standard_promotion
def test_inject_warmup_steps_without_static_args():
  """The warm-up is only compared with a counter: injected, it may change
  in the state (a warm-up of 4 catches the jump at step 4, one of 6 not)."""
  make = optax.inject_hyperparams(og.skip_spikes,
                                  static_args=("inner", "window"))
  tx = make(inner=optax.sgd(0.1), window=8, warmup_steps=4)
  params = {"w": jnp.zeros((1,), jnp.float32)}
  step = jax.jit(lambda n, s: tx.update({"w": jnp.reshape(n, (1,))}, s,
                                        params))
  for warmup, caught in ((4, True), (6, False)):
    state = tx.init(params)
    state = state._replace(hyperparams={
        **state.hyperparams, "warmup_steps": jnp.asarray(warmup, jnp.int32)})
    for n in (1.0, 1.1, 0.9, 1.0, 100.0):
      _, state = step(jnp.float32(n), state)
    assert bool(state.inner_state.skipped) == caught, warmup
  # Set in the state above the window (which `init` would refuse), it
  # counts as the window: a full history of 8 catches the jump.
  state = tx.init(params)
  state = state._replace(hyperparams={
      **state.hyperparams, "warmup_steps": jnp.asarray(100, jnp.int32)})
  for n in (1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 100.0):
    _, state = step(jnp.float32(n), state)
  assert bool(state.inner_state.skipped)
  # Below 2 (refused by `init` too) it counts as 2: no step is a spike
  # against a history of one value or none, which once made every step
  # one, for good.
  for warmup in (0, -5, 1):
    state = tx.init(params)
    state = state._replace(hyperparams={
        **state.hyperparams, "warmup_steps": jnp.asarray(warmup, jnp.int32)})
    skipped = []
    for n in (1.0, 1.1, 0.9, 1.0, 100.0):
      _, state = step(jnp.float32(n), state)
      skipped.append(bool(state.inner_state.skipped))
    assert skipped == [False, False, False, False, True], warmup
  with pytest.raises(ValueError, match=r"`warmup_steps` must be at most "
                     r"`window` \(8\), but got 9\."):
    make(inner=optax.sgd(0.1), window=8, warmup_steps=9).init(params)


def _nan_on_step(bad_step):
  """An optimizer that counts its steps and returns a NaN update on one."""
  def update(updates, count, params=None):
    del params
    nan_now = count == bad_step
    return (jax.tree.map(lambda u: jnp.where(nan_now, jnp.nan, u), updates),
            optax.safe_increment(count))
  return optax.GradientTransformation(
      lambda params: jnp.zeros((), jnp.int32), update)


@pytest.mark.parametrize("make", [
    lambda inner: og.skip_spikes(inner, window=8, warmup_steps=4),
    lambda inner: og.guard(inner, max_norm=None, skip_nonfinite=False,
                           monitor=False, spike_window=8,
                           spike_warmup_steps=4),
], ids=["skip_spikes", "guard(skip_nonfinite=False)"])
def test_non_finite_update_of_an_opaque_inner_is_not_a_spike(make):
  """Spikes are decided on the gradients: a NaN that `inner` makes from
  finite gradients is its own (applied, and its state advances), while a
  spike leaves its state as it was. The update is read back only to order
  the select after it (`_skip.update_unless`); this checks it decides
  nothing."""
  tx = make(_nan_on_step(5))
  params = {"a": jnp.zeros((2,), jnp.float32),
            "b": jnp.zeros((3,), jnp.float32)}
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  state = tx.init(params)
  norms = [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 100.0, 0.95]
  for t, n in enumerate(norms):
    grads = {"a": jnp.full((2,), n / math.sqrt(5), jnp.float32),
             "b": jnp.full((3,), n / math.sqrt(5), jnp.float32)}
    updates, state = step(grads, state)
    spike = t == 6
    assert bool(og.metrics(state)["optim/skipped"]) == spike, t
    # The inner optimizer's own step count: frozen by the spike only.
    assert int(state.inner_state) == (t + 1 if t < 6 else t), t
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      if spike:
        np.testing.assert_array_equal(np.asarray(u), 0.0)
      elif t == 5:
        assert np.all(np.isnan(np.asarray(u))), t
      else:
        np.testing.assert_array_equal(np.asarray(u), np.asarray(g))


@functools.lru_cache(maxsize=None)
def _huge_runner():
  tx = og.skip_spikes(optax.sgd(0.1), window=8, warmup_steps=4)
  params = {"a": jnp.zeros((2,), jnp.float32),
            "b": jnp.zeros((2,), jnp.float32)}

  @jax.jit
  def step(g, state):
    return tx.update(g, state, params)

  return tx, params, step


@pytest.mark.parametrize("a, b", [
    ((1e30, 1e30), (1e30, 1e30)),
    ((9e37, 9e37), (1.0, 1.0)),      # one huge leaf, norm 1.27e38
    ((9e37, 9e37), (9e37, 9e37)),    # two, global norm 1.8e38 (finite)
    ((1.5e38, 0.0), (1.0, 1.0)),     # one element, norm 1.5e38
    ((3e38, 3e38), (3e38, 3e38)),    # global norm 6e38: Inf in float32
], ids=["1e30", "9e37_one_leaf", "9e37_two_leaves", "1.5e38_one_element",
        "3e38"])
def test_huge_finite_gradient_is_a_spike(a, b):
  """After a warm-up on norms ~1, a gradient of finite elements whose global
  norm is enormous (float64: 2e30 ... 6e38, the last one above float32 max)
  is a spike, and its norm does not enter the history."""
  grads = {"a": np.asarray(a, np.float32), "b": np.asarray(b, np.float32)}
  true_norm = math.sqrt(sum(float(np.sum(np.square(g.astype(np.float64))))
                            for g in grads.values()))
  assert true_norm > 1e30
  tx, params, step = _huge_runner()
  state = tx.init(params)
  for n in (1.0, 1.2, 0.8, 1.1, 0.9):
    _, state = step({"a": jnp.full((2,), n / 2, jnp.float32),
                     "b": jnp.full((2,), n / 2, jnp.float32)}, state)
  before = state
  updates, state = step(grads, state)
  assert bool(state.skipped), (true_norm, float(state.last_norm))
  for u in jax.tree.leaves(updates):
    assert np.all(np.asarray(u) == 0)
  if true_norm < float(np.finfo(np.float32).max):
    np.testing.assert_allclose(float(state.last_norm), true_norm, rtol=1e-5)
  # The spike did not enter the history: the next threshold is unchanged.
  ones = {"a": jnp.full((2,), 0.5, jnp.float32),
          "b": jnp.full((2,), 0.5, jnp.float32)}
  _, after = step(ones, state)
  _, after_without = step(ones, before)
  assert float(after.norm_threshold) == float(after_without.norm_threshold)


@functools.lru_cache(maxsize=None)
def _history_tx():
  tx = og.skip_spikes(optax.sgd(0.1), sigma=2.0, window=4, warmup_steps=3,
                      max_consecutive=None)
  return tx, jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))


def test_skip_spikes_metrics_follow_the_history():
  """Every metric read through og.metrics after every step, against
  `_reference` (mean + sigma * std, ddof=0, of the last `window` accepted
  values, +Inf before `warmup_steps` of them): a norm spike, a loss spike
  right after it (a run of 2), a NaN inside the run (neither extends nor
  breaks it), a window that wraps, and norms (~1) and losses (~3) on
  different scales, so that no metric can stand in for another."""
  sigma, window, warmup = 2.0, 4, 3
  norms = np.asarray([1.0, 1.2, 0.9, 1.1, 5.0, 1.0, np.nan, 1.05, 1.0, 4.0,
                      0.95])
  losses = np.asarray([3.0, 3.3, 2.8, 3.1, 3.0, 9.0, 3.0, 3.05, 2.9, 3.0,
                       3.1])
  grads = [{"w": np.asarray([n, 0.0], np.float32)} for n in norms]
  fed = np.asarray([math.sqrt(float(np.sum(np.square(
      g["w"].astype(np.float64))))) for g in grads])
  fed_loss = losses.astype(np.float32).astype(np.float64)
  skip, thr_n, thr_l, runs = _reference(fed, fed_loss, sigma=sigma,
                                        window=window, warmup=warmup)
  # What the plan holds, from the reference: spikes at 4, 5, 6 (NaN), 9.
  np.testing.assert_array_equal(np.flatnonzero(skip), [4, 5, 6, 9])
  assert list(runs) == [0, 0, 0, 0, 1, 2, 2, 0, 0, 1, 0]
  assert _margins(fed, thr_n).min() > 1e-3
  assert _margins(fed_loss, thr_l).min() > 1e-3
  active = np.isfinite(thr_n)
  assert np.all(np.abs(thr_n[active] - thr_l[active]) > 1.0)
  num_spikes = np.cumsum(skip)
  last_spike = [max([i for i in range(t + 1) if skip[i]], default=-1)
                for t in range(len(norms))]

  tx, step = _history_tx()
  params = {"w": jnp.zeros((2,), jnp.float32)}
  state = tx.init(params)
  assert set(og.metrics(state)) == {
      "optim/skipped", "optim/num_spikes", "optim/consecutive_spikes",
      "optim/last_spike_step", "grad/spike_threshold", "grad/spike_mean",
      "grad/spike_std", "loss/spike_threshold", "loss/spike_mean",
      "loss/spike_std"}
  for t, (g, loss) in enumerate(zip(grads, fed_loss)):
    _, state = step(g, state, params, jnp.float32(loss))
    m = {k: v.item() for k, v in jax.device_get(og.metrics(state)).items()}
    assert m["optim/skipped"] is bool(skip[t]), t
    assert m["optim/num_spikes"] == num_spikes[t], t
    assert m["optim/consecutive_spikes"] == runs[t], t
    assert m["optim/last_spike_step"] == last_spike[t], t
    # What step t was judged against: the last `window` values accepted
    # before it (population std; nothing accepted yet reads 0 and 0).
    for signal, values in (("grad", fed), ("loss", fed_loss)):
      history = values[:t][~skip[:t]][-window:]
      mean, std = ((history.mean(), history.std()) if history.size else
                   (0.0, 0.0))
      np.testing.assert_allclose(
          [m[f"{signal}/spike_mean"], m[f"{signal}/spike_std"]], [mean, std],
          rtol=1e-5, atol=1e-7, err_msg=f"{t} {signal}")
    for name, want in (("grad/spike_threshold", thr_n[t]),
                       ("loss/spike_threshold", thr_l[t])):
      if np.isinf(want):
        assert m[name] == np.inf, (t, name)
      else:
        np.testing.assert_allclose(m[name], want, rtol=1e-5,
                                   err_msg=f"{t} {name}")


# ---------------------------------------------------------------- check


@functools.lru_cache(maxsize=None)
def _spike_tx():
  tx = og.skip_spikes(optax.sgd(0.1), sigma=3.0, window=8, warmup_steps=4)

  @jax.jit
  def step(g, state, params, extra):
    return tx.update(g, state, params, **extra)

  return tx, step


def _spike_state(with_loss):
  tx, step = _spike_tx()
  params = {"Dense_0": {"kernel": jnp.zeros((2,), jnp.float32)}}
  state = tx.init(params)
  history = [1.0, 1.2, 0.8, 1.1]
  for i, n in enumerate(history):
    g = {"Dense_0": {"kernel": jnp.asarray([n, 0.0], jnp.float32)}}
    extra = {"loss": jnp.float32(2.0 + 0.1 * i)} if with_loss else {}
    _, state = step(g, state, params, extra)
  og.check(state)  # nothing wrong so far
  return step, params, state, np.asarray(history)


def test_check_raises_gradient_explosion_error_naming_norm_and_threshold():
  step, params, state, h = _spike_state(with_loss=False)
  g = {"Dense_0": {"kernel": jnp.asarray([30.0, 40.0], jnp.float32)}}
  _, state = step(g, state, params, {})
  # The float32 norms fed, in float64: mean + sigma * std (ddof=0).
  h32 = h.astype(np.float32).astype(np.float64)
  threshold = h32.mean() + 3.0 * h32.std()
  norm = math.hypot(30.0, 40.0)
  z = (norm - h32.mean()) / h32.std()
  for s in (state, jax.device_get(state)):
    with pytest.raises(og.GradientExplosionError) as info:
      og.check(s)
    message = str(info.value)
    assert message == (
        f"Step 4: the gradient norm {norm:.4g} exceeded the spike threshold "
        f"{threshold:.4g} ({z:.3g} standard deviations above its recent "
        f"mean {h32.mean():.4g}). The guard skipped the step (1 spike in a "
        "row, 1 in total)."), message
    # Far from rounding boundaries:
    assert (f"{threshold:.4g}", f"{z:.3g}", f"{h32.mean():.4g}") == (
        "1.469", "331", "1.025")  # z = 331.13, mean = 1.0250000
    assert info.value.step == 4
    assert isinstance(info.value, og.GuardError)
  # A normal step after it: quiet again.
  g = {"Dense_0": {"kernel": jnp.asarray([1.0, 0.0], jnp.float32)}}
  _, state = step(g, state, params, {})
  og.check(state)


def test_check_says_when_a_run_of_spikes_restarts_the_history():
  tx = og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2,
                      max_consecutive=2)
  params = {"w": jnp.zeros((2,), jnp.float32)}
  state, step = tx.init(params), jax.jit(tx.update)
  messages = []
  for n in (1.0, 1.1, 50.0, 50.0):
    _, state = step({"w": jnp.asarray([n, 0.0], jnp.float32)}, state, params)
    try:
      og.check(state)
    except og.GradientExplosionError as e:
      messages.append(str(e))
  assert len(messages) == 2
  assert messages[0].endswith("The guard skipped the step (1 spike in a row, "
                              "1 in total)."), messages[0]
  assert messages[1].endswith(
      "The guard skipped the step (2 spikes in a row, enough to restart the "
      "spike history, which now warms up again on the new scale; 2 in "
      "total)."), messages[1]
  # A NaN step is skipped too, but is no run of spikes, and no explosion:
  # a user who rolls back on NonFiniteGradientError must see it.
  _, state = step({"w": jnp.asarray([np.nan, 0.0], jnp.float32)}, state,
                  params)
  with pytest.raises(og.NonFiniteGradientError, match=(
      r"^Step 4: the gradient norm is nan \(the gradients hold NaN\)\. "
      r"The guard skipped the step \(3 in total\)\.$")):
    og.check(state)


@pytest.mark.standard_promotion  # traces optax.sgd
def test_check_words_what_a_spike_test_skipped():
  tx = og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2)
  params = {"w": jnp.zeros((2,), jnp.float32)}
  step = jax.jit(tx.update)
  cases = [
      # finite elements whose norm is beyond float32: no NaN/Inf in them
      ({"w": jnp.asarray([3e38, 3e38], jnp.float32)}, 1.0,
       og.NonFiniteGradientError,
       r"^Step 2: the gradient norm is inf \(the gradients hold Inf, or "
       r"their norm is beyond float32's range\)\. The guard skipped the "
       r"step \(1 in total\)\.$"),
      ({"w": jnp.asarray([1.0, 0.0], jnp.float32)}, np.nan,
       og.NonFiniteGradientError,
       r"^Step 2: the loss is nan\. The guard skipped the step"),
      ({"w": jnp.asarray([1.0, 0.0], jnp.float32)}, 50.0,
       og.GradientExplosionError,
       r"^Step 2: the loss 50 exceeded the spike threshold 1\b"),
  ]
  for grads, loss, error, message in cases:
    state = tx.init(params)
    for _ in range(2):  # warm-up: norm 1, loss 1
      _, state = step({"w": jnp.asarray([1.0, 0.0], jnp.float32)}, state,
                      params, loss=jnp.float32(1.0))
    _, state = step(grads, state, params, loss=jnp.float32(loss))
    with pytest.raises(error, match=message):
      og.check(state)


def test_check_names_a_loss_spike():
  """The warm-up's losses (2.0 ... 2.3) and norms (1.0 ... 1.2) differ, so
  the two thresholds differ: the sentence must give the loss's."""
  step, params, state, h = _spike_state(with_loss=True)
  g = {"Dense_0": {"kernel": jnp.asarray([1.0, 0.0], jnp.float32)}}
  _, state = step(g, state, params, {"loss": jnp.float32(50.0)})
  # The warm-up's float32 losses as `_spike_state` fed them, in float64.
  losses = np.asarray([np.float32(2.0 + 0.1 * i) for i in range(4)],
                      np.float64)
  norms = h.astype(np.float32).astype(np.float64)
  loss_threshold = losses.mean() + 3.0 * losses.std()
  norm_threshold = norms.mean() + 3.0 * norms.std()
  assert f"{loss_threshold:.4g}" == "2.485"  # far from a rounding boundary
  assert f"{loss_threshold:.4g}" != f"{norm_threshold:.4g}"
  assert 1.0 < norm_threshold  # the norm (1.0) alone is no spike
  with pytest.raises(og.GradientExplosionError) as info:
    og.check(state)
  z = (50.0 - losses.mean()) / losses.std()
  # Far from rounding boundaries (z = 427.98, mean = 2.1499999762):
  assert (f"{z:.3g}", f"{losses.mean():.4g}") == ("428", "2.15")
  assert str(info.value) == (
      f"Step 4: the loss {50.0:.4g} exceeded the spike threshold "
      f"{loss_threshold:.4g} ({z:.3g} standard deviations above its recent "
      f"mean {losses.mean():.4g}). The guard skipped the step (1 spike in a "
      "row, 1 in total)."), str(info.value)
  assert info.value.step == 4 and info.value.layers == {}
  m = og.metrics(state)
  np.testing.assert_allclose(float(m["loss/spike_threshold"]), loss_threshold,
                             rtol=1e-6)
  np.testing.assert_allclose(float(m["grad/spike_threshold"]), norm_threshold,
                             rtol=1e-6)


def test_check_reports_non_finite_before_spikes():
  params = {"w": jnp.zeros((2,), jnp.float32)}
  inner = optax.chain(og.skip_spikes(optax.sgd(0.1), window=4,
                                     warmup_steps=2), optax.sgd(0.1))
  tx = optax.chain(og.monitor(), inner)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(
      {"w": jnp.asarray([np.nan, 1.0], jnp.float32)}, state, params)
  # The monitor's sentence (the count, the layer), saying that the spike
  # test skipped the step; not the spike test's own "the gradient norm is
  # nan", which names no layer.
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert str(info.value) == (
      "Step 0: the gradients hold 1 NaN/Inf element; first bad layers: w (1 "
      "NaN/Inf). The guard skipped the step (its spike test skips a NaN/Inf "
      "norm; 1 skipped in total).")
  assert info.value.step == 0 and info.value.layers == {"w": 1}


def test_check_numbers_a_spike_by_the_training_step_inside_skip_nonfinite():
  """`skip_nonfinite(skip_spikes(...))`: the NaN steps never reach the spike
  test, whose own count lags; og.check still names the training step (and
  the monitor's layer for it), as the guard does."""
  params = {"a": jnp.zeros((2,), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  tx = optax.chain(
      og.monitor(zscore=True, zscore_decay=0.8),
      og.skip_nonfinite(og.skip_spikes(optax.sgd(0.1), window=8,
                                       warmup_steps=4)))
  guard = og.guard(optax.sgd(0.1), max_norm=None, spike_window=8,
                   spike_warmup_steps=4, zscore=True, zscore_decay=0.8)
  step_chain, step_guard = jax.jit(tx.update), jax.jit(guard.update)
  state, guarded = tx.init(params), guard.init(params)
  ok = lambda k: {"a": jnp.full((2,), 1.0 + 0.01 * k, jnp.float32),
                  "b": jnp.full((2,), 1.0 - 0.01 * k, jnp.float32)}
  nan = {"a": jnp.asarray([np.nan, 1.0], jnp.float32),
         "b": jnp.ones((2,), jnp.float32)}
  spike = {"a": jnp.full((2,), 1e3, jnp.float32),
           "b": jnp.ones((2,), jnp.float32)}
  plan = ([ok(k) for k in range(6)] + [nan] + [ok(k) for k in range(6, 10)] +
          [spike])
  for g in plan:
    _, state = step_chain(g, state, params)
    _, guarded = step_guard(g, guarded, params)
  # Step 11 (0-based, the NaN step 6 counted) spiked, in layer `a`.
  messages = []
  for s in (state, guarded):
    with pytest.raises(og.GradientExplosionError) as e:
      og.check(s)
    assert e.value.step == 11
    messages.append(str(e.value))
  assert messages[0].startswith("Step 11: the gradient norm ")
  assert "the layer that moved most against its own history: a " in (
      messages[0])
  assert messages[0] == messages[1]


def test_check_names_no_layer_from_another_partitions_monitor():
  """`multi_transform`: a monitor in partition "a" measured `enc` only; the
  spike that partition "b"'s skipper judged was `head`'s, so og.check names
  no layer of "a" (nor of a monitor under `optax.masked` to `enc`). A
  monitor in a chain around the partitions, or one wrapper down in a
  chain, saw every layer and names the one that moved most (`head`, 100x
  against 3x)."""
  params = {"enc": jnp.ones(4), "head": jnp.ones(3)}
  labels = {"enc": "a", "head": "b"}
  monitor = lambda: og.monitor(zscore=True, zscore_decay=0.5)
  spikes = lambda: og.skip_spikes(optax.sgd(0.1), window=8)
  beside = optax.multi_transform(
      {"a": optax.chain(monitor(), optax.sgd(0.1)), "b": spikes()}, labels)
  masked = optax.chain(optax.masked(monitor(), {"enc": True, "head": False}),
                       spikes())
  around = optax.chain(monitor(), optax.multi_transform(
      {"a": optax.sgd(0.1), "b": spikes()}, labels))
  # A monitor one wrapper down still saw every layer.
  nested = optax.chain(optax.chain(monitor(), optax.identity()), spikes())
  injected = optax.chain(optax.inject_hyperparams(
      og.monitor, static_args=("zscore", "every"))(zscore=True,
                                                   zscore_decay=0.5),
                         spikes())
  rng = np.random.default_rng(0)
  plan = [{"enc": jnp.asarray(1 + 0.1 * rng.normal(size=4), jnp.float32),
           "head": jnp.asarray(1 + 0.1 * rng.normal(size=3), jnp.float32)}
          for _ in range(12)]
  plan[11] = {"enc": plan[11]["enc"] * 3.0, "head": plan[11]["head"] * 100.0}
  raised = []
  for tx in (beside, masked, around, nested, injected):
    state, update = tx.init(params), jax.jit(tx.update)
    for g in plan:
      _, state = update(g, state, params)
    with pytest.raises(og.GradientExplosionError) as e:
      og.check(state)
    assert e.value.step == 11
    raised.append(e.value)
  for e in raised[:2]:  # the monitor did not see `head`
    assert e.layers == {} and "moved most" not in str(e)
  for e in raised[2:]:
    assert list(e.layers) == ["head"]
    assert "moved most against its own history: head " in str(e)


# ------------------------------------------------------------- arguments


_SIGMA = "`sigma` must be a finite real number > 0, but got "
_WINDOW = "`window` must be an integer >= 2, but got "


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma": -1.0}, _SIGMA + "-1.0."),
    ({"sigma": 0.0}, _SIGMA + "0.0."),
    ({"sigma": float("nan")}, _SIGMA + "nan."),
    ({"sigma": float("inf")}, _SIGMA + "inf."),
    ({"sigma": "6"}, _SIGMA + "'6'."),
    ({"sigma": True}, _SIGMA + "True."),
    ({"window": 1}, _WINDOW + "1."),
    ({"window": 0}, _WINDOW + "0."),
    ({"window": 8.0}, _WINDOW + "8.0."),
    ({"warmup_steps": 1},
     "`warmup_steps` must be an integer >= 2 or None, but got 1."),
    ({"window": 8, "warmup_steps": 9},
     "`warmup_steps` must be at most `window` (8), but got 9."),
    ({"max_consecutive": 0},
     "`max_consecutive` must be an integer >= 1 or None, but got 0."),
    ({"axis_name": 1}, "`axis_name` must be None, a mesh axis name or a "
     "tuple of them, but got 1."),
])
def test_skip_spikes_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    og.skip_spikes(optax.sgd(0.1), **kwargs)


def test_warmup_equal_to_window_is_allowed():
  og.skip_spikes(optax.sgd(0.1), window=8, warmup_steps=8)
  og.skip_spikes(optax.sgd(0.1), window=2)


def test_max_consecutive_may_be_an_injected_array():
  """`optax.inject_hyperparams` makes an array of every int argument, the
  default `max_consecutive=32` too: it only enters a comparison, so an
  array is taken, checked when concrete."""
  with pytest.raises(ValueError, match=r"^`max_consecutive` must be an "
                     r"integer >= 1 or None, but got Array\(0, "):
    og.skip_spikes(optax.sgd(0.1), max_consecutive=jnp.int32(0))
  make = optax.inject_hyperparams(
      og.skip_spikes, static_args=("inner", "window", "warmup_steps"))
  tx = make(inner=optax.sgd(0.1), sigma=3.0, window=4, warmup_steps=2,
            max_consecutive=2)
  params = {"w": jnp.zeros((1,), jnp.float32)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  skipped = []
  for n in [1.0, 1.0, 50.0, 50.0, 50.0]:
    _, state = step({"w": jnp.full((1,), n, jnp.float32)}, state, params)
    skipped.append(bool(state.inner_state.skipped))
  # Two 50x spikes clear the history; the third 50x is the new warm-up.
  assert skipped == [False, False, True, True, False]


def test_threshold_of_a_window_holding_a_huge_norm_is_finite():
  """A norm of 2e19 squares past float32's range: the spread is taken
  without squaring, and matches float64."""
  window = _spikes.window_init(8)
  values = [1.0, 1.1, 0.9, 2e19, 1.0]
  for v in values:
    window = _spikes.window_push(window, jnp.float32(v), jnp.bool_(True))
  got = jax.jit(lambda w: _spikes.window_baseline(w, 3.0, 4))(window)
  mean, std = np.mean(values), np.std(values)
  np.testing.assert_allclose([got.mean, got.std, got.threshold],
                             [mean, std, mean + 3.0 * std], rtol=1e-6)


@pytest.mark.parametrize("start", [0, 2**31 - 1 - 6, 2**31 - 1])
def test_window_keeps_the_last_values_past_int32s_count(start):
  """The write head is a count that stops nowhere: from any count, even a
  state whose count had stopped at int32's maximum, the window holds the
  last `size` values pushed, as numpy's slice of the stream says."""
  size = 4
  window = _spikes.Window(jnp.zeros((size,), jnp.float32),
                          jnp.asarray(start, jnp.int32))
  push = jax.jit(_spikes.window_push)
  stream = np.arange(1.0, 3 * size + 3, dtype=np.float32)
  for i, v in enumerate(stream):
    accept = i % 5 != 2  # a rejected value never enters the window
    window = push(window, jnp.float32(v), jnp.bool_(accept))
    kept = [x for j, x in enumerate(stream[:i + 1]) if j % 5 != 2][-size:]
    if start == 0 or i >= size:  # before, a huge start holds zeros too
      np.testing.assert_array_equal(
          np.sort(np.asarray(window.values))[-len(kept):], np.sort(kept))
    assert 0 < int(window.num_accepted) < 2 * size
  got = _spikes.window_baseline(window, 2.0, 2)
  np.testing.assert_allclose([got.mean, got.std], [np.mean(kept), np.std(kept)],
                             rtol=1e-6)


@pytest.mark.standard_promotion  # traces optax.sgd
def test_zero_norms_do_not_enter_the_history():
  """64 steps of exactly-zero gradients (a frozen phase) are accepted and
  left out of the history: the ordinary steps after them warm it up, and a
  spike among them is caught (the reference rule), not 32 ordinary steps."""
  norms = [0.0] * 64 + [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 50.0, 1.0, 0.0, 1.0]
  tx = og.skip_spikes(optax.sgd(0.1), warmup_steps=2)
  params = {"w": jnp.zeros(2)}
  step = jax.jit(tx.update)
  state, skipped = tx.init(params), []
  for n in norms:
    _, state = step({"w": jnp.array([n, 0.0], jnp.float32)}, state, params)
    skipped.append(bool(og.metrics(state)["optim/skipped"]))
  want = _reference(np.asarray(norms), sigma=6.0, window=128,
                    warmup=2, max_consecutive=32)[0]
  assert skipped == want.tolist()
  assert np.flatnonzero(want).tolist() == [70]  # only the 50x step


@pytest.mark.standard_promotion  # traces optax.sgd
@pytest.mark.parametrize("sigma", [0.25, 0.5, 0.9])
def test_a_value_at_the_bottom_of_its_window_is_not_a_spike(sigma):
  """A window of six values v and one a float32 step above: the exact
  threshold is above v for any sigma, so v is not a spike (the window's mean
  must not round below its smallest value)."""
  rng = np.random.default_rng(5)
  params = {"w": jnp.zeros(1)}
  tx = og.skip_spikes(optax.sgd(0.1), sigma=sigma, window=7, warmup_steps=7)
  step = jax.jit(tx.update)
  spikes = []
  for v in rng.lognormal(size=60).astype(np.float32):
    up = np.nextafter(v, np.float32(np.inf))
    state = tx.init(params)
    for n in [v] * 6 + [up, v]:
      _, state = step({"w": jnp.array([n])}, state, params)
    ref = np.array([v] * 6 + [up], np.float64)
    assert v <= ref.mean() + sigma * ref.std()   # the premise, in float64
    spikes.append(bool(og.metrics(state)["optim/skipped"]))
  assert not any(spikes), np.flatnonzero(spikes)


@pytest.mark.standard_promotion  # traces optax.sgd
def test_check_after_zero_gradients_words_a_loss_spike_as_one_spike():
  """Zero gradients keep the norm history empty while the losses fill
  theirs: a loss spike then is one spike, not a restart of the history."""
  params = {"w": jnp.zeros(2)}
  for tx in (og.skip_spikes(optax.sgd(0.1), warmup_steps=2),
             og.guard(og.sgd(0.1), spike_warmup_steps=2)):
    step = jax.jit(tx.update)
    state = tx.init(params)
    for loss in [1.0, 1.1, 0.9, 1.05, 0.95, 100.0]:
      _, state = step({"w": jnp.zeros(2)}, state, params,
                      loss=jnp.float32(loss))
    losses = np.array([1.0, 1.1, 0.9, 1.05, 0.95])
    limit = losses.mean() + 6 * losses.std()
    z = (100.0 - losses.mean()) / losses.std()
    with pytest.raises(og.GradientExplosionError, match=re.escape(
        f"Step 5: the loss 100 exceeded the spike threshold {limit:.4g} "
        f"({z:.3g} standard deviations above its recent mean "
        f"{losses.mean():.4g}). The guard skipped the step (1 spike in a "
        "row, 1 in total).")):
      og.check(state)

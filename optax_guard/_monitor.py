"""`monitor`: records the detection signals of explosion, changes nothing."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _skip
from optax_guard import _stats

_TINY = float(jnp.finfo(jnp.float32).tiny)


# A layer's norm enters its own history clipped at this many standard
# deviations above the mean, so that one spike moves the statistics by a
# bounded amount (ZClip's rule) and a lasting change of level is still
# followed.
_ZSCORE_CLIP = 3.0
# In the warm-up, before there is a spread to clip against, a norm enters
# the history at most this many times the mean so far.
_ZSCORE_WARMUP_CLIP = 10.0


class LayerZscores(NamedTuple):
  """Each layer's gradient norm against its own history (`zscore=True`)."""
  zscores: _metrics.PerLayer  # f32[L] z-score of each norm, last step.
  spike_layer: jax.Array      # i32[] the layer of the largest, -1: warm-up.
  mean: jax.Array             # f32[L] EMA of each layer's norm.
  var: jax.Array              # f32[L] EMA of its variance.
  steps: jax.Array            # i32[L] each layer's finite steps in its EMAs.


def update_zscores(z: LayerZscores, norms: jax.Array, finite: jax.Array,
                   decay: Any) -> LayerZscores:
  """The z-score of each layer's norm against its EMA, then the EMA update.

  A norm of exactly 0 (a layer initialised to 0, or frozen for a while)
  says nothing about the layer's scale and stays out of its history, which
  starts at its first non-zero norm; until that history holds
  `ceil(1 / (1 - decay))` finite steps (the EMA's span) that layer's z-score
  reads 0 and `spike_layer` does not name it (-1 while no layer is warm).
  A non-finite layer norm has z-score +Inf; a step with any non-finite
  norm leaves the history as it was. A norm enters the EMAs clipped (to
  `mean + 3 * spread`; in the warm-up, to 10 times the mean), so that one
  huge step cannot swamp the history; a layer's first non-zero norm starts
  its EMAs as it is. (`decay` may be traced: `optax.inject_hyperparams`.)
  """
  if isinstance(decay, (int, float)):  # the span as written: 0.8 gives 5
    span = math.ceil(round(1.0 / (1.0 - decay), 6))
  else:  # traced (`inject_hyperparams`): float32 holds a decay near 1 to
    # within 2^-25, which moves the span by up to span^2 * 2^-25;
    # discounted before rounding up, 0.99 gives 100 steps, not 101.
    span = 1.0 / (1.0 - jnp.asarray(decay, jnp.float32))
    span = jnp.ceil(span - span * span * 2**-25)
  decay = jnp.asarray(decay, jnp.float32)
  # Per layer: one that starts late would otherwise be scored against a
  # mean of 0 (+Inf) and then a variance of one sample.
  ready = z.steps.astype(jnp.float32) >= span
  # The spread is floored at a thousandth of the mean: a layer whose norm
  # never varied would otherwise give an infinite z-score for any change.
  spread = jnp.maximum(jnp.sqrt(z.var),
                       jnp.maximum(1e-3 * jnp.abs(z.mean), _TINY))
  zscores = jnp.where(jnp.isfinite(norms),
                      jnp.where(ready, (norms - z.mean) / spread, 0.0),
                      jnp.inf)
  named = jnp.where(ready | ~jnp.isfinite(norms), zscores, -jnp.inf)
  spike_layer = (jnp.where(jnp.any(ready), jnp.argmax(named), -1)
                 .astype(jnp.int32)
                 if norms.shape[0] else jnp.full((), -1, jnp.int32))
  first = (z.steps == 0) | (z.mean == 0)  # per layer
  value = jnp.minimum(norms, jnp.where(
      first, jnp.inf, jnp.where(ready, z.mean + _ZSCORE_CLIP * spread,
                                _ZSCORE_WARMUP_CLIP * z.mean)))
  delta = value - z.mean
  mean = jnp.where(first, value, z.mean + (1.0 - decay) * delta)
  var = jnp.where(first, 0.0, decay * (z.var + (1.0 - decay) * delta * delta))
  # Finite even where a first step's huge norm squares beyond float32.
  var = jnp.minimum(var, jnp.finfo(jnp.float32).max)
  learn = finite & (norms > 0)  # per layer
  return LayerZscores(
      _metrics.PerLayer(zscores, z.zscores.names), spike_layer,
      jnp.where(learn, mean, z.mean), jnp.where(learn, var, z.var),
      _stats.count_if(learn, z.steps))


def init_zscores(names: tuple[str, ...]) -> LayerZscores:
  # Separate buffers, each its own (a donated state must not share one).
  zeros = lambda dtype=jnp.float32: jnp.zeros((len(names),), dtype)
  return LayerZscores(_metrics.PerLayer(zeros(), names),
                      jnp.full((), -1, jnp.int32), zeros(), zeros(),
                      zeros(jnp.int32))


class MonitorState(NamedTuple):
  """State of `monitor`. Per-layer fields are None when `per_layer=False`
  (a zero-sized array in the state would also be one in every checkpoint and
  `lax.scan` output), `histograms` when `histogram=False`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.monitor()
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> print(state.norm, state.layer_norms.values)
    5.0 [5.]

  References:
    Made by `monitor` (see its references); `og.metrics` reads it; `og.check` raises on it.
  """
  step: jax.Array                    # i32[] updates seen.
  norm: jax.Array                    # f32[] global norm of what passed.
  num_nonfinite: jax.Array           # i32[] NaN/Inf elements of what passed.
  layer_norms: _metrics.PerLayer | None  # f32[L] norm of each layer.
  frac_above_1: _metrics.PerLayer | None  # f32[L] fraction of |x| > 1.
  total_frac_above_1: jax.Array      # f32[] the same over every element.
  nonfinite: _metrics.PerLayer | None     # i32[L] NaN/Inf counts per layer.
  param_norm: jax.Array              # f32[] global parameter norm.
  param_layer_norms: _metrics.PerLayer | None  # f32[L] of each parameter.
  param_nonfinite: jax.Array         # i32[] non-finite parameter elements.
  loss: jax.Array                    # f32[] last loss given (0 if none).
  loss_ema: jax.Array                # f32[] debiased EMA of finite losses.
  loss_ema_raw: jax.Array            # f32[] the EMA before debiasing.
  loss_steps: jax.Array              # i32[] finite losses seen.
  loss_nonfinite: jax.Array          # i32[] non-finite losses seen.
  histograms: _metrics.PerLayer | None  # i32[L, B] log10 histograms.
  zscores: LayerZscores | None        # per-layer norm z-scores (`zscore=True`).
  naming: _metrics.Naming             # static: how the metrics are named.

  def _og_metrics(self) -> dict[str, jax.Array]:
    k, p = self.naming.kind, self.naming.prefix
    nonfinite = _metrics.expand(f"{p}{k}/nonfinite", self.nonfinite)
    frac = self.frac_above_1
    out = {
        f"{p}{k}/norm": self.norm,
        **_metrics.expand(f"{p}{k}/norm", self.layer_norms),
        f"{p}{k}/frac_above_1": self.total_frac_above_1,
        **_metrics.expand(f"{p}{k}/frac_above_1", frac),
        f"{p}{k}/nonfinite": self.num_nonfinite,
        **nonfinite,
        f"{p}param/norm": self.param_norm,
        **_metrics.expand(f"{p}param/norm", self.param_layer_norms),
        f"{p}param/nonfinite": self.param_nonfinite,
        f"{p}loss/value": self.loss,
        f"{p}loss/ema": self.loss_ema,
        f"{p}loss/nonfinite": self.loss_nonfinite,
        **_metrics.expand(f"{p}{k}/hist", self.histograms),
    }
    if self.zscores is not None:
      out.update(_metrics.expand(f"{p}{k}/zscore", self.zscores.zscores))
      out[f"{p}{k}/spike_layer"] = self.zscores.spike_layer
    if k == "update":
      out[f"{p}update/ratio"] = _ratio(self.norm, self.param_norm)
      if self.layer_norms is not None:
        ratio = _metrics.PerLayer(
            _ratio(self.layer_norms.values, self.param_layer_norms.values),
            self.layer_norms.names)
        out.update(_metrics.expand(f"{p}update/ratio", ratio))
    return out


def _ratio(num: Any, den: Any) -> Any:
  """`num / den`: Inf where `den` is 0 (0 where both are), NaN where either
  is NaN (a NaN update of a zero bias is not "no update"), on the device or
  the host (NumPy, without a warning for a huge or Inf / Inf ratio)."""
  num, den = _metrics.unwrap(num), _metrics.unwrap(den)
  xp = _metrics.array_module(num)
  with np.errstate(over="ignore", invalid="ignore"):
    quotient = num / xp.where(den > 0, den, 1.0)
  return xp.where(den > 0, quotient, xp.where(
      xp.isnan(num) | xp.isnan(den), np.nan,
      xp.where(num > 0, np.inf, 0.0))).astype(quotient.dtype)


def after_params_read(updates: Any, state: MonitorState) -> Any:
  """The updates, made to wait for the parameter and update statistics
  (`_stats.waiting_for`): XLA copied the largest kernel of an MLP (16 MB)
  until every update also waited for the norm of all the gradients, as a
  clip's does. (A norm is never negative, and NaN < 0 is false.)"""
  return _stats.waiting_for((state.param_norm < 0) | (state.norm < 0),
                            updates)


def check_fields(state: MonitorState, *, per_layer: bool, histogram: bool,
                 zscore: bool, factory: str) -> None:
  """Raises unless `state` keeps the entries these options ask for (a state
  of a monitor built otherwise would report stale ones as current)."""
  for field, on, option in (("layer_norms", per_layer, "per_layer"),
                            ("histograms", histogram, "histogram"),
                            ("zscores", zscore, "zscore")):
    if (getattr(state, field) is None) == on:
      raise ValueError(
          f"The monitor's state {'has no' if on else 'has'} `{field}`, but "
          f"this `{factory}` was built with {option}={on}; "
          f"{_args.OTHER_CONFIGURATION}")


def record(state: MonitorState, stats: _stats.TreeStats, updates: Any,
           params: Any, loss: jax.Array | None, *, per_layer: bool,
           histogram: bool, loss_ema_decay: float,
           axis_name: _stats.AxisName,
           layers: _metrics.Layers = _metrics.Layers(),
           zscore_decay: float | None = None) -> MonitorState:
  """The monitor's new state from the statistics of the step's updates.

  `stats` must come from `tree_stats(updates, count_above=1.0)` (with the
  layout of the same `layers`); `guard` passes the ones it has already
  measured, so nothing is read twice. The caller has checked the layers
  (`check_layers`).
  """
  layout = layers.of(updates)

  def entries(values, like):
    return _metrics.PerLayer(values, like.names) if per_layer else None

  frac = stats.count_above.astype(jnp.float32) / jnp.maximum(stats.sizes, 1)
  changes = dict(
      norm=stats.global_norm,
      num_nonfinite=_stats.total_count(stats.nonfinite),
      layer_norms=entries(stats.norms, state.layer_norms),
      frac_above_1=entries(frac, state.frac_above_1),
      total_frac_above_1=(jnp.sum(stats.count_above.astype(jnp.float32)) /
                          jnp.maximum(jnp.sum(stats.sizes), 1)),
      nonfinite=entries(stats.nonfinite, state.nonfinite))
  if params is not None:
    _metrics.check_same_tree(updates, params, "monitor")
    pstats = _stats.tree_stats(params, axis_name=axis_name,
                               stacked=layout.stacked, groups=layout.groups)
    changes.update(
        param_norm=pstats.global_norm,
        param_layer_norms=entries(pstats.norms, state.param_layer_norms),
        param_nonfinite=_stats.total_count(pstats.nonfinite))
  if zscore_decay is not None:
    changes.update(zscores=update_zscores(
        state.zscores, stats.norms, jnp.all(jnp.isfinite(stats.norms)),
        zscore_decay))
  if histogram:
    changes.update(histograms=_metrics.PerLayer(
        _stats.log_histograms(updates, axis_name=axis_name,
                              stacked=layout.stacked, groups=layout.groups),
        state.histograms.names))
  return record_loss(state._replace(**changes), loss, loss_ema_decay)


def record_loss(state: MonitorState, loss: jax.Array | None,
                decay: float) -> MonitorState:
  """The loss entries after a step with `loss` (unchanged without one).

  A few scalars: the monitor updates them on every step, also on those that
  `every` leaves unmeasured, so that no NaN loss goes uncounted.
  """
  if loss is None:
    return state
  finite = jnp.isfinite(loss)
  # One float32 decay for the average and its debiasing, so that their
  # weights add up (`1 - decay` taken in float64 was 1.3% off at 0.999999);
  # the debiasing `1 - decay**n` through expm1/log1p, without cancelling
  # (which left 1e-4 at 0.999999 after 200 steps).
  decay = jnp.float32(decay)
  raw = jnp.where(finite, decay * state.loss_ema_raw + (1.0 - decay) * loss,
                  state.loss_ema_raw)
  steps = _stats.count_if(finite, state.loss_steps)
  debias = -jnp.expm1(steps.astype(jnp.float32) * jnp.log1p(-(1.0 - decay)))
  return state._replace(
      loss=loss, loss_ema_raw=raw, loss_steps=steps,
      loss_ema=jnp.where(steps > 0, raw / jnp.maximum(debias, _TINY), 0.0),
      loss_nonfinite=_stats.count_if(~finite, state.loss_nonfinite))


def check_layers(state: MonitorState, updates: Any,
                 layers: _metrics.Layers) -> None:
  """Raises unless `updates` have the layers the monitor recorded."""
  recorded = [x for x in (state.layer_norms, state.histograms,
                          state.zscores and state.zscores.zscores)
              if x is not None]
  if recorded:
    layers.check(updates, recorded[0].names, "monitor")


# The states of the wrappers that roll their inner state back on a skipped
# step; `skip_nonfinite`, `skip_spikes` and `guard` register theirs.
ROLLING_BACK: list[type] = []


def warn_if_wrapped(inner_state: Any, who: str) -> None:
  """Warns (at init) where a gradient monitor sits inside a skipping
  wrapper, whose skipped steps roll its statistics back. A wrapper inside
  warned of its own (they are not looked into)."""
  kinds = (MonitorState, *ROLLING_BACK)
  found = [x for x in jax.tree.leaves(
      inner_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)]
  if any(getattr(x, "monitor", None) is not None and
         isinstance(x, tuple(ROLLING_BACK)) for x in found):
    advice = ("put the guard outside: it skips NaN/Inf and spikes itself "
              "(`skip_nonfinite=`, `spike_sigma=`)")
    what = "an `og.guard`, whose own monitor"
  elif any(isinstance(x, MonitorState) and x.naming.kind == "grad"
           for x in found):
    advice = ("leave it out (the guard's own monitor measures the gradients "
              "first)" if who == "guard" else
              f"put it ahead of the wrapper, `optax.chain(og.monitor(), "
              f"og.{who}(...))`")
    what = "an `og.monitor` of the gradients, whose statistics"
  else:
    return
  warnings.warn(
      f"`{who}` wraps {what} it rolls back with the rest of its inner state "
      "on a skipped step, so the monitor shows nothing of the steps it is "
      f"there for: {advice}.", stacklevel=_user_frame())


def _user_frame() -> int:
  """The `stacklevel` of the first caller outside this package and the
  libraries that call an `init` for the user (optax, flax, jax)."""
  level, frame = 2, sys._getframe(2)  # 1: the caller of warnings.warn
  while frame is not None and frame.f_globals.get(
      "__name__", "").partition(".")[0] in (
          "optax_guard", "optax", "flax", "jax"):
    level, frame = level + 1, frame.f_back
  return level


def monitor(
    *,
    per_layer: bool = True,
    histogram: bool = False,
    every: int = 1,
    kind: str = "grad",
    prefix: str = "",
    loss_ema_decay: float = 0.9,
    zscore: bool = False,
    zscore_decay: float = 0.97,
    axis_name: _stats.AxisName = None,
    stacked: _metrics.Stacked = None,
    groups: _metrics.Groups = None,
) -> optax.GradientTransformationExtraArgs:
  """Records the signals of exploding gradients; passes updates unchanged.

  Measures what flows through it, in one read: the global and per-layer L2
  norms, the fraction of elements above 1 in magnitude per layer (counted
  only in a layer whose sum of squares exceeds 1, the only ones that can
  hold such an element, so exact and free for gradients of ordinary size),
  and the NaN/Inf counts per layer (counted only on a step that has some). With
  `params`, also the parameter norms and non-finite parameter count; with a
  `loss=` (or `value=`) extra argument, the loss, its EMA and how many losses
  were not finite. Placed last in a chain with `kind="update"`, it measures
  the final updates and adds `update/ratio` and `update/ratio/<layer>`, the
  update norm over the parameter norm, in all and of each layer (Inf where
  that is 0: a zero-initialised bias at its first step, or no `params`
  given; 0 where both are).

  Metrics (`<k>` is `kind`): `<k>/norm`, `<k>/norm/<layer>`,
  `<k>/frac_above_1` (over every element), `<k>/frac_above_1/<layer>`,
  `<k>/nonfinite`, `<k>/nonfinite/<layer>`,
  `param/norm`, `param/norm/<layer>`, `param/nonfinite`, `loss/value`,
  `loss/ema`, `loss/nonfinite` (loss entries read 0 until a loss is given),
  and with `histogram=True` `<k>/hist/<layer>`: counts over the buckets of
  `optax_guard.HIST_BUCKETS` (zero, subnormals included; one per decade of
  magnitude from 1e-10 to 1e4, the outer two open-ended; NaN; Inf).

  Args:
    per_layer: record per-layer entries (else only the global ones).
    histogram: record per-layer log-magnitude histograms (one more read of
      the updates, all buckets counted together: ~1.3x the monitor's step
      alone on the CPU; recorded also when `per_layer=False`).
    every: measure on every `every`-th step only; the decision is taken on the
      device (`lax.cond`) and the state keeps the last measured values
      (the loss entries, a few scalars, follow every step). It shapes the
      compiled step, so under `optax.inject_hyperparams` list it in
      `static_args` (its default too: optax injects every number).
    kind: `"grad"` before the optimizer, `"update"` when last in the chain.
    prefix: prepended to every metric name, e.g. `"post_clip/"`.
    loss_ema_decay: decay of the loss EMA, in `[0, 1)`. Keep it the same
      for the whole run: the EMA is debiased as if every past loss had been
      weighed with today's decay (changed in an `inject_hyperparams` state,
      `loss/ema` is off until `decay**steps` is negligible).
    zscore: also record which layer spiked: `<k>/zscore/<layer>`, each
      layer's norm as a z-score against an EMA of its own history, and
      `<k>/spike_layer`, the index of the largest (in the order of the
      per-layer entries; `og.check` names it, when its z-score is above
      3). A layer's history starts at its first non-zero norm; its
      z-score reads 0, and `spike_layer` does not name it, during the
      first `ceil(1 / (1 - zscore_decay))` finite steps of its history
      (`spike_layer` reads -1 while no layer is past them). A norm enters
      its layer's history clipped at 3 standard deviations above the mean
      (in those first steps, at 10 times the mean; a layer's first
      non-zero norm as it is), so that one spike barely moves it.
    zscore_decay: decay of the per-layer EMAs of the mean and variance, in
      `(0, 1)`.
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`.
    stacked: the leaves whose leading axis stacks layers (`nn.scan`,
      `nnx.scan`): their layer names, or prefixes of them such as
      `("ScanBlock_0",)`, or a function from a layer name to a bool. Each
      stacked layer gets its own per-layer entries, `<leaf>/<i>` (e.g.
      `grad/norm/ScanBlock_0/Dense_0/kernel/3`). The stacked axis must not
      be sharded under `shard_map` (that is not detected when the state is
      initialised inside `shard_map`: layers of different devices would be
      added together).
    groups: a function from a layer name (after the `stacked` split) to the
      name of its group, e.g. `lambda name: name.split("/")[0]` for one
      entry per top-level module. The per-layer entries are then per group:
      the norm of the group's layers together, NaN/Inf counts, histograms
      and element counts summed, z-scores of the group norms. Groups come in
      the order of their first layer. (Under `optax.inject_hyperparams`,
      list a function given to `stacked` or `groups` in `static_args`:
      optax calls a function argument as a schedule of the step count.)

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `MonitorState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = optax.chain(og.monitor(), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> m = og.metrics(state)
    >>> print(float(m["grad/norm"]), float(m["grad/frac_above_1/w"]))
    5.0 1.0

  References:
    Pascanu et al., 2013, "On the difficulty of training recurrent neural
    networks" (https://arxiv.org/abs/1211.5063); Philipp et al., 2018, "The
    exploding gradient problem demystified" (https://arxiv.org/abs/1712.05577).
  """
  for name, flag in (("per_layer", per_layer), ("histogram", histogram),
                     ("zscore", zscore)):
    _args.check_bool(name, flag)
  _args.check_int("every", every, minimum=1)
  _args.check_choice("kind", kind, ("grad", "update"))
  _args.check_number("loss_ema_decay", loss_ema_decay, maximum=1.0,
                     strict_max=True)
  _args.check_number("zscore_decay", zscore_decay, strict=True, maximum=1.0,
                     strict_max=True)
  if not isinstance(prefix, str):
    raise ValueError(f"`prefix` must be a string, but got {prefix!r}.")
  _stats.check_axis_name(axis_name)
  layers = _metrics.Layers(stacked, groups)
  naming = _metrics.Naming(kind=kind, prefix=prefix, every=every)

  def init_fn(params):
    names = layers.names(params)
    f32 = lambda: jnp.zeros((), jnp.float32)
    i32 = lambda: jnp.zeros((), jnp.int32)
    entries = lambda dtype: (_metrics.per_layer_zeros(names, dtype)
                             if per_layer else None)
    return MonitorState(
        step=i32(), norm=f32(), num_nonfinite=i32(),
        layer_norms=entries(jnp.float32), frac_above_1=entries(jnp.float32),
        total_frac_above_1=f32(),
        nonfinite=entries(jnp.int32), param_norm=f32(),
        param_layer_norms=entries(jnp.float32),
        param_nonfinite=i32(), loss=f32(), loss_ema=f32(),
        loss_ema_raw=f32(), loss_steps=i32(), loss_nonfinite=i32(),
        histograms=(_metrics.per_layer_zeros(
            names, jnp.int32, (len(_stats.HIST_BUCKETS),))
                    if histogram else None),
        zscores=init_zscores(names) if zscore else None,
        naming=naming)

  def measure(updates, state, params, loss):
    check_layers(state, updates, layers)  # before `stacked=` reads them
    layout = layers.of(updates)
    stats = _stats.tree_stats(
        updates, axis_name=axis_name, count_above=1.0,
        stacked=layout.stacked, groups=layout.groups)
    return record(state, stats, updates, params, loss, per_layer=per_layer,
                  histogram=histogram, loss_ema_decay=loss_ema_decay,
                  axis_name=axis_name, layers=layers,
                  zscore_decay=zscore_decay if zscore else None)

  def update_fn(updates, state, params=None, **extra_args):
    check_fields(state, per_layer=per_layer, histogram=histogram,
                 zscore=zscore, factory="monitor")
    loss = _skip.loss_from(extra_args, axis_name)
    if every == 1:
      new_state = measure(updates, state, params, loss)
    else:
      new_state = record_loss(
          lax.cond(state.step % every == 0,
                   lambda: measure(updates, state, params, None),
                   lambda: state), loss, loss_ema_decay)
    if params is not None:
      updates = after_params_read(updates, new_state)
    return updates, new_state._replace(
        step=optax.safe_increment(state.step), naming=naming)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))

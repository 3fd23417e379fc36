"""`guard`: the recommended one-liner around any optimizer."""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _clipping
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _monitor
from optax_guard import _nonfinite
from optax_guard import _penalties
from optax_guard import _skip
from optax_guard import _spikes
from optax_guard import _stats


class GuardState(NamedTuple):
  """State of `guard`; a part switched off is None.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> state = og.guard(og.adamw(1e-3), spike_sigma=None).init(
    ...     {"w": jnp.ones(2)})
    >>> type(state.inner_state).__name__, state.spikes is None
    ('AdamwState', True)

  References:
    Made by `guard` (see its references); `og.metrics` reads it; `og.check` raises on it.
  """
  inner_state: Any                                   # the optimizer's state.
  monitor: _monitor.MonitorState | None              # what the step measured.
  clip: _clipping.ClipByGlobalNormState | None       # the global-norm clip.
  nonfinite: _nonfinite.SkipNonfiniteState | None    # NaN/Inf skipping.
  spikes: _spikes.SkipSpikesState | None             # spike skipping.

  def _og_metrics(self) -> dict[str, jax.Array]:
    out: dict[str, jax.Array] = {}
    skipped = []
    for part in (self.monitor, self.clip, self.nonfinite, self.spikes):
      if part is None:
        continue
      for name, value in part._og_metrics().items():
        if name == "optim/skipped":
          skipped.append(value)
        else:
          # The monitor's pre-clip `grad/norm` is the clip's own: keep one.
          out.setdefault(name, value)
    if skipped:
      out["optim/skipped"] = functools.reduce(operator.or_, skipped)
    return out


_monitor.ROLLING_BACK.append(GuardState)  # see warn_if_wrapped


def _refuse_inside(inner_state: Any, max_norm: float | None) -> None:
  """Refuses, at init, what must not sit inside a guard: another guard (its
  spike test would see clipped norms only, and it would take the generic
  path), and, under a clip, the finite-difference penalty, which needs the
  raw gradient (a clip before it is amplified by `strength / radius`)."""
  kinds = (GuardState, _penalties.AddGradientNormPenaltyState)
  found = {type(x) for x in jax.tree.leaves(
      inner_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(x, kinds)}
  if GuardState in found:
    raise ValueError(
        "`guard` got an optimizer that already holds a guard: use one "
        "guard, around the optimizer itself (the inner one would see only "
        "the outer one's clipped gradients, and every metric would come "
        "twice).")
  if max_norm is not None and _penalties.AddGradientNormPenaltyState in found:
    raise ValueError(
        f"`guard` clips the gradients (max_norm={max_norm}) before the "
        "optimizer it wraps, which holds an `add_gradient_norm_penalty`: "
        "that penalty must receive the raw gradients, so put it before the "
        "guard, `optax.chain(og.add_gradient_norm_penalty(...), "
        "og.guard(...))`, or pass max_norm=None.")


def guard(
    inner: optax.GradientTransformation,
    *,
    max_norm: float | None = 1.0,
    skip_nonfinite: bool = True,
    max_consecutive: int | None = None,
    resume_after_halt: bool = False,
    spike_sigma: float | None = 6.0,
    spike_window: int = 128,
    spike_warmup_steps: int | None = None,
    spike_max_consecutive: int | None = 32,
    monitor: bool = True,
    per_layer: bool = True,
    histogram: bool = False,
    zscore: bool = False,
    zscore_decay: float = 0.97,
    loss_ema_decay: float = 0.9,
    axis_name: _stats.AxisName = None,
    stacked: _metrics.Stacked = None,
    groups: _metrics.Groups = None,
) -> optax.GradientTransformationExtraArgs:
  """Full protection around an optimizer: monitor, clip, skip NaN and spikes.

  Equal, step for step (to float32 rounding) and in every decision, to the
  chain of the individual pieces::

    optax.chain(
        og.monitor(per_layer=..., histogram=..., zscore=..., zscore_decay=...,
                   loss_ema_decay=...),
        og.skip_nonfinite(
            og.skip_spikes(
                optax.chain(og.clip_by_global_norm(max_norm), inner),
                sigma=spike_sigma, window=spike_window,
                warmup_steps=spike_warmup_steps,
                max_consecutive=spike_max_consecutive),
            max_consecutive=max_consecutive,
            resume_after_halt=resume_after_halt))

  but the gradients are measured once (one fused read gives the norms, the
  non-finite check, the spike statistic and the clip scale), and the metrics
  come under one set of names: the monitor's, the clip's
  (`grad/norm_clipped`, `optim/num_clipped`), the non-finite skip's
  (`optim/num_skipped`, `optim/halted`, ...), the spike skip's
  (`optim/num_spikes`, ...), and `optim/skipped` for either skip.

  Order of the decisions: a step whose gradients or loss are not finite is
  skipped as non-finite (the spike history does not see it); a finite step
  is then tested for a spike on its pre-clip norm (and loss); a step that
  passes is clipped and handed to `inner`, whose output is checked for NaN
  and Inf too. A skipped step returns exact zeros and leaves `inner`'s state
  bit-identical.

  The update takes the batch's loss as `loss=` (or `value=`, optax's
  name), for the non-finite and spike tests and the monitor's `loss/*`
  entries. Extra arguments are passed on to `inner` (`value=` for
  `optax.lbfgs` or `reduce_on_plateau`, `grad_fn=` for `optax.contrib.sam`
  in its opaque mode); `loss=` and `value=` only where `inner`'s update
  takes them, by name or `**kwargs` (`sam` names its own, and refuses any
  other).

  Two paths, with the same results, metrics and guarantees: for a
  guard-aware optimizer (`og.adamw`, `og.adam`, `og.sgd`, or any
  `GuardAwareTransformation`) the keep/clip decision is handed to the
  optimizer, which folds it into its own elementwise pass: the guard then
  costs one read of the gradients. For any other optax transformation the
  guard runs it on the clipped gradients, reads its update back for NaN/Inf
  and selects between its new and old state: exact, but its `update` is
  traced more than once (see `skip_nonfinite`) and its update is written out
  once more (see the benchmark figures in the README). On the fast path the
  optimizer's output is not read back for NaN: guard-aware optimizers turn
  clipped, finite gradients of finite parameters into finite updates
  (`og.adam` and `og.adamw` refuse an `eps` and `eps_root` that are, or
  round to, 0 in a parameter's dtype, which would make 0/0 of an all-zero
  gradient). A NaN/Inf parameter is past saving: the fast path applies its
  weight decay's NaN/Inf update where the generic path skips it; either way
  the monitor counts it in `param/nonfinite` and `og.check` raises. A
  float16 leaf, in the gradients or in the optimizer's state
  (`mu_dtype=jnp.float16`), takes the generic path whatever the optimizer:
  in float16's range (65504) a finite gradient can make an infinite Adam
  step (where the second moment underflows) or momentum trace, and only the
  generic path reads the update back (a float16 first moment or momentum
  trace that overflows is stored as Inf by a step whose update is still
  finite, and every step after it is skipped). Adam's second moment in
  float16 is another matter: a gradient element of 256 or more squares
  past 65504, and (as in optax) that element's second moment is Inf and its
  update 0 for good, a finite update that nothing skips; a little below
  256 its bias-corrected value, also float16, can overflow on some steps
  (update 0 there). With float16 parameters keep `max_norm` at 200 or
  below (no zero update in 30,000 steps at 220 for `b2` up to 0.99999;
  some at 250), or keep the parameters in bfloat16 or float32. With the
  clip off (`max_norm=None`), gradient elements near the top of the
  parameters' float range can overflow a momentum trace (`og.sgd`) to
  Inf, which the fast path then applies at
  every later step (the trace stays Inf), or Adam's second moment (above
  ~1.8e19 in float32; as in optax, that element's update is then 0 for
  good, with `nesterov=True` too, where optax's is NaN for gradients near
  float32's maximum): keep a clip (the generic path's read-back catches
  the trace's Inf, not the second moment's, whose update is a finite 0).

  Args:
    inner: the optimizer to protect, e.g. `optax.adamw(1e-3)`.
    max_norm: the global-norm clip threshold, `> 0`; None turns clipping
      off.
    skip_nonfinite: skip steps with NaN/Inf gradients, loss or update.
      When False, a NaN/Inf gradient norm or loss is still skipped by the
      spike skip, counted as a spike (unless `spike_sigma=None`), and a
      NaN/Inf that `inner` makes from finite gradients is applied.
    max_consecutive: halt after this many non-finite steps in a row.
    resume_after_halt: whether a finite step after a halt resumes training
      (True needs `max_consecutive`, without which nothing halts).
    spike_sigma: spike threshold in standard deviations; None turns spike
      skipping off.
    spike_window: how many accepted norms (and losses) the history holds.
    spike_warmup_steps: accepted steps before spikes are tested, `>= 2`;
      default `max(2, spike_window // 2)`.
    spike_max_consecutive: after this many spikes in a row the spike
      history is cleared and warms up again, so that a lasting jump of the
      gradient norm is learned rather than skipped for ever; None never
      clears it (see `skip_spikes`).
    monitor: record the monitor's signals (`grad/norm/<layer>`, ...).
    per_layer: record per-layer entries in the monitor.
    histogram: record per-layer log-magnitude histograms.
    zscore: record which layer spiked: each layer's norm as a z-score
      against its own history, and the index of the largest (see
      `monitor`); `og.check` then names that layer when a spike is skipped.
    zscore_decay: decay of the per-layer EMAs behind the z-scores.
    loss_ema_decay: decay of the monitor's loss EMA (`loss/ema`), in
      `[0, 1)`; keep it the same for the whole run (see `monitor`).
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`.
    stacked: the leaves whose leading axis stacks layers (`nn.scan`,
      `nnx.scan`), measured layer by layer in the per-layer metrics (see
      `monitor`).
    groups: a function from a layer name to the name of its group; the
      per-layer metrics are then per group (see `monitor`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `GuardState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.guard(optax.adam(1e-2), max_norm=1.0)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.full(3, 10.0)}, state, params)
    >>> _, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params)
    >>> m = og.metrics(state)
    >>> print(int(m["optim/num_clipped"]), int(m["optim/num_skipped"]))
    1 1

  References:
    See `monitor`, `clip_by_global_norm`, `skip_nonfinite`, `skip_spikes`.
  """
  for name, flag in (("skip_nonfinite", skip_nonfinite),
                     ("resume_after_halt", resume_after_halt),
                     ("monitor", monitor), ("per_layer", per_layer),
                     ("histogram", histogram), ("zscore", zscore)):
    _args.check_bool(name, flag)
  # Every argument is checked, also for a part switched off: a bad value
  # there is a mistake that would surface when the part is switched on.
  if max_norm is not None:
    _args.check_number("max_norm", max_norm, strict=True,
                       at_minimum=_args.CLIP_TO_ZERO_OR_NONE)
  if spike_sigma is not None:
    _args.check_number("spike_sigma", spike_sigma, strict=True)
  unused_arrays = spike_sigma is None and any(
      isinstance(v, (jax.Array, np.ndarray))
      for v in (spike_window, spike_warmup_steps))
  if not unused_arrays:  # `optax.inject_hyperparams` makes arrays of them
    _spikes.check_window(spike_window, spike_warmup_steps,
                         ("spike_window", "spike_warmup_steps"))
  _args.check_int("spike_max_consecutive", spike_max_consecutive, minimum=1,
                  allow_none=True, injectable=True)
  _args.check_int("max_consecutive", max_consecutive, minimum=1,
                  allow_none=True, injectable=True)
  _args.check_number("zscore_decay", zscore_decay, strict=True, maximum=1.0,
                     strict_max=True)
  _args.check_number("loss_ema_decay", loss_ema_decay, maximum=1.0,
                     strict_max=True)
  if not monitor:
    wanted = [name for name, on in (("zscore", zscore),
                                    ("histogram", histogram)) if on]
    if wanted:
      raise ValueError(
          f"`{wanted[0]}=True` asks the monitor for a signal, but "
          "`monitor=False` switches the monitor off; drop one of the two.")
  if not skip_nonfinite:
    # (`max_consecutive` may be an array under `optax.inject_hyperparams`.)
    unused = [f"{name}={value!r}" for name, value, on in (
        ("max_consecutive", max_consecutive, max_consecutive is not None),
        ("resume_after_halt", resume_after_halt,
         not isinstance(resume_after_halt, jax.Array)
         and bool(resume_after_halt)))
              if on]
    if unused:
      raise ValueError(
          f"`{unused[0]}` sets how the non-finite skip halts, but "
          "`skip_nonfinite=False` switches it off; drop one of the two.")
  else:
    _nonfinite.check_halting(max_consecutive, resume_after_halt)
  _stats.check_axis_name(axis_name)
  layers = _metrics.Layers(stacked, groups)
  inner = _skip.check_inner(inner)
  # The pieces, built with the same checks as when used alone.
  parts = dict(
      monitor=_monitor.monitor(per_layer=per_layer, histogram=histogram,
                               zscore=zscore, zscore_decay=zscore_decay,
                               loss_ema_decay=loss_ema_decay,
                               axis_name=axis_name, stacked=stacked,
                               groups=groups) if monitor else None,
      clip=(_clipping.clip_by_global_norm(max_norm, axis_name=axis_name)
            if max_norm is not None else None),
      nonfinite=_nonfinite.skip_nonfinite(
          optax.identity(), max_consecutive=max_consecutive,
          resume_after_halt=resume_after_halt,
          axis_name=axis_name, stacked=stacked,
          groups=groups) if skip_nonfinite else None,
      spikes=_spikes.skip_spikes(
          optax.identity(), sigma=spike_sigma, window=spike_window,
          warmup_steps=spike_warmup_steps,
          max_consecutive=spike_max_consecutive,
          axis_name=axis_name) if spike_sigma is not None else None)
  min_count = (_spikes.min_count(spike_window, spike_warmup_steps)
               if spike_sigma is not None else None)

  def init_fn(params):
    if max_norm is not None:  # named as the user wrote it, before its part
      _clipping.check_scalable(params, f"guard's clip (max_norm={max_norm})")
    inner_state = inner.init(params)
    _refuse_inside(inner_state, max_norm)
    _monitor.warn_if_wrapped(inner_state, "guard")
    return GuardState(inner_state=inner_state, **{
        name: None if part is None else part.init(params)
        for name, part in parts.items()})

  def update_fn(updates, state, params=None, **extra_args):
    for name, part in parts.items():
      if (getattr(state, name) is None) != (part is None):
        raise ValueError(
            f"The guard's state {'has no' if part else 'has a'} `{name}` "
            f"part, but this guard was built with it "
            f"{'on' if part else 'off'}; {_args.OTHER_CONFIGURATION}")
    if monitor:
      _monitor.check_fields(state.monitor, per_layer=per_layer,
                            histogram=histogram, zscore=zscore,
                            factory="guard")
    if spike_sigma is not None:
      _spikes.check_history(state.spikes.norms, spike_window, "guard",
                            "spike_window")
    fast = _skip.takes_decision(inner, updates, state.inner_state)
    # Before `layers.of`, whose `stacked=` would blame the parameters.
    if skip_nonfinite:
      layers.check(updates, state.nonfinite.last_bad_counts.names, "guard")
    elif monitor:
      _monitor.check_layers(state.monitor, updates, layers)
    layout = layers.of(updates)
    stats = _stats.tree_stats(updates, axis_name=axis_name,
                              count_above=1.0 if monitor else None,
                              stacked=layout.stacked, groups=layout.groups)
    norm = stats.global_norm
    loss = _skip.loss_from(extra_args, axis_name)
    extra_args = _skip.for_inner(inner, extra_args)
    new = state._replace()
    if monitor:
      new = new._replace(monitor=_monitor.record(
          state.monitor, stats, updates, params, loss, per_layer=per_layer,
          histogram=histogram, loss_ema_decay=loss_ema_decay,
          axis_name=axis_name, layers=layers,
          zscore_decay=zscore_decay if zscore else None)._replace(
              step=optax.safe_increment(state.monitor.step)))
    spike = jnp.zeros((), jnp.bool_)
    if spike_sigma is not None:
      spike, spikes_state = _spikes.decide(
          state.spikes, norm, loss, sigma=spike_sigma, min_count=min_count,
          max_consecutive=spike_max_consecutive)
    # Without a clip nothing is scaled (not even by 1: every factor handed
    # to the optimizer is compiled into each leaf's kernel).
    factors = (None if max_norm is None else
               _clipping.clip_factors(norm, max_norm))
    loss_ok = jnp.ones((), jnp.bool_) if loss is None else jnp.isfinite(loss)

    def decide_finite(inner_ok=None, inner_nonfinite=None):
      if inner_ok is None:  # the fast path: the update is not read back
        inner_ok = jnp.ones((), jnp.bool_)
      return _nonfinite.decide(
          state.nonfinite, stats=stats, loss_ok=loss_ok,
          # As in the chain: a spike's zero update counts as finite.
          inner_ok=spike | inner_ok, inner_nonfinite=inner_nonfinite,
          max_consecutive=max_consecutive,
          resume_after_halt=resume_after_halt)

    if fast:
      # The optimizer takes the decision inside its own pass (see
      # `GuardAwareTransformation`); its output is not read again.
      keep = ~spike
      if skip_nonfinite:
        keep_finite, nonfinite_state = decide_finite()
        keep = keep & keep_finite
      new_updates, new_inner = inner.update(
          updates, state.inner_state, params, guard_keep=keep,
          guard_scale=factors, **extra_args)
    else:
      if skip_nonfinite:
        # The inner update is read back for NaN/Inf (see `update_checked`).
        def decide_with(inner_ok, inner_nonfinite):
          keep_finite, nonfinite_state = decide_finite(inner_ok,
                                                       inner_nonfinite)
          return ~spike & keep_finite, keep_finite, nonfinite_state

        new_updates, new_inner, (keep, keep_finite, nonfinite_state) = (
            _skip.update_checked(inner, updates, state.inner_state, params,
                                 extra_args, decide_with, axis_name,
                                 layout, scale=factors))
      else:
        keep = ~spike
        if spike_sigma is None:  # nothing to skip
          new_updates, new_inner = inner.update(
              (updates if factors is None else
               _clipping.scale_tree(updates, factors)),
              state.inner_state, params, **extra_args)
        else:
          new_updates, new_inner = _skip.update_unless(
              inner, updates, state.inner_state, params, extra_args, keep,
              axis_name, layout.stacked, scale=factors)
    if skip_nonfinite:
      new = new._replace(nonfinite=nonfinite_state)
      if spike_sigma is not None:
        # As in the chain, the spike history does not see a non-finite step;
        # unlike it, the step counter does, so that `last_spike_step` is the
        # training step (in the chain, the steps that reached `skip_spikes`).
        spikes_state = _skip.select_tree(
            keep_finite, spikes_state,
            state.spikes._replace(step=spikes_state.step))
    if spike_sigma is not None:
      new = new._replace(spikes=spikes_state)
    if max_norm is not None:
      new = new._replace(clip=_skip.select_tree(
          keep, _clipping.record_global_clip(state.clip, norm, factors),
          state.clip))
    if monitor and params is not None:
      new_updates = _monitor.after_params_read(new_updates, new.monitor)
    return new_updates, new._replace(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))

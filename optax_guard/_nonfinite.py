"""Defences against NaN and Inf: skip the step, or zero the bad elements."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_guard import _args
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _monitor
from optax_guard import _skip
from optax_guard import _stats

# Why the last bad step was bad (`last_bad_reason`).
(REASON_NONE, REASON_GRADS, REASON_INNER, REASON_LOSS,
 REASON_OVERFLOW) = range(5)
REASONS = {REASON_NONE: "none", REASON_GRADS: "non-finite gradients",
           REASON_INNER: "non-finite output of the inner optimizer",
           REASON_LOSS: "non-finite loss",
           REASON_OVERFLOW: "finite gradients whose global norm overflows "
                            "float32"}


class SkipNonfiniteState(NamedTuple):
  """State of `skip_nonfinite`: the inner state and what was skipped.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.skip_nonfinite(optax.sgd(0.1))
    >>> _, state = tx.update({"w": jnp.array([1.0, jnp.nan])},
    ...                      tx.init(params), params)
    >>> print(state.skipped, state.num_skipped, state.last_bad_step)
    True 1 0

  References:
    Made by `skip_nonfinite` (see its references); `og.metrics` reads it; `og.check` raises on it.
  """
  inner_state: Any                   # the wrapped transformation's state.
  step: jax.Array                    # i32[] updates seen.
  skipped: jax.Array                 # bool[] the last step was skipped.
  num_skipped: jax.Array             # i32[] steps skipped so far.
  consecutive: jax.Array             # i32[] bad steps in a row, now.
  first_bad_step: jax.Array          # i32[] index of the first bad step, -1.
  last_bad_step: jax.Array           # i32[] index of the last bad step, -1.
  last_bad_reason: jax.Array         # i32[] REASON_* of the last bad step.
  last_bad_counts: _metrics.PerLayer  # i32[L] NaN/Inf per layer, last bad.
  halted: jax.Array                  # bool[] stopped after max_consecutive.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {
        "optim/skipped": self.skipped,
        "optim/num_skipped": self.num_skipped,
        "optim/consecutive_skipped": self.consecutive,
        "optim/first_bad_step": self.first_bad_step,
        "optim/last_bad_step": self.last_bad_step,
        "optim/last_bad_reason": self.last_bad_reason,
        **_metrics.expand("optim/last_bad_nonfinite", self.last_bad_counts),
        "optim/halted": self.halted,
    }


_monitor.ROLLING_BACK.append(SkipNonfiniteState)  # see warn_if_wrapped


def decide(state: SkipNonfiniteState, *, stats: _stats.TreeStats,
           loss_ok: jax.Array, inner_ok: jax.Array,
           inner_nonfinite: jax.Array | None,
           max_consecutive: int | None,
           resume_after_halt: bool) -> tuple[jax.Array, SkipNonfiniteState]:
  """The skip decision and the new counters (`inner_state` left as it was).

  Shared by `skip_nonfinite` and `guard`, which measure the flags once.

  Returns:
    `(keep, state)`: `keep` is true when the step may be applied.
  """
  grads_ok = stats.finite & ~stats.norm_overflows
  ok = grads_ok & loss_ok & inner_ok
  halted = state.halted
  if resume_after_halt:
    halted = halted & ~ok
  consecutive = jnp.where(ok, 0, optax.safe_increment(state.consecutive))
  if max_consecutive is not None:
    halted = halted | (consecutive >= max_consecutive)
  keep = ok & ~halted
  bad = ~ok
  reason = jnp.where(~stats.finite, REASON_GRADS,
                     jnp.where(stats.norm_overflows, REASON_OVERFLOW,
                               jnp.where(~loss_ok, REASON_LOSS,
                                         REASON_INNER)))
  # Per-layer counts of whatever was bad: the gradients', else the update's
  # where that was the reason (not beside a bad loss or an overflowing norm,
  # whose update is never applied, nor a spike's, in `guard`).
  counts = stats.nonfinite
  if inner_nonfinite is not None:
    counts = jnp.where(grads_ok & loss_ok & ~inner_ok, inner_nonfinite, counts)
  return keep, state._replace(
      step=optax.safe_increment(state.step),
      skipped=~keep,
      num_skipped=_stats.count_if(~keep, state.num_skipped),
      consecutive=consecutive,
      first_bad_step=jnp.where(bad & (state.first_bad_step < 0), state.step,
                               state.first_bad_step),
      last_bad_step=jnp.where(bad, state.step, state.last_bad_step),
      last_bad_reason=jnp.where(bad, reason, state.last_bad_reason),
      last_bad_counts=_metrics.PerLayer(
          jnp.where(bad, counts, state.last_bad_counts.values),
          state.last_bad_counts.names),
      halted=halted)


def check_halting(max_consecutive: Any, resume_after_halt: Any) -> None:
  """Refuses `resume_after_halt=True` where nothing halts (a no-op)."""
  if max_consecutive is None and resume_after_halt:
    raise ValueError(
        "`resume_after_halt=True` sets how a halt ends, but "
        "`max_consecutive=None` never halts; set `max_consecutive` (the bad "
        "steps in a row that halt training) or drop `resume_after_halt`.")


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive: int | None = None,
    resume_after_halt: bool = False,
    axis_name: _stats.AxisName = None,
    stacked: _metrics.Stacked = None,
    groups: _metrics.Groups = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose gradients, loss or inner update hold NaN or Inf.

  A step is bad when any gradient element is not finite, when their global
  norm is not (float32 overflow), when the `loss=` (or `value=`) extra argument
  is not finite, or when `inner` turns finite gradients into a non-finite
  update (a division by zero, say). A bad step returns an update of exact
  zeros and leaves `inner`'s state bit-identical (Adam's moments and count do
  not move); the guard's own counters advance.

  After `max_consecutive` bad steps in a row it halts: it keeps returning zero
  updates and sets `halted` (`optim/halted`). Unlike `optax.apply_if_finite`,
  it never applies a non-finite update, so the optimizer state is never
  poisoned. A finite step after a halt does not resume training unless
  `resume_after_halt=True`; otherwise the halt lasts until the state is
  re-initialised, so a run that went bad cannot silently carry on.

  With `axis_name`, the decision is taken on global statistics, so one
  device's NaN makes every device skip and the replicas stay bit-identical.

  Around a guard-aware optimizer (`og.adamw`, `og.adam`, `og.sgd`) the skip
  rides inside the optimizer's own pass (see `GuardAwareTransformation`),
  which costs nothing; its output is then not read back for NaN (unless a
  leaf is float16, see `og.guard`). Around any other optimizer its `update`
  is traced twice: once for the update, which is checked and returned, and
  once for the state, on the gradients made zeros on a skip, so that XLA
  can update the state in place. On the CPU a
  large update's NaN/Inf are counted per layer, on a bad step only, by a
  third run (a callback inside it would fire two or three times).

  How it compares to `optax.apply_if_finite`: the same skip, plus the
  inner-output and loss checks, per-layer counts of the last bad step (which
  layer went bad), the first and last bad step indices, a halt that does not
  poison the state, and replica-consistent decisions.

  Args:
    inner: the transformation to protect (usually the whole optimizer).
    max_consecutive: halt after this many bad steps in a row; None never
      halts.
    resume_after_halt: whether a finite step after a halt resumes training
      (True needs `max_consecutive`, without which nothing halts).
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`.
    stacked: the leaves whose leading axis stacks layers, counted layer by
      layer (see `monitor`).
    groups: a function from a layer name to the name of its group; the
      per-layer counts are then summed per group (see `monitor`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipNonfiniteState` (metrics `optim/skipped`, `optim/num_skipped`,
    `optim/consecutive_skipped`, `optim/first_bad_step`,
    `optim/last_bad_step`, `optim/last_bad_reason` (0 none, 1 non-finite
    gradients, 2 non-finite inner update, 3 non-finite loss, 4 global norm
    overflowing float32),
    `optim/last_bad_nonfinite/<layer>`, `optim/halted`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_nonfinite(optax.adam(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state,
    ...                            params)
    >>> print(updates["w"], int(state.num_skipped))
    [0. 0.] 1

  References:
    optax's `apply_if_finite`; Chowdhery et al., 2022, "PaLM: Scaling
    Language Modeling with Pathways" (https://arxiv.org/abs/2204.02311), on
    skipping bad batches.
  """
  _args.check_int("max_consecutive", max_consecutive, minimum=1,
                  allow_none=True, injectable=True)
  _args.check_bool("resume_after_halt", resume_after_halt)
  check_halting(max_consecutive, resume_after_halt)
  _stats.check_axis_name(axis_name)
  layers = _metrics.Layers(stacked, groups)
  inner = _skip.check_inner(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    _monitor.warn_if_wrapped(inner_state, "skip_nonfinite")
    i32 = lambda v: jnp.full((), v, jnp.int32)
    return SkipNonfiniteState(
        inner_state=inner_state, step=i32(0),
        skipped=jnp.zeros((), jnp.bool_), num_skipped=i32(0),
        consecutive=i32(0), first_bad_step=i32(-1), last_bad_step=i32(-1),
        last_bad_reason=i32(REASON_NONE),
        last_bad_counts=_metrics.per_layer_zeros(
            layers.names(params), jnp.int32),
        halted=jnp.zeros((), jnp.bool_))

  def update_fn(updates, state, params=None, **extra_args):
    layers.check(updates, state.last_bad_counts.names, "skip_nonfinite")
    layout = layers.of(updates)
    stats = _stats.tree_stats(updates, axis_name=axis_name,
                              stacked=layout.stacked, groups=layout.groups)
    loss = _skip.loss_from(extra_args, axis_name)
    extra_args = _skip.for_inner(inner, extra_args)
    loss_ok = (jnp.ones((), jnp.bool_) if loss is None else
               jnp.isfinite(loss))
    if _skip.takes_decision(inner, updates, state.inner_state):
      # The fast path: the optimizer takes the decision in its own pass.
      keep, new_state = decide(
          state, stats=stats, loss_ok=loss_ok, inner_ok=jnp.ones((), jnp.bool_),
          inner_nonfinite=None, max_consecutive=max_consecutive,
          resume_after_halt=resume_after_halt)
      new_updates, new_inner = inner.update(
          updates, state.inner_state, params, guard_keep=keep, **extra_args)
      return new_updates, new_state._replace(inner_state=new_inner)
    new_updates, new_inner, (_, new_state) = _skip.update_checked(
        inner, updates, state.inner_state, params, extra_args,
        lambda inner_ok, inner_nonfinite: decide(
            state, stats=stats, loss_ok=loss_ok, inner_ok=inner_ok,
            inner_nonfinite=inner_nonfinite, max_consecutive=max_consecutive,
            resume_after_halt=resume_after_halt), axis_name, layout)
    return new_updates, new_state._replace(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


class ZeroNonfiniteState(NamedTuple):
  """State of `zero_nonfinite`: the elements it replaced, per layer.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.zero_nonfinite()
    >>> grads = {"w": jnp.array([1.0, jnp.inf, jnp.nan])}
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> print(og.metrics(state)["grad/nonfinite_zeroed/w"], state.num_steps)
    2 1

  References:
    Made by `zero_nonfinite` (see its references); `og.metrics` reads it.
  """
  replaced: _metrics.PerLayer  # i32[L] elements replaced per layer, last step.
  num_steps: jax.Array         # i32[] steps on which anything was replaced.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {
        "grad/nonfinite_zeroed": _stats.total_count(
            _metrics.unwrap(self.replaced.values)),
        **_metrics.expand("grad/nonfinite_zeroed", self.replaced),
        "optim/num_zeroed_steps": self.num_steps,
    }


def zero_nonfinite(
    *, axis_name: _stats.AxisName = None
) -> optax.GradientTransformationExtraArgs:
  """Replaces NaN, +Inf and -Inf elements by zero, counting them per layer.

  `optax.zero_nans` leaves ±Inf in place; this replaces all three. Use it when
  a few bad elements should not cost the whole step; prefer `skip_nonfinite`
  when a NaN means the step's gradients cannot be trusted at all.

  Args:
    axis_name: mesh axis name(s) over which the counts are summed, for the
      leaves that vary along them inside `shard_map`; under `pmap` (or
      `check_vma=False`) each leaf is taken as replicated and the count is
      the largest device's (see the user guide's multi-device section).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ZeroNonfiniteState` (metrics `grad/nonfinite_zeroed`,
    `grad/nonfinite_zeroed/<layer>`, `optim/num_zeroed_steps`).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.zero_nonfinite()
    >>> grads = {"w": jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf])}
    >>> out, state = tx.update(grads, tx.init(grads))
    >>> print(out["w"], int(og.metrics(state)["grad/nonfinite_zeroed"]))
    [1. 0. 0. 0.] 3

  References:
    optax's `zero_nans`.
  """
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    return ZeroNonfiniteState(
        replaced=_metrics.per_layer_zeros(_metrics.layer_names(params),
                                          jnp.int32),
        num_steps=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _metrics.check_layers(updates, state.replaced.names, "zero_nonfinite")
    counts = _stats.tree_stats(updates, axis_name=axis_name).nonfinite
    return _stats.nonfinite_to_zero(updates), ZeroNonfiniteState(
        replaced=_metrics.PerLayer(counts, state.replaced.names),
        num_steps=_stats.count_if(jnp.any(counts > 0), state.num_steps))

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


def skip_nonfinite_microbatch(
    *, axis_name: _stats.AxisName = None
) -> Callable[[Any, Any, Any], tuple[jax.Array, dict[str, jax.Array]]]:
  """`optax.MultiSteps`' skip function for NaN/Inf, agreed over devices.

  `optax.MultiSteps(..., should_skip_update_fn=optax.skip_not_finite)` drops
  a micro-batch with a NaN/Inf gradient, so that it does not stay in the
  accumulator; but `optax.skip_not_finite` looks at the local values only.
  Where the gradients are sharded over devices (FSDP, tensor parallelism),
  a NaN in one device's shard then makes that device alone skip: the
  devices take different branches of MultiSteps' `lax.cond`, and the
  collectives inside the guard it wraps wait forever (or `shard_map`
  refuses a skip state that varies by device). This one counts the
  non-finite elements over the devices (`axis_name`, as given to the
  guard), so that every device drops the micro-batch together. Its
  decision and count keep optax's names (`should_skip`, `num_not_finite`),
  which `og.metrics` reports as `optim/microbatch_skipped` and
  `grad/microbatch_nonfinite` where MultiSteps wraps an optax_guard
  transformation (a guard; around a bare optimizer, og.adamw's included,
  they are optax's state, not read).

  Args:
    axis_name: mesh axis name(s) over which the gradients are sharded or
      differ, inside `shard_map` or `pmap`; None: the local values, as
      `optax.skip_not_finite`. Where the axes are not bound (a MultiSteps
      `init` outside the map or in a `pmap` without them, a misspelt name),
      the count is over the axes the enclosing `shard_map` or `pmap` binds,
      or local outside any: every device decides alike either way.
      Under `pmap` or `shard_map(check_vma=False)`, where values carry no
      sharding types, the count is the largest device's (each leaf taken
      as replicated, see the user guide's multi-device section); the
      decision is the same on every device either way.

  Returns:
    A function `(updates, gradient_step, params) -> (should_skip, info)`
    for `optax.MultiSteps(should_skip_update_fn=...)`: `should_skip` a
    bool scalar, `info` a dict of `should_skip` and `num_not_finite` (the
    int32 count of NaN/Inf elements).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = optax.MultiSteps(
    ...     og.guard(og.adamw(1e-3)), every_k_schedule=2,
    ...     should_skip_update_fn=og.skip_nonfinite_microbatch())
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, jnp.nan, jnp.inf])},
    ...                      state, params)
    >>> m = og.metrics(state)
    >>> print(bool(m["optim/microbatch_skipped"]),
    ...       int(m["grad/microbatch_nonfinite"]))
    True 2

  References:
    optax's `skip_not_finite` and `MultiSteps`.
  """
  _stats.check_axis_name(axis_name)

  def should_skip_update(updates, gradient_step, params):
    del gradient_step, params
    # Unbound: a MultiSteps init (zeros: any count is the count), or a
    # name that is not the map's (misspelt). Counted over the axes the map
    # binds, every device decides alike: counted locally, one device had
    # dropped a micro-batch alone, and the others waited for it in the
    # guard's all-reduce until XLA aborted. Outside any map: locally.
    axes = (axis_name if _stats.any_axis_bound(axis_name) else
            _stats.bound_axes() or None)
    count = _stats.total_count(
        _stats.tree_stats(updates, axis_name=axes).nonfinite)
    skip = count > 0
    return skip, {"should_skip": skip, "num_not_finite": count}

  return should_skip_update


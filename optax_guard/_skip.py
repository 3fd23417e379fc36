"""Running an inner transformation and keeping its state on a skipped step.

The one place that decides how a skip is carried out, shared by
`skip_nonfinite`, `skip_spikes` and `guard`.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import optax

from optax_guard import _clipping
from optax_guard import _metrics
from optax_guard import _optimizers
from optax_guard import _stats


def for_inner(inner: optax.GradientTransformation,
              extra_args: dict[str, Any]) -> dict[str, Any]:
  """The extra arguments a wrapper passes on to `inner.update`: all of them,
  but `loss=` and `value=` (which the wrapper reads itself) only where that
  update can take them, by name or through `**kwargs`. An update that
  names its own (optax's `sam`) refuses any other keyword, so with it no
  loss could reach the wrapper at all."""
  if not {"loss", "value"} & extra_args.keys():
    return extra_args
  try:
    parameters = inspect.signature(inner.update).parameters.values()
  except (TypeError, ValueError):  # no signature to read: pass all on
    return extra_args
  if any(p.kind == p.VAR_KEYWORD for p in parameters):
    return extra_args
  named = {p.name for p in parameters
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  return {k: v for k, v in extra_args.items()
          if k in named or k not in ("loss", "value")}


def loss_from(extra_args: dict[str, Any],
              axis_name: _stats.AxisName) -> jax.Array | None:
  """The loss passed as `loss=` (or `value=`, optax's line-search name), as
  every device agrees on it (`global_loss`), or None."""
  name = "loss" if "loss" in extra_args else "value"
  loss = extra_args.get(name)
  if loss is None:
    return None
  try:
    loss = jnp.asarray(loss)
  except (TypeError, ValueError):
    loss = None
  if loss is None or loss.size != 1 or not (
      jnp.issubdtype(loss.dtype, jnp.integer) or
      jnp.issubdtype(loss.dtype, jnp.floating)):
    what = (f"an array of shape {loss.shape}" if loss is not None and
            loss.size != 1 else f"a {type(extra_args[name]).__name__} "
            f"({repr(extra_args[name])[:60]})")
    raise ValueError(
        f"`{name}=` must be this batch's loss, one real number, but got "
        f"{what}: reduce a per-example or per-token loss as your objective "
        "does (a masked mean, say) and pass that; with "
        "`jax.value_and_grad(..., has_aux=True)`, pass the loss, not the "
        "(loss, aux) pair.")
  return global_loss(loss.reshape(()).astype(jnp.float32), axis_name)


def global_loss(loss: jax.Array, axis_name: _stats.AxisName) -> jax.Array:
  """The loss every device agrees on.

  Inside `shard_map` a per-device (varying) loss is averaged over the devices;
  under `pmap`, where nothing is typed, the devices agree on the largest loss,
  or on a non-finite one where any device has one (the worst device decides,
  as for every statistic there).
  """
  _stats.check_varying_covered(loss, axis_name, "loss (`loss=`)")
  return _stats.all_reduce([loss], axis_name, "mean")[0]


def check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
  if not hasattr(inner, "init") or not hasattr(inner, "update"):
    raise ValueError(
        "`inner` must be an optax GradientTransformation (with `init` and "
        f"`update`), but got {inner!r}.")
  return optax.with_extra_args_support(inner)


def is_guard_aware(inner: Any) -> bool:
  """Whether `inner` takes the `guard_keep`/`guard_scale` protocol."""
  return isinstance(inner, _optimizers.GuardAwareTransformation)


def takes_decision(inner: Any, updates: Any, inner_state: Any) -> bool:
  """Whether a skip on NaN/Inf may ride inside `inner`'s own pass, without
  reading its update back: `inner` is guard-aware and no leaf of the
  gradients or of its state is float16.

  In float16's range (65504) finite, clipped gradients can still make an
  infinite update: Adam's quotient where the second moment underflows, a
  momentum trace (`mu_dtype` or `accumulator_dtype` float16 on float32
  parameters too). Those take the read-back of the generic path.
  """
  return is_guard_aware(inner) and not any(
      jnp.result_type(x) == jnp.float16
      for x in jax.tree.leaves((updates, inner_state)))


# On the CPU, above this many elements in an opaque optimizer's update, the
# per-layer NaN/Inf counts of a bad step come from running it once more
# rather than from the update itself, which XLA would then keep as a second
# parameter-sized temporary (see `update_checked`). Below, the temporary is
# cheap and the third run not worth its compile time (+45% at 1,000 leaves).
RECOUNT_ABOVE = 1 << 22


def update_checked(inner: optax.GradientTransformationExtraArgs,
                   updates: Any, inner_state: Any, params: Any,
                   extra_args: dict[str, Any], decide: Any,
                   axis_name: _stats.AxisName,
                   layout: _metrics.Layout | None = None,
                   scale: tuple[jax.Array, jax.Array] | None = None
                   ) -> tuple[Any, Any, Any]:
  """Runs an opaque `inner`, reads its update back, and skips it exactly.

  `inner` sees `updates` multiplied by the clip factors `scale`, if given.
  `decide(inner_ok, inner_nonfinite)` takes whether the update `inner`
  makes is finite and the NaN/Inf elements in each of its layers, and
  returns `(keep, anything)`. On a kept step the result is `inner`'s own
  update and state; on a skip, exact zeros and `inner_state` unchanged.

  `inner` runs twice: the first run gives the update, measured and
  returned; the second, on the same gradients made exact zeros on a skip,
  gives the state, which is selected. The select is then the old state's
  last reader (everything else that reads it feeds `keep`), so XLA updates
  the moments in place; one run whose state was selected made XLA copy them
  all first (twice the parameters' bytes for Adam).

  On the CPU every parameter-sized temporary is allocated afresh at each
  step, and first touching its pages costs more than a pass over it, so the
  update is the one such temporary, read by a fused NaN/Inf check and by
  the parameter update. The per-layer counts (for the metrics) are taken
  under a `lax.cond` on a bad step only, from a third run of `inner` on the
  step's own inputs when the update is large (`RECOUNT_ABOVE`): the update
  as an operand of the `cond` made XLA keep a second temporary. Elsewhere
  the update is measured in one fused pass, and a `cond` would cost a
  device-to-host copy of its predicate every step.
  See "the generic path" in benchmarks/README.md.

  Returns:
    `(updates, inner_state, decision)`, `decision` as `decide` returned it.
  """
  stacked = None if layout is None else layout.stacked
  groups = None if layout is None else layout.groups
  run = _runner(inner, inner_state, params, extra_args, scale)

  def count_nonfinite(update):
    return _stats.tree_stats(update, axis_name=axis_name, stacked=stacked,
                             groups=groups, full=True).nonfinite

  probe, _ = run(updates)
  none_counted = jnp.zeros(jax.eval_shape(count_nonfinite, probe).shape,
                           jnp.int32)

  def on_cpu():
    flagged = _stats.any_nonfinite(probe, axis_name=axis_name,
                                   stacked=stacked)
    if sum(x.size for x in jax.tree.leaves(probe)) > RECOUNT_ABOVE:
      counts = lax.cond(flagged, lambda: count_nonfinite(run(updates)[0]),
                        lambda: none_counted)
    else:
      counts = lax.cond(flagged, count_nonfinite, lambda _: none_counted,
                        probe)
    return flagged, counts

  def elsewhere():
    counts = count_nonfinite(probe)
    return jnp.any(counts > 0), counts

  flagged, counts = lax.platform_dependent(cpu=on_cpu, default=elsewhere)
  # Both feed `keep`: that orders the third run (which reads the old state)
  # before the select that overwrites it.
  decision = decide(~flagged & jnp.all(counts == 0), counts)
  updates, inner_state = _select_runs(run, updates, probe, inner_state,
                                      decision[0])
  return updates, inner_state, decision


def update_unless(inner: optax.GradientTransformationExtraArgs,
                  updates: Any, inner_state: Any, params: Any,
                  extra_args: dict[str, Any], keep: jax.Array,
                  axis_name: _stats.AxisName,
                  stacked: Any = None,
                  scale: tuple[jax.Array, jax.Array] | None = None
                  ) -> tuple[Any, Any]:
  """Runs an opaque `inner` and skips it exactly unless `keep`.

  For a decision taken before `inner` runs (a spike): on a kept step the
  result is `inner`'s own update and state, NaN/Inf included; on a skip,
  exact zeros and `inner_state` unchanged. `inner` sees `updates`
  multiplied by the clip factors `scale`, if given.

  The two runs of `update_checked`, and its read-back too, although here
  nothing depends on what it finds: selecting the state of one run, or of
  two whose update nothing orders before the select, made XLA copy every
  moment buffer (twice the parameters' bytes for Adam). The read-back
  gives `keep` a dependence on the whole update that XLA cannot fold away
  (`flagged | ~flagged` is always true, but XLA does not simplify it), so
  the update is computed, and its reads of the old state done, before the
  select overwrites that state in place.

  Returns:
    `(updates, inner_state)`.
  """
  run = _runner(inner, inner_state, params, extra_args, scale)
  probe, _ = run(updates)
  flagged = _stats.any_nonfinite(probe, axis_name=axis_name, stacked=stacked)
  return _select_runs(run, updates, probe, inner_state,
                      keep & (flagged | ~flagged))


def _runner(inner: optax.GradientTransformationExtraArgs, inner_state: Any,
            params: Any, extra_args: dict[str, Any],
            scale: tuple[jax.Array, jax.Array] | None) -> Any:
  """`grads -> inner.update(grads * scale, inner_state, params, ...)`, with
  NaN/Inf gradient elements read as 0.

  A step whose gradients hold NaN/Inf is skipped whatever `inner` makes of
  them, so the zeros change no result. They keep reverse-mode derivatives
  finite: `inner`'s derivatives at a NaN gradient are NaN, and the zero
  cotangent of the discarded update times NaN is NaN again, which would
  reach every derivative of an unrolled run (`optax.apply_if_finite` avoids
  it with a `lax.cond`). The select fuses into `inner`'s kernels.
  """
  def run(grads):
    grads = _stats.nonfinite_to_zero(grads)
    if scale is not None:
      grads = _clipping.scale_tree(grads, scale)
    return inner.update(grads, inner_state, params, **extra_args)
  return run


def _select_runs(run: Any, updates: Any, probe: Any, inner_state: Any,
                 keep: jax.Array) -> tuple[Any, Any]:
  """The first run's update and the second run's state, or an exact skip."""
  _, new_state = run(zeros_unless(keep, updates))
  return (zeros_unless(keep, probe),
          select_tree(keep, new_state, inner_state))


def select_tree(keep: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `keep` holds, else `old`, leaf by leaf (bit-exact)."""
  keep = _stats.computed_once(keep)  # not once per leaf's kernel
  return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


def zeros_unless(keep: jax.Array, tree: Any) -> Any:
  """The tree where `keep` holds, exact zeros (never NaN) otherwise."""
  keep = _stats.computed_once(keep)  # not once per leaf's kernel
  return jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), tree)

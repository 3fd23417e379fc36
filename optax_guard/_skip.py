"""Running an inner transformation and keeping its state on a skipped step.

The one place that decides how a skip is carried out, shared by
`skip_nonfinite`, `skip_spikes` and `guard`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_guard import _metrics
from optax_guard import _optimizers
from optax_guard import _stats


def loss_from(extra_args: dict[str, Any]) -> jax.Array | None:
  """The loss passed as `loss=` (or `value=`, optax's line-search name)."""
  loss = extra_args.get("loss", extra_args.get("value"))
  if loss is None:
    return None
  return jnp.mean(jnp.asarray(loss).astype(jnp.float32))


def global_loss(loss: jax.Array, axis_name: _stats.AxisName) -> jax.Array:
  """The loss every device agrees on.

  Inside `shard_map` a per-device (varying) loss is averaged over the devices;
  under `pmap`, where nothing is typed, the devices agree on the largest loss
  (the worst device decides, as for every statistic there).
  """
  return _stats.all_reduce([loss], [loss], axis_name, "mean")[0]


def check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
  if not hasattr(inner, "init") or not hasattr(inner, "update"):
    raise ValueError(
        "`inner` must be an optax GradientTransformation (with `init` and "
        f"`update`), but got {inner!r}.")
  return optax.with_extra_args_support(inner)


def is_guard_aware(inner: Any) -> bool:
  """Whether `inner` takes the `guard_keep`/`guard_scale` protocol."""
  return isinstance(inner, _optimizers.GuardAwareTransformation)


def update_checked(inner: optax.GradientTransformationExtraArgs,
                   updates: Any, inner_state: Any, params: Any,
                   extra_args: dict[str, Any], decide: Any,
                   axis_name: _stats.AxisName,
                   layout: _metrics.Layout | None = None
                   ) -> tuple[Any, Any, Any]:
  """Runs an opaque `inner`, reads its update back, and skips it exactly.

  `decide(inner_stats)` takes the `TreeStats` of the update `inner` makes
  from `updates` and returns `(keep, anything)`. On a kept step the result
  is `inner`'s own update and state; on a skip, exact zeros and
  `inner_state` unchanged.

  `inner` is run twice, and the second run's update is never used: the first
  run gives the update, which is measured and returned; the second gives the
  state, from the same gradients (exact zeros on a skip). One run whose new
  state is then selected made XLA read the old state buffers both for the
  update and for the select, so it copied every one of them first (the
  moments of Adam, twice the parameters' bytes, on every step); here the
  update is written out once for its measurement, and the select is the old
  state's last reader, so it updates the buffers in place (see "the generic
  path" in benchmarks/README.md).

  Returns:
    `(updates, inner_state, decision)`, `decision` as `decide` returned it.
  """
  probe, _ = inner.update(updates, inner_state, params, **extra_args)
  decision = decide(_stats.tree_stats(
      probe, axis_name=axis_name,
      stacked=None if layout is None else layout.stacked,
      groups=None if layout is None else layout.groups))
  keep = decision[0]
  _, new_state = inner.update(zeros_unless(keep, updates), inner_state,
                              params, **extra_args)
  return (zeros_unless(keep, probe),
          select_tree(keep, new_state, inner_state), decision)


def select_tree(keep: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `keep` holds, else `old`, leaf by leaf (bit-exact)."""
  keep = _stats.computed_once(keep)  # not once per leaf's kernel
  return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


def zeros_unless(keep: jax.Array, tree: Any) -> Any:
  """The tree where `keep` holds, exact zeros (never NaN) otherwise."""
  keep = _stats.computed_once(keep)  # not once per leaf's kernel
  return jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), tree)

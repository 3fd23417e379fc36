"""Running an inner transformation and keeping its state on a skipped step.

The one place that decides how a skip is carried out, shared by
`skip_nonfinite`, `skip_spikes` and `guard`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

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


def select_tree(keep: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `keep` holds, else `old`, leaf by leaf (bit-exact)."""
  keep = _stats.computed_once(keep)  # not once per leaf's kernel
  return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


def zeros_unless(keep: jax.Array, tree: Any) -> Any:
  """The tree where `keep` holds, exact zeros (never NaN) otherwise."""
  keep = _stats.computed_once(keep)  # not once per leaf's kernel
  return jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), tree)

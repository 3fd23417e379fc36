"""Eager calls (outside any trace): what they compile.

Called outside `jax.jit`, every `lax.cond` and `lax.reduce` of the
statistics compiles anew on each call: JAX caches such a program on the
identity of its branch or reducer, and those are closures made in the call.
An eager step of `og.guard(og.adamw)` then compiled 10-46 programs per step
(0.6-5.5 s, against ~1 ms for optax's chain), and memory grew by MiBs per
step. An eager call therefore runs the whole `update` as one program,
compiled once per transformation and argument signature, as a jitted step
would (`compiled_when_eager`). The guard-aware optimizers' per-leaf steps
go the other way (`jitted_while_tracing`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

_ARRAYS = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def traced(tree: Any) -> bool:
  """Whether any leaf of `tree` is a tracer (a call inside `jit`, `vmap`,
  `grad`, `shard_map`, ...)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def compiled_when_eager(update_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`update_fn`, called through its own `jax.jit` when no argument is
  traced (functions given as extra arguments, as `grad_fn=` or optax's
  `value_fn=`, static: compiled once per function); called as it is inside
  a trace (`jit`, `vmap`, `grad`, `shard_map`), under `jax.disable_jit()`,
  and where an argument is neither an array nor a number."""

  @functools.wraps(update_fn)
  def update(updates, state, params=None, **extra_args):
    static = tuple(sorted(k for k, v in extra_args.items() if callable(v)))
    leaves = jax.tree.leaves((updates, state, params, {
        k: v for k, v in extra_args.items() if k not in static}))
    if (jax.config.jax_disable_jit or traced(leaves) or
        not all(isinstance(x, _ARRAYS) for x in leaves)):
      return update_fn(updates, state, params, **extra_args)
    # A new `jit` of the same function each call finds JAX's caches (its
    # trace and program are keyed on the function), and holds nothing that
    # would keep the transformation from being pickled (cloudpickle).
    return jax.jit(update_fn, static_argnames=static)(
        updates, state, params, **extra_args)

  return update


def jitted_while_tracing(leaf_step: Callable[..., Any], *,
                         static_argnames: tuple[str, ...]
                         ) -> Callable[..., Any]:
  """`leaf_step` jitted when called while tracing, as itself otherwise.

  Inside a traced step, the per-leaf arithmetic is traced once per distinct
  leaf signature (shape, dtypes, static hyperparameters): a model of 1,000
  small leaves of a few shapes then traces it a few times, not 1,000 (XLA
  inlines the calls, so the compiled step is the same). Called eagerly, a
  jitted `leaf_step` would be compiled for every new value of a Python
  number hyperparameter (a learning rate set by hand each step: 400
  compiles in 200 steps); run op by op, as optax's, it compiles nothing new.
  """
  jitted = jax.jit(leaf_step, static_argnames=static_argnames)

  @functools.wraps(leaf_step)
  def call(*args, **kwargs):
    if traced(args):
      return jitted(*args, **kwargs)
    # Arrays, as `jit` makes them (a Python float leaf: weakly typed).
    return leaf_step(*jax.tree.map(jnp.asarray, args), **kwargs)

  return call

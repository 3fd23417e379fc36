"""Checks of factory arguments, shared by every transformation.

Each check raises a `ValueError` whose message is a full sentence naming the
argument, the value given and what is allowed. Numeric hyperparameters that
are tracers (as under `optax.inject_hyperparams`, whose hyperparameters reach
the factory as arrays inside a trace) cannot be inspected and are let
through; integer arguments that shape the state must stay Python ints.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_number(value: Any) -> float | None:
  """Returns `value` as a float, None for a tracer, raises for a non-number."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    return float("nan")  # A bool is almost always a mistake for a number.
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    # jnp's dtype tree knows bfloat16 (as `optax.inject_hyperparams` casts
    # float hyperparameters to bf16 parameters' dtype); numpy's does not.
    dtype = np.asarray(value).dtype
    if np.ndim(value) == 0 and (jnp.issubdtype(dtype, jnp.floating) or
                                jnp.issubdtype(dtype, jnp.integer)):
      return float(np.asarray(value, np.float64))
  return float("nan")


def check_number(name: str, value: Any, *, minimum: float = 0.0,
                 strict: bool = False, maximum: float | None = None,
                 strict_max: bool = False, at_minimum: str = "") -> None:
  """Raises a `ValueError` unless `value` is a real number in the range.

  A strict bound holds in float32 too, the dtype the value is computed in
  (`1 - 1e-9` is 1.0 there, and XLA flushes `1e-40` to 0). `at_minimum`: a
  sentence said when `value` is the excluded minimum (what it would do, and
  what to pass instead).
  """
  number = concrete_number(value)
  if number is None:
    return
  with np.errstate(under="ignore", over="ignore"):
    flushed = (strict and minimum == 0 and 0 < abs(number) and
               abs(np.float32(number)) < np.finfo(np.float32).tiny)
  low_ok = (number > minimum and not flushed) if strict else number >= minimum
  with np.errstate(over="ignore"):  # -1e300 is -inf in float32: refused
    rounds_up = (strict_max and maximum is not None and
                 number < maximum <= np.float32(number))
  high_ok = (maximum is None or
             (number < maximum and not rounds_up
              if strict_max else number <= maximum))
  if not (np.isfinite(number) and low_ok and high_ok):
    low = f"{'>' if strict else '>='} {minimum:g}"
    high = ("" if maximum is None else
            f" and {'<' if strict_max else '<='} {maximum:g}")
    hint = f" {at_minimum}" if at_minimum and number == minimum else ""
    if flushed:
      hint = (" It is 0 in float32, the dtype it is computed in (XLA flushes "
              f"magnitudes below {np.finfo(np.float32).tiny:.3g} to 0)."
              f"{' ' + at_minimum if at_minimum else ''}")
    if rounds_up:
      hint = (f" It rounds to {maximum:g} in float32, the dtype it is "
              "computed in.")
    dtype = getattr(value, "dtype", None)
    if (dtype is not None and jnp.issubdtype(dtype, jnp.floating) and
        jnp.dtype(dtype).itemsize < 4):
      hint += (
          f" It is a {jnp.dtype(value.dtype).name} value: under "
          "`optax.inject_hyperparams`, which casts float hyperparameters "
          "to the parameters' dtype, pass `hyperparam_dtype=jnp.float32`.")
    raise ValueError(
        f"`{name}` must be a finite real number {low}{high}, but got "
        f"{value!r}.{hint}")


# Said where a clip is given a bound of 0, which would zero every update
# (other libraries' configs take 0 for "no clipping").
CLIP_TO_ZERO = ("A bound of 0 would zero every update; to clip nothing, leave "
                "the clip out.")
CLIP_TO_ZERO_OR_NONE = ("A bound of 0 would zero every update; `max_norm=None` "
                        "clips nothing.")


# Said where a state does not fit the transformation that was given it.
OTHER_CONFIGURATION = (
    "the state was made by a transformation built otherwise (a checkpoint, "
    "or a state kept after rebuilding the optimizer): re-initialise it with "
    "`tx.init(params)`, or restore checkpoints into "
    "`jax.eval_shape(tx.init, params)`, which refuses such a mismatch.")


# Said where a function argument arrives as something else: optax's
# `inject_hyperparams` calls every callable argument as a schedule.
INJECTED_FUNCTION = (
    " If you passed a function through `optax.inject_hyperparams`, list it "
    "in its `static_args`: optax calls a function argument as a schedule of "
    "the step count and passes on what it returns.")


INT32_MAX = 2**31 - 1


def check_int(name: str, value: Any, *, minimum: int,
              allow_none: bool = False, injectable: bool = False) -> None:
  """Raises a `ValueError` unless `value` is an int >= minimum (or None).

  `injectable`: the value only enters the arithmetic (a count compared with
  a counter), so it may also be a 0-d integer array, as
  `optax.inject_hyperparams` makes of every int argument, defaults included;
  a concrete one is checked, a tracer let through.
  """
  if value is None and allow_none:
    return
  if (injectable and isinstance(value, (jax.Array, np.ndarray)) and
      np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer)):
    if isinstance(value, jax.core.Tracer) or int(value) >= minimum:
      return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum) or value > INT32_MAX:
    allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
    hint = ""
    if isinstance(value, numbers.Integral) and value > INT32_MAX:
      hint = (f" It is compared with int32 counters, so it must be at most "
              f"{INT32_MAX} (2**31 - 1).")
    if isinstance(value, (jax.Array, np.ndarray)) and not injectable:
      hint = (" It sets the structure of the state, so it must be a Python "
              "int (under `optax.inject_hyperparams`, list it in "
              "`static_args`).")
    raise ValueError(f"`{name}` must be {allowed}, but got {value!r}.{hint}")


def check_bool(name: str, value: Any) -> None:
  """Raises a `ValueError` unless `value` is True or False (a NumPy bool, or
  the integers 0 and 1, too): a string "False" or an array would otherwise
  be taken by its truth, which is not what it says (or fails later)."""
  if isinstance(value, (bool, np.bool_)) or (
      isinstance(value, numbers.Integral) and value in (0, 1)):
    return
  raise ValueError(f"`{name}` must be True or False, but got {value!r}.")


def float_dtype(name: str, value: Any) -> Any:
  """`value` as a floating-point (or complex) dtype, or None; a `ValueError`
  naming the argument otherwise."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(
        f"`{name}` must be a floating-point (or complex) dtype such as "
        f"jnp.bfloat16, or None, but got {value!r}.")
  return dtype


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  """Raises a `ValueError` unless `value` is one of `choices`."""
  if value not in choices:
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(
        f"`{name}` must be one of {allowed}, but got {value!r}.")


def require_params(params: Any, factory: str) -> None:
  """Raises a `ValueError` when an update that needs params got none."""
  if params is None:
    raise ValueError(
        f"`{factory}` needs the current parameters: call "
        f"`update(updates, state, params)`; it was called with params=None.")

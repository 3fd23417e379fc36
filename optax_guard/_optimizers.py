"""Guard-aware optimizers: optax's numbers, with the guard's decision inside.

A *guard-aware* transformation takes the guard's decision as two extra
arguments and folds it into its own single elementwise pass, so that a
skipped step costs nothing and the state stays exact without the guard
selecting between two copies of it (which stops XLA from updating the state
buffers in place and costs 3-4x a bare optimizer step on large models):

* `guard_keep`: `bool[]`; False means an exact skip: the update is exactly
  zero, every state leaf comes back bit-identical and step counts (bias
  correction, schedules) do not advance. The gradient is sanitised by a
  `where` on it first, so `0 * NaN` never happens.
* `guard_scale`: a pair `(a, b)` of `f32[]` whose product is the clip factor,
  applied to the gradient as `g * a * b` (two factors so that a factor too
  small for float32 still clips right).

Both default to None (no guard): the optimizers are then drop-in
replacements for their optax namesakes. A transformation announces that it
follows the protocol by being a `GuardAwareTransformation`; `guard` hands it
the decision, and falls back to the generic path for any other optimizer.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _decay
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _stats


class GuardAwareTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that takes `guard_keep` and `guard_scale`.

  Wrap your own `init`/`update` pair in it to make an optimizer guard-aware:
  `guard`, `skip_nonfinite` and `skip_spikes` then hand it their decision
  instead of selecting its state afterwards (the protocol of the user
  guide's "The fast path: guard-aware optimizers"). Its `update` must
  name both keywords (checked here), each None when no guard passes it
  (`skip_nonfinite`, `skip_spikes` and `guard(max_norm=None)` pass a
  `guard_keep` and no `guard_scale`): with
  `guard_keep=False` (a traced bool) it returns exact zeros and its state
  bit-identical (replace the gradients by zeros first, with a `where`, so
  that no `0 * NaN` enters it), and it multiplies the gradients by both
  float32 factors of `guard_scale = (a, b)`, in that order.

  Args:
    init: `init(params) -> state`, as for any optax transformation.
    update: `update(updates, state, params=None, *, guard_keep=None,
      guard_scale=None, **extra_args) -> (updates, state)`.

  Returns:
    The transformation (an `optax.GradientTransformationExtraArgs`, so it
    chains and wraps like any other).

  Example:
    >>> import jax, jax.numpy as jnp, optax_guard as og
    >>> def init(params):
    ...   return ()
    >>> def update(grads, state, params=None, *, guard_keep=None,
    ...            guard_scale=None, **extra):
    ...   keep = True if guard_keep is None else guard_keep
    ...   a, b = (1.0, 1.0) if guard_scale is None else guard_scale
    ...   def step(g):
    ...     g = jnp.where(keep, g, 0.0)  # sanitised: a skipped NaN is 0
    ...     return jnp.where(keep, -0.1 * ((g * a) * b), 0.0)
    ...   return jax.tree.map(step, grads), state
    >>> sgd = og.GuardAwareTransformation(init, update)
    >>> tx = og.guard(sgd, spike_sigma=None)
    >>> params = {"w": jnp.ones(2)}
    >>> u, _ = tx.update({"w": jnp.array([0.3, 0.4])}, tx.init(params), params)
    >>> print(u["w"])
    [-0.03 -0.04]

  References:
    The user guide's "The fast path: guard-aware optimizers" (why the
    decision must ride inside the optimizer's pass).
  """
  __slots__ = ()

  def __new__(cls, init, update):
    _check_protocol(update)
    return super().__new__(cls, init, update)

  # A NamedTuple's own `_make` and `_replace` build the tuple without
  # `__new__`, and would take an update that drops the decision.
  @classmethod
  def _make(cls, iterable):
    return cls(*iterable)

  def _replace(self, **changes):
    return type(self)(**{**self._asdict(), **changes})


def _check_protocol(update: Any, seen: frozenset[int] = frozenset()) -> None:
  """Raises unless `update` names both keywords: taken by `**extra_args`
  alone (an optax optimizer's update), the guard's decision would be
  dropped, and the guard would neither clip nor skip."""
  try:
    # Its own first: a decorator copied from another update is not that one.
    signature = inspect.signature(update, follow_wrapped=False)
  except (TypeError, ValueError):  # no signature to read (a C function)
    return
  parameters = signature.parameters.values()
  named = {p.name for p in parameters
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  missing = [k for k in ("guard_keep", "guard_scale") if k not in named]
  forwards = all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 for p in parameters)
  inner = (update.func if isinstance(update, functools.partial) else
           getattr(update, "__wrapped__", None))
  if missing and forwards and inner is not None and id(inner) not in seen:
    # `(*args, **kwargs)` of a decorator (`jax.named_call`, a logger) or of
    # a partial of one: it passes everything on, so what it wraps decides.
    _check_protocol(inner, seen | {id(update)})
    return
  if missing:
    raise ValueError(
        "`GuardAwareTransformation` needs an `update` that names the "
        "keyword arguments `guard_keep` and `guard_scale` (`def "
        "update(updates, state, params=None, *, guard_keep=None, "
        "guard_scale=None, **extra_args)`), but "
        f"{getattr(update, '__qualname__', update)!r}{signature} does not "
        f"name {' or '.join(missing)}: an update that takes them only "
        "through `**extra_args` (as optax's do) would drop the guard's "
        "decision, which would then neither clip nor skip. Name both, and "
        "pass them on where your update forwards to another.")


def _keep(keep: Any, new: Any, old: Any) -> Any:
  return new if keep is None else jnp.where(keep, new, old)


def _value(schedule: Any, count: jax.Array, factory: str, name: str) -> Any:
  """`schedule`'s value at `count` (`schedule` itself if a number)."""
  if not callable(schedule):
    return schedule
  value = schedule(count)
  if np.ndim(value) != 0:  # it would broadcast into the updates' shapes
    raise ValueError(
        f"`{factory}`'s `{name}` schedule returned an array of shape "
        f"{np.shape(value)}; a schedule must return one number.")
  return value


def _check_updates(updates: Any, moments: Any, params: Any,
                   factory: str) -> None:
  """Raises unless `updates` has the layers and shapes of the parameters
  (as `init` saw them in `moments`, else as given), naming what differs. A
  None update (a frozen leaf, as optax takes) stands for its parameter."""
  _stats.refuse_float0(jax.tree.leaves(updates))
  like = params if moments is None else moments
  if like is None:
    return
  try:
    updates = jax.tree.map(lambda u, p: p if u is None else u, updates, like,
                           is_leaf=lambda u: u is None)
  except (ValueError, TypeError):
    pass  # other trees: named below
  _metrics.check_same_tree(
      updates, like, factory, per_layer=False,
      names_from="was called with" if moments is None else
      "was initialised with")


def _times_rate(lr: Any, u: jax.Array, scheduled: bool) -> jax.Array:
  """`-lr * u` in the dtype optax's would give: a schedule's value is cast to
  the update's dtype (optax's `scale_by_schedule`), an array promotes with
  it (`scale`), so a float32 array (`optax.inject_hyperparams` with
  `hyperparam_dtype=jnp.float32`) makes bf16 parameters' updates float32.
  A Python float, or a NumPy float64 (a Python float's subclass), stays a
  static number in the update's dtype (as a Python float does in optax; a
  NumPy float64 would promote there); a NumPy float32 is an array, as in
  optax."""
  if scheduled:
    return jnp.asarray(-lr, dtype=u.dtype) * u
  return _mul(-lr, u)


def _mul(h: Any, x: jax.Array) -> jax.Array:
  """`h * x` promoted as JAX's standard rules promote it, written out so that
  a hyperparameter array of another float dtype (float32 on bfloat16
  leaves) also works under `jax.numpy_dtype_promotion("strict")`."""
  return _promoted(operator.mul, h, x)


def _plus(x: jax.Array, h: Any) -> jax.Array:
  """`x + h`, promoted as `_mul`."""
  return _promoted(operator.add, x, h)


def _promoted(op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
  """`op(a, b)` in the dtype JAX's standard promotion gives (a Python
  number is weakly typed: the other operand's dtype)."""
  if isinstance(a, (int, float)) or isinstance(b, (int, float)):
    return op(a, b)  # weakly typed: stays in the other's dtype
  with jax.numpy_dtype_promotion("standard"):
    wide = jnp.result_type(a, b)
  return op(jnp.asarray(a).astype(wide), jnp.asarray(b).astype(wide))


def _wider(a: Any, b: Any) -> Any:
  """The dtype optax's arithmetic promotes two float dtypes to."""
  a, b = jnp.dtype(a), jnp.dtype(b)
  if a == b:
    return a
  return jnp.dtype(jnp.float32) if max(a.itemsize, b.itemsize) <= 4 else (
      a if a.itemsize > b.itemsize else b)


def _ema(decay: Any, g: jax.Array, t: jax.Array) -> jax.Array:
  """`(1 - decay) * g + decay * t` with optax's dtypes, under any promotion."""
  return _sum(_mul(1 - decay, g), _mul(decay, t))


def _sum(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a + b` in the dtype optax's arithmetic would give."""
  wide = _wider(a.dtype, b.dtype)
  return a.astype(wide) + b.astype(wide)


def _bias_correction(decay: Any, count: jax.Array) -> jax.Array:
  # In the default float dtype, as optax's: float64 under `jax_enable_x64`.
  dtype = jnp.result_type(float)
  return 1.0 - jnp.power(jnp.asarray(decay, dtype), count.astype(dtype))


def _decision_args(guard_keep: Any, guard_scale: Any) -> Any:
  """The decision as `(keep, (a, b) or None)` for the per-leaf kernels,
  computed once for all leaves (`_stats.computed_once`), or None without a
  guard (the program then stays optax's)."""
  if guard_keep is None and guard_scale is None:
    return None
  keep = jnp.ones((), jnp.bool_) if guard_keep is None else guard_keep
  return _stats.computed_once((keep, guard_scale))


def _split_hyper(**values: Any) -> tuple[tuple[tuple[str, Any], ...], dict]:
  """Hyperparameters as (static Python numbers, traced arrays).

  Python numbers stay static, so that the arithmetic (and its rounding in
  low-precision dtypes) is exactly optax's; arrays (schedules,
  `optax.inject_hyperparams`) are passed as arguments.
  """
  # A NumPy float64 as the Python float it equals: as a jit key it would
  # share the compiled leaf of that float, whose dtypes differ from its own.
  static = tuple(sorted(
      (k, float(v) if isinstance(v, float) else v) for k, v in values.items()
      if v is None or isinstance(v, (int, float))))
  traced = {k: v for k, v in values.items() if k not in dict(static)}
  return static, traced


def _prepare(decision: Any, g: jax.Array) -> tuple[Any, jax.Array]:
  """(keep, the gradient clipped, and exact zeros on a skip: never 0*NaN)."""
  if decision is None:
    return None, g
  keep, scale = decision
  if scale is not None:
    g = _stats.scale_leaf(g, *scale)
  return keep, jnp.where(keep, g, jnp.zeros_like(g))


@functools.partial(_eager.jitted_while_tracing,
                   static_argnames=("static", "nesterov"))
def _adam_leaf(g, m, v, p, decision, corrections, traced, *, static,
               nesterov):
  """One leaf's AdamW step: (update, new first moment, new second moment)."""
  h = {**dict(static), **traced}
  lr, wd, b1, b2 = h["lr"], h["wd"], h["b1"], h["b2"]
  eps, eps_root = h["eps"], h["eps_root"]
  correction1, correction2, correction_next = corrections
  keep, g = _prepare(decision, g)
  if not jnp.issubdtype(g.dtype, jnp.inexact):  # an integer parameter's
    g = g.astype(v.dtype)
  # The kept moments feed the update, so the old ones are read by one
  # computation only and XLA can overwrite them in place.
  m_dtype, v_dtype = m.dtype, v.dtype
  m_new = _ema(b1, g, m)
  v_new = _ema(b2, _stats.abs_sq(g), v)  # (as optax's, real)
  m_new = _keep(keep, m_new, m.astype(m_new.dtype))
  v_new = _keep(keep, v_new, v.astype(v_new.dtype))
  if nesterov:
    m_hat = _sum(_mul(b1, m_new / correction_next.astype(m_new.dtype)),
                 _mul(1 - b1, g / correction1.astype(g.dtype)))
  else:
    m_hat = m_new / correction1.astype(m_new.dtype)
  v_hat = v_new / correction2.astype(v_new.dtype)
  denominator = _plus(jnp.sqrt(_plus(v_hat, eps_root)), eps)
  wide = _wider(m_hat.dtype, denominator.dtype)
  u = m_hat.astype(wide) / denominator.astype(wide)
  if nesterov:
    # `g / correction1` overflows where the second moment has overflowed
    # too (an unclipped |g| above ~3.4e37 in float32): 0 there instead of
    # Inf/Inf, as plain Adam's finite m / Inf gives.
    u = jnp.where(jnp.isinf(denominator), jnp.zeros_like(u), u)
  if p is not None:  # weight decay applies to this leaf
    u = _sum(u, _mul(wd, p))
  u = _times_rate(lr, u, h["scheduled"])
  # The state keeps its dtypes (optax's own can drift with the gradients').
  return (_keep(keep, u, jnp.zeros_like(u)), m_new.astype(m_dtype),
          v_new.astype(v_dtype))


def _check_moment_dtype(params: Any, dtype: Any, name: str) -> None:
  """Raises where a real moment `dtype` would keep a complex parameter's
  moment (its imaginary part would be dropped at every step)."""
  if dtype is None or jnp.issubdtype(dtype, jnp.complexfloating):
    return
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = _metrics.unwrap(p)
    if jnp.iscomplexobj(p):
      raise ValueError(
          f"`{name}`={jnp.dtype(dtype).name} is real, but the parameter "
          f"{_metrics.path_name(path)!r} is {jnp.result_type(p)}: its "
          "moment would lose its imaginary part at every step. Pass a "
          f"complex dtype ({name}=jnp.complex64) or leave {name}=None.")


def _moment(param: Any, dtype: Any) -> jax.Array:
  """Zeros for a moment of `param`: of `dtype`, else of the parameter's own
  dtype when it is a float; an integer parameter's moments are floats, as
  their arithmetic is (optax's truncate: momentum to integers, Adam's
  second moment stuck at 0). Never weakly typed (a `jnp.array(0.0)`
  parameter), as `update` returns it. `zeros_like` keeps the parameter's
  sharding and varying-axes type."""
  if dtype is None:
    dtype = jnp.dtype(jnp.result_type(param))
    if not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.dtype(jnp.result_type(float))
  return jnp.zeros_like(param, dtype=dtype)


@functools.partial(_eager.jitted_while_tracing,
                   static_argnames=("static", "nesterov"))
def _sgd_leaf(g, t, decision, traced, *, static, nesterov):
  """One leaf's SGD step: (update, new trace or None)."""
  h = {**dict(static), **traced}
  lr, momentum = h["lr"], h["momentum"]
  keep, g = _prepare(decision, g)
  t_out = None
  if momentum is not None:
    t_new = _sum(g, _mul(momentum, t))
    t_new = _keep(keep, t_new, t.astype(t_new.dtype))
    step = _sum(g, _mul(momentum, t_new)) if nesterov else t_new
    t_out = t_new.astype(t.dtype)
  else:
    step = g
  if not jnp.issubdtype(step.dtype, jnp.inexact):  # as optax: -lr * step
    step = step.astype(jnp.result_type(float))
  u = _times_rate(lr, step, h["scheduled"])
  return _keep(keep, u, jnp.zeros_like(u)), t_out


class AdamwState(NamedTuple):
  """State of `adamw` and `adam` (optax's field names, for `optax.tree.get`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.adamw(1e-3)
    >>> _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> print(optax.tree.get(state, "count"), optax.tree.get(state, "nu"))
    1 {'w': Array([0.001, 0.001], dtype=float32)}

  References:
    Made by `adamw` (see its references); it records no metrics.
  """
  count: jax.Array  # i32[] steps taken (not advanced by a skipped step).
  mu: Any           # first moments, like params (in `mu_dtype` if given).
  nu: Any           # second moments, like params.


class AdamState(AdamwState):
  """State of `adam`: the fields of `AdamwState`, under its own name.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> state = og.adam(1e-3).init({"w": jnp.ones(2)})
    >>> type(state).__name__, state._fields
    ('AdamState', ('count', 'mu', 'nu'))

  References:
    Made by `adam` (see its references); it records no metrics.
  """
  __slots__ = ()


def _check_denominator(eps: Any, eps_root: Any, params: Any = None) -> None:
  """Raises when Adam's denominator can be exactly 0 (0/0 = NaN).

  With `eps = eps_root = 0`, or both rounding to 0 in a parameter's dtype
  (optax's default 1e-8 is 0 in float16), or to a subnormal number, which
  XLA flushes to 0 on CPUs and GPUs, an element whose gradients have all
  been exactly zero gets NaN as its update. optax allows it; here it would
  also slip past the guard, which does not read a guard-aware optimizer's
  update back.
  """
  values = (_args.concrete_number(eps), _args.concrete_number(eps_root))
  if None in values:  # traced (`optax.inject_hyperparams`): unknown here
    return
  if params is None:
    if values == (0.0, 0.0):
      raise ValueError(
          "`eps` and `eps_root` are both 0, so an element whose gradients "
          "have all been exactly zero (a dead unit, a padding embedding) gets "
          "0/0 = NaN as its update; pass eps > 0 (optax's default is 1e-8) "
          "or eps_root > 0.")
    return
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(_metrics.unwrap(p))
    if not jnp.issubdtype(dtype, jnp.floating):
      continue
    # The arithmetic runs in float32 at least, where XLA flushes subnormal
    # numbers to 0: a value must be a normal number there.
    tiny = float(jnp.finfo(_stats.computed_in(dtype)).tiny)
    if not any(abs(float(np.asarray(v, dtype))) >= tiny for v in values):
      tiny = max(tiny, float(jnp.finfo(dtype).smallest_subnormal))
      raise ValueError(
          f"`eps`={eps!r} and `eps_root`={eps_root!r} round to 0 in {dtype} "
          f"(or below {tiny:.3g}, which XLA flushes to 0), the dtype of "
          f"the parameter {_metrics.path_name(path)!r}, so an "
          "element whose gradients have all been exactly zero gets 0/0 = NaN "
          f"as its update; pass an eps that {dtype} holds (at least "
          f"{tiny:.3g}; float16 training commonly takes 1e-4 or more, since "
          "a smaller one lets Adam's quotient overflow), or keep the "
          "parameters in float32 or bfloat16.")


def _adam_like(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay,
               mask, nesterov, state_type) -> GuardAwareTransformation:
  factory = "adamw" if state_type is AdamwState else "adam"
  _args.check_bool("nesterov", nesterov)
  for name, value in (("b1", b1), ("b2", b2)):
    # At 1 the bias correction `1 - b**t` is 0, and every update 0/0 = NaN.
    _args.check_number(name, value, maximum=1.0, strict_max=True)
  _args.check_number("eps", eps)
  _args.check_number("eps_root", eps_root)
  _check_denominator(eps, eps_root)
  if not callable(learning_rate):
    _args.check_number("learning_rate", learning_rate)
  if weight_decay is not None and not callable(weight_decay):
    _args.check_number("weight_decay", weight_decay)
  mu_dtype = _args.float_dtype("mu_dtype", mu_dtype)
  decays = weight_decay is not None and not (
      isinstance(weight_decay, (int, float)) and weight_decay == 0.0)

  def init_fn(params):
    _check_denominator(eps, eps_root, params)
    _check_moment_dtype(params, mu_dtype, "mu_dtype")
    if decays:
      # Refused here, not at the first update.
      _decay.mask_leaves(mask, params, factory, whole=True)
    return state_type(
        count=jnp.zeros((), jnp.int32),
        # zeros_like keeps each parameter's sharding and varying-axes type.
        mu=jax.tree.map(lambda p: _moment(p, mu_dtype), params),
        nu=jax.tree.map(lambda p: _moment(p, None), params))

  def update_fn(updates, state, params=None, *, guard_keep=None,
                guard_scale=None, **extra_args):
    del extra_args
    decision = _decision_args(guard_keep, guard_scale)
    keep = None if decision is None else decision[0]
    _check_updates(updates, state.mu, None, factory)
    for m, v in zip(jax.tree.leaves(state.mu), jax.tree.leaves(state.nu)):
      # `init` puts mu in `mu_dtype`, else in nu's (the parameter's) dtype:
      # a state of another `mu_dtype` would keep its own.
      want = (jnp.result_type(v) if mu_dtype is None else
              jax.dtypes.canonicalize_dtype(mu_dtype))
      if jnp.result_type(m) != want:
        raise ValueError(
            f"The state's first moments are {jnp.result_type(m)}, but this "
            f"`{factory}` keeps them in {jnp.dtype(want)} (mu_dtype="
            f"{mu_dtype if mu_dtype is None else jnp.dtype(mu_dtype).name}); "
            f"{_args.OTHER_CONFIGURATION}")
    if decays:
      _args.require_params(params, factory)
    count_inc = optax.safe_increment(state.count)
    correction1 = _bias_correction(b1, count_inc)
    correction2 = _bias_correction(b2, count_inc)
    correction_next = _bias_correction(b1, optax.safe_increment(count_inc))
    lr = _value(learning_rate, state.count, factory, "learning_rate")
    wd = (_value(weight_decay, state.count, factory, "weight_decay")
          if decays else None)
    # A None gradient (a frozen parameter, Equinox's `filter_grad`) stays
    # None and keeps its moments, as `sgd` keeps its trace.
    leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda g: g is None)
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    ps = (treedef.flatten_up_to(params) if params is not None
          else [None] * len(leaves))
    masked = [False] * len(leaves)
    if decays:  # one flag per parameter leaf: none for a None parameter
      flags = iter(_decay.mask_leaves(mask, params, factory, whole=True))
      masked = [[next(flags) for _ in jax.tree.leaves(p)] for p in ps]
      masked = [g is not None and bool(f[0]) for g, f in zip(leaves, masked)]
    static, traced = _split_hyper(lr=lr, scheduled=callable(learning_rate),
                                  wd=wd, b1=b1, b2=b2, eps=eps,
                                  eps_root=eps_root)
    corrections = (correction1, correction2, correction_next)
    out_u, out_mu, out_nu = [], [], []
    for g, m, v, p, decay in zip(leaves, mus, nus, ps, masked):
      if g is None:
        out_u.append(None)
        out_mu.append(m)
        out_nu.append(v)
        continue
      u, m_new, v_new = _adam_leaf(
          g, m, v, p if decay else None, decision, corrections, traced,
          static=static, nesterov=nesterov)
      out_u.append(u)
      out_mu.append(m_new)
      out_nu.append(v_new)
    new_state = state_type(
        count=_keep(keep, count_inc, state.count),
        mu=treedef.unflatten(out_mu), nu=treedef.unflatten(out_nu))
    return treedef.unflatten(out_u), new_state

  return GuardAwareTransformation(init_fn, update_fn)


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
          mu_dtype: Any = None, weight_decay: optax.ScalarOrSchedule = 1e-4,
          mask: Any = None, *, nesterov: bool = False
          ) -> GuardAwareTransformation:
  """AdamW with optax's arguments and numbers, guard-aware.

  The same arguments and, on every applied step, the same numbers as
  `optax.adamw` (to float32 rounding), computed in one elementwise pass per
  parameter that also takes the guard's keep/scale decision (see
  `GuardAwareTransformation`). Alone it is a drop-in replacement; inside
  `og.guard` a skipped step costs nothing and leaves the state bit-identical.
  One difference by design: the state keeps its dtypes (`mu_dtype`, else
  the parameters'), where optax's first moment turns float32 after one step when
  gradients or injected hyperparameters are float32 and the parameters
  bfloat16 (which then also breaks optax's state under `lax.scan`); the
  numbers then differ by the moments' rounding.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root (at least one
      of the two must be > 0 in the parameters' dtype: optax's default
      `eps=1e-8` rounds to 0 in float16, where an all-zero gradient would
      make 0/0 = NaN, so float16 parameters are refused at `init` unless
      given a larger `eps`, such as 1e-4). As in optax, differentiating
      through the step (meta-learning) needs `eps_root > 0` (say 1e-12)
      where a gradient element can be exactly 0: the square root's
      derivative at 0 is Inf, and Inf * 0 is NaN. (Behind a clip, every
      leaf's gradient depends on the clip factor, so on the others.)
    mu_dtype: dtype of the first moment (None: the parameters' dtype;
      JAX's default float for an integer parameter, whose moments optax
      truncates). A real dtype is refused for complex parameters, whose
      moments it would make real.
    weight_decay: decoupled decay strength, a float or a schedule, multiplied
      by the learning rate as in optax.
    mask: a tree of bools (or a callable returning one) saying which
      parameters are decayed; None decays all, biases and normalisation
      scales included, as `optax.adamw` does. (`og.add_decayed_weights`
      defaults to `og.decay_mask`, kernels and embeddings only: pass
      `mask=og.decay_mask` here for the same rule.) Two masks that
      `optax.adamw` takes are refused at `init`, with `weight_decay` set:
      the single bool False (it decays nothing; it is what
      `optax.inject_hyperparams` makes of a callable mask not listed in
      `static_args`), and one that picks an integer or boolean parameter
      (`optax.apply_updates` would truncate its decay).
    nesterov: use Nesterov momentum (NAdamW).

  Returns:
    A `GuardAwareTransformation` whose state is an `AdamwState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.adamw(0.1, weight_decay=0.0)
    >>> params = {"w": jnp.ones(2)}
    >>> u, state = tx.update({"w": jnp.array([0.5, -2.0])}, tx.init(params),
    ...                      params)
    >>> print([f"{x:.3f}" for x in u["w"]], int(state.count))
    ['-0.100', '0.100'] 1

  References:
    Loshchilov and Hutter, 2019, "Decoupled Weight Decay Regularization"
    (https://arxiv.org/abs/1711.05101); optax's `adamw`.
  """
  return _adam_like(learning_rate, b1, b2, eps, eps_root, mu_dtype,
                    weight_decay, mask, nesterov, AdamwState)


def adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
         mu_dtype: Any = None, *, nesterov: bool = False
         ) -> GuardAwareTransformation:
  """Adam with optax's arguments and numbers, guard-aware.

  `adamw` without weight decay; see `adamw` and `GuardAwareTransformation`.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root (at least one
      of the two must be > 0 in the parameters' dtype; float16 parameters
      need a larger `eps` than optax's default, as in `adamw`; and
      differentiating through the step needs `eps_root > 0`, as there).
    mu_dtype: dtype of the first moment (None: the parameters' dtype;
      JAX's default float for an integer parameter, whose moments optax
      truncates). A real dtype is refused for complex parameters, whose
      moments it would make real.
    nesterov: use Nesterov momentum (NAdam).

  Returns:
    A `GuardAwareTransformation` whose state is an `AdamState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.adam(0.1)
    >>> params = {"w": jnp.ones(2)}
    >>> u, _ = tx.update({"w": jnp.array([0.5, -2.0])}, tx.init(params))
    >>> print([f"{x:.3f}" for x in u["w"]])
    ['-0.100', '0.100']

  References:
    Kingma and Ba, 2015, "Adam: A Method for Stochastic Optimization"
    (https://arxiv.org/abs/1412.6980); optax's `adam`.
  """
  return _adam_like(learning_rate, b1, b2, eps, eps_root, mu_dtype, None,
                    None, nesterov, AdamState)


class SgdState(NamedTuple):
  """State of `sgd` (optax's `trace` field name, for `optax.tree.get`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.sgd(0.1, momentum=0.9)
    >>> _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> print(optax.tree.get(state, "trace"))
    {'w': Array([1., 1.], dtype=float32)}

  References:
    Made by `sgd` (see its references); it records no metrics.
  """
  count: jax.Array  # i32[] steps taken (for schedules).
  trace: Any        # momentum, like params; None without momentum.


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None,
        nesterov: bool = False, accumulator_dtype: Any = None
        ) -> GuardAwareTransformation:
  """SGD (with optional momentum) with optax's arguments, guard-aware.

  The same numbers as `optax.sgd` on every applied step; see
  `GuardAwareTransformation` for the guard's protocol. The trace keeps its
  dtype (`accumulator_dtype`, else the parameters'), as the moments of
  `adamw` do.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    momentum: decay of the momentum trace, in [-1, 1]; None for plain SGD.
    nesterov: use Nesterov momentum.
    accumulator_dtype: dtype of the trace (None: the parameters' dtype;
      JAX's default float for an integer parameter, whose trace optax
      truncates). A real dtype is refused for complex parameters, whose
      trace it would make real.

  Returns:
    A `GuardAwareTransformation` whose state is an `SgdState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.sgd(0.1, momentum=0.9)
    >>> params = {"w": jnp.ones(2)}
    >>> u, _ = tx.update({"w": jnp.array([1.0, -2.0])}, tx.init(params))
    >>> print(u["w"])
    [-0.1  0.2]

  References:
    Sutskever et al., 2013, "On the importance of initialization and
    momentum in deep learning"; Gidel et al., 2019, "Negative Momentum for
    Improved Game Dynamics" (https://arxiv.org/abs/1807.04740); optax's
    `sgd`.
  """
  if not callable(learning_rate):
    _args.check_number("learning_rate", learning_rate)
  if momentum is not None:
    _args.check_number("momentum", momentum, minimum=-1.0, maximum=1.0)
  _args.check_bool("nesterov", nesterov)

  acc_dtype = _args.float_dtype("accumulator_dtype", accumulator_dtype)

  def init_fn(params):
    trace = None
    if momentum is not None:
      _check_moment_dtype(params, acc_dtype, "accumulator_dtype")
      trace = jax.tree.map(lambda p: _moment(p, acc_dtype), params)
    return SgdState(count=jnp.zeros((), jnp.int32), trace=trace)

  def update_fn(updates, state, params=None, *, guard_keep=None,
                guard_scale=None, **extra_args):
    del extra_args
    if (state.trace is None) != (momentum is None):
      raise ValueError(
          f"The state {'has no' if state.trace is None else 'has a'} "
          f"momentum trace, but this `sgd` has momentum={momentum!r}; "
          f"{_args.OTHER_CONFIGURATION}")
    _check_updates(updates, state.trace, params, "sgd")
    if momentum is not None and acc_dtype is not None:
      # `init` puts the trace in `accumulator_dtype`: a state of another
      # would keep its own. (Without one, the trace has the parameter's
      # dtype at `init`, which the parameters may have left since.)
      want = jax.dtypes.canonicalize_dtype(acc_dtype)
      for t in jax.tree.leaves(state.trace):
        if jnp.result_type(t) != want:
          raise ValueError(
              f"The state's momentum trace is {jnp.result_type(t)}, but this "
              f"`sgd` keeps it in {want} (accumulator_dtype="
              f"{jnp.dtype(acc_dtype).name}); {_args.OTHER_CONFIGURATION}")
    decision = _decision_args(guard_keep, guard_scale)
    keep = None if decision is None else decision[0]
    static, traced = _split_hyper(lr=_value(learning_rate, state.count,
                                            "sgd", "learning_rate"),
                                  scheduled=callable(learning_rate),
                                  momentum=momentum)
    # A None gradient (a frozen parameter) stays None and keeps its trace,
    # as in optax's sgd.
    leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda g: g is None)
    traces = (treedef.flatten_up_to(state.trace) if momentum is not None
              else [None] * len(leaves))
    out_u, out_t = [], []
    for g, t in zip(leaves, traces):
      if g is None:
        out_u.append(None)
        out_t.append(t)
        continue
      u, t_new = _sgd_leaf(g, t, decision, traced, static=static,
                           nesterov=nesterov)
      out_u.append(u)
      out_t.append(t_new)
    count = optax.safe_increment(state.count)
    return treedef.unflatten(out_u), SgdState(
        count=_keep(keep, count, state.count),
        trace=treedef.unflatten(out_t) if momentum is not None else None)

  return GuardAwareTransformation(init_fn, update_fn)

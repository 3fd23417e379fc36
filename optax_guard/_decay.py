"""Weight decay and L1/L2 penalties on the weights, with a Flax-aware mask.

The three share one implementation: each adds `rate(step) * d(W)` to the
updates, where `d(W) = W` for decoupled decay and coupled L2 (the gradient of
`rate/2 * ||W||^2`) and `d(W) = sign(W)` for L1 (the gradient of
`rate * ||W||_1`, 0 at 0), over the leaves the mask selects. They differ in
where they go in a chain (decay after the optimizer, penalties before it) and
in the metrics they record.
"""

from __future__ import annotations

import enum
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _stats

# Parameter names Flax gives to what must not be decayed: biases, and the
# scales and offsets of normalisation layers (LayerNorm, RMSNorm, BatchNorm,
# GroupNorm); and to what must: Dense/Conv kernels and embedding tables.
_NEVER = frozenset({"bias", "scale", "offset"})
_ALWAYS = frozenset({"kernel", "embedding"})


def _default(name: str, shape: tuple[int, ...]) -> bool:
  leaf = name.rsplit("/", 1)[-1]
  if leaf in _ALWAYS:
    return True
  if leaf in _NEVER:
    return False
  return len(shape) >= 2  # an unnamed matrix is a weight, a vector is not


def decay_mask(params: Any, *, stacked: _metrics.Stacked = None) -> Any:
  """The default decay mask: True for Flax kernels and embeddings.

  A leaf named `kernel` or `embedding` is decayed; one named `bias`, `scale`
  or `offset` is not; any other leaf is decayed when it has two or more axes
  (a weight matrix), not when it is a scalar or a vector. A leaf marked as
  `stacked` (layers stacked by `nn.scan`, `nnx.scan` or `nnx.vmap`) is judged
  without its leading axis, so a per-layer vector such as a `layer_scale` is
  left alone whether the blocks are scanned or written out. Pass it to a
  factory as `mask=functools.partial(og.decay_mask, stacked=...)`.

  Args:
    params: a parameter tree (Flax linen or nnx).
    stacked: the leaves whose leading axis stacks layers: their names or
      prefixes of them (`("ScanBlock_0",)`), or a function from a layer name
      to a bool, as in `monitor`.

  Returns:
    A tree of Python bools with the structure of `params` (an nnx
    `Variable` is replaced by its bool, so that the same tree also masks
    the plain arrays `nnx.Optimizer` hands to its transformation).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    ...           "LayerNorm_0": {"scale": jnp.ones(3)}}
    >>> og.decay_mask(params)
    {'Dense_0': {'bias': False, 'kernel': True}, 'LayerNorm_0': {'scale': False}}
    >>> scanned = {"Block": {"layer_scale": jnp.ones((4, 3))}}  # 4 layers
    >>> og.decay_mask(scanned), og.decay_mask(scanned, stacked=("Block",))
    ({'Block': {'layer_scale': True}}, {'Block': {'layer_scale': False}})

  References:
    Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization"
    (https://arxiv.org/abs/1711.05101), and common practice since BERT
    (Devlin et al., 2019) of not decaying biases and normalisation scales.
  """
  _metrics.check_stacked(stacked)
  if (isinstance(params, jax.Array) and params.ndim == 0 and
      jnp.issubdtype(params.dtype, jnp.integer)):
    # A mask of it would be a Python False, which for a single-array
    # parameter is that array's own flag: its decay would silently stop.
    raise ValueError(
        "`decay_mask` was called with a 0-d integer array, not parameters: "
        "the step count, as `optax.inject_hyperparams` calls a function "
        f"argument.{_args.INJECTED_FUNCTION}")
  paths, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_metrics.is_variable)
  flags = _metrics.stacked_flags(params, stacked) or [False] * len(paths)
  shapes = [tuple(jnp.shape(_metrics.unwrap(x))) for _, x in paths]
  return jax.tree_util.tree_unflatten(treedef, [
      _default(_metrics.path_name(p), shape[1:] if flag else shape)
      for (p, _), shape, flag in zip(paths, shapes, flags)])


Mask = Any  # a tree of bools, a callable params -> tree of bools, or None


class _DefaultMask(enum.Enum):
  """The default `mask`: `decay_mask`. Not the function itself, which
  `optax.inject_hyperparams` would call with the step count; an enum
  member, which a by-value pickle of the factories' closures (cloudpickle,
  for Ray or Dask) brings back as itself, where a bare `object()` came
  back as a new object, taken for a mask."""
  DECAY_MASK = "decay_mask"

  def __repr__(self) -> str:
    return "decay_mask"


_DEFAULT = _DefaultMask.DECAY_MASK


def _is_flag(x: Any) -> bool:
  """A bool, NumPy bool or 0-d bool array, or the integer 0 or 1."""
  if isinstance(x, (bool, np.bool_)):
    return True
  if isinstance(x, numbers.Integral):
    return x in (0, 1)
  return (isinstance(x, (np.ndarray, jax.Array)) and
          not isinstance(x, jax.core.Tracer) and x.ndim == 0 and
          x.dtype == np.bool_)


def mask_leaves(mask: Mask, params: Any, factory: str, *,
                whole: bool = False) -> list[bool]:
  """One Python bool per parameter leaf (`whole`: a single flag stands for
  every leaf, as optax's masks take it); raises where it picks a leaf that
  is no weight."""
  flags = _mask_flags(mask, params, factory, whole)
  for (path, p), flag in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             flags):
    dtype = jnp.result_type(_metrics.unwrap(p))
    if flag and not jnp.issubdtype(dtype, jnp.inexact):
      what = ("boolean (a flag, not a weight)" if dtype == jnp.bool_ else
              f"of dtype {dtype} (a count or an index, not a weight; "
              "`optax.apply_updates` would truncate its decay)")
      raise ValueError(
          f"`{factory}` would decay the parameter "
          f"{_metrics.path_name(path)!r}, which is {what}; leave it out "
          "with the mask.")
  return flags


def _mask_flags(mask: Mask, params: Any, factory: str,
                whole: bool) -> list[bool]:
  leaves = jax.tree_util.tree_leaves(params)
  if mask is None:
    return [True] * len(leaves)
  if mask is _DEFAULT:
    mask = decay_mask
  tree = mask(params) if callable(mask) else mask
  if _is_flag(tree) and whole and not tree:
    # What `inject_hyperparams` makes of a callable mask: the mask of
    # the step count (a scalar, so no leaf), which would silently stop the
    # decay.
    raise ValueError(
        f"The `mask` of `{factory}` is the single bool False, which decays "
        f"no leaf although `weight_decay` is set: pass weight_decay=0 for "
        f"no decay, or a tree of bools.{_args.INJECTED_FUNCTION}")
  # One array: its own flag. One leaf in a container: True is its flag,
  # while False there is what `inject_hyperparams` makes of a callable mask
  # (refused below, as for more leaves).
  bare = jax.tree_util.treedef_is_leaf(jax.tree.structure(params))
  if _is_flag(tree) and (whole or bare or (tree and len(leaves) == 1)):
    return [bool(tree)] * len(leaves)
  if _is_flag(tree):
    raise ValueError(
        f"The `mask` of `{factory}` must be a tree of bools like the "
        f"parameters (or a prefix of it), a callable returning one, or None "
        f"for every leaf, but it is the single bool {bool(tree)!r}, which "
        f"would touch every leaf or none (pass None, or a rate of 0)."
        f"{_args.INJECTED_FUNCTION}")
  try:
    # A flag stands for every leaf below it, so that a prefix of the
    # parameters' structure (`{"Dense_0": True, "head": False}`) works as
    # in optax.
    flags = jax.tree_util.tree_leaves(jax.tree.map(
        lambda flag, sub: [flag] * len(jax.tree_util.tree_leaves(sub)),
        tree, params))
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"The `mask` of `{factory}` must have the structure of the "
        f"parameters or a prefix of it (or be a callable returning such a "
        f"tree), but it does not: {e}") from None
  for path_flag in flags:
    if not _is_flag(path_flag):
      raise ValueError(
          f"The `mask` of `{factory}` must hold one bool per parameter "
          f"leaf, but got {path_flag!r}.")
  return [bool(flag) for flag in flags]


def _make(factory: str, l1: bool, state_type: type, rate: Any, mask: Mask,
          axis_name: _stats.AxisName) -> optax.GradientTransformationExtraArgs:
  """The transformation adding `rate * (sign(W) if l1 else W)`."""
  if not callable(rate):
    _args.check_number("rate", rate)
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    mask_leaves(mask, params, factory)  # a bad mask fails here
    return state_type(step=jnp.zeros((), jnp.int32),
                      last_rate=jnp.zeros((), jnp.float32),
                      penalty=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _args.require_params(params, factory)
    # No per-layer metrics here: two leaves whose paths write one name
    # (`{"a/b": ..., "a": {"b": ...}}`) are no error.
    _metrics.check_same_tree(updates, params, factory, per_layer=False)
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = [jnp.asarray(_metrics.unwrap(p))
                for p in jax.tree.leaves(params)]
    flags = mask_leaves(mask, params, factory)
    # The chosen leaves, checked here by name for all three (the penalty's
    # reduction would name a leaf by its index among them, and L1's not at
    # all); a leaf the mask leaves out is never measured.
    names = [_metrics.path_name(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    for name, p, flag in zip(names, p_leaves, flags):
      if flag:
        _stats.check_varying_covered(p, axis_name, f"parameter {name!r}")
    raw_rate = rate(state.step) if callable(rate) else rate
    if np.ndim(raw_rate) != 0:  # it would change the state's shapes
      raise ValueError(
          f"`{factory}`'s rate schedule returned an array of shape "
          f"{np.shape(raw_rate)}; a schedule must return one number.")
    # What the state records: a buffer of its own (a float32 array rate, as
    # `optax.inject_hyperparams` passes it, would otherwise be held twice).
    r = jnp.array(raw_rate, jnp.float32, copy=True)
    chosen = [p for p, flag in zip(p_leaves, flags) if flag]
    if l1:
      total = jnp.sum(_stats.per_leaf(
          chosen, lambda block, _: jnp.sum(
              _stats.magnitude(block),
              axis=tuple(range(1, block.ndim))), axis_name, "sum")
                      ) if chosen else jnp.zeros((), jnp.float32)
      penalty, measured = r * total, total
    else:
      norm = _stats.tree_stats(chosen, axis_name=axis_name).global_norm
      penalty = (0.5 * r * norm) * norm  # no overflow before the rate
      measured = norm
    # Python numbers too; an integer update (of a float parameter: an
    # integer one is refused) decays as a float, as in optax.
    u_leaves = [_stats.as_inexact(u) if flag else u
                for u, flag in zip(u_leaves, flags)]
    # The rate in each leaf's own dtype, as optax does (exact in float64),
    # made to wait for the statistic of the parameters, else XLA copies each
    # donated parameter (`_stats.waiting_for`; a norm or a sum of magnitudes
    # is never negative, and NaN < 0 is false). On the scalar rate, not on
    # each update: a select on the update split its fusion, and the generic
    # path of a guard around the decay kept a second update-sized temporary.
    rates = _stats.waiting_for(measured < 0, {
        u.dtype.name: jnp.asarray(raw_rate, u.dtype)
        for u, flag in zip(u_leaves, flags) if flag})

    def decayed(u, p):
      d = (jnp.sign(p) if l1 else p).astype(u.dtype)
      return (u + rates[u.dtype.name] * d).astype(u.dtype)

    out = [decayed(u, p) if flag else u
           for u, p, flag in zip(u_leaves, p_leaves, flags)]
    return jax.tree.unflatten(treedef, out), state_type(
        step=optax.safe_increment(state.step), last_rate=r, penalty=penalty)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


class AddDecayedWeightsState(NamedTuple):
  """State of `add_decayed_weights`: the rate and the penalty it stands for.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.add_decayed_weights(0.1, mask=None)
    >>> _, state = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    >>> print(state.last_rate, f"{float(state.penalty):.3f}")  # 0.1 / 2 * 2
    0.1 0.100

  References:
    Made by `add_decayed_weights` (see its references); `og.metrics` reads it.
  """
  step: jax.Array       # i32[] steps taken (the schedule's argument).
  last_rate: jax.Array  # f32[] the decay rate of the last step (not
  # `rate`, which would make `optax.tree.get(state, "rate")` ambiguous
  # under `optax.inject_hyperparams`).
  penalty: jax.Array    # f32[] rate/2 * ||W||^2 over the decayed leaves.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {"param/weight_decay": self.last_rate,
            "param/weight_decay_penalty": self.penalty}


class AddL2PenaltyState(AddDecayedWeightsState):
  """State of `add_l2_penalty`: the fields of `AddDecayedWeightsState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.add_l2_penalty(0.1, mask=None)
    >>> _, state = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    >>> sorted(og.metrics(state))
    ['param/l2_penalty', 'param/l2_rate']

  References:
    Made by `add_l2_penalty` (see its references); `og.metrics` reads it.
  """

  def _og_metrics(self) -> dict[str, jax.Array]:
    # Its own name for the rate (as `add_l1_penalty`'s), so that a coupled
    # penalty chained beside a decoupled decay reads apart from it.
    return {"param/l2_rate": self.last_rate,
            "param/l2_penalty": self.penalty}


class AddL1PenaltyState(NamedTuple):
  """State of `add_l1_penalty`: the rate and the penalty.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = og.add_l1_penalty(0.1, mask=None)
    >>> _, state = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    >>> print(f"{float(state.penalty):.2f}")  # 0.1 * (1 + 2)
    0.30

  References:
    Made by `add_l1_penalty` (see its references); `og.metrics` reads it.
  """
  step: jax.Array       # i32[] steps taken (the schedule's argument).
  last_rate: jax.Array  # f32[] the penalty rate of the last step (not
  # `rate`: see `AddDecayedWeightsState`).
  penalty: jax.Array    # f32[] rate * ||W||_1 over the penalised leaves.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {"param/l1_rate": self.last_rate,
            "param/l1_penalty": self.penalty}



def add_decayed_weights(
    rate: float | optax.Schedule, *, mask: Mask = _DEFAULT,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Decoupled weight decay: adds `rate * W` to the final updates (AdamW).

  Put it after the optimizer's scaling and before the learning rate, as
  `optax.adamw` does internally, so that the decay is not rescaled by the
  adaptive denominators (Loshchilov & Hutter). With the same rate and mask it
  gives `optax.add_decayed_weights`'s numbers (a schedule included; the
  update keeps its own dtype, where optax promotes a bfloat16 update of
  float32 parameters to float32); unlike
  it, it masks biases and normalisation scales by default, and records the
  rate and the penalty `rate/2 * ||W||^2` it stands for.

  Args:
    rate: the decay rate, a float `>= 0` or an optax schedule of the step.
    mask: which leaves to touch: a tree of bools like the parameters, or a
      callable taking the parameters and returning one (as in optax; under
      `optax.inject_hyperparams`, list a callable in `static_args`). The
      default, `og.decay_mask`, selects Flax kernels and embeddings and
      leaves biases and normalisation scales alone; None selects every
      leaf.
    axis_name: mesh axis name(s) over which the parameters are sharded
      inside `shard_map`, so that the recorded penalty is the whole
      model's (the updates need no reduction). Under `pmap` (or
      `check_vma=False`), where values carry no sharding types, the
      parameters are taken as replicated, as everywhere in this package.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update needs `params`,
    with state `AddDecayedWeightsState` (metrics `param/weight_decay`,
    `param/weight_decay_penalty`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"Dense_0": {"kernel": jnp.full((2,), 2.0),
    ...                       "bias": jnp.full((2,), 2.0)}}
    >>> tx = optax.chain(optax.scale_by_adam(), og.add_decayed_weights(0.1),
    ...                  optax.scale(-1.0))
    >>> zero = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(zero, tx.init(params), params)
    >>> print(updates["Dense_0"]["kernel"], updates["Dense_0"]["bias"])
    [-0.2 -0.2] [-0. -0.]

  References:
    Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization"
    (https://arxiv.org/abs/1711.05101).
  """
  return _make("add_decayed_weights", False,
               AddDecayedWeightsState, rate, mask, axis_name)


def add_l2_penalty(
    rate: float | optax.Schedule, *, mask: Mask = _DEFAULT,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Coupled L2 regularisation: adds the gradient of `rate/2 * ||W||^2`.

  Adds `rate * W` to the gradients; put it before the optimizer, so that
  the penalty's gradient goes through the optimizer like the loss's (classic
  L2 regularisation; with Adam, prefer `add_decayed_weights` after it).

  Args:
    rate: the penalty's rate, a float `>= 0` or an optax schedule.
    mask: which leaves to penalise, as for `add_decayed_weights` (by
      default `og.decay_mask`: Flax kernels and embeddings; None: all).
    axis_name: mesh axis name(s) over which the parameters are sharded, as
      for `add_decayed_weights`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update needs `params`,
    with state `AddL2PenaltyState` (metrics `param/l2_rate`,
    `param/l2_penalty`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"kernel": jnp.array([[1.0, -2.0]])}
    >>> tx = optax.chain(og.add_l2_penalty(0.5), optax.sgd(1.0))
    >>> grads = {"kernel": jnp.zeros((1, 2))}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> penalty = float(og.metrics(state)["param/l2_penalty"])  # 0.5 * 0.5 * 5
    >>> print(updates["kernel"], round(penalty, 6))
    [[-0.5  1. ]] 1.25

  References:
    Krogh & Hertz, 1991, "A Simple Weight Decay Can Improve Generalization"
    (NeurIPS).
  """
  return _make("add_l2_penalty", False,
               AddL2PenaltyState, rate, mask, axis_name)


def add_l1_penalty(
    rate: float | optax.Schedule, *, mask: Mask = _DEFAULT,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """L1 regularisation: adds the gradient of `rate * ||W||_1`.

  Adds `rate * sign(W)` to the gradients (0 where a weight is exactly 0, the
  subgradient that keeps a zero weight at zero); put it before the
  optimizer.

  Args:
    rate: the penalty's rate, a float `>= 0` or an optax schedule.
    mask: which leaves to penalise, as for `add_decayed_weights` (by
      default `og.decay_mask`: Flax kernels and embeddings; None: all).
    axis_name: mesh axis name(s) over which the parameters are sharded, as
      for `add_decayed_weights`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update needs `params`,
    with state `AddL1PenaltyState` (metrics `param/l1_rate`,
    `param/l1_penalty`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"kernel": jnp.array([[1.5, 0.0, -2.0]])}
    >>> tx = og.add_l1_penalty(0.1)
    >>> grads = {"kernel": jnp.zeros((1, 3))}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(updates["kernel"], f"{float(state.penalty):.2f}")
    [[ 0.1  0.  -0.1]] 0.35

  References:
    Tibshirani, 1996, "Regression Shrinkage and Selection via the Lasso",
    J. R. Stat. Soc. B 58(1).
  """
  return _make("add_l1_penalty", True,
               AddL1PenaltyState, rate, mask, axis_name)

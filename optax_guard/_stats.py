"""The one statistics pass over a gradient tree, and the cross-device reduce.

The transformations measure gradient and parameter norms through
`tree_stats` (AGC's per-unit norms use its `sum_terms` and `pmax`, the L1
penalty its `per_leaf`), which reads each block once (each larger leaf
alone, small leaves of one shape, dtype and sharding stacked, which keeps
the compiled program small).
The full pass is one variadic reduction per block: three sums of squares,
two rescaled by powers of two so that norms are right where squares overflow
or underflow (elements above ~1.8e19, large bf16 values), the count of
NaN/Inf elements, and the count of elements above a threshold. How it runs
depends on the backend (`lax.platform_dependent`, decided when the step is
compiled):

* On GPU/TPU every block takes the full pass: a variadic reduction is one
  memory-bound kernel there, and a `lax.cond` would cost a device-to-host
  copy of its predicate (a synchronisation) on every step.
* On CPU, where XLA vectorises a plain sum of squares but runs the variadic
  reduction ~8x slower, for a tree of float32 leaves (other dtypes take the
  full pass: see `_layer_stats`), an ordinary step reads each block once for
  its plain sum of squares, and the rest is decided from those sums by a
  `lax.cond` per block whose branch reads that block only: the full pass
  where a sum is not finite (a NaN or Inf, or overflow) or so small that
  squares may have underflowed, and the count of elements above the
  threshold only where the sum of squares says a block can hold one. The
  branches were checked not to make XLA copy the donated buffers the step
  updates in place.

Both give the same statistics (tested).

Cross-device statistics (`axis_name`): inside `shard_map` JAX types each value
with the mesh axes along which it varies (`vma`). A leaf's sums are `psum`med
over exactly the named axes it varies along, so a replicated bias beside a
sharded kernel is counted once, and the gradient of a replicated parameter
(which `jax.grad` already returns summed and invariant) is not over-counted.
Under `pmap`, or `shard_map(check_vma=False)`, no value is typed: every leaf is
then taken to be replicated over `axis_name` (as after `lax.pmean` of the
gradients), its statistics are measured locally and made identical on every
device by a `pmax`, so any device's NaN or spike decides for all. The lookup
of the typing lives in `varying_axes`, the reduction in `per_leaf`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _metrics

AxisName = str | tuple[str, ...] | None



def axis_names(axis_name: AxisName) -> tuple[str, ...]:
  if axis_name is None:
    return ()
  if isinstance(axis_name, str):
    return (axis_name,)
  return tuple(axis_name)


def any_axis_bound(axis_name: AxisName) -> bool:
  """Whether any named axis is bound here (inside `shard_map`/`pmap`)."""
  for axis in axis_names(axis_name):
    try:
      lax.axis_index(axis)
      return True
    except NameError:  # JAX's "unbound axis name"
      pass
  return False


def bound_axes() -> tuple[str, ...]:
  """The axes of the `shard_map`s (and `pmap`s, which JAX runs as one)
  this runs inside, or () (also on a JAX that does not say)."""
  mesh = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
  return tuple(getattr(mesh, "manual_axes", ()))


def check_axis_name(axis_name: Any) -> None:
  ok = axis_name is None or isinstance(axis_name, str) or (
      isinstance(axis_name, (tuple, list)) and axis_name and
      all(isinstance(a, str) for a in axis_name))
  if not ok:
    raise ValueError(
        "`axis_name` must be None, a mesh axis name or a tuple of them, but "
        f"got {axis_name!r}.")
  if not isinstance(axis_name, (str, type(None))):
    twice = sorted({a for a in axis_name if list(axis_name).count(a) > 1})
    if twice:
      raise ValueError(
          f"`axis_name` names the mesh axis {twice[0]!r} more than once "
          f"({axis_name!r}); name each axis once.")


def varying_axes(x: Any) -> frozenset[str]:
  """The mesh axes along which `x` varies, as JAX types it in `shard_map`.

  jax >= 0.10 records them in `jax.typeof(x).manual_axis_type.varying`, older
  versions in `jax.typeof(x).vma`; outside `shard_map` the set is empty.
  """
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def sharding_spec(x: Any) -> tuple[Any, ...] | None:
  """The mesh axes of Explicit type that shard each dimension of `x`, or
  None where there are none.

  Under `jit` on a mesh of Explicit axes (`jax.make_mesh`'s default) the
  sharding is part of the type, and arrays of different shardings cannot be
  stacked or concatenated. (Auto axes are left to XLA: nothing to do.)
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  explicit_type = getattr(getattr(jax.sharding, "AxisType", None),
                          "Explicit", None)
  if spec is None or mesh is None or explicit_type is None:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  def explicit(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    kept = tuple(n for n in names if n is not None and
                 types.get(n) == explicit_type)
    return kept or None
  dims = tuple(explicit(entry) for entry in spec)
  return dims if any(dims) else None


def replicated(x: jax.Array) -> jax.Array:
  """`x`, resharded to replicated where its type shards it over Explicit
  mesh axes (see `sharding_spec`)."""
  if sharding_spec(x) is None:
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def is_typed(axes: tuple[str, ...]) -> bool:
  """Whether values are typed with their varying axes here (shard_map)."""
  typed, unbound = [], []
  for a in axes:
    try:
      typed.append(a in varying_axes(lax.axis_index(a)))
    except NameError:  # JAX's "unbound axis name", which names axis_index
      unbound.append(a)
  if unbound:
    given = axes[0] if len(axes) == 1 else axes
    raise ValueError(
        f"axis_name={given!r} names mesh axes {unbound} that are not bound "
        "where the update runs: check the names against the axes of your "
        "mesh or `pmap(axis_name=...)`, and pass axis_name only inside "
        "`jax.shard_map` or `jax.pmap` over those axes; under plain "
        "`jax.jit` with sharded arrays leave axis_name=None (the statistics "
        "are then global by construction).")
  return all(typed)


def pmax(values: Any, axes: tuple[str, ...]) -> Any:
  """`lax.pmax` in which any device's non-finite value stays non-finite:
  NaN if a device has NaN (XLA's cross-device max on CPU drops it), else
  +Inf if one has +Inf, else -Inf if one has -Inf (a loss of -Inf on one
  device must not be outvoted by the others' finite ones), else the max.

  Its derivative is each device's own: the values it agrees on are taken
  to be replicated (`pmap`), so that `jax.grad` through it under `pmap`
  equals the gradient on one device."""
  if isinstance(values, tuple):  # columns (see `per_leaf`)
    return tuple(pmax(v, axes) for v in values)
  if not jnp.issubdtype(values.dtype, jnp.inexact):
    return lax.pmax(values, axes)
  return _worst(values, axes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _worst(values: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  nan, minus_inf = jnp.isnan(values), values == -jnp.inf
  rows = lax.pmax(jnp.stack([jnp.where(nan, jnp.inf, values),
                             nan.astype(values.dtype),
                             minus_inf.astype(values.dtype)]), axes)
  top = jnp.where((rows[2] > 0) & jnp.isfinite(rows[0]), -jnp.inf, rows[0])
  # A device's NaN made here only where one is (`rows[0]` is then +Inf, and
  # Inf * 0 is NaN; `abs` clears the sign it may get): a NaN constant, made
  # on every step, is what `jax_debug_nans` flags op by op (under
  # `jax.disable_jit`).
  any_nan = rows[1] > 0
  return jnp.where(any_nan, jnp.abs(jnp.where(any_nan, rows[0], 1.0) * 0),
                   top)


@_worst.defjvp
def _worst_jvp(axes, primals, tangents):
  # The selects above have no transpose; the local tangent is linear.
  return _worst(primals[0], axes), tangents[0]


def all_reduce(rows: Sequence[jax.Array], axis_name: AxisName,
               op: str) -> jax.Array:
  """Reduces a few per-leaf scalars over the devices (see `per_leaf`)."""
  return per_leaf(list(rows), lambda block, _: block, axis_name, op,
                  like=rows)


# Leaves of at most this many elements are measured stacked with the other
# leaves of their shape: one reduction for all the biases of a width instead
# of one each, which keeps the compiled program (and its compile time) small.
# Stacking copies them, which costs little at this size.
_STACK_BELOW = 1 << 15


class Blocks(NamedTuple):
  """Leaves grouped for measuring: each small leaf stacked with the others of
  its shape, dtype, sharding (`sharding_spec`) and typing, each larger leaf
  alone."""
  arrays: list[jax.Array]          # [k, ...] per block.
  index: list[np.ndarray]          # the k leaf indices of each block.
  axes: list[tuple[str, ...]]      # the mesh axes each block is summed over.
  typed: bool                      # whether values are typed (shard_map).

  def one(self, i: int) -> "Blocks":
    """The `i`-th block alone."""
    return Blocks([self.arrays[i]], [self.index[i]], [self.axes[i]],
                  self.typed)


def as_inexact(x: Any) -> jax.Array:
  """`x` as an array of floats: an integer one (or a Python number) in the
  default float dtype, as optax's arithmetic on it with a float gives."""
  refuse_float0([x])
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(jnp.result_type(float))
  return x


def refuse_float0(leaves: Sequence[Any]) -> None:
  """Raises where a gradient leaf is float0 (no values to use)."""
  if any(getattr(x, "dtype", None) == jax.dtypes.float0 for x in leaves):
    raise ValueError(
        "A gradient leaf has dtype float0, which is what "
        "jax.grad(..., allow_int=True) gives an integer parameter: it holds "
        "no values to measure or scale. Leave integer parameters out of the "
        "tree (or out of the transformation with optax.masked).")


def as_arrays(leaves: Sequence[Any]) -> list[Any]:
  """The leaves, Python numbers among them as arrays (optax takes a tree of
  floats as parameters); float0 ones refused."""
  refuse_float0(leaves)
  return [x if hasattr(x, "shape") else jnp.asarray(x) for x in leaves]


def layer_starts(leaves: Sequence[Any],
                 stacked: Sequence[bool] | None) -> np.ndarray:
  """The index of each leaf's first layer, and the layer count after the
  last (a stacked leaf holds one layer per entry of its leading axis)."""
  stacked = stacked or (False,) * len(leaves)
  return np.cumsum([0] + [np.shape(x)[0] if flag else 1
                          for x, flag in zip(leaves, stacked)])


def layer_values_by_leaf(values: jax.Array, leaves: Sequence[Any],
                         stacked: Sequence[bool] | None) -> list[jax.Array]:
  """A per-layer vector (`values[L]`) given to each leaf: a scalar, or for
  a stacked leaf its layers' values shaped to broadcast along its leading
  axis."""
  stacked = stacked or (False,) * len(leaves)
  starts = layer_starts(leaves, stacked)
  return [values[starts[i]:starts[i + 1]].reshape(
              (np.shape(x)[0],) + (1,) * (np.ndim(x) - 1)) if flag
          else values[starts[i]]
          for i, (x, flag) in enumerate(zip(leaves, stacked))]


def blocks_of(leaves: Sequence[jax.Array], axis_name: AxisName,
              like: Sequence[Any] | None = None,
              stacked: Sequence[bool] | None = None) -> Blocks:
  """Groups `leaves` into `Blocks` (`like`: what says where each varies).

  A leaf flagged in `stacked` holds one layer per entry of its leading axis
  (`_metrics.stacked_flags`): it is a block as it is, and its layers are
  measured apart. Indices number the layers, in leaf order.
  """
  leaves = as_arrays(leaves)
  like = leaves if like is None else like
  stacked = [False] * len(leaves) if stacked is None else stacked
  axes = axis_names(axis_name)
  typed = bool(axes) and is_typed(axes)

  def over(leaf):  # the axes this leaf is summed over
    return tuple(a for a in axes if a in varying_axes(leaf)) if typed else ()

  firsts = layer_starts(leaves, stacked)
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    if stacked[i]:
      key = ("stacked", i, over(like[i]))
    elif x.size <= _STACK_BELOW:
      key = (x.shape, x.dtype, sharding_spec(x), over(like[i]))
    else:
      key = ("alone", i, over(like[i]))
    groups.setdefault(key, []).append(i)
  arrays, index = [], []
  for key, members in groups.items():
    if key[0] == "stacked":
      arrays.append(leaves[members[0]])
      index.append(np.arange(firsts[members[0]], firsts[members[0] + 1]))
    else:
      arrays.append(leaves[members[0]][None] if len(members) == 1 else
                    jnp.stack([leaves[i] for i in members]))
      index.append(firsts[members])
  return Blocks(arrays, index, [key[-1] for key in groups], typed)


def reduce_blocks(blocks: Blocks, reduce_block: Any, axis_name: AxisName,
                  op: str) -> Any:
  """Measures every block and reduces over the devices (see `per_leaf`)."""
  # Blocks are concatenated per typing, so that one collective serves each.
  by_typing: dict[tuple[str, ...], tuple[list[Any], list[int]]] = {}
  for block, index, axes in zip(blocks.arrays, blocks.index, blocks.axes):
    parts, order = by_typing.setdefault(axes, ([], []))
    # Replicated, so that blocks of different shardings concatenate.
    parts.append(jax.tree.map(replicated, reduce_block(block, index)))
    order.extend(index.tolist())
  reduce = {"sum": lax.psum, "mean": lax.pmean, "max": pmax}[op]
  concatenate = lambda parts: jax.tree.map(lambda *p: jnp.concatenate(p),
                                           *parts)
  parts, order = [], []
  for group_axes, (group_parts, group_order) in by_typing.items():
    values = concatenate(group_parts)
    parts.append(reduce(values, group_axes) if group_axes else values)
    order.extend(group_order)
  values = concatenate(parts)
  if order != sorted(order):
    values = permuted(values, np.argsort(np.asarray(order)))
  axes = axis_names(axis_name)
  if axes and not blocks.typed:
    # pmap / check_vma=False: leaves taken as replicated; agree on the worst.
    values = pmax(values, axes)
  return values


def permuted(columns: Any, positions: np.ndarray) -> Any:
  """`column[positions]` for each column of a tuple (or one column).

  XLA rewrites such a gather as one that ends in a reshape, and then moves
  that reshape through the arithmetic that follows, one operation per round
  of its simplifier, each round going over the whole step when it
  compiles. The barrier stops it there.
  """
  return lax.optimization_barrier(
      jax.tree.map(lambda v: v[positions], columns))


def per_leaf(leaves: Sequence[jax.Array], reduce_block: Any,
             axis_name: AxisName, op: str,
             like: Sequence[Any] | None = None,
             stacked: Sequence[bool] | None = None) -> Any:
  """Measures every leaf and reduces over the devices: the one place for both.

  Args:
    leaves: the arrays to measure.
    reduce_block: maps a block `[k, ...]` of `k` leaves of one shape, and
      the indices of those leaves, to their statistics `[k, ...]` (reducing
      every axis but the first), or to a tuple of such columns. Columns
      are cheaper to compile than one `[k, m]` array sliced afterwards: XLA
      moves the reshape of each slice through the arithmetic that follows,
      one operation per round of its simplifier over the whole step.
    axis_name: the mesh axes to reduce over, or None.
    op: `"sum"` for sums and counts, `"mean"` for a per-device value such as
      a loss, `"max"` for maxima.
    like: what says where each leaf varies, if not the leaves themselves.
    stacked: which leaves stack layers along their leading axis (see
      `blocks_of`), or None.

  Returns:
    `[layers, ...]` statistics (or a tuple of such columns) in layer order
    (one layer per leaf, or per entry of a stacked leaf's leading axis),
    global and identical on every device (and typed invariant inside
    `shard_map`).
  """
  return reduce_blocks(blocks_of(leaves, axis_name, like, stacked),
                       reduce_block, axis_name, op)


def _rest(block: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, block.ndim))


def waiting_for(never: jax.Array, tree: Any) -> Any:
  """`tree` unchanged, made to depend on `never`, a predicate that is never
  true (a statistic compared with an impossible value).

  Nothing else orders a transformation's read of the parameters before
  their in-place update, and XLA then copies every donated parameter
  buffer; with the gradients computed in the step, it also copied a
  layer's kernel that the backward pass still reads. Each update made to
  wait for the statistic of the parameters keeps that order. The select
  never fires, but XLA cannot know that.
  """
  never = computed_once(never)  # not once per leaf
  return jax.tree.map(lambda u: jnp.where(never, jnp.zeros_like(u), u), tree)


def computed_once(scalars: Any) -> Any:
  """`scalars` (a tree of 0-d arrays), bit for bit, computed once per step.

  A guard's decision (keep, clip factors) is a chain of scalar arithmetic
  over its statistics that every leaf's update reads. XLA copies cheap
  scalar producers into each consumer's fused kernel, so at 1,000 leaves it
  compiled that chain thousands of times (~3x the instructions of the bare
  optimizer). Neither `lax.optimization_barrier` nor a nested `jit` stops it
  (both are gone before fusion), but XLA never copies a sort: the scalars,
  each stacked twice, are sorted by their positions, which leaves every
  value as it was (NaN and -0.0 included), and each kernel then reads the
  finished value. All are taken back out of their pairs by one variadic
  reduction (the max of two equal values, compared as integers: a float
  max would flush a subnormal to zero) rather than slices: a slice is fused
  into every kernel that reads it, two more instructions in each of
  thousands of kernels, and one reduction is one kernel (on a GPU, one
  launch) for all the scalars.
  """
  leaves, treedef = jax.tree.flatten(scalars)
  if not leaves:
    return scalars
  for x in leaves:
    if jnp.ndim(x) != 0:
      raise ValueError(f"computed_once takes scalars, got shape {jnp.shape(x)}.")
  return treedef.unflatten(_once(tuple(map(jnp.asarray, leaves))))


@jax.custom_jvp
def _once(leaves: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """The identity on scalars, by a sort XLA will not copy (`computed_once`)."""
  positions = jnp.arange(2, dtype=jnp.int32)
  pairs = [jnp.stack([x, x]) for x in leaves]
  sorted_pairs = lax.sort((positions, *pairs), num_keys=1)[1:]
  as_ints = [_as_integers(pair) for pair in sorted_pairs]
  lowest = tuple(np.zeros((), x.dtype) if x.dtype == jnp.bool_ else
                 np.array(np.iinfo(x.dtype).min, x.dtype) for x in as_ints)
  either = lambda a, b: tuple(
      (u | v) if u.dtype == jnp.bool_ else jnp.maximum(u, v)
      for u, v in zip(a, b))
  values = lax.reduce(tuple(as_ints), lowest, either, (0,))
  return tuple(
      v if v.dtype == pair.dtype else lax.bitcast_convert_type(v, pair.dtype)
      for v, pair in zip(values, sorted_pairs))


@_once.defjvp
def _once_jvp(primals, tangents):
  # The identity's derivative: through integer bits, JAX's own would be 0,
  # and `jax.grad` through a clip would treat its factor as a constant.
  return _once(*primals), tangents[0]


def _as_integers(x: jax.Array) -> jax.Array:
  """Floats as integers of their bits (order kept for equal values); others
  as they are."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))


def count_if(flag: jax.Array, counter: jax.Array) -> jax.Array:
  """Adds one to an int32 counter where `flag` holds, saturating at int32 max."""
  return jnp.where(flag, optax.safe_increment(counter), counter)


def total_count(counts: jax.Array) -> jax.Array:
  """The int32 sum of non-negative int32 counts (per layer), exact, and
  saturating at int32 max instead of wrapping to a negative number (a model
  of over 2**31 elements, every one NaN or clipped)."""
  if isinstance(counts, (np.ndarray, np.generic)):  # a state on the host
    return np.int32(min(int(np.sum(counts, dtype=np.int64)),
                        _args.INT32_MAX))
  # Plain sums only: a reduction with a computation of its own cannot be
  # split over devices (a count vector sharded under `jit` failed to
  # compile). The int32 sum is exact, or wraps: negative for a total in
  # [2**31, 2**32); the float32 sum, good to far better than a third,
  # tells a larger total.
  # (int32 under 64-bit mode too, where a sum's default would be int64.)
  exact = jnp.sum(counts, dtype=jnp.int32)
  rough = jnp.sum(counts, dtype=jnp.float32)
  wrapped = (exact < 0) | (rough >= 1.5 * 2.0**31)
  return jnp.where(wrapped, jnp.int32(_args.INT32_MAX), exact)


def check_varying_covered(tree: Any, axis_name: AxisName,
                          what: str = "gradient leaf") -> None:
  """Raises when a leaf varies along a mesh axis that `axis_name` omits
  (`what`: the kind of leaf, for the message; a bare array is named by it)."""
  axes = set(axis_names(axis_name))
  if axes:  # an unbound axis is the first thing to say (and to fix)
    is_typed(axis_names(axis_name))
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in paths:
    missing = sorted(varying_axes(leaf) - axes)
    if missing:
      name = f"{what} {_metrics.path_name(path)!r}" if path else what
      raise ValueError(
          f"The {name} varies along mesh axes {missing} that "
          f"axis_name={axis_name!r} does not name, so its statistics (and "
          "the decisions taken on them) would differ from device to device; "
          "pass every mesh axis it varies along, e.g. "
          f"axis_name={tuple(sorted(axes | set(missing)))!r}.")


class TreeStats(NamedTuple):
  """Global statistics of a tree, one entry per leaf (all float32/int32)."""
  norms: jax.Array       # f32[L] L2 norm of each leaf (NaN/Inf if non-finite).
  nonfinite: jax.Array   # i32[L] NaN/Inf elements of each leaf.
  sizes: jax.Array       # f32[L] number of elements of each (global) leaf.
  count_above: jax.Array | None  # i32[L] elements with |x| > threshold.
  global_norm: jax.Array  # f32[] L2 norm of the whole tree, overflow-safe.

  @property
  def finite(self) -> jax.Array:
    """bool[]: every element of every leaf is finite."""
    return jnp.all(self.nonfinite == 0)

  @property
  def norm_overflows(self) -> jax.Array:
    """bool[]: the elements are finite but the global norm exceeds float32."""
    return self.finite & ~jnp.isfinite(self.global_norm)


def _prescale(top: jax.Array) -> jax.Array:
  """An exact power of two that brings `top` below 2**64.

  Dividing by a number above 2**126 is wrong under XLA: it becomes a
  multiplication by a subnormal reciprocal, flushed to zero. Norms are
  therefore scaled into range first.
  """
  return jnp.where(top > 2.0**64, 2.0**-64, 1.0)


@jax.custom_jvp
def combine_norms(norms: jax.Array) -> jax.Array:
  """The L2 norm of a vector of norms, without overflow or underflow."""
  if norms.shape[0] == 0:
    return jnp.zeros((), jnp.float32)
  top = jnp.max(norms)
  factor = _prescale(top)
  safe = jnp.where((top > 0) & jnp.isfinite(top), top * factor, 1.0)
  # Not finite: `top` is NaN where a norm is (`max` keeps it), else Inf. No
  # NaN constant is made, which `jax_debug_nans` would flag op by op (under
  # `jax.disable_jit`) on every finite step.
  return jnp.where(
      jnp.isfinite(top),
      safe * jnp.sqrt(jnp.sum(jnp.square(norms * factor / safe))) / factor,
      top)


@combine_norms.defjvp
def _combine_norms_jvp(primals, tangents):
  (norms,), (dnorms,) = primals, tangents
  total = combine_norms(norms)
  return total, _dot_over(norms, dnorms, total)


def _dot_over(x: jax.Array, dx: jax.Array, norm: jax.Array) -> jax.Array:
  """The derivative of an L2 norm, `sum(x * dx) / norm`, taken as 0 where
  the norm is 0 or not finite (where sqrt's own, Inf times a zero
  cotangent, makes NaN of every derivative that meets it). `x` is read
  only where the norm is finite, so that the transpose's zero cotangent
  meets no NaN/Inf of `x` either (0 * NaN)."""
  ok = (norm > 0) & jnp.isfinite(norm)
  scaled = jnp.where(ok, x, 0.0) / jnp.where(ok, norm, 1.0)
  return jnp.where(ok, jnp.sum(scaled * dx), 0.0)


def magnitude(x: jax.Array) -> jax.Array:
  """`|x|` in float32 (the modulus of a complex `x`). A real `x` is cast
  first: `abs` in an integer type wraps its minimum (int8's -128) to
  itself."""
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(jnp.float32)
  return jnp.abs(x.astype(jnp.float32))


def computed_in(dtype: Any, at_least: Any = jnp.float32) -> Any:
  """The dtype a float or complex leaf of `dtype` is computed in: float32,
  or wider where the leaf (or `at_least`) is (float64); complex for a
  complex leaf, whose imaginary part a real dtype would drop."""
  dtype = jnp.dtype(dtype)
  is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
  part = jnp.finfo(dtype).dtype if is_complex else dtype
  real = jnp.dtype(jnp.float64 if jnp.float64 in (part, jnp.dtype(at_least))
                   else jnp.float32)
  if not is_complex:
    return real
  return jnp.dtype(jnp.complex128 if real == jnp.float64 else jnp.complex64)


def abs_sq(x: jax.Array) -> jax.Array:
  """`|x|**2`, real for a complex `x` (differentiable everywhere, unlike
  the square of `abs`)."""
  return (x * jnp.conj(x)).real if jnp.iscomplexobj(x) else jnp.square(x)


def scale_leaf(g: jax.Array, a: jax.Array, b: jax.Array | None = None
               ) -> jax.Array:
  """`(g * a) * b` in `g`'s dtype, computed in float32 or wider: complex and
  float64 leaves keep their imaginary part and precision (`a`, `b`: float32
  scalars, or arrays that broadcast against `g`; a Python number `g` is
  taken as an array, as `jit` would; an integer one as floats, which a
  factor below 1 would otherwise round to 0)."""
  g = as_inexact(g)
  wide = g.dtype if jnp.dtype(g.dtype).itemsize >= 4 else jnp.float32
  out = g.astype(wide) * a.astype(wide)
  if b is not None:
    out = out * b.astype(wide)
  return out.astype(g.dtype)


# The full pass sums three squares in one read: the plain one, and two
# rescaled by exact powers of two for the rare leaf whose squares overflow
# float32 (elements above ~1.8e19, or large bf16 values) or underflow it
# (elements below ~1e-19, flushed to zero).
_DOWN, _UP = 2.0**-80, 2.0**80
# Below `size * _UNDERFLOW_FLOOR` the plain sum may have lost its small terms;
# the relative error of the plain sum above it is at most ~1.5e-8.
_UNDERFLOW_FLOOR = 2.0**-100


# The most terms one accumulator of `sum_terms` adds up in a row.
_ROW = 4096


def sum_terms(terms: Sequence[jax.Array], axes: tuple[int, ...]
              ) -> tuple[jax.Array, ...]:
  """Sums several same-shaped arrays over `axes` in one variadic reduction.

  In stages, the last axis first, in rows of at most `_ROW` terms whose sums
  then take its place: XLA:CPU accumulates a variadic reduction
  sequentially, and one float32 accumulator over millions of terms drifts
  (2% low on a 20M-element vector). Rows of 4096 bound the relative error
  of a sum of squares by ~4096 float32 roundings (2.4e-4; measured: 2e-7 on
  normal data, 4e-5 on 100,000 equal terms, against float64), where the
  plain pass's vectorised sum is within ~1e-7. Each array keeps its dtype
  (counts as int32: exact).

  Off the CPU, where reductions accumulate as trees, the sum is one
  reduction over `axes` (no rows, no reshapes to partition).
  """
  terms, axes = tuple(terms), tuple(sorted(axes))
  if math.prod(terms[0].shape[a] for a in axes) <= _ROW:
    return _in_rows(terms, axes)
  return lax.platform_dependent(cpu=lambda: _in_rows(terms, axes),
                                default=lambda: _add_up(terms, axes))


def _in_rows(terms: tuple[jax.Array, ...], axes: tuple[int, ...]
             ) -> tuple[jax.Array, ...]:
  """`sum_terms` in stages of at most `_ROW` terms (see there), each axis on
  its own, the last first."""
  for axis in sorted(axes, reverse=True):
    terms = _sum_axis(terms, axis)
  return terms


def _sum_axis(terms: tuple[jax.Array, ...], axis: int
              ) -> tuple[jax.Array, ...]:
  """Sums `terms` over `axis` in rows of at most `_ROW` terms.

  A long axis is first split into `gcd(length, device count)` blocks (or a
  multiple of its shard count, where its type names the Explicit mesh axes
  that shard it), which are summed apart and then together: an axis
  sharded `k` ways (`k` divides both) then holds whole blocks on each
  device, so its rows never straddle two shards. Rows that did made XLA
  gather the whole leaf onto every device (61 MiB of temporaries per device
  for a 256 x 11008 kernel split 8 ways), and under `jit` on a mesh of
  Explicit axes the reshape was refused.
  """
  n = terms[0].shape[axis]
  blocks = 1
  if n > _ROW:
    blocks = math.gcd(n, jax.device_count())
    spec = sharding_spec(terms[0])
    if spec and spec[axis]:
      mesh = jax.typeof(terms[0]).sharding.mesh
      shards = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[name]
                         for name in spec[axis])
      if n % shards == 0:  # (a mesh of 6 of 8 devices, say)
        blocks = math.lcm(blocks, shards)
  if blocks > 1:
    shape = terms[0].shape
    split = shape[:axis] + (blocks, n // blocks) + shape[axis + 1:]
    terms = tuple(x.reshape(split) for x in terms)
    return _add_up(_sum_axis_in_rows(terms, axis + 1), (axis,))
  return _sum_axis_in_rows(terms, axis)


def _sum_axis_in_rows(terms: tuple[jax.Array, ...], axis: int
                      ) -> tuple[jax.Array, ...]:
  """Sums `terms` over `axis`, padded to rows of `_ROW` while it is longer."""
  while (n := terms[0].shape[axis]) > _ROW:
    # Zeros pad the axis to whole rows (nothing to the sums or counts).
    rows = -(-n // _ROW)
    pad = [(0, 0)] * terms[0].ndim
    pad[axis] = (0, rows * _ROW - n)
    shape = terms[0].shape[:axis] + (rows, _ROW) + terms[0].shape[axis + 1:]
    terms = _add_up(tuple(jnp.pad(x, pad).reshape(shape) for x in terms),
                    (axis + 1,))
  return _add_up(terms, (axis,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _add_up(terms: tuple[jax.Array, ...], axes: tuple[int, ...]
            ) -> tuple[jax.Array, ...]:
  """One variadic sum of `terms` over `axes`."""
  zeros = tuple(jnp.zeros((), x.dtype) for x in terms)
  return lax.reduce(terms, zeros,
                    lambda a, b: tuple(u + v for u, v in zip(a, b)), axes)


@functools.partial(_add_up.defjvp, symbolic_zeros=True)
def _add_up_jvp(axes, primals, tangents):
  # A sum is linear: the tangent is the sum of the tangents (JAX's own rule
  # for a variadic reduction fails on the counts' integer operands, so that
  # `jax.grad` through a clip or a monitor crashed). Counts have none: a
  # symbolic zero keeps the varying-axes type of `shard_map`.
  (terms,), (dterms,) = primals, tangents
  out = _add_up(terms, axes)
  zero = jax.custom_derivatives.SymbolicZero
  return out, tuple(
      zero(jax.typeof(o).to_tangent_aval()) if isinstance(d, zero)
      else jnp.sum(d, axis=axes) for d, o in zip(dterms, out))


def square_terms(x: jax.Array) -> list[jax.Array]:
  """The three squares whose sums `pick_norm` turns into a norm, in float32
  (`x` of any float or complex dtype; a complex one by its modulus)."""
  # `x` and the scales pass through a barrier: where XLA sees that `x` is a
  # broadcast scalar (the gradient of an unused parameter is a constant zero
  # in the same step), its simplifier rewrites `(x * c)**2` as
  # `x**2 * c**2`, and `c**2` (2**160, 2**-160) is not a float32: 0 * inf
  # made the norm NaN and the guard skip every step. The conversion to
  # float32 comes after the barrier, so that it stays fused in the reduction.
  if jnp.iscomplexobj(x):
    x = magnitude(x)
  x, down, up = lax.optimization_barrier(
      (x, jnp.float32(_DOWN), jnp.float32(_UP)))
  x = x.astype(jnp.float32)
  return [x * x, jnp.square(x * down), jnp.square(x * up)]


def pick_norm(sumsq: jax.Array, big: jax.Array, small: jax.Array,
              sizes: Any) -> jax.Array:
  """The right norm from the sums of `square_terms` over `sizes` elements."""
  overflow = ~jnp.isfinite(sumsq)
  underflow = sumsq < sizes * _UNDERFLOW_FLOOR
  # The square roots not picked see 1, not 0: the derivative of sqrt at 0
  # (Inf) times the zero cotangent of a branch not taken is NaN.
  root = lambda x, picked: jnp.sqrt(jnp.where(picked, x, 1.0))
  return jnp.where(
      overflow, root(big, overflow) / _DOWN,
      jnp.where(underflow, root(small, underflow) / _UP, jnp.sqrt(sumsq)))


def tree_stats(tree: Any, *, axis_name: AxisName = None,
               count_above: Any = None,
               stacked: Sequence[bool] | None = None,
               groups: np.ndarray | None = None,
               full: bool = False) -> TreeStats:
  """Measures every leaf of `tree` (see `layer_stats`); with `groups`
  (`int[L]`, each layer's group: `_metrics.Layout`), one entry per group of
  layers instead: the norm of the group's layers together, their counts and
  sizes summed."""
  stats = layer_stats(tree, axis_name=axis_name, count_above=count_above,
                      stacked=stacked, full=full)
  if groups is None:
    return stats
  # Each group's norms in a row, padded with zeros (which add nothing to a
  # norm): `[groups, largest group]`, not `[groups, layers]`.
  members = _group_members(groups)
  padded = jnp.concatenate([stats.norms, jnp.zeros((1,), stats.norms.dtype)])
  return TreeStats(
      jax.vmap(combine_norms)(padded[members]),
      group_sums(stats.nonfinite, groups), group_sums(stats.sizes, groups),
      None if stats.count_above is None else group_sums(stats.count_above,
                                                        groups),
      stats.global_norm)


def _group_members(groups: np.ndarray) -> np.ndarray:
  """`int[G, M]`: the layers of each group, padded with `len(groups)`."""
  members = [np.flatnonzero(groups == g) for g in range(_num_groups(groups))]
  table = np.full((len(members), max(map(len, members), default=0)),
                  len(groups), np.int32)
  for row, layers in zip(table, members):
    row[:len(layers)] = layers
  return table


def _num_groups(groups: np.ndarray) -> int:
  return int(groups.max()) + 1 if groups.size else 0


def nonfinite_to_zero(tree: Any) -> Any:
  """The tree with every NaN/Inf element replaced by 0 (integer and bool
  leaves, which hold none, unchanged)."""
  return jax.tree.map(
      lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), tree)


def any_nonfinite(tree: Any, *, axis_name: AxisName = None,
                  stacked: Sequence[bool] | None = None) -> jax.Array:
  """bool[]: whether any element of `tree` is NaN or Inf, on any device.

  One plain (vectorised) sum per block: `x * 0` is an exact zero for a
  finite `x` and NaN otherwise, so a block's sum is zero exactly when the
  block is finite, with no overflow (a sum of squares overflows for finite
  elements above ~1.8e19). The counts, where needed, are taken apart.
  """
  check_varying_covered(tree, axis_name)
  leaves = as_arrays(jax.tree_util.tree_leaves(tree))
  if not leaves:
    return jnp.zeros((), jnp.bool_)

  def flag_block(block, _):
    zero = jnp.sum(block * jnp.zeros((), block.dtype), axis=_rest(block))
    return jnp.where(zero == 0, 0.0, 1.0)

  return jnp.any(per_leaf(leaves, flag_block, axis_name, "sum",
                          stacked=stacked) > 0)


def group_sums(values: jax.Array, groups: np.ndarray) -> jax.Array:
  """`[G, ...]`: the sums of `values` (`[L, ...]`) over each group's layers
  (`groups`: each layer's group). A segment sum, linear in the layers: a
  `[G, L, ...]` mask had made temporaries grow with their square."""
  return jax.ops.segment_sum(values, groups, _num_groups(groups))


def layer_stats(tree: Any, *, axis_name: AxisName = None,
                count_above: Any = None,
                stacked: Sequence[bool] | None = None,
                full: bool = False) -> TreeStats:
  """Measures every leaf of `tree` (see `_layer_stats`)."""
  return _layer_stats(tree, count_above, axis_name,
                      None if stacked is None else tuple(stacked), full)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _layer_stats(tree: Any, count_above: Any, axis_name: AxisName,
                 stacked: tuple[bool, ...] | None, full: bool) -> TreeStats:
  """Measures every leaf of `tree` (see module docstring).

  The common step costs one plain sum of squares per leaf; the full pass
  (rescaled sums and NaN/Inf counts) and the count of large elements run
  only on the leaves that need them (see the module docstring).

  Args:
    tree: a tree of arrays of any float dtype.
    axis_name: mesh axes to reduce over (see `per_leaf`).
    count_above: if not None, also count elements with `|x| > count_above`.
    stacked: which leaves stack layers along their leading axis
      (`_metrics.stacked_flags`); their layers are measured apart.
    full: take the full pass on every block, on every backend (no
      per-block conditionals; for a tree that is read on a rare path).

  Returns:
    A `TreeStats` of global, replica-identical values, one entry per layer.
  """
  check_varying_covered(tree, axis_name)
  axes = axis_names(axis_name)
  if axes and not is_typed(axes):
    # Untyped (pmap): measure locally, then agree on the worst device, taking
    # the global norm as a whole so that it is one device's true norm.
    local = _layer_stats(tree, count_above, None, stacked, full)
    rows = jnp.concatenate([jnp.stack([local.norms, local.sizes], axis=1
                                      ).reshape(-1), local.global_norm[None]])
    rows = pmax(rows, axes)
    leafwise = rows[:-1].reshape(-1, 2)
    count = (None if local.count_above is None else
             lax.pmax(local.count_above, axes))
    return TreeStats(leafwise[:, 0], lax.pmax(local.nonfinite, axes),
                     leafwise[:, 1], count, rows[-1])

  leaves = as_arrays(jax.tree_util.tree_leaves(tree))
  if not leaves:
    empty = jnp.zeros((0,), jnp.float32)
    ints = empty.astype(jnp.int32)
    return TreeStats(empty, ints, empty,
                     None if count_above is None else ints,
                     jnp.zeros((), jnp.float32))
  blocks = blocks_of(leaves, axis_name, stacked=stacked)
  if full or any(x.dtype != jnp.float32 for x in leaves):
    # bf16/f16 (and complex): on the CPU too, XLA hoists the conversion to
    # float32 out of the per-block conditionals and keeps a float32 copy of
    # every block (2x the gradients), and the full pass ran faster there.
    return _full_stats(blocks, axis_name, count_above)
  return lax.platform_dependent(
      cpu=lambda: _decided_stats(blocks, axis_name, count_above),
      default=lambda: _full_stats(blocks, axis_name, count_above))


@functools.partial(_layer_stats.defjvp, symbolic_zeros=True)
def _layer_stats_jvp(axis_name, stacked, full, primals, tangents):
  # The norms' derivatives, taken directly (`_dot_over`): through the
  # statistics pass, a zero leaf, tiny elements or the rescaled squares of
  # huge ones made NaN of every derivative of the tree. Counts and sizes
  # have none.
  tree, count_above = primals
  stats = _layer_stats(tree, count_above, axis_name, stacked, full)
  zero = jax.custom_derivatives.SymbolicZero
  leaves, treedef = jax.tree.flatten(tree)
  dleaves = treedef.flatten_up_to(tangents[0])
  dleaves = [jnp.zeros(d.aval.shape, d.aval.dtype) if isinstance(d, zero)
             else d for d in dleaves]
  leaves = as_arrays(leaves)
  ok = (stats.norms > 0) & jnp.isfinite(stats.norms)
  inverse = jnp.where(ok, 1.0 / jnp.where(ok, stats.norms, 1.0), 0.0)
  products = []
  for x, dx, factor in zip(leaves, dleaves,
                           layer_values_by_leaf(inverse, leaves, stacked)):
    # d|x| = Re(conj(x / |x|) dx), per element (x / |x| <= 1: no overflow),
    # then summed per layer.
    wide = x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
    # Where a layer's norm is 0 or not finite its factor is 0: its elements
    # are not read either, or the transpose would make 0 * NaN of the
    # cotangent of a NaN step that a guard skips.
    unit = jnp.where(factor != 0, wide, 0) * factor.astype(wide.dtype)
    products.append(jnp.real(jnp.conj(unit) * dx.astype(wide.dtype)))
  axes = axis_names(axis_name)
  # Untyped (pmap): leaves taken as replicated, so each device's own
  # derivative (that of `pmax`); the typed sums are linear, and kept.
  summed_over = axis_name if is_typed(axes) else None
  dnorms = reduce_blocks(
      blocks_of(products, summed_over, like=leaves, stacked=stacked),
      lambda block, _: jnp.sum(block, axis=_rest(block)), summed_over, "sum")
  dglobal = _dot_over(stats.norms, dnorms, stats.global_norm)
  like = lambda x: zero(jax.typeof(x).to_tangent_aval())
  return stats, TreeStats(
      dnorms, like(stats.nonfinite), like(stats.sizes),
      None if stats.count_above is None else like(stats.count_above),
      dglobal)


def _decided_stats(blocks: Blocks, axis_name: AxisName,
                   count_above: Any) -> TreeStats:
  """CPU: plain sums of squares, the rest decided per block (see above)."""

  def plain_pass(block, _):
    # A plain sum of squares: the reduction XLA:CPU vectorises (~8x faster
    # than the variadic one of the full pass).
    x = block.astype(jnp.float32)
    size = jnp.full((block.shape[0],), math.prod(block.shape[1:]), jnp.float32)
    return jnp.sum(x * x, axis=_rest(block)), size

  # Each block's own sums, taken once: a block summed over no mesh axis
  # decides from them alone (below), so that its conditional waits for that
  # block only, not for every block's sum (with the gradients computed in
  # the step, that kept every gradient leaf alive at once).
  # (Replicated as `reduce_blocks` makes them: a stacked leaf sharded along
  # its layers has sharded sums, and both branches must give one type.)
  own = [jax.tree.map(replicated, plain_pass(block, index))
         for block, index in zip(blocks.arrays, blocks.index)]
  by_index = {id(index): sums for index, sums in zip(blocks.index, own)}
  sumsq, sizes = reduce_blocks(
      blocks, lambda block, index: by_index[id(index)], axis_name, "sum")

  # Where the plain sum cannot be trusted: not finite (NaN/Inf, or squares
  # overflowing), or so small that squares may have underflowed.
  def unusual(sumsq, sizes):
    return ~jnp.isfinite(sumsq) | (sumsq < sizes * _UNDERFLOW_FLOOR)

  def may_exceed(sumsq):
    # A leaf whose sum of squares is at most `count_above**2` holds no
    # element above it, exactly: a computed sum of non-negative terms is
    # never below its largest term, and a square above `count_above**2`
    # rounds to at least its float32 value (the 2**-10 margin covers that).
    # (The threshold may be traced: `optax.inject_hyperparams`.)
    t = jnp.asarray(count_above, jnp.float32)
    return (t <= 0) | (sumsq > t * t * np.float32(1 - 2.0**-10))

  # The rest is decided block by block: a NaN in one leaf re-reads that leaf
  # only (or its stack of small leaves). Each branch reads its block alone:
  # a `lax.cond` over many separate leaves made compiling slow (every leaf
  # an operand) and larger groups made XLA keep leaf-sized temporaries.
  plain_norms = jnp.sqrt(sumsq)
  parts = []  # (norms, non-finite counts, counts above) of each block
  for i, index in enumerate(blocks.index):
    block = blocks.one(i)
    zeros = jnp.zeros(index.shape, jnp.int32)
    if blocks.axes[i]:  # reduced over the devices: the global sums
      block_sumsq, block_sizes = sumsq[index], sizes[index]
      block_norms = lambda index=index: plain_norms[index]
    else:  # this block's own sums (the same values, bit for bit)
      block_sumsq, block_sizes = own[i]
      # (Taken in the branch: a branch that returned its operand as it is
      # made XLA copy it.)
      block_norms = lambda block_sumsq=block_sumsq: jnp.sqrt(block_sumsq)

    def usual(block=block, zeros=zeros, block_sumsq=block_sumsq,
              block_norms=block_norms):
      block_norms = block_norms()
      if count_above is None:
        return block_norms, zeros, zeros
      count = lax.cond(
          jnp.any(may_exceed(block_sumsq)),
          lambda: _count_above(block, count_above, axis_name), lambda: zeros)
      return block_norms, zeros, count

    def full(block=block, zeros=zeros):
      stats = _full_stats(block, axis_name, count_above)
      return (stats.norms, stats.nonfinite,
              zeros if count_above is None else stats.count_above)

    # The predicates are global (reduced over the devices, or of a block that
    # varies along no axis: the same on every device), so every replica
    # takes the same branch and the collectives inside it match.
    parts.append(lax.cond(jnp.any(unusual(block_sumsq, block_sizes)), full,
                          usual))
  # Back to leaf order with one permutation (not a scatter per block).
  norms, nonfinite, counts = permuted(
      tuple(jnp.concatenate(column) for column in zip(*parts)),
      np.argsort(np.concatenate(blocks.index)))
  counts = None if count_above is None else counts
  return TreeStats(norms, nonfinite, sizes, counts, combine_norms(norms))


def _counted(block: jax.Array) -> jax.Array:
  """`|block|` as compared with a count's threshold: the modulus of a complex
  block; a float64 one in float64 (through float32, an element just above
  the threshold would not be counted)."""
  if jnp.iscomplexobj(block):
    return magnitude(block)
  return jnp.abs(block.astype(computed_in(block.dtype)))


def _count_above(blocks: Blocks, threshold: Any,
                 axis_name: AxisName) -> jax.Array:
  """i32[L]: elements with `|x| > threshold` in each (finite) leaf."""

  def count_block(block, _):
    # `sign(max(|x| - t, 0))` is 1 above the threshold and 0 elsewhere; as
    # arithmetic (not a `where`) XLA:CPU fuses it into a vectorised sum
    # instead of writing the 0/1 values out as a leaf-sized temporary.
    x = _counted(block)
    above = jnp.sign(jnp.maximum(x - jnp.asarray(threshold).astype(x.dtype),
                                 0.0))
    return jnp.sum(above, axis=_rest(block))

  return reduce_blocks(blocks, count_block, axis_name, "sum").astype(
      jnp.int32)


def _full_stats(blocks: Blocks, axis_name: AxisName,
                count_above: Any) -> TreeStats:
  """One variadic pass: rescaled sums of squares, NaN/Inf and counts."""

  def one_pass(block, _):
    # One variadic reduction: XLA reads the block once for all the sums
    # (separate `jnp.sum`s may each re-read it and materialise their inputs).
    # Finite in the block's own dtype: a float64 beyond float32's range is
    # no NaN/Inf (its norm overflows, which the guard says as such).
    terms = square_terms(block) + [
        (~jnp.isfinite(block)).astype(jnp.int32)]
    if count_above is not None:
      x = _counted(block)
      terms.append((x > jnp.asarray(count_above).astype(x.dtype)
                    ).astype(jnp.int32))
    reduced = sum_terms(terms, _rest(block))
    size = jnp.full((block.shape[0],), math.prod(block.shape[1:]), jnp.float32)
    return (*reduced, size)

  # Sizes ride with the sums so that a sharded leaf's global size comes out.
  summed = reduce_blocks(blocks, one_pass, axis_name, "sum")
  sumsq, big, small, nonfinite = summed[:4]
  sizes = summed[-1]
  norms = pick_norm(sumsq, big, small, sizes)
  # A non-finite leaf's norm is NaN if it holds a NaN (the sums keep it),
  # else Inf.
  norms = jnp.where(nonfinite > 0,
                    jnp.where(jnp.isnan(sumsq), sumsq, jnp.inf), norms)
  return TreeStats(norms, nonfinite, sizes,
                   None if count_above is None else summed[4],
                   combine_norms(norms))


# Histogram buckets: zero (float32 subnormals included), then |x| in
# [10^k, 10^(k+1)) for k in HIST_DECADES (the first also takes every smaller
# non-zero value, the last every larger finite one), then NaN, then +-Inf.
HIST_DECADES = tuple(range(-10, 5))
HIST_BUCKETS = ("zero",) + tuple(f"1e{k}" for k in HIST_DECADES) + (
    "nan", "inf")


def log_histograms(tree: Any, *, axis_name: AxisName = None,
                   stacked: Sequence[bool] | None = None,
                   groups: np.ndarray | None = None) -> jax.Array:
  """i32[L, len(HIST_BUCKETS)]: counts of each leaf over log10-magnitude bins
  (`[G, ...]`, summed over each group's layers, with `groups`: `int[L]`,
  each layer's group)."""
  leaves = as_arrays(jax.tree_util.tree_leaves(tree))
  if not leaves:
    return jnp.zeros((0, len(HIST_BUCKETS)), jnp.int32)
  edges = [10.0**k for k in HIST_DECADES[1:]]

  def histogram(block, _):
    a, axes = magnitude(block), _rest(block)
    # Subnormals count as zero: XLA may flush them to zero in one comparison
    # and not in another (twice counted), but `a < tiny` holds either way.
    a = jnp.where(a < np.finfo(np.float32).tiny, 0.0, a)
    # In the block's own dtype: a float64 beyond float32's range (an Inf
    # `a`) is finite, in the top decade.
    finite, nan = jnp.isfinite(block), jnp.isnan(block)
    # A float64 below float32's range (a zero `a`) is a non-zero element of
    # the lowest decade, as the bucket promises.
    nonzero = ((block != 0) if block.dtype in (jnp.float64, jnp.complex128)
               else a > 0)
    # at_least[j]: finite non-zero elements with |x| >= edges[j]. All the
    # counts in one variadic reduction: one per mask made XLA:CPU write
    # each mask out first (temporaries of 18x the gradients).
    masks = [finite, nan, finite & nonzero] + [finite & (a >= e)
                                              for e in edges]
    n_finite, n_nan, *at_least = sum_terms(
        [m.astype(jnp.int32) for m in masks], axes)
    # (The zeros are like the counts: a stacked leaf may be sharded along
    # its layers.)
    at_least = jnp.stack(at_least + [jnp.zeros_like(at_least[0])], 1)
    decades = at_least[:, :-1] - at_least[:, 1:]
    # The zero bucket is what the decades leave of the finite elements.
    zero = n_finite - at_least[:, 0]
    inf = math.prod(block.shape[1:]) - n_finite - n_nan
    return jnp.concatenate([zero[:, None], decades, n_nan[:, None],
                            inf[:, None]], 1)

  counts = per_leaf(leaves, histogram, axis_name, "sum", stacked=stacked)
  return counts if groups is None else group_sums(counts, groups)

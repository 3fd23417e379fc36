"""The one statistics pass over a gradient tree, and the cross-device reduce.

Every transformation of the package measures gradients through `tree_stats`:
one read of each leaf computes, in float32 whatever the leaf's dtype, its sum
of squares, its largest magnitude and (when asked) how many elements exceed a
threshold; XLA fuses these sibling reductions into a single pass. Norms are
overflow- and underflow-safe: on the rare step where a finite leaf's sum of
squares overflows float32 (elements above ~1.8e19, or large bf16 values) or
loses its small elements to underflow, a second, rescaled pass runs under
`lax.cond`, so the common step pays for one read only.

Cross-device statistics (`axis_name`): inside `shard_map` JAX types each value
with the mesh axes along which it varies (`vma`). A leaf's sums are `psum`med
over exactly the named axes it varies along, so a replicated bias beside a
sharded kernel is counted once, and the gradient of a replicated parameter
(which `jax.grad` already returns summed and invariant) is not over-counted.
Under `pmap`, or `shard_map(check_vma=False)`, no value is typed: every leaf is
then taken to be replicated over `axis_name` (as after `lax.pmean` of the
gradients), its statistics are measured locally and made identical on every
device by a `pmax`, so any device's NaN or spike decides for all. The lookup
of the typing lives in `varying_axes`, the reduction in `all_reduce`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import optax

from optax_guard import _metrics

AxisName = str | tuple[str, ...] | None

# A leaf whose sum of squares is below `size * _UNDERFLOW_FLOOR` may have lost
# its smaller elements to float32 underflow (flush-to-zero below ~1.2e-38):
# its norm is recomputed rescaled. The relative error of the fast path is then
# at most ~1.2e-38 / 2**-100 ~ 1.5e-8.
_UNDERFLOW_FLOOR = 2.0**-100


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
  if axis_name is None:
    return ()
  if isinstance(axis_name, str):
    return (axis_name,)
  return tuple(axis_name)


def check_axis_name(axis_name: Any) -> None:
  ok = axis_name is None or isinstance(axis_name, str) or (
      isinstance(axis_name, (tuple, list)) and axis_name and
      all(isinstance(a, str) for a in axis_name))
  if not ok:
    raise ValueError(
        "`axis_name` must be None, a mesh axis name or a tuple of them, but "
        f"got {axis_name!r}.")


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


def is_typed(axes: tuple[str, ...]) -> bool:
  """Whether values are typed with their varying axes here (shard_map)."""
  return all(a in varying_axes(lax.axis_index(a)) for a in axes)


def pmax(values: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`lax.pmax` that keeps NaN (XLA's cross-device max on CPU drops it)."""
  if not jnp.issubdtype(values.dtype, jnp.inexact):
    return lax.pmax(values, axes)
  nan = jnp.isnan(values)
  both = lax.pmax(jnp.stack([jnp.where(nan, jnp.inf, values),
                             nan.astype(values.dtype)]), axes)
  return jnp.where(both[1] > 0, jnp.nan, both[0])


def all_reduce(rows: Sequence[jax.Array], like: Sequence[Any],
               axis_name: AxisName, op: str) -> jax.Array:
  """Reduces per-leaf statistics over the devices, the one place that does.

  Args:
    rows: one array per leaf, `rows[i]` measured on leaf `like[i]`.
    like: the leaves the rows come from (their typing says where they vary).
    axis_name: the mesh axes to reduce over, or None.
    op: `"sum"` for sums and counts, `"mean"` for a per-device value such as
      a loss, `"max"` for maxima.

  Returns:
    The rows stacked, `[num_leaves, ...]`, global and identical on every
    device (and typed invariant inside `shard_map`).
  """
  axes = axis_names(axis_name)
  if not axes:
    return jnp.stack(rows)
  if not is_typed(axes):
    # pmap / check_vma=False: leaves taken as replicated; agree on the worst.
    return pmax(jnp.stack(rows), axes)
  reduce = {"sum": lax.psum, "mean": lax.pmean, "max": pmax}[op]
  # Rows are stacked per group of equal typing, so that stacking never marks
  # a replicated row as varying.
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, leaf in enumerate(like):
    vary = varying_axes(leaf)
    groups.setdefault(tuple(a for a in axes if a in vary), []).append(i)
  out: list[Any] = [None] * len(rows)
  for group_axes, index in groups.items():
    part = jnp.stack([rows[i] for i in index])
    if group_axes:
      part = reduce(part, group_axes)
    for j, i in enumerate(index):
      out[i] = part[j]
  return jnp.stack(out)


def count_if(flag: jax.Array, counter: jax.Array) -> jax.Array:
  """Adds one to an int32 counter where `flag` holds, saturating at int32 max."""
  return jnp.where(flag, optax.safe_increment(counter), counter)


def check_varying_covered(tree: Any, axis_name: AxisName) -> None:
  """Raises when a leaf varies along a mesh axis that `axis_name` omits."""
  axes = set(axis_names(axis_name))
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in paths:
    missing = sorted(varying_axes(leaf) - axes)
    if missing:
      name = _metrics.path_name(path)
      raise ValueError(
          f"The gradient leaf {name!r} varies along mesh axes "
          f"{missing} that axis_name={axis_name!r} does not name, so its "
          "statistics would differ from device to device; pass every mesh "
          "axis the gradients vary along, e.g. "
          f"axis_name={tuple(sorted(axes | set(missing)))!r}.")


class TreeStats(NamedTuple):
  """Global statistics of a tree, one entry per leaf (all float32/int32)."""
  norms: jax.Array       # f32[L] L2 norm of each leaf (NaN/Inf if non-finite).
  maxabs: jax.Array      # f32[L] largest |x| of each leaf, Inf if a NaN/Inf.
  sizes: jax.Array       # f32[L] number of elements of each (global) leaf.
  count_above: jax.Array | None  # i32[L] elements with |x| > threshold.
  global_norm: jax.Array  # f32[] L2 norm of the whole tree, overflow-safe.

  @property
  def finite(self) -> jax.Array:
    """bool[]: every element of every leaf is finite."""
    return jnp.all(jnp.isfinite(self.maxabs))


def combine_norms(norms: jax.Array) -> jax.Array:
  """The L2 norm of a vector of norms, without overflow or underflow."""
  if norms.shape[0] == 0:
    return jnp.zeros((), jnp.float32)
  top = jnp.max(norms)
  safe = jnp.where((top > 0) & jnp.isfinite(top), top, 1.0)
  return jnp.where(jnp.isfinite(top),
                   safe * jnp.sqrt(jnp.sum(jnp.square(norms / safe))),
                   jnp.where(jnp.any(jnp.isnan(norms)), jnp.nan, jnp.inf))


def _magnitude(x: jax.Array) -> jax.Array:
  return jnp.abs(x).astype(jnp.float32)


def tree_stats(tree: Any, *, axis_name: AxisName = None,
               count_above: Any = None) -> TreeStats:
  """Measures every leaf of `tree` in one fused pass (see module docstring).

  Args:
    tree: a tree of arrays of any float dtype.
    axis_name: mesh axes to reduce over (see `all_reduce`).
    count_above: if not None, also count elements with `|x| > count_above`.

  Returns:
    A `TreeStats` of global, replica-identical values.
  """
  check_varying_covered(tree, axis_name)
  axes = axis_names(axis_name)
  if axes and not is_typed(axes):
    # Untyped (pmap): measure locally, then agree on the worst device, taking
    # the global norm as a whole so that it is one device's true norm.
    local = tree_stats(tree, count_above=count_above)
    rows = jnp.concatenate([jnp.stack([local.norms, local.maxabs,
                                       local.sizes], axis=1).reshape(-1),
                            local.global_norm[None]])
    rows = pmax(rows, axes)
    per_leaf = rows[:-1].reshape(-1, 3)
    count = (None if local.count_above is None else
             lax.pmax(local.count_above, axes))
    return TreeStats(per_leaf[:, 0], per_leaf[:, 1], per_leaf[:, 2], count,
                     rows[-1])

  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    empty = jnp.zeros((0,), jnp.float32)
    return TreeStats(empty, empty, empty,
                     None if count_above is None else empty.astype(jnp.int32),
                     jnp.zeros((), jnp.float32))
  sums, maxes, counts = [], [], []
  for x in leaves:
    a = _magnitude(x)
    sums.append(jnp.sum(jnp.square(a)))
    # NaN is mapped to Inf: a max over devices may drop NaN, never Inf. The
    # sum of squares keeps the NaN (sums propagate it), to tell them apart.
    maxes.append(jnp.max(jnp.where(jnp.isnan(a), jnp.inf, a), initial=0.0))
    if count_above is not None:
      counts.append(jnp.sum(a > count_above, dtype=jnp.int32))
  # Sizes ride with the sums so that a sharded leaf's global size comes out.
  sumsq = all_reduce([jnp.stack([s, jnp.float32(x.size)])
                      for s, x in zip(sums, leaves)], leaves, axis_name, "sum")
  sumsq, sizes = sumsq[:, 0], sumsq[:, 1]
  maxabs = all_reduce(maxes, leaves, axis_name, "max")
  count = None
  if count_above is not None:
    count = all_reduce(counts, leaves, axis_name, "sum")

  finite_max = jnp.isfinite(maxabs) & (maxabs > 0)
  inexact = ~jnp.isfinite(sumsq) | (sumsq < sizes * _UNDERFLOW_FLOOR)
  needs_rescale = finite_max & inexact

  def rescaled() -> jax.Array:
    scale = jnp.where(finite_max, maxabs, 1.0)
    ssq = all_reduce([jnp.sum(jnp.square(_magnitude(x) / scale[i]))
                      for i, x in enumerate(leaves)], leaves, axis_name, "sum")
    return jnp.where(needs_rescale, scale * jnp.sqrt(ssq), jnp.sqrt(sumsq))

  norms = lax.cond(jnp.any(needs_rescale), rescaled,
                   lambda: jnp.sqrt(sumsq))
  # A non-finite leaf's norm is NaN if it holds a NaN, else Inf.
  norms = jnp.where(jnp.isfinite(maxabs), norms,
                    jnp.where(jnp.isnan(sumsq), jnp.nan, jnp.inf))
  return TreeStats(norms, maxabs, sizes, count, combine_norms(norms))


def nonfinite_counts(tree: Any, *, axis_name: AxisName = None,
                     when: jax.Array | bool = True) -> jax.Array:
  """i32[L]: non-finite elements per leaf, computed only when `when` holds.

  Counting reads every gradient again, so callers pass `when=` a flag that is
  true only on a bad step; on good steps the count is a zero vector for free.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((0,), jnp.int32)

  def count() -> jax.Array:
    return all_reduce([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
                       for x in leaves], leaves, axis_name, "sum")

  if when is True:
    return count()
  return lax.cond(when, count, lambda: jnp.zeros((len(leaves),), jnp.int32))


# Histogram buckets: zero, then |x| in [10^k, 10^(k+1)) for k in
# HIST_DECADES (the first also takes every smaller non-zero value, the last
# every larger finite one), then NaN, then +-Inf.
HIST_DECADES = tuple(range(-10, 5))
HIST_BUCKETS = ("zero",) + tuple(f"1e{k}" for k in HIST_DECADES) + (
    "nan", "inf")


def log_histograms(tree: Any, *, axis_name: AxisName = None) -> jax.Array:
  """i32[L, len(HIST_BUCKETS)]: counts of each leaf over log10-magnitude bins."""
  leaves = jax.tree_util.tree_leaves(tree)
  edges = [10.0**k for k in HIST_DECADES[1:]]
  rows = []
  for x in leaves:
    a = _magnitude(x)
    nan = jnp.sum(jnp.isnan(a), dtype=jnp.int32)
    inf = jnp.sum(jnp.isinf(a), dtype=jnp.int32)
    zero = jnp.sum(a == 0, dtype=jnp.int32)
    # at_least[j]: finite non-zero elements with |x| >= edges[j].
    finite = jnp.isfinite(a)
    nonzero = jnp.sum(finite & (a > 0), dtype=jnp.int32)
    at_least = [jnp.sum(finite & (a >= e), dtype=jnp.int32) for e in edges]
    cumulative = jnp.stack([nonzero] + at_least + [jnp.zeros((), jnp.int32)])
    decades = cumulative[:-1] - cumulative[1:]
    rows.append(jnp.concatenate(
        [zero[None], decades, nan[None], inf[None]]))
  if not rows:
    return jnp.zeros((0, len(HIST_BUCKETS)), jnp.int32)
  return all_reduce(rows, leaves, axis_name, "sum")

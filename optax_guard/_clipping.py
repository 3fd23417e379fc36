"""Gradient clipping by global norm, per-layer norm and value."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_guard import _args
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _stats



# Above this norm (relative to max_norm) the clip factor is applied in two
# halves: the factor itself would be subnormal, which XLA flushes to zero,
# while the clipped values are perfectly normal.
_SPLIT_ABOVE = 2.0**100


def clip_factors(norm: jax.Array, max_norm: Any
                 ) -> tuple[jax.Array, jax.Array]:
  """f32 `(a, b)` with `a * b = min(1, max_norm / norm)`, applied as `x*a*b`.

  Normally `a` is the factor and `b` is 1; for a norm beyond `2**100 *
  max_norm` both are its square root (see `_SPLIT_ABOVE`). The factor is 1
  where `norm` is not finite: a non-finite norm is not a reason to zero the
  update (optax's clip turns one Inf into a whole update of zeros and NaNs);
  it is left to the non-finite defences downstream, which see it unchanged.
  """
  # A barrier: where `max_norm` is a product (AGC's `clipping * |unit|`),
  # XLA would fold `* _SPLIT_ABOVE` into its constant factor, which can
  # overflow (clipping 3e8 * 2**100) and so never split a factor that then
  # flushes to 0 (a huge gradient zeroed instead of clipped).
  max_norm = lax.optimization_barrier(jnp.asarray(max_norm, jnp.float32))
  clip = jnp.isfinite(norm) & (norm > max_norm)
  split = clip & (norm > max_norm * _SPLIT_ABOVE)
  safe = jnp.where(clip & ~split, norm, 1.0)
  root = jnp.sqrt(max_norm) / jnp.sqrt(jnp.where(split, norm, 1.0))
  a = jnp.where(split, root, jnp.where(clip, max_norm / safe, 1.0))
  return a, jnp.where(split, root, 1.0)


def check_scalable(params: Any, who: str) -> None:
  """Raises unless every parameter is a float or complex array: a clip
  that scales an integer gradient would round it (to 0 below a scale of 1)."""
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(_metrics.unwrap(p))
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"{who} scales the gradients, but the parameter "
          f"{_metrics.path_name(path)!r} is {dtype}: its scaled gradient "
          "would be rounded to an integer (to 0 below a scale of 1). Leave "
          "it out with optax.masked.")


def scale_tree(tree: Any, factors: tuple[jax.Array, jax.Array]) -> Any:
  """Multiplies each leaf by `a` then `b` (`_stats.scale_leaf`)."""
  a, b = _stats.computed_once(factors)  # not once per leaf's kernel
  return jax.tree.map(lambda g: _stats.scale_leaf(g, a, b), tree)


class ClipByGlobalNormState(NamedTuple):
  """State of `clip_by_global_norm`: what the last step saw and did.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.clip_by_global_norm(1.0)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])},
    ...                      tx.init({"w": jnp.zeros(2)}))
    >>> print(state.grad_norm, state.clip_scale, state.num_clipped)
    5.0 0.2 1

  References:
    Made by `clip_by_global_norm` (see its references); `og.metrics` reads it.
  """
  grad_norm: jax.Array    # f32[] global norm before clipping, last step.
  clip_scale: jax.Array   # f32[] factor applied at the last step (1 = none).
  clipped_norm: jax.Array  # f32[] global norm after clipping, last step.
  num_clipped: jax.Array  # i32[] steps clipped so far.
  nonfinite: jax.Array    # bool[] last step's gradients or norm not finite.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {
        "grad/norm": self.grad_norm,
        "grad/norm_clipped": self.clipped_norm,
        "grad/clip_scale": self.clip_scale,
        "optim/num_clipped": self.num_clipped,
    }


def global_clip_init() -> ClipByGlobalNormState:
  """A `ClipByGlobalNormState` before any step."""
  return ClipByGlobalNormState(
      grad_norm=jnp.zeros((), jnp.float32),
      clip_scale=jnp.ones((), jnp.float32),
      clipped_norm=jnp.zeros((), jnp.float32),
      num_clipped=jnp.zeros((), jnp.int32),
      nonfinite=jnp.zeros((), jnp.bool_))


def record_global_clip(state: ClipByGlobalNormState, norm: jax.Array,
                       factors: tuple[jax.Array, jax.Array]
                       ) -> ClipByGlobalNormState:
  """The new state of a clip that saw `norm` and applied `factors`."""
  a, b = factors
  return ClipByGlobalNormState(
      grad_norm=norm, clip_scale=a * b, clipped_norm=(norm * a) * b,
      num_clipped=_stats.count_if(a < 1.0, state.num_clipped),
      nonfinite=~jnp.isfinite(norm))


def clip_to(updates: Any, norm: jax.Array, threshold: Any,
            state: ClipByGlobalNormState
            ) -> tuple[Any, ClipByGlobalNormState]:
  """Clips `updates` (global norm `norm`) to `threshold`, and records it."""
  factors = clip_factors(norm, threshold)
  return scale_tree(updates, factors), record_global_clip(state, norm, factors)


def clip_by_global_norm(
    max_norm: float, *, axis_name: _stats.AxisName = None
) -> optax.GradientTransformationExtraArgs:
  """Clips updates to a maximum global L2 norm, and records what it saw.

  A drop-in for `optax.clip_by_global_norm`: when the global norm `n` of the
  updates exceeds `max_norm`, every leaf is multiplied by `max_norm / n`.
  Unlike optax's it

  * measures in float32 whatever the leaf dtype and survives overflow: bf16 or
    fp16 leaves with large norms, and elements above ~1e19 whose squares
    overflow float32, still give the right finite norm (a norm above
    float32's range itself, ~3.4e38, cannot be scaled in float32: those
    finite updates pass on unscaled with `grad/norm` Inf, which `og.check`
    reports and `skip_nonfinite` or `guard` skips);
  * multiplies by the scale instead of selecting between two trees, which XLA
    fuses into the consumer (about half the cost of optax's clip);
  * leaves the updates unscaled when they hold NaN or Inf (optax multiplies
    everything by `max_norm / inf = 0`, zeroing every finite leaf silently and
    turning the Inf into NaN): the step's `grad/norm` is then non-finite, and
    `skip_nonfinite` or `guard` placed around the optimizer skips it;
  * refuses `max_norm = 0`, which would zero every update (optax takes it,
    and returns NaN for a zero gradient); set to 0 through
    `optax.inject_hyperparams`' state inside `jit`, where the factory
    cannot see it, a zero gradient stays 0.

  Args:
    max_norm: the largest allowed global norm, a float `> 0`.
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`;
      see the statistics notes in the user guide.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClipByGlobalNormState` (metrics `grad/norm`, `grad/norm_clipped`,
    `grad/clip_scale`, `optim/num_clipped`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.clip_by_global_norm(1.0)
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> clipped, state = tx.update(grads, tx.init(grads))
    >>> print(clipped["w"], float(state.grad_norm))
    [0.6 0.8] 5.0

  References:
    Pascanu et al., 2013, "On the difficulty of training recurrent neural
    networks" (https://arxiv.org/abs/1211.5063).
  """
  _args.check_number("max_norm", max_norm, strict=True,
                     at_minimum=_args.CLIP_TO_ZERO)
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    check_scalable(params, "clip_by_global_norm")
    return global_clip_init()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    norm = _stats.tree_stats(updates, axis_name=axis_name).global_norm
    return clip_to(updates, norm, max_norm, state)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


class ClipByLayerNormState(NamedTuple):
  """State of `clip_by_layer_norm`: each layer's norm before clipping.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> tx = og.clip_by_layer_norm(1.0)
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> print(state.layer_norms.names, state.layer_norms.values,
    ...       state.layers_clipped)
    ('a', 'b') [5.  0.5] 1

  References:
    Made by `clip_by_layer_norm` (see its references); `og.metrics` reads it.
  """
  layer_norms: _metrics.PerLayer  # f32[L] each layer's norm before clipping.
  layers_clipped: jax.Array       # i32[] layers clipped at the last step.
  num_clipped: jax.Array          # i32[] steps on which any layer was clipped.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {
        **_metrics.expand("grad/norm", self.layer_norms),
        "optim/layers_clipped": self.layers_clipped,
        "optim/num_clipped": self.num_clipped,
    }


def clip_by_layer_norm(
    max_norm: float, *, axis_name: _stats.AxisName = None,
    stacked: _metrics.Stacked = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips each layer (parameter leaf) to its own maximum L2 norm.

  Each leaf `g` whose norm `n` exceeds `max_norm` becomes `g * max_norm / n`;
  the others pass unchanged. Norms are measured in float32, overflow-safe; a
  leaf holding NaN or Inf is left unscaled for the non-finite defences.
  A stacked leaf (`nn.scan`) is clipped layer by layer along its leading
  axis.

  Args:
    max_norm: the largest allowed norm of each leaf, a float `> 0`.
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`.
    stacked: the leaves whose leading axis stacks layers, as in
      `og.monitor`: each layer is clipped to its own norm and has its own
      `grad/norm/<leaf>/<i>`. The stacked axis must not be sharded under
      `shard_map`: each device would see only its own layers, and layer `i`
      of every device would be measured (and clipped) as one.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClipByLayerNormState` (metrics `grad/norm/<layer>`,
    `optim/layers_clipped`, `optim/num_clipped`).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.clip_by_layer_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> clipped, state = tx.update(grads, tx.init(grads))
    >>> print(clipped["a"], clipped["b"], int(state.layers_clipped))
    [0.6 0.8] [0.5] 1

  References:
    You et al., 2017, "Large Batch Training of Convolutional Networks"
    (https://arxiv.org/abs/1708.03888), for per-layer gradient scaling.
  """
  _args.check_number("max_norm", max_norm, strict=True,
                     at_minimum=_args.CLIP_TO_ZERO)
  _stats.check_axis_name(axis_name)
  layers = _metrics.Layers(stacked)

  def init_fn(params):
    check_scalable(params, "clip_by_layer_norm")
    return ClipByLayerNormState(
        layer_norms=_metrics.per_layer_zeros(layers.names(params),
                                             jnp.float32),
        layers_clipped=jnp.zeros((), jnp.int32),
        num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    layers.check(updates, state.layer_norms.names, "clip_by_layer_norm")
    flags = layers.of(updates).stacked
    norms = _stats.tree_stats(updates, axis_name=axis_name,
                              stacked=flags).norms
    a, b = clip_factors(norms, max_norm)
    leaves, treedef = jax.tree.flatten(updates)
    # A stacked leaf takes one factor per layer, along its leading axis.
    clipped = jax.tree.unflatten(treedef, [
        _stats.scale_leaf(g, a_i, b_i) if jnp.ndim(a_i)
        else scale_tree(g, (a_i, b_i))
        for g, a_i, b_i in zip(
            leaves, _stats.layer_values_by_leaf(a, leaves, flags),
            _stats.layer_values_by_leaf(b, leaves, flags))])
    layers_clipped = jnp.sum(a < 1.0, dtype=jnp.int32)
    return clipped, ClipByLayerNormState(
        layer_norms=_metrics.PerLayer(norms, state.layer_norms.names),
        layers_clipped=layers_clipped,
        num_clipped=_stats.count_if(layers_clipped > 0, state.num_clipped))

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


class ClipByValueState(NamedTuple):
  """State of `clip_by_value`: the fraction of elements it clipped.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.clip_by_value(1.0)
    >>> _, state = tx.update({"w": jnp.array([0.5, -3.0])},
    ...                      tx.init({"w": jnp.zeros(2)}))
    >>> print(state.frac_clipped, state.num_clipped)
    0.5 1

  References:
    Made by `clip_by_value` (see its references); `og.metrics` reads it.
  """
  frac_clipped: jax.Array  # f32[] fraction of elements clipped, last step.
  num_clipped: jax.Array   # i32[] steps on which any element was clipped.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {"grad/frac_clipped": self.frac_clipped,
            "optim/num_clipped": self.num_clipped}


def _bound(max_abs: Any, dtype: Any) -> jax.Array:
  """`max_abs` in `dtype`: no more than its largest finite value (Inf would
  let ±Inf through); refused where it rounds to 0 there (every element of
  the leaf would be zeroed; a traced bound is the caller's to keep)."""
  info = jnp.finfo(dtype)
  number = _args.concrete_number(max_abs)
  if number is None:  # traced
    return jnp.minimum(jnp.asarray(max_abs, dtype),
                       jnp.asarray(info.max, dtype))
  if number <= float(info.smallest_subnormal) / 2:  # rounds to 0 there
    raise ValueError(
        f"`max_abs` {max_abs!r} rounds to 0 in {info.dtype.name}, the dtype "
        "of some updates, so every element of them would be zeroed; give a "
        f"bound of at least {float(info.smallest_subnormal):.3g} (that "
        "dtype's smallest number), or clip in float32.")
  return jnp.asarray(min(number, float(info.max)), dtype)


def clip_by_value(
    max_abs: float, *, axis_name: _stats.AxisName = None
) -> optax.GradientTransformationExtraArgs:
  """Clips every element to `[-max_abs, max_abs]` (Keras' `clipvalue`).

  NaN elements stay NaN (they are the non-finite defences' business); ±Inf
  become ±`max_abs`, as in `optax.clip`, so an overflowed step comes out
  finite (a bound beyond a leaf dtype's largest value clips there to that
  value, where optax's would be Inf and let ±Inf through): where such a
  step should be skipped, put this clip inside `skip_nonfinite` or
  `guard`, which check the gradients they receive before their inner chain
  runs. Records the fraction of elements that
  were clipped.

  Args:
    max_abs: the largest allowed magnitude of an element, a float `> 0`.
    axis_name: mesh axis name(s) over which the fraction is counted.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClipByValueState` (metrics `grad/frac_clipped`, `optim/num_clipped`).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.clip_by_value(1.0)
    >>> grads = jnp.array([-3.0, 0.5, 2.0, 0.1])
    >>> clipped, state = tx.update(grads, tx.init(grads))
    >>> print(clipped, float(state.frac_clipped))
    [-1.   0.5  1.   0.1] 0.5

  References:
    Mikolov, 2012, "Statistical language models based on neural networks",
    PhD thesis, Brno University of Technology (value clipping of gradients).
  """
  _args.check_number("max_abs", max_abs, strict=True,
                     at_minimum=_args.CLIP_TO_ZERO)
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
      if jnp.iscomplexobj(_metrics.unwrap(p)):
        raise ValueError(
            "clip_by_value clips real values, but the parameter "
            f"{_metrics.path_name(path)!r} is complex; clip complex "
            "gradients by their norm (og.clip_by_global_norm, "
            "og.clip_by_layer_norm), which keeps their phase.")
      if jnp.result_type(_metrics.unwrap(p)) == jnp.bool_:
        raise ValueError(
            "clip_by_value clips numbers, but the parameter "
            f"{_metrics.path_name(path)!r} is boolean; leave it out with "
            "optax.masked (a boolean has no gradient to clip).")
    return ClipByValueState(frac_clipped=jnp.zeros((), jnp.float32),
                            num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    # Python numbers too; integers clipped as floats, as optax's `clip`.
    updates = jax.tree.map(_stats.as_inexact, updates)
    # Checked on the whole tree, so that a leaf is named by its path, not by
    # its place among the leaves of its dtype.
    _stats.check_varying_covered(updates, axis_name)
    # The clip compares in each leaf's dtype, against `max_abs` rounded to
    # it; so does the count (per dtype: a bf16 leaf holding exactly the
    # rounded bound is not clipped, and must not be counted).
    by_dtype: dict[Any, list[jax.Array]] = {}
    for g in jax.tree_util.tree_leaves(updates):
      by_dtype.setdefault(jnp.dtype(g.dtype), []).append(g)
    bounds = {dtype: _bound(max_abs, dtype) for dtype in by_dtype}
    above = sizes = jnp.zeros((), jnp.float32)
    for dtype, leaves in by_dtype.items():
      stats = _stats.tree_stats(leaves, axis_name=axis_name,
                                count_above=bounds[dtype])
      above += jnp.sum(stats.count_above.astype(jnp.float32))
      sizes += jnp.sum(stats.sizes)
    frac = above / jnp.maximum(sizes, 1.0)
    clipped = jax.tree.map(
        lambda g: jnp.clip(g, -bounds[jnp.dtype(g.dtype)],
                           bounds[jnp.dtype(g.dtype)]), updates)
    return clipped, ClipByValueState(
        frac_clipped=frac,
        num_clipped=_stats.count_if(above > 0, state.num_clipped))

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))

"""Adaptive clipping: AGC (unit-wise, against the weights), AutoClip and ZClip.

AutoClip and ZClip pick a global-norm threshold from the history of global
norms, which they keep on device in fixed-shape arrays; both clip with the
same factors as `clip_by_global_norm` and record what they did in the same
`ClipByGlobalNormState`. AGC clips each unit (output neuron) of each layer
against the norm of that unit's weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _clipping
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _skip
from optax_guard import _spikes
from optax_guard import _stats


# --------------------------------------------------------------------------
# AGC


UnitAxes = (Callable[[str, tuple[int, ...]], "tuple[int, ...] | None"] | Any
            | None)
_QKV = frozenset({"query", "key", "value"})


def default_unit_axes(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The axes that index the units of a Flax parameter (see `adaptive_grad_clip`)."""
  if len(shape) <= 1:
    return ()  # a scalar, bias or normalisation scale is one unit
  parts = name.split("/")
  if len(shape) == 2 and parts[-1] == "bias" and len(parts) >= 2 and (
      parts[-2] in _QKV):
    return ()  # a q/k/v bias [heads, head_dim] is a bias: one unit
  if len(shape) == 3 and len(parts) >= 2 and parts[-2] in _QKV:
    # The kernel of a q/k/v projection of Flax's attention, `.../query/kernel`
    # [features, heads, head_dim] (an ancestor named `value` alone, as in
    # `value/Conv_0/kernel`, says nothing).
    return (1, 2)
  return (len(shape) - 1,)  # Dense [in, out], Conv [..., in, out], out-proj


def _resolve_unit_axes(params: Any, unit_axes: UnitAxes
                       ) -> tuple[tuple[int, ...], ...]:
  """One tuple of unit axes per parameter leaf, checked."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_metrics.path_name(p) for p, _ in paths]
  shapes = [tuple(np.shape(_metrics.unwrap(x))) for _, x in paths]
  if unit_axes is None or callable(unit_axes):
    given = [None if unit_axes is None else unit_axes(n, s)
             for n, s in zip(names, shapes)]
  else:
    # Inside `optax.masked` the parameters left out are `MaskedNode`s: the
    # tree of the whole model still matches, and their entries are dropped.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    entries, outline = jax.tree.flatten(params, is_leaf=masked)
    try:
      given = [axes for axes, x in zip(outline.flatten_up_to(unit_axes),
                                       entries) if not masked(x)]
    except (ValueError, TypeError) as e:
      raise ValueError(
          "`unit_axes` must be a callable `(name, shape) -> axes` or a tree "
          "with the structure of the parameters whose leaves are tuples of "
          f"axes or None, but its structure does not match: {e}."
          + _args.INJECTED_FUNCTION) from None
  out = []
  for name, shape, axes in zip(names, shapes, given):
    if axes is None:
      out.append(default_unit_axes(name, shape))
      continue
    integer = lambda a: (isinstance(a, (int, np.integer)) and
                         not isinstance(a, (bool, np.bool_)))
    axes = (axes,) if integer(axes) else axes
    ok = (isinstance(axes, (tuple, list)) and
          all(integer(a) and -len(shape) <= a < len(shape) for a in axes))
    normal = sorted({int(a) % max(len(shape), 1) for a in axes}) if ok else []
    if not ok or len(normal) != len(axes):
      raise ValueError(
          f"`unit_axes` for parameter {name!r} of shape {shape} must be a "
          "tuple of distinct axes of that shape (or None for the default), "
          f"but got {axes!r}.")
    out.append(tuple(normal))
  return tuple(out)


class AdaptiveGradClipState(NamedTuple):
  """State of `adaptive_grad_clip`: norms before and after, units clipped.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.adaptive_grad_clip(0.1)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params),
    ...                      params)
    >>> print(state.grad_norm, f"{float(state.clipped_norm):.4f}",
    ...       state.frac_units_clipped)
    5.0 0.1414 1.0

  References:
    Made by `adaptive_grad_clip` (see its references); `og.metrics` reads it.
  """
  grad_norm: jax.Array             # f32[] global norm before clipping.
  clipped_norm: jax.Array          # f32[] global norm after clipping.
  frac_clipped: _metrics.PerLayer  # f32[L] fraction of each layer's units clipped.
  frac_units_clipped: jax.Array    # f32[] fraction of all units clipped.
  num_clipped: jax.Array           # i32[] steps on which any unit was clipped.

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {
        "grad/norm": self.grad_norm,
        "grad/norm_clipped": self.clipped_norm,
        "grad/frac_units_clipped": self.frac_units_clipped,
        **_metrics.expand("grad/frac_units_clipped", self.frac_clipped),
        "optim/num_clipped": self.num_clipped,
    }


def _unit_sums(x: jax.Array, keep: tuple[int, ...]) -> jax.Array:
  """`[3, *units]`: the sums of `square_terms` of each unit of `x` (f32)."""
  reduce_axes = tuple(a for a in range(x.ndim) if a not in keep)
  terms = _stats.square_terms(x)
  return jnp.stack(_stats.sum_terms(terms, reduce_axes))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _unit_norms(x: jax.Array, keep: tuple[int, ...]) -> jax.Array:
  """Each unit's overflow-safe L2 norm, shaped to broadcast against `x`."""
  sumsq, big, small = _unit_sums(x, keep)
  size = int(np.prod([x.shape[a] for a in range(x.ndim) if a not in keep]))
  norms = _stats.pick_norm(sumsq, big, small, float(size))
  return jnp.expand_dims(
      norms, tuple(a for a in range(x.ndim) if a not in keep))


@_unit_norms.defjvp
def _unit_norms_jvp(keep, primals, tangents):
  # d|u| = Re(conj(u / |u|) du) per unit, taken as 0 where the norm is 0 or
  # not finite, as the layer norms' (`_stats._dot_over`): sqrt's own
  # derivative at 0 is Inf, and a zero-initialised bias then made NaN of
  # every derivative through the clip (optax's AGC does).
  (x,), (dx,) = primals, tangents
  norms = _unit_norms(x, keep)
  ok = (norms > 0) & jnp.isfinite(norms)
  wide = x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
  unit = jnp.where(ok, wide, 0) / jnp.where(ok, norms, 1.0)
  reduce_axes = tuple(a for a in range(x.ndim) if a not in keep)
  dnorms = jnp.sum(jnp.real(jnp.conj(unit) * dx.astype(unit.dtype)),
                   axis=reduce_axes, keepdims=True)
  return norms, jnp.where(ok, dnorms, 0.0).astype(norms.dtype)


def adaptive_grad_clip(
    clipping: float, eps: float = 1e-3, *, unit_axes: UnitAxes = None,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive gradient clipping (AGC), unit-wise against the weights' norms.

  For each unit :math:`i` (an output neuron: a column of a Dense kernel, an
  output channel of a convolution) with gradient :math:`G_i` and weights
  :math:`W_i`, AGC of Brock et al. (2021) scales

  .. math::
     G_i \leftarrow \lambda\,\frac{\max(\|W_i\|, \epsilon)}{\|G_i\|}\,G_i
     \quad\text{if}\quad \frac{\|G_i\|}{\max(\|W_i\|, \epsilon)} > \lambda,

  with :math:`\lambda` = `clipping` and :math:`\epsilon` = `eps`, and leaves
  the other units alone. Norms are computed in float32 and overflow-safe; a
  unit whose norm is not finite (it holds NaN/Inf, or its norm is beyond
  float32's range, ~3.4e38) is left unscaled for the non-finite defences, as
  in `clip_by_global_norm`.

  **Units, for Flax layouts.** A unit is indexed by the axes returned for
  each parameter; the norm is taken over all its other axes:

  * scalars and vectors (biases, LayerNorm/BatchNorm scales), and the
    `[heads, head_dim]` bias of an attention projection named `query`,
    `key` or `value`: the whole leaf is one unit;
  * Dense `[in, out]`, Conv 1-D/2-D/3-D `[*spatial, in, out]`, a DenseGeneral
    with several input axes such as an attention output projection
    `[heads, head_dim, features]`, an embedding `[vocab, features]` and a
    `(1, N)` kernel: the last axis (one unit per output feature or channel);
  * a 3-D kernel of a module named `query`, `key` or `value` (Flax's
    attention projections `.../query/kernel`, DenseGeneral
    `[features, heads, head_dim]`): the last two axes (one unit per head and
    head feature).

  The NFNets reference code and `optax.adaptive_grad_clip` reduce every 3-D
  kernel over axis 0 (right for q/k/v, wrong for a Conv1D `[width, in, out]`,
  whose units are its output channels) and treat a `(1, N)` kernel as a single
  vector. Other layouts (layers stacked by `nn.scan`, a DenseGeneral with
  several output axes under another name) take `unit_axes`: a callable
  `(name, shape) -> axes or None` (`name` as in the metrics, e.g.
  `"Dense_0/kernel"`; None keeps the default; under
  `optax.inject_hyperparams`, list it in `static_args`) or a tree like the
  parameters whose leaves are tuples of axes or None.

  The paper does not clip the final classifier layer; leave it out with
  `optax.masked` (see the example).

  Args:
    clipping: :math:`\lambda`, the largest allowed ratio of a unit's gradient
      norm to its weights' norm, a float `> 0`.
    eps: :math:`\epsilon`, the smallest weight norm used, so that units
      initialised at zero can still move, a float `> 0`.
    unit_axes: overrides of the unit axes, as above.
    axis_name: mesh axis name(s), for `pmap`: each unit's gradient norm is
      then the largest over the devices, so every replica applies the same
      factors. Inside `shard_map`, a gradient leaf that still varies along a
      mesh axis (not yet summed over the data-parallel devices, or sharded
      along its own axes: FSDP, tensor parallelism) is an error: its units'
      norms would need to know which array axis is split. Under `jit` with
      sharded arrays the norms are global by construction. Under
      `shard_map(check_vma=False)` no leaf can be told to vary: each
      device's shard of a sharded leaf would be clipped as the whole.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update needs `params`,
    with state `AdaptiveGradClipState` (metrics `grad/norm`,
    `grad/norm_clipped`, `grad/frac_units_clipped` and its per-layer entries,
    `optim/num_clipped`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)),
    ...                       "bias": jnp.zeros(3)},
    ...           "head": {"kernel": jnp.ones((3, 2))}}
    >>> tx = optax.chain(
    ...     optax.masked(og.adaptive_grad_clip(0.01),
    ...                  {"Dense_0": {"kernel": True, "bias": True},
    ...                   "head": {"kernel": False}}),  # not the classifier
    ...     optax.sgd(0.1))
    >>> grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> # each unit's gradient norm is capped at 0.01 * 1.414: 0.01 per weight
    >>> print(-updates["Dense_0"]["kernel"][0] / 0.1)
    [0.01 0.01 0.01]
    >>> print(float(og.metrics(state)["grad/frac_units_clipped"]))
    1.0

  References:
    Brock et al., 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization" (https://arxiv.org/abs/2102.06171), §4.1; the
    authors' code, `unitwise_norm` and `clip_grad` in
    https://github.com/google-deepmind/deepmind-research/tree/master/nfnets.
  """
  _args.check_number("clipping", clipping, strict=True)
  _args.check_number(
      "eps", eps, strict=True,
      at_minimum="With 0 a parameter of norm 0 (a zero-initialised bias) "
      "would be clipped to 0 and never move.")
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    _clipping.check_scalable(params, "adaptive_grad_clip")
    _resolve_unit_axes(params, unit_axes)  # bad overrides fail here
    zero = lambda: jnp.zeros((), jnp.float32)
    return AdaptiveGradClipState(
        grad_norm=zero(), clipped_norm=zero(),
        frac_clipped=_metrics.per_layer_zeros(_metrics.layer_names(params),
                                              jnp.float32),
        frac_units_clipped=zero(), num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _args.require_params(params, "adaptive_grad_clip")
    names = state.frac_clipped.names
    _metrics.check_layers(updates, names, "adaptive_grad_clip")
    _metrics.check_same_tree(updates, params, "adaptive_grad_clip")
    axes = _stats.axis_names(axis_name)
    g_leaves, treedef = jax.tree.flatten(updates)
    g_leaves = _stats.as_arrays(g_leaves)
    p_leaves = _stats.as_arrays(treedef.flatten_up_to(params))
    for name, g in zip(names, g_leaves):
      if _stats.varying_axes(g):
        raise ValueError(
            f"`adaptive_grad_clip` got the gradient leaf {name!r} varying "
            f"along mesh axes {sorted(_stats.varying_axes(g))} inside "
            "shard_map; each unit's norm needs the unit's whole gradient. "
            "Sum or average the gradients over the data-parallel axes first; "
            "a leaf sharded along its own axes (FSDP, tensor parallelism) "
            "cannot be clipped by unit inside shard_map: clip under jit "
            "with sharded arrays instead.")
    unit_axes_of = _resolve_unit_axes(params, unit_axes)
    units_of = [int(np.prod([g.shape[a] for a in k]))
                for g, k in zip(g_leaves, unit_axes_of)]
    g_norms = [_unit_norms(g, k) for g, k in zip(g_leaves, unit_axes_of)]
    if axes and not _stats.is_typed(axes) and g_norms:
      # pmap: gradients taken as replicated; agree on each unit's worst norm.
      flat = _stats.pmax(jnp.concatenate([n.reshape(-1) for n in g_norms]),
                         axes)
      splits = np.cumsum([n.size for n in g_norms])[:-1]
      g_norms = [part.reshape(n.shape) for part, n in
                 zip(jnp.split(flat, splits), g_norms)]
    lam = jnp.asarray(clipping, jnp.float32)
    out, before, after, fractions = [], [], [], []
    for g, p, k, gn in zip(g_leaves, p_leaves, unit_axes_of, g_norms):
      limit = lam * jnp.maximum(_unit_norms(_metrics.unwrap(p), k),
                                jnp.asarray(eps, jnp.float32))
      clip = jnp.isfinite(gn) & (gn > limit)
      # As the global clip's: a factor below float32's normal range (a
      # norm 1e38 times the limit) is applied as two square roots, not
      # flushed to 0.
      out.append(_stats.scale_leaf(g, *_clipping.clip_factors(gn, limit)))
      # Replicated: unit norms sharded differently (an Explicit mesh) cannot
      # be concatenated as they are.
      before.append(_stats.replicated(gn.reshape(-1)))
      after.append(_stats.replicated(jnp.where(clip, limit, gn).reshape(-1)))
      fractions.append(jnp.sum(clip, dtype=jnp.int32))
    clipped_units = (jnp.stack(fractions) if fractions
                     else jnp.zeros((0,), jnp.int32))
    total = jnp.sum(clipped_units, dtype=jnp.int32)
    cat = lambda xs: (jnp.concatenate(xs) if xs
                      else jnp.zeros((0,), jnp.float32))
    return jax.tree.unflatten(treedef, out), AdaptiveGradClipState(
        grad_norm=_stats.combine_norms(cat(before)),
        clipped_norm=_stats.combine_norms(cat(after)),
        frac_clipped=_metrics.PerLayer(
            clipped_units.astype(jnp.float32) /
            jnp.asarray(np.maximum(units_of, 1), jnp.float32), names),
        frac_units_clipped=total.astype(jnp.float32) / max(sum(units_of), 1),
        num_clipped=_stats.count_if(total > 0, state.num_clipped))

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


# --------------------------------------------------------------------------
# AutoClip


def window_percentile(window: _spikes.Window, q: Any) -> jax.Array:
  """f32[]: `np.percentile(accepted values, q)` (linear), +Inf when empty."""
  size = window.values.shape[0]
  n = jnp.minimum(window.num_accepted, size)
  valid = jnp.arange(size, dtype=jnp.int32) < n  # (int32 as `n`, in x64)
  ranked = jnp.sort(jnp.where(valid, window.values, jnp.inf))
  # `q * (n - 1)` first: exact for integer q, so that a position that is a
  # whole number comes out whole (q / 100 first made 60% of 26 values
  # 15.000001, and a sliver of a huge gap above the 16th value).
  position = jnp.asarray(q, jnp.float32) * (
      jnp.maximum(n, 1) - 1).astype(jnp.float32) / 100.0
  low = jnp.floor(position)
  lo = low.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  a, b = ranked[lo], ranked[hi]
  t, gap = position - low, jnp.where(hi > lo, b - a, 0.0)
  # NumPy's interpolation: from the nearer end, exact at both.
  value = jnp.where(t < 0.5, a + t * gap, b - (1 - t) * gap)
  return jnp.where(n > 0, value, jnp.inf)


class AutoclipState(NamedTuple):
  """State of `autoclip`: its clip, the norm history and the threshold.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.autoclip(percentile=50.0, window=4)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for norm in (1.0, 2.0, 3.0, 10.0):
    ...   _, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
    >>> print(state.threshold, state.clip.clip_scale)  # median of 1, 2, 3, 10
    2.5 0.25

  References:
    Made by `autoclip` (see its references); `og.metrics` reads it.
  """
  clip: _clipping.ClipByGlobalNormState  # what the last step saw and did.
  norms: _spikes.Window    # the finite global norms seen, newest `window`.
  threshold: jax.Array     # f32[] the last step's threshold (Inf: no history).

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {**self.clip._og_metrics(),
            "grad/clip_threshold": self.threshold}


def autoclip(
    percentile: float = 10.0, *, window: int = 10_000,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """AutoClip: clips to a percentile of the history of global norms.

  At each step the global gradient norm is appended to the history, the
  threshold is the `percentile`-th percentile of the history (NumPy's
  default linear interpolation, over the current norm too, as in the
  authors' code) and the updates are clipped to it like
  `clip_by_global_norm`. At the first step the threshold is the first norm
  (nothing is clipped); an all-zero gradient gives threshold 0 and nothing
  to clip.

  The paper keeps every norm since the start. Here the history is a ring
  buffer of the last `window` finite norms, on device: the default 10,000
  covers the whole of most fine-tuning runs and, for longer runs, the
  percentile of the last 10,000 steps is what the paper's would be after
  the scale of the gradients has drifted (sorting it costs about as much as
  an elementwise pass over 10,000 numbers per step). A NaN/Inf norm never
  enters the history and is passed on unscaled for the non-finite defences.
  The authors' PyTorch code divides by `norm + 1e-6`; here the factor is
  exactly `threshold / norm`.

  Args:
    percentile: the percentile of past norms to clip at, in `[0, 100]`; the
      paper recommends 10.
    window: how many past norms to keep, an int `>= 1`.
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`;
      the history and threshold are then identical on every replica.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `AutoclipState` (metrics `grad/norm`, `grad/norm_clipped`,
    `grad/clip_scale`, `grad/clip_threshold`, `optim/num_clipped`).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.autoclip(50.0, window=100)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for norm in [1.0, 3.0, 2.0, 40.0]:
    ...   g, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
    >>> # the median of [1, 3, 2, 40] is 2.5: the spike of 40 is cut to it
    >>> print(float(state.threshold), g["w"])
    2.5 [2.5 0. ]

  References:
    Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks" (https://arxiv.org/abs/2007.14469); the
    authors' code: https://github.com/pseeth/autoclip.
  """
  _args.check_number("percentile", percentile, maximum=100.0)
  _args.check_int("window", window, minimum=1)
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    _clipping.check_scalable(params, "autoclip")
    return AutoclipState(clip=_clipping.global_clip_init(),
                         norms=_spikes.window_init(window),
                         threshold=jnp.full((), jnp.inf, jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _spikes.check_history(state.norms, window, "autoclip", "window")
    norm = _stats.tree_stats(updates, axis_name=axis_name).global_norm
    norms = _spikes.window_push(state.norms, norm, jnp.isfinite(norm))
    threshold = window_percentile(norms, percentile)
    updates, clip = _clipping.clip_to(updates, norm, threshold, state.clip)
    return updates, AutoclipState(clip, norms, threshold)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


# --------------------------------------------------------------------------
# ZClip

ZCLIP_MODES = ("reciprocal", "mean", "percentile")


class ZclipState(NamedTuple):
  """State of `zclip`: its clip, warm-up, EMA statistics and threshold.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.zclip(warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> for norm in (1.0, 2.0):
    ...   _, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
    >>> print(state.mean, f"{state.std:.6f}")  # of the warm-up norms
    1.5 0.500000

  References:
    Made by `zclip` (see its references); `og.metrics` reads it.
  """
  clip: _clipping.ClipByGlobalNormState  # what the last step saw and did.
  warmup: _spikes.Window  # the first `warmup_steps` finite norms.
  mean: jax.Array         # f32[] EMA of the (clipped) norm, after warm-up.
  std: jax.Array          # f32[] square root of the EMA of its squared
                          # deviation (kept as a root: no overflow).
  zscore: jax.Array       # f32[] the last step's z-score (0 in warm-up).
  threshold: jax.Array    # f32[] norm above which the last step was clipped.
  num_spikes: jax.Array   # i32[] steps clipped as spikes (after warm-up).

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {**self.clip._og_metrics(),
            "grad/clip_threshold": self.threshold,
            "grad/norm_ema": self.mean,
            "grad/norm_ema_std": self.std,
            "grad/zscore": self.zscore,
            "optim/num_spikes": self.num_spikes}


def zclip(
    alpha: float = 0.97, z_thresh: float = 2.5, *, mode: str = "reciprocal",
    warmup_steps: int = 25, max_norm: float | None = None,
    eps: float = 1e-6, axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ZClip: clips the global norm when its z-score against an EMA is high.

  The algorithm of Kumar et al. (2025), step for step as in the authors'
  code. Warm-up: the first `warmup_steps` finite global norms are collected
  (not clipped, except by `max_norm`); then the mean :math:`\mu` and the
  (population) variance :math:`\sigma^2` of those norms start the EMAs.
  One departure: when those norms are all equal (all zero, as while the
  gradients are masked), they give no spread to measure against, and the
  authors' code would clip every later, larger norm down to their mean for
  good (to zero after an all-zero warm-up); here the warm-up starts again
  instead. The statistics are kept in float32 without overflow: a finite
  norm up to float32's largest leaves them finite (the authors use float64).
  Afterwards, for each norm :math:`g`, with
  :math:`z = (g - \mu) / (\sigma + \epsilon)`:

  * `mode="reciprocal"` (the paper's default, the code's
    `clip_option="adaptive_scaling"`): if :math:`z > z_{thr}`, clip to
    :math:`g^* = \mu + z_{thr}^2\,\sigma / z`, which cuts harder the larger
    the spike;
  * `mode="mean"`: if :math:`z > z_{thr}`, clip to :math:`g^* = \mu`;
  * `mode="percentile"` (the code's fixed rule): if
    :math:`g > \mu + z_{thr}\,\sigma`, clip to that value. The test has no
    :math:`\epsilon` (as in the code), so the z-score recorded, which has,
    may read below :math:`z_{thr}` on a clipped step where :math:`\sigma`
    is near :math:`\epsilon`.

  The EMAs are then updated with the clipped norm :math:`g^*` (or :math:`g`
  when nothing was clipped): :math:`\mu \leftarrow \alpha\mu + (1-\alpha)g^*`,
  :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(g^* - \mu)^2` with
  the new :math:`\mu`. A NaN/Inf norm is neither clipped nor let into the
  statistics (the non-finite defences see it unchanged). `max_norm`, when
  given, caps every step like `clip_by_global_norm`, warm-up included, as the
  code's `max_grad_norm` (whose default in the authors' package is 1.0; here
  None, so that ZClip alone decides). The threshold recorded is the norm above
  which a step is clipped: `max_norm` (or Inf) during warm-up.

  Args:
    alpha: EMA smoothing factor, in `(0, 1)`.
    z_thresh: the z-score above which a norm is a spike, a float `> 0`.
    mode: `"reciprocal"`, `"mean"` or `"percentile"`, as above.
    warmup_steps: finite norms collected before clipping starts, `>= 2`
      (one norm has no spread to measure against).
    max_norm: an optional fixed ceiling on the global norm, `> 0`.
    eps: :math:`\epsilon`, added to :math:`\sigma` in the z-score (the
      authors' `eps`), `> 0`. It is absolute: where the global norm is
      near 1e-5 or below, it outweighs :math:`\sigma` and hides spikes
      from the `"reciprocal"` and `"mean"` tests; give a smaller one there.
    axis_name: mesh axis name(s) to reduce over under `shard_map` or `pmap`;
      the statistics are then identical on every replica.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ZclipState`
    (metrics `grad/norm`, `grad/norm_clipped`, `grad/clip_scale`,
    `grad/clip_threshold`, `grad/norm_ema`, `grad/norm_ema_std`,
    `grad/zscore`, `optim/num_clipped`, `optim/num_spikes`).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.zclip(alpha=0.9, z_thresh=2.0, warmup_steps=4)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for norm in [1.0, 2.0, 1.0, 2.0, 11.5]:
    ...   g, state = tx.update({"w": jnp.array([norm])}, state)
    >>> # warm-up: mean 1.5, std 0.5; z = (11.5 - 1.5) / 0.5 = 20, so the
    >>> # norm is cut to 1.5 + 2**2 * 0.5 / 20 = 1.6
    >>> print(f"{float(state.zscore):.2f} {float(g['w'][0]):.4f}")
    20.00 1.6000

  References:
    Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training" (https://arxiv.org/abs/2504.02507); the authors' code:
    https://github.com/bluorion-com/ZClip (`zclip/zclip.py`).
  """
  _args.check_number(
      "alpha", alpha, strict=True, maximum=1.0, strict_max=True,
      at_minimum="With 0 the average would hold only the last norm, whose "
      "spread is 0, and every step above it would be clipped.")
  _args.check_number("z_thresh", z_thresh, strict=True)
  _args.check_choice("mode", mode, ZCLIP_MODES)
  # (A Python int only: a traced one, under `optax.inject_hyperparams`,
  # gets `check_int`'s message to list it in `static_args`.)
  if type(warmup_steps) is int and warmup_steps == 1:
    raise ValueError(
        "`warmup_steps` must be at least 2: ZClip's warm-up measures the "
        "spread of the norms it collects, and a single norm has none, so "
        "with 1 the warm-up would start again at every step and never clip.")
  _args.check_int("warmup_steps", warmup_steps, minimum=2)
  _args.check_number("eps", eps, strict=True)
  if max_norm is not None:
    _args.check_number("max_norm", max_norm, strict=True,
                       at_minimum=_args.CLIP_TO_ZERO_OR_NONE)
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    _clipping.check_scalable(params, "zclip")
    zero = lambda: jnp.zeros((), jnp.float32)
    return ZclipState(clip=_clipping.global_clip_init(),
                      warmup=_spikes.window_init(warmup_steps),
                      mean=zero(), std=zero(), zscore=zero(),
                      threshold=jnp.full((), jnp.inf, jnp.float32),
                      num_spikes=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _spikes.check_history(state.warmup, warmup_steps, "zclip", "warmup_steps")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    a, zt = f32(alpha), f32(z_thresh)
    norm = _stats.tree_stats(updates, axis_name=axis_name).global_norm
    finite = jnp.isfinite(norm)
    ready = state.warmup.num_accepted >= warmup_steps

    # After warm-up: the z-score test against the EMAs.
    std = state.std
    z = (norm - state.mean) / (std + f32(eps))
    if mode == "percentile":
      threshold = state.mean + zt * std
      spike = norm > threshold
      target = threshold
    else:
      threshold = state.mean + zt * (std + f32(eps))
      spike = z > zt
      # z / zt only where it spikes (z > zt > 0): a z of 0 elsewhere made
      # x / 0, whose NaN the `where` below hides from the value but not
      # from reverse-mode derivatives.
      target = (state.mean + zt * std / (jnp.where(spike, z, zt) / zt)
                if mode == "reciprocal" else state.mean)
    spike = ready & finite & spike
    seen = jnp.where(spike, target, norm)  # what the EMAs learn from
    mean = a * state.mean + (1.0 - a) * seen
    # sqrt(a * std**2 + (1 - a) * (seen - mean)**2), without squaring: a
    # finite norm above ~1.8e19 would make the variance Inf for good. With
    # `seen - mean` as `a * (seen - state.mean)`, the same algebraically
    # but exactly 0 where a spike is learnt as the mean (the difference of
    # two roundings was an ulp of the mean, which, at every spike of a long
    # run, made the std drift by 1%). `combine_norms`, not `jnp.hypot`,
    # which in jax >= 0.11 divides 0 / 0 at (0, 0) (a `jax_debug_nans`
    # error op by op).
    std = _stats.combine_norms(jnp.abs(jnp.stack([
        jnp.sqrt(a) * std, jnp.sqrt(1.0 - a) * a * (seen - state.mean)])))
    learn = ready & finite
    mean = jnp.where(learn, mean, state.mean)
    std = jnp.where(learn, std, state.std)

    # During warm-up: collect, and start the EMAs when the window is full,
    # unless its norms are all equal (see the docstring): then warm up again.
    warmup = _spikes.window_push(state.warmup, norm, ~ready & finite)
    full = ~ready & (warmup.num_accepted >= warmup_steps)
    first = jnp.sum(warmup.values / warmup_steps)  # no overflow in the sum
    spread = _stats.combine_norms(warmup.values - first) / np.sqrt(
        np.float32(warmup_steps))
    start = full & (jnp.max(warmup.values) > jnp.min(warmup.values))
    warmup = _skip.select_tree(full & ~start,
                               _spikes.window_init(warmup_steps), warmup)
    mean = jnp.where(start, first, mean)
    std = jnp.where(start, spread, std)

    limit = jnp.where(spike, target, jnp.inf)
    threshold = jnp.where(ready, threshold, jnp.inf)
    if max_norm is not None:
      limit = jnp.minimum(limit, f32(max_norm))
      threshold = jnp.minimum(threshold, f32(max_norm))
    updates, clip = _clipping.clip_to(updates, norm, limit, state.clip)
    return updates, ZclipState(
        clip=clip, warmup=warmup, mean=mean, std=std,
        zscore=jnp.where(ready & finite, z, 0.0), threshold=threshold,
        num_spikes=_stats.count_if(spike, state.num_spikes))

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))

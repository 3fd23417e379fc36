"""Adaptive clipping (issue 4): AGC, AutoClip and ZClip against NumPy.

Each clipper is compared with an independent NumPy re-implementation of its
paper's equations written here (float64), step by step over long synthetic
streams of global norms with spikes and NaN steps: thresholds, decisions and
the scale applied to the gradients. AGC is checked layout by layout against
NumPy unit norms written out per layout (and against `optax.adaptive_grad_clip`
where the two agree on what a unit is).
"""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og

NAN = np.float32(np.nan)
N = 8

# =============================================================== AGC


def _agc_reference(grad, param, reduce_axes, clipping, eps):
  """Brock et al. 2021, eq. (3), unit by unit (float64)."""
  g = np.asarray(grad, np.float64)
  w = np.asarray(param, np.float64)
  gn = np.sqrt(np.sum(g * g, axis=reduce_axes, keepdims=True))
  wn = np.maximum(np.sqrt(np.sum(w * w, axis=reduce_axes, keepdims=True)),
                  eps)
  clip = gn / wn > clipping
  return np.where(clip, clipping * wn / np.where(clip, gn, 1.0) * g, g), clip


# name -> (shape, axes a unit's norm is taken over, as the layer defines it)
LAYOUTS = {
    "Dense_0/kernel": ((6, 5), (0,)),                   # [in, out]
    "Dense_0/bias": ((5,), (0,)),                       # one unit
    "Conv_1d/kernel": ((3, 4, 6), (0, 1)),              # [width, in, out]
    "Conv_2d/kernel": ((3, 3, 4, 6), (0, 1, 2)),        # [h, w, in, out]
    "Conv_3d/kernel": ((2, 3, 3, 2, 4), (0, 1, 2, 3)),  # [d, h, w, in, out]
    "attn/query/kernel": ((8, 2, 4), (0,)),        # [features, heads, dim]
    "attn/key/kernel": ((8, 2, 4), (0,)),
    "attn/value/kernel": ((8, 2, 4), (0,)),
    "attn/query/bias": ((2, 4), (0, 1)),           # [heads, dim]: a bias
    "value/Conv_0/kernel": ((3, 4, 6), (0, 1)),    # a Conv1D in a value head
    "attn/out/kernel": ((2, 4, 8), (0, 1)),        # [heads, dim, features]
    "Dense_in1/kernel": ((1, 7), (0,)),            # (1, N): N units
    "LayerNorm_0/scale": ((5,), (0,)),
    "temperature": ((), ()),                       # a scalar
}


def _nested(flat):
  out = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _flat(tree):
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layout_trees(seed):
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for i, (name, (shape, _)) in enumerate(LAYOUTS.items()):
    params[name] = rng.normal(size=shape).astype(np.float32) * 0.3
    # Per-unit gradient scales spanning far below and far above the limit.
    g = rng.normal(size=shape) * np.exp(rng.normal(-3.0, 2.5, size=shape))
    grads[name] = g.astype(np.float32)
  params["Dense_0/bias"][:] = 0.0  # a unit at zero: eps decides its limit
  return _nested(params), _nested(grads)


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_agc_matches_the_paper_on_every_flax_layout(clipping):
  params, grads = _layout_trees(0)
  tx = og.adaptive_grad_clip(clipping, eps=1e-3)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  got = _flat(out)
  total_units = clipped_units = 0
  before = after = 0.0
  for name, (shape, axes) in LAYOUTS.items():
    want, clip = _agc_reference(_flat(grads)[name], _flat(params)[name],
                                axes, clipping, 1e-3)
    np.testing.assert_allclose(got[name], want, rtol=2e-6, atol=1e-30,
                               err_msg=name)
    frac = og.metrics(state)[f"grad/frac_units_clipped/{name}"]
    np.testing.assert_allclose(frac, clip.mean(), rtol=1e-6, err_msg=name)
    total_units += clip.size
    clipped_units += clip.sum()
    before += np.sum(np.square(_flat(grads)[name].astype(np.float64)))
    after += np.sum(np.square(want))
  m = og.metrics(state)
  assert 0 < clipped_units < total_units  # the case exercises both sides
  np.testing.assert_allclose(m["grad/frac_units_clipped"],
                             clipped_units / total_units, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm"], math.sqrt(before), rtol=1e-5)
  np.testing.assert_allclose(m["grad/norm_clipped"], math.sqrt(after),
                             rtol=1e-5)
  assert int(m["optim/num_clipped"]) == 1


def test_agc_agrees_with_optax_on_dense_and_conv2d_kernels():
  """Where optax's unit rule is right (2-D and 4-D kernels), both agree."""
  rng = np.random.default_rng(1)
  params = {"dense": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "conv": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)}
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * 3.0, jnp.float32),
      params)
  ours, _ = og.adaptive_grad_clip(0.05).update(
      grads, og.adaptive_grad_clip(0.05).init(params), params)
  theirs, _ = optax.adaptive_grad_clip(0.05).update(grads, None, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6),
               ours, theirs)


def test_agc_unit_axes_overrides_by_callable_and_by_tree():
  rng = np.random.default_rng(2)
  # Layers stacked by nn.scan: [layers, in, out] with units (layer, out).
  params = {"scan": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 5)),
                                           jnp.float32)},
            "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 5)),
                                              jnp.float32)}}
  grads = jax.tree.map(lambda p: p * 10.0, params)
  want = {"scan/kernel": _agc_reference(grads["scan"]["kernel"],
                                        params["scan"]["kernel"], (1,),
                                        0.1, 1e-3)[0],
          "Dense_0/kernel": _agc_reference(grads["Dense_0"]["kernel"],
                                           params["Dense_0"]["kernel"], (0,),
                                           0.1, 1e-3)[0]}

  def by_name(name, shape):
    return (0, 2) if name.startswith("scan/") else None

  by_tree = {"scan": {"kernel": (0, 2)}, "Dense_0": {"kernel": None}}
  # NumPy integers are axes too (shapes read from NumPy give them).
  by_numpy = {"scan": {"kernel": (np.int64(0), np.int32(2))},
              "Dense_0": {"kernel": None}}
  for unit_axes in (by_name, by_tree, by_numpy):
    tx = og.adaptive_grad_clip(0.1, unit_axes=unit_axes)
    out, _ = tx.update(grads, tx.init(params), params)
    for name, value in _flat(out).items():
      np.testing.assert_allclose(value, want[name], rtol=2e-6)
  # Inside `optax.masked` (as the docstring recommends for AGC), a tree of
  # the whole model's axes still applies to the leaves the mask keeps.
  tx = optax.masked(og.adaptive_grad_clip(0.1, unit_axes=by_tree),
                    {"scan": {"kernel": True}, "Dense_0": {"kernel": False}})
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["scan"]["kernel"], want["scan/kernel"],
                             rtol=2e-6)
  np.testing.assert_array_equal(out["Dense_0"]["kernel"],
                                grads["Dense_0"]["kernel"])


def test_agc_leaves_a_nonfinite_unit_for_the_nonfinite_defences():
  params = {"w": jnp.ones((3, 2), jnp.float32)}
  grads = {"w": jnp.asarray([[NAN, 9.0], [1.0, 9.0], [1.0, 9.0]])}
  tx = og.adaptive_grad_clip(1.0)
  out, state = tx.update(grads, tx.init(params), params)
  assert np.isnan(out["w"][0, 0]) and np.all(out["w"][1:, 0] == 1.0)
  np.testing.assert_allclose(np.linalg.norm(out["w"][:, 1]), math.sqrt(3),
                             rtol=1e-6)
  assert np.isnan(og.metrics(state)["grad/norm"])


def test_agc_caps_a_huge_unit_instead_of_zeroing_it():
  """A unit 1e37 times over its limit: the factor limit/norm is below
  float32's normal range, and a unit of norm lambda * max(|W|, eps) must
  come out (as from the global clip), not zeros."""
  params = {"kernel": jnp.ones((2, 3), jnp.float32),
            "bias": jnp.zeros((3,), jnp.float32)}
  grads = {"kernel": jnp.asarray([[1e37, 1e-3, 1e-3], [0.0, 1e-3, 1e-3]]),
           "bias": jnp.asarray([1e34, 0.0, 0.0])}
  tx = og.adaptive_grad_clip(0.01)  # eps = 1e-3
  out, state = tx.update(grads, tx.init(params), params)
  # Written out: unit = column of the kernel, the whole bias; limits
  # 0.01 * sqrt(2) and 0.01 * max(0, 1e-3); the direction is kept.
  np.testing.assert_allclose(out["kernel"][:, 0], [0.01 * math.sqrt(2), 0.0],
                             rtol=1e-6)
  np.testing.assert_array_equal(out["kernel"][:, 1:], grads["kernel"][:, 1:])
  np.testing.assert_allclose(out["bias"], [1e-5, 0.0, 0.0], rtol=1e-6)
  got = math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                      for x in jax.tree.leaves(out)))
  np.testing.assert_allclose(og.metrics(state)["grad/norm_clipped"], got,
                             rtol=1e-6)


@pytest.mark.parametrize("clipping, eps", [(3e8, 1e-8), (1e30, 1e-30)])
def test_agc_with_a_huge_clipping_caps_a_huge_unit_under_jit(clipping, eps):
  """The unit's limit is the product `clipping * eps` (3 and 1 here); XLA
  folded the split test's `* 2**100` into `clipping`, which overflowed, so
  the factor 1e-38 went unsplit, flushed to 0 and zeroed the update."""
  params = {"w": jnp.zeros((1,), jnp.float32)}
  grads = {"w": jnp.asarray([3e38], jnp.float32)}
  tx = og.adaptive_grad_clip(clipping, eps)
  limit = float(np.float32(clipping) * np.float32(eps))
  for update in (jax.jit(tx.update), tx.update):
    out, _ = update(grads, tx.init(params), params)
    np.testing.assert_allclose(out["w"], [limit], rtol=1e-6)


def test_agc_bf16_gradients_are_measured_in_float32():
  params = {"w": jnp.full((4, 2), 1.0, jnp.bfloat16)}
  grads = {"w": jnp.full((4, 2), 3.0e19, jnp.bfloat16)}  # squares overflow
  tx = og.adaptive_grad_clip(0.5)
  out, state = tx.update(grads, tx.init(params), params)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.5,
                             rtol=1e-2)
  np.testing.assert_allclose(og.metrics(state)["grad/norm"],
                             3.0e19 * math.sqrt(8), rtol=1e-2)


def test_agc_errors():
  params = {"w": jnp.ones((3, 2))}
  tx = og.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match=r"`adaptive_grad_clip` needs the "
                     r"current parameters: call `update\(updates, state, "
                     r"params\)`"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"`clipping` must be a finite real "
                     r"number > 0, but got 0.0\."):
    og.adaptive_grad_clip(0.0)
  with pytest.raises(ValueError, match=r"`eps` must be a finite real number "
                     r"> 0, but got -1\.$"):
    og.adaptive_grad_clip(0.1, eps=-1)
  with pytest.raises(ValueError, match=r"^`eps` must be a finite real number "
                     r"> 0, but got 0\. With 0 a parameter of norm 0 \(a "
                     r"zero-initialised bias\) would be clipped to 0 and "
                     r"never move\.$"):
    og.adaptive_grad_clip(0.1, eps=0)
  bad = og.adaptive_grad_clip(0.1, unit_axes=lambda name, shape: (2,))
  with pytest.raises(ValueError, match=r"`unit_axes` for parameter 'w' of "
                     r"shape \(3, 2\) must be a tuple of distinct axes of "
                     r"that shape \(or None for the default\), but got "
                     r"\(2,\)\."):
    bad.init(params)
  with pytest.raises(ValueError, match=r"`unit_axes` must be a callable "
                     r"`\(name, shape\) -> axes` or a tree with the "
                     r"structure of the parameters"):
    og.adaptive_grad_clip(0.1, unit_axes={"v": (1,)}).init(params)
  # optax.inject_hyperparams calls a function argument with the step count.
  injected = optax.inject_hyperparams(og.adaptive_grad_clip)(
      0.1, unit_axes=lambda name, shape=None: (0,))
  with pytest.raises(ValueError, match=r"structure does not match: .* If you "
                     r"passed a function through `optax.inject_hyperparams`, "
                     r"list it in its `static_args`"):
    injected.init(params)


# ========================================================= norm streams

T = 400
DIRECTION = {"a": np.ones((3, 4), np.float32) / math.sqrt(24.0),
             "b": np.ones((12,), np.float32) / math.sqrt(24.0)}  # norm 1


def _stream(seed, *, nan_steps=(), zero_steps=()):
  """A log-normal norm stream with planted spikes, NaN and zero steps."""
  rng = np.random.default_rng(seed)
  drift = np.exp(np.linspace(0.0, 1.5, T))  # the scale drifts up 4.5x
  norms = drift * np.exp(rng.normal(0.0, 0.3, T))
  for t in rng.choice(np.arange(30, T), 12, replace=False):
    norms[t] *= rng.uniform(8.0, 100.0)
  norms[list(nan_steps)] = np.nan
  norms[list(zero_steps)] = 0.0
  return norms.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _scan_runner(tx_factory, **kwargs):
  tx = tx_factory(**kwargs)
  direction = jax.tree.map(jnp.asarray, DIRECTION)

  def run(norms):
    def body(s, n):
      u, s = tx.update(jax.tree.map(lambda d: d * n, direction), s)
      return s, (s, u)
    return lax.scan(body, tx.init(direction), norms)[1]

  return jax.jit(run)


def _applied_norm(u):
  return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)), axis=1)
                     for x in (u["a"].reshape(T, -1), u["b"])))


# ============================================================ AutoClip


def _autoclip_reference(norms, percentile, window):
  """Seetharaman et al. 2020 (the authors' `autoclip_gradient`), float64:
  append the norm to the history, clip at np.percentile(history)."""
  history, thresholds, scales = [], [], []
  for n in norms.astype(np.float64):
    if np.isfinite(n):
      history.append(n)
    last = history[-window:]
    t = np.percentile(last, percentile) if last else np.inf
    thresholds.append(t)
    scales.append(t / n if np.isfinite(n) and n > t else 1.0)
  return np.asarray(thresholds), np.asarray(scales)


@pytest.mark.parametrize("percentile,window", [(10.0, 10_000), (10.0, 50),
                                               (50.0, 7), (0.0, 30),
                                               (100.0, 30)])
def test_autoclip_matches_the_paper_step_by_step(percentile, window):
  norms = _stream(3, nan_steps=(0, 77, 78, 200), zero_steps=(5, 6))
  s, u = jax.device_get(_scan_runner(og.autoclip, percentile=percentile,
                                     window=window)(norms))
  thresholds, scales = _autoclip_reference(norms, percentile, window)
  np.testing.assert_allclose(s.threshold, thresholds, rtol=2e-6)
  np.testing.assert_allclose(s.clip.clip_scale, scales, rtol=2e-6)
  finite = np.isfinite(norms)
  np.testing.assert_allclose(_applied_norm(u)[finite],
                             (norms * scales)[finite], rtol=2e-6)
  assert np.all(np.isnan(np.asarray(u["a"])[~finite]))  # passed on unscaled
  np.testing.assert_array_equal(s.clip.num_clipped,
                                np.cumsum(scales < 1.0))
  if 0 < percentile < 100:
    assert 0 < np.sum(scales < 1.0) < T  # both sides exercised


@pytest.mark.parametrize("percentile,window", [(60.0, 26), (30.0, 11),
                                               (36.0, 26), (72.0, 26)])
def test_autoclip_a_whole_percentile_position_lands_on_its_value(percentile,
                                                                  window):
  """Where `q (n - 1) / 100` is a whole number, the threshold is that order
  statistic exactly, however far the next one is (1e30 here)."""
  low = int(percentile * (window - 1) / 100) + 1  # values at or below it
  norms = np.array([1.0] * low + [1e30] * (window - low), np.float32)
  tx = og.autoclip(percentile, window=window)
  state = tx.init({"w": jnp.zeros(1)})
  step = jax.jit(tx.update)
  for n in norms:
    g, state = step({"w": jnp.array([n])}, state)
  assert float(state.threshold) == np.percentile(norms.astype(np.float64),
                                                 percentile) == 1.0
  np.testing.assert_allclose(g["w"], [1.0], rtol=1e-6)  # 1e30 cut to 1


def test_autoclip_first_steps_and_all_zero_gradients():
  tx = og.autoclip(10.0, window=8)
  zeros = {"w": jnp.zeros(3)}
  state = tx.init(zeros)
  assert float(state.threshold) == np.inf
  g, state = tx.update(zeros, state)  # step 0, all zero
  assert float(state.threshold) == 0.0 and float(state.clip.clip_scale) == 1.0
  np.testing.assert_array_equal(g["w"], 0.0)
  g, state = tx.update({"w": jnp.array([3.0, 4.0, 0.0])}, state)
  # history [0, 5]: its 10th percentile is 0.5
  np.testing.assert_allclose(float(state.threshold), 0.5)
  np.testing.assert_allclose(g["w"], [0.3, 0.4, 0.0], rtol=1e-6)


def test_autoclip_a_nan_step_leaves_the_history_untouched():
  tx = og.autoclip(10.0, window=8)
  state = tx.init({"w": jnp.zeros(2)})
  for n in (1.0, 2.0, 3.0):
    _, state = tx.update({"w": jnp.array([n, 0.0])}, state)
  g, after = tx.update({"w": jnp.array([NAN, 1.0])}, state)
  np.testing.assert_array_equal(after.norms.values, state.norms.values)
  assert int(after.norms.num_accepted) == 3
  assert float(after.threshold) == float(state.threshold)
  assert bool(after.clip.nonfinite) and g["w"][1] == 1.0


def test_autoclip_errors():
  with pytest.raises(ValueError, match=r"`percentile` must be a finite real "
                     r"number >= 0 and <= 100, but got 101\."):
    og.autoclip(101)
  with pytest.raises(ValueError, match=r"`window` must be an integer >= 1, "
                     r"but got 0\."):
    og.autoclip(window=0)


# =============================================================== ZClip


def _zclip_reference(norms, *, alpha, z_thresh, mode, warmup, max_norm=None,
                     eps=1e-6):
  """Kumar et al. 2025, Algorithm 1 and the authors' `ZClip.step`, float64.

  Returns per step: threshold above which the step is clipped, the scale
  applied, the z-score (0 in warm-up or for a non-finite norm), the EMAs.
  """
  buffer, mean, var = [], None, None
  out = {k: [] for k in ("threshold", "scale", "z", "mean", "var", "spike")}
  for g in norms.astype(np.float64):
    finite = np.isfinite(g)
    z, spike, clip_to = 0.0, False, np.inf
    if mean is None:  # warm-up: collect; start the EMAs once full
      threshold = np.inf
      if finite:
        buffer.append(g)
        if len(buffer) == warmup:
          mean = sum(buffer) / len(buffer)
          var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
    else:
      std = math.sqrt(var)
      if mode == "percentile":
        threshold = mean + z_thresh * std
        if finite:
          z = (g - mean) / (std + eps)
          spike = g > threshold
          clip_to = threshold
      else:
        threshold = mean + z_thresh * (std + eps)
        if finite:
          z = (g - mean) / (std + eps)
          spike = z > z_thresh
          if mode == "reciprocal":
            eta = z / z_thresh
            clip_to = mean + z_thresh * std / eta
          else:
            clip_to = mean
      if finite:
        seen = clip_to if spike else g
        mean = alpha * mean + (1 - alpha) * seen
        var = alpha * var + (1 - alpha) * (seen - mean) ** 2
    limit = clip_to if spike else np.inf
    if max_norm is not None:
      limit, threshold = min(limit, max_norm), min(threshold, max_norm)
    out["threshold"].append(threshold)
    out["scale"].append(limit / g if finite and g > limit else 1.0)
    out["z"].append(z)
    out["mean"].append(np.nan if mean is None else mean)
    out["var"].append(np.nan if var is None else var)
    out["spike"].append(spike)
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("mode", ["reciprocal", "mean", "percentile"])
@pytest.mark.parametrize("alpha,z_thresh,warmup,max_norm", [
    (0.97, 2.5, 25, None), (0.9, 2.0, 10, None), (0.97, 2.5, 25, 4.0)])
def test_zclip_matches_the_paper_step_by_step(mode, alpha, z_thresh, warmup,
                                              max_norm):
  norms = _stream(4, nan_steps=(3, 120, 121, 300), zero_steps=(9,))
  s, u = jax.device_get(_scan_runner(
      og.zclip, alpha=alpha, z_thresh=z_thresh, mode=mode,
      warmup_steps=warmup, max_norm=max_norm)(norms))
  ref = _zclip_reference(norms, alpha=alpha, z_thresh=z_thresh, mode=mode,
                         warmup=warmup, max_norm=max_norm)
  np.testing.assert_array_equal(np.diff(s.num_spikes, prepend=0),
                                ref["spike"])
  assert ref["spike"].sum() >= 10  # the planted spikes are found
  np.testing.assert_allclose(s.threshold, ref["threshold"], rtol=1e-5)
  np.testing.assert_allclose(s.clip.clip_scale, ref["scale"], rtol=1e-5)
  np.testing.assert_allclose(s.zscore, ref["z"], rtol=1e-4, atol=1e-5)
  started = ~np.isnan(ref["mean"])
  np.testing.assert_allclose(s.mean[started], ref["mean"][started],
                             rtol=1e-5)
  np.testing.assert_allclose(s.std[started], np.sqrt(ref["var"][started]),
                             rtol=1e-4)
  finite = np.isfinite(norms)
  np.testing.assert_allclose(_applied_norm(u)[finite],
                             (norms * ref["scale"])[finite], rtol=1e-5)


def test_zclip_eps_is_absolute_and_tiny_norms_need_a_smaller_one():
  """The same stream at 1e-9 of the scale: the default eps (1e-6) outweighs
  the spread and misses the spikes, as in the authors' code; eps scaled
  with the norms finds them again (both against the reference)."""
  norms = _stream(5) * np.float32(1e-9)
  found = {}
  for eps in (1e-6, 1e-15):
    s, _ = jax.device_get(_scan_runner(og.zclip, eps=eps)(norms))
    ref = _zclip_reference(norms, alpha=0.97, z_thresh=2.5, mode="reciprocal",
                           warmup=25, eps=eps)
    spikes = np.diff(s.num_spikes, prepend=0)
    np.testing.assert_array_equal(spikes, ref["spike"])
    np.testing.assert_allclose(s.threshold, ref["threshold"], rtol=1e-5)
    found[eps] = int(spikes.sum())
  assert found[1e-6] == 0 and found[1e-15] >= 10


def test_zclip_modes_differ_as_the_paper_says():
  """On one spike: mean mode cuts to the EMA mean, reciprocal mode to
  mu + z_thr**2 sigma / z, percentile mode to mu + z_thr sigma."""
  norms = np.asarray([1.0, 2.0, 1.0, 2.0, 11.5], np.float32)
  cut = {}
  for mode in og._adaptive.ZCLIP_MODES:
    tx = og.zclip(alpha=0.9, z_thresh=2.0, mode=mode, warmup_steps=4)
    state = tx.init({"w": jnp.zeros(1)})
    for n in norms:
      g, state = tx.update({"w": jnp.array([n])}, state)
    cut[mode] = float(g["w"][0])
  z = 10.0 / (0.5 + 1e-6)
  np.testing.assert_allclose(cut["mean"], 1.5, rtol=1e-6)
  np.testing.assert_allclose(cut["reciprocal"], 1.5 + 4 * 0.5 / z, rtol=1e-6)
  np.testing.assert_allclose(cut["percentile"], 1.5 + 2 * 0.5, rtol=1e-6)


def test_zclip_an_all_zero_warm_up_starts_again_instead_of_zeroing_for_good():
  # The authors' rule would start the EMAs at mean 0, std 0 and clip every
  # later norm to 0 (z = g / 1e-6) for good; here the warm-up starts again.
  tx = og.zclip(warmup_steps=3, alpha=0.5)
  zeros = {"w": jnp.zeros(2)}
  state = tx.init(zeros)
  step = jax.jit(tx.update)
  for _ in range(5):  # 3 zeros end a warm-up of no spread: 2 more collected
    g, state = step(zeros, state)
    np.testing.assert_array_equal(g["w"], 0.0)
  assert int(state.warmup.num_accepted) == 2
  assert float(state.threshold) == np.inf and int(state.num_spikes) == 0
  # Two real gradients: the window (0, 0 and 3) has a spread; the EMAs start.
  g, state = step({"w": jnp.array([3.0, 0.0])}, state)
  np.testing.assert_array_equal(g["w"], [3.0, 0.0])
  np.testing.assert_allclose(float(state.mean), 1.0)
  np.testing.assert_allclose(float(state.std), math.sqrt(2.0), rtol=1e-6)
  g, state = step({"w": jnp.array([2.0, 0.0])}, state)  # z = 0.71: kept
  np.testing.assert_array_equal(g["w"], [2.0, 0.0])


def test_zclip_a_huge_finite_norm_in_warm_up_does_not_switch_it_off():
  # A norm of 1e20 squares to Inf in float32: a variance kept as such would
  # stay Inf and no spike would ever be clipped again.
  norms = np.asarray([1.0, 1.5, 1e20] + [1.0 + 0.1 * (i % 3)
                                         for i in range(T - 4)] + [1e6],
                     np.float32)
  s, u = jax.device_get(_scan_runner(og.zclip, alpha=0.5, z_thresh=2.5,
                                     mode="reciprocal", warmup_steps=3)(norms))
  ref = _zclip_reference(norms, alpha=0.5, z_thresh=2.5, mode="reciprocal",
                         warmup=3)
  assert np.all(np.isfinite(s.std)) and ref["spike"][-1]
  np.testing.assert_allclose(s.std[2:], np.sqrt(ref["var"][2:]), rtol=1e-4)
  np.testing.assert_allclose(s.clip.clip_scale, ref["scale"], rtol=1e-4)
  assert _applied_norm(u)[-1] < 2.0  # the 1e6 spike is cut to ~mu


def test_zclip_step_zero_gradients_and_nan_steps():
  tx = og.zclip(warmup_steps=3)
  norms = ({"w": jnp.array([0.0, 1.0])}, {"w": jnp.array([0.0, 2.0])},
           {"w": jnp.array([0.0, 1.0])}, {"w": jnp.zeros(2)})
  state = tx.init(norms[0])
  for g in norms:  # warm-up, then an all-zero gradient (z < 0: kept)
    out, state = tx.update(g, state)
    np.testing.assert_array_equal(out["w"], g["w"])
  assert float(state.zscore) < 0
  assert np.isfinite(float(state.threshold))
  before = state
  g, state = tx.update({"w": jnp.array([NAN, 1.0])}, state)
  for field in ("warmup", "mean", "std", "num_spikes"):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, field),
                 getattr(before, field))
  assert bool(state.clip.nonfinite) and g["w"][1] == 1.0


def test_zclip_a_nan_during_warm_up_is_not_collected():
  tx = og.zclip(warmup_steps=2)
  state = tx.init({"w": jnp.zeros(1)})
  for n in (1.0, NAN, 3.0):
    _, state = tx.update({"w": jnp.array([n])}, state)
  np.testing.assert_allclose(float(state.mean), 2.0)
  np.testing.assert_allclose(float(state.std), 1.0)


def test_zclip_errors():
  with pytest.raises(ValueError, match=r"`mode` must be one of "
                     r"'reciprocal', 'mean', 'percentile', but got "
                     r"'zscore'\."):
    og.zclip(mode="zscore")
  with pytest.raises(ValueError, match=r"`alpha` must be a finite real number "
                     r"> 0 and < 1, but got 1\.0\."):
    og.zclip(alpha=1.0)
  with pytest.raises(ValueError, match=r"`alpha` must be a finite real number "
                     r"> 0 and < 1, but got 0\.0\. With 0 the average would "
                     r"hold only the last norm"):
    og.zclip(alpha=0.0)
  with pytest.raises(ValueError, match=r"^`max_norm` must be a finite real "
                     r"number > 0, but got 0\.0\. A bound of 0 would zero "
                     r"every update; `max_norm=None` clips nothing\.$"):
    og.zclip(max_norm=0.0)
  with pytest.raises(ValueError, match=r"`warmup_steps` must be an integer "
                     r">= 2, but got 0\."):
    og.zclip(warmup_steps=0)
  with pytest.raises(ValueError, match=r"^`warmup_steps` must be at least 2: "
                     r"ZClip's warm-up measures the spread of the norms it "
                     r"collects, and a single norm has none, so with 1 the "
                     r"warm-up would start again at every step and never "
                     r"clip\.$"):
    og.zclip(warmup_steps=1)
  # Traced (`optax.inject_hyperparams` without `static_args`), on every route
  # to `init`: the message says what to do (was a TracerBoolConversionError
  # under jit and eval_shape).
  injected = optax.inject_hyperparams(og.zclip)(warmup_steps=4)
  params = {"w": jnp.zeros(3)}
  for init in (injected.init, jax.jit(injected.init),
               functools.partial(jax.eval_shape, injected.init)):
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an "
                       r"integer >= 2, but got .*It sets the structure of "
                       r"the state, so it must be a Python int \(under "
                       r"`optax.inject_hyperparams`, list it in "
                       r"`static_args`\)\."):
      init(params)
  with pytest.raises(ValueError, match=r"`eps` must be a finite real number "
                     r"> 0, but got 0\.0\."):
    og.zclip(eps=0.0)
  with pytest.raises(ValueError, match=r"`z_thresh` must be a finite real "
                     r"number > 0, but got -2\."):
    og.zclip(z_thresh=-2)


# ======================================================= several devices


def _mesh():
  return jax.make_mesh((N,), ("d",))


@pytest.mark.parametrize("factory,kwargs", [
    (og.autoclip, {"percentile": 25.0, "window": 16}),
    (og.zclip, {"warmup_steps": 5, "z_thresh": 2.0}),
])
def test_shard_map_replicas_agree_with_one_device_on_the_whole_gradient(
    factory, kwargs):
  """A kernel sharded over 8 devices (shards differ, one device spikes or
  goes NaN) beside a replicated bias: the statistics and scales are those of
  the whole gradient measured on one device, identical on every replica."""
  rng = np.random.default_rng(8)
  steps = 40
  kernel = rng.normal(size=(steps, 16, 4)).astype(np.float32)
  bias = rng.normal(size=(steps, 4)).astype(np.float32)
  kernel[25, 6:8] *= np.float32(60.0)  # device 3's shard spikes
  kernel[31, 12, 0] = NAN              # device 6's shard is NaN
  tx = factory(axis_name="d", **kwargs)
  mesh = _mesh()

  def run(k_all, b_all):
    def body(s, kb):
      u, s = tx.update({"kernel": kb[0], "bias": kb[1]}, s)
      return s, jax.tree.map(lambda v: v[None], (s, u["bias"]))
    init = tx.init({"kernel": jnp.zeros((2, 4)), "bias": jnp.zeros(4)})
    return lax.scan(body, init, (k_all, b_all))[1]

  fn = jax.jit(jax.shard_map(run, mesh=mesh,
                             in_specs=(P(None, "d", None), P()),
                             out_specs=P(None, "d")))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  s, u_bias = jax.device_get(fn(put(kernel, P(None, "d", None)),
                                put(bias, P())))
  single = factory(**kwargs)

  def run_one(k_all, b_all):
    def body(s, kb):
      u, s = single.update({"kernel": kb[0], "bias": kb[1]}, s)
      return s, (s, u["bias"])
    init = single.init({"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)})
    return lax.scan(body, init, (k_all, b_all))[1]

  s1, u1 = jax.device_get(jax.jit(run_one)(kernel, bias))
  for got, want in zip(jax.tree.leaves(s), jax.tree.leaves(s1)):
    got = np.asarray(got)
    for d in range(N):  # every replica, the single-device value
      # z-scores near 0 come from a difference of nearly equal numbers.
      np.testing.assert_allclose(got[:, d], want, rtol=2e-6, atol=1e-5)
  for d in range(N):
    np.testing.assert_allclose(u_bias[:, d], u1, rtol=2e-6)
  assert s1.clip.num_clipped[-1] >= 1 and s1.clip.nonfinite[31]


def test_pmap_agc_replicas_apply_the_same_factors():
  """Under pmap, each unit's norm is the worst device's, so the replicas'
  clipped gradients stay identical when the gradients were averaged, and
  the factors are the same when they were not (one device's unit spikes)."""
  rng = np.random.default_rng(9)
  params = {"w": np.ones((4, 3), np.float32)}
  grads = np.broadcast_to(rng.normal(size=(4, 3)), (N, 4, 3)).astype(
      np.float32).copy()
  grads[5, :, 1] *= 100.0  # device 5's unit 1 spikes
  tx = og.adaptive_grad_clip(0.5, axis_name="d")

  def run(g):
    out, s = tx.update({"w": g}, tx.init(params), params)
    return out["w"] / g, s  # the factor each element got

  factors, s = jax.device_get(jax.pmap(run, axis_name="d")(grads))
  for d in range(N):
    np.testing.assert_allclose(factors[d], factors[0], rtol=1e-6)
  worst = np.max(np.linalg.norm(grads, axis=1), axis=0)  # per unit
  want = np.minimum(1.0, 0.5 * 2.0 / worst)  # ||W_unit|| = 2
  np.testing.assert_allclose(factors[0], np.broadcast_to(want, (4, 3)),
                             rtol=1e-6)
  assert np.all(np.asarray(s.num_clipped) == 1)


def test_shard_map_agc_on_a_varying_gradient_is_an_error():
  mesh = _mesh()
  tx = og.adaptive_grad_clip(0.1, axis_name="d")
  params = {"w": jnp.ones((2, 3))}

  def run(g):
    p = {"w": lax.pcast(params["w"], "d", to="varying")}
    return tx.update({"w": g}, tx.init(p), p)[0]["w"]

  fn = jax.shard_map(run, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
  with pytest.raises(ValueError, match=r"`adaptive_grad_clip` got the "
                     r"gradient leaf 'w' varying along mesh axes \['d'\] "
                     r"inside shard_map; each unit's norm needs the unit's "
                     r"whole gradient\. Sum or average the gradients over "
                     r"the data-parallel axes first; a leaf sharded along "
                     r"its own axes \(FSDP, tensor parallelism\) cannot be "
                     r"clipped by unit inside shard_map: clip under jit "
                     r"with sharded arrays instead\."):
    jax.jit(fn)(jax.device_put(jnp.ones((16, 3)),
                               NamedSharding(mesh, P("d"))))


def test_agc_under_jit_with_named_sharding_is_global():
  mesh = _mesh()
  rng = np.random.default_rng(10)
  p = rng.normal(size=(16, 8)).astype(np.float32)
  g = (rng.normal(size=(16, 8)) * 5).astype(np.float32)
  tx = og.adaptive_grad_clip(0.2)
  for spec in (P("d", None), P(None, "d")):  # reduced axis / unit axis split
    sharded = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
    out, _ = jax.jit(tx.update)({"w": sharded(g)}, tx.init({"w": p}),
                                {"w": sharded(p)})
    np.testing.assert_allclose(out["w"],
                               _agc_reference(g, p, (0,), 0.2, 1e-3)[0],
                               rtol=2e-6)


# ============================================ a deliberately unstable model


def _example():
  import importlib.util
  import pathlib
  path = (pathlib.Path(__file__).resolve().parents[1] / "examples" /
          "adaptive_clipping.py")
  spec = importlib.util.spec_from_file_location("adaptive_clipping", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.standard_promotion  # optax.sgd's momentum mixes dtypes
def test_flax_deep_tanh_mlp_survives_label_spikes_only_with_clipping():
  """examples/adaptive_clipping.py: plain SGD takes the first corrupted
  batch's full step and diverges; each clipper trains through all four."""
  example = _example()
  corrupted = np.arange(example.CORRUPT_EVERY - 1, example.STEPS,
                        example.CORRUPT_EVERY)
  results = {name: example.train(tx)
             for name, tx in example.contenders().items()}
  plain, _ = results.pop("plain sgd")
  assert np.all(plain[: corrupted[0]] < 1.0)
  assert not plain[-1] < 1e3  # diverged (or went non-finite)
  for name, (losses, metrics) in results.items():
    assert np.all(np.isfinite(losses)), name
    assert losses.max() <= losses[0] * 1.001, name
    assert losses[-1] < 0.1 * losses[0], name
    clipped = np.diff(metrics["optim/num_clipped"], prepend=0) > 0
    assert clipped[corrupted].all(), name
  # ZClip clips exactly the corrupted batches, nothing else.
  zclip = results["zclip()"][1]
  np.testing.assert_array_equal(
      np.flatnonzero(np.diff(zclip["optim/num_spikes"], prepend=0)),
      corrupted)


_ZCLIP_META_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax
import optax_guard as og
params = {"Dense_0": {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.zeros(3)},
          "Dense_1": {"kernel": jnp.full((3, 2), 0.3), "bias": jnp.zeros(2)}}
leaves, treedef = jax.tree.flatten(params)
grads = [treedef.unflatten([
    jax.random.normal(k, p.shape) for k, p in zip(
        jax.random.split(jax.random.PRNGKey(i), len(leaves)), leaves)])
         for i in range(3)]

def meta(tx):
  def unrolled(scale):
    p, state = params, tx.init(params)
    for g in grads:
      u, state = tx.update(jax.tree.map(lambda x: scale * x, g), state, p)
      p = optax.apply_updates(p, u)
    return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  return jax.jit(jax.grad(unrolled))(jnp.float32(1.0))

got = meta(optax.chain(og.clip_by_global_norm(1.0), og.zclip(warmup_steps=2),
                       optax.adam(1e-2)))
want = meta(optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2)))
assert np.isfinite(got), got
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
print("ok")
"""


def _start_zclip_meta_script(background):
  # XLA's default optimisation: at the suite's level 0 (conftest) the NaN
  # of the masked division did not reach the derivative.
  env = {**os.environ, "XLA_FLAGS": ""}
  return background([sys.executable, "-c", _ZCLIP_META_SCRIPT], env=env)


@pytest.mark.start_early(launch=_start_zclip_meta_script)
def test_zclip_derivatives_stay_finite_where_the_norm_equals_its_mean(started):
  """Behind a clip every norm is 1, the EMA mean too, and z is 0: the
  reciprocal target's `std / (z / zt)` was x / 0 on every step, hidden from
  the value by a `where` but not from reverse mode (a NaN meta-gradient).
  zclip clips nothing here, so the derivative is the chain's without it."""
  result = started.result()
  assert result.returncode == 0 and result.stdout.strip() == "ok", (
      result.stdout + result.stderr[-3000:])

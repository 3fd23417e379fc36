"""Cross-device statistics (DESIGN §2.5): shard_map, pmap and sharded jit.

Every test feeds gradients that differ from device to device and checks the
library's numbers against independent NumPy math on the full (global) arrays,
written here in float64. The 8 CPU devices come from `conftest.py`.
"""

from __future__ import annotations

import contextlib
import math
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og

RTOL = 1e-5
NUM_DEVICES = 8


# ---------------------------------------------------------------- helpers


def _mesh1d() -> Mesh:
  assert jax.device_count() >= NUM_DEVICES, "conftest.py must give 8 devices"
  return Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("d",))


def _mesh2d() -> Mesh:
  devices = np.array(jax.devices()[:NUM_DEVICES]).reshape(4, 2)
  return Mesh(devices, ("data", "model"))


def _put(mesh: Mesh, x: np.ndarray, spec: P) -> jax.Array:
  return jax.device_put(x, NamedSharding(mesh, spec))


def _vma(x) -> frozenset[str]:
  """The mesh axes JAX types `x` as varying along inside shard_map (read
  here independently of the library's own helper)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def _np_norm(*arrays: np.ndarray) -> float:
  """The L2 norm of all elements of `arrays`, in float64."""
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64))))
                       for a in arrays))


def _np_scale(norm: float, max_norm: float) -> float:
  return min(1.0, max_norm / norm)


def _assert_rows_bit_identical(tree, num_rows: int = NUM_DEVICES) -> None:
  """Every leaf's rows (one per device, leading axis) are equal bit for bit."""
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  assert leaves
  for path, leaf in leaves:
    leaf = np.asarray(leaf)
    assert leaf.shape[0] == num_rows, (path, leaf.shape)
    raw = np.ascontiguousarray(leaf).view(np.uint8).reshape(num_rows, -1)
    for i in range(1, num_rows):
      assert np.array_equal(raw[0], raw[i]), (
          f"{jax.tree_util.keystr(path)} differs between device 0 and {i}: "
          f"{leaf[0]!r} vs {leaf[i]!r}")


def _np_histogram(a: np.ndarray) -> np.ndarray:
  """Counts over og.HIST_BUCKETS: zero, decades 1e-10 .. 1e4 (outer ones
  open-ended), NaN, Inf; edges compared in float32 like the gradients."""
  a = np.abs(np.asarray(a, np.float32)).ravel()
  buckets = og.HIST_BUCKETS
  counts = np.zeros(len(buckets), np.int64)
  decades = [int(name[2:]) for name in buckets[1:-2]]
  for v in a:
    if np.isnan(v):
      counts[buckets.index("nan")] += 1
    elif np.isinf(v):
      counts[buckets.index("inf")] += 1
    elif v == 0:
      counts[0] += 1
    else:
      j = 0  # index into decades; the first also takes smaller values.
      for i, k in enumerate(decades[1:], start=1):
        if v >= np.float32(10.0**k):
          j = i
      counts[1 + j] += 1
  return counts


def _different_shards(shape, rng, num_shards=NUM_DEVICES, axis=0):
  """A float32 array whose shards along `axis` have clearly different scales."""
  x = rng.normal(size=shape)
  scale_shape = [1] * len(shape)
  scale_shape[axis] = shape[axis]
  per_row = np.repeat(1.0 + np.arange(num_shards), shape[axis] // num_shards)
  return (x * per_row.reshape(scale_shape)).astype(np.float32)


# ------------------------------------------- 1. shard_map: sharded + replicated


@pytest.mark.parametrize("clip_fraction", [0.5, 2.0])
def test_shard_map_clip_global_norm_counts_replicated_bias_once(clip_fraction):
  mesh = _mesh1d()
  rng = np.random.default_rng(0)
  kernel = _different_shards((16, 4), rng)
  bias = (5.0 * rng.normal(size=(4,))).astype(np.float32)
  true_norm = _np_norm(kernel, bias)
  # The test must tell the right answer from the FSDP bug (bias per device).
  naive_norm = math.sqrt(_np_norm(kernel)**2 +
                         NUM_DEVICES * _np_norm(bias)**2)
  assert abs(naive_norm - true_norm) > 1e-2 * true_norm
  max_norm = clip_fraction * true_norm
  scale = _np_scale(true_norm, max_norm)

  tx = og.clip_by_global_norm(max_norm, axis_name="d")

  def step(k, b):
    grads = {"kernel": k, "bias": b}
    clipped, state = tx.update(grads, tx.init(grads))
    per_device = jax.tree.map(lambda x: x[None], state)
    return clipped, state, per_device, og.metrics(state)

  fn = jax.jit(jax.shard_map(
      step, mesh=mesh,
      in_specs=(P("d", None), P()),
      out_specs=({"kernel": P("d", None), "bias": P()}, P(), P("d"), P())))
  clipped, state, per_device, m = fn(_put(mesh, kernel, P("d", None)),
                                     _put(mesh, bias, P()))

  assert isinstance(state, og.ClipByGlobalNormState)
  np.testing.assert_allclose(float(state.grad_norm), true_norm, rtol=RTOL)
  np.testing.assert_allclose(float(state.clip_scale), scale, rtol=RTOL)
  assert int(state.num_clipped) == (1 if scale < 1.0 else 0)
  assert not bool(state.nonfinite)
  np.testing.assert_allclose(np.asarray(clipped["kernel"]),
                             kernel.astype(np.float64) * scale, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(clipped["bias"]),
                             bias.astype(np.float64) * scale, rtol=RTOL)
  np.testing.assert_allclose(float(m["grad/norm"]), true_norm, rtol=RTOL)
  np.testing.assert_allclose(float(m["grad/norm_clipped"]),
                             min(true_norm, max_norm), rtol=RTOL)
  assert int(m["optim/num_clipped"]) == (1 if scale < 1.0 else 0)
  # Every device holds the same state, bit for bit.
  _assert_rows_bit_identical(per_device)
  np.testing.assert_array_equal(np.asarray(per_device.grad_norm)[0],
                                np.asarray(state.grad_norm))


def test_shard_map_state_types_invariant_and_update_keeps_sharding():
  """The state is typed invariant (so out_specs=P() typechecks) and the
  clipped kernel keeps its sharding; the bias stays replicated."""
  mesh = _mesh1d()
  rng = np.random.default_rng(1)
  kernel = _different_shards((8, 3), rng)
  bias = rng.normal(size=(3,)).astype(np.float32)
  tx = og.clip_by_global_norm(0.1, axis_name="d")
  seen = {}

  def step(k, b):
    grads = {"kernel": k, "bias": b}
    clipped, state = tx.update(grads, tx.init(grads))
    seen["state"] = [_vma(x)
                     for x in jax.tree.leaves(state)]
    seen["clipped"] = {n: _vma(x)
                       for n, x in clipped.items()}
    return clipped, state

  jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P("d", None), P()),
      out_specs=({"kernel": P("d", None), "bias": P()}, P())))(
          _put(mesh, kernel, P("d", None)), _put(mesh, bias, P()))
  assert all(v == frozenset() for v in seen["state"]), seen["state"]
  assert seen["clipped"] == {"kernel": frozenset({"d"}),
                             "bias": frozenset()}


@pytest.mark.parametrize("make", [og.clip_by_global_norm, og.clip_by_value])
def test_shard_map_missing_axis_name_is_an_error(make):
  """The leaf is named by its path (clip_by_value measures per dtype: not
  by its place among the leaves of its dtype, beside a replicated bias)."""
  mesh = _mesh1d()
  kernel = _different_shards((8, 3), np.random.default_rng(2))
  tx = make(1.0)  # axis_name=None, kernel varies on "d".

  def step(k):
    grads = {"bias": jnp.ones((3,), k.dtype), "kernel": k}
    return tx.update(grads, tx.init(grads))[1]

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("d", None),
                             out_specs=P()))
  with pytest.raises(ValueError, match="varies along mesh axes") as info:
    fn(_put(mesh, kernel, P("d", None)))
  assert "'kernel'" in str(info.value)
  assert "['d']" in str(info.value)


# ------------------------------------------------ 2. data parallel via grad


def _linear_loss(params, x, y):
  r = x @ params["kernel"] + params["bias"] - y
  return 0.5 * jnp.sum(jnp.square(r))


def test_shard_map_data_parallel_grad_of_replicated_param():
  mesh = _mesh1d()
  rng = np.random.default_rng(3)
  x = rng.normal(size=(32, 5)).astype(np.float32)
  x *= np.repeat(1.0 + np.arange(NUM_DEVICES), 4)[:, None].astype(np.float32)
  y = rng.normal(size=(32, 3)).astype(np.float32)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}

  # NumPy: per-device gradients differ; their sum is the global gradient.
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  w64 = params["kernel"].astype(np.float64)
  b64 = params["bias"].astype(np.float64)
  per_dev = []
  for d in range(NUM_DEVICES):
    xs, ys = x64[4 * d:4 * d + 4], y64[4 * d:4 * d + 4]
    r = xs @ w64 + b64 - ys
    per_dev.append((xs.T @ r, r.sum(0)))
  assert not np.allclose(per_dev[0][0], per_dev[1][0])
  g_kernel = sum(g for g, _ in per_dev)
  g_bias = sum(g for _, g in per_dev)
  true_norm = _np_norm(g_kernel, g_bias)
  max_norm = 0.25 * true_norm

  tx = optax.chain(og.monitor(axis_name="d"),
                   og.clip_by_global_norm(max_norm, axis_name="d"))
  typing = {}

  def step(p, xs, ys):
    grads = jax.grad(_linear_loss)(p, xs, ys)
    typing.update({n: _vma(g) for n, g in grads.items()})
    clipped, state = tx.update(grads, tx.init(p), p)
    return grads, clipped, og.metrics(state), jax.tree.map(
        lambda v: v[None], state)

  rep = {"kernel": P(), "bias": P()}
  fn = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(rep, P("d", None), P("d", None)),
      out_specs=(rep, rep, P(), P("d"))))
  grads, clipped, m, per_device = fn(
      jax.tree.map(lambda v: _put(mesh, v, P()), params),
      _put(mesh, x, P("d", None)), _put(mesh, y, P("d", None)))

  # DESIGN §2.5: jax.grad returns the replicated param's gradient summed
  # over the devices and typed invariant.
  assert typing == {"kernel": frozenset(), "bias": frozenset()}
  np.testing.assert_allclose(np.asarray(grads["kernel"]), g_kernel,
                             rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grads["bias"]), g_bias,
                             rtol=RTOL, atol=1e-4)
  scale = _np_scale(true_norm, max_norm)
  np.testing.assert_allclose(float(m["grad/norm"]), true_norm, rtol=RTOL)
  np.testing.assert_allclose(float(m["grad/norm.1"]), true_norm, rtol=RTOL)
  np.testing.assert_allclose(float(m["grad/norm/kernel"]),
                             _np_norm(g_kernel), rtol=RTOL)
  np.testing.assert_allclose(float(m["grad/norm/bias"]), _np_norm(g_bias),
                             rtol=RTOL)
  np.testing.assert_allclose(float(m["grad/clip_scale"]), scale, rtol=RTOL)
  np.testing.assert_allclose(float(m["param/norm"]),
                             _np_norm(w64, b64), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(clipped["kernel"]), g_kernel * scale,
                             rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(np.asarray(clipped["bias"]), g_bias * scale,
                             rtol=RTOL, atol=1e-5)
  _assert_rows_bit_identical(per_device)


# ------------------------------------------------------------- 3. 2-D mesh


def test_2d_mesh_directly_sharded_leaves():
  """Leaves varying along both axes, one axis each, and neither."""
  mesh = _mesh2d()
  rng = np.random.default_rng(4)
  both = _different_shards((8, 6), rng)                  # P("data", "model")
  data_only = _different_shards((8, 3), rng)             # P("data", None)
  model_only = _different_shards((4, 8), rng, axis=1)    # P(None, "model")
  replicated = rng.normal(size=(5,)).astype(np.float32)  # P()
  specs = {"both": P("data", "model"), "data_only": P("data", None),
           "model_only": P(None, "model"), "replicated": P()}
  arrays = {"both": both, "data_only": data_only, "model_only": model_only,
            "replicated": replicated}
  true_norm = _np_norm(*arrays.values())

  def run(axis_name):
    tx = og.clip_by_global_norm(1.0, axis_name=axis_name)
    mon = og.monitor(axis_name=axis_name)

    def step(g):
      s1 = tx.update(g, tx.init(g))[1]
      s2 = mon.update(g, mon.init(g))[1]
      return og.metrics(s1), og.metrics(s2), jax.tree.map(
          lambda v: v[None, None], (s1, s2))

    return jax.jit(jax.shard_map(
        step, mesh=mesh, in_specs=(specs,),
        out_specs=(P(), P(), P("data", "model"))))(
            {n: _put(mesh, a, specs[n]) for n, a in arrays.items()})

  for axis_name in [("data", "model"), ("model", "data")]:
    m_clip, m_mon, per_device = run(axis_name)
    np.testing.assert_allclose(float(m_clip["grad/norm"]), true_norm,
                               rtol=RTOL)
    np.testing.assert_allclose(float(m_mon["grad/norm"]), true_norm,
                               rtol=RTOL)
    for n, a in arrays.items():
      np.testing.assert_allclose(float(m_mon[f"grad/norm/{n}"]), _np_norm(a),
                                 rtol=RTOL, err_msg=n)
      np.testing.assert_allclose(float(m_mon[f"grad/frac_above_1/{n}"]),
                                 float(np.mean(np.abs(a) > 1.0)), rtol=RTOL,
                                 err_msg=n)
    flat = jax.tree.map(lambda v: np.asarray(v).reshape((8,) + v.shape[2:]),
                        jax.device_get(per_device))
    _assert_rows_bit_identical(flat)


def _mixed_parallel_setup():
  mesh = _mesh2d()
  rng = np.random.default_rng(5)
  x = _different_shards((16, 6), rng, num_shards=4)
  y = rng.normal(size=(16, 8)).astype(np.float32)
  params = {"kernel": rng.normal(size=(6, 8)).astype(np.float32),
            "bias": rng.normal(size=(8,)).astype(np.float32)}
  specs = {"kernel": P(None, "model"), "bias": P()}
  return mesh, x, y, params, specs


def _mixed_loss(p, xs, ys):
  width = p["kernel"].shape[1]
  b = lax.dynamic_slice_in_dim(p["bias"], lax.axis_index("model") * width,
                               width)
  r = xs @ p["kernel"] + b - ys
  return 0.5 * jnp.sum(jnp.square(r))


def test_2d_mesh_mixed_parallel_grad_norm():
  mesh, x, y, params, specs = _mixed_parallel_setup()
  r = (x.astype(np.float64) @ params["kernel"].astype(np.float64) +
       params["bias"].astype(np.float64) - y)
  g_kernel = x.astype(np.float64).T @ r
  g_bias = r.sum(0)
  true_norm = _np_norm(g_kernel, g_bias)
  max_norm = 0.5 * true_norm
  tx = og.clip_by_global_norm(max_norm, axis_name=("data", "model"))
  mon = og.monitor(axis_name=("data", "model"))
  typing = {}

  def step(p, xs, ys):
    grads = jax.grad(_mixed_loss)(p, xs, ys)
    typing.update({n: _vma(g) for n, g in grads.items()})
    clipped, state = tx.update(grads, tx.init(p))
    mstate = mon.update(grads, mon.init(p))[1]
    return grads, clipped, og.metrics(state), og.metrics(mstate)

  fn = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(specs, P("data", None), P("data", "model")),
      out_specs=(specs, specs, P(), P())))
  grads, clipped, m, mm = fn(
      {n: _put(mesh, v, specs[n]) for n, v in params.items()},
      _put(mesh, x, P("data", None)), _put(mesh, y, P("data", "model")))

  assert typing == {"kernel": frozenset({"model"}), "bias": frozenset()}
  np.testing.assert_allclose(np.asarray(grads["kernel"]), g_kernel,
                             rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grads["bias"]), g_bias,
                             rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(float(m["grad/norm"]), true_norm, rtol=RTOL)
  np.testing.assert_allclose(float(mm["grad/norm/kernel"]),
                             _np_norm(g_kernel), rtol=RTOL)
  np.testing.assert_allclose(float(mm["grad/norm/bias"]), _np_norm(g_bias),
                             rtol=RTOL)
  scale = _np_scale(true_norm, max_norm)
  np.testing.assert_allclose(np.asarray(clipped["kernel"]), g_kernel * scale,
                             rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(np.asarray(clipped["bias"]), g_bias * scale,
                             rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda a: og.clip_by_global_norm(1.0, axis_name=a),
    lambda a: og.clip_by_layer_norm(1.0, axis_name=a),
    lambda a: og.monitor(axis_name=a),
], ids=["clip_by_global_norm", "clip_by_layer_norm", "monitor"])
def test_2d_mesh_axis_name_missing_model_axis_raises(make):
  mesh, x, y, params, specs = _mixed_parallel_setup()
  tx = make("data")

  def step(p, xs, ys):
    grads = jax.grad(_mixed_loss)(p, xs, ys)
    return og.metrics(tx.update(grads, tx.init(p))[1])

  fn = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(specs, P("data", None), P("data", "model")),
      out_specs=P()))
  with pytest.raises(ValueError) as info:
    fn({n: _put(mesh, v, specs[n]) for n, v in params.items()},
       _put(mesh, x, P("data", None)), _put(mesh, y, P("data", "model")))
  message = str(info.value)
  assert "varies along mesh axes" in message
  assert "'kernel'" in message
  assert "['model']" in message
  assert "axis_name='data'" in message
  assert "('data', 'model')" in message  # the suggested fix


def test_a_loss_varying_along_an_axis_that_axis_name_omits_raises():
  # Replicated parameters give invariant gradients, but a loss computed on a
  # batch sharded over both axes varies along both: averaged over "data"
  # only, the devices of each "model" index would decide apart.
  mesh = _mesh2d()
  tx = og.guard(og.sgd(0.1), axis_name="data")
  params = {"w": jnp.ones((4,), jnp.float32)}

  def step(p, batch):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((batch @ p) ** 2))(p)
    grads = lax.pmean(grads, ("data", "model"))
    return tx.update(grads, tx.init(p), p, loss=loss)[0]

  fn = jax.jit(jax.shard_map(step, mesh=mesh,
                             in_specs=(P(), P("data", "model")),
                             out_specs=P()))
  batch = _put(mesh, np.ones((8, 8), np.float32), P("data", "model"))
  with pytest.raises(ValueError, match=(
      r"The loss \(`loss=`\) varies along mesh axes \['model'\] that "
      r"axis_name='data' does not name, so its statistics \(and the "
      r"decisions taken on them\) would differ from device to device; pass "
      r"every mesh axis it varies along, e.g\. "
      r"axis_name=\('data', 'model'\)\.")):
    fn(_put(mesh, params["w"], P()), batch)


@pytest.mark.parametrize("make", [
    lambda: og.clip_by_global_norm(1.0, axis_name="data"),
    lambda: og.guard(og.adamw(1e-3), axis_name=("data", "model")),
], ids=["clip", "guard"])
def test_axis_name_outside_shard_map_or_pmap_is_a_clear_error(make):
  tx = make()
  params = {"w": jnp.ones((4,), jnp.float32)}
  with pytest.raises(ValueError, match=(
      r"axis_name=.* names mesh axes \[.*'data'.*\] that are not bound "
      r"where the update runs: check the names against the axes of your "
      r"mesh or `pmap\(axis_name=...\)`, and pass axis_name only inside "
      r"`jax.shard_map` or `jax.pmap` over those axes; under plain `jax.jit` "
      r"with sharded arrays leave axis_name=None")):
    jax.jit(tx.update)(params, tx.init(params), params)


def test_an_unbound_axis_name_inside_shard_map_is_named_first():
  """Inside shard_map over `d`, axis_name='batch' is first of all unbound:
  adding 'd' to it (what the varying check alone would suggest) would fail
  again."""
  mesh = _mesh1d()
  tx = og.guard(og.adamw(1e-3), axis_name="batch")
  fn = jax.jit(jax.shard_map(lambda g: tx.update(g, tx.init(g), g)[0],
                             mesh=mesh, in_specs=(P("d"),), out_specs=P("d")))
  with pytest.raises(ValueError, match=re.escape(
      "axis_name='batch' names mesh axes ['batch'] that are not bound where "
      "the update runs")):
    fn(_put(mesh, np.ones((8, 2), np.float32), P("d")))


# ------------------------------------------------------------------ 4. pmap


def _pmap_grads(rng):
  kernel = (rng.normal(size=(NUM_DEVICES, 4, 3)) *
            (1.0 + np.arange(NUM_DEVICES))[:, None, None]).astype(np.float32)
  bias = rng.normal(size=(NUM_DEVICES, 3)).astype(np.float32)
  return kernel, bias


def _pmap_run(kernel, bias, max_norm=1.0):
  mon = og.monitor(axis_name="d")
  clip = og.clip_by_global_norm(max_norm, axis_name="d")

  def step(k, b):
    grads = {"kernel": k, "bias": b}  # NOT averaged over the devices.
    s_mon = mon.update(grads, mon.init(grads))[1]
    clipped, s_clip = clip.update(grads, clip.init(grads))
    return s_mon, s_clip, og.metrics((s_mon, s_clip)), clipped

  return jax.device_get(jax.pmap(step, axis_name="d")(kernel, bias))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_pmap_one_device_nonfinite_is_seen_by_all(bad):
  kernel, bias = _pmap_grads(np.random.default_rng(6))
  kernel[3, 1, 2] = np.nan if bad == "nan" else np.inf
  s_mon, s_clip, m, _ = _pmap_run(kernel, bias)

  _assert_rows_bit_identical(s_mon)
  _assert_rows_bit_identical(s_clip)
  _assert_rows_bit_identical(m)
  # Under pmap the gradients are taken as replicated: each device counts
  # its own, and all agree on the worst count (device 3's one element), not
  # on the sum over the devices.
  ones = np.ones(NUM_DEVICES)
  np.testing.assert_array_equal(m["grad/nonfinite"], ones)
  np.testing.assert_array_equal(m["grad/nonfinite/kernel"], ones)
  np.testing.assert_array_equal(m["grad/nonfinite/bias"], 0 * ones)
  kind = np.isnan if bad == "nan" else np.isposinf
  assert np.all(kind(np.asarray(m["grad/norm"])))
  assert not np.any(np.signbit(np.asarray(m["grad/norm"])))  # a plain NaN
  assert np.all(kind(np.asarray(m["grad/norm/kernel"])))
  assert np.all(np.asarray(s_clip.nonfinite))
  assert np.all(~np.isfinite(np.asarray(s_clip.grad_norm)))
  # A non-finite norm is left to the non-finite defences: no clipping.
  np.testing.assert_array_equal(np.asarray(s_clip.clip_scale),
                                np.ones(NUM_DEVICES, np.float32))


def test_pmap_finite_norm_is_worst_device_same_device_for_every_leaf():
  rng = np.random.default_rng(7)
  grow = (1.0 + np.arange(NUM_DEVICES)).astype(np.float32)
  kernel = (rng.normal(size=(4, 3)).astype(np.float32) * grow[:, None, None] +
            np.float32(0.01) * rng.normal(size=(NUM_DEVICES, 4, 3)).astype(
                np.float32))
  bias = (rng.normal(size=(3,)).astype(np.float32) * grow[:, None] +
          np.float32(0.01) * rng.normal(size=(NUM_DEVICES, 3)).astype(
              np.float32))
  # Device 7 has the largest kernel and the largest bias.
  assert int(np.argmax([_np_norm(k) for k in kernel])) == 7
  assert int(np.argmax([_np_norm(b) for b in bias])) == 7
  per_device = [_np_norm(kernel[d], bias[d]) for d in range(NUM_DEVICES)]
  s_mon, s_clip, m, _ = _pmap_run(kernel, bias)
  _assert_rows_bit_identical(s_mon)
  _assert_rows_bit_identical(s_clip)
  np.testing.assert_allclose(np.asarray(m["grad/norm"]),
                             np.full(NUM_DEVICES, max(per_device)), rtol=RTOL)


def test_debug_nans_op_by_op_in_shard_map_without_vma_checks():
  """`jax.disable_jit()` with `jax_debug_nans` inside a `shard_map` that
  takes the gradients as replicated (`check_vma=False`): the devices agree
  on the worst value through a NaN-aware max, which built its NaN on every
  step and so raised on finite gradients."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("d",))
  rows = np.arange(NUM_DEVICES * 6, dtype=np.float32).reshape(-1, 3)
  grads = jax.device_put({"w": rows}, NamedSharding(mesh, P("d")))
  params = {"w": jnp.ones((2, 3))}
  tx = og.guard(og.sgd(0.1), axis_name="d", max_norm=1e9)
  state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  step = jax.shard_map(lambda g, s, p: tx.update(g, s, p)[1], mesh=mesh,
                       in_specs=(P("d"), P(), P()), out_specs=P(),
                       check_vma=False)
  with jax.disable_jit(), jax.debug_nans(True):
    state = step(grads, state, params)
  worst = max(_np_norm(rows[2 * d:2 * d + 2]) for d in range(NUM_DEVICES))
  np.testing.assert_allclose(og.metrics(state)["grad/norm"], worst,
                             rtol=RTOL)


def test_pmap_finite_norm_is_max_over_devices_of_per_device_norms():
  """README: per device, then made identical by a pmax, "the worst device
  decides". The worst devices of the two leaves differ here."""
  rng = np.random.default_rng(8)
  kernel = rng.normal(size=(NUM_DEVICES, 4, 3)).astype(np.float32)
  bias = rng.normal(size=(NUM_DEVICES, 3)).astype(np.float32)
  kernel[2] *= np.float32(10.0)  # device 2: largest kernel.
  bias[5] *= np.float32(10.0)    # device 5: largest bias.
  per_device = [_np_norm(kernel[d], bias[d]) for d in range(NUM_DEVICES)]
  s_mon, s_clip, m, clipped = _pmap_run(kernel, bias, max_norm=1.0)

  _assert_rows_bit_identical(s_mon)
  _assert_rows_bit_identical(s_clip)
  _assert_rows_bit_identical(m)
  # Per layer: the largest norm any device saw for that layer.
  np.testing.assert_allclose(
      np.asarray(m["grad/norm/kernel"]),
      np.full(NUM_DEVICES, max(_np_norm(k) for k in kernel)), rtol=RTOL)
  np.testing.assert_allclose(
      np.asarray(m["grad/norm/bias"]),
      np.full(NUM_DEVICES, max(_np_norm(b) for b in bias)), rtol=RTOL)
  # Global: the largest per-device global norm.
  worst = max(per_device)
  np.testing.assert_allclose(np.asarray(m["grad/norm"]),
                             np.full(NUM_DEVICES, worst), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(s_clip.grad_norm),
                             np.full(NUM_DEVICES, worst), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(clipped["kernel"]),
                             kernel.astype(np.float64) / worst, rtol=RTOL)


# --------------------------------------------------- 5. jit with NamedSharding


def _jit_sharded_grads(rng):
  return {
      "kernel": _different_shards((16, 4), rng),            # P("d", None)
      "emb": _different_shards((3, 8), rng, axis=1),        # P(None, "d")
      "bias": rng.normal(size=(4,)).astype(np.float32),     # P()
  }


_JIT_SPECS = {"kernel": P("d", None), "emb": P(None, "d"), "bias": P()}


def test_jit_named_sharding_matches_numpy_and_unsharded():
  mesh = _mesh1d()
  grads = _jit_sharded_grads(np.random.default_rng(9))
  sharded = {n: _put(mesh, g, _JIT_SPECS[n]) for n, g in grads.items()}
  single = jax.device_put(grads, jax.devices()[0])
  assert not sharded["kernel"].sharding.is_fully_replicated
  true_norm = _np_norm(*grads.values())
  max_norm = 0.5 * true_norm
  tx = optax.chain(og.monitor(histogram=True),
                   og.clip_by_global_norm(max_norm))

  @jax.jit
  def step(g):
    clipped, state = tx.update(g, tx.init(g))
    return clipped, state, og.metrics(state)

  c_sh, s_sh, m_sh = step(sharded)
  c_1, _, m_1 = step(single)
  assert set(m_sh) == set(m_1)
  # The statistics come out replicated.
  for leaf in jax.tree.leaves(s_sh):
    assert leaf.sharding.is_fully_replicated, leaf.sharding

  scale = _np_scale(true_norm, max_norm)
  for m in (m_sh, m_1):
    np.testing.assert_allclose(float(m["grad/norm"]), true_norm, rtol=RTOL)
    np.testing.assert_allclose(float(m["grad/norm.1"]), true_norm, rtol=RTOL)
    np.testing.assert_allclose(float(m["grad/clip_scale"]), scale, rtol=RTOL)
    assert int(m["grad/nonfinite"]) == 0
    for n, g in grads.items():
      np.testing.assert_allclose(float(m[f"grad/norm/{n}"]), _np_norm(g),
                                 rtol=RTOL, err_msg=n)
      np.testing.assert_allclose(float(m[f"grad/frac_above_1/{n}"]),
                                 float(np.mean(np.abs(g) > 1.0)), rtol=RTOL)
      np.testing.assert_array_equal(np.asarray(m[f"grad/hist/{n}"]),
                                    _np_histogram(g), err_msg=n)
  for name in m_sh:
    np.testing.assert_allclose(np.asarray(m_sh[name]), np.asarray(m_1[name]),
                               rtol=1e-6, err_msg=name)
  for n, g in grads.items():
    np.testing.assert_allclose(np.asarray(c_sh[n]), g.astype(np.float64) *
                               scale, rtol=RTOL, err_msg=n)
    np.testing.assert_allclose(np.asarray(c_sh[n]), np.asarray(c_1[n]),
                               rtol=1e-6, err_msg=n)
    assert c_sh[n].sharding.is_equivalent_to(sharded[n].sharding, g.ndim)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_jit_named_sharding_nonfinite_in_one_shard(bad):
  mesh = _mesh1d()
  grads = _jit_sharded_grads(np.random.default_rng(10))
  grads["kernel"][6, 1] = np.nan if bad == "nan" else np.inf  # device 3.
  sharded = {n: _put(mesh, g, _JIT_SPECS[n]) for n, g in grads.items()}
  single = jax.device_put(grads, jax.devices()[0])
  tx = optax.chain(og.monitor(), og.clip_by_global_norm(1.0))

  @jax.jit
  def step(g):
    return og.metrics(tx.update(g, tx.init(g))[1])

  for where, m in (("single device", step(single)),
                   ("sharded", step(sharded))):
    assert int(m["grad/nonfinite"]) == 1, where
    assert int(m["grad/nonfinite/kernel"]) == 1, where
    assert int(m["grad/nonfinite/emb"]) == 0, where
    assert not np.isfinite(float(m["grad/norm"])), where
    assert not np.isfinite(float(m["grad/norm/kernel"])), where
    np.testing.assert_allclose(float(m["grad/norm/emb"]),
                               _np_norm(grads["emb"]), rtol=RTOL,
                               err_msg=where)
    assert float(m["grad/clip_scale"]) == 1.0, where


def _explicit_mesh():
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # jax without Explicit axes: nothing to test
    pytest.skip("this jax has no Explicit mesh axes")
  return jax.make_mesh((NUM_DEVICES,), ("d",),
                       axis_types=(axis_type.Explicit,))


@pytest.mark.standard_promotion  # optax.adamw mixes Python floats and int32
@pytest.mark.parametrize("make", [
    lambda: og.guard(og.adamw(1e-2), histogram=True, zscore=True,
                     stacked=("blocks",)),
    lambda: og.guard(optax.adamw(1e-2), stacked=("blocks",)),
    lambda: optax.chain(og.adaptive_grad_clip(0.05), og.autoclip(),
                        og.zclip(), og.zero_nonfinite(),
                        og.clip_by_layer_norm(1.0), og.sgd(0.1)),
], ids=["guard fast path", "guard generic path", "clipping chain"])
def test_jit_explicit_mesh_leaves_of_one_shape_sharded_differently(make):
  # On a mesh of Explicit axes (`jax.make_mesh`'s default) the sharding is
  # part of each array's type: two biases of one shape, one sharded and one
  # replicated, and layers stacked along a sharded leading axis, cannot be
  # stacked or concatenated as they are.
  mesh = _explicit_mesh()
  rng = np.random.default_rng(12)
  params = {
      "kernel": rng.normal(size=(4, 16)).astype(np.float32),  # tensor parallel
      "bias_a": rng.normal(size=(16,)).astype(np.float32),
      "bias_b": rng.normal(size=(16,)).astype(np.float32),
      "blocks": {"kernel": rng.normal(size=(8, 4, 4)).astype(np.float32)},
  }
  specs = {"kernel": P(None, "d"), "bias_a": P("d"), "bias_b": P(),
           "blocks": {"kernel": P("d", None, None)}}
  grads = [jax.tree.map(lambda p: (rng.normal(size=p.shape) * 0.3).astype(
      np.float32), params) for _ in range(3)]
  grads[1]["bias_a"][5] = np.nan  # on device 2 only.
  put = lambda tree: jax.tree.map(lambda x, s: _put(mesh, x, s), tree, specs)
  tx = make()

  def run(params, grads, put):
    state = tx.init(put(params))
    step = jax.jit(lambda g, s, p: (lambda u, s: (
        optax.apply_updates(p, u), s, og.metrics(s)))(*tx.update(g, s, p)))
    p, metrics = put(params), []
    for g in grads:
      p, state, m = step(put(g), state, p)
      metrics.append(jax.device_get(m))
    return jax.device_get(p), metrics

  with jax.set_mesh(mesh):
    p_sharded, m_sharded = run(params, grads, put)
  p_single, m_single = run(params, grads, lambda tree: tree)
  for got, want in zip(jax.tree.leaves(p_sharded), jax.tree.leaves(p_single)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for step, (got, want) in enumerate(zip(m_sharded, m_single)):
    assert set(got) == set(want)
    for name in got:
      np.testing.assert_allclose(np.asarray(got[name], np.float64),
                                 np.asarray(want[name], np.float64),
                                 rtol=1e-5, err_msg=f"{name} at step {step}")
  if "optim/skipped" in m_sharded[0]:  # a guard: its monitor sees the input
    m = m_sharded[0]
    np.testing.assert_allclose(m["grad/norm/bias_b"],
                               _np_norm(grads[0]["bias_b"]), rtol=RTOL)
    for layer in range(8):
      np.testing.assert_allclose(
          m[f"grad/norm/blocks/kernel/{layer}"],
          _np_norm(grads[0]["blocks"]["kernel"][layer]), rtol=RTOL)
    assert int(m_sharded[1]["grad/nonfinite/bias_a"]) == 1
    assert bool(m_sharded[1]["optim/skipped"])


@pytest.mark.standard_promotion  # optax.adamw mixes Python floats and int32
@pytest.mark.parametrize("inner", [og.adamw, optax.adamw])
def test_jit_explicit_mesh_zero2_moments_sharded_like_the_gradients(inner):
  """ZeRO-2 on Explicit axes (the guide's recipe): parameters replicated,
  gradients and moments sharded (`tx.init` of parameters placed like the
  gradients). The updates, resharded to the parameters, equal a
  single-device run's, a NaN in one shard skipping the step everywhere."""
  mesh = _explicit_mesh()
  rng = np.random.default_rng(3)
  params = {"kernel": rng.normal(size=(16, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32)}
  specs = {"kernel": P("d", None), "bias": P()}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(
      np.float32), params) for _ in range(3)]
  grads[1]["kernel"][9, 2] = np.nan  # in device 4's shard only
  tx = og.guard(inner(1e-2))

  def run(put, replicate):
    state = jax.jit(tx.init)(put(params))
    step = jax.jit(lambda g, s, p: (lambda u, s: (
        optax.apply_updates(p, replicate(u)), s, og.metrics(s)))(
            *tx.update(g, s, p)))
    p, skipped = params, []
    for g in grads:
      p, state, m = step(put(g), state, p)
      skipped.append(bool(m["optim/skipped"]))
    return jax.device_get(p), skipped

  with jax.set_mesh(mesh):
    p_sharded, skipped = run(
        lambda t: jax.tree.map(lambda x, s: _put(mesh, x, s), t, specs),
        lambda u: jax.tree.map(lambda x: jax.sharding.reshard(x, P()), u))
  p_single, skipped_single = run(lambda t: t, lambda u: u)
  assert skipped == skipped_single == [False, True, False]
  for got, want in zip(jax.tree.leaves(p_sharded), jax.tree.leaves(p_single)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.standard_promotion  # optax.adamw mixes Python floats and int32
@pytest.mark.parametrize("explicit,devices", [
    (True, NUM_DEVICES), (True, 6), (False, NUM_DEVICES)],
                         ids=["explicit", "explicit 6 of 8", "auto"])
def test_jit_long_sharded_axis_is_summed_shard_by_shard(explicit, devices):
  """An axis longer than the CPU path's rows of 4,096 terms, sharded so that
  those rows would straddle the shards (5,504 = 8 x 688; 4,128 = 6 x 688 on
  a mesh of 6 of the 8 devices): on Explicit axes the reshape into rows was
  refused while tracing, and on Auto axes XLA gathered the whole leaf onto
  every device. Now the guard's NaN step is skipped, its norms are numpy's,
  and the step keeps no leaf-sized temporary (bare AdamW keeps none)."""
  axis_types = (jax.sharding.AxisType.Explicit if explicit else
                jax.sharding.AxisType.Auto,)
  if explicit:
    _explicit_mesh()  # skips on a jax without Explicit axes
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("d",),
                           axis_types=axis_types)
  rng = np.random.default_rng(13)
  shape = (4, 688 * devices)
  params = {"kernel": rng.normal(size=shape).astype(np.float32)}
  grads = [{"kernel": (rng.normal(size=shape) * 1e-3).astype(np.float32)}
           for _ in range(2)]
  grads[1]["kernel"][2, 3000] = np.nan  # on one device only.
  put = lambda tree: {"kernel": _put(mesh, tree["kernel"], P(None, "d"))}
  tx = og.guard(og.adamw(1e-2), monitor=True)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, og.metrics(s)

  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    state = jax.jit(tx.init)(put(params))
    compiled = jax.jit(step).lower(put(params), state,
                                   put(grads[0])).compile()
    p, state, m0 = compiled(put(params), state, put(grads[0]))
    p_before = jax.device_get(p)
    p, state, m1 = compiled(p, state, put(grads[1]))
  np.testing.assert_allclose(float(m0["grad/norm/kernel"]),
                             _np_norm(grads[0]["kernel"]), rtol=RTOL)
  np.testing.assert_allclose(float(m0["param/norm/kernel"]),
                             _np_norm(params["kernel"]), rtol=RTOL)
  assert bool(m1["optim/skipped"]) and int(m1["grad/nonfinite/kernel"]) == 1
  np.testing.assert_array_equal(jax.device_get(p)["kernel"],
                                p_before["kernel"])
  shard_bytes = params["kernel"].nbytes // devices
  assert compiled.memory_analysis().temp_size_in_bytes < shard_bytes // 4


# -------------------------------- 6. monitor with histograms under shard_map


def _monitor_shard_map(kernel, bias):
  mesh = _mesh1d()
  tx = og.monitor(axis_name="d", histogram=True, zscore=True)

  def step(k, b):
    grads = {"kernel": k, "bias": b}
    state = tx.update(grads, tx.init(grads))[1]
    return og.metrics(state), jax.tree.map(lambda v: v[None], state)

  return jax.device_get(jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P("d", None), P()),
      out_specs=(P(), P("d"))))(_put(mesh, kernel, P("d", None)),
                                _put(mesh, bias, P())))


def _monitor_grads(rng):
  kernel = _different_shards((16, 4), rng)
  kernel[0, 0] = 0.0
  kernel[1, 1] = np.float32(3e-12)   # below the first edge.
  kernel[15, 2] = np.float32(5e5)    # above the last edge.
  bias = (rng.normal(size=(4,)) * 1e-3).astype(np.float32)
  return kernel, bias


def test_shard_map_monitor_per_layer_and_histograms():
  kernel, bias = _monitor_grads(np.random.default_rng(11))
  m, per_device = _monitor_shard_map(kernel, bias)
  _assert_rows_bit_identical(per_device)

  np.testing.assert_allclose(float(m["grad/norm"]), _np_norm(kernel, bias),
                             rtol=RTOL)
  for name, g in [("kernel", kernel), ("bias", bias)]:
    np.testing.assert_allclose(float(m[f"grad/norm/{name}"]), _np_norm(g),
                               rtol=RTOL)
    np.testing.assert_allclose(float(m[f"grad/frac_above_1/{name}"]),
                               float(np.mean(np.abs(g) > 1.0)), rtol=RTOL)
    assert int(m[f"grad/nonfinite/{name}"]) == 0
    hist = np.asarray(m[f"grad/hist/{name}"])
    assert hist.shape == (len(og.HIST_BUCKETS),)
    np.testing.assert_array_equal(hist, _np_histogram(g), err_msg=name)
    assert int(hist.sum()) == g.size  # bias counted once, not 8 times.
  assert int(m["grad/nonfinite"]) == 0


@pytest.mark.parametrize("device", [None, 0, 5])
def test_shard_map_frac_above_1_in_one_shard(device):
  # Only one device's shard of a large sharded kernel holds an element above
  # 1 (or none does): every device must take the same decision to count, and
  # count it once.
  mesh = _mesh1d()
  kernel = np.full((8 * 256, 1024), 0.01, np.float32)  # 2M elements.
  if device is not None:
    kernel[device * 256 + 3, 7] = -1.5
    kernel[device * 256 + 9, 8] = 1.25
  bias = np.array([0.5, -2.0, 1.0], np.float32)
  tx = og.monitor(axis_name="d")

  def step(k, b):
    grads = {"kernel": k, "bias": b}
    state = tx.update(grads, tx.init(grads))[1]
    return og.metrics(state), jax.tree.map(lambda v: v[None], state)

  m, per_device = jax.device_get(jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P("d", None), P()),
      out_specs=(P(), P("d"))))(_put(mesh, kernel, P("d", None)),
                                _put(mesh, bias, P())))
  _assert_rows_bit_identical(per_device)
  for name, g in [("kernel", kernel), ("bias", bias)]:
    np.testing.assert_allclose(float(m[f"grad/frac_above_1/{name}"]),
                               float(np.mean(np.abs(g) > 1.0)), rtol=RTOL)
  # The total: the kernel counted once over its shards, the bias once.
  above = np.sum(np.abs(kernel) > 1.0) + np.sum(np.abs(bias) > 1.0)
  np.testing.assert_allclose(float(m["grad/frac_above_1"]),
                             above / (kernel.size + bias.size), rtol=RTOL)


@pytest.mark.parametrize("bad", ["nan", "inf", "nan_and_inf"])
def test_shard_map_monitor_nonfinite_on_one_device(bad):
  kernel, bias = _monitor_grads(np.random.default_rng(12))
  # Rows 6 and 7 are device 3's shard only.
  if bad in ("nan", "nan_and_inf"):
    kernel[6, 0] = np.nan
    kernel[7, 3] = np.nan
  if bad in ("inf", "nan_and_inf"):
    kernel[6, 2] = -np.inf
  expected = int(np.sum(~np.isfinite(kernel)))
  m, per_device = _monitor_shard_map(kernel, bias)
  _assert_rows_bit_identical(per_device)

  assert int(m["grad/nonfinite/kernel"]) == expected
  assert int(m["grad/nonfinite/bias"]) == 0
  assert int(m["grad/nonfinite"]) == expected
  assert not np.isfinite(float(m["grad/norm"]))
  assert not np.isfinite(float(m["grad/norm/kernel"]))
  np.testing.assert_allclose(float(m["grad/norm/bias"]), _np_norm(bias),
                             rtol=RTOL)
  hist = np.asarray(m["grad/hist/kernel"])
  np.testing.assert_array_equal(hist, _np_histogram(kernel))
  assert int(hist.sum()) == kernel.size
  assert int(hist[og.HIST_BUCKETS.index("nan")]) == int(
      np.sum(np.isnan(kernel)))
  assert int(hist[og.HIST_BUCKETS.index("inf")]) == int(
      np.sum(np.isinf(kernel)))
  assert int(np.asarray(m["grad/hist/bias"]).sum()) == bias.size


# --------------------------------------- 7. clip_by_layer_norm under shard_map


def test_shard_map_clip_by_layer_norm():
  mesh = _mesh1d()
  rng = np.random.default_rng(13)
  grads = {
      "kernel": _different_shards((16, 4), rng),            # P("d", None)
      "emb": _different_shards((3, 8), rng, axis=1) * np.float32(1e-3),
      "bias": rng.normal(size=(4,)).astype(np.float32),     # P()
  }
  specs = {"kernel": P("d", None), "emb": P(None, "d"), "bias": P()}
  norms = {n: _np_norm(g) for n, g in grads.items()}
  max_norm = 0.5 * norms["kernel"]
  assert norms["emb"] < max_norm and norms["bias"] < max_norm
  tx = og.clip_by_layer_norm(max_norm, axis_name="d")

  def step(g):
    clipped, state = tx.update(g, tx.init(g))
    return clipped, state, og.metrics(state), jax.tree.map(
        lambda v: v[None], state)

  clipped, state, m, per_device = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(specs,),
      out_specs=(specs, P(), P(), P("d"))))(
          {n: _put(mesh, g, specs[n]) for n, g in grads.items()})

  _assert_rows_bit_identical(per_device)
  assert isinstance(state, og.ClipByLayerNormState)
  for n, g in grads.items():
    np.testing.assert_allclose(float(m[f"grad/norm/{n}"]), norms[n],
                               rtol=RTOL, err_msg=n)
    expected = g.astype(np.float64) * _np_scale(norms[n], max_norm)
    np.testing.assert_allclose(np.asarray(clipped[n]), expected, rtol=RTOL,
                               err_msg=n)
  assert int(m["optim/layers_clipped"]) == 1
  assert int(m["optim/num_clipped"]) == 1
  assert state.layer_norms.names == tuple(jax.tree_util.tree_leaves(
      {n: n for n in grads}))


def test_zero_nonfinite_and_value_clip_count_over_a_sharded_kernel():
  """A kernel sharded over the 8 devices with NaN/Inf in device 3's shard
  only, beside a replicated bias holding a NaN: the counts are the whole
  model's (the bias once), on every device, as numpy counts them."""
  mesh = _mesh1d()
  rng = np.random.default_rng(0)
  kernel = (rng.normal(size=(16, 4)) * 2).astype(np.float32)
  kernel[6, 1], kernel[7, 2] = np.nan, np.inf            # device 3 only
  bias = np.array([np.nan, 0.5, 3.0], np.float32)         # replicated
  both = np.concatenate([kernel.ravel(), bias])
  for tx, want in [
      (og.zero_nonfinite(axis_name="d"),
       {"grad/nonfinite_zeroed": 3, "grad/nonfinite_zeroed/kernel": 2,
        "grad/nonfinite_zeroed/bias": 1}),
      (og.clip_by_value(1.0, axis_name="d"),   # changed: |x| > 1, Inf too
       {"grad/frac_clipped": np.sum(np.abs(both[~np.isnan(both)]) > 1) /
        both.size})]:
    def step(k, b, tx=tx):
      g = {"kernel": k, "bias": b}
      _, state = tx.update(g, tx.init(g))
      return jax.tree.map(lambda v: v[None], og.metrics(state))
    got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("d"), P()),
                                out_specs=P("d")))(
        _put(mesh, kernel, P("d")), _put(mesh, bias, P()))
    for name, value in want.items():
      np.testing.assert_allclose(np.asarray(got[name]),
                                 np.full(NUM_DEVICES, value), rtol=1e-6,
                                 err_msg=name)

"""Replica-consistent skipping (issue 3): `skip_nonfinite` and `skip_spikes`
with `axis_name` under `shard_map` and `pmap`, on the 8 CPU devices of
`conftest.py`.

One device with a NaN (in its gradients, its loss, or its inner optimizer's
output) must make EVERY device skip, so that replicated parameters and
optimizer state stay bit-identical across devices. Gradients always differ
from device to device. Expected values (skip decisions, NaN counts, norms)
come from NumPy on the global arrays.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _skip

N = 8
NAN = np.float32(np.nan)

pytestmark = pytest.mark.standard_promotion  # every test traces optax.adam


# ---------------------------------------------------------------- helpers


def _mesh() -> Mesh:
  assert jax.device_count() >= N, "conftest.py must give 8 devices"
  return Mesh(np.array(jax.devices()[:N]), ("d",))


def _put(mesh, x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


def _vma(x) -> frozenset[str]:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def _keystr(path) -> str:
  return jax.tree_util.keystr(path)


def _rows_identical(tree, axis: int, skip=lambda path: False) -> None:
  """Every leaf's entries along `axis` (the device axis) are equal bit for
  bit, except leaves whose path `skip` selects (per-device shards)."""
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
    if skip(_keystr(path)):
      continue
    leaf = np.moveaxis(np.asarray(leaf), axis, 0)
    raw = np.ascontiguousarray(leaf).view(np.uint8).reshape(leaf.shape[0], -1)
    for i in range(1, leaf.shape[0]):
      assert np.array_equal(raw[0], raw[i]), (
          f"{_keystr(path)} differs between device 0 and {i}")
    checked += 1
  assert checked


def _same_bits(a, b, what) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for i, (x, y) in enumerate(zip(la, lb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.tobytes() == y.tobytes(), (what, i)


def _take(tree, index, axis=0):
  return jax.tree.map(lambda v: np.take(np.asarray(v), index, axis=axis),
                      tree)


def _reciprocal():
  """Divides by the gradient: a 0 element gives Inf from finite gradients."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (
          jax.tree.map(lambda g: 1.0 / g, updates), state))


# ============================== skip_nonfinite: shard_map, data parallel


def _dp_loss(p, x, y):
  r = x @ p["w"] + p["b"] - y
  return 0.5 * jnp.sum(r * r)


def _np_dp_grads(p, x, y):
  """Global gradient of the summed loss, float64 (NaN propagates as in JAX)."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  r = x @ p["w"].astype(np.float64) + p["b"].astype(np.float64) - y
  return {"b": r.sum(0), "w": x.T @ r}


@functools.lru_cache(maxsize=None)
def _dp_runner():
  mesh = _mesh()
  tx = og.skip_nonfinite(optax.adam(0.1), axis_name="d")
  typing = {}

  def run(p, xs, ys, bad_loss_device):
    def body(carry, inputs):
      p, s = carry
      x, y, bad = inputs
      loss, g = jax.value_and_grad(_dp_loss)(p, x, y)
      typing.update({k: _vma(v) for k, v in g.items()})
      typing["loss"] = _vma(loss)
      loss = loss * jnp.where(lax.axis_index("d") == bad, NAN,
                              jnp.float32(1.0))
      u, s = tx.update(g, s, p, loss=loss)
      p = optax.apply_updates(p, u)
      return (p, s), jax.tree.map(lambda v: v[None], (p, s, g, u))

    s0 = tx.init(p)
    _, snaps = lax.scan(body, (p, s0), (xs, ys, bad_loss_device))
    return jax.tree.map(lambda v: v[None], s0), snaps

  fn = jax.jit(jax.shard_map(
      run, mesh=mesh, in_specs=(P(), P(None, "d"), P(None, "d"), P()),
      out_specs=(P("d"), P(None, "d"))))
  return mesh, fn, typing


def test_shard_map_data_parallel_one_device_nan_makes_all_skip():
  """Replicated parameters, per-device batches; jax.grad of the replicated
  parameters is invariant (summed over devices). Steps: good, NaN in device
  3's batch, NaN loss on device 5 only, good."""
  mesh, fn, typing = _dp_runner()
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  k = 4
  xs = rng.normal(size=(k, 16, 4)).astype(np.float32)
  xs *= (1.0 + np.arange(16) // 2)[None, :, None].astype(np.float32)
  ys = rng.normal(size=(k, 16, 3)).astype(np.float32)
  xs[1, 7, 2] = NAN           # rows 6, 7 are device 3's batch
  bad_loss = np.array([-1, -1, 5, -1], np.int32)
  s0, (p, s, g, u) = jax.device_get(fn(
      {n: _put(mesh, v, P()) for n, v in params.items()},
      _put(mesh, xs, P(None, "d")), _put(mesh, ys, P(None, "d")),
      _put(mesh, bad_loss, P())))

  assert typing["w"] == frozenset() and typing["b"] == frozenset()
  assert typing["loss"] == frozenset({"d"})
  # Every device holds the same params and state at every step.
  for t in range(k):
    _rows_identical(_take((p, s, u), t), axis=0)
  skipped = np.asarray(s.skipped)[:, 0]
  np.testing.assert_array_equal(skipped, [False, True, True, False])
  # The skipped steps left params and adam's state exactly as they were.
  for t in (1, 2):
    _same_bits(_take(p, t), _take(p, 0), f"params at {t}")
    _same_bits(_take(s.inner_state, t), _take(s.inner_state, 0),
               f"adam at {t}")
    assert np.all(np.asarray(u["w"])[t] == 0)
  assert np.asarray(s.num_skipped)[-1, 0] == 2
  assert np.asarray(s.inner_state[0].count)[-1, 0] == 2
  # The NaN counts of step 1 are those of the global gradient (NumPy).
  params0 = jax.tree.map(lambda v: np.asarray(v)[0, 0], p)
  want = _np_dp_grads(params0, xs[1], ys[1])
  counts = np.asarray(s.last_bad_counts.values)
  assert s.last_bad_counts.names == ("b", "w")
  np.testing.assert_array_equal(
      counts[1, 0], [np.sum(~np.isfinite(want["b"])),
                     np.sum(~np.isfinite(want["w"]))])
  assert counts[1, 0].sum() > 0
  # Step 2 (the loss alone, on one device) is now the last bad step: its
  # gradients hold no NaN/Inf.
  np.testing.assert_array_equal(counts[2, 0], [0, 0])
  # The good steps are adam's steps on the global gradient.
  g0 = _np_dp_grads(params, xs[0], ys[0])
  np.testing.assert_allclose(np.asarray(g["w"])[0, 0], g0["w"], rtol=1e-4,
                             atol=1e-4)
  ref = optax.adam(0.1)
  r0, _ = ref.update({k: v.astype(np.float32) for k, v in g0.items()},
                     ref.init(params))
  np.testing.assert_allclose(np.asarray(u["w"])[0, 0], r0["w"], rtol=1e-4)


# ========================= skip_nonfinite: shard_map, a sharded kernel


def _sharded_loss(p, a, c):
  # kernel: this device's rows (varying); bias: replicated (invariant).
  return (jnp.sum(jnp.tanh(p["kernel"]) * a) + jnp.sum(p["bias"] * c) +
          0.5 * jnp.sum(p["bias"] * p["bias"]))


def _np_sharded_grads(p, a, c):
  k = p["kernel"].astype(np.float64)
  return {"bias": c.astype(np.float64).sum(0) + p["bias"],
          "kernel": a.astype(np.float64) * (1.0 - np.tanh(k)**2)}


_SPECS = {"kernel": P("d", None), "bias": P()}


@functools.lru_cache(maxsize=None)
def _sharded_runner(inner_name, recount=False):
  # `recount`: a separate runner, traced under the `recount` fixture (below).
  del recount
  mesh = _mesh()
  inner = {"adam": lambda: optax.adam(0.1),
           "reciprocal_adam": lambda: optax.chain(_reciprocal(),
                                                  optax.adam(0.1))}[inner_name]
  tx = og.skip_nonfinite(inner(), axis_name="d")
  typing = {}

  def run(p, as_, cs, bad_loss_device):
    def body(carry, inputs):
      p, s = carry
      a, c, bad = inputs
      loss, g = jax.value_and_grad(_sharded_loss)(p, a, c)
      typing.update({k: _vma(v) for k, v in g.items()})
      loss = loss * jnp.where(lax.axis_index("d") == bad, NAN,
                              jnp.float32(1.0))
      u, s = tx.update(g, s, p, loss=loss)
      p = optax.apply_updates(p, u)
      return (p, s), jax.tree.map(lambda v: v[None], (p, s, u))

    s0 = tx.init(p)
    _, snaps = lax.scan(body, (p, s0), (as_, cs, bad_loss_device))
    return snaps

  fn = jax.jit(jax.shard_map(
      run, mesh=mesh,
      in_specs=(_SPECS, P(None, "d", None), P(None, "d", None), P()),
      out_specs=P(None, "d")))
  return mesh, fn, typing


def _sharded_data(rng, k):
  params = {"kernel": rng.normal(size=(16, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32)}
  scale = (1.0 + np.arange(16) // 2).astype(np.float32)[None, :, None]
  as_ = (rng.normal(size=(k, 16, 4)) * scale).astype(np.float32)
  cs = rng.normal(size=(k, N, 4)).astype(np.float32)
  return params, as_, cs


def _run_sharded(inner_name, params, as_, cs, bad_loss, recount=False):
  mesh, fn, typing = _sharded_runner(inner_name, recount)
  p, s, u = jax.device_get(fn(
      {n: _put(mesh, v, _SPECS[n]) for n, v in params.items()},
      _put(mesh, as_, P(None, "d", None)),
      _put(mesh, cs, P(None, "d", None)), _put(mesh, bad_loss, P())))
  assert typing == {"kernel": frozenset({"d"}), "bias": frozenset()}
  return p, s, u


def _is_shard(path: str) -> bool:
  """Per-device shards of the kernel: the parameter, its update and adam's
  moments; everything else is replicated."""
  return "kernel" in path and "last_bad" not in path


@pytest.mark.parametrize("bad", ["nan", "neg_inf"])
def test_shard_map_sharded_kernel_one_device_nonfinite(bad):
  """Per-device (varying) gradients of a sharded kernel beside a replicated
  bias. Steps: good, bad value in device 3's shard only, good, NaN loss on
  device 5 only, good."""
  rng = np.random.default_rng(1)
  k = 5
  params, as_, cs = _sharded_data(rng, k)
  value = NAN if bad == "nan" else np.float32(-np.inf)
  as_[1, 6, 1] = value   # rows 6 and 7: device 3
  as_[1, 7, 3] = value
  bad_loss = np.array([-1, -1, -1, 5, -1], np.int32)
  p, s, u = _run_sharded("adam", params, as_, cs, bad_loss)

  for t in range(k):
    _rows_identical(_take((p, s, u), t), axis=0, skip=_is_shard)
  skipped = np.asarray(s.skipped)[:, 0]
  np.testing.assert_array_equal(skipped, [False, True, False, True, False])
  for t in (1, 3):
    # Every device: its own shard and the replicated parts unchanged.
    _same_bits(_take(p, t), _take(p, t - 1), f"params at {t}")
    _same_bits(_take(s.inner_state, t), _take(s.inner_state, t - 1),
               f"adam at {t}")
    for leaf in jax.tree.leaves(_take(u, t)):
      assert np.all(leaf == 0)
  for t in (0, 2, 4):
    for d in range(N):  # every device stepped on the good steps
      assert not np.array_equal(np.asarray(p["kernel"])[t, d],
                                np.asarray(p["kernel"])[t - 1, d] if t else
                                params["kernel"][2 * d:2 * d + 2])
  np.testing.assert_array_equal(np.asarray(s.inner_state[0].count)[:, 0],
                                [1, 1, 2, 2, 3])
  # NaN/Inf counts of the global gradient at step 1 (NumPy): 2 in the kernel.
  p0 = {"kernel": np.asarray(p["kernel"])[0].reshape(16, 4),
        "bias": np.asarray(p["bias"])[0, 0]}
  want = _np_sharded_grads(p0, as_[1], cs[1])
  assert s.last_bad_counts.names == ("bias", "kernel")
  np.testing.assert_array_equal(
      np.asarray(s.last_bad_counts.values)[1, 0],
      [np.sum(~np.isfinite(want["bias"])),
       np.sum(~np.isfinite(want["kernel"]))])
  assert np.sum(~np.isfinite(want["kernel"])) == 2
  assert np.asarray(s.first_bad_step)[-1, 0] == 1
  assert np.asarray(s.last_bad_step)[-1, 0] == 3
  assert np.asarray(s.num_skipped)[-1, 0] == 2


@pytest.fixture(params=[False, True], ids=["counted", "recounted"])
def recount(request, monkeypatch):
  """Whether an opaque optimizer's bad update is counted from itself or by
  running the optimizer again (`_skip.RECOUNT_ABOVE`: large updates)."""
  if request.param:
    monkeypatch.setattr(_skip, "RECOUNT_ABOVE", -1)
  return request.param


def test_shard_map_inner_nonfinite_on_one_device(recount):
  """Finite gradients; the inner chain divides by them, and device 6's shard
  holds a zero: its inner update is Inf/NaN. Every device skips."""
  rng = np.random.default_rng(2)
  params, as_, cs = _sharded_data(rng, 2)
  as_[1, 12, 0] = 0.0   # rows 12, 13: device 6 (tanh' > 0, so the grad is 0)
  p, s, u = _run_sharded("reciprocal_adam", params, as_, cs,
                         np.array([-1, -1], np.int32), recount)
  for t in range(2):
    _rows_identical(_take((p, s, u), t), axis=0, skip=_is_shard)
  np.testing.assert_array_equal(np.asarray(s.skipped)[:, 0], [False, True])
  _same_bits(_take(p, 1), _take(p, 0), "params")
  _same_bits(_take(s.inner_state, 1), _take(s.inner_state, 0), "inner")
  np.testing.assert_array_equal(np.asarray(s.last_bad_counts.values)[1, 0],
                                [0, 1])


def test_shard_map_without_axis_name_is_an_error():
  mesh = _mesh()
  tx = og.skip_nonfinite(optax.sgd(0.1))

  def run(k):
    return tx.update({"kernel": k}, tx.init({"kernel": k}))[0]

  fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("d", None),
                             out_specs=P("d", None)))
  with pytest.raises(ValueError, match="varies along mesh axes"):
    fn(_put(mesh, np.ones((16, 4), np.float32), P("d", None)))


# ========================================= skip_nonfinite: pmap


@functools.lru_cache(maxsize=None)
def _pmap_runner(inner_name, recount=False):
  del recount  # a separate runner, traced under the `recount` fixture
  inner = {"adam": lambda: optax.adam(0.1),
           "reciprocal_adam": lambda: optax.chain(_reciprocal(),
                                                  optax.adam(0.1))}[inner_name]
  tx = og.skip_nonfinite(inner(), axis_name="d")

  def step(p, s, g, poison, average):
    g = jax.tree.map(lambda x: jnp.where(average, lax.pmean(x, "d"), x), g)
    loss = jnp.where(poison, NAN, jnp.float32(1.0))
    u, s = tx.update(g, s, p, loss=loss)
    return optax.apply_updates(p, u), s, u

  return tx, jax.pmap(step, axis_name="d")


def _replicate(tree):
  return jax.tree.map(
      lambda v: np.broadcast_to(np.asarray(v), (N,) + np.shape(v)).copy(),
      tree)


def _pmap_grads(rng):
  scale = (1.0 + np.arange(N)).astype(np.float32)
  return {"kernel": (rng.normal(size=(N, 4, 3)) *
                     scale[:, None, None]).astype(np.float32),
          "bias": rng.normal(size=(N, 3)).astype(np.float32)}


def _guard_fields(s):
  return s._replace(inner_state=None)


def test_pmap_not_averaged_one_device_nan_makes_all_skip():
  """Each device feeds its OWN gradients to the optimizer (no pmean), so
  replicas drift apart on good steps; what must hold: all devices take the
  same decision, skipped steps leave every device's inner state as it was,
  and the guard's own fields are identical across devices."""
  tx, step = _pmap_runner("adam")
  rng = np.random.default_rng(3)
  params = {"kernel": np.ones((4, 3), np.float32),
            "bias": np.zeros((3,), np.float32)}
  p, s = _replicate(params), _replicate(tx.init(params))
  no = np.zeros(N, bool)
  only = lambda d: np.arange(N) == d  # noqa: E731
  g_bad = _pmap_grads(rng)
  g_bad["kernel"][3, 1, 1] = NAN
  g_bad["kernel"][3, 2, 0] = np.float32(np.inf)
  plan = [  # (grads, poisoned loss on, expected skip)
      (_pmap_grads(rng), no, False),
      (g_bad, no, True),                      # NaN/Inf on device 3 only
      (_pmap_grads(rng), only(6), True),      # NaN loss on device 6 only
      (_pmap_grads(rng), no, False),
  ]
  history = [(p, s)]
  for g, poison, expect in plan:
    out = step(p, s, g, poison, no)
    if g is g_bad:
      # og.check reads the pmapped state (one replica), on device or host.
      for state in (out[1], jax.device_get(out[1])):
        with pytest.raises(og.NonFiniteGradientError) as e:
          og.check(state)
        assert str(e.value) == (
            "Step 1: non-finite gradients; first bad layers: kernel (2 "
            "NaN/Inf). The guard skipped the step (1 bad in a row, 1 skipped "
            "in total).")
        # og.metrics and MetricsLog: one value per device, per layer.
        m = og.metrics(state)
        np.testing.assert_array_equal(m["optim/last_bad_nonfinite/kernel"],
                                      np.full(N, 2))
        np.testing.assert_array_equal(m["optim/last_bad_nonfinite/bias"],
                                      np.zeros(N))
        log = og.MetricsLog(lag=0)
        log.record(state)
        np.testing.assert_array_equal(
            log.to_numpy()["optim/last_bad_nonfinite/kernel"], [np.full(N, 2)])
    p, s, u = jax.device_get(out)
    history.append((p, s))
    np.testing.assert_array_equal(np.asarray(s.skipped), np.full(N, expect))
    _rows_identical(_guard_fields(s), axis=0)
    if expect:
      _same_bits(p, history[-2][0], "params")
      _same_bits(s.inner_state, history[-2][1].inner_state, "inner state")
      for leaf in jax.tree.leaves(u):
        assert np.all(np.asarray(leaf) == 0)
  # The good steps really did differ per device (no averaging).
  assert not np.array_equal(history[1][0]["kernel"][0],
                            history[1][0]["kernel"][1])
  np.testing.assert_array_equal(np.asarray(s.inner_state[0].count),
                                np.full(N, 2))
  np.testing.assert_array_equal(np.asarray(s.num_skipped), np.full(N, 2))
  # Counts of step 1: device 3's two bad kernel elements, none in the bias
  # (the only bad device's count; DESIGN: per device, then the worst).
  s1 = history[2][1]
  np.testing.assert_array_equal(np.asarray(s1.last_bad_counts.values),
                                np.tile([0, 2], (N, 1)))


@pytest.mark.parametrize("bad_loss", [-np.inf, np.inf, NAN])
def test_pmap_a_nonfinite_loss_on_one_device_is_not_outvoted(bad_loss):
  """Under `pmap` the devices agree on the worst loss: a -Inf on one device
  (below every finite loss) must still make every device skip."""
  tx = og.guard(og.sgd(0.1), axis_name="d", spike_sigma=None)
  params = {"w": np.ones((3,), np.float32)}

  def step(p, s, g, loss):
    u, s = tx.update(g, s, p, loss=loss)
    return optax.apply_updates(p, u), s

  losses = np.ones(N, np.float32)
  losses[3] = bad_loss
  p, s = jax.pmap(step, axis_name="d")(
      _replicate(params), _replicate(tx.init(params)),
      _replicate({"w": np.full((3,), 0.5, np.float32)}), losses)
  m = og.metrics(s)
  np.testing.assert_array_equal(m["optim/skipped"], np.ones(N, bool))
  np.testing.assert_array_equal(m["optim/last_bad_reason"], np.full(N, 3))
  np.testing.assert_array_equal(m["loss/nonfinite"], np.ones(N))
  np.testing.assert_array_equal(p["w"], np.ones((N, 3), np.float32))
  # The agreed value is the non-finite one (NaN wins over any Inf).
  np.testing.assert_array_equal(m["loss/value"], np.full(N, bad_loss))


def test_pmap_averaged_gradients_keep_replicas_bit_identical():
  tx, step = _pmap_runner("adam")
  rng = np.random.default_rng(4)
  params = {"kernel": np.ones((4, 3), np.float32),
            "bias": np.zeros((3,), np.float32)}
  p, s = _replicate(params), _replicate(tx.init(params))
  no, yes = np.zeros(N, bool), np.ones(N, bool)
  g_bad = _pmap_grads(rng)
  g_bad["bias"][5, 0] = NAN
  plan = [(_pmap_grads(rng), False), (g_bad, True), (_pmap_grads(rng), False)]
  prev = (p, s)
  for g, expect in plan:
    p, s, u = jax.device_get(step(p, s, g, no, yes))
    _rows_identical((p, s, u), axis=0)
    assert np.all(np.asarray(s.skipped) == expect)
    if expect:
      _same_bits((p, s.inner_state), (prev[0], prev[1].inner_state), "step")
      # After the pmean every device holds the one NaN bias element; the
      # devices agree on that count (the worst one), not on its sum.
      assert s.last_bad_counts.names == ("bias", "kernel")
      np.testing.assert_array_equal(np.asarray(s.last_bad_counts.values),
                                    np.tile([1, 0], (N, 1)))
    prev = (p, s)
  assert int(np.asarray(s.inner_state[0].count)[0]) == 2


def test_pmap_inner_nonfinite_on_one_device(recount):
  tx, step = _pmap_runner("reciprocal_adam", recount)
  rng = np.random.default_rng(5)
  params = {"kernel": np.ones((4, 3), np.float32),
            "bias": np.zeros((3,), np.float32)}
  p, s = _replicate(params), _replicate(tx.init(params))
  no = np.zeros(N, bool)
  p1, s1, _ = jax.device_get(step(p, s, _pmap_grads(rng), no, no))
  g = _pmap_grads(rng)
  g["bias"][2, 1] = 0.0  # finite; 1/0 = Inf on device 2 only
  p2, s2, u2 = jax.device_get(step(p1, s1, g, no, no))
  assert np.all(np.asarray(s2.skipped)) and not np.any(np.asarray(s1.skipped))
  _same_bits((p2, s2.inner_state), (p1, s1.inner_state), "skipped step")
  _rows_identical(_guard_fields(s2), axis=0)
  np.testing.assert_array_equal(np.asarray(s2.last_bad_counts.values),
                                np.tile([1, 0], (N, 1)))


# ============================================== skip_spikes: 8 devices


def _spike_reference(norms, losses, *, sigma, window, warmup):
  """The rule of the issue (see test_spikes.py), float64."""
  hist_n, hist_l, skip = [], [], []
  for n, l in zip(norms, losses):
    def thr(h):
      if len(h) < warmup:
        return math.inf
      v = np.asarray(h[-window:])
      return v.mean() + sigma * v.std()
    spike = (not np.isfinite(n) or n > thr(hist_n) or
             not np.isfinite(l) or l > thr(hist_l))
    skip.append(spike)
    if not spike:
      hist_n.append(n)
      hist_l.append(l)
  return np.asarray(skip)


SIGMA, WINDOW, WARMUP, STEPS = 3.0, 16, 8, 48


def _spike_streams(rng):
  """Per-step kernel grads [T, 16, 4] whose shards differ per device, a
  replicated bias grad [T, 4] and per-device losses [T, 8]; spikes planted
  in one device's shard or loss only."""
  level = np.exp(rng.normal(0.0, 0.1, STEPS))
  kernel = (rng.normal(size=(STEPS, 16, 4)) *
            (1.0 + np.arange(16) // 2)[None, :, None] *
            level[:, None, None]).astype(np.float32)
  bias = (rng.normal(size=(STEPS, 4)) * 3.0).astype(np.float32)
  losses = (2.0 + 0.05 * rng.normal(size=(STEPS, N))).astype(np.float32)
  kernel[20, 4:6] *= np.float32(40.0)   # device 2's shard spikes
  kernel[21, 4:6] *= np.float32(40.0)
  kernel[30, 13, 1] = NAN               # device 6's shard
  losses[25, 7] = np.float32(60.0)      # device 7's loss spikes
  losses[35, 1] = NAN                   # device 1's loss is NaN
  return kernel, bias, losses


@functools.lru_cache(maxsize=None)
def _spikes_shard_map_runner():
  mesh = _mesh()
  tx = og.skip_spikes(optax.sgd(0.1, momentum=0.9), sigma=SIGMA,
                      window=WINDOW, warmup_steps=WARMUP, axis_name="d")
  params = {"kernel": jnp.zeros((2, 4), jnp.float32),
            "bias": jnp.zeros((4,), jnp.float32)}

  def run(kernel, bias, losses):
    def body(s, inputs):
      k, b, l = inputs
      p = {"kernel": lax.pcast(params["kernel"], "d", to="varying"),
           "bias": params["bias"]}
      u, s = tx.update({"kernel": k, "bias": b}, s, p, loss=l[0])
      return s, jax.tree.map(lambda v: v[None], (s, u))

    p0 = {"kernel": lax.pcast(params["kernel"], "d", to="varying"), "bias": params["bias"]}
    _, snaps = lax.scan(body, tx.init(p0), (kernel, bias, losses))
    return snaps

  fn = jax.jit(jax.shard_map(
      run, mesh=mesh,
      in_specs=(P(None, "d", None), P(), P(None, "d")),
      out_specs=P(None, "d")))
  return mesh, fn


def test_shard_map_skip_spikes_replicas_agree_and_match_reference():
  rng = np.random.default_rng(6)
  kernel, bias, losses = _spike_streams(rng)
  mesh, fn = _spikes_shard_map_runner()
  s, u = jax.device_get(fn(_put(mesh, kernel, P(None, "d", None)),
                           _put(mesh, bias, P()),
                           _put(mesh, losses, P(None, "d"))))
  # Global norm of the full gradient (bias counted once) and the mean loss.
  norms = np.sqrt(np.sum(np.square(kernel.astype(np.float64)), axis=(1, 2)) +
                  np.sum(np.square(bias.astype(np.float64)), axis=1))
  mean_loss = losses.astype(np.float64).mean(axis=1)
  skip = _spike_reference(norms, mean_loss, sigma=SIGMA, window=WINDOW,
                          warmup=WARMUP)
  for t in (20, 21, 25, 30, 35):
    assert skip[t], t
  for t in range(STEPS):
    _rows_identical(_take(s, t)._replace(inner_state=None), axis=0)
  np.testing.assert_array_equal(np.asarray(s.skipped), np.tile(
      skip[:, None], (1, N)))
  # Thresholds: the reference's, from NumPy (the norm history is the one of
  # the accepted global norms).
  accepted = norms[~skip]
  t_first = np.flatnonzero(~skip)[WARMUP]  # first step with a full warm-up
  h = accepted[:WARMUP]
  np.testing.assert_allclose(np.asarray(s.norm_threshold)[t_first, 0],
                             h.mean() + SIGMA * h.std(), rtol=1e-4)
  for t in np.flatnonzero(skip):
    for leaf in jax.tree.leaves(_take(u, t)):
      assert np.all(leaf == 0)
    _same_bits(_take(s.inner_state, t), _take(s.inner_state, t - 1),
               f"momentum at {t}")


def _pmap_spike_runner():
  tx = og.skip_spikes(optax.adam(0.1), sigma=SIGMA, window=WINDOW,
                      warmup_steps=WARMUP, axis_name="d")
  params = {"kernel": jnp.zeros((4, 3), jnp.float32),
            "bias": jnp.zeros((3,), jnp.float32)}

  def run(kernel, bias, losses):
    def body(s, inputs):
      k, b, l = inputs
      u, s = tx.update({"kernel": k, "bias": b}, s, params, loss=l)
      return s, (s, u)
    return lax.scan(body, tx.init(params), (kernel, bias, losses))[1]

  return jax.pmap(run, axis_name="d")


def test_pmap_skip_spikes_worst_device_decides_for_all():
  """Under pmap (no typing) the norm is each device's own, made identical by
  taking the worst device (README); the decision is the same everywhere."""
  rng = np.random.default_rng(7)
  level = np.exp(rng.normal(0.0, 0.1, STEPS))
  kernel = (rng.normal(size=(N, STEPS, 4, 3)) *
            level[None, :, None, None]).astype(np.float32)
  bias = rng.normal(size=(N, STEPS, 3)).astype(np.float32)
  kernel[4, 22] *= np.float32(30.0)        # device 4 spikes alone
  bias[1, 33, 2] = np.float32(np.inf)      # device 1's bias is Inf
  # Each device its own loss; at step 40 device 6's alone jumps, by an
  # amount that the largest loss shows as a spike and the mean would not.
  losses = (1.5 + 0.1 * rng.normal(size=(N, STEPS))).astype(np.float32)
  losses[6, 40] = np.float32(2.0)
  s, u = jax.device_get(_pmap_spike_runner()(kernel, bias, losses))
  per_device = np.sqrt(
      np.sum(np.square(kernel.astype(np.float64)), axis=(2, 3)) +
      np.sum(np.square(bias.astype(np.float64)), axis=2))   # [N, T]
  worst = per_device.max(axis=0)
  skip = _spike_reference(worst, losses.max(axis=0).astype(np.float64),
                          sigma=SIGMA, window=WINDOW, warmup=WARMUP)
  by_mean = _spike_reference(worst, losses.mean(axis=0).astype(np.float64),
                             sigma=SIGMA, window=WINDOW, warmup=WARMUP)
  assert not by_mean[40]  # so the test tells the two rules apart
  for t in (22, 33, 40):
    assert skip[t], t
  np.testing.assert_array_equal(np.asarray(s.skipped),
                                np.tile(skip[None], (N, 1)))
  _rows_identical(s._replace(inner_state=None), axis=0)
  # Inner (adam) state: per device, but untouched on every skipped step.
  for t in np.flatnonzero(skip):
    _same_bits(_take(s.inner_state, t, axis=1),
               _take(s.inner_state, t - 1, axis=1), f"adam at {t}")
    for leaf in jax.tree.leaves(u):
      assert np.all(np.asarray(leaf)[:, t] == 0)
  np.testing.assert_array_equal(np.asarray(s.inner_state[0].count)[:, -1],
                                np.full(N, int((~skip).sum())))


# ============== optax.MultiSteps around the guard, with a sharded kernel


@pytest.mark.parametrize("check_vma", [True, False])
def test_microbatches_with_a_nan_shard_are_dropped_by_every_device(check_vma):
  """FSDP: the kernel is sharded over the 8 devices, and micro-batch 1 has a
  NaN in device 3's shard only. optax.skip_not_finite decides per shard (a
  skip state that shard_map refuses, or devices parting at MultiSteps'
  cond while the guard inside waits for all of them);
  og.skip_nonfinite_microbatch drops the micro-batch on every device. With
  typed values (check_vma=True) the result equals the same run on the
  whole arrays on one device; with check_vma=False the shards are taken as
  replicated (the documented untyped rule: each device's own norm, the
  worst deciding), so the decisions agree but the clip may differ."""
  rng = np.random.default_rng(7)
  grads = rng.normal(size=(4, N * 4)).astype(np.float32)
  grads[1, 3 * 4 + 2] = NAN                       # device 3's shard only
  bias_grads = rng.normal(size=(4, 3)).astype(np.float32)
  params = {"w": np.linspace(-1, 1, N * 4, dtype=np.float32),
            "b": np.zeros(3, np.float32)}

  def run(params, grads, bias_grads, axis_name):
    tx = optax.MultiSteps(
        og.guard(og.adamw(0.1), max_norm=1.0, axis_name=axis_name),
        every_k_schedule=2,
        should_skip_update_fn=og.skip_nonfinite_microbatch(
            axis_name=axis_name))
    state = tx.init(params)
    skipped = []
    for k in range(4):
      updates, state = tx.update({"w": grads[k], "b": bias_grads[k]}, state,
                                 params)
      params = optax.apply_updates(params, updates)
      m = og.metrics(state)
      skipped.append(m["optim/microbatch_skipped"])
    return params, jnp.stack(skipped), m["grad/microbatch_nonfinite"][None]

  mesh = _mesh()
  sharded = jax.jit(jax.shard_map(
      functools.partial(run, axis_name="d"), mesh=mesh,
      in_specs=({"w": P("d"), "b": P()}, P(None, "d"), P()),
      out_specs=({"w": P("d"), "b": P()}, P("d"), P("d")),
      check_vma=check_vma))
  got, skipped, count = sharded(params, grads, bias_grads)
  want, want_skipped, _ = jax.jit(functools.partial(run, axis_name=None))(
      params, grads, bias_grads)
  np.testing.assert_array_equal(np.asarray(want_skipped),
                                [False, True, False, False])
  # Every device made the same decisions (stacked along "d": 8 copies).
  np.testing.assert_array_equal(np.asarray(skipped).reshape(N, 4),
                                np.tile(want_skipped, (N, 1)))
  assert np.all(np.asarray(count) == 0)           # micro-batch 3 was fine
  if check_vma:
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6, atol=1e-7)
  assert not np.array_equal(got["w"], params["w"])  # a step was taken


def test_microbatch_skip_counts_over_devices_and_locally_where_unbound():
  """The count is the whole tree's, over the devices of a typed shard_map;
  outside any mapped context (MultiSteps.init) it is the local count."""
  should_skip = og.skip_nonfinite_microbatch(axis_name="d")
  skip, info = should_skip({"w": jnp.array([1.0, np.nan, np.inf])}, 0, None)
  assert bool(skip) and int(info["num_not_finite"]) == 2
  values = np.ones(N * 2, np.float32)
  values[[1, 5, 6]] = [NAN, np.inf, -np.inf]      # devices 0, 2 and 3

  def count(x):
    skip, info = should_skip({"w": x}, 0, None)
    return skip, info["num_not_finite"]

  skip, n = jax.jit(jax.shard_map(count, mesh=_mesh(), in_specs=P("d"),
                                  out_specs=(P(), P())))(values)
  assert bool(skip) and int(n) == 3
  with pytest.raises(ValueError, match=r"`axis_name` must be None, a mesh "
                     r"axis name or a tuple of them, but got 3\."):
    og.skip_nonfinite_microbatch(axis_name=3)
  # Inside a map that does not bind the name (misspelt, or a `pmap(init)`
  # without axis_name), the count is over the map's axes, so every device
  # decides alike: taken as local, device 3 had dropped its NaN micro-batch
  # alone (the others then waited for it in the guard's all-reduce until
  # XLA aborted, or, without a guard, went on a step ahead). Untyped, the
  # count is the worst device's.
  misspelt = og.skip_nonfinite_microbatch(axis_name="data")
  one_nan = np.ones((N, 2), np.float32)
  one_nan[3, 1] = NAN
  decide = lambda x: misspelt({"w": x}, 0, None)
  skip, info = jax.pmap(decide, axis_name="d")(one_nan)
  n = info["num_not_finite"]
  assert np.all(np.asarray(skip)) and np.all(np.asarray(n) == 1)
  skip, info = jax.jit(jax.shard_map(
      lambda x: jax.tree.map(lambda v: v[None], decide(x)), mesh=_mesh(),
      in_specs=P("d"), out_specs=P("d"), check_vma=False))(one_nan.ravel())
  n = info["num_not_finite"]
  assert np.all(np.asarray(skip)) and np.all(np.asarray(n) == 1)
  multi = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2,
                           should_skip_update_fn=misspelt)
  state = jax.pmap(multi.init)({"w": jnp.ones((N, 2))})  # no axis_name
  assert not np.any(np.asarray(state.skip_state["should_skip"]))


def test_microbatch_skip_reports_an_unbound_axis_beside_a_bound_one():
  """On a ("d", "m") mesh mapped over "d" only, axis_name=("d", "m") names
  an axis that is not bound there: refused by name, not counted locally."""
  mesh = Mesh(np.array(jax.devices()[:N]).reshape(4, 2), ("d", "m"))
  should_skip = og.skip_nonfinite_microbatch(axis_name=("d", "m"))
  fn = jax.shard_map(lambda x: should_skip({"w": x}, 0, None)[0], mesh=mesh,
                     in_specs=P("d"), out_specs=P(), axis_names={"d"})
  with pytest.raises(ValueError, match=r"axis_name=\('d', 'm'\) names mesh "
                     r"axes \['m'\] that are not bound"):
    jax.jit(fn)(np.ones(8, np.float32))

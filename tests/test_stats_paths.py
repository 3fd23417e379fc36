"""The statistics core's two paths (CPU-decided and GPU/TPU-fused) agree.

`tree_stats` picks its path with `lax.platform_dependent` when the step is
compiled: on CPU the per-block `lax.cond` decisions, elsewhere the full
variadic pass with no conditional. The test machines are CPUs, so both paths
are called directly here on the same blocks and checked against NumPy
(float64), one device and over 8 devices with one device's shard bad; and
the step lowered for CUDA and TPU is checked to hold no conditional that
depends on data.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _stats

PATHS = {"cpu": _stats._decided_stats, "fused": _stats._full_stats}


def _scenarios():
  rng = np.random.default_rng(7)
  normal = lambda *s: rng.normal(size=s).astype(np.float32)
  big = normal(300, 200)                      # large leaf: decided alone
  nan_big = normal(300, 200)
  nan_big[5, 5] = np.nan
  inf_small = normal(4, 4)
  inf_small[0, 1] = -np.inf
  return {
      "ordinary": {"w": 0.01 * big, "b": 0.01 * normal(200), "s": normal(4, 4)},
      "nan_and_inf": {"w": nan_big, "b": normal(200), "s": inf_small},
      "overflowing_squares": {"w": 1e20 * normal(300, 200), "b": normal(200)},
      "underflowing_squares": {"w": 1e-25 * normal(300, 200),
                               "b": np.zeros(200, np.float32)},
      "at_the_threshold": {
          "w": np.where(np.arange(60000).reshape(300, 200) == 4321,
                        np.nextafter(np.float32(1), np.float32(2)),
                        np.float32(1e-3)).astype(np.float32),
          "b": np.array([1.0, -1.0, 0.5] * 10, np.float32),
          "s": np.array([[1.0078125, -2.0], [0.5, 1.0]], jnp.bfloat16)},
  }


def _reference(tree, threshold):
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  norms = []
  for x in leaves:
    if np.isnan(x).any():
      norms.append(np.nan)
    elif np.isinf(x).any():
      norms.append(np.inf)
    else:
      norms.append(np.linalg.norm(x.ravel()))
  return dict(norms=np.array(norms),
              nonfinite=np.array([np.sum(~np.isfinite(x)) for x in leaves]),
              count=np.array([np.sum(np.abs(x) > threshold) for x in leaves]),
              sizes=np.array([x.size for x in leaves]))


def _check(stats, tree, threshold):
  ref = _reference(tree, threshold)
  np.testing.assert_allclose(np.asarray(stats.norms), ref["norms"],
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(stats.nonfinite), ref["nonfinite"])
  np.testing.assert_array_equal(np.asarray(stats.count_above), ref["count"])
  np.testing.assert_array_equal(np.asarray(stats.sizes), ref["sizes"])
  finite = np.isfinite(ref["norms"]).all()
  expected = np.sqrt(np.sum(ref["norms"]**2)) if finite else np.nan
  if finite:
    np.testing.assert_allclose(float(stats.global_norm), expected, rtol=1e-5)
  else:
    assert not np.isfinite(float(stats.global_norm))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("scenario", sorted(_scenarios()))
def test_each_path_against_numpy(path, scenario):
  tree = {k: jnp.asarray(v) for k, v in _scenarios()[scenario].items()}

  @jax.jit
  def stats(t):
    blocks = _stats.blocks_of(jax.tree.leaves(t), None)
    return PATHS[path](blocks, None, 1.0)

  _check(stats(tree), tree, 1.0)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("bad_device", [None, 3])
def test_each_path_under_shard_map(path, bad_device):
  # A kernel sharded over 8 devices (one device's shard with a NaN and an
  # element above 1, or none) beside a replicated bias.
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  kernel = np.random.default_rng(2).normal(size=(8 * 64, 96)).astype(
      np.float32) * 0.01
  if bad_device is not None:
    kernel[bad_device * 64 + 1, 2] = np.nan
    kernel[bad_device * 64 + 5, 7] = 3.0
  bias = np.array([0.25, -4.0, 1.0], np.float32)

  def stats(k, b):
    blocks = _stats.blocks_of([k, b], "d")
    return PATHS[path](blocks, "d", 1.0)

  out = jax.jit(jax.shard_map(stats, mesh=mesh, in_specs=(P("d", None), P()),
                              out_specs=P()))(
      jax.device_put(kernel, NamedSharding(mesh, P("d", None))),
      jax.device_put(bias, NamedSharding(mesh, P())))
  _check(out, [kernel, bias], 1.0)


def _data_dependent_conditionals(text: str) -> list[str]:
  """`stablehlo.case` ops whose index is not a constant (nor the result of a
  case on a constant): `platform_dependent` lowers to such constant cases,
  which XLA folds away before compiling."""
  constant = set(re.findall(r"(%[\w#]+) = stablehlo.constant", text))
  found = []
  for result, operand in re.findall(
      r"(%[\w#]+)(?::\d+)? = \"stablehlo.case\"\((%[\w#]+)\)", text):
    if operand in constant:
      constant.add(result)
    else:
      found.append(operand)
  return found


@pytest.mark.standard_promotion  # traces optax's optimizers
@pytest.mark.parametrize("make", [
    lambda: og.guard(og.adamw(1e-3)),
    lambda: og.guard(optax.adamw(1e-3)),
    lambda: og.skip_nonfinite(optax.adam(1e-3)),
], ids=["guard(og.adamw)", "guard(optax.adamw)", "skip_nonfinite(adam)"])
@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
def test_no_data_dependent_conditional_off_the_cpu(platform, make):
  # A `lax.cond` on a GPU costs a device-to-host copy of its predicate (a
  # synchronisation) on every step; the GPU/TPU step must have none. The CPU
  # step has its per-block decisions (the check itself can fail), and the
  # generic path its count of an inner update's NaN/Inf on a bad step.
  params = {"w": jnp.ones((300, 200)), "b": jnp.ones((200,)),
            "s": jnp.ones((4, 4))}
  tx = make()
  state = tx.init(params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  text = jax.jit(step).trace(params, state, params).lower(
      lowering_platforms=(platform,)).as_text()
  found = _data_dependent_conditionals(text)
  if platform == "cpu":
    assert found
  else:
    assert not found, found


# ------------------------------------------------- the decision, computed once


def test_computed_once_is_the_identity_bit_for_bit():
  values = (np.float32(np.nan), np.float32(-0.0), np.float32(np.inf),
            np.float32(-3.5e-45), np.float32(1.25), np.bool_(True),
            np.bool_(False), np.int32(-7), jnp.bfloat16(3.0))
  out = jax.jit(_stats.computed_once)(values)
  for x, y in zip(values, out):
    y = np.asarray(y)
    assert y.shape == () and y.dtype == np.asarray(x).dtype
    assert np.asarray(x).tobytes() == y.tobytes(), (x, y)
  with pytest.raises(ValueError, match="computed_once takes scalars"):
    _stats.computed_once((jnp.ones(3),))


def test_computed_once_inside_shard_map_with_a_varying_flag():
  # A per-device flag (varying) beside an invariant factor.
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))

  def f(x):
    keep, factor = _stats.computed_once((jnp.sum(x) > 0, jnp.float32(2.0)))
    return jnp.where(keep, x * factor, 0.0)

  x = np.arange(-8.0, 8.0, dtype=np.float32)
  out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"),
                              out_specs=P("d")))(x)
  pairs = x.reshape(8, 2)
  expected = np.where(pairs.sum(1, keepdims=True) > 0, 2 * pairs, 0)
  np.testing.assert_array_equal(np.asarray(out), expected.ravel())


def _logic_ops(tx, num_leaves: int) -> dict[str, int]:
  params = {f"layer_{i}": {"w": jnp.full((4, 4), 0.01), "b": jnp.zeros(4)}
            for i in range(num_leaves // 2)}
  state = tx.init(params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  text = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile().as_text()
  return {op: len(re.findall(rf"= \S+ {op}\(", text))
          for op in ("and", "or", "not", "compare")}


@pytest.mark.standard_promotion  # traces optax's optimizers
@pytest.mark.parametrize("make", [
    lambda: og.guard(og.adamw(1e-3)),
    lambda: og.guard(optax.adamw(1e-3)),
    lambda: optax.chain(og.clip_by_global_norm(1.0), optax.adamw(1e-3)),
], ids=["guard_fast", "guard_generic", "clip"])
@pytest.mark.standard_promotion  # optax's adamw
def test_the_decision_is_not_compiled_into_every_leaf(make):
  # The guard's decision (NaN flags, spike test, clip factor) is scalar
  # logic; XLA copies such cheap producers into every leaf's fused kernel
  # unless they are computed once. Its logic ops must not grow with the
  # number of leaves (they grew by ~12 per leaf before; a few come and go
  # with how the leaves are grouped into blocks).
  grown = sum(_logic_ops(make(), 60).values()) - sum(
      _logic_ops(make(), 20).values())
  assert grown < 40, grown  # < 1 per added leaf


@pytest.mark.standard_promotion  # traces optax's optimizers
@pytest.mark.parametrize("make", [
    lambda: og.guard(og.adamw(1e-3)),
    lambda: og.skip_spikes(optax.adam(1e-3)),
], ids=["guard", "skip_spikes"])
@pytest.mark.standard_promotion  # optax's adam
def test_the_step_holds_no_scatter(make):
  # The spike history is written with a select, not `.at[slot].set`: XLA
  # expands a scatter and then runs its simplifier over the whole step
  # again (three more passes over a 1,000-leaf step when it compiles).
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  tx = make()
  state = tx.init(params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p, loss=jnp.float32(1.0))
    return optax.apply_updates(p, updates), s

  text = jax.jit(step).lower(params, state, params).as_text()
  assert "scatter" not in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_gradient_sized_temporary_on_cpu(dtype):
  # The monitor's step (gradient and parameter statistics) keeps no copy of
  # the gradients: in bf16 the per-block conditionals had made XLA keep a
  # float32 copy of every block (2x the gradients).
  params = {f"w{i}": jnp.full((1024, 512), 0.01, dtype) for i in range(4)}
  tx = og.monitor()
  state = tx.init(params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile()
  leaf_bytes = 1024 * 512 * jnp.dtype(dtype).itemsize
  assert compiled.memory_analysis().temp_size_in_bytes < leaf_bytes // 4


def test_a_constant_zero_gradient_in_the_step_is_not_nan():
  # The gradient of an unused parameter is a zero constant inside the step;
  # XLA must not turn its rescaled squares into 0 * inf.
  tx = og.guard(og.adamw(0.1))
  params = {"used": jnp.ones(3), "unused": jnp.ones((2, 2))}

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.sum(p["used"] ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new_params, state = step(params, tx.init(params))
  m = og.metrics(state)
  assert float(m["grad/norm/unused"]) == 0.0
  np.testing.assert_allclose(m["grad/norm"], 2 * np.sqrt(3), rtol=1e-6)
  assert not bool(m["optim/skipped"])
  assert float(new_params["used"][0]) < 1.0
  for x in (jnp.zeros((2, 3)), jnp.full((4,), 3e-30), jnp.full((2,), 1e30)):
    stats = jax.jit(lambda: _stats.tree_stats({"x": x}))()
    want = np.sqrt(np.sum(np.square(np.asarray(x, np.float64))))
    np.testing.assert_allclose(stats.norms[0], want, rtol=1e-6)


def test_total_count_is_exact_and_saturates_instead_of_wrapping():
  """Per-layer counts add up exactly to int32 max; beyond it (a model of
  over 2**31 elements, every one NaN) the total stays at int32 max, where a
  plain int32 sum wraps negative and reads as "no NaN". The same on a
  state fetched to the host."""
  top = np.iinfo(np.int32).max
  for counts, want in (([2**30, 2**30 - 1, 0], top),
                       ([2**30, 2**30, 5], top),
                       ([top, top, top], top),
                       ([16_777_217, 3, 0], 16_777_220),   # not a float32
                       ([], 0)):
    counts = np.asarray(counts, np.int32)
    assert int(jax.jit(_stats.total_count)(jnp.asarray(counts))) == want
    assert int(_stats.total_count(counts)) == want
  assert int(np.sum(np.asarray([2**30, 2**30, 5], np.int32),
                    dtype=np.int32)) < 0   # the premise: int32 wraps

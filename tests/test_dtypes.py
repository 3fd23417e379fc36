"""Parameter dtypes off the float32 road: complex, float16, float64 (64-bit
mode, in a subprocess), integer leaves and Python floats, each against
optax or NumPy."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og


def _complex(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * (rng.normal(size=shape) +
                              1j * rng.normal(size=shape)), jnp.complex64)


def _complex_params(seed=0):
  return {"w": _complex((3, 4), seed, 0.5), "b": _complex((4,), seed + 1)}


def _run(tx, params, grads_list, standard=False):
  state = tx.init(params)
  updates = []
  for g in grads_list:
    if standard:
      with jax.numpy_dtype_promotion("standard"):
        u, state = jax.jit(tx.update)(g, state, params)
    else:
      u, state = jax.jit(tx.update)(g, state, params)
    params = jax.tree.map(lambda p, x: p + x, params, u)
    updates.append(u)
  return params, state, updates


@pytest.mark.parametrize("build", [
    lambda m: m.adam(0.05),
    lambda m: m.adamw(0.05, weight_decay=0.1, mask=None),
    lambda m: m.adam(0.05, nesterov=True, eps_root=1e-8),
    lambda m: m.sgd(0.05, momentum=0.9, nesterov=True),
], ids=["adam", "adamw", "adam_nesterov", "sgd_nesterov"])
def test_complex_parameters_get_optax_numbers(build):
  """optax's second moment is |g|^2 (real), not g**2 (complex)."""
  params = _complex_params()
  grads = [jax.tree.map(lambda p, i=i: _complex(p.shape, 10 + i), params)
           for i in range(20)]
  p1, s1, _ = _run(build(og), params, grads)
  p2, s2, _ = _run(build(optax), params, grads, standard=True)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  for key in ("nu", "trace"):
    ours = optax.tree.get(s1, key, None)
    if ours is not None:
      for a, b in zip(jax.tree.leaves(ours),
                      jax.tree.leaves(optax.tree.get(s2, key))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("inner", ["og.sgd", "optax.sgd"])
def test_complex_gradients_are_clipped_whole_by_the_guard(inner):
  """A clipped complex gradient keeps its imaginary part: both paths equal
  optax's chain of clip_by_global_norm and sgd."""
  params = _complex_params()
  grads = [jax.tree.map(lambda p, i=i: _complex(p.shape, 20 + i, 3.0),
                        params) for i in range(3)]
  tx = og.guard((og.sgd if inner == "og.sgd" else optax.sgd)(0.1),
                max_norm=1.0, spike_sigma=None)
  _, state, ours = _run(tx, params, grads, standard=inner == "optax.sgd")
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
  _, _, want = _run(ref, params, grads, standard=True)
  for u, w in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
    assert np.abs(np.imag(w)).max() > 0.01
    np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-7)
  norm = np.sqrt(sum(np.sum(np.abs(np.asarray(g)) ** 2)
                     for g in jax.tree.leaves(grads[-1])))
  np.testing.assert_allclose(og.metrics(state)["grad/norm"], norm, rtol=1e-5)


def test_complex_adaptive_clipping_against_numpy():
  params = _complex_params()
  grads = jax.tree.map(lambda p: _complex(p.shape, 30, 2.0), params)
  tx = og.adaptive_grad_clip(0.1)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for name, axes in (("w", (0,)), ("b", (0,))):  # columns; a vector is one
    g = np.asarray(grads[name]).astype(np.complex128)
    p = np.asarray(params[name]).astype(np.complex128)
    gn = np.sqrt(np.sum(np.abs(g) ** 2, axis=axes, keepdims=True))
    pn = np.maximum(np.sqrt(np.sum(np.abs(p) ** 2, axis=axes,
                                   keepdims=True)), 1e-3)
    want = np.where(gn > 0.1 * pn, g * (0.1 * pn / gn), g)
    np.testing.assert_allclose(out[name], want, rtol=1e-5)
  norm = np.sqrt(sum(np.sum(np.abs(np.asarray(g)) ** 2)
                     for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(og.metrics(state)["grad/norm"], norm, rtol=1e-5)


def test_clip_by_value_refuses_complex_and_boolean_parameters_at_init():
  with pytest.raises(ValueError, match=re.escape(
      "clip_by_value clips real values, but the parameter 'b' is complex; "
      "clip complex gradients by their norm (og.clip_by_global_norm, "
      "og.clip_by_layer_norm), which keeps their phase.")):
    og.clip_by_value(1.0).init({"a": jnp.ones(2), "b": _complex((2,), 0)})
  with pytest.raises(ValueError, match=re.escape(
      "clip_by_value clips numbers, but the parameter 'flag' is boolean; "
      "leave it out with optax.masked (a boolean has no gradient to clip).")):
    og.clip_by_value(1.0).init({"a": jnp.ones(2), "flag": jnp.zeros(2, bool)})
  # Masked out, it is fine.
  tx = optax.masked(og.clip_by_value(1.0), {"a": True, "flag": False})
  params = {"a": jnp.ones(2), "flag": jnp.zeros(2, bool)}
  out, _ = tx.update({"a": jnp.full(2, 3.0), "flag": jnp.zeros(2, bool)},
                     tx.init(params))
  np.testing.assert_array_equal(out["a"], [1.0, 1.0])


@pytest.mark.standard_promotion
def test_python_float_parameters():
  params = {"a": 0.5, "b": 2.0}
  grads = {"a": 1.0, "b": -3.0}
  for build in (lambda m: m.adam(0.1), lambda m: m.adamw(0.1),
                lambda m: m.sgd(0.1, momentum=0.9)):
    ours, ref = build(og), build(optax)
    u1, _ = ours.update(grads, ours.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose([u1["a"], u1["b"]], [u2["a"], u2["b"]],
                               rtol=1e-6)
  # The guard measures them (|g| = sqrt(1 + 9), clipped to 1) and steps as
  # optax's clip + adam would.
  tx, ref = og.guard(og.adam(0.1)), optax.adam(0.1)
  u1, state = tx.update(grads, tx.init(params), params)
  clipped = {k: v / np.sqrt(10.0) for k, v in grads.items()}  # optax's clip
  u2, _ = ref.update(clipped, ref.init(params), params)       # takes no floats
  np.testing.assert_allclose([u1["a"], u1["b"]], [u2["a"], u2["b"]],
                             rtol=1e-6)
  np.testing.assert_allclose(og.metrics(state)["grad/norm"], np.sqrt(10.0),
                             rtol=1e-6)
  # Around an opaque optimizer (the generic path) too.
  tx = og.skip_spikes(optax.sgd(0.1))
  u1, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose([u1["a"], u1["b"]], [-0.1, 0.3], rtol=1e-6)
  # Every clip, outside `jit` as inside (|g| = sqrt(10); layer norms 1, 3).
  s = np.sqrt(10.0)
  for tx, want in ((og.clip_by_global_norm(1.0), [1 / s, -3 / s]),
                   (og.clip_by_layer_norm(1.0), [1.0, -1.0]),
                   (og.clip_by_value(2.0), [1.0, -2.0]),
                   (og.autoclip(), [1.0, -3.0]),            # first step
                   (og.zclip(), [1.0, -3.0]),               # warm-up
                   # AGC: a unit's limit is 0.5 * |p|: 0.25 and 1.
                   (og.adaptive_grad_clip(0.5), [0.25, -1.0])):
    for run in (tx.update, jax.jit(tx.update)):
      u, _ = run(grads, tx.init(params), params)
      np.testing.assert_allclose([u["a"], u["b"]], want, rtol=1e-6)


@pytest.mark.standard_promotion
def test_integer_leaf_moves_like_optax_under_sgd():
  params = {"i": jnp.array([5, -7, 100], jnp.int32)}
  ours, _ = og.sgd(0.1).update(params, og.sgd(0.1).init(params))
  ref, _ = optax.sgd(0.1).update(params, optax.sgd(0.1).init(params))
  assert ours["i"].dtype == ref["i"].dtype
  np.testing.assert_allclose(ours["i"], ref["i"])   # -0.1 * g, not 0
  np.testing.assert_allclose(ours["i"], [-0.5, 0.7, -10.0], rtol=1e-6)


@pytest.mark.standard_promotion  # optax's Adam as the second reference
def test_integer_leaf_moments_are_floats_against_numpy():
  """An integer parameter's momentum and Adam moments are float32 and
  follow the float arithmetic written out in numpy (integer moments would
  truncate it: optax's momentum to integers, its second moment to 0)."""
  params = {"i": jnp.array([5, -7, 100], jnp.int32)}
  g = np.asarray([3.0, -2.0, 1.0])
  trace, mu, nu = np.zeros(3), np.zeros(3), np.zeros(3)
  sgd, adam = og.sgd(0.1, momentum=0.9), og.adam(0.1)
  sgd_state, adam_state = sgd.init(params), adam.init(params)
  # And optax's Adam on the same numbers as float32 parameters.
  floats = {"i": params["i"].astype(jnp.float32)}
  ref, ref_state = optax.adam(0.1), optax.adam(0.1).init(floats)
  assert sgd_state.trace["i"].dtype == adam_state.mu["i"].dtype == jnp.float32
  assert adam_state.nu["i"].dtype == jnp.float32
  grads = {"i": jnp.asarray(g, jnp.int32)}
  for t in range(1, 4):
    u_sgd, sgd_state = sgd.update(grads, sgd_state)
    u_adam, adam_state = adam.update(grads, adam_state)
    trace = g + 0.9 * trace
    mu, nu = 0.9 * mu + 0.1 * g, 0.999 * nu + 0.001 * g ** 2
    want = -0.1 * (mu / (1 - 0.9 ** t)) / (np.sqrt(nu / (1 - 0.999 ** t))
                                           + 1e-8)
    u_ref, ref_state = ref.update({"i": jnp.asarray(g, jnp.float32)},
                                  ref_state)
    np.testing.assert_allclose(u_sgd["i"], -0.1 * trace, rtol=1e-6)
    # (float32's 1 - 0.999**t is good to ~1e-5)
    np.testing.assert_allclose(u_adam["i"], want, rtol=1e-4)
    np.testing.assert_allclose(u_adam["i"], u_ref["i"], rtol=1e-6)
    assert u_sgd["i"].dtype == u_adam["i"].dtype == jnp.float32
  np.testing.assert_allclose(sgd_state.trace["i"], trace, rtol=1e-6)


@pytest.mark.standard_promotion
def test_float16_adam_step_that_overflows_is_skipped_on_both_paths():
  """In float16 a finite, clipped gradient of 5e-3 has a second moment that
  underflows to 0 while the first moment does not: 5e-4 / 6e-8 overflows
  65504. The guard reads the update back and skips, whatever the path."""
  params = {"w": jnp.array([1.0, 1.0], jnp.float16)}
  grads = {"w": jnp.array([5e-3, 0.5], jnp.float16)}
  assert np.float16(0.001) * np.float16(5e-3) ** 2 == 0       # v underflows
  for inner in (og.adam(1e-3, eps=6e-8), optax.adam(1e-3, eps=6e-8)):
    tx = og.guard(inner, spike_sigma=None)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(u["w"], [0, 0])
    m = og.metrics(state)
    assert int(m["optim/num_skipped"]) == 1 and bool(m["optim/skipped"])
    tx = og.skip_nonfinite(inner)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(u["w"], [0, 0])
    assert int(og.metrics(state)["optim/num_skipped"]) == 1


@pytest.mark.standard_promotion
def test_float16_state_on_float32_params_is_read_back_on_both_paths():
  """A float16 first moment or trace of float32 parameters overflows
  65504 (0.1 * 1e6 = 1e5 is stored as Inf) where the gradients do not: the
  next step's update is Inf, and the guard-aware path reads it back and
  skips, as the generic path does."""
  params = {"w": jnp.ones(2, jnp.float32)}
  grads = {"w": jnp.array([1e6, 1.0], jnp.float32)}
  pairs = [(og.adam(1e-3, mu_dtype=jnp.float16),
            optax.adam(1e-3, mu_dtype=jnp.float16)),
           (og.sgd(1e-3, momentum=0.9, accumulator_dtype=jnp.float16),
            optax.sgd(1e-3, momentum=0.9, accumulator_dtype=jnp.float16))]
  for ours, theirs in pairs:
    for make in (lambda i: og.guard(i, max_norm=1e7, spike_sigma=None),
                 og.skip_nonfinite):
      runs = []
      for inner in (ours, theirs):
        tx, p = make(inner), params
        state, update, run = tx.init(p), jax.jit(tx.update), []
        for _ in range(3):
          u, state = update(grads, state, p)
          p = optax.apply_updates(p, u)
          run.append((np.asarray(u["w"]), int(og.metrics(state)[
              "optim/num_skipped"])))
        assert np.isfinite(np.asarray(p["w"])).all()
        runs.append(run)
      assert [n for _, n in runs[0]] == [0, 1, 2]   # steps 1 and 2 skipped
      for (u0, n0), (u1, n1) in zip(*runs):
        np.testing.assert_allclose(u0, u1, rtol=1e-6)
        assert n0 == n1


_X64_SCRIPT = r"""
import jax, numpy as np, jax.numpy as jnp, optax, optax_guard as og
assert jax.config.jax_enable_x64
txs = {
    "monitor": og.monitor(histogram=True, zscore=True),
    "clip_by_global_norm": og.clip_by_global_norm(1e9),
    "clip_by_layer_norm": og.clip_by_layer_norm(1e9),
    "clip_by_value": og.clip_by_value(1e9),
    "adaptive_grad_clip": og.adaptive_grad_clip(1e9),
    "autoclip": og.autoclip(window=4),
    "zclip": og.zclip(warmup_steps=2),
    "zero_nonfinite": og.zero_nonfinite(),
    "skip_nonfinite": og.skip_nonfinite(optax.sgd(0.1)),
    "skip_spikes": og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2),
    "add_decayed_weights": og.add_decayed_weights(0.1),
    "add_l2_penalty": og.add_l2_penalty(0.1),
    "add_l1_penalty": og.add_l1_penalty(0.1),
    "guard(og.adamw)": og.guard(og.adamw(0.1), histogram=True, zscore=True),
    "guard(optax.sgd)": og.guard(optax.sgd(0.1)),
    "adam": og.adam(0.1),
    "sgd": og.sgd(0.1, momentum=0.9),
}
never_clip = ("clip_by_global_norm", "clip_by_layer_norm", "clip_by_value",
              "adaptive_grad_clip", "zero_nonfinite")
for dtype in (jnp.float32, jnp.float64):
  params = {"w": jnp.ones(3, dtype), "b": jnp.full((2, 2), 0.5, dtype)}
  grads = {"w": jnp.array([1 / 3, 4.0, 0.0], dtype),
           "b": jnp.full((2, 2), 0.1, dtype)}
  for name, tx in txs.items():
    traces = []
    def update(g, s, p, tx=tx):
      traces.append(1)
      return tx.update(g, s, p, loss=jnp.asarray(1.0, dtype))
    step = jax.jit(update)
    state = init = tx.init(params)
    for _ in range(4):
      updates, state = step(grads, state, params)
    assert len(traces) == 1, (name, dtype, len(traces))
    assert jax.tree.structure(state) == jax.tree.structure(init), name
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(init)):
      assert a.dtype == b.dtype and a.shape == b.shape, (name, dtype, a.dtype,
                                                         b.dtype)
    assert updates["w"].dtype == dtype, (name, updates["w"].dtype)
    if name in never_clip:  # untouched, bit for bit: no float32 round trip
      assert np.asarray(updates["w"]).tobytes() == np.asarray(
          grads["w"]).tobytes(), (name, dtype, updates["w"])
    if "monitor" in name or "guard" in name:
      np.testing.assert_allclose(og.metrics(state)["grad/norm"],
                                 np.sqrt(1 / 9 + 16 + 0.04), rtol=1e-6)
  # Adam's first step in float64: -lr * g / (|g| + eps) after bias correction.
  u, _ = og.adam(0.1).update(grads, og.adam(0.1).init(params))
  g = np.asarray(grads["w"], np.float64)
  want = -0.1 * g / (np.abs(g) + 1e-8)
  tol = 1e-6 if dtype == jnp.float32 else 1e-14
  np.testing.assert_allclose(np.asarray(u["w"], np.float64), want, rtol=tol)
# Decay in float64: the rate is not rounded through float32 (optax's numbers).
w = {"w": jnp.array([1.0, 3.0], jnp.float64)}
u, _ = og.add_decayed_weights(0.1, mask=None).update(
    jax.tree.map(jnp.zeros_like, w), og.add_decayed_weights(0.1).init(w), w)
assert np.asarray(u["w"]).tolist() == [0.1 * 1.0, 0.1 * 3.0], u
# The finite-difference penalty is exact on a quadratic L = 0.5 t.A.t - b.t:
# its gradient is g + lam * A g / |g|, here to float64 rounding.
a = np.array([[2.0, 0.5], [0.5, 1.0]]); b = np.array([1.0, -2.0])
t = np.array([0.3, -0.7]); lam = 0.25
loss = lambda t: 0.5 * t @ jnp.asarray(a) @ t - jnp.asarray(b) @ t
_, got = og.gradient_norm_penalty(loss, lam, method="finite_difference",
                                  radius=1e-3)(jnp.asarray(t))
g = a @ t - b
np.testing.assert_allclose(np.asarray(got), g + lam * a @ g /
                           np.linalg.norm(g), rtol=1e-12)
# ... and so is the transformation form, whose norm is the same.
tx = og.add_gradient_norm_penalty(lam, radius=1e-3)
grad_fn = jax.grad(loss)
got, _ = tx.update(grad_fn(jnp.asarray(t)), tx.init(jnp.asarray(t)),
                   jnp.asarray(t), grad_fn=grad_fn)
np.testing.assert_allclose(np.asarray(got), g + lam * a @ g /
                           np.linalg.norm(g), rtol=1e-12)
# A float64 beyond float32's range is finite: no NaN/Inf is counted (its
# norm overflows float32's, which the guard says as such), and the
# histogram puts it in the top decade.
big = {"w": jnp.array([1e200, 1.0, 2.0])}
_, s = og.monitor(histogram=True).update(big, og.monitor(histogram=True).init(big))
m = og.metrics(s)
assert int(m["grad/nonfinite"]) == 0 and np.isinf(m["grad/norm"]), m
hist = dict(zip(og.HIST_BUCKETS, np.asarray(m["grad/hist/w"]).tolist()))
assert (hist["1e4"], hist["1e0"], hist["inf"], hist["nan"]) == (1, 2, 0, 0)
# One below float32's range is a non-zero element of the lowest decade.
tiny = {"w": jnp.array([1e-300, 1e-45, 0.0, 1.0])}
_, s = og.monitor(histogram=True).update(tiny, og.monitor(histogram=True).init(tiny))
hist = dict(zip(og.HIST_BUCKETS, np.asarray(og.metrics(s)["grad/hist/w"]).tolist()))
assert (hist["zero"], hist["1e-10"], hist["1e0"]) == (1, 2, 1), hist
tiny = {"w": jnp.array([1e-300j, 1e-45, 0.0, 1.0])}  # complex128
_, s = og.monitor(histogram=True).update(tiny, og.monitor(histogram=True).init(tiny))
hist = dict(zip(og.HIST_BUCKETS, np.asarray(og.metrics(s)["grad/hist/w"]).tolist()))
assert (hist["zero"], hist["1e-10"], hist["1e0"]) == (1, 2, 1), hist
u, s = og.zero_nonfinite().update(big, og.zero_nonfinite().init(big))
assert np.asarray(u["w"]).tolist() == [1e200, 1.0, 2.0]
assert int(og.metrics(s)["optim/num_zeroed_steps"]) == 0
_, s = og.skip_nonfinite(optax.sgd(0.1)).update(
    big, og.skip_nonfinite(optax.sgd(0.1)).init(big), big)
try:
  og.check(s)
  raise AssertionError("no error")
except og.NonFiniteGradientError as e:
  assert "finite gradients whose global norm overflows float32" in str(e), e
# Counts of float64 elements just above a threshold (by less than float32
# resolves) are taken in float64, on both statistics paths (the usual one
# and the one a NaN elsewhere in the leaf takes).
for tail in ([], [np.nan]):
  g = {"w": jnp.array([1.0 + 1e-12, 1.0, -1.0 - 1e-12, 0.5] + tail)}
  u, s = og.clip_by_value(1.0).update(g, og.clip_by_value(1.0).init(g))
  assert np.asarray(u["w"])[:4].tolist() == [1.0, 1.0, -1.0, 0.5], u
  want = 2 / len(g["w"])
  assert float(og.metrics(s)["grad/frac_clipped"]) == np.float32(want), s
  _, s = og.monitor().update(g, og.monitor().init(g))
  assert float(og.metrics(s)["grad/frac_above_1/w"]) == np.float32(want), s
# Under strict promotion too: the histories' positions are int32, as their
# counts (an int64 `arange` beside them was refused).
jax.config.update("jax_numpy_dtype_promotion", "strict")
p = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float64)}
for tx in (og.guard(og.adamw(0.1), zscore=True), og.zclip(), og.autoclip(),
           og.skip_spikes(og.sgd(0.1), window=4)):
  s = tx.init(p)
  for i in range(3):
    _, s = jax.jit(tx.update)(p, s, p, loss=jnp.float32(i))
jax.config.update("jax_numpy_dtype_promotion", "standard")
print("ok")
"""


def _start_x64_script(background):
  env = {**os.environ, "JAX_ENABLE_X64": "1",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  return background([sys.executable, "-c", _X64_SCRIPT], env=env)


@pytest.mark.start_early(launch=_start_x64_script)
def test_float64_in_64_bit_mode_keeps_dtypes_precision_and_one_trace(started):
  """With 64-bit mode on, Python floats are float64: every state keeps the
  dtypes of its init and traces once, and float64 gradients are not
  rounded through float32 on their way."""
  result = started.result()
  assert result.returncode == 0 and result.stdout.strip() == "ok", (
      result.stdout + result.stderr[-3000:])

"""Clipping family against numpy references and optax's own clip."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import optax_guard as og
from optax_guard import _stats


def _np_norm(tree):
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))


def _clip(max_norm, grads):
  tx = og.clip_by_global_norm(max_norm)
  return tx.update(grads, tx.init(grads))


def _random_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": {"kernel": (5, 7), "bias": (7,)},
            "Dense_1": {"kernel": (7, 3), "bias": (3,)}, "scalar": ()}
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32), shapes,
      is_leaf=lambda x: isinstance(x, tuple))


def _clip_both(grads, max_norm):
  """Ours and optax's clip, with `max_norm` an argument: one compile serves
  every example."""
  ours, theirs = og.clip_by_global_norm(max_norm), optax.clip_by_global_norm(
      max_norm)
  got, state = ours.update(grads, ours.init(grads))
  return got, state, theirs.update(grads, theirs.init(grads))[0]


_clip_both_jit = jax.jit(_clip_both)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.01, 100.0))
def test_global_norm_matches_optax(seed, scale, max_norm):
  grads = _random_tree(seed, scale)
  got, state, want = _clip_both_jit(grads, jnp.float32(max_norm))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-30)
  norm = _np_norm(grads)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-6)
  assert int(state.num_clipped) == int(norm > max_norm)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_large_norm(dtype):
  # 4096 elements of 200: the squares sum to 1.6e8, far beyond fp16's 65504.
  g = {"w": jnp.full((4096,), 200.0, dtype)}
  got, state = _clip(1.0, g)
  want_norm = 200.0 * 64.0
  np.testing.assert_allclose(state.grad_norm, want_norm, rtol=1e-6)
  assert got["w"].dtype == dtype
  np.testing.assert_allclose(np.asarray(got["w"], np.float32),
                             1.0 / 64.0, rtol=1e-2)
  # optax's norm overflows in fp16 and zeroes the update; ours does not.
  if dtype == jnp.float16:
    theirs, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert not np.any(np.asarray(theirs["w"], np.float32) == 1.0 / 64)


def test_bf16_beyond_float32_square():
  g = {"w": jnp.asarray([3e30, 4e30], jnp.bfloat16)}
  got, state = _clip(1.0, g)
  w = np.asarray(g["w"], np.float64)
  want = np.sqrt(np.sum(w ** 2))
  np.testing.assert_allclose(state.grad_norm, want, rtol=1e-6)
  # The factor 1/5e30 is applied as two square roots (beyond 2**100 times
  # max_norm): the result is g / |g|, to bf16 rounding.
  np.testing.assert_allclose(np.asarray(got["w"], np.float64), w / want,
                             rtol=2**-8)


def test_a_norm_far_beyond_max_norm_is_clipped_exactly():
  """Norm 5e37 against max_norm 1: the factor 2e-38 is below float32's
  normal range, so it is applied as two square roots, not flushed to 0."""
  g = {"a": jnp.asarray([3e37, -4e37], jnp.float32),
       "b": jnp.asarray([1.0, 2.0], jnp.float32)}
  got, state = _clip(1.0, g)
  np.testing.assert_allclose(state.grad_norm, 5e37, rtol=1e-6)
  np.testing.assert_allclose(got["a"], [0.6, -0.8], rtol=1e-6)
  np.testing.assert_allclose(got["b"], [2e-38, 4e-38], rtol=1e-5)
  np.testing.assert_allclose(state.clipped_norm, 1.0, rtol=1e-6)


def test_elements_above_1e19():
  g = {"a": jnp.asarray([3e19, -4e19], jnp.float32),
       "b": jnp.asarray([1.0, 2.0], jnp.float32)}
  got, state = _clip(2.0, g)
  assert np.isfinite(state.grad_norm)
  np.testing.assert_allclose(state.grad_norm, 5e19, rtol=1e-6)
  np.testing.assert_allclose(got["a"], [1.2, -1.6], rtol=1e-6)
  np.testing.assert_allclose(got["b"], [4e-20, 8e-20], rtol=1e-6)
  # optax overflows to Inf and returns zeros (and NaN) instead.
  theirs, _ = optax.clip_by_global_norm(2.0).update(g, optax.EmptyState())
  assert not np.allclose(theirs["a"], [1.2, -1.6])


def test_tiny_gradients_keep_their_norm():
  # Squares of 1e-25 underflow float32; the rescaled pass recovers the norm.
  g = {"w": jnp.full((100,), 1e-25, jnp.float32)}
  _, state = _clip(1.0, g)
  np.testing.assert_allclose(state.grad_norm, 1e-24, rtol=1e-5)


@pytest.mark.parametrize("value", [0.0, 1e-25, 1.0, 1e20])
def test_constant_like_gradients_under_jit(value):
  """A gradient that is a broadcast scalar (the gradient of `c * sum(w)`):
  XLA folds its reductions into `c**2 * size`, which must not combine the
  overflow-safe rescaling constants into a non-float32 (found by the
  adaptive-clipping tests: an all-zero step measured NaN)."""
  def norm(c):
    grads = {"w": jnp.ones((3, 4)) * c, "b": jnp.ones(12) * c}
    return og.clip_by_global_norm(1.0).update(
        grads, og.clip_by_global_norm(1.0).init(grads))[1].grad_norm

  np.testing.assert_allclose(jax.jit(norm)(jnp.float32(value)),
                             value * np.sqrt(24.0), rtol=1e-6)


@pytest.mark.parametrize("path", ["plain", "full pass", "with counts"])
def test_norm_of_a_large_leaf_is_accurate(path):
  """A 9.4M-element leaf: a single float32 accumulator drifted 0.7% (found
  by the benchmark); every path must stay at float32 rounding."""
  big = jax.random.normal(jax.random.key(0), (4096, 2304), jnp.float32)
  grads = {"big": big}
  if path == "full pass":  # a tiny leaf sends the step to the full pass
    grads["tiny"] = jnp.full((3,), 1e-30, jnp.float32)
  want = np.sqrt(np.sum(np.square(np.asarray(big, np.float64))))
  if path == "with counts":
    tx = og.monitor()
    state = jax.jit(tx.update)(grads, tx.init(grads))[1]
    got = state.layer_norms.values[0]
  else:
    tx = og.clip_by_global_norm(1.0)
    got = jax.jit(tx.update)(grads, tx.init(grads))[1].grad_norm
  np.testing.assert_allclose(float(got), want, rtol=2e-6)


def test_off_the_cpu_a_long_leaf_is_summed_in_one_reduction():
  """Rows of 4096 are for XLA:CPU's in-order accumulation (padded, in a
  leaf whose blocks per device are longer: 40,000 = 8 x 5,000); a GPU or
  TPU sums as a tree, in one reduction over the leaf. (The GPU program is
  lowered here, not compiled.)"""
  g = jax.ShapeDtypeStruct((256, 40000), jnp.bfloat16)
  f = jax.jit(lambda g: _stats.tree_stats({"w": g}, count_above=1.0))
  lowered = {p: f.trace(g).lower(lowering_platforms=(p,)).as_text()
             for p in ("cpu", "cuda")}
  assert "stablehlo.pad" in lowered["cpu"]
  assert "stablehlo.pad" not in lowered["cuda"]


@pytest.mark.parametrize("shape", [(6_000_000,), (2, 3_000_000)])
def test_norm_of_a_long_row_in_the_full_pass_is_accurate(shape):
  """bf16 gradients take the one variadic pass, which XLA:CPU accumulates
  in order: one float32 accumulator over a row of millions of terms came out
  0.25% low at 6M (2% at 20M); rows of a few thousand keep it exact."""
  g = jax.random.normal(jax.random.key(1), shape, jnp.float32) * 3.0
  grads = {"x": g.astype(jnp.bfloat16)}
  want = np.sqrt(np.sum(np.square(np.asarray(grads["x"], np.float64))))
  tx = og.monitor()
  m = og.metrics(jax.jit(tx.update)(grads, tx.init(grads))[1])
  np.testing.assert_allclose(float(m["grad/norm/x"]), want, rtol=1e-5)
  above = np.count_nonzero(np.abs(np.asarray(grads["x"], np.float32)) > 1.0)
  np.testing.assert_allclose(float(m["grad/frac_above_1/x"]),
                             above / g.size, rtol=1e-6)


def test_nonfinite_counts_are_exact_above_2_to_the_24():
  n = 2**24 + 8  # float32 counts stop at 2**24 (adding 1 rounds away)
  grads = {"x": jnp.full((n,), jnp.nan, jnp.bfloat16)}
  tx = og.monitor()
  m = og.metrics(jax.jit(tx.update)(grads, tx.init(grads))[1])
  assert int(m["grad/nonfinite/x"]) == n
  assert int(m["grad/nonfinite"]) == n


def test_zero_gradient_with_zero_max_norm():
  """A bound of 0 is refused by the factory, but may still arrive traced
  (set in `optax.inject_hyperparams`' state): a zero gradient stays 0."""
  g = {"w": jnp.zeros(3, jnp.float32)}
  tx = optax.inject_hyperparams(og.clip_by_global_norm)(max_norm=1.0)
  injected = tx.init(g)
  injected.hyperparams["max_norm"] = jnp.float32(0.0)
  got, injected = jax.jit(tx.update)(g, injected)
  state = injected.inner_state
  np.testing.assert_array_equal(got["w"], 0.0)
  assert int(state.num_clipped) == 0
  theirs, _ = optax.clip_by_global_norm(0.0).update(g, optax.EmptyState())
  assert np.all(np.isnan(theirs["w"]))  # optax's answer, for the record


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_element_passes_unscaled_and_is_recorded(bad):
  g = {"a": jnp.asarray([1.0, bad], jnp.float32),
       "b": jnp.asarray([30.0, 40.0], jnp.float32)}
  tx = og.clip_by_global_norm(1.0)
  got, state = tx.update(g, tx.init(g))
  # The finite leaf is not zeroed: nothing is scaled, so a downstream
  # skip_nonfinite sees the bad step as it is.
  np.testing.assert_array_equal(got["b"], g["b"])
  assert not np.isfinite(got["a"][1])
  assert bool(state.nonfinite)
  assert not np.isfinite(og.metrics(state)["grad/norm"])
  assert int(state.num_clipped) == 0 and float(state.clip_scale) == 1.0


def test_a_norm_beyond_float32_passes_unscaled_and_check_says_so():
  """Finite elements whose global norm is above float32's range (here
  3e38 * sqrt(2)) cannot be scaled to `max_norm` in float32: the clip passes
  them on, records the norm as Inf, and og.check names the overflow."""
  grads = {"w": jnp.array([3e38, 3e38], jnp.float32)}
  assert np.sqrt(2.0) * 3e38 > np.finfo(np.float32).max   # the premise
  tx = optax.chain(og.monitor(), og.clip_by_global_norm(1.0), optax.sgd(0.1))
  params = {"w": jnp.zeros(2)}
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(  # unscaled, times -lr
      u["w"], [np.float32(3e38) * np.float32(-0.1)] * 2)
  m = og.metrics(state)
  assert np.isinf(m["grad/norm"]) and float(m["grad/clip_scale"]) == 1.0
  assert int(m["grad/nonfinite"]) == 0
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "Step 0: finite gradients whose global norm overflows float32 (above "
      "~3.4e38; a clip cannot scale them and passes them on). Nothing in "
      "this chain skips such a step unless a `skip_nonfinite` or `guard` "
      "stands around the optimizer.")):
    og.check(state)


CLIPS_ALONE = {
    "clip_by_global_norm": lambda: og.clip_by_global_norm(1.0),
    "clip_by_layer_norm": lambda: og.clip_by_layer_norm(1.0),
    "adaptive_grad_clip": lambda: og.adaptive_grad_clip(0.1),
    "autoclip": lambda: og.autoclip(),
    "zclip": lambda: og.zclip(),
}


@pytest.mark.parametrize("name", sorted(CLIPS_ALONE))
def test_check_reads_a_clip_alone(name):
  """With no monitor or skipper in the chain, og.check reads the clip's own
  state: a NaN or Inf norm raises (the clip passed the gradients on), a
  finite one does not. Beside a skipper, the skipper reports instead."""
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = optax.chain(CLIPS_ALONE[name](), optax.sgd(0.1))
  step = jax.jit(tx.update)
  layer = name == "clip_by_layer_norm"
  nan_outcome = (
      "the update is NaN unless something after it skips the step "
      "(og.skip_nonfinite or og.guard around the optimizer, or "
      "optax.apply_if_finite).")
  # Finite elements whose norm overflows: optax.apply_if_finite lets them by.
  inf_outcome = (
      "the update is NaN/Inf, or huge where the elements were finite, unless "
      "something after it skips the step (og.skip_nonfinite or og.guard "
      "around the optimizer; optax.apply_if_finite skips only NaN/Inf "
      "elements).")
  for bad, norm_text, outcome in (
      (jnp.nan, "nan (NaN elements)", nan_outcome),
      (jnp.inf, "inf (Inf elements, or finite ones whose norm is beyond "
                "float32's range)", inf_outcome),
      (3e38, "inf (Inf elements, or finite ones whose norm is beyond "
             "float32's range)", inf_outcome)):
    grads = {"a": jnp.array([bad, bad]), "b": jnp.ones(3)}
    _, state = step(grads, tx.init(params), params)
    what = ("1 layer with a NaN/Inf norm (a)" if layer else
            f"a global norm of {norm_text}")
    with pytest.raises(og.NonFiniteGradientError, match=re.escape(
        f"The last step's gradients had {what}: og.{name} cannot scale "
        f"them and passed them on, so {outcome}")) as e:
      og.check(state)
    if bad == 3e38:  # what the message says of apply_if_finite
      guarded = optax.apply_if_finite(optax.chain(CLIPS_ALONE[name](),
                                                  optax.sgd(1.0)), 3)
      u, _ = guarded.update(grads, guarded.init(params), params)
      assert np.all(np.isfinite(u["a"])) and np.abs(u["a"][0]) > 1e38
    assert e.value.step == -1
    if layer:
      assert list(e.value.layers) == ["a"]
      assert not np.isfinite(e.value.layers["a"])
    else:
      assert e.value.layers == {}
  _, state = step({"a": jnp.full(2, 1e3), "b": jnp.ones(3)},
                  tx.init(params), params)
  og.check(state)  # a large but finite norm is the clip's job: quiet
  skipping = optax.chain(CLIPS_ALONE[name](),
                         og.skip_nonfinite(optax.sgd(0.1)))
  _, state = skipping.update({"a": jnp.array([jnp.nan, 1.0]),
                              "b": jnp.ones(3)}, skipping.init(params), params)
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"^Step 0: non-finite gradients; first bad "
                           r"layers: a \(1 NaN/Inf\)\. The guard skipped"):
    og.check(state)


@pytest.mark.standard_promotion  # optax.MultiSteps
def test_check_reads_a_clip_where_nothing_else_reports_the_step():
  """A monitor that did not measure the step (`every=10`), or an
  optax.MultiSteps without a skip function, says nothing of a NaN that a
  clip passed on: the clip's state is read then (with MultiSteps' hint)."""
  params = {"w": jnp.ones(3)}
  nan = {"w": jnp.array([jnp.nan, 1.0, 1.0])}
  tx = optax.chain(og.monitor(every=10), og.clip_by_global_norm(1.0),
                   optax.sgd(0.1))
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params)   # measured
  u, state = tx.update(nan, state, params)                   # not measured
  assert np.isnan(u["w"][0])
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"^The last step's gradients had a global norm "
                           r"of nan \(NaN elements\): og.clip_by_global_norm"):
    og.check(state)
  ms = optax.MultiSteps(optax.chain(og.clip_by_global_norm(1.0),
                                    optax.sgd(0.1)), every_k_schedule=2)
  state = ms.init(params)
  _, state = ms.update(nan, state, params)
  u, state = ms.update({"w": jnp.ones(3)}, state, params)  # completes
  assert np.isnan(u["w"][0])
  with pytest.raises(og.NonFiniteGradientError, match=(
      r"og.clip_by_global_norm cannot scale them and passed them on.* "
      r"give it should_skip_update_fn=og.skip_nonfinite_microbatch\(\) "
      r"\(with the guard's axis_name where the gradients are sharded\)\.$")):
    og.check(state)
  # A skipper in another multi_transform partition says nothing of this
  # one, and a guard reduced to its clip is a clip.
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  grads = {"a": jnp.ones(2), "b": jnp.array([jnp.nan, 1.0, 1.0])}
  for tx in (
      optax.multi_transform(
          {"A": og.skip_nonfinite(optax.sgd(0.1)),
           "B": optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1))},
          {"a": "A", "b": "B"}),
      og.guard(optax.sgd(0.1), skip_nonfinite=False, monitor=False,
               spike_sigma=None)):
    u, state = tx.update(grads, tx.init(params), params)
    assert np.isnan(u["b"][0])
    with pytest.raises(og.NonFiniteGradientError,
                       match=r"og.clip_by_global_norm cannot scale them"):
      og.check(state)


def test_layer_norm_against_numpy():
  grads = _random_tree(3, scale=2.0)
  max_norm = 3.0
  tx = og.clip_by_layer_norm(max_norm)
  got, state = tx.update(grads, tx.init(grads))
  clipped = 0
  m = og.metrics(state)
  for (path, g), out in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(got)):
    x = np.asarray(g, np.float64)
    n = np.sqrt(np.sum(x * x))
    want = x * min(1.0, max_norm / n)
    clipped += n > max_norm
    np.testing.assert_allclose(out, want, rtol=1e-6)
    name = "/".join(str(getattr(k, "key", "")) for k in path)
    np.testing.assert_allclose(m[f"grad/norm/{name}"], n, rtol=1e-6)
  assert int(state.layers_clipped) == clipped > 0
  assert int(state.num_clipped) == 1


def test_value_clip_against_numpy():
  grads = _random_tree(4, scale=2.0)
  tx = og.clip_by_value(1.5)
  got, state = tx.update(grads, tx.init(grads))
  total = above = 0
  for g, out in zip(jax.tree.leaves(grads), jax.tree.leaves(got)):
    x = np.asarray(g)
    np.testing.assert_array_equal(out, np.clip(x, -1.5, 1.5))
    total += x.size
    above += np.sum(np.abs(x) > 1.5)
  np.testing.assert_allclose(state.frac_clipped, above / total, rtol=1e-6)
  want, _ = optax.clip(1.5).update(grads, optax.EmptyState())
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_value_clip_counts_what_it_changes_in_each_dtype():
  """bf16 rounds 0.1 up to 0.10009765625: elements equal to that bound are
  not changed by the clip and must not be counted; in a mixed tree each
  leaf is compared in its own dtype."""
  grads = {"a": jnp.asarray([0.1, 0.1, -0.1, 0.05], jnp.bfloat16),
           "b": jnp.asarray([0.1, 0.2, -0.05], jnp.float32),
           "c": jnp.asarray([0.3, -0.1], jnp.bfloat16)}
  tx = og.clip_by_value(0.1)
  got, state = jax.jit(tx.update)(grads, tx.init(grads))
  changed = sum(int(np.sum(np.asarray(g, np.float32) !=
                           np.asarray(o, np.float32)))
                for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(got)))
  assert changed == 2  # b's 0.2 and c's 0.3
  np.testing.assert_allclose(state.frac_clipped, changed / 9, rtol=1e-6)
  assert int(state.num_clipped) == 1


@pytest.mark.parametrize("dtype, max_abs", [
    (jnp.float16, 1e5), (jnp.bfloat16, 1e39), (jnp.float32, 1e39)])
def test_value_clip_beyond_a_dtypes_range_still_makes_inf_finite(dtype,
                                                                max_abs):
  """A bound past the dtype's largest value was Inf there (as in optax),
  and ±Inf came through: it clips to the largest value instead, and counts
  what it changed."""
  top = float(jnp.finfo(dtype).max)
  x = jnp.asarray([np.inf, -np.inf, 2.0, -3.0, np.nan], dtype)
  tx = og.clip_by_value(max_abs)
  got, state = jax.jit(tx.update)({"w": x}, tx.init({"w": x}))
  np.testing.assert_array_equal(np.asarray(got["w"], np.float64),
                                [top, -top, 2.0, -3.0, np.nan])
  assert float(state.frac_clipped) == np.float32(2 / 5)


def test_value_clip_refuses_a_bound_that_rounds_to_zero_in_a_dtype():
  grads = {"w": jnp.ones(2, jnp.float16), "b": jnp.ones(2)}
  tx = og.clip_by_value(1e-8)  # a float32 number, 0 in float16
  with pytest.raises(ValueError, match=re.escape(
      "`max_abs` 1e-08 rounds to 0 in float16, the dtype of some updates, "
      "so every element of them would be zeroed; give a bound of at least "
      "5.96e-08 (that dtype's smallest number), or clip in float32.")):
    tx.update(grads, tx.init(grads))
  for bound in (np.float32(1e-8), jnp.float32(1e-8)):  # any concrete number
    with pytest.raises(ValueError, match="rounds to 0 in float16"):
      og.clip_by_value(bound).update(grads, tx.init(grads))
  got, _ = tx.update({"b": grads["b"]}, tx.init({"b": grads["b"]}))
  np.testing.assert_allclose(got["b"], np.float32(1e-8))


def test_an_infinite_step_through_the_value_clip_is_skipped_from_inside():
  """clip_by_value makes ±Inf ±max_abs, as optax.clip does; inside
  skip_nonfinite (as the docs place it) the raw Inf is seen and the step
  skipped, while ahead of it the step is applied."""
  g = {"w": jnp.asarray([jnp.inf, 0.5, -jnp.inf])}
  params = {"w": jnp.zeros(3)}
  inside = og.skip_nonfinite(optax.chain(og.clip_by_value(1.0),
                                         optax.sgd(0.1)))
  updates, state = inside.update(g, inside.init(params), params)
  np.testing.assert_array_equal(updates["w"], [0.0, 0.0, 0.0])
  assert og.metrics(state)["optim/skipped"] == 1
  ahead = optax.chain(og.clip_by_value(1.0), og.skip_nonfinite(optax.sgd(0.1)))
  updates, state = ahead.update(g, ahead.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.05, 0.1])
  assert og.metrics(state)["optim/skipped"] == 0


@pytest.mark.standard_promotion  # optax's clip of integers
def test_value_clip_of_integers_is_in_floats_as_optax():
  """An integer leaf is clipped as floats (0.5, not a bound rounded to 0)."""
  grads = {"i": jnp.asarray([3, -2, 0, 1], jnp.int32)}
  for max_abs, want in [(0.5, [0.5, -0.5, 0.0, 0.5]),
                        (1.5, [1.5, -1.5, 0.0, 1.0])]:
    tx = og.clip_by_value(max_abs)
    got, state = tx.update(grads, tx.init(grads))
    ref, _ = optax.clip(max_abs).update(grads, optax.EmptyState())
    np.testing.assert_array_equal(got["i"], want)
    np.testing.assert_array_equal(got["i"], ref["i"])
    assert got["i"].dtype == ref["i"].dtype == jnp.float32
    np.testing.assert_allclose(state.frac_clipped,
                               np.mean(np.abs([3, -2, 0, 1]) > max_abs))


@pytest.mark.parametrize("factory,arg", [
    (og.clip_by_global_norm, "max_norm"), (og.clip_by_layer_norm, "max_norm"),
    (og.clip_by_value, "max_abs")])
@pytest.mark.parametrize("value", [-1.0, "1.0", None, float("nan"), True])
def test_bad_threshold_is_a_sentence(factory, arg, value):
  with pytest.raises(ValueError, match=(
      rf"`{arg}` must be a finite real number > 0, but got .*\.$")):
    factory(value)


@pytest.mark.parametrize("factory,arg", [
    (og.clip_by_global_norm, "max_norm"), (og.clip_by_layer_norm, "max_norm"),
    (og.clip_by_value, "max_abs"),
    (lambda v: og.guard(og.sgd(0.1), max_norm=v), "max_norm")])
def test_a_bound_of_zero_is_refused(factory, arg):
  """A clip to 0 zeroes every update: training stands still with no error
  (other libraries' configs take 0 for "no clipping")."""
  how = ("`max_norm=None` clips nothing" if factory.__name__ == "<lambda>"
         else "to clip nothing, leave the clip out")
  with pytest.raises(ValueError, match=re.escape(
      f"`{arg}` must be a finite real number > 0, but got 0. A bound of 0 "
      f"would zero every update; {how}.")):
    factory(0)
  with pytest.raises(ValueError, match=re.escape(
      f"`{arg}` must be a finite real number > 0, but got 1e-40. It is 0 in "
      "float32, the dtype it is computed in (XLA flushes magnitudes below "
      f"1.18e-38 to 0). A bound of 0 would zero every update; {how}.")):
    factory(1e-40)
  factory(1e-37)  # a normal float32


@pytest.mark.parametrize("name,make", [
    ("clip_by_global_norm", lambda: og.clip_by_global_norm(1.0)),
    ("clip_by_layer_norm", lambda: og.clip_by_layer_norm(1.0)),
    ("adaptive_grad_clip", lambda: og.adaptive_grad_clip(0.01)),
    ("autoclip", lambda: og.autoclip(10.0)),
    ("zclip", lambda: og.zclip()),
    ("guard's clip (max_norm=1.0)", lambda: og.guard(og.sgd(0.1)))])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_parameters_are_refused_by_every_scaling_clip(name, make,
                                                               dtype):
  """A scaled integer gradient rounds (0.116 -> 0): refused at init."""
  params = {"w": jnp.ones(2), "i": jnp.ones((5, 7), dtype)}
  with pytest.raises(ValueError, match=re.escape(
      f"{name} scales the gradients, but the parameter 'i' is "
      f"{jnp.dtype(dtype)}: its scaled gradient would be rounded to an "
      "integer (to 0 below a scale of 1). Leave it out with optax.masked.")):
    make().init(params)


@pytest.mark.standard_promotion  # traces optax.sgd
@pytest.mark.parametrize("make,sign", [
    (lambda: og.clip_by_global_norm(1.0), 1.0),
    (lambda: og.clip_by_layer_norm(1.0), 1.0),
    (lambda: og.guard(og.sgd(1.0), spike_sigma=None), -1.0),
    (lambda: og.guard(optax.sgd(1.0), spike_sigma=None), -1.0),
], ids=["clip_by_global_norm", "clip_by_layer_norm", "guard fast path",
        "guard generic path"])
def test_integer_gradients_of_float_parameters_are_scaled_as_floats(make,
                                                                   sign):
  """Integer gradients (hand-built) of float parameters are clipped in
  floats: [1, 2] / sqrt(5), not a factor of 0.447 rounded to the integer
  0 while the metrics said the clip worked."""
  params = {"w": jnp.ones(2, jnp.float32)}
  tx = make()
  updates, _ = jax.jit(tx.update)({"w": jnp.asarray([1, 2], jnp.int32)},
                                  tx.init(params), params)
  np.testing.assert_allclose(updates["w"], sign * np.array([1.0, 2.0]) /
                             np.sqrt(5.0), rtol=1e-6)


def test_float0_gradients_are_a_sentence():
  """`jax.grad(..., allow_int=True)` gives an integer leaf a float0
  gradient, with no values: every transformation names it instead of
  failing inside (the value clip: "setting an array element with a
  sequence") or taking it as zeros (the optimizers, which then decayed the
  integer parameter alone). A decay's mask leaves it out, untouched (and a
  decay refuses an integer parameter it picks: see test_decay)."""
  params = {"w": jnp.ones(3), "idx": jnp.asarray([1, 2], jnp.int32)}
  grads = jax.grad(lambda q: jnp.sum(q["w"] ** 2), allow_int=True)(params)
  for tx in (og.monitor(), og.clip_by_value(1.0),
             og.adamw(0.1, weight_decay=0.0), og.adam(0.1), og.sgd(0.1)):
    with pytest.raises(ValueError, match=re.escape(
        "A gradient leaf has dtype float0, which is what "
        "jax.grad(..., allow_int=True) gives an integer parameter: it holds "
        "no values to measure or scale. Leave integer parameters out of the "
        "tree (or out of the transformation with optax.masked).")):
      tx.update(grads, tx.init(params), params)
  decay = og.add_decayed_weights(0.1, mask={"w": True, "idx": False})
  updates, _ = decay.update(grads, decay.init(params), params)
  assert updates["idx"].dtype == jax.dtypes.float0


def test_bad_axis_name():
  with pytest.raises(ValueError, match=r"`axis_name` must be None, a mesh "
                     r"axis name or a tuple of them, but got 3\."):
    og.clip_by_global_norm(1.0, axis_name=3)
  for make in (lambda a: og.clip_by_global_norm(1.0, axis_name=a),
               lambda a: og.guard(og.sgd(0.1), axis_name=a)):
    with pytest.raises(ValueError, match=re.escape(
        "`axis_name` names the mesh axis 'd' more than once (['d', 'm', "
        "'d']); name each axis once.")):
      make(["d", "m", "d"])


@pytest.mark.standard_promotion
def test_inside_jit_and_chain_with_momentum():
  """Momentum, not Adam: Adam's update does not change with a constant
  factor on every gradient, so it would hide a wrong clip factor."""
  grads = _random_tree(5, scale=10.0)
  params = jax.tree.map(jnp.zeros_like, grads)
  ours = optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9))
  theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9))
  s1, s2 = ours.init(params), theirs.init(params)
  step1, step2 = jax.jit(ours.update), jax.jit(theirs.update)
  for i in range(5):
    g = jax.tree.map(lambda x: x * (i + 1), grads)
    u1, s1 = step1(g, s1, params)
    u2, s2 = step2(g, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(og.metrics(s1)["optim/num_clipped"]) == 5


def test_numpy_float64_gradients_pass_eagerly_without_warnings():
  """NumPy float64 gradients (eager, x64 off) are taken as JAX takes them:
  float32, without a dtype warning per leaf."""
  grads = {"w": np.array([3.0, 4.0]), "b": np.array([1e-3])}
  params = {"w": np.ones(2, np.float32), "b": np.ones(1, np.float32)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for tx in (og.clip_by_global_norm(1.0), og.clip_by_value(0.5),
               og.add_decayed_weights(0.1, mask=None)):
      updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [3.1, 4.1], rtol=1e-6)


@pytest.mark.parametrize("make,scale", [
    (lambda: og.clip_by_global_norm(1.0), 1.0), (og.monitor, 1.0),
    (lambda: og.guard(og.adamw(1e-3), spike_sigma=None), 1.0),
    (og.zclip, 0.0)], ids=["clip", "monitor", "guard", "zclip zeros"])
def test_debug_nans_op_by_op_on_a_finite_step(make, scale):
  """`jax.disable_jit()` with `jax_debug_nans`, JAX's way to find where a
  NaN is made, checks every operation: a NaN constant built for the
  non-finite case (and not selected) raised on finite gradients, and so
  did zclip's reciprocal target at a z of 0 (0 / 0 with zero gradients)."""
  params = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([30.0, 40.0]) * scale,
           "b": jnp.array([0.0, 1e-3]) * scale}
  tx = make()
  state = tx.init(params)
  with jax.disable_jit(), jax.debug_nans(True):
    updates, _ = tx.update(grads, state, params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))

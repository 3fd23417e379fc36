"""Differentiating through the transformations (meta-learning a learning
rate, unrolled optimisation): derivatives equal optax's or a formula written
out, and match finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

pytestmark = pytest.mark.standard_promotion  # optax is the reference

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
GRADS = {"w": jnp.array([3.0, 4.0, 1.0]), "b": jnp.array([2.0])}  # norm 5.5


def _loss_after(tx, grads, steps=2):
  state, params = tx.init(PARAMS), PARAMS
  for _ in range(steps):
    updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
    params = optax.apply_updates(params, updates)
  return sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _layer_clip_reference(max_norm):
  """Each leaf scaled by min(1, max_norm / ||leaf||), written out."""
  def update(grads, state, params=None):
    del params
    return jax.tree.map(
        lambda g: g * jnp.minimum(1.0, max_norm / jnp.linalg.norm(g)),
        grads), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


CASES = {
    "clip_by_global_norm": (
        lambda lr: optax.chain(og.clip_by_global_norm(1.0), optax.sgd(lr)),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.sgd(lr))),
    "clip_by_layer_norm": (
        lambda lr: optax.chain(og.clip_by_layer_norm(1.0), optax.sgd(lr)),
        lambda lr: optax.chain(_layer_clip_reference(1.0), optax.sgd(lr))),
    "adaptive_grad_clip": (
        lambda lr: optax.chain(og.adaptive_grad_clip(0.1), optax.sgd(lr)),
        lambda lr: optax.chain(optax.adaptive_grad_clip(0.1), optax.sgd(lr))),
    "monitor": (  # an identity on the updates
        lambda lr: optax.chain(og.monitor(histogram=True), optax.sgd(lr)),
        lambda lr: optax.sgd(lr)),
    "guard(og.adam)": (
        lambda lr: og.guard(og.adam(lr), max_norm=1.0),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.adam(lr))),
    "guard(optax.sgd)": (
        lambda lr: og.guard(optax.sgd(lr, momentum=0.9), max_norm=1.0),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.sgd(lr, momentum=0.9))),
    "guard(og.sgd)": (
        lambda lr: og.guard(og.sgd(lr, momentum=0.9), max_norm=1.0),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.sgd(lr, momentum=0.9))),
    "add_l2_penalty": (
        lambda lr: optax.chain(og.add_l2_penalty(0.1, mask=None),
                               optax.sgd(lr)),
        lambda lr: optax.chain(optax.add_decayed_weights(0.1),
                               optax.sgd(lr))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_derivatives_equal_the_reference(name):
  ours, ref = CASES[name]
  d_lr = jax.jit(jax.grad(lambda lr: _loss_after(ours(lr), GRADS)))(0.1)
  want_lr = jax.grad(lambda lr: _loss_after(ref(lr), GRADS))(0.1)
  np.testing.assert_allclose(d_lr, want_lr, rtol=1e-4)
  h = 1e-3
  # The loss whose derivative `d_lr` is, compiled once and evaluated at both
  # points (run eagerly, each point dispatched and compiled its ops anew).
  loss_at = jax.jit(lambda lr: _loss_after(ours(lr), GRADS))
  fd = (loss_at(0.1 + h) - loss_at(0.1 - h)) / (2 * h)
  np.testing.assert_allclose(d_lr, fd, rtol=2e-3)
  d_g = jax.jit(jax.grad(lambda g: _loss_after(ours(0.1), g)))(GRADS)
  want_g = jax.grad(lambda g: _loss_after(ref(0.1), g))(GRADS)
  np.testing.assert_allclose(_flat(d_g), _flat(want_g), rtol=1e-4, atol=1e-6)


def _weighted_sum(tree):
  return sum(jnp.sum(x * jnp.arange(1.0, x.size + 1).reshape(x.shape))
             for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("grads", [
    {"a": jnp.array([3.0, 4.0]), "z": jnp.zeros(2)},         # a zero leaf
    {"a": jnp.array([1e-20, 3e-20]), "b": jnp.array([2.0])},  # tiny squares
    {"a": jnp.array([1e20, 1.0]), "b": jnp.array([0.5])},     # huge squares
], ids=["zero_leaf", "tiny", "huge"])
def test_norm_derivatives_stay_finite_where_optax_s_do(grads):
  """Where the statistics pass takes a rare path (a zero leaf, squares that
  underflow or overflow), its derivative is still the norm's."""
  def clipped(tx, g):
    return _weighted_sum(tx.update(g, tx.init(g))[0])

  ours = jax.jit(jax.grad(lambda g: clipped(og.clip_by_global_norm(1.0),
                                            g)))(grads)
  want = jax.grad(lambda g: clipped(optax.clip_by_global_norm(1.0),
                                    g))(grads)
  np.testing.assert_allclose(_flat(ours), _flat(want), rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda lr: og.guard(optax.sgd(lr), spike_sigma=None),
    lambda lr: og.guard(og.sgd(lr), spike_sigma=None),
    lambda lr: og.skip_nonfinite(optax.sgd(lr)),
    lambda lr: og.skip_spikes(optax.sgd(lr))],
    ids=["guard generic", "guard fast", "skip_nonfinite", "skip_spikes"])
def test_a_skipped_nan_step_leaves_the_unrolled_derivative_finite(make):
  """Three steps, the second with a NaN gradient (skipped): the final
  parameters are p0 - lr * (g0 + g2) (norms below the clip), so
  d/dlr sum(p**2) = -2 p . (g0 + g2), not NaN."""
  p0 = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = [jnp.array([0.3, -0.2, 0.1]), jnp.array([jnp.nan, 0.1, 0.2]),
           jnp.array([0.2, 0.1, -0.3])]

  def final_loss(lr):
    tx = make(lr)
    state, params = tx.init(p0), p0
    for g in grads:
      updates, state = tx.update({"w": g}, state, params)
      params = optax.apply_updates(params, updates)
    return jnp.sum(params["w"] ** 2)

  lr = 0.1
  kept = np.asarray(grads[0]) + np.asarray(grads[2])
  final = np.asarray(p0["w"]) - lr * kept
  np.testing.assert_allclose(float(jax.grad(final_loss)(lr)),
                             -2.0 * final @ kept, rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda lr: og.guard(optax.sgd(lr), max_norm=10.0, spike_sigma=None),
    lambda lr: og.guard(og.sgd(lr), max_norm=10.0, spike_sigma=None),
    lambda lr: optax.chain(og.clip_by_global_norm(10.0),
                           og.skip_nonfinite(optax.sgd(lr)))],
    ids=["guard generic", "guard fast", "clip then skip_nonfinite"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 3e38])
def test_a_skipped_step_behind_a_clip_leaves_the_derivative_finite(make, bad):
  """Gradients that depend on the parameters (L = |w|^2 / 2: g = w), the
  clip measuring them, and the second of three steps bad (NaN, Inf, or
  finite elements whose norm overflows float32) and skipped: two kept
  steps w <- (1 - lr) w, so L_final = (1 - lr)^4 |w0|^2 / 2 and
  d/dlr = -2 (1 - lr)^3 |w0|^2. The norm's derivative once met the bad
  elements as 0 * NaN."""
  w0 = jnp.array([1.0, -2.0, 3.0])

  def final_loss(lr):
    tx = make(lr)
    state, params = tx.init({"w": w0}), {"w": w0}
    for t in range(3):
      g = params["w"]
      if t == 1:
        g = g.at[0].set(bad).at[1].set(bad if bad == 3e38 else g[1])
      updates, state = tx.update({"w": g}, state, params)
      params = optax.apply_updates(params, updates)
    return 0.5 * jnp.sum(params["w"] ** 2)

  lr = 0.1
  norm2 = float(np.sum(np.asarray(w0) ** 2))
  np.testing.assert_allclose(float(final_loss(lr)),
                             0.5 * (1 - lr) ** 4 * norm2, rtol=1e-6)
  np.testing.assert_allclose(float(jax.grad(final_loss)(lr)),
                             -2 * (1 - lr) ** 3 * norm2, rtol=1e-5)


def test_derivatives_under_shard_map_with_axis_name():
  """A sharded leaf and a replicated one, clipped on their global norm:
  the derivative equals optax's on the whole tree."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = {"w": jax.sharding.PartitionSpec("d"),
          "b": jax.sharding.PartitionSpec()}
  grads = {"w": jnp.arange(1.0, 17.0), "b": jnp.array([3.0, -2.0])}
  weights = {"w": jnp.linspace(-1.0, 1.0, 16), "b": jnp.array([0.5, 2.0])}

  def ours(g):
    def inner(g, weights):
      tx = og.clip_by_global_norm(1.0, axis_name="d")
      u, _ = tx.update(g, tx.init(g))
      local = jnp.sum(u["w"] * weights["w"])
      return jax.lax.psum(local, "d") + jnp.sum(u["b"] * weights["b"])
    return jax.shard_map(inner, mesh=mesh, in_specs=(spec, spec),
                         out_specs=jax.sharding.PartitionSpec())(g, weights)

  def reference(g):
    u, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    return sum(jnp.sum(u[k] * weights[k]) for k in u)

  np.testing.assert_allclose(_flat(jax.jit(jax.grad(ours))(grads)),
                             _flat(jax.grad(reference)(grads)), rtol=1e-5,
                             atol=1e-7)


def _unrolled(tx, pull, steps=3):
  """The loss after `steps` steps on `0.5 |p - pull|^2`, whose gradients
  (`p - pull`) depend on the earlier steps, so on the learning rate."""
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(steps):
    grads = jax.tree.map(lambda p, c: p - c, params, pull)
    updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
    params = optax.apply_updates(params, updates)
  return sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["clip_by_global_norm", "clip_by_layer_norm",
                                  "adaptive_grad_clip", "guard(og.adam)",
                                  "guard(og.sgd)", "guard(optax.sgd)"])
def test_derivatives_under_pmap_with_axis_name(name):
  """Meta-learning the learning rate under `pmap`: each device pulls the
  parameters to its own point and the gradients are averaged (so the
  statistics' agreement over devices is on equal values); every device's
  derivative equals optax's with the mean pull. (`jax.grad` through the
  agreement's selects had no transpose.)"""
  with_axis = {
      "clip_by_global_norm": lambda lr: optax.chain(
          og.clip_by_global_norm(1.0, axis_name="d"), optax.sgd(lr)),
      "clip_by_layer_norm": lambda lr: optax.chain(
          og.clip_by_layer_norm(1.0, axis_name="d"), optax.sgd(lr)),
      "adaptive_grad_clip": lambda lr: optax.chain(
          og.adaptive_grad_clip(0.1, axis_name="d"), optax.sgd(lr)),
      "guard(og.adam)": lambda lr: og.guard(og.adam(lr), max_norm=1.0,
                                            axis_name="d"),
      "guard(og.sgd)": lambda lr: og.guard(og.sgd(lr, momentum=0.9),
                                           max_norm=1.0, axis_name="d"),
      "guard(optax.sgd)": lambda lr: og.guard(
          optax.sgd(lr, momentum=0.9), max_norm=1.0, axis_name="d"),
  }[name]
  devices = jax.device_count()
  rng = np.random.default_rng(0)
  pulls = jax.tree.map(
      lambda p: 3 * rng.normal(size=(devices, *p.shape)).astype(np.float32),
      PARAMS)

  def derivative(lr, pull):
    mean_pull = jax.lax.pmean(pull, "d")  # the data-parallel average
    return jax.grad(lambda lr: _unrolled(with_axis(lr), mean_pull))(lr)

  got = jax.pmap(derivative, axis_name="d", in_axes=(None, 0))(
      jnp.float32(0.1), pulls)
  mean = jax.tree.map(lambda c: jnp.asarray(c.mean(axis=0)), pulls)
  want = jax.grad(lambda lr: _unrolled(CASES[name][1](lr), mean))(0.1)
  np.testing.assert_allclose(np.asarray(got), np.full(devices, want),
                             rtol=2e-5)


def _agc_reference(clipping, eps):
  """AGC written out: a unit is a kernel's output column (a vector's whole
  self), and the norm's derivative at 0 is taken as 0 (its subgradient)."""
  def norm(v, axes):
    sumsq = jnp.sum(v * v, axis=axes, keepdims=True)
    ok = sumsq > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sumsq, 1.0)), 0.0)

  def update(grads, state, params):
    def one(g, p):
      axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else None
      limit = clipping * jnp.maximum(norm(p, axes), eps)
      g_norm = norm(g, axes)
      over = g_norm > limit
      return jnp.where(over, g * limit / jnp.where(over, g_norm, 1.0), g)
    return jax.tree.map(one, grads, params), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_agc_derivatives_through_zero_units_stay_finite():
  """A zero-initialised bias and a unit whose gradient is 0: sqrt's
  derivative at 0 made NaN of the whole derivative (optax's AGC too); it
  equals the AGC written out, and a finite difference."""
  params = {"kernel": jnp.array([[0.5, -1.0], [2.0, 0.3]]),
            "bias": jnp.zeros(2)}
  inputs = jnp.array([1.0, -0.5])
  loss = lambda p: jnp.sum((jnp.tanh(inputs @ p["kernel"] + p["bias"])
                            - 1.0) ** 2)

  def final_loss(tx, p):
    state = tx.init(p)
    for _ in range(2):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return loss(p)

  ours = optax.chain(og.adaptive_grad_clip(0.05), optax.sgd(0.1))
  reference = optax.chain(_agc_reference(0.05, 1e-3), optax.sgd(0.1))
  got = jax.grad(lambda p: final_loss(ours, p))(params)
  want = jax.grad(lambda p: final_loss(reference, p))(params)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5)
  h = 1e-3
  shift = lambda s: {**params, "bias": params["bias"].at[0].add(s)}
  difference = (final_loss(ours, shift(h)) - final_loss(ours, shift(-h))) / (
      2 * h)
  np.testing.assert_allclose(got["bias"][0], difference, rtol=1e-3)

  # With respect to the gradients, where a unit's gradient is 0.
  weights = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  kernel = {"kernel": jnp.ones((2, 2))}
  grads = {"kernel": jnp.array([[10.0, 0.0], [10.0, 0.0]])}
  through = lambda tx: jax.grad(lambda g: jnp.sum(
      tx.update(g, tx.init(kernel), kernel)[0]["kernel"] * weights))(grads)
  np.testing.assert_allclose(
      through(og.adaptive_grad_clip(0.05))["kernel"],
      through(_agc_reference(0.05, 1e-3))["kernel"], rtol=1e-5)

"""Gradient penalties (issue 5) against hand-derived gradients.

On a quadratic loss `L = 1/2 t'At - b't` the gradient is `g = At - b` and the
Hessian `A`, so `grad ||g||^2 = 2 A g` and `grad ||g|| = A g / ||g||` are
known in closed form; the finite-difference scheme is exact there (up to
rounding) and converges at O(r) on a non-quadratic loss.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og

STRENGTH = 0.3


def _quadratic(seed=0, n=5):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = (m @ m.T / n + np.eye(n)).astype(np.float32)
  b = rng.normal(size=n).astype(np.float32)
  theta = rng.normal(size=n).astype(np.float32)

  def loss_fn(params):
    t = params["t"]
    return 0.5 * t @ (a @ t) - b @ t

  g = a.astype(np.float64) @ theta - b
  return loss_fn, {"t": jnp.asarray(theta)}, a.astype(np.float64), g


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("method,rtol", [("exact", 1e-5),
                                         ("finite_difference", 2e-4)])
def test_quadratic_against_the_hessian(squared, method, rtol):
  loss_fn, params, a, g = _quadratic()
  fn = og.gradient_norm_penalty(loss_fn, STRENGTH, squared=squared,
                                method=method, radius=0.1)
  loss, grads = jax.jit(fn)(params)
  hg = a @ g
  want = g + (2 * STRENGTH * hg if squared else
              STRENGTH * hg / np.linalg.norm(g))
  np.testing.assert_allclose(grads["t"], want, rtol=rtol)
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_finite_difference_converges_to_the_exact_penalty(squared):
  """On a quartic loss the scheme's error shrinks linearly with `radius`."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=16), jnp.float32)

  def loss_fn(w):
    return jnp.mean((jnp.tanh(x @ w["a"]) @ w["b"] - y) ** 2) + 0.1 * jnp.sum(
        w["a"] ** 4)

  w = {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
  _, exact = og.gradient_norm_penalty(loss_fn, 1.0, squared=squared)(w)
  errors = []
  for radius in (0.1, 0.03, 0.01):
    _, fd = og.gradient_norm_penalty(
        loss_fn, 1.0, squared=squared, method="finite_difference",
        radius=radius)(w)
    errors.append(np.sqrt(sum(np.sum((np.asarray(u) - np.asarray(v)) ** 2)
                              for u, v in zip(jax.tree.leaves(fd),
                                              jax.tree.leaves(exact)))))
  assert errors[0] > errors[1] > errors[2]
  # O(r): a 10x smaller radius, a ~10x smaller error (not O(r^2), not O(1)).
  assert 4.0 < errors[0] / errors[2] < 25.0, errors


def test_exact_penalty_is_the_gradient_of_the_penalised_loss():
  """Independent check by autodiff of the written-out objective."""
  loss_fn, params, _, _ = _quadratic(2)

  def objective(p):
    g = jax.grad(loss_fn)(p)["t"]
    return loss_fn(p) + STRENGTH * jnp.linalg.norm(g)

  _, grads = og.gradient_norm_penalty(loss_fn, STRENGTH)(params)
  np.testing.assert_allclose(grads["t"], jax.grad(objective)(params)["t"],
                             rtol=1e-5)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_has_aux_and_extra_arguments(method):
  loss_fn, params, a, g = _quadratic(3)

  def with_aux(p, scale):
    return scale * loss_fn(p), {"doubled": 2.0 * loss_fn(p)}

  fn = og.gradient_norm_penalty(with_aux, STRENGTH, method=method,
                                has_aux=True, squared=True)
  (loss, aux), grads = fn(params, jnp.float32(1.0))
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-6)
  np.testing.assert_allclose(aux["doubled"], 2 * loss_fn(params), rtol=1e-6)
  np.testing.assert_allclose(grads["t"], g + 2 * STRENGTH * a @ g, rtol=2e-4)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("squared", [True, False])
def test_zero_gradient_gives_zero_penalty_gradient(method, squared):
  fn = og.gradient_norm_penalty(lambda w: jnp.sum(w ** 2), 1.0,
                                method=method, squared=squared)
  _, grads = fn(jnp.zeros(3))
  np.testing.assert_array_equal(grads, np.zeros(3))


def test_transformation_equals_the_function_and_composes_with_guard():
  loss_fn, params, a, g = _quadratic(4)
  grad_fn = jax.grad(loss_fn)
  _, want = og.gradient_norm_penalty(loss_fn, STRENGTH,
                                     method="finite_difference",
                                     radius=0.05)(params)
  tx = og.add_gradient_norm_penalty(STRENGTH, radius=0.05)
  out, state = tx.update(grad_fn(params), tx.init(params), params,
                         grad_fn=grad_fn)
  np.testing.assert_allclose(out["t"], want["t"], rtol=1e-6)
  np.testing.assert_allclose(og.metrics(state)["grad/norm_penalty"],
                             STRENGTH * np.linalg.norm(g), rtol=1e-5)
  # In a chain with a guard: the penalised gradient is what gets clipped.
  chain = optax.chain(og.add_gradient_norm_penalty(STRENGTH, radius=0.05),
                      og.guard(og.sgd(1.0), max_norm=0.5))

  @jax.jit
  def step(p, s):
    return chain.update(grad_fn(p), s, p, grad_fn=grad_fn, loss=loss_fn(p))

  updates, state = step(params, chain.init(params))
  norm = np.linalg.norm(want["t"])
  np.testing.assert_allclose(og.metrics(state)["grad/norm"], norm, rtol=1e-5)
  np.testing.assert_allclose(-updates["t"],
                             np.asarray(want["t"]) * min(1.0, 0.5 / norm),
                             rtol=1e-5)


def test_errors():
  tx = og.add_gradient_norm_penalty(0.1)
  params = {"t": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"`add_gradient_norm_penalty` needs "
                     r"the gradient function of the loss on the current "
                     r"batch: call `update\(grads, state, params, "
                     r"grad_fn=...\)` with `grad_fn\(params\) -> grads`; it "
                     r"got grad_fn=None\."):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match=r"`add_gradient_norm_penalty` needs "
                     r"the current parameters"):
    tx.update(params, tx.init(params), grad_fn=lambda p: p)
  with pytest.raises(ValueError, match=r"`method` must be one of 'exact', "
                     r"'finite_difference', but got 'fd'\."):
    og.gradient_norm_penalty(jnp.sum, 0.1, method="fd")
  with pytest.raises(ValueError, match=r"`radius` must be a finite real "
                     r"number > 0, but got 0\.0\."):
    og.gradient_norm_penalty(jnp.sum, 0.1, radius=0.0)
  with pytest.raises(ValueError, match=r"`strength` must be a finite real "
                     r"number >= 0, but got -1\."):
    og.add_gradient_norm_penalty(-1)
  with pytest.raises(ValueError, match=r"`target` must be a finite real "
                     r"number >= 0, but got -1\.0\."):
    og.input_gradient_penalty(jnp.sum, jnp.ones((2, 2)), target=-1.0)


# ==================================================== input-gradient penalties


def test_r1_and_wgan_gp_on_a_linear_critic():
  """D(x) = w.x + c: grad_x D = w for every example, so R1 = ||w||^2 and
  WGAN-GP = (||w|| - 1)^2, with gradients 2w and 2(||w|| - 1) w / ||w||."""
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=6), jnp.float32)
  x = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
  critic = lambda w: (lambda inputs: inputs @ w + 0.5)
  norm = np.linalg.norm(np.asarray(w, np.float64))
  r1 = lambda w: og.input_gradient_penalty(critic(w), x)
  gp = lambda w: og.input_gradient_penalty(critic(w), x, target=1.0)
  np.testing.assert_allclose(r1(w), norm ** 2, rtol=1e-6)
  np.testing.assert_allclose(gp(w), (norm - 1) ** 2, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(r1)(w), 2 * np.asarray(w), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(gp)(w),
                             2 * (norm - 1) * np.asarray(w) / norm, rtol=1e-5)


def test_input_gradient_penalty_per_example_on_a_quadratic_critic():
  """D(x) = 1/2 x'Qx per example: grad = Qx, different for each example."""
  rng = np.random.default_rng(6)
  q = rng.normal(size=(3, 3))
  q = (q + q.T).astype(np.float32)
  x = rng.normal(size=(9, 3)).astype(np.float32)
  critic = lambda inputs: 0.5 * jnp.einsum("bi,ij,bj->b", inputs, q, inputs)
  norms = np.linalg.norm(x.astype(np.float64) @ q, axis=1)
  np.testing.assert_allclose(og.input_gradient_penalty(critic, x, target=1.0),
                             np.mean((norms - 1) ** 2), rtol=1e-5)
  # Images [B, H, W, C] with a [B, 1] score work the same way.
  images = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
  score = lambda im: jnp.sum(im ** 2, axis=(1, 2, 3))[:, None]
  np.testing.assert_allclose(
      og.input_gradient_penalty(score, images),
      np.mean(np.sum((2 * images.astype(np.float64)) ** 2, axis=(1, 2, 3))),
      rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_input_gradient_penalty_is_not_finite_when_an_input_gradient_is_not(
    bad):
  """One example with a NaN/Inf input gradient makes the mean NaN/Inf (as
  NumPy's), not a finite value that hides it; a zero gradient stays 0."""
  x = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], np.float32)
  scale = jnp.asarray([1.0, bad, 1.0], jnp.float32)
  critic = lambda inputs: scale * jnp.sum(inputs ** 2, axis=1) / 2
  grads = np.asarray(x, np.float64) * np.array([1.0, bad, 1.0])[:, None]
  want = np.mean(np.linalg.norm(grads, axis=1) ** 2)
  got = og.input_gradient_penalty(critic, x)
  assert np.isnan(want) == np.isnan(got) and np.isinf(want) == np.isinf(got)
  assert not np.isfinite(got), got
  ok = og.input_gradient_penalty(lambda inputs: jnp.sum(inputs ** 2, axis=1)
                                 / 2, x)
  np.testing.assert_allclose(ok, np.mean(np.sum(x.astype(np.float64) ** 2,
                                                axis=1)), rtol=1e-6)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_keyword_arguments_reach_the_loss(method):
  loss_fn, params, a, g = _quadratic(3)
  fn = og.gradient_norm_penalty(
      lambda p, *, scale: scale * loss_fn(p), STRENGTH, method=method,
      squared=True)
  loss, grads = fn(params, scale=jnp.float32(1.0))   # as jax.value_and_grad
  np.testing.assert_allclose(loss, loss_fn(params), rtol=1e-6)
  np.testing.assert_allclose(grads["t"], g + 2 * STRENGTH * a @ g, rtol=2e-4)


def test_input_gradient_penalty_on_a_tree_of_inputs():
  """D(x, y) = w.x + v.y: each example's input gradient is (w, v), whose
  norm is sqrt(||w||^2 + ||v||^2)."""
  rng = np.random.default_rng(7)
  w, v = rng.normal(size=3).astype(np.float32), rng.normal(size=2).astype(
      np.float32)
  batch = {"image": rng.normal(size=(5, 3)).astype(np.float32),
           "label": np.eye(2, dtype=np.float32)[[0, 1, 1, 0, 1]]}
  critic = lambda b: b["image"] @ w + b["label"] @ v
  norm = np.sqrt(np.sum(w.astype(np.float64) ** 2) + np.sum(v ** 2.0))
  np.testing.assert_allclose(
      og.input_gradient_penalty(critic, batch, target=1.0), (norm - 1) ** 2,
      rtol=1e-5)


def test_input_gradient_penalty_refuses_what_it_cannot_average():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"`fn` must map a batch of 4 to one "
                     r"score per example, of shape \(4,\) or \(4, 1\), but it "
                     r"returned \(4, 2\)\."):
    og.input_gradient_penalty(lambda x: x[:, :2], x)
  with pytest.raises(ValueError, match=r"`inputs` holds an empty batch "
                     r"\(leading axis 0\): there is no example"):
    og.input_gradient_penalty(lambda x: x[:, 0], jnp.ones((0, 3)))
  with pytest.raises(ValueError, match=r"`inputs` must be a batch: an array, "
                     r"or a tree of arrays, whose leaves all have the same "
                     r"leading \(batch\) axis; got leading sizes \[3, 4\]"):
    og.input_gradient_penalty(lambda b: b["a"][:, 0],
                              {"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))})


@pytest.mark.parametrize("method", ["exact", "finite_difference",
                                    "transformation"])
def test_sharded_parameters_with_axis_name_get_the_whole_norm(method):
  """L = sum(d w^2) / 2 over a kernel sharded across 8 devices (psummed)
  plus a replicated bias's b^2 / 2: with `axis_name` every device's
  penalised gradient is g + lambda H g / ||g|| of the WHOLE gradient
  (closed form), as on one device; without it, each device's own norm.
  "transformation" is `add_gradient_norm_penalty` (finite differences)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("d",))
  rng = np.random.default_rng(11)
  d = rng.uniform(0.5, 2.0, size=16).astype(np.float32)  # H = diag(d, 1)
  w = rng.normal(size=16).astype(np.float32)
  b = rng.normal(size=3).astype(np.float32)
  lam = 0.3

  def loss(p, d_local):  # the bias's term is replicated: counted once
    return (jax.lax.psum(jnp.sum(d_local * p["w"] ** 2) / 2, "d")
            + jnp.sum(p["b"] ** 2) / 2)

  g = np.concatenate([d * w, b]).astype(np.float64)     # the whole gradient
  hg = np.concatenate([d * d * w, b]).astype(np.float64)
  want = g + lam * hg / np.linalg.norm(g)
  tol = 1e-5 if method == "exact" else 2e-3

  def sharded(axis_name):
    if method == "transformation":
      tx = og.add_gradient_norm_penalty(lam, radius=1e-3, axis_name=axis_name)
      def fn(params, d_local):
        grad_fn = lambda p: jax.grad(loss)(p, d_local)
        updates, _ = tx.update(grad_fn(params), tx.init(params), params,
                               grad_fn=grad_fn)
        return None, updates
    else:
      fn = og.gradient_norm_penalty(loss, lam, method=method, radius=1e-3,
                                    axis_name=axis_name)
    def run(w_shard, d_local, b):
      grads = fn({"w": w_shard, "b": b}, d_local)[1]
      return grads["w"], grads["b"][None]
    step = jax.jit(jax.shard_map(run, mesh=mesh,
                                 in_specs=(P("d"), P("d"), P()),
                                 out_specs=(P("d"), P("d"))))
    return step(jax.device_put(w, NamedSharding(mesh, P("d"))),
                jax.device_put(d, NamedSharding(mesh, P("d"))),
                jax.device_put(b, NamedSharding(mesh, P())))

  got_w, got_b = sharded("d")
  np.testing.assert_allclose(got_w, want[:16], rtol=tol)
  for row in np.asarray(got_b):           # the same on every device
    np.testing.assert_allclose(row, want[16:], rtol=tol)
  # Without axis_name the norm would be a shard's own: refused.
  name = ("add_gradient_norm_penalty" if method == "transformation" else
          "gradient_norm_penalty")
  with pytest.raises(ValueError, match=re.escape(
      f"`{name}` got gradients that vary along the mesh axes ['d']. If the "
      "parameters are sharded over them, pass axis_name=('d',), so that the "
      "norm is the whole gradient's; if each device is to penalise its own "
      "gradient (parameters made per-device), run the step under `pmap` or "
      "`shard_map(..., check_vma=False)`.")):
    sharded(None)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_data_parallel_shard_map_penalises_the_whole_batch_once(method,
                                                                 squared):
  """Replicated parameters, a batch sharded over 8 devices, each device's
  own (unsummed) loss: `jax.grad` returns the whole batch's gradient on
  every device, and both methods must add the penalty's gradient once
  (closed form on least squares: g = X'(Xw - y), H = X'X). The exact
  method once added it 8 times."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(5)
  x = rng.normal(size=(32, 4)).astype(np.float32)
  y = rng.normal(size=32).astype(np.float32)
  w = rng.normal(size=4).astype(np.float32)

  def loss(w, xb, yb):
    return jnp.sum((xb @ w - yb) ** 2) / 2

  x64, y64, w64 = (v.astype(np.float64) for v in (x, y, w))
  g = x64.T @ (x64 @ w64 - y64)
  hg = x64.T @ (x64 @ g)
  want = g + (2 * STRENGTH * hg if squared else
              STRENGTH * hg / np.linalg.norm(g))
  fn = og.gradient_norm_penalty(loss, STRENGTH, method=method,
                                squared=squared, radius=1e-2)
  step = jax.jit(jax.shard_map(
      lambda w, xb, yb: fn(w, xb, yb)[1][None], mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=P("data")))
  got = step(w, jax.device_put(x, NamedSharding(mesh, P("data"))),
             jax.device_put(y, NamedSharding(mesh, P("data"))))
  for row in np.asarray(got):            # every device, the whole batch's
    np.testing.assert_allclose(row, want, rtol=2e-4)


@pytest.mark.parametrize("form", ["function", "transformation"])
def test_axis_name_without_sharding_types_is_refused(form):
  """Under `pmap` nothing says which parameters are sharded: refused by
  both forms (the transformation once took the largest device's norm)."""
  loss = lambda w: jnp.sum(w ** 2) / 2
  if form == "function":
    who = "gradient_norm_penalty"
    fn = og.gradient_norm_penalty(loss, 0.1, axis_name="d")
    run = lambda w: fn(w)[1]
  else:
    who = "add_gradient_norm_penalty"
    tx = og.add_gradient_norm_penalty(0.1, axis_name="d")
    run = lambda w: tx.update(w, tx.init(w), w, grad_fn=jax.grad(loss))[0]
  with pytest.raises(ValueError, match=(
      f"^{who} got axis_name='d' where values carry no "
      r"sharding types \(`pmap`, or `shard_map` with check_vma=False\), so "
      r"it cannot tell sharded parameters from replicated ones: use "
      r"`shard_map` with its default check_vma=True, or, with replicated "
      r"parameters \(`pmap`\), leave axis_name=None\.")):
    jax.pmap(run, axis_name="d")(jnp.ones((8, 3)))


def test_python_float_parameters_work_eagerly():
  """A Python float leaf (optax takes them) is a float32 array in the
  penalty's arithmetic: the same result as the array leaf's."""
  loss = lambda p: 0.5 * p["a"] ** 2 * 3.0 + jnp.sum(p["w"] ** 2)
  grad_fn = jax.grad(loss)
  as_float = {"a": 2.0, "w": jnp.ones(2)}
  as_array = {"a": jnp.float32(2.0), "w": jnp.ones(2)}
  tx = og.add_gradient_norm_penalty(0.1, radius=1e-3)
  outs = [tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)
          for p in (as_float, as_array)]
  jax.tree.map(np.testing.assert_array_equal, outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1].grad_norm, outs[1][1].grad_norm)
  # g = (3a, 2w) = (6, 2, 2): the norm of the closed form.
  np.testing.assert_allclose(outs[0][1].grad_norm, np.sqrt(44.0), rtol=1e-6)


@pytest.mark.parametrize("form", ["exact", "finite_difference", "transformation"])
def test_a_norm_beyond_the_squares_range_is_penalised(form):
  """L = 1e20 |w|^2 / 2 at w = (3, 4): |g| = 5e20, whose square (2.5e41)
  overflows float32. The penalty's gradient is the closed form
  g + lam H g / |g| = 1e20 (w + lam w / |w|), not Inf/NaN."""
  w, lam = jnp.asarray([3.0, 4.0]), 0.1
  loss = lambda p: 0.5e20 * jnp.sum(p ** 2)
  want = 1e20 * (np.asarray([3.0, 4.0]) + lam * np.asarray([0.6, 0.8]))
  if form == "transformation":
    tx = og.add_gradient_norm_penalty(lam, radius=1e-3)
    got, state = tx.update(jax.grad(loss)(w), tx.init(w), w,
                           grad_fn=jax.grad(loss))
    np.testing.assert_allclose(state.grad_norm, 5e20, rtol=1e-6)
  else:
    _, got = og.gradient_norm_penalty(loss, lam, method=form,
                                      radius=1e-3)(w)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_clipping_guard_refuses_the_penalty_inside_it_and_takes_it_before():
  """The finite difference divides by the radius: inside `guard` it would
  get clipped gradients against an unclipped probe and blow the difference
  up by strength / radius. Before the guard it gets the raw gradients: on
  L = sum(w^2/2 + w^4/4), g = w + w^3, written out in numpy."""
  loss = lambda w: jnp.sum(w ** 2 / 2 + w ** 4 / 4)
  grad_fn = jax.grad(loss)
  w = jnp.asarray([1.0, 2.0])
  inside = og.guard(optax.chain(og.add_gradient_norm_penalty(0.1),
                                optax.sgd(1.0)))
  with pytest.raises(ValueError, match=(
      r"`guard` clips the gradients \(max_norm=1\.0\) before the optimizer "
      r"it wraps, which holds an `add_gradient_norm_penalty`: that penalty "
      r"must receive the raw gradients, so put it before the guard")):
    inside.init(w)
  og.guard(optax.chain(og.add_gradient_norm_penalty(0.1), optax.sgd(1.0)),
           max_norm=None).init(w)  # nothing clips before it: allowed
  tx = optax.chain(og.add_gradient_norm_penalty(0.1, radius=1e-3),
                   og.guard(optax.sgd(1.0), max_norm=1.0))
  updates, state = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
  wn = np.asarray([1.0, 2.0])
  g = wn + wn ** 3
  q = wn + 1e-3 * g / np.linalg.norm(g)
  penalised = g + 0.1 * ((q + q ** 3) - g) / 1e-3
  want = -penalised * min(1.0, 1.0 / np.linalg.norm(penalised))
  np.testing.assert_allclose(updates, want, rtol=1e-3)
  np.testing.assert_allclose(og.metrics(state)["grad/norm_penalty"],
                             0.1 * np.linalg.norm(g), rtol=1e-6)


@pytest.mark.parametrize("wrong", ["value_and_grad", "loss", "nested"])
def test_a_grad_fn_that_returns_something_else_is_named(wrong):
  loss = lambda p: jnp.sum(p["w"] ** 2)
  params = {"w": jnp.asarray([1.0, 2.0])}
  grad_fn = {"value_and_grad": jax.value_and_grad(loss), "loss": loss,
             "nested": lambda p: {"params": jax.grad(loss)(p)}}[wrong]
  tx = og.add_gradient_norm_penalty(0.1)
  with pytest.raises(ValueError, match=(
      r"`add_gradient_norm_penalty` needs `grad_fn\(params\)` to return the "
      r"gradients alone, a tree like the parameters .* but it returned .*: "
      r"pass `jax.grad\(loss_fn\)`, not `jax.value_and_grad\(loss_fn\)` or "
      r"the loss itself\.")):
    tx.update(jax.grad(loss)(params), tx.init(params), params,
              grad_fn=grad_fn)


def test_the_squared_penalty_is_recorded_where_the_square_alone_overflows():
  """|g| = 3e19: |g|^2 = 9e38 overflows float32, 0.1 |g|^2 = 9e37 does not."""
  w = jnp.asarray([3e19])
  tx = og.add_gradient_norm_penalty(0.1, squared=True)
  _, state = tx.update(w, tx.init(w), w, grad_fn=lambda p: p)
  np.testing.assert_allclose(og.metrics(state)["grad/norm_penalty"], 9e37,
                             rtol=1e-6)


@pytest.mark.standard_promotion  # traces optax.sgd
def test_penalty_ahead_of_multisteps_is_the_mean_of_micro_batch_penalties():
  """The arrangement the docs give: each micro-batch's gradient is penalised
  with its own `grad_fn` (closed form for H = I: g + s g / |g|), then
  averaged by MultiSteps."""
  w = jnp.array([1.0, -2.0])
  xs = [jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])]
  loss = lambda p, x: 0.5 * jnp.sum((p - x) ** 2)
  strength = 0.1
  tx = optax.chain(og.add_gradient_norm_penalty(strength, radius=1e-2),
                   optax.MultiSteps(optax.sgd(1.0), 2))
  state = tx.init(w)
  for x in xs:
    updates, state = tx.update(jax.grad(loss)(w, x), state, w,
                               grad_fn=lambda p, x=x: jax.grad(loss)(p, x))
  gs = [np.asarray(w - x, np.float64) for x in xs]
  want = -np.mean([g + strength * g / np.linalg.norm(g) for g in gs], axis=0)
  np.testing.assert_allclose(updates, want, rtol=1e-5)


def test_penalty_refuses_a_none_update_and_other_trees():
  """A None update (Equinox's frozen leaf) was a bare TypeError from inside
  the probe; optax.masked, which the generic message offers, is refused
  here (below), so the message says to pass zeros."""
  params = {"a": jnp.array([1.0, 2.0]), "frozen": jnp.array([3.0])}
  grad_fn = jax.grad(lambda p: jnp.sum(p["a"] ** 4) + jnp.sum(p["frozen"]))
  tx = og.add_gradient_norm_penalty(0.1)
  with pytest.raises(ValueError, match=re.escape(
      "`add_gradient_norm_penalty` got a None update (a frozen leaf, as "
      "Equinox's `filter_grad` gives); it steps every parameter along its "
      "update to evaluate `grad_fn`, so pass zeros for that leaf.")):
    tx.update({"a": jnp.ones(2), "frozen": None}, tx.init(params), params,
              grad_fn=grad_fn)
  with pytest.raises(ValueError, match=re.escape(
      "`add_gradient_norm_penalty` was called with 2 parameter layers but "
      "got updates with 1")):
    tx.update({"a": jnp.ones(2)}, tx.init(params), params, grad_fn=grad_fn)
  # None in both (an Equinox-style filtered tree): no leaf, as without it.
  filtered = {"a": params["a"], "frozen": None}
  fn = lambda p: {"a": grad_fn({**p, "frozen": params["frozen"]})["a"],
                  "frozen": None}
  got, _ = tx.update(fn(filtered), tx.init(filtered), filtered, grad_fn=fn)
  want, _ = tx.update({"a": fn(filtered)["a"]}, tx.init({"a": params["a"]}),
                      {"a": params["a"]}, grad_fn=lambda p: {"a": fn(
                          {**p, "frozen": None})["a"]})
  assert got["frozen"] is None
  np.testing.assert_array_equal(got["a"], want["a"])


@pytest.mark.standard_promotion  # traces optax.masked
def test_penalty_inside_masked_is_refused():
  """`grad_fn` cannot be evaluated on parameters with masked-out leaves (a
  TypeError about MaskedNode inside the user's loss, before)."""
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = optax.masked(og.add_gradient_norm_penalty(0.1), {"a": True, "b": False})
  loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)
  with pytest.raises(ValueError, match=re.escape(
      "`add_gradient_norm_penalty` evaluates `grad_fn` on the parameters it "
      "is given, but inside `optax.masked` (or a `multi_transform` part) some "
      "of them are masked out; put it outside, ahead of the mask")):
    tx.update(jax.grad(loss)(params), tx.init(params), params,
              grad_fn=jax.grad(loss))


def test_the_probe_has_the_parameters_dtype_and_sharding():
  """`grad_fn` is evaluated on parameters typed as the real ones: bf16
  parameters stay bf16 beside float32 gradients (they were promoted, and
  strict promotion refused them), and on Explicit mesh axes ZeRO-2's
  replicated parameters stay replicated beside sharded gradients (they took
  the gradients' sharding, and a loss slicing them failed)."""
  lam, radius = 0.1, 1e-2
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32)[:3] ** 4)
  seen = []

  def grad_fn(p):
    seen.append((p["w"].dtype, jax.typeof(p["w"]).sharding.spec))
    return jax.tree.map(lambda g: g.astype(jnp.float32), jax.grad(loss)(p))

  params = {"w": jnp.linspace(0.5, 2.0, 8).astype(jnp.bfloat16)}
  grads = grad_fn(params)
  tx = og.add_gradient_norm_penalty(lam, radius=radius)
  # Op by op, as the reference below: compiled, XLA rounds the bf16 probe
  # once per fusion, which the finite difference magnifies.
  with jax.disable_jit():
    got, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  assert [dtype for dtype, _ in seen] == [jnp.bfloat16] * 2
  g = np.asarray(grads["w"], np.float64)
  n = (g / np.linalg.norm(g)).astype(np.float32)
  probe = {"w": params["w"] + jnp.bfloat16(radius) * jnp.asarray(
      n).astype(jnp.bfloat16)}
  q = np.asarray(jax.grad(loss)(probe)["w"], np.float64)
  np.testing.assert_allclose(got["w"], g + lam * (q - g) / radius, rtol=1e-5)

  mesh = jax.make_mesh((len(jax.devices()),), ("d",), axis_types=(
      jax.sharding.AxisType.Explicit,))
  params = {"w": jnp.linspace(0.5, 2.0, 8)}
  want, _ = tx.update(grad_fn(params), tx.init(params), params,
                      grad_fn=grad_fn)
  seen.clear()
  with jax.set_mesh(mesh):
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    zero2 = lambda p: {"w": jax.sharding.reshard(grad_fn(p)["w"], P("d"))}
    got, _ = jax.jit(lambda p: tx.update(zero2(p), tx.init(p), p,
                                         grad_fn=zero2))(replicated)
  assert [spec for _, spec in seen] == [P(None)] * 2
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


def test_check_says_when_the_penalty_probe_made_the_nan():
  """Finite gradients, but the probe point leaves the loss's domain (sqrt
  of a negative): the guard skips NaN gradients it never saw the origin of;
  og.check says where they came from."""
  params = {"a": jnp.asarray([1e-5, 1.0]), "w": jnp.ones(3)}
  loss = lambda p: -jnp.sum(jnp.sqrt(p["a"])) + jnp.sum(p["w"] ** 2)
  grad_fn = jax.grad(loss)
  grads = grad_fn(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  tx = optax.chain(og.add_gradient_norm_penalty(0.1, radius=0.01),
                   og.guard(og.adamw(1e-3)))
  _, state = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                     for g in jax.tree.leaves(grads)))
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "The guard skipped the step (1 bad in a row, 1 skipped in total). The "
      "gradients were finite where og.add_gradient_norm_penalty received "
      f"them (norm {norm:.4g}): the gradients at its probe, `params + radius "
      "* g / |g|`, hold NaN/Inf (a point outside the loss's domain?); a "
      "smaller `radius` keeps the probe closer.")):
    og.check(state)
  # A NaN that came in with the gradients is not the probe's.
  bad = {"a": jnp.asarray([jnp.nan, 1.0]), "w": jnp.ones(3)}
  _, state = tx.update(bad, tx.init(params), params, grad_fn=grad_fn)
  with pytest.raises(og.NonFiniteGradientError) as error:
    og.check(state)
  assert "probe" not in str(error.value)


def _complex_quadratic(seed=11, n=4):
  """`L(z) = |Az - b|^2` over complex `z`, in closed form: its gradient as a
  real vector is `u = 2 A^H (Az - b)` (JAX's `grad` returns `conj(u)`), and
  that of `||u||` is `M u / ||u||`, `M = 2 A^H A`."""
  rng = np.random.default_rng(seed)
  cplx = lambda *shape: rng.normal(size=shape) + 1j * rng.normal(size=shape)
  a, b, z = cplx(n, n), cplx(n), cplx(n)
  a32, b32 = a.astype(np.complex64), b.astype(np.complex64)
  loss_fn = lambda p: jnp.sum(jnp.abs(a32 @ p["z"] - b32) ** 2)
  u = 2 * a.conj().T @ (a @ z - b)
  return loss_fn, {"z": jnp.asarray(z, jnp.complex64)}, 2 * a.conj().T @ a, u


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("form", ["exact", "finite_difference",
                                  "transformation"])
def test_complex_parameters_against_the_closed_form(form, squared):
  """The finite-difference probe steps along `conj(g) / ||g||` and keeps the
  imaginary part: it once dropped it, and stepped the wrong way."""
  loss_fn, params, m, u = _complex_quadratic()
  norm = np.linalg.norm(u)
  want = np.conj(u + (2 * STRENGTH * m @ u if squared else
                      STRENGTH * m @ u / norm))
  if form == "transformation":
    tx = og.add_gradient_norm_penalty(STRENGTH, squared=squared, radius=0.05)
    grad_fn = jax.grad(loss_fn)
    grads, state = jax.jit(functools.partial(tx.update, grad_fn=grad_fn))(
        grad_fn(params), tx.init(params), params)
    np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-5)
  else:
    fn = og.gradient_norm_penalty(loss_fn, STRENGTH, squared=squared,
                                  method=form, radius=0.05)
    _, grads = jax.jit(fn)(params)
  assert grads["z"].dtype == jnp.complex64
  np.testing.assert_allclose(grads["z"], want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


def test_input_gradient_penalty_takes_the_modulus_of_complex_inputs():
  """D(x) = Re(x . conj(w)): its input gradient is `w` (up to JAX's
  conjugate), of squared norm `sum |w|^2`, imaginary parts included."""
  rng = np.random.default_rng(12)
  w = rng.normal(size=5) + 1j * rng.normal(size=5)
  x = (rng.normal(size=(3, 5)) + 1j * rng.normal(size=(3, 5))
       ).astype(np.complex64)
  critic = lambda inputs: jnp.real(inputs @ jnp.conj(w.astype(np.complex64)))
  np.testing.assert_allclose(og.input_gradient_penalty(critic, x),
                             np.sum(np.abs(w) ** 2), rtol=1e-5)


def test_an_integer_or_float0_gradient_leaf_beside_the_weights():
  """An integer leaf (a step count kept in the parameters) is penalised as
  a float is (its gradient here is 0); a float0 one (`jax.grad(...,
  allow_int=True)`) is refused with the sentence that says what it is."""
  params = {"w": jnp.array([1.0, 2.0]), "n": jnp.array([3, 4])}
  int_grad_fn = lambda p: {"w": 2 * p["w"], "n": jnp.zeros(2, jnp.int32)}
  tx = og.add_gradient_norm_penalty(0.1)
  updates, state = tx.update(int_grad_fn(params), tx.init(params), params,
                             grad_fn=int_grad_fn)
  g = np.array([2.0, 4.0])
  np.testing.assert_allclose(state.grad_norm, np.linalg.norm(g), rtol=1e-6)
  # L = |w|^2: H = 2I, so the penalty's gradient is 0.1 * 2g / |g|.
  np.testing.assert_allclose(updates["w"], g + 0.2 * g / np.linalg.norm(g),
                             rtol=1e-4)
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)
  with pytest.raises(ValueError, match="A gradient leaf has dtype float0"):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)

"""`diagnose` against closed-form gradients and numpy fits."""

import re

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import optax_guard as og

# Used in this order by `_weighted_loss`, on purpose not alphabetical.
_ORDER = ("z_embed", "m_block", "a_block", "k_head")


def _params():
  return {"z_embed": jnp.ones((3, 4)), "m_block": jnp.ones((4, 4)),
          "a_block": jnp.ones((4, 4)), "m_bias": jnp.ones((4,)),
          "k_head": jnp.ones((4, 2))}


def _weighted_loss(scales):
  """loss = sum_i s_i * sum(W_i) over `_ORDER`, then 5 * sum(bias): the
  gradient of W_i is s_i everywhere, so its norm is s_i * sqrt(size)."""

  def loss_fn(params, x):
    total = x
    for name, s in zip(_ORDER, scales):
      total = total + s * jnp.sum(params[name])
    return total + 5.0 * jnp.sum(params["m_bias"])

  return loss_fn


def _sin_layers(names, width, seed):
  """Square layers `x -> sin(x @ W)` used in the order of `names` (random
  weights of scale 0.5, which make the gradients grow toward the input):
  (params, loss_fn)."""
  keys = jax.random.split(jax.random.key(seed), len(names))
  params = {n: 0.5 * jax.random.normal(k, (width, width))
            for n, k in zip(names, keys)}

  def loss_fn(p, x):
    for n in names:
      x = jnp.sin(x @ p[n])
    return jnp.mean(x ** 2)

  return params, loss_fn


def _np_growth(norms):
  slope = np.polyfit(np.arange(len(norms)), np.log(norms), 1)[0]
  return np.exp(-slope), np.exp(-slope * (len(norms) - 1))


@pytest.mark.parametrize("scales, verdict", [
    ((1000.0, 100.0, 10.0, 1.0), "exploding"),
    ((1.0, 10.0, 100.0, 1000.0), "vanishing"),
    ((1.0, 2.0, 1.0, 3.0), "healthy"),
])
def test_norms_order_growth_and_verdict_against_closed_form(scales, verdict):
  params = _params()
  d = og.diagnose(_weighted_loss(scales), params, jnp.float32(0.5))
  # The bias is used last (after the head) and is not a matrix.
  assert d.layers == _ORDER + ("m_bias",)
  sizes = np.array([params[n].size for n in d.layers], np.float64)
  want = np.array(list(scales) + [5.0]) * np.sqrt(sizes)
  np.testing.assert_allclose(d.grad_norms, want, rtol=1e-6)
  np.testing.assert_allclose(d.param_norms, np.sqrt(sizes), rtol=1e-6)
  np.testing.assert_array_equal(d.nonfinite, np.zeros(5))
  growth, total = _np_growth(want[:4])        # the matrices only
  np.testing.assert_allclose(d.growth, growth, rtol=1e-6)
  assert d.verdict == verdict
  assert d.loss == pytest.approx(0.5 + sum(
      s * params[n].size for n, s in zip(_ORDER, scales)) + 5.0 * 4)
  if verdict == "exploding":
    assert d.advice.startswith(f"Gradient norms grow {growth:.3g}x per "
                               f"layer toward the input ({total:.3g}x")
  if verdict == "vanishing":
    assert d.advice.startswith(f"Gradient norms shrink {1 / growth:.3g}x")
  text = str(d)
  assert text.splitlines()[0].startswith(f"loss {d.loss:.6g}; verdict: "
                                         f"{verdict}")
  assert text.splitlines()[2].split()[:2] == ["0", "z_embed"]


def test_ratio_sets_the_threshold():
  loss_fn = _weighted_loss((100.0, 30.0, 10.0, 3.0))   # ~33x over depth
  params = _params()
  assert og.diagnose(loss_fn, params, 0.0).verdict == "healthy"
  assert og.diagnose(loss_fn, params, 0.0, ratio=10.0).verdict == "exploding"


def test_non_finite_names_the_layer():
  def loss_fn(params, x):
    return jnp.sum(jnp.log(params["a"]) * x) + jnp.sum(params["b"] ** 2)

  params = {"a": jnp.array([[1.0, 0.0], [2.0, 3.0]]), "b": jnp.ones((2, 2))}
  d = og.diagnose(loss_fn, params, jnp.ones((2, 2)))
  assert d.verdict == "non-finite"
  np.testing.assert_array_equal(d.nonfinite, [1, 0])
  assert d.advice.startswith("The loss or the gradients hold NaN/Inf in a.")


def test_a_nan_parameter_is_named_before_the_gradients_it_poisons():
  """A NaN in the last layer's bias makes every gradient NaN; the advice
  names that parameter, not the first layers whose gradients went bad."""
  def loss_fn(params, x):
    h = jnp.tanh(x @ params["Dense_0"]["kernel"])
    return jnp.sum((h @ params["Dense_1"]["kernel"]
                    + params["Dense_1"]["bias"]) ** 2)

  params = {"Dense_0": {"kernel": jnp.ones((2, 2))},
            "Dense_1": {"kernel": jnp.ones((2, 2)),
                        "bias": jnp.array([0.0, jnp.nan])}}
  d = og.diagnose(loss_fn, params, jnp.ones((1, 2)))
  assert d.verdict == "non-finite"
  assert d.layers == ("Dense_0/kernel", "Dense_1/kernel", "Dense_1/bias")
  assert np.all(d.nonfinite > 0)               # every gradient holds NaN
  assert np.isnan(d.param_norms[-1])
  assert d.advice.startswith(
      "The parameters themselves hold NaN/Inf in Dense_1/bias, and every "
      "gradient that flows through them is NaN/Inf: restore the parameters")


def test_depth_order_follows_nested_jit_remat_and_scan():
  block = jax.jit(lambda w, x: jnp.tanh(x @ w))

  def loss_fn(params, x):
    x = jax.checkpoint(lambda w, x: x @ w)(params["w_first"], x)
    x = block(params["c_second"], x)

    def body(h, w):
      return jnp.tanh(h @ w), None

    x, _ = lax.scan(body, x, params["b_stacked_third"])
    return jnp.sum(x @ params["a_last"])

  params = {"a_last": jnp.ones((4, 1)), "b_stacked_third": jnp.ones((3, 4, 4)),
            "c_second": jnp.ones((4, 4)), "w_first": jnp.ones((4, 4)),
            "unused": jnp.ones((2,))}
  d = og.diagnose(loss_fn, params, 0.1 * jnp.ones((2, 4)))
  assert d.layers == ("w_first", "c_second", "b_stacked_third", "a_last",
                      "unused")
  grads = jax.grad(loss_fn)(params, 0.1 * jnp.ones((2, 4)))
  np.testing.assert_allclose(
      d.grad_norms, [np.linalg.norm(np.asarray(grads[n]).ravel())
                     for n in d.layers], rtol=1e-5)


def test_flax_model_in_layer_order():
  nn = pytest.importorskip("flax.linen")

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(12):            # Dense_10 sorts before Dense_2 by name
        x = jnp.sin(nn.Dense(16)(x))
      return x

  model = Mlp()
  x = jnp.ones((4, 16))
  params = model.init(jax.random.key(0), x)
  loss_fn = lambda p, x: jnp.mean(model.apply(p, x) ** 2)
  d = og.diagnose(loss_fn, params, x)
  assert d.layers == tuple(f"Dense_{i}/{k}" for i in range(12)
                           for k in ("kernel", "bias"))


def test_errors_are_sentences():
  loss_fn = _weighted_loss((1.0, 1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match=r"`ratio` must be a finite real "
                     r"number > 1, but got 1.0\."):
    og.diagnose(loss_fn, _params(), 0.0, ratio=1.0)
  with pytest.raises(ValueError, match="must return a scalar loss, but "
                     r"returned shape \(2,\)"):
    og.diagnose(lambda p: p["w"] * 2.0, {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="`params` holds no arrays"):
    og.diagnose(lambda p: 0.0, {})
  with pytest.raises(ValueError, match=r"^`loss_fn` must return a scalar "
                     r"loss, but it returned a tuple of 2; pass has_aux=True "
                     r"if it returns \(loss, aux\)\.$"):
    og.diagnose(lambda p: (jnp.sum(p["w"]), {}), {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"^With has_aux=True, `loss_fn` must "
                     r"return a pair \(loss, aux\)"):
    og.diagnose(lambda p: jnp.sum(p["w"]), {"w": jnp.ones(2)}, has_aux=True)
  with pytest.raises(ValueError, match=r"^`loss_fn` must return a scalar "
                     r"loss, but it returned a tuple of 2\.$"):
    og.diagnose(lambda p: ((jnp.sum(p["w"]), 1.0), {}), {"w": jnp.ones(2)},
                has_aux=True)


def test_an_aux_output_does_not_change_the_depth_order():
  """An aux computed from every parameter before the forward pass (a
  parameter norm) is no use of them: the order is the model's."""
  names = ["e", "d", "c", "b", "a"]  # depth order, the reverse of the tree's
  params, loss_fn = _sin_layers(names, 32, seed=1)

  def with_aux(p, x):
    norm = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))  # a, b, c, ...
    return loss_fn(p, x), {"param_norm": norm}

  def with_dead_code(p, x):
    unused = [jnp.tanh(w).sum() for w in jax.tree.leaves(p)]  # a, b, c, ...
    del unused
    return loss_fn(p, x)

  x = jnp.ones((4, 32))
  plain = og.diagnose(loss_fn, params, x)
  assert plain.layers == tuple(names)
  # Unjitted, and jitted: inside the `jit` call the aux (or dead code) is
  # still no use of the parameters.
  for other, has_aux in [(with_aux, True), (jax.jit(with_aux), True),
                         (jax.jit(with_dead_code), False)]:
    got = og.diagnose(other, params, x, has_aux=has_aux)
    assert got.layers == plain.layers and got.verdict == plain.verdict
    np.testing.assert_allclose(got.grad_norms, plain.grad_norms, rtol=1e-6)


def test_a_loop_body_counts_whole_its_carry_feeds_the_next_trip():
  """An RNN: the input and recurrent weights feed only the carry, which the
  next trip's output reads. They are used (first, in the body's order),
  not dead code of the body's last trip."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {n: jax.random.normal(k, (8, 8)) / 3
            for n, k in zip(("a_out", "b_in", "c_rec"), keys)}
  xs = jax.random.normal(keys[3], (5, 2, 8))

  def loss_fn(p, xs):
    def body(carry, x):
      new = jnp.tanh(x @ p["b_in"] + carry @ p["c_rec"])
      return new, carry @ p["a_out"]   # the output reads the last carry
    _, ys = lax.scan(body, jnp.ones((2, 8)), xs)
    return jnp.mean(ys ** 2)

  assert og.diagnose(loss_fn, params, xs).layers == ("b_in", "c_rec", "a_out")


def test_an_empty_leaf_is_no_dead_layer_and_no_point_of_the_fit():
  """A zero-sized parameter (an unused head of width 0) has a zero gradient
  norm that says nothing: the verdict and fits are those of the model
  without it. Only empty parameters: nothing to diagnose."""
  params, layers = _sin_layers(["a", "b", "c", "d", "e", "f"], 64, seed=0)
  # The empty leaf is used first: before a layer with a gradient, a zero
  # norm would read as a dead layer.
  loss_fn = lambda p, x: layers(p, x + jnp.sum(p.get("empty", 0.0)))

  x = jnp.ones((8, 64))
  plain = og.diagnose(loss_fn, params, x)
  with_empty = og.diagnose(loss_fn, {**params, "empty": jnp.zeros((0, 3))}, x)
  assert with_empty.layers[0] == "empty"
  assert with_empty.verdict == plain.verdict == "exploding"
  assert with_empty.growth == plain.growth
  assert "dead" not in with_empty.advice
  with pytest.raises(ValueError, match=re.escape(
      "diagnose needs parameters to differentiate, but `params` holds no "
      "arrays, or only empty ones.")):
    og.diagnose(lambda p: jnp.sum(p["e"]), {"e": jnp.zeros((0, 3))})


def test_has_aux_ignores_the_aux_output():
  params = {"a": jnp.full((2, 2), 2.0), "b": jnp.ones((2, 2))}
  loss_fn = lambda p, x: jnp.sum(x @ p["a"] @ p["b"])
  plain = og.diagnose(loss_fn, params, jnp.ones((1, 2)))
  with_aux = og.diagnose(lambda p, x: (loss_fn(p, x), {"acc": x.sum()}),
                         params, jnp.ones((1, 2)), has_aux=True)
  assert with_aux.loss == plain.loss == 16.0  # 1x2 @ 2x2(2s) @ 2x2(1s)
  np.testing.assert_array_equal(with_aux.grad_norms, plain.grad_norms)
  assert with_aux.layers == plain.layers == ("a", "b")


def test_stacked_layers_in_scan_order():
  def loss_fn(params, x):
    x = x @ params["embed"]

    def body(h, layer):
      return jnp.sin(h @ layer["w"] + layer["b"]), None

    x, _ = lax.scan(body, x, params["blocks"])
    return jnp.mean(x ** 2)

  rng = np.random.default_rng(0)
  params = {"blocks": {"b": jnp.zeros((5, 8)),
                       "w": jnp.asarray(rng.normal(size=(5, 8, 8)) * 1.5,
                                        jnp.float32)},
            "embed": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
  x = jnp.ones((2, 4))
  d = og.diagnose(loss_fn, params, x, stacked=("blocks",))
  assert "every trip of a loop" not in d.advice  # the scan slices them
  # The embedding first; then the scan's layers one after the other, each
  # with its kernel (read first in the body) before its bias.
  assert d.layers == ("embed",) + sum(
      ((f"blocks/w/{i}", f"blocks/b/{i}") for i in range(5)), ())
  grads = jax.grad(loss_fn)(params, x)
  want = [np.linalg.norm(np.asarray(grads["embed"]))] + [
      np.linalg.norm(np.asarray(grads["blocks"]["w"][i])) for i in range(5)]
  np.testing.assert_allclose(d.grad_norms[[0, 1, 3, 5, 7, 9]], want,
                             rtol=1e-5)
  # The trend is fitted over the six matrices (embed and the five kernels).
  slope = np.polyfit(np.arange(6), np.log(want), 1)[0]
  np.testing.assert_allclose(d.growth, np.exp(-slope), rtol=1e-5)


def test_weights_used_at_every_trip_of_a_loop_are_named_in_the_advice():
  """An RNN unrolled with `lax.scan` whose gradient through time vanishes
  (1e-19 at the first step against the last): its weights are single
  points of the fit, so the trend over the parameters cannot see it. The
  advice says so and names them; layers that a scan slices (stacked
  blocks) are layers of the depth, and get no such caveat."""
  n, steps = 8, 40
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"W_x": jax.random.normal(keys[0], (n, n)) / np.sqrt(n),
            "W_h": 0.5 * jnp.linalg.qr(jax.random.normal(keys[1], (n, n)))[0],
            "W_o": jax.random.normal(keys[2], (n, 1)) / np.sqrt(n)}
  xs = jax.random.normal(jax.random.key(3), (steps, 4, n))

  def loss_fn(p, xs):
    h, _ = lax.scan(lambda h, x: (jnp.tanh(x @ p["W_x"] + h @ p["W_h"]),
                                  None), jnp.zeros((4, n)), xs)
    return jnp.mean((h @ p["W_o"]) ** 2)

  through_time = np.linalg.norm(np.asarray(
      jax.grad(loss_fn, argnums=1)(params, xs)).reshape(steps, -1), axis=1)
  assert through_time[0] / through_time[-1] < 1e-10  # vanishing over time
  d = og.diagnose(loss_fn, params, xs)
  assert d.verdict == "healthy"  # over the parameters, which is all it fits
  assert d.advice.startswith("No sign of exploding or vanishing gradients "
                             "across the parameters: "), d.advice
  assert d.advice.endswith(
      "W_h, W_x are used whole at every trip of a loop (scan or while). "
      "Where that loop carries a state from trip to trip (an RNN over time), "
      "the trend above, which runs over the parameters, does not measure how "
      "the gradients grow or shrink through the trips: compare the gradients "
      "of the loop's first and last inputs for that."), d.advice
  # A stacked leaf indexed layer by layer in a loop is the fit's layers.
  stacked = {"w": jax.random.normal(keys[0], (4, n, n)) / np.sqrt(n)}
  by_index = lambda p, x: jnp.mean(lax.fori_loop(
      0, 4, lambda i, h: jnp.tanh(h @ p["w"][i]), x) ** 2)
  d = og.diagnose(by_index, stacked, xs[0], stacked=("w",))
  assert "every trip of a loop" not in d.advice, d.advice


def test_a_reverse_scan_runs_its_last_layer_first():
  """`scan(..., reverse=True)` applies layer 7 first: depth 0 is layer 7,
  and the vanishing gradients (a sigmoid stack) are read as vanishing."""
  layers, width = 8, 32
  w = jax.random.normal(jax.random.key(0), (layers, width, width))
  params = {"blocks": {"w": w / np.sqrt(width)}}
  x = jax.random.normal(jax.random.key(1), (16, width))

  def loss_fn(p, x):
    h, _ = lax.scan(lambda h, w: (jax.nn.sigmoid(h @ w), None), x,
                    p["blocks"]["w"], reverse=True)
    return jnp.mean(h ** 2)

  d = og.diagnose(loss_fn, params, x, stacked=("blocks",))
  assert d.layers == tuple(f"blocks/w/{i}" for i in reversed(range(layers)))
  grads = np.asarray(jax.grad(loss_fn)(params, x)["blocks"]["w"])
  in_depth_order = np.linalg.norm(grads.reshape(layers, -1), axis=1)[::-1]
  np.testing.assert_allclose(d.grad_norms, in_depth_order, rtol=1e-5)
  per_layer, _ = _np_growth(in_depth_order)
  assert per_layer < 0.5  # they shrink toward the input
  np.testing.assert_allclose(d.growth, per_layer, rtol=1e-5)
  assert d.verdict == "vanishing"


def test_stacked_layers_indexed_in_a_python_loop_go_layer_by_layer():
  """The same stacked blocks through a scan and through a Python loop that
  indexes them: the same depth order, norms and growth."""
  rng = np.random.default_rng(3)
  params = {"blocks": {
      name: jnp.asarray(rng.normal(size=(4, 8, 8)) * 1.2, jnp.float32)
      for name in ("w1", "w2")}}
  x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)

  def block(h, w1, w2):
    return jnp.tanh(jnp.tanh(h @ w1) @ w2)

  def scanned(p, x):
    h, _ = lax.scan(lambda h, w: (block(h, w["w1"], w["w2"]), None), x,
                    p["blocks"])
    return jnp.mean(h ** 2)

  def looped(p, x):
    for i in range(4):
      x = block(x, p["blocks"]["w1"][i], p["blocks"]["w2"][i])
    return jnp.mean(x ** 2)

  want = sum(((f"blocks/w1/{i}", f"blocks/w2/{i}") for i in range(4)), ())
  grads = jax.grad(looped)(params, x)["blocks"]
  norms = [np.linalg.norm(np.asarray(grads[n][i], np.float64))
           for i in range(4) for n in ("w1", "w2")]
  for loss_fn in (scanned, looped):
    d = og.diagnose(loss_fn, params, x, stacked=("blocks",))
    assert d.layers == want, loss_fn.__name__
    np.testing.assert_allclose(d.grad_norms, norms, rtol=1e-5)
    slope = np.polyfit(np.arange(8), np.log(norms), 1)[0]
    np.testing.assert_allclose(d.growth, np.exp(-slope), rtol=1e-5)

  # Two stacks of the same depth in two loops, one after the other (an
  # encoder, then a decoder): the first stack's layers, then the second's.
  def two_loops(p, x):
    for i in range(4):
      x = jnp.tanh(x @ p["blocks"]["w1"][i])
    for i in range(4):
      x = jnp.tanh(x @ p["blocks"]["w2"][i])
    return jnp.mean(x ** 2)

  d = og.diagnose(two_loops, params, x, stacked=("blocks",))
  assert d.layers == tuple(f"blocks/w1/{i}" for i in range(4)) + tuple(
      f"blocks/w2/{i}" for i in range(4))


def test_casts_are_not_uses_and_biases_do_not_stretch_the_fit():
  def loss_fn(params, x):
    p = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)  # mixed
    x = x.astype(jnp.bfloat16)
    for name in ("z_in", "m_mid", "a_out"):
      x = jnp.sin(x @ p[name]["w"] + p[name]["b"])
    return jnp.mean(x.astype(jnp.float32) ** 2)

  rng = np.random.default_rng(1)
  params = {n: {"w": jnp.asarray(rng.normal(size=(8, 8)) * 2, jnp.float32),
                "b": jnp.zeros(8)} for n in ("a_out", "m_mid", "z_in")}
  d = og.diagnose(loss_fn, params, jnp.ones((2, 8)))
  assert d.layers == ("z_in/w", "z_in/b", "m_mid/w", "m_mid/b", "a_out/w",
                      "a_out/b")
  kernels = d.grad_norms[[0, 2, 4]]          # fitted one layer apart
  slope = np.polyfit(np.arange(3), np.log(kernels), 1)[0]
  np.testing.assert_allclose(d.growth, np.exp(-slope), rtol=1e-5)


def test_zero_gradient_before_a_live_layer_is_vanishing():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
  d = og.diagnose(lambda p: jnp.sum(jnp.maximum(p["a"], 2.0) @ p["b"]),
                  params)
  np.testing.assert_array_equal(d.grad_norms, [0.0, 8.0])  # closed form
  assert d.verdict == "vanishing"
  assert d.advice.startswith("The gradients of a are exactly zero while "
                             "later layers' are not")


def _relu_mlp_loss(depth):
  def loss_fn(params, x):
    for i in range(depth):
      x = jax.nn.relu(x @ params[f"l{i:02d}"]["w"] + params[f"l{i:02d}"]["b"])
    return jnp.mean((x @ params["head"]["w"] + params["head"]["b"] - 1) ** 2)
  return loss_fn


def _relu_mlp(depth, width, scale, bias):
  keys = jax.random.split(jax.random.key(0), depth + 1)
  params = {f"l{i:02d}": {
      "w": scale * jax.random.normal(keys[i], (width, width)) / np.sqrt(width),
      "b": jnp.full((width,), bias)} for i in range(depth)}
  params["head"] = {"w": jax.random.normal(keys[-1], (width, 1)),
                    "b": jnp.zeros((1,))}
  return params


def test_growth_hidden_from_the_weights_is_read_from_the_biases():
  # ReLU initialised 4x too large: activations grow toward the output and
  # backward signals toward the input, so the kernels' gradients (their
  # product) stay flat while the biases' (the backward signal) explode.
  loss_fn, params = _relu_mlp_loss(12), _relu_mlp(12, 32, 4.0, 0.0)
  x = jax.random.normal(jax.random.key(1), (16, 32))
  d = og.diagnose(loss_fn, params, x)
  grads = jax.grad(loss_fn)(params, x)
  names = [f"l{i:02d}" for i in range(12)] + ["head"]
  assert d.layers == sum(((f"{n}/w", f"{n}/b") for n in names), ())
  w = np.array([np.linalg.norm(grads[n]["w"]) for n in names])
  b = np.array([np.linalg.norm(grads[n]["b"]) for n in names])
  w_growth, w_total = _np_growth(w)
  b_growth, b_total = _np_growth(b)
  np.testing.assert_allclose([d.growth, d.bias_growth], [w_growth, b_growth],
                             rtol=1e-4)
  assert w_total < 100 <= b_total          # the weights alone hide it
  assert d.verdict == "exploding"
  assert d.advice.startswith(
      f"Gradient norms grow {b_growth:.3g}x per layer toward the input "
      f"({b_total:.3g}x over the depth, fitted over the biases and norm "
      "scales).")


def test_every_weight_dead_is_vanishing_and_no_gradient_at_all_is_said():
  loss_fn, params = _relu_mlp_loss(4), _relu_mlp(4, 16, 1.0, -100.0)
  x = jax.random.normal(jax.random.key(1), (8, 16))
  d = og.diagnose(loss_fn, params, x)
  # Every unit is dead: only the head's bias has a gradient, 2 * (0 - 1).
  np.testing.assert_allclose(d.grad_norms, [0.0] * 9 + [2.0])
  assert d.verdict == "vanishing"
  assert d.advice.startswith("The gradients of l00/w, l01/w, l02/w and 2 "
                             "more are exactly zero while later layers'")
  nothing = og.diagnose(lambda p: jnp.sum(lax.stop_gradient(p["a"])),
                        {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))})
  assert nothing.verdict == "vanishing"
  assert nothing.advice.startswith("Every gradient is exactly zero")


def test_non_finite_advice_comes_first_beside_a_dead_layer():
  def loss_fn(params):
    return (jnp.sum(jnp.maximum(params["a"], 2.0) @ params["b"]) +
            jnp.log(params["c"] - 1.0).sum())

  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones(())}
  d = og.diagnose(loss_fn, params)
  assert d.verdict == "non-finite"
  assert d.advice.startswith("The loss or the gradients hold NaN/Inf in c.")
  assert "The gradients of a are exactly zero" in d.advice


def test_vanishing_advice_gives_the_shrink_over_the_depth():
  scales, params = np.array([1.0, 10.0, 100.0, 1000.0]), _params()
  d = og.diagnose(_weighted_loss(scales), params, jnp.float32(0.5))
  growth, total = _np_growth(
      scales * np.sqrt([params[n].size for n in _ORDER]))   # closed form
  assert d.advice.startswith(
      f"Gradient norms shrink {1 / growth:.3g}x per layer toward the input "
      f"({1 / total:.3g}x over the depth, fitted over the weight matrices)")


def _tanh_chain(h, w):
  return jnp.tanh(h @ w)


def test_depth_order_past_a_scan_and_through_nested_scans():
  k = jax.random.split(jax.random.key(0), 2)
  params = {"dec": 0.5 * jax.random.normal(k[0], (3, 4, 4)),
            "enc": 0.5 * jax.random.normal(k[1], (3, 4, 4))}

  def after_scan(p, x):   # a stacked leaf used by a loop after a scan
    h, _ = lax.scan(lambda h, w: (_tanh_chain(h, w), None), x, p["enc"])
    for i in range(3):
      h = _tanh_chain(h, p["dec"][i])
    return jnp.sum(h ** 2)

  d = og.diagnose(after_scan, params, jnp.ones((2, 4)),
                  stacked=("enc", "dec"))
  assert d.layers == ("enc/0", "enc/1", "enc/2", "dec/0", "dec/1", "dec/2")

  def nested(p, x):       # `dec` first used inside a scan within the layer
    def layer(h, ws):
      h = _tanh_chain(h, ws[0])
      h, _ = lax.scan(lambda c, _: (_tanh_chain(c, ws[1]), None), h, None,
                      length=2)
      return h, None
    return jnp.sum(lax.scan(layer, x, (p["enc"], p["dec"]))[0] ** 2)

  d = og.diagnose(nested, params, jnp.ones((2, 4)), stacked=("enc", "dec"))
  assert d.layers == ("enc/0", "dec/0", "enc/1", "dec/1", "enc/2", "dec/2")


def test_depth_order_follows_cond():
  names = [f"z{9 - i}" for i in range(6)]   # used z9 first: not by name
  keys = jax.random.split(jax.random.key(0), 6)
  params = {n: 0.5 * jax.random.normal(k, (4, 4)) for n, k in zip(names, keys)}

  def forward(p, x):
    for n in names:
      x = jnp.tanh(x @ p[n])
    return jnp.mean(x ** 2)

  def in_cond(p, x, flag):
    return lax.cond(flag, lambda: forward(p, x), lambda: forward(p, 2 * x))

  x = jnp.ones((2, 4))
  assert og.diagnose(in_cond, params, x, jnp.bool_(True)).layers == tuple(
      names)

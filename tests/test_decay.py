"""Weight decay and L1/L2 penalties (issue 5) against closed forms and optax."""

from __future__ import annotations

import functools
import inspect
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4)),
                                            jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
          "LayerNorm_0": {"scale": jnp.asarray(rng.normal(size=(4,)),
                                               jnp.float32)},
          "Embed_0": {"embedding": jnp.asarray(rng.normal(size=(5, 4)),
                                               jnp.float32)},
          "w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
          "v": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}


DEFAULT = {"Dense_0": {"kernel": True, "bias": False},
           "LayerNorm_0": {"scale": False}, "Embed_0": {"embedding": True},
           "w": True, "v": False}


def _grads(seed):
  rng = np.random.default_rng(100 + seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())


def test_default_mask_rule_on_names_and_shapes():
  assert og.decay_mask(_params()) == DEFAULT


def _real_flax_params():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, tokens, image):
      x = nn.Embed(11, 8)(tokens)
      x = nn.LayerNorm()(x)
      x = nn.MultiHeadDotProductAttention(num_heads=2)(x)
      x = nn.RMSNorm()(nn.Dense(8)(x))
      y = nn.Conv(4, (3, 3))(image)
      y = nn.BatchNorm(use_running_average=True)(y)
      y = nn.GroupNorm(num_groups=2)(y)
      return x.sum() + y.sum()

  variables = Block().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32),
                           jnp.zeros((2, 6, 6, 3)))
  return variables["params"]


def test_default_mask_on_a_real_flax_model():
  params = _real_flax_params()
  mask = og.decay_mask(params)
  decayed = sorted(
      "/".join(str(k.key) for k in path)
      for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0] if flag)
  assert decayed == [
      "Conv_0/kernel", "Dense_0/kernel", "Embed_0/embedding",
      "MultiHeadDotProductAttention_0/key/kernel",
      "MultiHeadDotProductAttention_0/out/kernel",
      "MultiHeadDotProductAttention_0/query/kernel",
      "MultiHeadDotProductAttention_0/value/kernel"]
  # The transformation follows the mask: only those leaves move.
  tx = og.add_decayed_weights(0.1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = "/".join(str(k.key) for k in path)
    p = np.asarray(params_at(params, path))
    np.testing.assert_allclose(u, 0.1 * p if name in decayed else 0 * p,
                               rtol=1e-6, err_msg=name)


def params_at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("mask", [None, DEFAULT, og.decay_mask])
def test_add_decayed_weights_agrees_with_optax(mask):
  params = _params()
  ours = og.add_decayed_weights(0.05, **({} if mask is DEFAULT else
                                        {"mask": mask}))
  theirs = optax.add_decayed_weights(0.05, mask=mask)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for i in range(3):
    u1, s_ours = ours.update(_grads(i), s_ours, params)
    u2, s_theirs = theirs.update(_grads(i), s_theirs, params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


def _selected(params, mask):
  flags = jax.tree.leaves(mask if mask is not None else
                          jax.tree.map(lambda _: True, params))
  return [np.asarray(p, np.float64) for p, f in
          zip(jax.tree.leaves(params), flags) if f]


@pytest.mark.parametrize("factory", [og.add_decayed_weights, og.add_l2_penalty])
def test_l2_gradient_and_penalty_in_closed_form(factory):
  params, grads = _params(), _grads(0)
  tx = factory(0.3)
  out, state = tx.update(grads, tx.init(params), params)
  for u, g, p, flag in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                           jax.tree.leaves(params), jax.tree.leaves(DEFAULT)):
    np.testing.assert_allclose(u, g + (0.3 * p if flag else 0.0), rtol=1e-6)
  want = 0.5 * 0.3 * sum(np.sum(p * p) for p in _selected(params, DEFAULT))
  m = og.metrics(state)
  decoupled = factory is og.add_decayed_weights
  penalty_name = ("param/weight_decay_penalty" if decoupled
                  else "param/l2_penalty")
  np.testing.assert_allclose(m[penalty_name], want, rtol=1e-6)
  rate_name = "param/weight_decay" if decoupled else "param/l2_rate"
  np.testing.assert_allclose(m[rate_name], 0.3)


def test_l2_penalty_is_the_gradient_of_the_penalty():
  params = _params()
  penalty = lambda p: 0.5 * 0.3 * sum(
      jnp.sum(jnp.square(x)) for x, f in zip(jax.tree.leaves(p),
                                             jax.tree.leaves(DEFAULT)) if f)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = og.add_l2_penalty(0.3)
  out, _ = tx.update(zeros, tx.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               out, jax.grad(penalty)(params))


def test_l1_penalty_sign_with_zero_at_zero():
  params = {"kernel": jnp.asarray([[1.5, 0.0, -2.0], [0.0, -0.1, 3.0]])}
  grads = {"kernel": jnp.asarray([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])}
  tx = og.add_l1_penalty(0.25)
  out, state = tx.update(grads, tx.init(params), params)
  p = np.asarray(params["kernel"])
  np.testing.assert_allclose(out["kernel"],
                             np.asarray(grads["kernel"]) + 0.25 * np.sign(p),
                             rtol=1e-6)
  np.testing.assert_allclose(og.metrics(state)["param/l1_penalty"],
                             0.25 * np.abs(p).sum(), rtol=1e-6)


def test_schedules_follow_the_step():
  schedule = optax.linear_schedule(1.0, 0.0, 4)
  params = _params()
  for factory in (og.add_decayed_weights, og.add_l2_penalty,
                  og.add_l1_penalty):
    tx = factory(schedule, mask=None)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(6):
      g = _grads(t)
      out, state = step(g, state, params)
      rate = max(1.0 - t / 4, 0.0)
      d = (jax.tree.map(jnp.sign, params) if factory is og.add_l1_penalty
           else params)
      jax.tree.map(lambda u, gg, dd: np.testing.assert_allclose(
          u, gg + rate * dd, rtol=1e-6, atol=1e-7), out, g, d)
      np.testing.assert_allclose(state.last_rate, rate, atol=1e-7)
    assert int(state.step) == 6


def test_mask_as_tree_callable_and_none():
  params, grads = _params(), _grads(1)
  only_w = jax.tree.map(lambda _: False, params)
  only_w["w"] = True
  for mask in (only_w, lambda p: only_w):
    tx = og.add_l2_penalty(1.0, mask=mask)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(out["w"], grads["w"] + params["w"], rtol=1e-6)
    np.testing.assert_array_equal(out["v"], grads["v"])
  tx = og.add_l2_penalty(1.0, mask=None)
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(out["v"], grads["v"] + params["v"], rtol=1e-6)


def test_numpy_bools_in_a_mask_work_as_in_optax():
  params, grads = _params(), _grads(1)
  mask = lambda p: jax.tree.map(lambda x: np.prod(x.shape) > 8, p)  # np.bool_
  ours = og.add_decayed_weights(0.5, mask=mask)
  out, _ = ours.update(grads, ours.init(params), params)
  for u, g, p in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                     jax.tree.leaves(params)):
    np.testing.assert_allclose(u, g + (0.5 * p if p.size > 8 else 0.0),
                               rtol=1e-6)


@pytest.mark.standard_promotion  # optax's own add_decayed_weights
def test_a_prefix_mask_stands_for_every_leaf_below_it_as_in_optax():
  params, grads = _params(), _grads(1)
  prefix = {k: k == "Dense_0" for k in params}  # one flag per module
  ours = og.add_decayed_weights(0.5, mask=prefix)
  out, _ = ours.update(grads, ours.init(params), params)
  ref = optax.add_decayed_weights(0.5, mask=prefix)
  want, _ = ref.update(grads, ref.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               out, want)
  assert not np.allclose(out["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])


@pytest.mark.standard_promotion  # optax's own add_decayed_weights
def test_unusual_trees_decay_as_in_optax():
  """One array as the whole parameters (default mask, or a callable giving
  one bool); keys whose paths write one name (`"enc/out"` beside
  `enc/out`: no per-layer metric here to confuse); Python floats, eager.
  (Integer parameters are refused: see `test_errors`.)"""
  kernel = jnp.asarray([[1.0, -2.0], [3.0, 0.5]])
  cases = [
      (kernel, og.decay_mask, lambda p: True),          # a kernel: decayed
      (jnp.asarray([1.0, 2.0]), og.decay_mask, lambda p: False),  # a bias
      (kernel, (lambda p: True), (lambda p: True)),
      ({"enc/out": jnp.ones(2), "enc": {"out": jnp.full(2, 2.0)}}, None,
       None),
      ({"a": 3.0, "w": jnp.ones(2)}, None, None),
  ]
  for params, mask, optax_mask in cases:
    grads = jax.tree.map(lambda p: jnp.full(jnp.shape(p), 0.1), params)
    ref = optax.add_decayed_weights(0.4, mask=optax_mask)
    want, _ = ref.update(grads, ref.init(params), params)
    for factory in (og.add_decayed_weights, og.add_l2_penalty):
      tx = factory(0.4, mask=mask)
      got, state = tx.update(grads, tx.init(params), params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                   got, want)
      assert [jnp.result_type(x) for x in jax.tree.leaves(got)] == [
          jnp.result_type(x) for x in jax.tree.leaves(want)]
      decayed = [p for p, g, w in zip(jax.tree.leaves(params),
                                      jax.tree.leaves(grads),
                                      jax.tree.leaves(want))
                 if not np.allclose(g, w)]
      np.testing.assert_allclose(  # rate / 2 * |W|^2 over the decayed
          state.penalty, 0.2 * sum(np.sum(np.square(np.asarray(p, np.float64)))
                                   for p in decayed), rtol=1e-6)


def test_errors():
  params = _params()
  for factory in (og.add_decayed_weights, og.add_l2_penalty,
                  og.add_l1_penalty):
    tx = factory(0.1)
    name = factory.__name__
    with pytest.raises(ValueError, match=rf"`{name}` needs the current "
                       r"parameters: call `update\(updates, state, params\)`"
                       r"; it was called with params=None\."):
      tx.update(_grads(0), tx.init(params))
    with pytest.raises(ValueError, match=r"`rate` must be a finite real "
                       r"number >= 0, but got -0\.1\."):
      factory(-0.1)
    with pytest.raises(ValueError, match=rf"The `mask` of `{name}` must hold "
                       r"one bool per parameter leaf, but got 'no'\."):
      factory(0.1, mask=jax.tree.map(lambda _: "no", params)).init(params)
    # A boolean leaf (a flag kept with the parameters) is no weight: L1's
    # sign failed on it, the decays turned it into a float update.
    flagged = {"w": jnp.ones((2, 2)), "keep": jnp.ones((2, 2), bool)}
    with pytest.raises(ValueError, match=rf"^`{name}` would decay the "
                       r"parameter 'keep', which is boolean \(a flag, not a "
                       r"weight\); leave it out with the mask\.$"):
      factory(0.1, mask=None).init(flagged)
    factory(0.1, mask={"w": True, "keep": False}).init(flagged)
    # An integer leaf (a count, an index): optax.apply_updates truncates
    # its decay (a rate of 1e-5 took 1 off every step).
    counted = {"w": jnp.ones((2, 2)), "n": jnp.asarray([1, 5, 100])}
    with pytest.raises(ValueError, match=rf"^`{name}` would decay the "
                       r"parameter 'n', which is of dtype int32 \(a count or "
                       r"an index, not a weight; `optax.apply_updates` would "
                       r"truncate its decay\); leave it out with the mask\.$"):
      factory(0.1, mask=None).init(counted)
    factory(0.1, mask={"w": True, "n": False}).init(counted)
    with pytest.raises(ValueError, match=rf"The `mask` of `{name}` must have "
                       r"the structure of the parameters or a prefix of it"):
      factory(0.1, mask={"w": True}).init(params)
    # A single bool decays all or nothing: what optax's inject_hyperparams
    # makes of a callable mask, which it calls with the step count.
    with pytest.raises(ValueError, match=(
        rf"^The `mask` of `{name}` must be a tree of bools like the "
        r"parameters \(or a prefix of it\), a callable returning one, or "
        r"None for every leaf, but it is the single bool False, which would "
        r"touch every leaf or none \(pass None, or a rate of 0\)\. If you "
        r"passed a function through `optax.inject_hyperparams`, list it in "
        r"its `static_args`")):
      injected = optax.inject_hyperparams(factory)(
          0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
      injected.update(_grads(0), injected.init(params), params)
    one_leaf = {"Dense_0": {"kernel": jnp.ones((2, 2))}}  # (was its flag)
    with pytest.raises(ValueError, match="it is the single bool False"):
      injected.init(one_leaf)
    # `og.decay_mask` itself says so, also where its False would have been
    # a single array's own flag (the decay silently stopped) and where
    # `stacked=` was blamed.
    for mask in (og.decay_mask,
                 functools.partial(og.decay_mask, stacked=("Dense_0",))):
      injected = optax.inject_hyperparams(factory)(0.1, mask=mask)
      for tree in (params, jnp.ones((2, 2))):
        with pytest.raises(ValueError, match=(
            r"^`decay_mask` was called with a 0-d integer array, not "
            r"parameters: the step count, as `optax.inject_hyperparams` "
            r"calls a function argument\. If you passed a function through "
            r"`optax.inject_hyperparams`, list it in its `static_args`")):
          injected.init(tree)
    # True is still the one leaf's flag there, as in optax.
    decay = factory(0.1, mask=True)
    got, _ = decay.update(jax.tree.map(jnp.zeros_like, one_leaf),
                          decay.init(one_leaf), one_leaf)
    # rate * W (rate * sign(W) for L1): 0.1 for a kernel of ones.
    np.testing.assert_allclose(got["Dense_0"]["kernel"], 0.1)
    # Updates are paired with parameters by position: trees must match.
    state = tx.init(params)
    renamed = {("Other_0" if k == "Embed_0" else k): v
               for k, v in params.items()}
    with pytest.raises(ValueError, match=rf"`{name}` was called with 6 "
                       r"parameter layers but got updates with other layers; "
                       r"the trees must match\. Only in the parameters: "
                       r"\['Embed_0/embedding'\]; only in the updates: "
                       r"\['Other_0/embedding'\]\."):
      tx.update(renamed, state, params)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["Dense_0"]["bias"] = jnp.zeros((3, 4), jnp.float32)  # broadcasts
    with pytest.raises(ValueError, match=(
        rf"`{name}` got an update of shape \(3, 4\) for the parameter "
        r"'Dense_0/bias' of shape \(4,\); each update must have its "
        r"parameter's shape\.")):
      tx.update(wrong, state, params)


def test_penalty_value_under_shard_map_counts_a_sharded_kernel_once_per_shard():
  """A kernel sharded over 8 devices beside a replicated bias: the recorded
  penalty is the global one, identical on every device."""
  mesh = jax.make_mesh((8,), ("d",))
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(16, 4)).astype(np.float32)
  bias = rng.normal(size=(4,)).astype(np.float32)
  for factory, want in (
      (og.add_l2_penalty, 0.5 * 0.2 * (np.sum(kernel.astype(np.float64) ** 2)
                                       + np.sum(bias.astype(np.float64) ** 2))),
      (og.add_l1_penalty, 0.2 * (np.abs(kernel).sum() + np.abs(bias).sum()))):
    tx = factory(0.2, mask=None, axis_name="d")

    def run(k, b):
      p = {"kernel": k, "bias": b}
      _, s = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
      return s.penalty[None]

    fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("d"), P()),
                               out_specs=P("d")))
    got = fn(jax.device_put(kernel, NamedSharding(mesh, P("d"))),
             jax.device_put(bias, NamedSharding(mesh, P())))
    np.testing.assert_allclose(np.asarray(got), np.full(8, want), rtol=1e-5)


@pytest.mark.parametrize("factory", [og.add_decayed_weights,
                                     og.add_l2_penalty, og.add_l1_penalty])
def test_a_sharded_parameter_without_axis_name_is_named(factory):
  """All three name the sharded parameter by its path (L1 had no check)."""
  mesh = jax.make_mesh((8,), ("d",))
  tx = factory(0.2, mask=None)

  def run(k, b):
    p = {"kernel": k, "bias": b}
    return tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]

  fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("d"), P()),
                             out_specs=(P("d"), P())))
  with pytest.raises(ValueError, match=(
      r"^The parameter 'kernel' varies along mesh axes \['d'\] that "
      r"axis_name=None does not name")):
    fn(jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("d"))),
       jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P())))
  # A sharded leaf that the mask leaves out is never measured: fine.
  masked = factory(0.2, mask={"kernel": False, "bias": True})

  def run_masked(k, b):
    p = {"kernel": k, "bias": b}
    return masked.update(jax.tree.map(jnp.zeros_like, p), masked.init(p),
                         p)[0]

  out = jax.jit(jax.shard_map(run_masked, mesh=mesh, in_specs=(P("d"), P()),
                              out_specs={"kernel": P("d"), "bias": P()}))(
      jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("d"))),
      jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P())))
  np.testing.assert_array_equal(out["kernel"], np.zeros((16, 4)))
  np.testing.assert_allclose(out["bias"], np.full(4, 0.2))


def test_stacked_layers_are_masked_as_the_layers_they_stack():
  """A block with a per-layer vector (`layer_scale`) and a kernel, alone
  and stacked three times by `nn.scan`: with `stacked=` the scanned tree
  gets the single block's mask; without it its stacked vector reads as a
  matrix and is decayed."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      scale = self.param("layer_scale", nn.initializers.ones, (4,))
      return nn.Dense(4)(x) * scale, None

  x = jnp.ones((2, 4))
  one = Block().init(jax.random.key(0), x, None)["params"]
  scanned = nn.scan(Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
  stacked = scanned().init(jax.random.key(0), x, None)["params"]
  assert og.decay_mask(one) == {"layer_scale": False,
                                "Dense_0": {"kernel": True, "bias": False}}
  assert og.decay_mask(stacked)["layer_scale"] is True    # the premise
  for marks in (("layer_scale", "Dense_0"), lambda name: True):
    assert og.decay_mask(stacked, stacked=marks) == og.decay_mask(one)
  # As a factory's mask; the decayed leaves are those the mask names.
  tx = og.add_decayed_weights(
      0.5, mask=functools.partial(og.decay_mask, stacked=lambda name: True))
  zeros = jax.tree.map(jnp.zeros_like, stacked)
  updates, _ = tx.update(zeros, tx.init(stacked), stacked)
  np.testing.assert_array_equal(updates["layer_scale"], 0 * stacked["layer_scale"])
  np.testing.assert_allclose(updates["Dense_0"]["kernel"],
                             0.5 * stacked["Dense_0"]["kernel"], rtol=1e-6)
  with pytest.raises(ValueError, match=r"^`stacked` must be None"):
    og.decay_mask(stacked, stacked=3)


def test_default_mask_and_decay_on_flax_nnx():
  """nnx states hold `Variable`s: names drop their `value`, and the decay
  runs inside `nnx.Optimizer` (beside AGC, which also needs params)."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.dense(x))

  model = Model(nnx.Rngs(0))
  mask = og.decay_mask(nnx.state(model, nnx.Param))
  # Plain bools in place of the `Variable`s, so that the precomputed tree
  # also masks the plain arrays `nnx.Optimizer` passes (it once held
  # `Param(False)` nodes, which no transformation's tree matched).
  flags = {"/".join(str(getattr(k, "key", getattr(k, "name", k)))
                    for k in path): flag
           for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flags == {"dense/bias": False, "dense/kernel": True,
                   "norm/bias": False, "norm/scale": False}
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  tx = optax.chain(og.adaptive_grad_clip(0.1), optax.sgd(0.0),
                   og.add_decayed_weights(0.5, mask=mask), optax.scale(-1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3)))))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  after = nnx.state(model, nnx.Param)
  # lr 0: only the decay moves the weights, and only the kernel.
  np.testing.assert_allclose(after["dense"]["kernel"][...],
                             0.5 * before["dense"]["kernel"][...], rtol=1e-6)
  np.testing.assert_array_equal(after["dense"]["bias"][...],
                                before["dense"]["bias"][...])
  np.testing.assert_array_equal(after["norm"]["scale"][...],
                                before["norm"]["scale"][...])


def test_the_recorded_penalty_does_not_overflow_before_the_rate():
  """||W|| = 3e19: ||W||^2 overflows float32, 0.01/2 ||W||^2 = 4.5e36 not."""
  params = {"w": jnp.asarray([3e19], jnp.float32)}
  for factory in (og.add_decayed_weights, og.add_l2_penalty):
    tx = factory(0.01, mask=None)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params),
                         tx.init(params), params)
    np.testing.assert_allclose(state.penalty, 4.5e36, rtol=1e-6)


def test_a_schedule_returning_an_array_is_refused():
  params = {"w": jnp.ones(2)}
  tx = og.add_decayed_weights(lambda step: jnp.full(2, 0.1), mask=None)
  with pytest.raises(ValueError, match=(
      r"`add_decayed_weights`'s rate schedule returned an array of shape "
      r"\(2,\); a schedule must return one number\.")):
    tx.update(params, tx.init(params), params)


def test_injected_rate_gets_a_buffer_of_its_own_for_donation():
  """Under `optax.inject_hyperparams` the rate arrives as a float32 array,
  which an eager update recorded as the state's `last_rate` itself: the
  state then held one buffer twice, and a donated step refused it."""
  params = _params()
  for factory in (og.add_decayed_weights, og.add_l2_penalty,
                  og.add_l1_penalty):
    tx = optax.inject_hyperparams(factory)(0.1)
    _, state = tx.update(_grads(0), tx.init(params), params)  # eagerly
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(pointers) == len(set(pointers)), factory.__name__
    step = jax.jit(tx.update, donate_argnums=1)
    updates, state = step(_grads(0), state, params)
    np.testing.assert_allclose(
        optax.tree.get(state, "last_rate"), np.float32(0.1))


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.parametrize("factory", ["add_decayed_weights", "add_l2_penalty",
                                     "add_l1_penalty"])
def test_decay_copies_no_donated_parameter(factory):
  """The penalty reads the parameters; nothing ordered that read before
  their in-place update, and XLA copied every donated kernel (optax's own
  decay copies none)."""
  params = {"a": jnp.zeros((512, 1024)), "b": jnp.zeros((1024, 512)),
            "bias": jnp.zeros((512,))}

  def copies(decay):
    tx = optax.chain(decay, optax.adam(1e-3))

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    text = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), params).compile().as_text()
    return [line for line in text.splitlines()
            if re.search(r"\bcopy\(", line) and
            re.search(r"f32\[(512,1024|1024,512)\]", line.split("copy(")[0])]

  assert copies(getattr(og, factory)(0.1, mask=None)) == copies(
      optax.add_decayed_weights(0.1)) == []


@pytest.mark.standard_promotion  # traces optax.scale_by_adam
@pytest.mark.parametrize("wrap", [og.guard, og.skip_nonfinite, og.skip_spikes])
def test_decay_inside_a_skip_keeps_what_optax_decay_keeps(wrap):
  """The guide's place for a decoupled decay with an optax optimizer:
  inside the guard (its generic path). The decay's wait for the parameters'
  statistic, a select on each update, split the update's fusion and kept a
  second update-sized temporary (25 MiB against optax's 17 here)."""
  params = {f"k{i}": jnp.zeros((512, 512)) for i in range(4)}

  def temporaries(decay):
    tx = wrap(optax.chain(optax.scale_by_adam(), decay, optax.scale(-1e-3)))

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  slack = 1 << 19  # half a leaf
  assert temporaries(og.add_decayed_weights(1e-4, mask=None)) <= (
      temporaries(optax.add_decayed_weights(1e-4)) + slack)


@pytest.mark.parametrize("factory", ["add_decayed_weights", "add_l2_penalty",
                                     "add_l1_penalty"])
def test_a_negative_scheduled_rate_is_applied_as_given(factory):
  """Only a constant rate is checked to be >= 0; a schedule's negative value
  is applied as written (was: the whole decayed update zeroed, gradient
  included, by the select that orders the parameters' read)."""
  params = {"w": jnp.full((3,), 2.0)}
  grads = {"w": jnp.full((3,), 0.5)}
  tx = getattr(og, factory)(optax.linear_schedule(1e-2, -1e-2, 1), mask=None)
  state = tx.init(params)
  for rate in (1e-2, -1e-2):
    updates, state = jax.jit(tx.update)(grads, state, params)
    d = np.sign(2.0) if factory == "add_l1_penalty" else 2.0
    np.testing.assert_allclose(updates["w"], 0.5 + rate * d, rtol=1e-6)


@pytest.mark.parametrize("factory", [og.add_decayed_weights, og.add_l2_penalty,
                                     og.add_l1_penalty])
def test_the_default_mask_survives_a_pickle_by_value(factory):
  """cloudpickle (Ray, Dask) pickles the factories' closures by value, so
  their default `mask` came back as a new object, taken for a mask tree:
  `init` failed. Pickled, the default must still be the default."""
  default = inspect.signature(factory).parameters["mask"].default
  again = pickle.loads(pickle.dumps(default))
  params, grads = _params(), _grads(0)
  tx = factory(0.1, mask=again)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, flag in jax.tree_util.tree_flatten_with_path(DEFAULT)[0]:
    moved = not np.array_equal(_at(updates, path), _at(grads, path))
    assert moved == flag, path
  assert repr(default) == "decay_mask"


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return np.asarray(tree)

"""The contract of DESIGN §2, checked over every public factory.

Add every new public transformation to `CASES`; `test_every_factory_is_covered`
fails until it is there.
"""

import functools
import inspect
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

# name -> (factory kwargs, numeric hyperparameters for inject_hyperparams)
CASES = {
    "clip_by_global_norm": ({"max_norm": 1.0}, {"max_norm": 1.0}),
    "clip_by_layer_norm": ({"max_norm": 1.0}, {"max_norm": 1.0}),
    "clip_by_value": ({"max_abs": 0.5}, {"max_abs": 0.5}),
    "adaptive_grad_clip": ({"clipping": 0.1}, {"clipping": 0.1}),
    "autoclip": ({"percentile": 10.0, "window": 8}, {"percentile": 10.0}),
    "zclip": ({"warmup_steps": 2, "max_norm": 4.0}, {"max_norm": 4.0}),
    "add_decayed_weights": ({"rate": 0.1}, {"rate": 0.1}),
    "add_l2_penalty": ({"rate": 0.1}, {"rate": 0.1}),
    "add_l1_penalty": ({"rate": 0.1}, {"rate": 0.1}),
    "add_gradient_norm_penalty": ({"strength": 0.5}, {"strength": 0.5}),
    "monitor": ({"histogram": True, "every": 2, "zscore": True}, {}),
    "zero_nonfinite": ({}, {}),
    "skip_nonfinite": ({"inner": optax.sgd(0.1), "max_consecutive": 3}, {}),
    "skip_spikes": ({"inner": optax.sgd(0.1), "sigma": 2.0, "window": 4,
                     "warmup_steps": 2}, {}),  # sigma: see test_spikes
    "guard": ({"inner": optax.sgd(0.1), "spike_window": 4,
               "spike_warmup_steps": 2, "histogram": True, "zscore": True,
               "groups": lambda name: name.split("/")[0]},
              {"max_norm": 1.0}),
    "adamw": ({"learning_rate": 0.01}, {"learning_rate": 0.01}),
    "adam": ({"learning_rate": 0.01}, {"learning_rate": 0.01}),
    "sgd": ({"learning_rate": 0.1, "momentum": 0.9}, {"learning_rate": 0.1}),
}

# Extra arguments a factory's update cannot do without (checked separately).
REQUIRED_EXTRA = {
    "add_gradient_norm_penalty": {
        "grad_fn": lambda p: jax.tree.map(lambda x: x ** 3 - x, p)},
}

ALLOWED_DTYPES = {np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.bool_)}


def _public_factories():
  out = []
  for name in og.__all__:
    obj = getattr(og, name)
    if not (inspect.isfunction(obj) and name[0].islower()):
      continue
    returns = str(inspect.signature(obj).return_annotation)
    if ("GradientTransformation" in returns or
        "GuardAwareTransformation" in returns):
      out.append(name)
  return out


def test_every_factory_is_covered():
  assert {"guard", "adamw", "sgd", "clip_by_value"} <= set(_public_factories())
  assert set(_public_factories()) <= set(CASES), (
      "public factories missing from the contract suite: "
      f"{set(_public_factories()) - set(CASES)}")


def _params():
  return {"Dense_0": {"kernel": jnp.ones((3, 4), jnp.float32) * 0.5,
                      "bias": jnp.zeros((4,), jnp.float32)},
          "head": jnp.ones((4,), jnp.float32)}


def _grads(i):
  key = jax.random.key(i)
  params = _params()
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      3.0 * jax.random.normal(k, x.shape, jnp.float32)
      for k, x in zip(keys, leaves)])


@functools.cache
def _make(name):
  """The factory's transformation, built once per module and shared.

  A transformation is a pair of pure functions, so sharing it changes no
  check; it lets `jax.jit(tx.update)` on the same argument signature (state,
  step, host-metrics, extra-args and inject tests) reuse one trace and one
  compiled program instead of compiling it again in each test.
  """
  kwargs, _ = CASES[name]
  return _with_required_extra(name, getattr(og, name)(**kwargs))


def _with_required_extra(name, tx):
  """`tx`, its update given the extra arguments it requires."""
  extra = REQUIRED_EXTRA.get(name)
  if extra is None:
    return tx

  def update(updates, state, params=None, **extra_args):
    return tx.update(updates, state, params, **{**extra, **extra_args})

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _assert_same_signature(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype


def _camel(name):
  return "".join(part.capitalize() for part in name.split("_")) + "State"


@pytest.mark.parametrize("name", sorted(CASES))
def test_factory_returns_extra_args_transformation(name):
  tx = _make(name)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = tx.init(_params())
  assert type(state).__name__ == _camel(name)
  assert hasattr(type(state), "_fields")  # a NamedTuple


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_leaves_are_typed_arrays_and_stable(name):
  tx = _make(name)
  params = _params()
  state = tx.init(params)
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array)
    assert np.dtype(leaf.dtype) in ALLOWED_DTYPES, leaf.dtype
  _, new_state = jax.jit(tx.update)(_grads(0), state, params)
  _assert_same_signature(state, new_state)


@pytest.mark.parametrize("name", sorted(CASES))
def test_weakly_typed_parameters_keep_the_state_types(name):
  """A weakly typed parameter (`jnp.array(0.5)`, a learned temperature) makes
  no weakly typed state leaf that `update` would return strong: the step
  would trace again."""
  tx = _make(name)
  params = {**_params(), "temperature": jnp.array(0.5)}
  assert jax.typeof(params["temperature"]).weak_type
  grads = {**_grads(0), "temperature": jnp.float32(0.1)}
  state = tx.init(params)
  _, new_state = jax.jit(tx.update)(grads, state, params)
  _assert_same_signature(state, new_state)
  assert [jax.typeof(x).weak_type for x in jax.tree.leaves(state)] == [
      jax.typeof(x).weak_type for x in jax.tree.leaves(new_state)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_on_shape_dtype_structs(name):
  tx = _make(name)
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  abstract_state = jax.eval_shape(tx.init, abstract)
  _assert_same_signature(abstract_state, tx.init(params))
  # The metrics' names, shapes and dtypes before any step (to set up a
  # logger): as those of the concrete state's (a TypeError before).
  concrete = og.metrics(tx.init(params))
  shapes = og.metrics(abstract_state)
  assert list(shapes) == list(concrete)
  for name, value in concrete.items():
    assert isinstance(shapes[name], jax.ShapeDtypeStruct), name
    assert (shapes[name].shape, shapes[name].dtype) == (
        np.shape(value), np.asarray(value).dtype), name


def _scan(tx, params, steps):
  """`steps` steps of `tx` in one `lax.scan`: the last state, and every
  step's state stacked."""
  def body(carry, i):
    p, s = carry
    u, s = tx.update(_grads(i), s, p)
    return (optax.apply_updates(p, u), s), s

  (_, state), states = jax.lax.scan(body, (params, tx.init(params)),
                                    jnp.arange(steps))
  return state, states


@pytest.mark.parametrize("name", sorted(CASES))
def test_survives_lax_scan(name):
  tx = _make(name)
  params = _params()
  state, _ = _scan(tx, params, 4)
  _assert_same_signature(state, tx.init(params))


@pytest.mark.parametrize("name", sorted(CASES))
def test_metrics_of_the_states_a_scan_stacks(name):
  """The per-step states a scan returns, read inside the jitted step (one
  vmapped program: a Python loop over the steps made one copy of every
  metric per step) and outside, equal the steps' own metrics; a scan of no
  steps gives empty columns (an IndexError before)."""
  tx = _make(name)
  params = _params()
  run = lambda steps: _scan(tx, params, steps)[1]

  stacked = jax.jit(lambda: run(3))()
  inside = jax.jit(lambda: og.metrics(run(3)))()
  outside = og.metrics(stacked)
  assert sorted(inside) == sorted(outside)  # (jit returns a dict sorted)
  for step in range(3):
    one = og.metrics(jax.tree.map(lambda x, step=step: x[step], stacked))
    for metric, value in one.items():
      np.testing.assert_array_equal(np.asarray(inside[metric])[step], value,
                                    err_msg=metric)
      np.testing.assert_array_equal(outside[metric][step], value,
                                    err_msg=metric)
  empty = og.metrics(jax.jit(lambda: run(0))())
  assert list(empty) == list(outside)
  assert all(np.shape(empty[k]) == (0, *np.shape(outside[k])[1:])
             for k in empty)
  traced = jax.jit(lambda: og.metrics(run(0)))()
  assert all(np.shape(traced[k]) == np.shape(empty[k]) for k in empty)


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_retrace_over_five_steps(name):
  tx = _make(name)
  params = _params()

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for i in range(5):
    params, state = step(params, state, _grads(i))


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_steps_compile_nothing_after_the_first(name):
  """Called outside `jit`, every `lax.cond` and reduction of the statistics
  compiled anew at every step (their branches are closures made in the
  call): 10-46 programs per step of the guard, seconds per step, and the
  process's memory grew by MiBs per step."""
  tx = _make(name)
  params = _params()
  extra = REQUIRED_EXTRA.get(name, {})
  compiles = []

  def listener(event, duration, **kwargs):
    if "backend_compile" in event:
      compiles.append(event)

  state = tx.init(params)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for i in range(5):
      if i == 2:
        compiles.clear()  # the first steps compile what they need
      updates, state = tx.update(_grads(i), state, params, **extra)
      params = optax.apply_updates(params, updates)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_survives_buffer_donation(name):
  tx = _make(name)
  params = _params()
  state = tx.init(params)

  def buffers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
            if isinstance(x, jax.Array)]

  # Every leaf its own buffer, none a parameter's: donating a state that
  # shares one (with itself or the parameters) fails. Also after an eager
  # update, which may hand an input back unchanged.
  for _ in range(2):
    own, theirs = buffers(state), buffers(params)
    assert len(own) == len(set(own)) and not set(own) & set(theirs)
    _, state = tx.update(_grads(0), state, params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)
  for i in range(2):
    params, state = step(params, state, _grads(i))
  _assert_same_signature(state, tx.init(_params()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_works_with_and_without_extra_args(name):
  tx = _make(name)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  u1, s1 = update(_grads(1), state, params)
  u2, s2 = update(_grads(1), state, params, loss=jnp.float32(1.0),
                  unrelated=3)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)
  _assert_same_signature(s1, s2)


@pytest.mark.parametrize("name", sorted(REQUIRED_EXTRA))
def test_missing_required_extra_args_is_a_sentence(name):
  tx = getattr(og, name)(**CASES[name][0])
  params = _params()
  missing = ", ".join(sorted(REQUIRED_EXTRA[name]))
  with pytest.raises(ValueError, match=rf"`{name}` needs .* {missing}="):
    tx.update(_grads(0), tx.init(params), params)


@pytest.mark.parametrize(
    "name", sorted(n for n in CASES if CASES[n][1]))
def test_inject_hyperparams(name):
  kwargs, hyper = CASES[name]
  fixed = {k: v for k, v in kwargs.items() if k not in hyper}
  factory = getattr(og, name)
  injected = _with_required_extra(name, optax.inject_hyperparams(
      factory, static_args=tuple(fixed))(**kwargs))
  plain = _make(name)  # == _with_required_extra(name, factory(**kwargs))
  params = _params()
  s_inj, s_plain = injected.init(params), plain.init(params)
  step, plain_step = jax.jit(injected.update), jax.jit(plain.update)
  for i in range(3):
    u_inj, s_inj = step(_grads(i), s_inj, params)
    u_plain, s_plain = plain_step(_grads(i), s_plain, params)
    # Injected hyperparameters are float32 arrays: `1 - b2` is then rounded
    # in float32 instead of float64 (optax's own adam differs the same way).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5),
                 u_inj, u_plain)
  # optax.tree.get finds each injected hyperparameter, and only it (a state
  # field of the same name would make it ambiguous).
  for key, value in hyper.items():
    np.testing.assert_allclose(optax.tree.get(s_inj, key), value, rtol=1e-7)
  # A changed hyperparameter takes effect without retracing.
  key = next(iter(hyper))
  s_inj.hyperparams[key] = jnp.asarray(hyper[key] * 0.5, jnp.float32)
  u_half, _ = step(_grads(9), s_inj, params)
  u_full, _ = plain_step(_grads(9), s_plain, params)
  assert not all(np.allclose(a, b) for a, b in
                 zip(jax.tree.leaves(u_half), jax.tree.leaves(u_full)))


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32
@pytest.mark.parametrize("name", sorted(CASES))
def test_inside_multi_steps_and_masked(name):
  params = _params()
  multi = optax.MultiSteps(_make(name), every_k_schedule=2)
  state = multi.init(params)
  # Jitted: eager, every op would compile and dispatch alone (each `cond`
  # anew at every call); eager use is checked by the metric-names test.
  update = jax.jit(multi.update)
  for i in range(4):
    _, state = update(_grads(i), state, params)
  _assert_holds_state(state, name)
  mask = {"Dense_0": {"kernel": True, "bias": False}, "head": True}
  masked = optax.masked(_make(name), mask)
  state = masked.init(params)
  if name == "add_gradient_norm_penalty":  # its grad_fn needs every param
    with pytest.raises(ValueError, match="inside `optax.masked`"):
      masked.update(_grads(0), state, params)
    return
  u, state = jax.jit(masked.update)(_grads(0), state, params)
  np.testing.assert_array_equal(u["Dense_0"]["bias"],
                                _grads(0)["Dense_0"]["bias"])
  _assert_holds_state(state, name)


def _assert_holds_state(tree, name):
  """The factory's state is inside `tree`, and its metrics are read."""
  camel = _camel(name)
  found = [x for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: type(x).__name__ == camel)
           if type(x).__name__ == camel]
  assert found, f"no {camel} inside {type(tree).__name__}"
  if hasattr(type(found[0]), "_og_metrics"):
    assert og.metrics(tree)


@pytest.mark.parametrize("name", sorted(CASES))
def test_metrics_read_on_the_host_have_the_dtypes_of_metrics_under_jit(name):
  tx = _make(name)
  params = _params()
  grads = _grads(0)
  grads["head"] = grads["head"].at[0].set(jnp.nan)   # every counter counts
  state = tx.init(params)
  for g in (_grads(1), grads):
    _, state = jax.jit(tx.update)(g, state, params)
  on_device = jax.jit(og.metrics)(state)
  on_host = og.metrics(jax.device_get(state))
  assert on_host.keys() == on_device.keys()
  for key, value in on_host.items():
    assert np.asarray(value).dtype == on_device[key].dtype, key
    assert np.shape(value) == on_device[key].shape, key


@pytest.mark.parametrize("name", sorted(CASES))
def test_metric_names_follow_the_convention(name):
  # Eager on purpose: the one test here that runs every update op by op.
  tx = _make(name)
  params = _params()
  _, state = tx.update(_grads(0), tx.init(params), params)
  for key in og.metrics(state):
    assert re.fullmatch(r"[a-z_0-9]+(/[A-Za-z_0-9.]+)+", key), key

"""Per-layer statistics summed into named groups (`groups=`): against NumPy on
the groups' leaves taken together, through every transformation that takes
it, with stacked layers and across devices."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og

BY_MODULE = lambda name: name.split("/")[0]  # noqa: E731


def _arrays(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0/kernel": (4, 6), "Dense_0/bias": (6,),
            "Dense_1/kernel": (6, 3), "Dense_1/bias": (3,), "head": (3, 2)}
  return {name: (rng.normal(size=shape) * scale *
                 np.exp(rng.normal(size=shape))).astype(np.float32)
          for name, shape in shapes.items()}


def _tree(a):
  return {"Dense_0": {"bias": jnp.asarray(a["Dense_0/bias"]),
                      "kernel": jnp.asarray(a["Dense_0/kernel"])},
          "Dense_1": {"bias": jnp.asarray(a["Dense_1/bias"]),
                      "kernel": jnp.asarray(a["Dense_1/kernel"])},
          "head": jnp.asarray(a["head"])}


def _by_group(a, group=BY_MODULE):
  """The groups' arrays, flattened and joined, in order of first layer."""
  out = {}
  for name in sorted(a):  # the tree's leaf order
    out.setdefault(group(name), []).append(np.ravel(a[name]))
  return {g: np.concatenate(parts).astype(np.float64)
          for g, parts in out.items()}


def _np_histogram(x):
  """Counts over og.HIST_BUCKETS: zero, decades 1e-10 .. 1e4 (outer ones
  open-ended), NaN, Inf."""
  m = np.abs(x.astype(np.float32))
  finite = np.isfinite(m) & (m > 0)
  decade = np.clip(np.floor(np.log10(np.where(finite, m, 1.0))), -10, 4)
  counts = [np.sum(m == 0)]
  counts += [np.sum(finite & (decade == k)) for k in range(-10, 5)]
  return np.array(counts + [np.sum(np.isnan(m)), np.sum(np.isinf(m))])


def _norm(x):
  return float(np.sqrt(np.sum(np.square(x))))


def test_monitor_groups_against_numpy():
  grads, params = _arrays(0, 2.0), _arrays(1)
  grads["Dense_1/bias"][1] = np.nan
  tx = og.monitor(groups=BY_MODULE, histogram=True)
  _, state = jax.jit(tx.update)(_tree(grads), tx.init(_tree(params)),
                                _tree(params))
  m = og.metrics(state)
  g, p = _by_group(grads), _by_group(params)
  assert list(g) == ["Dense_0", "Dense_1", "head"]
  assert state.layer_norms.names == ("Dense_0", "Dense_1", "head")
  for name in g:
    finite = np.isfinite(g[name]).all()
    if finite:
      np.testing.assert_allclose(m[f"grad/norm/{name}"], _norm(g[name]),
                                 rtol=1e-6)
    else:
      assert np.isnan(m[f"grad/norm/{name}"])
    np.testing.assert_allclose(m[f"grad/frac_above_1/{name}"],
                               np.mean(np.abs(g[name]) > 1), rtol=1e-6)
    assert m[f"grad/nonfinite/{name}"] == np.sum(~np.isfinite(g[name]))
    np.testing.assert_allclose(m[f"param/norm/{name}"], _norm(p[name]),
                               rtol=1e-6)
    np.testing.assert_array_equal(m[f"grad/hist/{name}"],
                                  _np_histogram(g[name]))
  assert m["grad/nonfinite"] == 1
  assert not any(k.startswith("grad/norm/Dense_0/") for k in m)


def test_groups_whose_layers_interleave_against_numpy():
  """Groups that are not runs of consecutive layers (kernels, biases)."""
  by_kind = lambda name: name.rsplit("/", 1)[-1]  # noqa: E731
  grads = _arrays(5, 3.0)
  grads["Dense_0/bias"][0] = np.inf
  tx = og.monitor(groups=by_kind, histogram=True)
  _, state = jax.jit(tx.update)(_tree(grads), tx.init(_tree(grads)))
  m = og.metrics(state)
  g = _by_group(grads, by_kind)
  assert state.layer_norms.names == ("bias", "kernel", "head")
  for name in ("kernel", "head"):
    np.testing.assert_allclose(m[f"grad/norm/{name}"], _norm(g[name]),
                               rtol=1e-6)
  assert m["grad/norm/bias"] == np.inf
  for name in g:
    assert m[f"grad/nonfinite/{name}"] == np.sum(~np.isfinite(g[name]))
    np.testing.assert_array_equal(m[f"grad/hist/{name}"],
                                  _np_histogram(g[name]))


def test_many_groups_keep_temporaries_linear_in_layers():
  """400 layers in 200 groups: summing each group's histogram through a
  `[groups, layers, buckets]` mask kept 6 MB of temporaries (67x the
  monitor without groups); a segment sum keeps about what it does."""
  params = {f"m{i % 200}/l{i}": jnp.ones((8,), jnp.float32)
            for i in range(400)}

  def temporaries(groups):
    tx = og.monitor(groups=groups, histogram=True)
    compiled = jax.jit(tx.update).lower(params, tx.init(params),
                                        params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temporaries(BY_MODULE) < 2 * temporaries(None)


def test_update_ratio_is_per_group():
  updates, params = _arrays(2, 1e-3), _arrays(3)
  tx = og.monitor(kind="update", groups=BY_MODULE)
  _, state = jax.jit(tx.update)(_tree(updates), tx.init(_tree(params)),
                                _tree(params))
  m = og.metrics(state)
  u, p = _by_group(updates), _by_group(params)
  for name in u:
    np.testing.assert_allclose(m[f"update/ratio/{name}"],
                               _norm(u[name]) / _norm(p[name]), rtol=1e-5)


def test_group_norm_does_not_overflow():
  """Each leaf's norm is finite but their squares overflow float32."""
  a = {k: np.full_like(v, 1e18) for k, v in _arrays(0).items()}
  tx = og.monitor(groups=lambda name: "all")
  _, state = tx.update(_tree(a), tx.init(_tree(a)))
  m = og.metrics(state)
  want = 1e18 * np.sqrt(sum(v.size for v in a.values()))
  np.testing.assert_allclose(m["grad/norm/all"], want, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm"], want, rtol=1e-6)


def test_skip_nonfinite_counts_per_group_and_check_names_the_group():
  grads = _arrays(4)
  grads["Dense_0/kernel"][0, :3] = np.nan
  grads["Dense_0/bias"][2] = np.inf
  grads["head"][1, 1] = np.nan
  tx = og.skip_nonfinite(optax.sgd(0.1), groups=BY_MODULE)
  params = _tree(_arrays(5))
  _, state = jax.jit(tx.update)(_tree(grads), tx.init(params), params)
  m = og.metrics(state)
  assert m["optim/last_bad_nonfinite/Dense_0"] == 4
  assert m["optim/last_bad_nonfinite/Dense_1"] == 0
  assert m["optim/last_bad_nonfinite/head"] == 1
  with pytest.raises(og.NonFiniteGradientError) as e:
    og.check(state)
  assert str(e.value) == (
      "Step 0: non-finite gradients; first bad layers: Dense_0 (4 NaN/Inf), "
      "head (1 NaN/Inf). The guard skipped the step (1 bad in a row, 1 "
      "skipped in total).")
  assert e.value.layers == {"Dense_0": 4, "head": 1}


@pytest.mark.standard_promotion  # optax.adamw's own arithmetic
@pytest.mark.parametrize("inner", [og.adamw, optax.adamw],
                         ids=["fast", "generic"])
def test_guard_groups_change_names_not_training(inner):
  """The same run grouped and not: the same parameters and decisions, and
  the grouped entries are the per-layer ones taken together."""
  runs = {}
  for groups in (None, BY_MODULE):
    tx = og.guard(inner(0.1), groups=groups, zscore=True, spike_window=8,
                  spike_warmup_steps=4)
    params = _tree(_arrays(6))
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for step in range(10):
      a = _arrays(10 + step, 50.0 if step == 7 else 1.0)
      if step == 3:
        a["Dense_1/kernel"][2, 2] = np.nan
      updates, state = update(_tree(a), state, params)
      params = optax.apply_updates(params, updates)
      history.append((params, og.metrics(state)))
    runs[groups] = history
  for step, ((p1, m1), (p2, m2)) in enumerate(zip(runs[None], runs[BY_MODULE])):
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    for name in ("optim/skipped", "optim/num_skipped", "optim/num_spikes",
                 "grad/norm", "optim/num_clipped"):
      np.testing.assert_array_equal(m1[name], m2[name], err_msg=name)
    for group, members in (("Dense_0", ("Dense_0/bias", "Dense_0/kernel")),
                           ("Dense_1", ("Dense_1/bias", "Dense_1/kernel")),
                           ("head", ("head",))):
      want = np.sqrt(sum(np.float64(m1[f"grad/norm/{k}"]) ** 2
                         for k in members))
      np.testing.assert_allclose(m2[f"grad/norm/{group}"], want, rtol=1e-6,
                                 err_msg=f"{group} at {step}")
      assert m2[f"optim/last_bad_nonfinite/{group}"] == sum(
          m1[f"optim/last_bad_nonfinite/{k}"] for k in members)
  assert runs[BY_MODULE][3][1]["optim/last_bad_nonfinite/Dense_1"] == 1
  assert runs[BY_MODULE][7][1]["optim/skipped"]
  assert "grad/zscore/Dense_1" in runs[BY_MODULE][-1][1]


def test_groups_of_stacked_layers():
  """Stacked layers split first, then grouped: one group per layer index
  across two stacked leaves."""
  rng = np.random.default_rng(7)
  kernel = rng.normal(size=(3, 4, 5)).astype(np.float32)
  bias = rng.normal(size=(3, 5)).astype(np.float32)
  kernel[2] *= 10.0
  tree = {"Scan": {"bias": jnp.asarray(bias), "kernel": jnp.asarray(kernel)}}
  tx = og.monitor(stacked=("Scan",),
                  groups=lambda name: "block_" + name.rsplit("/", 1)[1])
  _, state = tx.update(tree, tx.init(tree))
  m = og.metrics(state)
  assert state.layer_norms.names == ("block_0", "block_1", "block_2")
  for i in range(3):
    np.testing.assert_allclose(
        m[f"grad/norm/block_{i}"],
        np.sqrt(np.sum(kernel[i].astype(np.float64) ** 2) +
                np.sum(bias[i].astype(np.float64) ** 2)), rtol=1e-6)


def test_shard_map_groups_a_sharded_kernel_with_a_replicated_bias():
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  rng = np.random.default_rng(8)
  kernel = (rng.normal(size=(16, 4)) *
            (1.0 + np.arange(16) // 2)[:, None]).astype(np.float32)
  kernel[13, 1] = np.inf  # device 6's rows only
  bias = rng.normal(size=(4,)).astype(np.float32)
  head = rng.normal(size=(4, 2)).astype(np.float32)
  specs = {"layer": {"bias": P(), "kernel": P("d")}, "head": P()}
  tx = og.monitor(axis_name="d", groups=BY_MODULE, histogram=True)

  def step(grads):
    state = tx.update(grads, tx.init(grads))[1]
    return og.metrics(state)

  grads = {"layer": {"bias": bias, "kernel": kernel}, "head": head}
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  m = jax.device_get(jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(specs,), out_specs=P()))(
          jax.tree.map(put, grads, specs)))
  layer = np.concatenate([bias, kernel.ravel()]).astype(np.float64)
  assert np.isinf(m["grad/norm/layer"])
  assert m["grad/nonfinite/layer"] == 1
  np.testing.assert_array_equal(m["grad/hist/layer"], _np_histogram(layer))
  np.testing.assert_allclose(m["grad/frac_above_1/layer"],
                             np.mean(np.abs(layer) > 1), rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm/head"], _norm(head), rtol=1e-6)


def test_bad_groups_are_sentences():
  with pytest.raises(ValueError, match=(
      r"^`groups` must be None or a function from a layer name to the name "
      r"of its group \(e\.g\. lambda name: name\.split\('/'\)\[0\]\), but "
      r"got 'Dense_0'\. If you passed a function through "
      r"`optax.inject_hyperparams`, list it in its `static_args`")):
    og.guard(optax.sgd(0.1), groups="Dense_0")
  # optax's inject_hyperparams calls a function argument as a schedule.
  injected = optax.inject_hyperparams(og.guard, static_args=("spike_window",))
  with pytest.raises(ValueError, match=(
      r"but got 'all'\. If you passed a function through "
      r"`optax.inject_hyperparams`, list it in its `static_args`: optax "
      r"calls a function argument as a schedule")):
    injected(og.sgd(0.1), groups=lambda name: "all").init(_tree(_arrays(0)))
  tx = optax.inject_hyperparams(og.guard, static_args=("spike_window",
                                                       "groups"))(
      og.sgd(0.1), groups=lambda name: "all")
  state = tx.init(_tree(_arrays(0)))
  assert "grad/norm/all" in og.metrics(state)
  for groups, got in ((lambda name: len(name), "12"), (lambda name: "", "''")):
    with pytest.raises(ValueError, match=(
        r"^`groups` must return a non-empty string \(the group's name\) for "
        rf"every layer, but returned {got} for 'Dense_0/bias'\.$")):
      og.monitor(groups=groups).init(_tree(_arrays(0)))

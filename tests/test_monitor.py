"""`monitor` and `metrics` against numpy references."""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 6)) * scale,
                                            jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(6,)) * scale,
                                          jnp.float32)},
          "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(6, 2)) * scale,
                                            jnp.float32)}}


def _named_leaves(tree):
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(k.key for k in path)] = np.asarray(x, np.float64)
  return out


def test_identity_and_signals_against_numpy():
  grads, params = _tree(0, 2.0), _tree(1)
  tx = og.monitor()
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, out, grads)
  m = og.metrics(state)
  g, p = _named_leaves(grads), _named_leaves(params)
  total = np.sqrt(sum(np.sum(x * x) for x in g.values()))
  np.testing.assert_allclose(m["grad/norm"], total, rtol=1e-6)
  np.testing.assert_allclose(
      m["param/norm"], np.sqrt(sum(np.sum(x * x) for x in p.values())),
      rtol=1e-6)
  for name, x in g.items():
    np.testing.assert_allclose(m[f"grad/norm/{name}"], np.linalg.norm(x),
                               rtol=1e-6)
    np.testing.assert_allclose(m[f"grad/frac_above_1/{name}"],
                               np.mean(np.abs(x) > 1), rtol=1e-6)
    np.testing.assert_allclose(m[f"param/norm/{name}"],
                               np.linalg.norm(p[name]), rtol=1e-6)
    assert int(m[f"grad/nonfinite/{name}"]) == 0
  assert int(m["grad/nonfinite"]) == 0 and int(m["param/nonfinite"]) == 0
  every = np.concatenate([x.ravel() for x in g.values()])
  np.testing.assert_allclose(m["grad/frac_above_1"],
                             np.mean(np.abs(every) > 1), rtol=1e-6)


def _edge_grads():
  """Leaves around the threshold of `frac_above_1`, small and large (leaves
  above 2**15 elements are decided one by one, the smaller ones together)."""
  up = np.nextafter(np.float32(1), np.float32(2))   # the first float > 1.
  large_one = np.zeros(1 << 20, np.float32)
  large_one[12345] = up                    # norm just above 1: one element.
  large_below = np.full((1024, 1024), 0.999, np.float32)  # norm ~1000, none.
  return {
      "large_one": large_one,
      "large_below": large_below,
      "large_many": np.random.default_rng(3).normal(
          size=(1024, 1025)).astype(np.float32),
      "small_exact_one": np.array([1.0, -1.0, 0.0], np.float32),  # none.
      "small_up": np.array([0.0, -up], np.float32),
      "small_zero": np.zeros((5, 3), np.float32),
      "small_bf16": np.array([1.0, 1.0078125, -2.0, 0.5], jnp.bfloat16),
  }


@pytest.mark.parametrize("keep", [
    None, ["large_one"], ["large_one", "large_below", "small_exact_one"],
    ["large_many", "small_up"], ["small_bf16"], ["large_many", "small_zero"]])
def test_frac_above_1_at_the_threshold(keep):
  # The count is skipped for a leaf whose sum of squares shows it holds no
  # element above 1; whatever is skipped or counted, it equals NumPy's (an
  # all-zero leaf sends its group through the full pass).
  grads = {k: jnp.asarray(v) for k, v in _edge_grads().items()
           if keep is None or k in keep}
  tx = og.monitor()
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  m = og.metrics(state)
  for name, x in grads.items():
    expected = np.mean(np.abs(np.asarray(x, np.float32)) > 1)
    np.testing.assert_allclose(m[f"grad/frac_above_1/{name}"], expected,
                               rtol=1e-6, err_msg=name)
  every = np.concatenate([np.asarray(x, np.float32).ravel()
                          for x in grads.values()])
  np.testing.assert_allclose(m["grad/frac_above_1"],
                             np.mean(np.abs(every) > 1), rtol=1e-6)
  # Without per-layer entries the total stays.
  tx = og.monitor(per_layer=False)
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(og.metrics(state)["grad/frac_above_1"],
                             np.mean(np.abs(every) > 1), rtol=1e-6)


def test_nonfinite_counts_per_layer():
  grads = _tree(0)
  grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"].at[0, :].set(
      jnp.nan).at[1, 0].set(-jnp.inf)
  tx = og.monitor()
  _, state = tx.update(grads, tx.init(grads))
  m = og.metrics(state)
  assert int(m["grad/nonfinite/Dense_1/kernel"]) == 3
  assert int(m["grad/nonfinite/Dense_0/kernel"]) == 0
  assert int(m["grad/nonfinite"]) == 3
  assert np.isnan(m["grad/norm/Dense_1/kernel"])
  assert np.isfinite(m["grad/norm/Dense_0/kernel"])


def test_loss_ema_of_a_constant_loss_is_that_constant_near_decay_one():
  """The debiased average of a constant is the constant: its weights and its
  debiasing take one float32 decay (`1 - decay` in float64 against
  float32's decay was 1.3% off at 0.999999)."""
  grads = _tree(0)
  tx = og.monitor(loss_ema_decay=0.999999)
  step = jax.jit(lambda s: tx.update(grads, s, loss=jnp.float32(2.0))[1])
  state = tx.init(grads)
  for _ in range(200):
    state = step(state)
  np.testing.assert_allclose(og.metrics(state)["loss/ema"], 2.0, rtol=1e-5)


def test_loss_value_ema_and_nonfinite():
  grads = _tree(0)
  tx = og.monitor(loss_ema_decay=0.5)
  state = tx.init(grads)
  update = jax.jit(tx.update)
  losses = [4.0, 2.0, float("nan"), 1.0]
  ema, n = 0.0, 0
  for loss in losses:
    _, state = update(grads, state, loss=jnp.float32(loss))
    if np.isfinite(loss):
      ema, n = 0.5 * ema + 0.5 * loss, n + 1
  m = og.metrics(state)
  np.testing.assert_allclose(m["loss/ema"], ema / (1 - 0.5**n), rtol=1e-6)
  assert float(m["loss/value"]) == 1.0
  assert int(m["loss/nonfinite"]) == 1
  # `value=` (optax's line-search convention) is read too.
  _, state = update(grads, state, value=jnp.float32(7.0))
  assert float(og.metrics(state)["loss/value"]) == 7.0


def test_update_kind_records_ratio():
  updates, params = _tree(0, 1e-3), _tree(1)
  tx = og.monitor(kind="update")
  _, state = tx.update(updates, tx.init(params), params)
  m = og.metrics(state)
  u, p = _named_leaves(updates), _named_leaves(params)
  for name in u:
    np.testing.assert_allclose(m[f"update/ratio/{name}"],
                               np.linalg.norm(u[name]) / np.linalg.norm(p[name]),
                               rtol=1e-5)
  assert "grad/norm" not in m


def test_update_ratio_of_a_zero_parameter_is_inf_without_a_warning():
  # A zero-initialised bias at its first step, beside an ordinary kernel.
  params = {"bias": jnp.zeros((3,)), "kernel": jnp.ones((2, 2))}
  updates = {"bias": jnp.full((3,), 4.0), "kernel": jnp.full((2, 2), 0.5)}
  tx = og.monitor(kind="update")
  state = jax.jit(tx.update)(updates, tx.init(params), params)[1]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # numpy on the host: no overflow warning
    m = og.metrics(state)
    host = og.metrics(jax.device_get(state))
  for key in ("update/ratio", "update/ratio/bias", "update/ratio/kernel"):
    assert host[key].dtype == m[key].dtype == np.float32, key
    assert host[key] == m[key], key
  assert m["update/ratio/bias"] == np.inf
  np.testing.assert_allclose(m["update/ratio/kernel"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["update/ratio"], np.sqrt(48 + 1) / 2.0,
                             rtol=1e-6)
  zero = {"bias": jnp.zeros((3,)), "kernel": jnp.zeros((2, 2))}
  state = jax.jit(tx.update)(zero, tx.init(params), params)[1]
  assert og.metrics(state)["update/ratio/bias"] == 0.0  # 0 / 0


def test_update_ratio_is_nan_where_a_norm_is():
  """A NaN update of a zero bias is not "no update" (0), and a NaN
  parameter is not a zero one (Inf): both read NaN, on the device and on
  the host, and Inf / Inf warns of nothing."""
  params = {"bias": jnp.zeros((3,)), "kernel": jnp.array([[jnp.nan, 1.0]]),
            "big": jnp.array([jnp.inf])}
  updates = {"bias": jnp.array([jnp.nan, 0.0, 0.0]),
             "kernel": jnp.full((1, 2), 0.1), "big": jnp.array([jnp.inf])}
  tx = og.monitor(kind="update")
  state = jax.jit(tx.update)(updates, tx.init(params), params)[1]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for m in (og.metrics(state), og.metrics(jax.device_get(state))):
      assert np.isnan(m["update/ratio/bias"])
      assert np.isnan(m["update/ratio/kernel"])
      assert np.isnan(m["update/ratio/big"])     # Inf / Inf
      assert np.isnan(m["update/ratio"])


def test_params_that_do_not_match_the_updates_are_an_error():
  updates = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = og.monitor()
  state = tx.init(updates)
  with pytest.raises(ValueError, match=(
      r"`monitor` was called with 2 parameter layers but got updates with "
      r"other layers; the trees must match\. Only in the parameters: "
      r"\['c'\]; only in the updates: \['b'\]\.")):
    tx.update(updates, state, {"a": jnp.ones(2), "c": jnp.ones(3)})


def test_histogram_against_numpy():
  x = jnp.asarray([0.0, 1e-12, 3e-10, 0.05, 0.5, 2.0, 50.0, 1e6, jnp.nan,
                   jnp.inf, -jnp.inf, -0.7], jnp.float32)
  tx = og.monitor(histogram=True)
  _, state = tx.update({"w": x}, tx.init({"w": x}))
  hist = np.asarray(og.metrics(state)["grad/hist/w"])
  np.testing.assert_array_equal(hist, _np_histogram(x))
  assert hist.sum() == x.size


def _np_histogram(x):
  """Counts per decade of |x| (zero, 1e-10 ... 1e4 and above, NaN, Inf)."""
  a = np.abs(np.asarray(x, np.float64))
  want = np.zeros(len(og.HIST_BUCKETS), np.int64)
  for v in a.ravel():
    if np.isnan(v):
      want[-2] += 1
    elif np.isinf(v):
      want[-1] += 1
    elif v == 0:
      want[0] += 1
    else:
      k = int(np.clip(np.floor(np.log10(v)), -10, 4))
      want[1 + k + 10] += 1
  return want


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.int32])
def test_histogram_of_an_integer_leaf_counts_its_minimum_by_size(dtype):
  """`abs` in the integer type wraps the minimum (int8's -128) to itself:
  it was counted as zero."""
  info = jnp.iinfo(dtype)
  x = jnp.asarray([info.min, 0, 5, -7, info.max, -1], dtype)
  tx = og.monitor(histogram=True)
  _, state = jax.jit(tx.update)({"w": x}, tx.init({"w": x}))
  np.testing.assert_array_equal(og.metrics(state)["grad/hist/w"],
                                _np_histogram(x))


def test_every_gates_on_device_without_retrace():
  tx = og.monitor(every=3)
  grads = _tree(0)
  state = tx.init(grads)
  traces = 0

  @jax.jit
  def step(g, s):
    nonlocal traces
    traces += 1
    return tx.update(g, s)[1]

  seen = []
  for i in range(7):
    state = step(jax.tree.map(lambda x: x * (i + 1), grads), state)
    seen.append(float(og.metrics(state)["grad/norm"]))
  base = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                     for x in jax.tree.leaves(grads)))
  # Measured at steps 0, 3, 6 (scales 1, 4, 7), held in between.
  want = [base * s for s in (1, 1, 1, 4, 4, 4, 7)]
  np.testing.assert_allclose(seen, want, rtol=1e-6)
  assert traces == 1


def test_every_still_follows_the_loss_on_every_step():
  """The loss entries are scalars: an unmeasured step's NaN loss is counted
  and its finite losses enter the EMA (here decay 0.5, closed form)."""
  tx = og.monitor(every=3, loss_ema_decay=0.5)
  grads = _tree(0)
  state, step = tx.init(grads), jax.jit(tx.update)
  for loss in (4.0, np.nan, 2.0, 1.0):  # measured at steps 0 and 3 only
    state = step(grads, state, loss=jnp.float32(loss))[1]
  m = og.metrics(state)
  assert int(m["loss/nonfinite"]) == 1 and float(m["loss/value"]) == 1.0
  raw = ((0.5 * 4.0) * 0.5 + 0.5 * 2.0) * 0.5 + 0.5 * 1.0  # 3 finite losses
  np.testing.assert_allclose(m["loss/ema"], raw / (1 - 0.5**3), rtol=1e-6)


@pytest.mark.parametrize("histogram", [False, True])
def test_per_layer_off_keeps_globals_only(histogram):
  tx = og.monitor(per_layer=False, histogram=histogram)
  grads = _tree(0)
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[1, :2].set(
      jnp.nan).at[3, 5].set(jnp.inf)
  _, state = tx.update(grads, tx.init(grads), _tree(1))
  m = og.metrics(state)
  assert "grad/norm" in m and "param/norm" in m
  assert not any(n.startswith("grad/norm/") for n in m)
  # The global count of NaN/Inf does not depend on the per-layer entries.
  expected = sum(int(np.sum(~np.isfinite(x)))
                 for x in _named_leaves(grads).values())
  assert expected == 3 and int(m["grad/nonfinite"]) == expected
  # Switched-off parts are None, not zero-sized arrays (which XLA:CPU of
  # jax 0.11 failed to compile as `lax.scan` outputs).
  assert all(leaf.size for leaf in jax.tree.leaves(state))
  assert any(n.startswith("grad/hist/") for n in m) == histogram


def test_two_monitors_do_not_collide():
  grads = _tree(0, 5.0)
  tx = optax.chain(og.monitor(), og.clip_by_global_norm(1.0), og.monitor(),
                   og.monitor(prefix="post/"))
  _, state = tx.update(grads, tx.init(grads))
  m = og.metrics(state)
  # In chain order: the first monitor keeps the plain name, the clip's
  # pre-clip norm gets ".1", the second monitor ".2", its layers too.
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                     for x in jax.tree.leaves(grads)))
  np.testing.assert_allclose(m["grad/norm"], want, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm.1"], want, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm.2"], 1.0, rtol=1e-6)
  layers = [k for k in m if k.startswith("grad/norm/")]
  assert layers and all(f"grad/norm.2/{k[10:]}" in m for k in layers)
  assert not any(f"grad/norm.1/{k[10:]}" in m for k in layers)
  np.testing.assert_allclose(m["post/grad/norm"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm_clipped"], 1.0, rtol=1e-6)
  # A prefix without a trailing "/" joins the name's first component: the
  # repeat number still goes after the metric, not into the layer's path.
  tx = optax.chain(og.monitor(prefix="pre"), og.monitor(prefix="pre"))
  _, state = tx.update(grads, tx.init(grads))
  m = og.metrics(state)
  assert layers and all(f"pregrad/norm.1/{k[10:]}" in m for k in layers)
  assert "pregrad/norm.1" in m and "pregrad/norm" in m
  # A monitor after a clip: its whole metric is renamed, layers included.
  tx = optax.chain(og.clip_by_global_norm(1.0), og.monitor())
  _, state = tx.update(grads, tx.init(grads))
  m = og.metrics(state)
  np.testing.assert_allclose(m["grad/norm"], want, rtol=1e-6)   # the clip's
  np.testing.assert_allclose(m["grad/norm.1"], 1.0, rtol=1e-6)
  assert layers and all(f"grad/norm.1/{k[10:]}" in m and k not in m
                        for k in layers)


def test_a_collection_and_a_layer_of_one_name_keep_apart():
  # Dropping the `params` collection from names would call both leaves
  # `w`, and one's metrics would replace the other's: they keep it instead.
  rng = np.random.default_rng(7)
  grads = {"params": {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
           "w": jnp.asarray(rng.normal(size=(5,)) * 10, jnp.float32),
           "Dense_0": {"kernel": jnp.ones((2, 2), jnp.float32)}}
  tx = og.monitor()
  _, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
  m = og.metrics(state)
  want = {"params/w": grads["params"]["w"], "w": grads["w"],
          "Dense_0/kernel": grads["Dense_0"]["kernel"]}
  assert sorted(k for k in m if k.startswith("grad/norm/")) == sorted(
      f"grad/norm/{name}" for name in want)
  for name, x in want.items():
    np.testing.assert_allclose(
        m[f"grad/norm/{name}"],
        np.sqrt(np.sum(np.square(np.asarray(x, np.float64)))), rtol=1e-6)


def test_a_leaf_keeps_its_name_in_a_part_that_hides_its_twin():
  """The collection is kept or dropped by the whole tree: a part of
  `multi_transform` sees `params/w` without the top-level `w` (a
  `MaskedNode`), and had named it `w`, the other leaf's name: its norm was
  filed under `w`, and `og.check` named `w` for a NaN in `params/w`. The
  same for `stacked=`, which refused the name the metrics use."""
  params = {"params": {"w": jnp.array([3.0, 4.0])}, "w": jnp.array([1.0, 0.0])}
  labels = {"params": {"w": "guarded"}, "w": "plain"}
  tx = optax.chain(og.monitor(), optax.multi_transform(
      {"guarded": og.guard(optax.sgd(0.1)), "plain": optax.sgd(0.1)}, labels))
  _, state = tx.update(params, tx.init(params), params)
  m = og.metrics(state)
  np.testing.assert_allclose(m["grad/norm.1/params/w"], 5.0, rtol=1e-6)
  assert "grad/norm.1/w" not in m
  grads = {"params": {"w": jnp.array([jnp.nan, 1.0])}, "w": jnp.ones(2)}
  _, state = tx.update(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError) as e:
    og.check(state)
  assert e.value.layers == {"params/w": 1}
  stacked = {"params": {"w": jnp.ones((3, 2))}, "w": jnp.ones(2)}
  names = og.metrics(og.monitor(stacked=("params/w",)).init(stacked))
  assert sorted(k for k in names if k.startswith("grad/norm/")) == [
      "grad/norm/params/w/0", "grad/norm/params/w/1", "grad/norm/params/w/2",
      "grad/norm/w"]


def test_two_leaves_writing_one_name_is_an_error():
  tree = {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}}
  with pytest.raises(ValueError,
                     match=r"Two parameter layers are both named 'a/b', so "
                     r"their metrics would share one entry; .* rename the "
                     r"key that contains a '/'"):
    og.monitor().init(tree)


def test_metrics_names_nested_and_named_chain():
  grads = _tree(0)
  tx = optax.named_chain(
      ("watch", og.monitor()),
      ("inner", optax.chain(og.clip_by_layer_norm(1.0),
                            optax.masked(og.clip_by_value(0.1),
                                         {"Dense_0": {"kernel": True,
                                                      "bias": False},
                                          "Dense_1": {"kernel": False}}))))
  _, state = tx.update(grads, tx.init(grads))
  m = og.metrics(state)
  assert {"grad/norm", "grad/norm/Dense_0/kernel", "grad/norm.1/Dense_0/kernel",
          "optim/layers_clipped", "grad/frac_clipped"} <= set(m)


def test_repeated_names_are_numbered_in_chain_order():
  """A later state's repeats get a higher number than any earlier state's,
  even where a lower one is free for its own names."""
  grads = _tree(0)
  params = jax.tree.map(lambda g: g + 1.0, grads)
  tx = optax.chain(og.monitor(), og.clip_by_global_norm(1.0), og.monitor(),
                   optax.sgd(0.1), og.monitor(kind="update"))
  _, state = tx.update(grads, tx.init(params), params)
  m = og.metrics(state)
  # The clip takes `grad/norm.1`; the second monitor is the second repeat
  # of `grad/norm` and takes `.2` for all its names; the update monitor
  # repeats only `param/norm`, after `.2`.
  assert {"grad/norm.1", "grad/norm.2", "param/norm.2",
          "param/norm.3"} <= set(m)
  assert "param/norm.1" not in m and "grad/norm.3" not in m
  want = np.sqrt(sum(np.sum(np.asarray(p) ** 2)
                     for p in jax.tree.leaves(params)))
  for name in ("param/norm", "param/norm.2", "param/norm.3"):
    np.testing.assert_allclose(m[name], want, rtol=1e-6)


def test_a_total_is_never_another_states_layers_total():
  """A state whose metric another state gave per layer is renamed: the
  global clip's `grad/norm` (after the layer clip) is not the total of the
  layer clip's `grad/norm/<layer>`, nor zclip's global `grad/zscore` one of
  the monitor's per-layer z-scores."""
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  grads = {"a": jnp.full(2, 3.0), "b": jnp.full(2, 4.0)}
  tx = optax.chain(og.clip_by_layer_norm(1.0), og.clip_by_global_norm(1.0),
                   optax.sgd(0.1))
  _, state = tx.update(grads, tx.init(params), params)
  m = og.metrics(state)
  assert "grad/norm" not in m
  np.testing.assert_allclose(  # each layer's norm before its clip
      [m["grad/norm/a"], m["grad/norm/b"]],
      [np.hypot(3.0, 3.0), np.hypot(4.0, 4.0)], rtol=1e-6)
  # After the layer clip each layer has norm 1: the global clip saw sqrt(2).
  np.testing.assert_allclose(m["grad/norm.1"], np.sqrt(2.0), rtol=1e-6)
  # Layers beside layers (two partitions) stay one view.
  tx = optax.multi_transform(
      {"x": og.clip_by_layer_norm(1.0), "y": og.clip_by_layer_norm(1.0)},
      {"a": "x", "b": "y"})
  _, state = tx.update(grads, tx.init(params), params)
  assert sorted(k for k in og.metrics(state) if k.startswith("grad/norm")) == [
      "grad/norm/a", "grad/norm/b"]
  tx = optax.chain(og.monitor(zscore=True), og.zclip(warmup_steps=2),
                   optax.sgd(0.1))
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(grads, state, params)
  zscores = sorted(k for k in og.metrics(state) if "zscore" in k)
  assert zscores == ["grad/zscore.1", "grad/zscore/a", "grad/zscore/b"]


def test_metrics_inside_jit_on_host_and_one_transfer():
  grads = _tree(0)
  tx = optax.chain(og.monitor(), og.clip_by_global_norm(1.0))

  @jax.jit
  def step(g, s):
    _, s = tx.update(g, s)
    return s, og.metrics(s)

  state, inside = step(grads, tx.init(grads))
  outside = og.metrics(state)
  host = og.metrics(jax.device_get(state))
  fetched = jax.device_get(outside)
  assert set(inside) == set(outside) == set(host)
  for k in inside:
    np.testing.assert_array_equal(inside[k], outside[k])
    np.testing.assert_array_equal(host[k], fetched[k])
    assert isinstance(fetched[k], (np.ndarray, np.generic))


@pytest.mark.parametrize("kwargs,match", [
    ({"every": 0}, r"`every` must be an integer >= 1, but got 0\."),
    ({"kind": "grads"}, r"`kind` must be one of 'grad', 'update', but got "
     r"'grads'\."),
    ({"loss_ema_decay": 1.0}, r"`loss_ema_decay` must be a finite real "
     r"number >= 0 and < 1, but got 1\.0\."),
    ({"prefix": 3}, r"`prefix` must be a string, but got 3\."),
    ({"histogram": "no"}, r"^`histogram` must be True or False, but got "
     r"'no'\.$"),
    ({"every": 10**10}, r"^`every` must be an integer >= 1, but got "
     r"10000000000\. It is compared with int32 counters"),
    ({"zscore_decay": 1.0}, r"`zscore_decay` must be a finite real number "
     r"> 0 and < 1, but got 1\.0\."),
    ({"zscore_decay": 0.0}, r"`zscore_decay` must be a finite real number "
     r"> 0 and < 1, but got 0\.0\."),
    # 1 in float32, where the averages are taken (their debiasing was 0).
    ({"loss_ema_decay": 0.99999999}, r"^`loss_ema_decay` must be a finite "
     r"real number >= 0 and < 1, but got 0\.99999999\. It rounds to 1 in "
     r"float32, the dtype it is computed in\.$"),
    ({"zscore_decay": 1 - 1e-10}, r"^`zscore_decay` must be a finite real "
     r"number > 0 and < 1, but got 0\.9999999999\. It rounds to 1 in "
     r"float32"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    og.monitor(**kwargs)


@pytest.mark.parametrize("factory", [
    og.monitor, lambda: og.clip_by_layer_norm(1.0), og.zero_nonfinite,
    lambda: og.skip_nonfinite(optax.sgd(0.1))])
def test_updates_that_do_not_match_the_parameters(factory):
  params = _tree(0)
  tx = factory()
  state = tx.init(params)
  fewer = {"Dense_0": params["Dense_0"]}
  with pytest.raises(ValueError, match=(
      r"was initialised with 3 parameter layers but got updates with 2; the "
      r"trees must match\. Only in the parameters: \['Dense_1/kernel'\]; "
      r"only in the updates: none\.")):
    tx.update(fewer, state, fewer)
  # As many layers, one renamed: its values would carry another's name.
  renamed = {"Dense_0": params["Dense_0"],
             "Dense_2": params["Dense_1"]}
  with pytest.raises(ValueError, match=(
      r"was initialised with 3 parameter layers but got updates with other "
      r"layers; the trees must match\. Only in the parameters: "
      r"\['Dense_1/kernel'\]; only in the updates: \['Dense_2/kernel'\]\.")):
    tx.update(renamed, state, renamed)


# --------------------------------------------------- per-layer z-scores


def _np_zscores(norms, decay):
  """Each layer's norm against an EMA of its own history, written out in
  float64. A norm of 0 stays out of a layer's history, which starts at its
  first non-zero norm; its z-score
  is 0 until ceil(1/(1-decay)) finite steps are in its history, and the
  spike layer is the largest z-score among the layers past that (or
  non-finite), -1 while none is; a norm enters the history clipped at 3
  spreads above the mean, the spread being the EMA standard deviation
  floored at a thousandth of the mean (in the warm-up at 10 times the
  mean); a layer's first non-zero norm starts its EMAs as it is; the
  variance saturates at float32's largest value; a non-finite layer scores
  +Inf and its step leaves every history alone."""
  warmup = int(np.ceil(round(1.0 / (1.0 - decay), 9)))  # 0.8: 5, not 6
  count = len(norms[0])
  mean, var = np.zeros(count), np.zeros(count)
  steps, out = np.zeros(count, int), []
  for x in norms:
    ready = steps >= warmup
    spread = np.maximum(np.sqrt(var), 1e-3 * np.abs(mean))
    with np.errstate(divide="ignore", invalid="ignore"):
      z = np.where(np.isfinite(x), np.where(ready, (x - mean) / spread, 0.0),
                   np.inf)
    candidates = np.where(ready | ~np.isfinite(x), z, -np.inf)
    out.append((z, int(np.argmax(candidates)) if ready.any() else -1))
    if not np.all(np.isfinite(x)):
      continue
    first = steps == 0
    value = np.minimum(x, np.where(
        first, np.inf, np.where(ready, mean + 3.0 * spread, 10.0 * mean)))
    delta = value - mean
    learn = x > 0
    mean = np.where(~learn, mean, np.where(
        first, value, mean + (1.0 - decay) * delta))
    var = np.where(~learn, var, np.where(first, 0.0, np.minimum(
        decay * (var + (1.0 - decay) * delta * delta),
        np.finfo(np.float32).max)))
    steps = np.where(learn, steps + 1, steps)
  return out


@pytest.mark.parametrize("decay, span", [(0.8, 5), (0.99, 100)])
@pytest.mark.parametrize("injected", [False, True])
def test_zscore_warm_up_lasts_the_span_as_written(decay, span, injected):
  """ceil(1 / (1 - decay)) finite steps, as the decay is written (1 / 0.2
  is 5.000000000000001 in float64, and 0.99 is 0.99000001 in float32):
  also with the decay traced by `inject_hyperparams`."""
  if injected:
    tx = optax.inject_hyperparams(og.monitor, static_args=(
        "zscore", "every"))(zscore=True, zscore_decay=decay)
  else:
    tx = og.monitor(zscore=True, zscore_decay=decay)
  params = {"w": jnp.zeros(3)}
  state, step = tx.init(params), jax.jit(tx.update)
  layers = []
  for t in range(span + 1):
    _, state = step({"w": jnp.full(3, 1.0 + 0.1 * (t % 3))}, state)
    layers.append(int(og.metrics(state)["grad/spike_layer"]))
  assert layers == [-1] * span + [0]


def test_zscores_and_spike_layer_against_numpy():
  decay = 0.8  # warm-up: ceil(1 / 0.2) = 5 finite steps
  rng = np.random.default_rng(3)
  tx = og.monitor(zscore=True, zscore_decay=decay)
  params = _tree(0)
  names = list(_named_leaves(params))
  state = tx.init(params)
  step = jax.jit(tx.update)
  norms, got = [], []
  for t in range(30):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) *
                              np.exp(rng.normal(0, 0.1)), jnp.float32),
        params)
    if t < 3:  # a layer initialised to 0: its first gradients are 0
      grads["Dense_0"]["kernel"] = jnp.zeros_like(grads["Dense_0"]["kernel"])
    if t == 2:  # a huge step in the warm-up, kept from swamping the history
      grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"] * 1e25
    if t == 12:  # the same layer spikes after the warm-up
      grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"] * 40.0
    if t == 20:  # a NaN step: +Inf for that layer, the history unchanged
      grads["Dense_0"]["bias"] = grads["Dense_0"]["bias"].at[2].set(jnp.nan)
    _, state = step(grads, state)
    g = _named_leaves(grads)
    norms.append(np.array([np.sqrt(np.sum(g[n] ** 2)) for n in names]))
    m = og.metrics(state)
    got.append((np.array([m[f"grad/zscore/{n}"] for n in names]),
                int(m["grad/spike_layer"])))
  want = _np_zscores(norms, decay)
  for t, ((z, layer), (wz, wlayer)) in enumerate(zip(got, want)):
    np.testing.assert_allclose(z, wz, rtol=1e-4, atol=1e-4,
                               err_msg=f"step {t}")
    assert layer == wlayer, t
  assert [layer for _, layer in got[:5]] == [-1] * 5 and got[5][1] >= 0
  assert got[12][1] == names.index("Dense_1/kernel")
  assert got[12][0][names.index("Dense_1/kernel")] > 20
  assert np.all(np.isfinite(np.asarray(state.zscores.var)))
  # The layer that started at 0 is measured like the others afterwards.
  zero_start = names.index("Dense_0/kernel")
  assert all(abs(z[zero_start]) < 10 for z, _ in got[5:12])
  assert got[20][1] == names.index("Dense_0/bias")
  assert got[20][0][names.index("Dense_0/bias")] == np.inf


def _run_two_layers(steps, decay, seed, edit):
  """A z-scoring monitor over layers a and b (64 unit normals each, changed
  by `edit(t, grads)`), checked step by step against `_np_zscores`;
  returns each step's (z-scores of a and b, spike layer)."""
  rng = np.random.default_rng(seed)
  tx = og.monitor(zscore=True, zscore_decay=decay)
  state = tx.init({"a": jnp.ones(64), "b": jnp.ones(64)})
  step = jax.jit(tx.update)
  norms, got = [], []
  for t in range(steps):
    grads = {k: rng.normal(size=64).astype(np.float32) for k in "ab"}
    edit(t, grads)
    _, state = step(grads, state)
    norms.append(np.array([np.linalg.norm(grads[k]) for k in "ab"]))
    m = og.metrics(state)
    got.append((np.array([m["grad/zscore/a"], m["grad/zscore/b"]]),
                int(m["grad/spike_layer"])))
  for t, ((z, layer), (wz, wlayer)) in enumerate(
      zip(got, _np_zscores(norms, decay))):
    np.testing.assert_allclose(z, wz, rtol=1e-4, atol=1e-4,
                               err_msg=f"step {t}")
    assert layer == wlayer, t
  return got


def test_a_layer_that_starts_late_warms_up_on_its_own():
  """A layer frozen (zero gradients) until after the others' warm-up is
  scored against its own history only once that holds a warm-up's worth of
  steps: not against a mean of 0 (+Inf), nor a variance of one sample."""
  decay, warmup, late = 0.97, 34, 40

  def frozen_until_late(t, grads):
    if t < late:
      grads["b"] = np.zeros(64, np.float32)

  got = _run_two_layers(late + warmup + 30, decay, 0, frozen_until_late)
  z_b = np.array([z[1] for z, _ in got])
  assert np.all(z_b[:late + warmup] == 0)
  assert all(layer == 0 for _, layer in got[warmup:late + warmup])
  # Drawn like a's, b then scores as a did after its own warm-up (on the
  # old code: +Inf at its first step, and up to 39 in the next ten).
  z_a = np.array([z[0] for z, _ in got])
  first_b = np.abs(z_b[late + warmup:late + warmup + 30])
  first_a = np.abs(z_a[warmup:warmup + 30])
  assert 0 < first_b.max() < 2 * first_a.max() < 12


def test_a_layer_frozen_mid_run_is_scored_against_its_history_before():
  """A layer frozen (zero gradients) for 150 steps mid-run, then trained
  again at its old scale, is no spike: the zeros stay out of its EMAs (they
  pulled its mean towards 0, and it scored 17 on return, above the layer
  that truly spiked, which `og.check` then missed)."""

  def frozen_mid_run(t, grads):
    if 100 <= t < 250:
      grads["b"] = np.zeros(64, np.float32)
    if t == 250:
      grads["a"] = grads["a"] * 2.5  # the true spike, as b returns

  got = _run_two_layers(260, 0.97, 1, frozen_mid_run)
  assert got[250][1] == 0 and got[250][0][0] > 3
  assert np.all(np.abs([z[1] for z, _ in got[250:]]) < 4)


def _one_layer_spikes_at_step_39(tx, params, at=39):
  """40 steps of unit-normal gradients; at the last, one small layer x100."""
  state = tx.init(params)
  step = jax.jit(tx.update)
  rng = np.random.default_rng(4)
  for t in range(at + 1):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                               jnp.float32), params)
    if t == at:
      grads["Dense_0"]["bias"] = grads["Dense_0"]["bias"] * 100.0
    _, state = step(grads, state, params)
  return state


def test_zscores_name_the_spiking_layer_in_check():
  params = _tree(0)
  state = zscored = _one_layer_spikes_at_step_39(
      og.guard(optax.sgd(0.1), zscore=True, spike_window=16), params)
  m = og.metrics(state)
  z = float(m["grad/zscore/Dense_0/bias"])
  # The numbers in the message, against the same gradients in numpy: the
  # norms of the 16 accepted steps before, their mean and population std.
  rng = np.random.default_rng(4)
  norms = []
  for t in range(40):
    leaves = [rng.normal(size=np.shape(p)) for p in jax.tree.leaves(params)]
    if t == 39:
      bias = jax.tree_util.tree_flatten_with_path(params)[0]
      at = [i for i, (path, _) in enumerate(bias)
            if jax.tree_util.keystr(path) == "['Dense_0']['bias']"][0]
      leaves[at] = leaves[at] * 100.0
    norms.append(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))
  window = np.asarray(norms[23:39])
  np.testing.assert_allclose(m["grad/norm"], norms[39], rtol=1e-5)
  np.testing.assert_allclose(m["grad/spike_mean"], window.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["grad/spike_std"], window.std(), rtol=1e-4)
  np.testing.assert_allclose(m["grad/spike_threshold"],
                             window.mean() + 6.0 * window.std(), rtol=1e-5)
  with pytest.raises(og.GradientExplosionError) as e:
    og.check(state)
  assert str(e.value) == (
      f"Step 39: the gradient norm {float(m['grad/norm']):.4g} exceeded the "
      f"spike threshold {float(m['grad/spike_threshold']):.4g} "
      f"({(float(m['grad/norm']) - float(m['grad/spike_mean'])) / float(m['grad/spike_std']):.3g} "
      "standard deviations above its recent mean "
      f"{float(m['grad/spike_mean']):.4g}); the layer that moved most against its "
      f"own history: Dense_0/bias (z-score {z:.3g}). The guard skipped the "
      "step (1 spike in a row, 1 in total).")
  assert e.value.step == 39 and e.value.layers == {"Dense_0/bias": z}
  # Before the z-scores' warm-up (ceil(1 / (1 - 0.97)) = 34 finite steps)
  # ends, the message says why it names no layer.
  early = _one_layer_spikes_at_step_39(
      og.guard(optax.sgd(0.1), zscore=True, spike_window=16), params, at=20)
  with pytest.raises(og.GradientExplosionError, match=re.escape(
      "; the per-layer z-scores cannot name a layer yet (they were still "
      "warming up, after 20 finite steps). The guard skipped")) as e:
    og.check(early)
  assert e.value.layers == {}
  # The same run through the separate pieces names the layer too.
  state = _one_layer_spikes_at_step_39(
      optax.chain(og.monitor(zscore=True),
                  og.skip_spikes(optax.sgd(0.1), window=16)), params)
  with pytest.raises(og.GradientExplosionError,
                     match="moved most against its own history: Dense_0/bias"):
    og.check(state)
  # Without z-scores the message has no layer.
  state = _one_layer_spikes_at_step_39(
      og.guard(optax.sgd(0.1), spike_window=16), params)
  with pytest.raises(og.GradientExplosionError) as e:
    og.check(state)
  assert "moved most" not in str(e.value)
  # Nor when no layer rose against its history (every z-score <= 0, as
  # after a history that a huge early step inflated): the argmax of such
  # scores names no culprit. The state of the first run above: the same
  # guard and the same 40 steps (deterministic, no buffer donated), not run
  # and compiled a second time.
  state = zscored
  zs = state.monitor.zscores
  flat = zs._replace(zscores=dataclasses.replace(
      zs.zscores, values=-jnp.abs(zs.zscores.values)))
  with pytest.raises(og.GradientExplosionError) as e:
    og.check(state._replace(monitor=state.monitor._replace(zscores=flat)))
  assert "moved most" not in str(e.value)


def test_check_reads_a_monitor_only_for_the_steps_it_measured():
  """`every=3`: a NaN at step 0 is reported after step 0, and the clean,
  unmeasured steps 1 and 2 do not repeat it."""
  tx = optax.chain(og.monitor(every=3), optax.sgd(0.1))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for step, g in enumerate([[1.0, np.nan], [1.0, 1.0], [1.0, 1.0]]):
    _, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    if step == 0:
      with pytest.raises(og.NonFiniteGradientError, match=r"^Step 0: "):
        og.check(state)
    else:
      og.check(state)


def test_check_raises_on_a_nan_loss_seen_by_a_monitor_alone():
  """Finite gradients, NaN loss: the monitor counts it and `og.check` says
  it; with a skip in the chain, the skip reports it (with what it did)."""
  params = {"w": jnp.ones(2)}
  grads = {"w": jnp.ones(2)}
  tx = optax.chain(og.monitor(every=3), optax.sgd(0.1))
  state = tx.init(params)
  for loss in (1.0, np.nan):   # step 1 is a step the monitor does not measure
    _, state = tx.update(grads, state, params, loss=jnp.float32(loss))
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "Step 1: the loss is nan. Nothing in this chain skips such a step "
      "unless a `skip_nonfinite` or `guard` given `loss=` stands around the "
      "optimizer.")):
    og.check(state)
  _, state = tx.update(grads, state, params, loss=jnp.float32(2.0))
  og.check(state)     # the next, finite loss
  tx = optax.chain(og.monitor(), og.skip_nonfinite(optax.sgd(0.1)))
  _, state = tx.update(grads, tx.init(params), params,
                       loss=jnp.float32(np.inf))
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"^Step 0: non-finite loss"):
    og.check(state)


def _head_out_spikes_last(tx, params, steps, rng):
  """`steps` steps of unit-normal gradients; at the last, `head/out` x100."""
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                               jnp.float32), params)
    if step == steps - 1:
      grads["head"]["out"] = grads["head"]["out"] * 100.0
    _, state = update(grads, state, params)
  return state


def test_a_spike_in_a_layer_still_warming_up_names_no_other_layer():
  """A layer frozen (zero gradients) for 60 steps wakes up at 50 times the
  others' norm and the guard skips the step: its history is still warming
  up, so no z-score can name it, and the message does not name a layer
  whose z-score is noise-sized; it says which layer it cannot score."""
  rng = np.random.default_rng(0)
  params = {"a": jnp.ones(64), "b": jnp.ones(64), "c": jnp.ones(64)}
  tx = og.guard(og.sgd(0.01), zscore=True, spike_window=32)
  state, step = tx.init(params), jax.jit(tx.update)
  for t in range(61):
    grads = {k: rng.normal(size=64).astype(np.float32) for k in "abc"}
    grads["b"] = grads["b"] * (50.0 if t == 60 else 0.0)
    _, state = step(grads, state, params)
  m = og.metrics(state)
  assert bool(m["optim/skipped"]) and float(m["grad/zscore/b"]) == 0.0
  z = {k: float(m[f"grad/zscore/{k}"]) for k in "ac"}
  top = max(z, key=z.get)
  assert int(m["grad/spike_layer"]) == "abc".index(top) and z[top] < 3
  with pytest.raises(og.GradientExplosionError) as e:
    og.check(state)
  assert (f"; no layer rose clearly against its own history (the largest "
          f"z-score is {top}'s, {z[top]:.3g}), but the per-layer z-scores "
          "cannot name a layer whose history began later and is still "
          "warming up: b. The guard skipped") in str(e.value)
  assert e.value.layers == {}


def test_spike_layer_is_renamed_with_the_zscores_it_indexes():
  """zclip's total `grad/zscore` ahead of a monitor's per-layer z-scores:
  the monitor's are renamed `grad/zscore.1/<layer>`, and its spike layer,
  an index into them, must be `grad/spike_layer.1` with them (it kept the
  plain name, beside no `grad/zscore/<layer>` to index)."""
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = optax.chain(og.zclip(warmup_steps=2), og.monitor(zscore=True),
                   optax.sgd(0.1))
  state = tx.init(params)
  for scale in (1.0, 1.1, 0.9):
    _, state = tx.update(jax.tree.map(lambda x: x * scale, params), state,
                         params)
  m = og.metrics(state)
  assert m["grad/zscore"].shape == ()  # zclip's
  assert [k for k in m if "zscore." in k] == ["grad/zscore.1/a",
                                               "grad/zscore.1/b"]
  assert "grad/spike_layer.1" in m and "grad/spike_layer" not in m


def test_a_spike_is_named_from_its_own_guard_and_measured_step():
  """Two guards in a multi_transform: the second skips a spike in `head/out`,
  and the message takes the layer from that guard's z-scores, not from the
  first guard's; a monitor that did not measure the spike step names none."""
  params = {"body": {"embed": jnp.ones(8), "mid": jnp.ones(8)},
            "head": {"bias": jnp.ones(4), "out": jnp.ones(4)}}
  kw = dict(zscore=True, zscore_decay=0.8, spike_window=16)
  labels = {"body": {"embed": "body", "mid": "body"},
            "head": {"bias": "head", "out": "head"}}
  tx = optax.multi_transform({"body": og.guard(og.sgd(0.1), **kw),
                              "head": og.guard(og.sgd(0.1), **kw)}, labels)
  rng = np.random.default_rng(0)
  state = _head_out_spikes_last(tx, params, 60, rng)
  with pytest.raises(og.GradientExplosionError,
                     match="moved most against its own history: head/out "):
    og.check(state)
  # In the metrics, each guard's spike layer indexes its own z-scores,
  # which are renamed with it (merged with the first guard's, index 1 of
  # `grad/zscore/<layer>` was body/mid).
  m = og.metrics(state)
  head = [k for k in m if k.startswith("grad/zscore.1/")]
  assert head == ["grad/zscore.1/head/bias", "grad/zscore.1/head/out"]
  assert head[int(m["grad/spike_layer.1"])] == "grad/zscore.1/head/out"
  body = [k for k in m if k.startswith("grad/zscore/")]
  assert body == ["grad/zscore/body/embed", "grad/zscore/body/mid"]
  # A monitor measuring every other step did not see step 39.
  chain = optax.chain(og.monitor(zscore=True, every=2),
                      og.skip_spikes(optax.sgd(0.1), window=16))
  state = _head_out_spikes_last(chain, params, 40, rng)
  with pytest.raises(og.GradientExplosionError) as e:
    og.check(state)
  assert "moved most" not in str(e.value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", ["vector", "scalar"])
def test_histogram_counts_a_subnormal_once_as_zero(dtype, shape):
  """XLA may flush a subnormal to zero in one comparison and not in another
  (a scalar leaf was counted in both the zero and the first bucket): every
  subnormal counts as zero, under jit and eagerly alike."""
  tiny = float(jnp.finfo(dtype).tiny) / 4  # subnormal in `dtype`
  values = [tiny, 1.0, 0.0, -tiny] if shape == "vector" else tiny
  grads = {"w": jnp.asarray(values, dtype)}
  tx = og.monitor(histogram=True)
  zero, one = og.HIST_BUCKETS.index("zero"), og.HIST_BUCKETS.index("1e0")
  want = np.zeros(len(og.HIST_BUCKETS), np.int64)
  want[zero], want[one] = (3, 1) if shape == "vector" else (1, 0)
  for update in (jax.jit(tx.update), tx.update):
    _, state = update(grads, tx.init(grads))
    np.testing.assert_array_equal(og.metrics(state)["grad/hist/w"], want)


@pytest.mark.parametrize("who", ["skip_nonfinite", "skip_spikes", "guard"])
def test_a_gradient_monitor_inside_a_skip_is_warned_of(who):
  """Inside, its statistics are rolled back on exactly the skipped steps."""
  params = {"w": jnp.ones(2)}
  wrap = getattr(og, who)
  inner = optax.chain(og.monitor(), optax.sgd(0.1))
  advice = ("leave it out \\(the guard's own monitor measures the gradients "
            "first\\)" if who == "guard" else
            rf"put it ahead of the wrapper, `optax.chain\(og.monitor\(\), "
            rf"og.{who}\(...\)\)`")
  with pytest.warns(UserWarning, match=(
      rf"^`{who}` wraps an `og.monitor` of the gradients, whose statistics "
      r"it rolls back with the rest of its inner state on a skipped step, so "
      rf"the monitor shows nothing of the steps it is there for: {advice}\.$")):
    wrap(inner).init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # ahead of it, or measuring updates: quiet
    optax.chain(og.monitor(), wrap(optax.sgd(0.1))).init(params)
    wrap(optax.chain(optax.sgd(0.1), og.monitor(kind="update"))).init(params)
  # Said once, of the innermost wrapper, and pointing at the caller's line
  # through optax's chain.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    optax.chain(og.skip_spikes(og.skip_nonfinite(inner))).init(params)
  assert len(caught) == 1 and caught[0].filename == __file__
  assert "`skip_nonfinite` wraps an `og.monitor`" in str(caught[0].message)
  if who != "guard":  # (a guard inside a guard is refused)
    with pytest.warns(UserWarning, match=(
        rf"^`{who}` wraps an `og.guard`, whose own monitor it rolls back "
        r".*: put the guard outside: it skips NaN/Inf and spikes itself "
        r"\(`skip_nonfinite=`, `spike_sigma=`\)\.$")):
      wrap(og.guard(optax.sgd(0.1))).init(params)


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.parametrize("make", [
    lambda: optax.chain(og.monitor(), optax.adam(1e-3)),
    lambda: og.guard(og.adam(1e-3), max_norm=None, skip_nonfinite=False,
                     spike_sigma=None),
], ids=["monitor", "guard that only monitors"])
def test_gradients_computed_in_the_step_keep_no_parameter_copy(make):
  """With the gradients computed in the step, the backward pass reads each
  kernel for the gradient of the layers below it; a monitor that measured
  without clipping left that read unordered before the kernel's in-place
  update, and XLA copied the donated kernel (4 MB here), which bare Adam
  does not."""
  rng = np.random.default_rng(0)
  sizes = [16, 128, 8192, 16]
  params = {f"Dense_{i}": {
      "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
      "bias": jnp.zeros((b,), jnp.float32)}
            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
  x = jnp.asarray(rng.normal(size=(16, sizes[0])), jnp.float32)

  def loss(p):
    h = x
    for i in range(len(sizes) - 1):
      h = jnp.tanh(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
    return jnp.mean(h ** 2)

  kernel_bytes = 128 * 8192 * 4
  assert (_temporaries_with_grads_in_step(make(), params, loss) -
          _temporaries_with_grads_in_step(optax.adam(1e-3), params, loss)
          ) < kernel_bytes // 4


def _temporaries_with_grads_in_step(tx, params, loss):
  """Bytes of temporaries of a donated step that takes `jax.grad(loss)`."""
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.parametrize("ours,theirs", [
    (lambda: og.clip_by_value(1.0), lambda: optax.clip(1.0)),
    (og.zero_nonfinite, optax.zero_nans)], ids=["clip_by_value", "zero"])
def test_gradients_computed_in_the_step_are_not_all_kept_alive(ours, theirs):
  """With the gradients computed in the step, each block's conditional
  (whether to re-read it for NaN/overflow) waited for every block's sum, so
  every gradient leaf stayed alive at once: 3.3 MiB of temporaries against
  optax's 0.6 MiB for 3 MiB of parameters; deciding each block from its own
  sum keeps about one leaf more than optax."""
  rng = np.random.default_rng(0)
  params = {f"l{i:02d}": jnp.asarray(rng.normal(size=(256, 256)) / 16,
                                     jnp.float32) for i in range(12)}
  x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)

  def loss(p):
    h = x
    for name in sorted(p):
      h = jnp.tanh(h @ p[name])
    return jnp.mean(h ** 2)

  leaf_bytes = 256 * 256 * 4
  assert (_temporaries_with_grads_in_step(
      optax.chain(ours(), optax.adam(1e-3)), params, loss) -
          _temporaries_with_grads_in_step(
              optax.chain(theirs(), optax.adam(1e-3)), params, loss)
          ) < 3 * leaf_bytes


@pytest.mark.standard_promotion  # traces optax.adam
def test_check_says_the_parameters_hold_nan_before_their_gradients_do():
  """A NaN parameter makes the gradients NaN: `og.check` named only those
  (and with a guard, the skip, which would go on for ever), never the
  parameters, which no skip can mend."""
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)).at[0, 0].set(jnp.nan),
                        "bias": jnp.zeros(2)}}
  x = jnp.ones((4, 3))
  loss_fn = lambda p: jnp.mean(jnp.square(
      x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] - 1.0))
  for tx in (optax.chain(og.monitor(), og.clip_by_global_norm(1.0),
                         optax.adam(1e-3)),
             og.guard(og.adamw(1e-3))):
    state = tx.init(params)
    for _ in range(3):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      assert not np.isfinite(np.asarray(grads["Dense_0"]["kernel"])).all()
      _, state = jax.jit(tx.update)(grads, state, params, loss=loss)
    with pytest.raises(og.NonFiniteGradientError, match=re.escape(
        "Step 2: the parameters hold 1 NaN/Inf element; training cannot "
        "recover from this without a restore (gradients through them are "
        "NaN/Inf, and a skip would skip every step).")):
      og.check(state)


def test_histograms_need_no_gradient_sized_temporary():
  """One count per bucket edge, each its own reduction, made XLA:CPU write
  every mask out first: temporaries of 18x the gradients' bytes."""
  grads = {"w": jnp.zeros((1024, 1024)), "b": jnp.zeros((1024,))}
  temps = {}
  for histogram in (False, True):
    tx = og.monitor(histogram=histogram)
    compiled = jax.jit(tx.update).lower(grads, tx.init(grads)).compile()
    temps[histogram] = compiled.memory_analysis().temp_size_in_bytes
  assert temps[True] - temps[False] < 4 * 1024 * 1024 // 8, temps

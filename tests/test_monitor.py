"""`monitor` and `metrics` against numpy references."""

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


def test_histogram_against_numpy():
  x = jnp.asarray([0.0, 1e-12, 3e-10, 0.05, 0.5, 2.0, 50.0, 1e6, jnp.nan,
                   jnp.inf, -jnp.inf, -0.7], jnp.float32)
  tx = og.monitor(histogram=True)
  _, state = tx.update({"w": x}, tx.init({"w": x}))
  hist = np.asarray(og.metrics(state)["grad/hist/w"])
  a = np.abs(np.asarray(x, np.float64))
  want = np.zeros(len(og.HIST_BUCKETS), np.int64)
  for v in a:
    if np.isnan(v):
      want[-2] += 1
    elif np.isinf(v):
      want[-1] += 1
    elif v == 0:
      want[0] += 1
    else:
      k = int(np.clip(np.floor(np.log10(v)), -10, 4))
      want[1 + k + 10] += 1
  np.testing.assert_array_equal(hist, want)
  assert hist.sum() == x.size


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
  # pre-clip norm gets ".1", the second monitor ".2".
  want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                     for x in jax.tree.leaves(grads)))
  np.testing.assert_allclose(m["grad/norm"], want, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm.1"], want, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm.2"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["post/grad/norm"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm_clipped"], 1.0, rtol=1e-6)


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
  assert {"grad/norm", "grad/norm/Dense_0/kernel", "grad/norm/Dense_0/kernel.1",
          "optim/layers_clipped", "grad/frac_clipped"} <= set(m)


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

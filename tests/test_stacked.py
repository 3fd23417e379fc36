"""Per-layer statistics of stacked layers (`stacked=`, for `nn.scan`):
against numpy, and against the same model with its layers unstacked."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og

L = 3  # stacked layers


def _arrays(seed):
  rng = np.random.default_rng(seed)
  return {"kernel": rng.normal(size=(L, 4, 5)).astype(np.float32),
          "bias": rng.normal(size=(L, 5)).astype(np.float32),
          "head": rng.normal(size=(5, 2)).astype(np.float32)}


def _stacked_tree(a):
  return {"Scan": {"bias": jnp.asarray(a["bias"]),
                   "kernel": jnp.asarray(a["kernel"])},
          "head": jnp.asarray(a["head"])}


def _unstacked_tree(a):
  # Names chosen so that the leaves flatten in the same layer order.
  return {"Scan": {"bias": {str(i): jnp.asarray(a["bias"][i])
                            for i in range(L)},
                   "kernel": {str(i): jnp.asarray(a["kernel"][i])
                              for i in range(L)}},
          "head": jnp.asarray(a["head"])}


def _grads(step):
  a = _arrays(100 + step)
  if step == 2:
    a["kernel"][1, 0, 0] = np.nan    # one element of one stacked layer
  return a


@pytest.mark.standard_promotion  # optax.adamw's own arithmetic
@pytest.mark.parametrize("inner", [og.adamw, optax.adamw],
                         ids=["fast", "generic"])
def test_guard_stacked_equals_unstacked_and_numpy(inner):
  runs = {}
  for name, tree, stacked in (("stacked", _stacked_tree, ("Scan",)),
                              ("unstacked", _unstacked_tree, None)):
    tx = og.guard(inner(0.1), stacked=stacked, histogram=True,
                  spike_sigma=None)
    params = tree(_arrays(0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for step in range(4):
      updates, state = update(tree(_grads(step)), state, params)
      params = optax.apply_updates(params, updates)
      history.append(og.metrics(state))
    runs[name] = (history, params)
  for got, want in zip(runs["stacked"][0], runs["unstacked"][0]):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  stacked_params, unstacked_params = runs["stacked"][1], runs["unstacked"][1]
  for i in range(L):
    np.testing.assert_array_equal(stacked_params["Scan"]["kernel"][i],
                                  unstacked_params["Scan"]["kernel"][str(i)])
  # Against numpy: the layers of the last step, and the NaN step.
  last, nan_step = runs["stacked"][0][3], runs["stacked"][0][2]
  g = _grads(3)
  for i in range(L):
    np.testing.assert_allclose(last[f"grad/norm/Scan/kernel/{i}"],
                               np.linalg.norm(g["kernel"][i]), rtol=1e-6)
    np.testing.assert_allclose(last[f"grad/norm/Scan/bias/{i}"],
                               np.linalg.norm(g["bias"][i]), rtol=1e-6)
    assert last[f"grad/hist/Scan/kernel/{i}"].sum() == 20
  assert [int(nan_step[f"optim/last_bad_nonfinite/Scan/kernel/{i}"])
          for i in range(L)] == [0, 1, 0]
  assert bool(nan_step["optim/skipped"])


def test_monitor_param_norms_and_update_ratio_per_stacked_layer():
  a = _arrays(0)
  params, grads = _stacked_tree(a), _stacked_tree(_arrays(1))
  tx = og.monitor(stacked=lambda name: name.startswith("Scan/"),
                  kind="update")
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  m = og.metrics(state)
  g = _arrays(1)
  for i in range(L):
    np.testing.assert_allclose(m[f"param/norm/Scan/kernel/{i}"],
                               np.linalg.norm(a["kernel"][i]), rtol=1e-6)
    np.testing.assert_allclose(
        m[f"update/ratio/Scan/kernel/{i}"],
        np.linalg.norm(g["kernel"][i]) / np.linalg.norm(a["kernel"][i]),
        rtol=1e-5)
    np.testing.assert_allclose(m[f"update/frac_above_1/Scan/bias/{i}"],
                               np.mean(np.abs(g["bias"][i]) > 1), rtol=1e-6)
  np.testing.assert_allclose(
      m["update/norm"], np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                                    for x in g.values())), rtol=1e-6)


@pytest.mark.standard_promotion  # optax.sgd's own arithmetic
def test_skip_nonfinite_and_check_name_the_stacked_layer():
  tx = og.skip_nonfinite(optax.sgd(0.1), stacked=["Scan/kernel"])
  params = _stacked_tree(_arrays(0))
  _, state = jax.jit(tx.update)(_stacked_tree(_grads(2)), tx.init(params),
                                params)
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"first bad layers: Scan/kernel/1 \(1 NaN/Inf\)"):
    og.check(state)
  names = state.last_bad_counts.names
  assert names == ("Scan/bias", "Scan/kernel/0", "Scan/kernel/1",
                   "Scan/kernel/2", "head")


def test_check_lists_stacked_layers_by_block():
  """Blocks 2 to 10 bad in the kernel, block 9 in the bias too: block 2 is
  the first bad layer, not `blocks/bias/9` (which sorts first by path)."""
  params = {"blocks": {"bias": jnp.ones((12, 4)),
                       "kernel": jnp.ones((12, 4, 4))},
            "head": jnp.ones(3)}
  grads = {"blocks": {"bias": jnp.ones((12, 4)).at[9, 0].set(jnp.nan),
                      "kernel": jnp.ones((12, 4, 4)).at[2:11, 0, 0].set(
                          jnp.inf)},
           "head": jnp.ones(3)}
  tx = og.guard(optax.sgd(0.1), stacked=("blocks",))
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "first bad layers: blocks/kernel/2 (1 NaN/Inf), blocks/kernel/3 (1 "
      "NaN/Inf), blocks/kernel/4 (1 NaN/Inf) and 7 more, the last being "
      "blocks/kernel/10 (1 NaN/Inf).")):
    og.check(state)


def test_check_lists_layers_of_an_nn_scan_stack_by_block():
  """Under `nn.scan` the stacked leaves sit one level down
  (`blocks/Dense_0/kernel/<block>`): the bad layers still go block by
  block across the stack's modules, the first bad block (9) first."""
  blocks = {f"Dense_{i}": {"kernel": jnp.ones((12, 2, 2))} for i in (0, 1)}
  params = {"blocks": blocks, "embed": jnp.ones(3), "head": jnp.ones(3)}
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["blocks"]["Dense_0"]["kernel"] = (
      grads["blocks"]["Dense_0"]["kernel"].at[10:, 0, 0].set(jnp.nan))
  grads["blocks"]["Dense_1"]["kernel"] = (
      grads["blocks"]["Dense_1"]["kernel"].at[9:, 0, 0].set(jnp.nan))
  tx = og.guard(og.sgd(0.1), spike_sigma=None, stacked=("blocks",))
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError) as info:
    og.check(state)
  assert list(info.value.layers) == [
      "blocks/Dense_1/kernel/9", "blocks/Dense_0/kernel/10",
      "blocks/Dense_1/kernel/10", "blocks/Dense_0/kernel/11",
      "blocks/Dense_1/kernel/11"]


def test_bfloat16_and_large_stacked_leaves():
  rng = np.random.default_rng(3)
  big = rng.normal(size=(2, 300, 200)).astype(np.float32)  # > 2**15 / layer
  big[1, 5, 7] = np.inf
  small = rng.normal(size=(4, 8)).astype(np.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    grads = {"big": jnp.asarray(big, dtype), "small": jnp.asarray(small, dtype)}
    tx = og.monitor(stacked=("big", "small"))
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    m = og.metrics(state)
    ref = np.asarray(grads["big"], np.float64)
    np.testing.assert_allclose(m["grad/norm/big/0"], np.linalg.norm(ref[0]),
                               rtol=1e-5)
    assert np.isinf(m["grad/norm/big/1"]) and int(m["grad/nonfinite/big/1"]) == 1
    for i in range(4):
      np.testing.assert_allclose(
          m[f"grad/norm/small/{i}"],
          np.linalg.norm(np.asarray(grads["small"][i], np.float64)), rtol=1e-5)


def test_shard_map_and_named_sharding_with_stacked_layers():
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  rng = np.random.default_rng(4)
  kernel = rng.normal(size=(L, 16, 4)).astype(np.float32)
  kernel[2, 13, 1] = np.nan      # on the last device's shard only
  want = [np.linalg.norm(kernel[i]) for i in range(L)]
  tx = og.monitor(stacked=("kernel",), axis_name="d")

  def step(k):
    grads = {"kernel": k}
    _, state = tx.update(grads, tx.init(grads))
    return og.metrics(state)

  sharded = jax.device_put(kernel, NamedSharding(mesh, P(None, "d", None)))
  m = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(None, "d", None),
                            out_specs=P()))(sharded)
  plain = og.monitor(stacked=("kernel",))
  _, state = jax.jit(plain.update)({"kernel": sharded},
                                   plain.init({"kernel": sharded}))
  for got in (m, og.metrics(state)):
    np.testing.assert_allclose([got[f"grad/norm/kernel/{i}"] for i in (0, 1)],
                               want[:2], rtol=1e-6)
    assert np.isnan(got["grad/norm/kernel/2"])
    assert [int(got[f"grad/nonfinite/kernel/{i}"]) for i in range(L)] == [
        0, 0, 1]


@pytest.mark.standard_promotion  # optax.adamw on the generic path
def test_jit_with_the_layer_axis_sharded_on_both_paths():
  """Under `jit` on an Auto mesh, a stack sharded along its layer axis: the
  per-layer counts are split over the devices, and their total (a custom
  saturating reduction before) must still compile into an all-reduce, on
  the guard's fast and generic paths, against numpy."""
  mesh = jax.make_mesh((8,), ("d",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("d", None, None))
  kernel = np.random.default_rng(5).normal(size=(16, 8, 8)).astype(np.float32)
  kernel[3, 2, 1] = np.nan
  params = {"blocks": {"kernel": jax.device_put(np.ones_like(kernel),
                                                sharding)}}
  grads = {"blocks": {"kernel": jax.device_put(kernel, sharding)}}
  finite = np.where(np.isnan(kernel), 0.0, kernel)
  for inner in (og.adamw(1e-3), optax.adamw(1e-3)):
    tx = og.guard(inner, stacked=("blocks",))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    m = og.metrics(state)
    assert int(m["grad/nonfinite"]) == 1 and bool(m["optim/skipped"])
    assert int(m["grad/nonfinite/blocks/kernel/3"]) == 1
    np.testing.assert_array_equal(updates["blocks"]["kernel"], 0.0)
    for i in (0, 15):
      np.testing.assert_allclose(m[f"grad/norm/blocks/kernel/{i}"],
                                 np.linalg.norm(finite[i]), rtol=1e-6)


def test_explicit_mesh_stack_sharded_along_its_layers_against_numpy():
  """Under `jit` on an Explicit mesh, a stack sharded along its layer axis
  beside a sharded kernel: each block decides its rare paths from its own
  sums, which are then sharded like its layers; both branches must still
  give one type (with the counts above 1 taken, as the monitor does)."""
  mesh = jax.make_mesh((8,), ("d",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(6)
  stack = rng.normal(size=(8, 16, 16)).astype(np.float32)
  kernel = rng.normal(size=(64, 64)).astype(np.float32)
  with jax.set_mesh(mesh):
    tree = {"blocks": jax.device_put(stack, NamedSharding(mesh, P("d"))),
            "k": jax.device_put(kernel, NamedSharding(mesh, P("d")))}
    tx = optax.chain(og.monitor(stacked=("blocks",)), optax.sgd(0.1))
    _, state = jax.jit(tx.update)(tree, tx.init(tree), tree)
  m = og.metrics(state)
  for i in range(8):
    np.testing.assert_allclose(m[f"grad/norm/blocks/{i}"],
                               np.linalg.norm(stack[i]), rtol=1e-5)
    np.testing.assert_allclose(m[f"grad/frac_above_1/blocks/{i}"],
                               np.mean(np.abs(stack[i]) > 1), rtol=1e-6)
  np.testing.assert_allclose(m["grad/norm/k"], np.linalg.norm(kernel),
                             rtol=1e-5)


def test_a_stacked_axis_split_by_shard_map_is_named_in_the_error():
  """A stack sharded along its layer axis reaches each device with one
  layer of the eight `init` saw: the error says why."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  kernel = np.ones((8, 16, 4), np.float32)
  tx = og.guard(og.adamw(1e-3), stacked=("kernel",), axis_name="d")
  state = tx.init({"kernel": kernel})
  step = lambda k, s: tx.update({"kernel": k}, s, {"kernel": k})[1].step
  with pytest.raises(ValueError, match=re.escape(
      "`guard` was initialised with 8 parameter layers but got updates "
      "with 1; the trees must match.")) as e:
    jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("d"), P()),
                          out_specs=P()))(kernel, state)
  assert str(e.value).endswith(
      " A stacked leaf has another number of layers than at `init`: inside "
      "`shard_map`, a stacked leaf split along its layer axis holds only "
      "its device's layers; shard it along another axis (`P(None, ...)`).")


def test_errors_are_sentences():
  with pytest.raises(ValueError, match="`stacked` must be None, a sequence "
                     "of layer names or name prefixes"):
    og.guard(og.adamw(0.1), stacked="Scan")
  tx = og.monitor(stacked=("Scna",))
  with pytest.raises(ValueError, match="`stacked` names 'Scna', which is no "
                     "layer of the parameters and no prefix of one"):
    tx.init(_stacked_tree(_arrays(0)))
  tx = og.monitor(stacked=("blocks",))
  with pytest.raises(ValueError, match=re.escape(
      "`stacked` names 'blocks', but the leaves below it have leading axes "
      "of different lengths ({'blocks/scale': 6, 'blocks/w': 4}), so they "
      "cannot all stack the same layers")):
    tx.init({"blocks": {"w": jnp.ones((4, 6, 6)), "scale": jnp.ones(6)}})
  tx = og.skip_nonfinite(optax.sgd(0.1), stacked=lambda name: True)
  for shape in ((), (0, 2)):
    with pytest.raises(ValueError, match="The layer 'step' is marked as "
                       "stacked, but it has no leading axis to split"):
      tx.init({"step": jnp.zeros(shape), "w": jnp.ones((2, 2))})


@pytest.mark.parametrize("frozen", [False, True], ids=["missing", "None"])
def test_updates_without_the_stacked_leaf_are_named_as_the_updates(frozen):
  """The parameters hold the stacked leaf and the updates do not: the
  message said the parameters had no such layer."""
  params = {"a": jnp.ones(3), "b": jnp.ones((4, 2))}
  updates = {"a": jnp.ones(3), **({"b": None} if frozen else {})}
  for tx in (og.clip_by_layer_norm(1.0, stacked=("b",)),
             og.monitor(stacked=("b",)),
             og.guard(og.sgd(0.1), stacked=("b",)),
             og.guard(og.sgd(0.1), stacked=("b",), skip_nonfinite=False),
             og.skip_nonfinite(og.sgd(0.1), stacked=("b",))):
    with pytest.raises(ValueError, match=(
        r"was initialised with 5 parameter layers but got updates with 1; "
        r"the trees must match\. Only in the parameters: \['b/0', 'b/1', "
        r"'b/2', 'b/3'\]; only in the updates: none\." +
        (r" A None update \(a frozen leaf" if frozen else "(\n|$)"))):
      tx.update(updates, tx.init(params), params)


def test_clip_by_layer_norm_clips_each_stacked_layer_against_numpy():
  """Block 0 (norm 0.2) stays as it is beside block 1 (norm 100): the whole
  stack's norm would have scaled it by ~0.01."""
  kernel = np.zeros((3, 4, 4), np.float32)
  kernel[0, 0, 0], kernel[1, 0, 0], kernel[2] = 0.2, 100.0, 0.5
  grads = {"blocks": {"kernel": jnp.asarray(kernel)}, "head": jnp.full(4, 3.0)}
  tx = og.clip_by_layer_norm(1.0, stacked=("blocks",))
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  norms = np.sqrt(np.sum(kernel.astype(np.float64) ** 2, axis=(1, 2)))
  want = kernel * np.minimum(1.0, 1.0 / norms)[:, None, None]
  np.testing.assert_allclose(out["blocks"]["kernel"], want, rtol=1e-6)
  np.testing.assert_allclose(out["head"], np.full(4, 0.5), rtol=1e-6)
  m = og.metrics(state)
  for i, n in enumerate(norms):
    np.testing.assert_allclose(m[f"grad/norm/blocks/kernel/{i}"], n,
                               rtol=1e-6)
  assert int(m["optim/layers_clipped"]) == 3   # blocks 1, 2 and the head
  with pytest.raises(ValueError, match=re.escape(
      "`clip_by_layer_norm` was initialised with 4 parameter layers but got "
      "updates with 3;")):
    tx.update({"blocks": {"kernel": jnp.ones((2, 4, 4))},
               "head": jnp.ones(4)}, state)


def test_one_stacked_setting_in_every_part_of_multi_transform():
  """The same `stacked=` given to each part: the part whose mask hides the
  stack has no such layer, which is no error (it was refused as "no layer
  of the parameters"); a name that is nowhere in the tree still is."""
  params = {"blocks": {"w": jnp.arange(24.0).reshape(4, 3, 2)},
            "head": jnp.ones(3)}
  grads = jax.tree.map(lambda x: x * 0.5, params)
  labels = {"blocks": {"w": "body"}, "head": "head"}

  def parts(stacked):
    return optax.multi_transform(
        {label: og.guard(og.sgd(0.1), stacked=stacked, max_norm=1e9)
         for label in ("body", "head")}, labels)

  tx = parts(("blocks",))
  _, state = tx.update(grads, tx.init(params), params)
  body = og.metrics(state.inner_states["body"])
  head = og.metrics(state.inner_states["head"])
  g = np.asarray(grads["blocks"]["w"])
  for i in range(4):
    np.testing.assert_allclose(body[f"grad/norm/blocks/w/{i}"],
                               np.sqrt(np.sum(g[i] ** 2)), rtol=1e-6)
  assert not any(k.startswith("grad/norm/blocks") for k in head)
  np.testing.assert_allclose(head["grad/norm/head"], np.sqrt(3 * 0.25),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="`stacked` names 'blocs', which is "
                     "no layer of the parameters"):
    parts(("blocs",)).init(params)
  # Labels as a prefix tree (one label for the whole `blocks` subtree): the
  # other part's mask hides it as one node, a name below it included.
  labels = {"blocks": "body", "head": "head"}
  for stacked in (("blocks",), ("blocks/w",)):
    _, state = parts(stacked).update(grads, parts(stacked).init(params),
                                     params)
    assert "grad/norm/blocks/w/3" in og.metrics(state.inner_states["body"])

"""`MetricsLog` against the per-step read-out and closed-form norms."""

import functools
import re
import sys
import types

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _metrics

# Gradients of two equal elements: global norm sqrt(2) * g.
_GRADS = (0.3, 4.0, float("nan"), 1.0, 2.0, float("inf"), 0.5)


def _tx():
  return og.guard(og.adamw(0.1), max_norm=1.0, spike_sigma=None,
                  histogram=True)


@functools.cache
def _compiled(donate):
  """`_tx` and its jitted update, compiled once for the whole module."""
  tx = _tx()
  return tx, jax.jit(tx.update, donate_argnums=(1,) if donate else ())


def _run(record, donate=True):
  """Runs `_tx` over `_GRADS`, calling `record(state)` after each step."""
  tx, step = _compiled(donate)
  params = {"w": jnp.ones(2), "b": jnp.zeros(3)}
  state = tx.init(params)
  for g in _GRADS:
    grads = {"w": jnp.full(2, g), "b": jnp.zeros(3)}
    _, state = step(grads, state, params)
    record(state)


def test_many_steps_keep_every_value():
  """Columns grow in place (past their first capacities):
  every step's values come back, histograms (vectors) included."""
  log, reference = og.MetricsLog(lag=3), []

  def record(state):
    log.record(state)
    reference.append(og.metrics(state))

  for _ in range(7):  # 7 x 7 steps: past capacities 16 and 32
    _run(record, donate=False)
  out = log.to_numpy()
  assert len(out["step"]) == len(reference) == 7 * len(_GRADS)
  for name in reference[0]:
    np.testing.assert_array_equal(
        out[name], np.stack([m[name] for m in reference]), err_msg=name)
  out["grad/norm"][0] = -1.0  # a copy: the log is not changed through it
  assert log.to_numpy()["grad/norm"][0] == reference[0]["grad/norm"]


def test_record_equals_metrics_of_each_step_with_donated_state():
  log = og.MetricsLog()
  _run(log.record)                      # the state is donated at each step
  reference = []
  _run(lambda state: reference.append(og.metrics(state)), donate=False)
  out = log.to_numpy()
  np.testing.assert_array_equal(out["step"], np.arange(len(_GRADS)))
  assert set(out) == set(reference[0]) | {"step"}
  for name in reference[0]:
    np.testing.assert_array_equal(
        out[name], np.stack([m[name] for m in reference]), err_msg=name)
  # And against the closed form: the pre-clip norm and the decisions.
  np.testing.assert_allclose(out["grad/norm"],
                             np.sqrt(2.0) * np.abs(np.asarray(_GRADS)),
                             rtol=1e-6)
  bad = ~np.isfinite(np.asarray(_GRADS))
  np.testing.assert_array_equal(out["optim/skipped"], bad)
  np.testing.assert_array_equal(out["optim/num_skipped"], np.cumsum(bad))
  clipped = np.sqrt(2.0) * np.abs(np.asarray(_GRADS)) > 1.0
  np.testing.assert_array_equal(out["optim/num_clipped"],
                                np.cumsum(clipped & ~bad))
  assert out["grad/hist/w"].shape == (len(_GRADS), len(og.HIST_BUCKETS))


def test_statistics_are_fetched_only_lag_records_later(monkeypatch):
  fetched = []
  to_host = _metrics.to_host

  def counting(tree):
    fetched.append(tree)
    return to_host(tree)

  monkeypatch.setattr(_metrics, "to_host", counting)
  log = og.MetricsLog(lag=3)
  seen = []

  def record(state):
    log.record(state)
    seen.append(len(fetched))

  _run(record)
  # Recording step t fetches step t - 3, never the step just dispatched.
  assert seen == [max(0, t - 2) for t in range(len(_GRADS))]
  assert len(log) == len(_GRADS)
  log.to_numpy()
  assert len(fetched) == len(_GRADS)


def test_on_row_streams_every_step_in_order_as_it_is_fetched():
  streamed, per_call = [], []
  log = og.MetricsLog(lag=2, on_row=lambda n, row: streamed.append((n, row)))

  def record(state):
    before = len(streamed)
    log.record(state)
    per_call.append([n for n, _ in streamed[before:]])

  _run(record)
  # Recording step t hands over step t - 2, nothing for the first two.
  assert per_call == [[], []] + [[t - 2] for t in range(2, len(_GRADS))]
  log.flush()
  log.flush()  # nothing left: no row twice
  assert [n for n, _ in streamed] == list(range(len(_GRADS)))
  # Each row is that step's metrics (the closed-form pre-clip norm here),
  # the same as the columns of to_numpy.
  out = log.to_numpy()
  for n, row in streamed:
    np.testing.assert_allclose(row["grad/norm"],
                               np.sqrt(2.0) * abs(_GRADS[n]), rtol=1e-6)
    assert set(row) == set(out) - {"step"}
    for name, value in row.items():
      np.testing.assert_array_equal(value, out[name][n], err_msg=name)


def test_lag_zero_fetches_at_once(monkeypatch):
  fetched = []
  to_host = _metrics.to_host
  monkeypatch.setattr(_metrics, "to_host",
                      lambda tree: fetched.append(1) or to_host(tree))
  log = og.MetricsLog(lag=0)
  _run(lambda state: (log.record(state), fetched.append("step")))
  assert fetched == [1, "step"] * len(_GRADS)


def test_step_numbers_save_and_load(tmp_path):
  log = og.MetricsLog()
  states = []
  _run(states.append, donate=False)
  log.record(states[0], step=10)
  log.record(states[1])
  log.record(states[2], step=20)
  path = tmp_path / "metrics.npz"
  log.save(path)
  loaded = og.MetricsLog.load(path)
  first = log.to_numpy()
  np.testing.assert_array_equal(first["step"], [10, 11, 20])
  again = loaded.to_numpy()
  assert set(again) == set(first)
  for name in first:
    np.testing.assert_array_equal(again[name], first[name], err_msg=name)
  loaded.record(states[3])                 # goes on after the last step
  out = loaded.to_numpy()
  np.testing.assert_array_equal(out["step"], [10, 11, 20, 21])
  np.testing.assert_array_equal(out["grad/norm"][-1],
                                og.metrics(states[3])["grad/norm"])
  # A resumed log streams the steps recorded after the load.
  rows = []
  resumed = og.MetricsLog.load(path, lag=0,
                               on_row=lambda n, m: rows.append(n))
  resumed.record(states[3])
  resumed.record(states[4])
  assert rows == [21, 22]
  # A loaded log refuses a state of other metrics when it is recorded.
  other = og.MetricsLog.load(path, lag=2)
  with pytest.raises(ValueError, match=(
      r"^The optimizer state recorded at step 21 holds other metrics than "
      r"the steps before it")):
    other.record(og.monitor().init({"w": jnp.ones(2)}))
  # Saved without the suffix (NumPy adds `.npz`): loaded the same way.
  log.save(tmp_path / "bare")
  np.testing.assert_array_equal(
      og.MetricsLog.load(tmp_path / "bare").to_numpy()["step"], [10, 11, 20])


def test_truncate_resumes_from_an_older_checkpoint(tmp_path):
  """Saved at the last step, resumed from a checkpoint 3 steps back: after
  `truncate`, the re-recorded steps give the uninterrupted log exactly."""
  states = []
  _run(states.append, donate=False)
  whole = og.MetricsLog()
  for s in states:
    whole.record(s)
  want = whole.to_numpy()
  path = tmp_path / "log.npz"
  whole.save(path)
  resumed = og.MetricsLog.load(path, lag=2)
  with pytest.raises(ValueError, match="steps must increase"):
    resumed.record(states[4], step=4)
  resumed.truncate(3)                       # the checkpoint of step 3
  for s in states[4:]:
    resumed.record(s)
  got = resumed.to_numpy()
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # Records still on the device are dropped too, and -1 forgets all.
  live = og.MetricsLog(lag=5)
  for s in states[:4]:
    live.record(s)
  live.truncate(1)
  live.record(states[2])
  np.testing.assert_array_equal(live.to_numpy()["step"], [0, 1, 2])
  np.testing.assert_array_equal(live.to_numpy()["grad/norm"],
                                want["grad/norm"][:3])
  live.truncate(-1)
  assert len(live) == 0 and list(live.to_numpy()["step"]) == []
  live.record(states[0])
  np.testing.assert_array_equal(live.to_numpy()["step"], [0])
  # Truncating after the last step keeps everything.
  live.truncate(10)
  np.testing.assert_array_equal(live.to_numpy()["step"], [0])
  for bad in (-2, 1.0, True, "1"):
    with pytest.raises(ValueError, match=re.escape(
        "`last_step` must be an integer >= -1 (the last step to keep), but "
        f"got {bad!r}.")):
      live.truncate(bad)
  # A checkpoint's step, as an array, is taken as it comes.
  live.truncate(jnp.asarray(-1, jnp.int32))
  assert len(live) == 0
  live.record(states[0], step=np.int64(4))
  live.truncate(np.int64(4))
  np.testing.assert_array_equal(live.to_numpy()["step"], [4])


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, x=np.zeros(3))
  with pytest.raises(ValueError, match="is not a file written by "
                     "MetricsLog.save: it has no 'step' array"):
    og.MetricsLog.load(path)


def test_to_pandas_columns(monkeypatch):
  made = {}

  class Index:
    def __init__(self, values, name):
      self.values, self.name = np.asarray(values), name

  def data_frame(columns, index):
    made.update(columns=columns, index=index)
    return "frame"

  stub = types.SimpleNamespace(DataFrame=data_frame, Index=Index)
  monkeypatch.setitem(sys.modules, "pandas", stub)
  log = og.MetricsLog()
  _run(log.record)
  assert log.to_pandas() == "frame"
  columns, index = made["columns"], made["index"]
  assert index.name == "step"
  np.testing.assert_array_equal(index.values, np.arange(len(_GRADS)))
  out = log.to_numpy()
  np.testing.assert_array_equal(columns["grad/norm"], out["grad/norm"])
  for j, bucket in enumerate(og.HIST_BUCKETS):
    np.testing.assert_array_equal(columns[f"grad/hist/w/{bucket}"],
                                  out["grad/hist/w"][:, j])
  assert not any(v.ndim != 1 for v in columns.values())
  # With no rows (every record truncated away), the same columns, empty.
  log.truncate(-1)
  assert log.to_pandas() == "frame"
  assert made["columns"].keys() == columns.keys()
  assert all(v.shape == (0,) for v in made["columns"].values())


def test_to_pandas_names_ensemble_members_apart_from_layers(monkeypatch):
  """Layers of a list are named "0", "1": an ensemble's members are columns
  `name[i]`, so `grad/norm/0` is never member 0's total (it was)."""
  made = {}
  stub = types.SimpleNamespace(
      DataFrame=lambda columns, index: made.update(columns=columns),
      Index=lambda values, name: None)
  monkeypatch.setitem(sys.modules, "pandas", stub)
  params = [np.ones((2, 2), np.float32), np.ones((2, 3), np.float32)]
  grads = [np.array([[1.0, 1.0], [3.0, 3.0]], np.float32),
           np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]], np.float32)]
  tx = og.monitor(histogram=True)
  state = jax.vmap(tx.init)(params)
  _, state = jax.jit(jax.vmap(tx.update))(grads, state, params)
  log = og.MetricsLog(lag=0)
  log.record(state)
  log.to_pandas()
  columns = made["columns"]
  for member in range(2):
    layers = [np.linalg.norm(g[member]) for g in grads]
    np.testing.assert_allclose(columns[f"grad/norm[{member}]"],
                               [np.linalg.norm(layers)], rtol=1e-6)
    for layer, norm in enumerate(layers):
      np.testing.assert_allclose(columns[f"grad/norm/{layer}[{member}]"],
                                 [norm], rtol=1e-6)
  assert "grad/norm/0" not in columns
  hist = log.to_numpy()["grad/hist/1"]  # [steps, members, buckets]
  for member in range(2):
    for j, edge in enumerate(og.HIST_BUCKETS):
      np.testing.assert_array_equal(columns[f"grad/hist/1[{member}]/{edge}"],
                                    hist[:, member, j])


def test_to_pandas_without_pandas_says_what_to_do(monkeypatch):
  monkeypatch.setitem(sys.modules, "pandas", None)
  log = og.MetricsLog()
  _run(log.record)
  with pytest.raises(ImportError, match="needs pandas, which optax_guard "
                     "does not install; run `pip install pandas`"):
    log.to_pandas()


def test_errors_are_sentences():
  with pytest.raises(ValueError, match="`lag` must be an integer >= 0"):
    og.MetricsLog(lag=-1)
  with pytest.raises(ValueError, match=r"^`on_row` must be a callable taking "
                     r"\(step, metrics\), or None, but got 'wandb'\.$"):
    og.MetricsLog(on_row="wandb")
  log = og.MetricsLog()
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="found no optax_guard statistics in "
                     "the optimizer state"):
    log.record(optax.adam(0.1).init(params))
  tx = _tx()

  def as_mappings(state):  # what `nnx.state(optimizer)` leaves of a state
    if hasattr(state, "_asdict"):
      return {k: as_mappings(v) for k, v in state._asdict().items()}
    return state

  with pytest.raises(ValueError, match=re.escape(
      "MetricsLog.record found optax_guard states turned into plain "
      "mappings, which say nothing about what their numbers are: pass the "
      "state itself (with Flax nnx, `optimizer.opt_state`, not "
      "`nnx.state(optimizer)`;")):
    log.record(as_mappings(tx.init(params)))

  @jax.jit
  def inside(state):
    log.record(state)
    return state

  with pytest.raises(ValueError, match="call it after the step, outside jit"):
    inside(tx.init({"w": jnp.ones(2)}))
  for lag in (0, 2):  # said at once, not `lag` steps later
    other = og.MetricsLog(lag=lag)
    other.record(tx.init(params))
    with pytest.raises(ValueError, match=(
        r"^The optimizer state recorded at step 1 holds other metrics than "
        r"the steps before it \(new: .*; missing: .*\); use one MetricsLog "
        r"per optimizer\.$")):
      other.record(og.monitor().init(params))
    other.record(tx.init(params))  # the log goes on
    assert len(other) == 2
  with pytest.raises(ValueError, match=(
      r"^`step` must be an integer >= 2 \(steps must increase\), but got "
      r"1\.$")):
    other.record(tx.init(params), step=1)
  for bad in (2.7, True, "9"):  # not filed as 2, 1 or 9
    with pytest.raises(ValueError, match=(
        rf"^`step` must be an integer >= 2 \(steps must increase\), but got "
        rf"{re.escape(repr(bad))}\.$")):
      other.record(tx.init(params), step=bad)
  other.record(tx.init(params), step=np.int64(5))
  assert other.to_numpy()["step"].tolist() == [0, 1, 5]


def test_a_state_of_another_device_layout_is_refused_when_recorded(tmp_path):
  """A `pmap`ped state (one value per device) and a single-device one do not
  share columns: said at `record`, also after `load`, and the log stays as
  it was (no step filed without its values)."""
  tx = _tx()
  params = {"w": jnp.ones(2), "b": jnp.zeros(3)}
  single = tx.init(params)
  stacked = jax.tree.map(lambda x: jnp.stack([x] * 8), params)
  per_device = jax.pmap(tx.init)(stacked)
  message = (r"^The optimizer state recorded at step 1 holds 'grad/clip_scale' of "
             r"shape \(\) \(float32\), but the steps before it hold shape "
             r"\(8,\) \(float32\); record states of one device layout in "
             r"one MetricsLog \(a `pmap`ped state has one value per "
             r"device; the states a `lax.scan` stacks are one record per "
             r"step: record `jax.tree.map\(lambda x: x\[i\], states\)` for "
             r"each step `i`\)\.$")
  for lag in (0, 2):
    log = og.MetricsLog(lag=lag)
    log.record(per_device)
    with pytest.raises(ValueError, match=message):
      log.record(single)
    log.record(per_device)
    out = log.to_numpy()
    assert out["step"].tolist() == [0, 1]
    assert out["grad/norm"].shape == (2, 8)
  log.save(tmp_path / "log")
  loaded = og.MetricsLog.load(tmp_path / "log")
  with pytest.raises(ValueError, match=message.replace("step 1", "step 2")):
    loaded.record(single)
  loaded.record(per_device)
  assert loaded.to_numpy()["step"].tolist() == [0, 1, 2]


def test_host_state_and_sharded_state():
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  tx = og.guard(og.sgd(0.1), max_norm=None, spike_sigma=None)
  params = {"w": jnp.ones((8, 2))}
  grads = np.ones((8, 2), np.float32)
  grads[5, 1] = np.nan                   # one device's shard holds the NaN
  sharded = {"w": jax.device_put(grads, NamedSharding(mesh, P("d", None)))}
  params = jax.device_put(params, NamedSharding(mesh, P("d", None)))
  state = tx.init(params)
  log = og.MetricsLog()
  _, state = jax.jit(tx.update, donate_argnums=1)(sharded, state, params)
  log.record(state)
  log.record(jax.device_get(state))      # a state already on the host
  out = log.to_numpy()
  np.testing.assert_array_equal(out["optim/skipped"], [True, True])
  np.testing.assert_array_equal(out["grad/nonfinite/w"], [1, 1])


def test_a_layer_named_like_a_numpy_file_survives_save_and_load(tmp_path):
  """NumPy finds a stored column by a key ending in `.npy` too, so a layer
  `w.npy` was loaded with layer `w`'s values."""
  grads = {"w": jnp.array([3.0, 4.0]), "w.npy": jnp.array([1.0, 0.0])}
  tx = og.monitor()
  _, state = tx.update(grads, tx.init(grads), grads)
  log = og.MetricsLog(lag=0)
  log.record(state)
  log.save(tmp_path / "m.npz")
  loaded = og.MetricsLog.load(tmp_path / "m.npz").to_numpy()
  np.testing.assert_allclose(loaded["grad/norm/w.npy"], [1.0])
  np.testing.assert_allclose(loaded["grad/norm/w"], [5.0])


def test_to_pandas_tells_a_histogram_from_a_layer_named_hist(monkeypatch):
  """An ensemble of 18 members (as many as the histogram's buckets) with a
  module named `hist`: its norms are members, not buckets."""
  made = {}
  stub = types.SimpleNamespace(
      DataFrame=lambda columns, index: made.update(columns=columns),
      Index=lambda values, name: None)
  monkeypatch.setitem(sys.modules, "pandas", stub)
  members = len(og.HIST_BUCKETS)
  grads = {"hist": {"w": jnp.arange(1.0, members + 1)[:, None] *
                    jnp.ones((members, 2))}}
  tx = og.monitor()
  state = jax.vmap(tx.init)(grads)
  _, state = jax.vmap(tx.update)(grads, state, grads)
  log = og.MetricsLog(lag=0)
  log.record(state)
  log.to_pandas()
  for member in range(members):
    np.testing.assert_allclose(made["columns"][f"grad/norm/hist/w[{member}]"],
                               [(member + 1) * np.sqrt(2.0)], rtol=1e-6)


def test_record_inside_jit_or_on_an_abstract_state_is_a_sentence():
  tx = og.monitor()
  params = {"w": jnp.ones(2)}
  log = og.MetricsLog()
  message = re.escape(
      "MetricsLog.record takes the optimizer state that a jitted step "
      "returned, but got traced (or abstract) values; call it after the "
      "step, outside jit.")
  with pytest.raises(ValueError, match=message):
    log.record(jax.eval_shape(tx.init, params))
  with pytest.raises(ValueError, match=message):
    jax.jit(lambda s: log.record(s))(tx.init(params))


def test_to_pandas_finds_the_histogram_of_a_monitor_with_a_bare_prefix(
    monkeypatch):
  """`prefix="pre_"`: the histogram is `pre_grad/hist/w`, still buckets."""
  made = {}
  stub = types.SimpleNamespace(
      DataFrame=lambda columns, index: made.update(columns=columns),
      Index=lambda values, name: None)
  monkeypatch.setitem(sys.modules, "pandas", stub)
  grads = {"w": jnp.array([0.5, 3e-3, 0.0])}
  tx = og.monitor(histogram=True, prefix="pre_")
  _, state = tx.update(grads, tx.init(grads), grads)
  log = og.MetricsLog(lag=0)
  log.record(state)
  log.to_pandas()
  counts = {edge: int(made["columns"][f"pre_grad/hist/w/{edge}"][0])
            for edge in og.HIST_BUCKETS}
  # 0.5 in [0.1, 1), 3e-3 in [1e-3, 1e-2), and one zero.
  assert {k: v for k, v in counts.items() if v} == {
      "1e-1": 1, "1e-3": 1, "zero": 1}

"""`optax_guard.plot`: what each plot draws, checked on a recording `Axes`
(no matplotlib needed), and a real matplotlib figure where it is installed."""

import dataclasses
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
import optax_guard.plot  # noqa: F401  (og.plot)


class _Recorder:
  """An `Axes` stand-in that records every call made on it."""

  def __init__(self):
    self.calls = []
    self.figure = self

  def __getattr__(self, name):
    def call(*args, **kwargs):
      self.calls.append((name, args, kwargs))
      return (name, args, kwargs)
    return call

  def named(self, name):
    return [(a, k) for n, a, k in self.calls if n == name]


_GRADS = (0.3, 4.0, float("nan"), 1.0, 0.0)


@functools.lru_cache(maxsize=None)
def _log(histogram=False):
  """A guard over `_GRADS` (layer `w` gets g, layer `b` gets 2 g)."""
  tx = og.guard(og.sgd(0.1), max_norm=1.0, spike_sigma=3.0,
                spike_warmup_steps=2, histogram=histogram)
  params = {"w": jnp.ones(2), "b": jnp.ones(3)}
  state, log = tx.init(params), og.MetricsLog()
  update = jax.jit(tx.update)
  for g in _GRADS:
    _, state = update({"w": jnp.full(2, g), "b": jnp.full(3, 2 * g)},
                         state, params)
    log.record(state)
  return log


def test_history_draws_norms_thresholds_and_skipped_steps():
  log = _log()
  data = log.to_numpy()
  ax = og.plot.history(log, ax=_Recorder())
  lines = ax.named("semilogy")
  assert [k["label"] for _, k in lines] == [
      "grad/norm", "grad/norm_clipped", "grad/spike_threshold"]
  steps = np.arange(len(_GRADS))
  g = np.asarray(_GRADS)
  want = np.sqrt(2 * g**2 + 3 * (2 * g)**2)         # numpy, not the log
  for (args, _), name in zip(lines, ("grad/norm", "grad/norm_clipped")):
    np.testing.assert_array_equal(args[0], steps)
  np.testing.assert_allclose(lines[0][0][1], want, rtol=1e-6)
  np.testing.assert_allclose(lines[1][0][1][[0, 1, 3, 4]],
                             np.minimum(want, 1.0)[[0, 1, 3, 4]], rtol=1e-6)
  # The skipped step's clip state is the step's before: not drawn.
  assert np.isnan(lines[1][0][1][2])
  assert lines[1][1]["linestyle"] == "--"
  # The spike threshold written out: mean + 3 std (population) of the norms
  # accepted before each step, Inf until 2 are in (the guard's warm-up); a
  # NaN step, hidden from the spike test as in the chain of the pieces,
  # keeps the threshold recorded before it.
  accepted, threshold = [], []
  for norm in want:
    if not np.isfinite(norm):
      threshold.append(threshold[-1] if threshold else np.inf)
      continue
    threshold.append(np.mean(accepted) + 3.0 * np.std(accepted)
                     if len(accepted) >= 2 else np.inf)
    if norm <= threshold[-1]:
      accepted.append(norm)
  np.testing.assert_allclose(lines[2][0][1], threshold, rtol=1e-6)
  del data
  # The NaN step is the one skipped.
  assert [a[0] for a, _ in ax.named("axvline")] == [2]
  assert ax.named("axvline")[0][1]["label"] == "skipped step"


@pytest.mark.standard_promotion  # traces optax.sgd
def test_history_marks_the_skips_of_every_skipper_in_a_chain():
  """In the chain `guard` equals, the spike skips are `skip_spikes`' own
  `optim/skipped.1`: a spike (step 5) and a NaN (step 7) are both marked,
  and neither step's clipped norm is drawn."""
  tx = optax.chain(og.monitor(), og.skip_nonfinite(og.skip_spikes(
      optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1)), window=8,
      warmup_steps=4)))
  params = {"w": jnp.ones(2)}
  state, log = tx.init(params), og.MetricsLog()
  update = jax.jit(tx.update)
  for g in (1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 1.0, float("nan"), 1.0):
    _, state = update({"w": jnp.full(2, g)}, state, params)
    log.record(state)
  assert np.flatnonzero(log.to_numpy()["optim/skipped.1"]).tolist() == [5]
  ax = og.plot.history(log, ax=_Recorder())
  assert [a[0] for a, _ in ax.named("axvline")] == [5, 7]
  (clipped,) = [a for a, k in ax.named("semilogy")
                if k["label"] == "grad/norm_clipped"]
  assert np.isnan(clipped[1][[5, 7]]).all()
  assert np.isfinite(clipped[1][[4, 6, 8]]).all()


def test_history_of_a_repeated_norm_draws_its_own_state_s_lines():
  """Two guards in a multi_transform: part b's norm is `grad/norm.1`, drawn
  with its own `grad/norm_clipped.1` and spike threshold, not part a's. A
  layer clip before a global clip: the global clip's norm is
  `grad/norm.1`, its clipped norm the plain `grad/norm_clipped` (no plain
  `grad/norm` to pair with), and the default metric's absence names the
  norms the record holds."""
  guard = lambda: og.guard(og.sgd(0.1), max_norm=0.01, spike_warmup_steps=2)
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}
  for tx, metric, want in (
      (optax.multi_transform({"x": guard(), "y": guard()},
                             {"a": "x", "b": "y"}),
       "grad/norm.1", ["grad/norm.1", "grad/norm_clipped.1",
                       "grad/spike_threshold.1"]),
      (optax.chain(og.clip_by_layer_norm(4.0), og.clip_by_global_norm(1.0)),
       "grad/norm.1", ["grad/norm.1", "grad/norm_clipped"])):
    state, log = tx.init(params), og.MetricsLog()
    for t in range(1, 6):
      grads = {"a": jnp.full(3, 10.0 * t), "b": jnp.full(3, 0.1 * t)}
      _, state = tx.update(grads, state, params)
      log.record(state)
    data = log.to_numpy()
    lines = og.plot.history(log, metric=metric, ax=_Recorder()).named(
        "semilogy")
    assert [k["label"] for _, k in lines] == want
    for (args, _), name in zip(lines, want):
      np.testing.assert_array_equal(args[1], data[name])
  with pytest.raises(ValueError, match=re.escape(
      "The record holds no 'grad/norm' metric; the global norms it holds "
      "are ['grad/norm.1'].")):
    og.plot.history(log)


def test_layer_heatmap_is_log10_of_the_layer_norms():
  ax = og.plot.layer_heatmap(_log(), ax=_Recorder())
  (image, kwargs), (bad, bad_kwargs) = ax.named("pcolormesh")
  g = np.asarray(_GRADS)
  layers = {"b": np.abs(2 * g) * np.sqrt(3), "w": np.abs(g) * np.sqrt(2)}
  names = ax.named("set_yticklabels")[0][0][0]
  assert sorted(names) == ["b", "w"]
  with np.errstate(divide="ignore", invalid="ignore"):
    want = np.log10(np.stack([layers[n] for n in names]))
  want[~np.isfinite(want)] = np.nan       # the NaN step and the zero step
  np.testing.assert_allclose(image[2], want, rtol=1e-6)
  assert np.isnan(image[2][:, [2, 4]]).all()
  # Steps 0..4, one cell each centred on its step; rows 0 and 1.
  np.testing.assert_array_equal(image[0], np.arange(6) - 0.5)
  np.testing.assert_array_equal(image[1], [-0.5, 0.5, 1.5])
  # On top, black (0 in gray) on the NaN step only: a zero stays blank.
  want_bad = np.full(want.shape, np.nan)
  want_bad[:, 2] = 0.0
  np.testing.assert_array_equal(bad[2], want_bad)
  assert (bad_kwargs["cmap"], bad_kwargs["vmin"]) == ("gray", 0.0)
  np.testing.assert_array_equal(bad[0], image[0])
  (_, colorbar), = ax.named("colorbar")
  assert colorbar["label"] == "log10 grad/norm"


def test_layer_heatmap_rows_in_model_order_and_cells_on_their_steps():
  """Layers `Dense_0 .. Dense_11` go in depth order (the tree sorts
  `Dense_10` before `Dense_2`); steps recorded every 10, then a resumed run
  at 100: each cell is 10 wide, centred on its step, and the jump blank."""
  names = [f"Dense_{i}" for i in range(12)]
  steps = np.asarray([0, 10, 20, 30, 100, 110])
  record = {"step": steps, "grad/norm": np.ones(6, np.float32)}
  for i, name in enumerate(sorted(names)):  # as the tree orders them
    record[f"grad/norm/{name}"] = np.full(6, 10.0 ** int(name[6:]),
                                          np.float32)
  ax = og.plot.layer_heatmap(record, ax=_Recorder())
  (edges, rows, shown), _ = ax.named("pcolormesh")[0]
  assert list(ax.named("set_yticklabels")[0][0][0]) == names
  np.testing.assert_array_equal(edges, [-5, 5, 15, 25, 35, 95, 105, 115])
  np.testing.assert_array_equal(rows, np.arange(13) - 0.5)
  # Row i is Dense_i (log10 = i); column 4 is the blank gap 35..95.
  want = np.repeat(np.arange(12.0)[:, None], 7, axis=1)
  want[:, 4] = np.nan
  np.testing.assert_allclose(shown, want, atol=1e-6)
  # Neighbouring cells meet half-way, the last reaching as far as on its
  # other side; steps out of order are drawn in order.
  record["step"] = np.asarray([0, 10, 20, 30, 34, 40])
  ax = og.plot.layer_heatmap(record, ax=_Recorder())
  (edges, _, shown), _ = ax.named("pcolormesh")[0]
  np.testing.assert_array_equal(edges, [-5, 5, 15, 25, 32, 37, 43])
  assert not np.isnan(shown).any()
  record["step"] = np.asarray([0, 20, 10, 30, 40, 50])
  ax = og.plot.layer_heatmap(record, ax=_Recorder())
  (edges, _, shown), _ = ax.named("pcolormesh")[0]
  np.testing.assert_array_equal(edges, np.arange(-5, 60, 10))
  np.testing.assert_allclose(shown[1], [1, 1, 1, 1, 1, 1], atol=1e-6)
  # Every step to 99, then every 100th: no cell is a sliver.
  record = {"step": np.concatenate([np.arange(100), np.arange(200, 1001, 100)]),
            "grad/norm": np.ones(109), "grad/norm/a": np.ones(109)}
  ax = og.plot.layer_heatmap(record, ax=_Recorder())
  (edges, _, shown), _ = ax.named("pcolormesh")[0]
  assert not np.isnan(shown).any() and np.all(np.diff(edges) > 0)
  np.testing.assert_array_equal(edges[-4:], [750, 850, 950, 1050])


def test_layer_heatmap_of_zscores_is_linear_and_centred():
  tx = og.monitor(zscore=True, zscore_decay=0.5)  # warm-up: 2 steps
  params = {"w": jnp.ones(2), "b": jnp.ones(3)}
  state, log = tx.init(params), og.MetricsLog()
  for g in (1.0, 1.1, 0.9, 1.0, 30.0, jnp.nan):
    _, state = tx.update({"w": jnp.full(2, g), "b": jnp.ones(3)}, state)
    log.record(state)
  data = log.to_numpy()
  ax = og.plot.layer_heatmap(log, metric="grad/zscore", ax=_Recorder())
  (image, kwargs), (bad, _) = ax.named("pcolormesh")
  names = ax.named("set_yticklabels")[0][0][0]
  want = np.stack([data[f"grad/zscore/{n}"] for n in names]).astype(float)
  want[~np.isfinite(want)] = np.nan       # the NaN step's +Inf
  np.testing.assert_allclose(image[2], want)
  assert np.isnan(image[2][names.index("w"), 5])
  assert bad[2][names.index("w"), 5] == 0.0          # drawn black
  assert np.isnan(np.delete(bad[2].ravel(), names.index("w") * 6 + 5)).all()
  top = np.nanmax(np.abs(want))
  assert top > 10  # the step of 30
  assert (kwargs["vmin"], kwargs["vmax"]) == (-top, top)
  (_, colorbar), = ax.named("colorbar")
  assert colorbar["label"] == "grad/zscore"
  # A second monitor's z-scores (`grad/zscore.1/<layer>`) alike.
  again = {"step": data["step"], **{
      k.replace("grad/zscore/", "grad/zscore.1/"): v for k, v in data.items()
      if k.startswith("grad/zscore/")}}
  ax = og.plot.layer_heatmap(again, metric="grad/zscore.1", ax=_Recorder())
  (image, kwargs), _ = ax.named("pcolormesh")
  np.testing.assert_allclose(image[2], want)
  assert (kwargs["vmin"], kwargs["vmax"]) == (-top, top)


def test_histograms_of_one_layer_and_of_all():
  log = _log(histogram=True)
  data = log.to_numpy()
  for layer in ("w", None):
    ax = og.plot.histograms(log, layer=layer, ax=_Recorder())
    (image, _), = ax.named("pcolormesh")
    counts = (data["grad/hist/w"] if layer else
              data["grad/hist/w"] + data["grad/hist/b"])
    assert image[2].shape == (len(og.HIST_BUCKETS), len(_GRADS))
    with np.errstate(divide="ignore"):
      want = np.log10(counts.T.astype(np.float64))
    want[~np.isfinite(want)] = np.nan
    np.testing.assert_allclose(image[2], want)
    np.testing.assert_array_equal(image[0], np.arange(len(_GRADS) + 1) - 0.5)
    assert tuple(ax.named("set_yticklabels")[0][0][0]) == og.HIST_BUCKETS
  # Step 2 is NaN: both layers' elements fall in the "nan" bucket.
  assert data["grad/hist/w"][2][og.HIST_BUCKETS.index("nan")] == 2
  # A second monitor's histograms (`grad/hist.1/<layer>`), by their metric.
  again = {"step": data["step"], **{
      k.replace("grad/hist/", "grad/hist.1/"): v for k, v in data.items()
      if k.startswith("grad/hist/")}}
  ax = og.plot.histograms(again, metric="grad/hist.1", layer="w",
                          ax=_Recorder())
  (image, _), = ax.named("pcolormesh")
  with np.errstate(divide="ignore"):
    want = np.log10(data["grad/hist/w"].T.astype(np.float64))
  want[~np.isfinite(want)] = np.nan
  np.testing.assert_allclose(image[2], want)


def test_diagnosis_plot():
  def loss_fn(params):
    return jnp.sum(jnp.log(params["a"])) + 10.0 * jnp.sum(params["b"])

  params = {"a": jnp.array([[1.0, 0.0]]), "b": jnp.ones((2, 2))}
  d = og.diagnose(loss_fn, params)
  ax = og.plot.diagnosis(d, ax=_Recorder())
  grads, weights = ax.named("semilogy")
  np.testing.assert_array_equal(grads[0][1], d.grad_norms)
  np.testing.assert_array_equal(weights[0][1], d.param_norms)
  assert [a[0] for a, _ in ax.named("axvline")] == [0]   # `a` holds the Inf
  # No growth can be fitted through the Inf (NaN): the title gives none.
  assert np.isnan(d.growth) and ax.named("set_title")[0][0][0] == "non-finite"
  ax = og.plot.diagnosis(dataclasses.replace(d, growth=2.0), ax=_Recorder())
  assert ax.named("set_title")[0][0][0] == (
      "non-finite: growth 2x per layer toward the input")


def test_diagnosis_title_gives_the_bias_fit_too():
  """Biases that grow 2x per layer toward the input under weights whose
  gradients stay flat: the bias fit decides, and the title shows it."""
  depth = 6
  params = {f"l{i}": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
            for i in range(depth)}

  def loss_fn(p):  # layer i's bias gradient 2**(depth - i), weights' 1
    return sum(jnp.sum(p[f"l{i}"]["w"]) / 4.0 +
               2.0 ** (depth - i) * jnp.sum(p[f"l{i}"]["b"]) / np.sqrt(2.0)
               for i in range(depth))

  d = og.diagnose(loss_fn, params)
  np.testing.assert_allclose([d.growth, d.bias_growth], [1.0, 2.0],
                             rtol=1e-5)
  (title,), _ = og.plot.diagnosis(d, ax=_Recorder()).named("set_title")[0]
  assert title == (f"{d.verdict}: growth 1x per layer toward the input "
                   "(2x over the biases and norm scales)")


def test_errors_are_sentences(monkeypatch):
  with pytest.raises(TypeError, match="Expected an og.MetricsLog or the dict "
                     "its to_numpy"):
    og.plot.history([1, 2])
  with pytest.raises(ValueError, match="holds no per-layer 'grad/hist' "
                     "entries .*; record a monitor or guard with "
                     "histogram=True"):
    og.plot.histograms(_log(), ax=_Recorder())
  with pytest.raises(ValueError, match="holds no 'update/norm' metric"):
    og.plot.history(_log(), metric="update/norm", ax=_Recorder())
  with pytest.raises(TypeError, match="Expected what og.diagnose returns"):
    og.plot.diagnosis({}, ax=_Recorder())
  # A record of a `pmap`ped state: one value per device in every metric.
  per_device = {k: (v if k == "step" else np.stack([v] * 8, axis=1))
                for k, v in _log(histogram=True).to_numpy().items()}
  # The same under a monitor's prefix (more '/' in every name).
  prefixed = {("step" if k == "step" else "post/" + k): v
              for k, v in per_device.items()}
  for plot, kwargs in ((og.plot.history, {}), (og.plot.layer_heatmap, {}),
                       (og.plot.histograms, {}),
                       (og.plot.history, {"metric": "post/grad/norm"}),
                       (og.plot.histograms, {"kind": "post/grad"})):
    with pytest.raises(ValueError, match=(
        r"^The record holds more than one value per step for every metric: "
        r"it was recorded from a `pmap`ped state \(one value per device\) "
        r"or an ensemble trained under `vmap` \(one per member\)\. Plot one "
        r"of them: record `jax\.tree\.map\(lambda x: x\[i\], state\)` "
        r"\(with `axis_name` given, a pmap's devices hold the same "
        r"statistics; an ensemble's members do not\)\.$")):
      plot(prefixed if kwargs else per_device, ax=_Recorder(), **kwargs)
  # A single-device record cut down to its per-layer columns is not one.
  record = _log(histogram=True).to_numpy()
  og.plot.histograms({k: v for k, v in record.items()
                      if k == "step" or "/hist/" in k}, ax=_Recorder())
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  with pytest.raises(ImportError, match=r"needs matplotlib, which "
                     r"optax_guard does not install; run `pip install "
                     r"matplotlib` \(or pass your own `ax`\)\.$"):
    og.plot.history(_log())


def test_real_figures(tmp_path):
  matplotlib = pytest.importorskip("matplotlib")  # the `plot` extra
  matplotlib.use("Agg")
  log = _log(histogram=True)
  d = og.diagnose(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones((2, 2))})
  for name, ax in (("history", og.plot.history(log)),
                   ("heatmap", og.plot.layer_heatmap(log)),
                   ("hist", og.plot.histograms(log)),
                   ("diagnosis", og.plot.diagnosis(d))):
    path = tmp_path / f"{name}.png"
    ax.figure.savefig(path)
    assert path.stat().st_size > 1000, name
  # A heatmap of many long layer names grows tall enough for its labels,
  # which the layout keeps inside the figure.
  many = {f"blocks/MultiHeadDotProductAttention_0/query/kernel/{i}":
          np.ones(3) for i in range(36)}
  ax = og.plot.layer_heatmap({"step": np.arange(3), **{
      f"grad/norm/{k}": v for k, v in many.items()}})
  ax.figure.savefig(tmp_path / "tall.png")
  width, height = ax.figure.get_size_inches()
  assert height >= 0.15 * 36
  renderer = ax.figure.canvas.get_renderer()
  left = min(t.get_window_extent(renderer).x0
             for t in ax.get_yticklabels())
  assert left >= 0, left


def test_history_marks_the_steps_apply_if_finite_dropped():
  """Around a guard, optax.apply_if_finite drops a NaN step before the
  guard sees it (`optim/aif_nonfinite`): it is a skipped step too."""
  tx = optax.apply_if_finite(og.guard(og.sgd(0.1)), max_consecutive_errors=5)
  params = {"w": jnp.ones(2)}
  state, log = tx.init(params), og.MetricsLog()
  for g in (0.3, 4.0, float("nan"), 1.0):
    with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic
      _, state = tx.update({"w": jnp.full(2, g)}, state, params)
    log.record(state)
  ax = og.plot.history(log, ax=_Recorder())
  assert [a[0] for a, _ in ax.named("axvline")] == [2]

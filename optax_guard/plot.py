"""Plots of what the guard recorded (needs matplotlib: `pip install
matplotlib`, or the package's `plot` extra).

Each function takes a `MetricsLog` (or its `to_numpy()` dict, or a
`Diagnosis`), draws on the matplotlib `Axes` given as `ax` (a new figure's
when None) and returns that `Axes`. Only drawing needs matplotlib: pass
your own `ax` to place a plot in a larger figure.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from optax_guard import _check
from optax_guard import _diagnose
from optax_guard import _log
from optax_guard import _stats

__all__ = ("history", "layer_heatmap", "histograms", "diagnosis")


def _columns(record: Any) -> dict[str, np.ndarray]:
  if isinstance(record, _log.MetricsLog):
    columns = record.to_numpy()
  elif isinstance(record, dict) and "step" in record:
    columns = {k: np.asarray(v) for k, v in record.items()}
  else:
    raise TypeError(
        "Expected an og.MetricsLog or the dict its to_numpy() returns, but "
        f"got {type(record).__name__}.")
  # Every metric is one number per step (a histogram one row of counts);
  # recorded from a `pmap`ped state or a vmapped ensemble, each has an axis
  # more, over the devices or members (decided from the shapes: a prefix
  # such as "post/" puts more '/' in the names).
  extra = [np.ndim(v) - (2 if _log._HISTOGRAM.search(k) else 1)  # pylint: disable=protected-access
           for k, v in columns.items() if k != "step"]
  if extra and all(e >= 1 for e in extra):
    raise ValueError(
        "The record holds more than one value per step for every metric: "
        "it was recorded from a `pmap`ped state (one value per device) or "
        "an ensemble trained under `vmap` (one per member). Plot one of "
        "them: record `jax.tree.map(lambda x: x[i], state)` (with "
        "`axis_name` given, a pmap's devices hold the same statistics; an "
        "ensemble's members do not).")
  return columns


def _axes(ax: Any, rows: int = 0) -> Any:
  """`ax`, or a new figure's: taller for many `rows` of labels, its layout
  fitted to the labels (long layer names are not cut off)."""
  if ax is not None:
    return ax
  try:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "optax_guard.plot needs matplotlib, which optax_guard does not "
        "install; run `pip install matplotlib` (or pass your own `ax`).") from e
  return plt.subplots(figsize=(7, max(4.0, 1.5 + 0.15 * rows)),
                      layout="constrained")[1]


def _require(columns: dict[str, np.ndarray], name: str, hint: str) -> None:
  if name not in columns:
    raise ValueError(f"The record holds no {name!r} metric; {hint}.")


def _layers(columns: dict[str, np.ndarray], metric: str, hint: str
            ) -> tuple[list[str], np.ndarray]:
  """The per-layer entries `<metric>/<layer>`, in the model's order as far
  as the tree tells it (its order, but `Dense_2` before `Dense_10` where it
  sorts a dict's keys as strings): (layer names, [L, T, ...])."""
  prefix = metric + "/"
  names = [k[len(prefix):] for k in columns if k.startswith(prefix)]
  if not names:
    raise ValueError(
        f"The record holds no per-layer {metric!r} entries (named "
        f"'{prefix}<layer>'); {hint}.")
  names = list(_check.in_model_order([(n, None) for n in names], names))
  return names, np.stack([columns[prefix + n] for n in names])


def _at_steps(steps: np.ndarray, values: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """Cells for `values` ([rows, T]) centred on their `steps`, as the lines
  of `history` are: (column edges, values in step order with a blank column
  over each jump in the steps). Neighbouring cells meet half-way; a gap
  more than twice the spacings on both sides of it (steps not recorded) is
  left blank, and the cells beside it reach as far as on their other
  side."""
  order = np.argsort(steps, kind="stable")
  steps, values = np.asarray(steps, np.float64)[order], values[:, order]
  gaps = np.diff(steps)
  before = np.concatenate([[0.0], gaps[:-1]])  # the spacing left of a gap
  after = np.concatenate([gaps[1:], [0.0]])    # ... and right of it
  jump = gaps > 2 * np.maximum(before, after)
  jump &= (before > 0) | (after > 0)  # two steps alone: no jump
  half = lambda i: (gaps[i] / 2 if 0 <= i < len(gaps) and not jump[i]
                    else None)
  edges, columns = [], []
  for t in range(len(steps)):
    left, right = half(t - 1), half(t)
    width = left if left is not None else right if right is not None else 0.5
    left, right = (width if left is None else left,
                   width if right is None else right)
    if t and jump[t - 1]:  # a blank column over the jump
      columns.append(-1)
      edges.append(steps[t] - left)
    elif not t:
      edges.append(steps[t] - left)
    columns.append(t)
    edges.append(steps[t] + right)
  columns = np.asarray(columns, np.int64)
  shown = np.where(columns >= 0, values[:, np.maximum(columns, 0)], np.nan)
  return np.asarray(edges if edges else [0.0]), shown


def history(record: Any, *, metric: str = "grad/norm", ax: Any = None
            ) -> Any:
  """The global gradient norm over the steps, on a log scale.

  Draws `metric` (a solid line), `<metric>_clipped` when a clip recorded it
  (dashed), the thresholds the spike skip or adaptive clip used
  (`grad/spike_threshold`, `grad/clip_threshold`, dotted; for a repeated
  state's `grad/norm.1`, its own `grad/norm_clipped.1` and thresholds,
  where they were renamed with it), and a vertical
  line at every skipped step (`optim/skipped`, and `optim/skipped.1`, ... of
  the skippers inside it), where a NaN/Inf norm cannot
  be drawn and the clipped norm is left out (a skipped step's clip state is
  the step's before).

  Args:
    record: an `og.MetricsLog` or its `to_numpy()` dict.
    metric: the norm to draw.
    ax: the matplotlib `Axes` to draw on; a new figure's when None.

  Returns:
    The `Axes`.

  Example:
    >>> import jax, jax.numpy as jnp, optax_guard as og, optax_guard.plot
    >>> tx = og.guard(og.sgd(0.1), spike_sigma=None)
    >>> params = {"w": jnp.ones(2)}
    >>> state, log = tx.init(params), og.MetricsLog()
    >>> for g in (0.3, 4.0, jnp.nan, 1.0):
    ...   _, state = tx.update({"w": jnp.full(2, g)}, state, params)
    ...   log.record(state)
    >>> ax = og.plot.history(log)
    >>> [line.get_label() for line in ax.get_lines()][:2]
    ['grad/norm', 'grad/norm_clipped']

  References:
    Pascanu et al., 2013, "On the difficulty of training recurrent neural
    networks" (https://arxiv.org/abs/1211.5063), Fig. 6.
  """
  columns = _columns(record)
  norms = [k for k in columns if re.fullmatch(r"(.*/)?grad/norm(\.\d+)?", k)]
  _require(columns, metric, f"the global norms it holds are {norms}" if norms
           else "record a monitor, a clip or a guard")
  ax = _axes(ax)
  steps = columns["step"]
  ax.semilogy(steps, columns[metric], label=metric)
  # Every skipper's flag: in a chain, `skip_nonfinite(skip_spikes(...))`
  # records the spike skips as `optim/skipped.1`.
  # (And `optax.apply_if_finite`'s drops.)
  flags = [np.asarray(values, bool) for name, values in columns.items()
           if re.fullmatch(r"optim/(skipped|aif_nonfinite)(\.\d+)?", name)]
  skipped = np.logical_or.reduce(flags + [np.zeros(len(steps), bool)])
  # The lines of the state that recorded `metric`: a repeated state's
  # names end in its number (`grad/norm.1`, `grad/norm_clipped.1`), and
  # where only its norm was renamed (another state recorded `grad/norm`
  # without the rest), its others are the plain names, which then belong
  # to no plain-named norm.
  base, number = re.fullmatch(r"(.*?)(\.\d+)?", metric).groups()
  space = base.rpartition("/")[0]
  def own(name):
    if number and name + number in columns:
      return name + number
    if name in columns and (not number or base not in columns):
      return name
    return None
  for name, style in ((own(base + "_clipped"), "--"),
                      (own(f"{space}/spike_threshold"), ":"),
                      (own(f"{space}/clip_threshold"), ":")):
    if name is not None and name != metric:
      values = np.asarray(columns[name], np.float64)
      if style == "--":
        values = np.where(skipped, np.nan, values)
      ax.semilogy(steps, values, linestyle=style, label=name)
  if flags:
    for i, step in enumerate(steps[skipped]):
      ax.axvline(step, color="red", alpha=0.3,
                 label="skipped step" if i == 0 else None)
  ax.set_xlabel("step")
  ax.set_ylabel("norm")
  ax.legend(fontsize="small")
  return ax


def layer_heatmap(record: Any, *, metric: str = "grad/norm",
                  log: bool | None = None, ax: Any = None) -> Any:
  """Per-layer `metric` over the steps: layers down, steps across, log10
  colour (zeros blank), or linear for z-scores; NaN/Inf cells black.

  Layers go in the model's order as far as the tree tells it (its order,
  but `Dense_2` before `Dense_10` among a dict's keys); each column is
  centred on its step, as `history` draws it, and a jump in the recorded
  steps (a resumed run) is left blank.

  Args:
    record: an `og.MetricsLog` or its `to_numpy()` dict, with per-layer
      entries `<metric>/<layer>`.
    metric: the per-layer metric, e.g. `"grad/norm"`, `"param/norm"` or
      `"grad/zscore"` (`zscore=True`: which layer moved against its own
      history).
    log: colour by log10 of the values; by default, yes except for a
      z-score, which is drawn as it is on a scale centred on 0.
    ax: the matplotlib `Axes` to draw on; a new figure's when None.

  Returns:
    The `Axes`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og, optax_guard.plot
    >>> tx = og.monitor()
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> state, log = tx.init(params), og.MetricsLog()
    >>> for g in (1.0, 10.0, 100.0):
    ...   _, state = tx.update({"a": jnp.full(2, g), "b": jnp.ones(3)}, state)
    ...   log.record(state)
    >>> ax = og.plot.layer_heatmap(log)
    >>> print(ax.collections[0].get_array().shape)  # layers x steps
    (2, 3)

  References:
    Philipp et al., 2018, "The exploding gradient problem demystified"
    (https://arxiv.org/abs/1712.05577).
  """
  columns = _columns(record)
  names, values = _layers(columns, metric,
                          "record a monitor or guard with per_layer=True")
  if log is None:
    log = re.search(r"zscore(\.\d+)?$", metric) is None
  shown = values.astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    if log:
      shown = np.log10(shown)
  shown[~np.isfinite(shown)] = np.nan
  ax = _axes(ax, rows=len(names))
  scale = {}
  if not log:  # symmetric about 0, so that 0 is the middle colour
    top = np.nanmax(np.abs(shown), initial=0.0) or 1.0
    scale = dict(cmap="RdBu_r", vmin=-top, vmax=top)
  edges, shown = _at_steps(columns["step"], shown)
  rows = np.arange(len(names) + 1) - 0.5
  image = ax.pcolormesh(edges, rows, shown, **scale)
  # NaN/Inf cells in black on top (a blank cell would read as a z-score of 0
  # or a missing value, where it is the layer that went bad).
  bad = np.where(~np.isfinite(values.astype(np.float64)), 0.0, np.nan)
  ax.pcolormesh(edges, rows, _at_steps(columns["step"], bad)[1],
                cmap="gray", vmin=0.0, vmax=1.0)
  ax.set_ylim(len(names) - 0.5, -0.5)  # the first layer on top
  ax.set_yticks(np.arange(len(names)))
  ax.set_yticklabels(names, fontsize="x-small")
  ax.set_xlabel("step")
  ax.figure.colorbar(image, ax=ax, label=f"log10 {metric}" if log else metric)
  return ax


def histograms(record: Any, *, layer: str | None = None, kind: str = "grad",
               metric: str | None = None, ax: Any = None) -> Any:
  """The log10-magnitude histograms over the steps: buckets up, steps across,
  colour the log10 of the count (a monitor with `histogram=True`).

  Args:
    record: an `og.MetricsLog` or its `to_numpy()` dict.
    layer: the layer to draw; None sums every layer's counts.
    kind: the monitor's `kind` (`"grad"` or `"update"`).
    metric: the histograms' metric, `<kind>/hist` by default; name another
      where several monitors record them (`"grad/hist.1"`, the second's).
    ax: the matplotlib `Axes` to draw on; a new figure's when None.

  Returns:
    The `Axes`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og, optax_guard.plot
    >>> tx = og.monitor(histogram=True)
    >>> params = {"w": jnp.ones(4)}
    >>> state, log = tx.init(params), og.MetricsLog()
    >>> for g in (1e-3, 1.0, jnp.inf):
    ...   _, state = tx.update({"w": jnp.full(4, g)}, state)
    ...   log.record(state)
    >>> ax = og.plot.histograms(log)
    >>> counts = ax.collections[0].get_array()  # buckets x steps
    >>> print(counts.shape == (len(og.HIST_BUCKETS), 3))
    True

  References:
    TensorBoard's histogram dashboard; `optax_guard.HIST_BUCKETS` (buckets).
  """
  columns = _columns(record)
  metric = f"{kind}/hist" if metric is None else metric
  if layer is None:
    _, values = _layers(columns, metric,
                        "record a monitor or guard with histogram=True")
    counts = values.sum(axis=0)
  else:
    _require(columns, f"{metric}/{layer}",
             "record a monitor with histogram=True, and name a layer it saw")
    counts = columns[f"{metric}/{layer}"]
  with np.errstate(divide="ignore"):
    logs = np.log10(counts.T.astype(np.float64))
  logs[~np.isfinite(logs)] = np.nan
  ax = _axes(ax)
  edges, logs = _at_steps(columns["step"], logs)
  image = ax.pcolormesh(edges, np.arange(len(_stats.HIST_BUCKETS) + 1) - 0.5,
                        logs)
  ax.set_yticks(np.arange(len(_stats.HIST_BUCKETS)))
  ax.set_yticklabels(_stats.HIST_BUCKETS, fontsize="x-small")
  ax.set_xlabel("step")
  ax.set_title(f"{metric}/{layer}" if layer else f"{metric} (all layers)")
  ax.figure.colorbar(image, ax=ax, label="log10 count")
  return ax


def diagnosis(result: _diagnose.Diagnosis, *, ax: Any = None) -> Any:
  """A `Diagnosis`: gradient and parameter norms by depth, on a log scale,
  titled with the verdict and the fitted growth per layer (of the weight
  matrices, and of the biases and norm scales where the model has two or
  more: the fit that strays further from flat decides the verdict).

  Args:
    result: what `og.diagnose` returned.
    ax: the matplotlib `Axes` to draw on; a new figure's when None.

  Returns:
    The `Axes`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og, optax_guard.plot
    >>> params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    >>> d = og.diagnose(lambda p: jnp.sum(p["a"] @ (10.0 * p["b"])), params)
    >>> ax = og.plot.diagnosis(d)
    >>> ax.get_title()
    'healthy: growth 1x per layer toward the input'

  References:
    Glorot and Bengio, 2010, "Understanding the difficulty of training deep
    feedforward neural networks".
  """
  if not isinstance(result, _diagnose.Diagnosis):
    raise TypeError("Expected what og.diagnose returns (a Diagnosis), but "
                    f"got {type(result).__name__}.")
  ax = _axes(ax)
  depth = np.arange(len(result.layers))
  ax.semilogy(depth, result.grad_norms, marker="o", label="gradient norm")
  ax.semilogy(depth, result.param_norms, marker=".", linestyle="--",
              label="parameter norm")
  bad = depth[result.nonfinite > 0]
  for i, d in enumerate(bad):
    ax.axvline(d, color="red", alpha=0.3,
               label="NaN/Inf gradient" if i == 0 else None)
  ax.set_xticks(depth)
  ax.set_xticklabels(result.layers, rotation=90, fontsize="x-small")
  ax.set_xlabel("depth (input side first)")
  title = result.verdict
  if np.isfinite(result.growth):  # (NaN where no fit could be made)
    title += f": growth {result.growth:.3g}x per layer toward the input"
  if np.isfinite(result.bias_growth):
    title += f" ({result.bias_growth:.3g}x over the biases and norm scales)"
  ax.set_title(title)
  ax.legend(fontsize="small")
  return ax

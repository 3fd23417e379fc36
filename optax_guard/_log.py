"""`MetricsLog`: every step's statistics, kept without stalling the device."""

from __future__ import annotations

import collections
import operator
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from optax_guard import _args
from optax_guard import _metrics
from optax_guard import _stats

# A monitor's histogram, `<prefix><kind>/hist[.k]/<layer>` (and not a layer
# whose path holds `hist`: `grad/norm/hist/w`).
_HISTOGRAM = re.compile(r"(grad|update)/hist(\.\d+)?/")


def _device_copy(tree: Any) -> Any:
  """`tree` with each array copied where it lives, so that the statistics
  outlive the state they came from: a training step usually donates its
  optimizer state, which deletes the state's buffers once the next step
  runs. (Not by a `jax.jit`: one computation takes its arrays on one set of
  devices, but a multi-host state mixes this process's own copies of the
  replicated statistics with any statistic split over every process, and
  under `jax.set_mesh` a jit wants the whole mesh's devices.)"""
  leaves, structure = jax.tree_util.tree_flatten(tree)
  at = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  copies = jax.device_put([leaves[i] for i in at],
                          [leaves[i].sharding for i in at], may_alias=False)
  for i, copy in zip(at, copies):
    leaves[i] = copy
  return structure.unflatten(leaves)


class _Column:
  """One metric over the steps: a NumPy array grown by doubling (a 0-d
  array per value would cost ~100 bytes of Python object per 4 of data)."""

  def __init__(self, values: np.ndarray):
    self._data, self._size = values, len(values)

  def append(self, value: np.ndarray) -> None:
    if self._size == len(self._data):
      grown = np.empty((max(16, 2 * self._size),) + value.shape, value.dtype)
      grown[:self._size] = self._data[:self._size]
      self._data = grown
    self._data[self._size] = value
    self._size += 1

  def array(self) -> np.ndarray:
    return self._data[:self._size].copy()

  @property
  def row_shape(self) -> tuple[int, ...]:
    return self._data.shape[1:]

  @property
  def dtype(self) -> np.dtype:
    return self._data.dtype

  def truncate(self, size: int) -> None:
    self._size = min(self._size, size)


def _step_number(given: Any, name: str, *, minimum: int, allowed: str
                 ) -> int:
  """`given` as an int (Python, NumPy and JAX integers; not bools or
  floats), refused in a sentence unless it is >= `minimum`."""
  try:
    if isinstance(given, (bool, np.bool_)):
      raise TypeError
    number = operator.index(given)
  except TypeError:
    number = None
  if number is None or number < minimum:
    raise ValueError(f"`{name}` must be {allowed}, but got {given!r}.")
  return number


class MetricsLog:
  """Records `og.metrics` after every step, with no per-step host sync.

  `record(opt_state)` takes the state a jitted step returned and keeps a
  copy of its statistics on the device (one small asynchronous computation;
  the wrapped optimizer's moments are never touched). The copies are
  fetched to the host `lag` records later, so the device never waits for
  the host: `record` waits at most for the step `lag` records back, while
  the `lag` steps after it are already queued (the host then stays up to
  `lag` steps ahead of the device; raise `lag` to let it run further). Works with donated states (the copy
  survives the donation), Flax nnx optimizer states, sharded states (a
  replicated statistic is read from one local copy) and states already
  fetched to the host. A state from `pmap` (or an ensemble's, under
  `vmap`) is recorded with one value per device (or member) in every
  metric; one log takes states of one device layout. The states a
  `lax.scan` over several steps returns (one per step, stacked) are
  several records: record each, `log.record(jax.tree.map(lambda x: x[i],
  states))` for each step `i`, not the stack (it would be taken as one
  step of a state from `pmap`).

  Read the record with `to_numpy()` (one array per metric, steps first),
  `to_pandas()` (needs pandas, which this package does not install), or
  `save(path)` / `MetricsLog.load(path)` (a NumPy `.npz` file); or stream
  it to a logger with `on_row`, which sees every step's metrics as they
  reach the host (call `flush()` at the end for the last `lag` steps).

  Args:
    lag: how many of the latest records stay on the device before being
      fetched; 0 fetches at once (a host sync per step).
    on_row: if given, called as `on_row(step, metrics)` with each step's
      metrics (a dict of NumPy values) when they reach the host, in step
      order, e.g. `lambda step, m: wandb.log(m, step=step)`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.guard(og.sgd(0.1), max_norm=1.0, spike_sigma=None)
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> step = jax.jit(tx.update, donate_argnums=1)
    >>> log = og.MetricsLog()
    >>> for g in (0.3, 4.0, float("nan")):
    ...   _, state = step({"w": jnp.full(2, g)}, state, params)
    ...   log.record(state)
    >>> m = log.to_numpy()
    >>> print(m["step"], m["optim/num_clipped"], m["optim/skipped"])
    [0 1 2] [0 1 1] [False False  True]

  References:
    The user guide's "Every step's metrics"; JAX's asynchronous dispatch
    (https://docs.jax.dev/en/latest/async_dispatch.html).
  """

  def __init__(self, *, lag: int = 2,
               on_row: Callable[[int, dict[str, np.ndarray]], Any] | None
               = None):
    _args.check_int("lag", lag, minimum=0)
    if on_row is not None and not callable(on_row):
      raise ValueError(
          f"`on_row` must be a callable taking (step, metrics), or None, but "
          f"got {on_row!r}.")
    self._lag = lag
    self._on_row = on_row
    self._pending: collections.deque[tuple[int, Any]] = collections.deque()
    self._steps: list[int] = []
    self._columns: dict[str, _Column] = {}
    self._next_step = 0
    self._structure: Any = None  # of the last state recorded
    self._shapes: list[Any] = []  # and its leaves' shapes and dtypes

  def __len__(self) -> int:
    """The number of steps recorded."""
    return len(self._steps) + len(self._pending)

  def record(self, opt_state: Any, step: int | None = None) -> None:
    """Records the statistics in `opt_state` (see the class docstring).

    Args:
      opt_state: an optimizer state returned by a step (not a traced one).
      step: the step number to file them under; by default one more than
        the last one (0, 1, 2, ... from a new log).
    """
    states = _metrics.statistics(opt_state)
    if _metrics.is_traced(states) or _metrics.is_abstract(states):
      raise ValueError(
          "MetricsLog.record takes the optimizer state that a jitted step "
          "returned, but got traced (or abstract) values; call it after the "
          "step, outside jit.")
    if not jax.tree_util.tree_leaves(states):
      if _metrics.holds_unwrapped_states(opt_state):
        raise ValueError(
            "MetricsLog.record found optax_guard states turned into plain "
            "mappings, which say nothing about what their numbers are: "
            f"{_metrics.PASS_THE_STATE}.")
      raise ValueError(
          "MetricsLog.record found no optax_guard statistics in the "
          "optimizer state; record the state of an optimizer that contains "
          "og.guard, og.monitor or another optax_guard transformation.")
    # The metric names are static: a state of another structure, or with
    # leaves of other shapes (another device layout), holds other columns
    # (said now, not `lag` steps later when the row is fetched).
    structure = jax.tree.structure(states)
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(states)]
    if ((self._structure is not None and
         (structure, shapes) != (self._structure, self._shapes)) or
        (self._structure is None and self._columns)):  # after `load`
      self._check_new_structure(states)
    self._structure, self._shapes = structure, shapes
    if step is not None:
      step = _step_number(step, "step", minimum=self._next_step,
                          allowed=f"an integer >= {self._next_step} (steps "
                          f"must increase)")
    step = self._next_step if step is None else step
    self._next_step = step + 1
    # A replicated multi-host statistic is copied from its local copy: the
    # record then needs no other process (any other needs them all).
    states = _metrics.local_copies(states)
    states = _device_copy(states)
    self._pending.append((step, states))
    while len(self._pending) > self._lag:
      self._fetch_oldest()

  def flush(self) -> None:
    """Fetches every record still on the device (handing each to
    `on_row`); for the end of training, when nothing more is recorded."""
    while self._pending:
      self._fetch_oldest()

  def truncate(self, last_step: int) -> None:
    """Forgets every record of a step after `last_step`.

    For training resumed from a checkpoint older than the log: the steps
    after the checkpoint are recorded again, and the log must not hold
    them twice (`record` refuses a step number that goes back).

    The rows already handed to `on_row` are not taken back: the steps
    recorded again are handed to it again.

    Args:
      last_step: the last step to keep (an int, or an integer scalar such
        as a checkpoint's step array); -1 forgets every record.

    Example:
      >>> import jax.numpy as jnp, optax_guard as og
      >>> tx = og.clip_by_global_norm(1.0)
      >>> state = tx.init({"w": jnp.ones(2)})
      >>> log = og.MetricsLog()
      >>> for _ in range(5):
      ...   log.record(state)
      >>> log.truncate(2)  # resume from the checkpoint taken at step 2
      >>> log.record(state)
      >>> print(log.to_numpy()["step"])
      [0 1 2 3]
    """
    last_step = _step_number(last_step, "last_step", minimum=-1,
                             allowed="an integer >= -1 (the last step to "
                             "keep)")
    self._pending = collections.deque(
        (step, states) for step, states in self._pending
        if step <= last_step)
    keep = sum(step <= last_step for step in self._steps)
    del self._steps[keep:]
    for column in self._columns.values():
      column.truncate(keep)
    self._next_step = min(self._next_step, last_step + 1)

  def _check_new_structure(self, states: Any) -> None:
    """Raises (from `record`) if `states` holds other metrics than the
    recorded ones, or of other shapes or dtypes; a mere change of structure
    (a new tree around the same statistics) passes."""
    def layout(named):
      return {name: (np.shape(v), np.dtype(v.dtype))
              for name, v in named.items()}
    if self._columns:
      before = {name: (c.row_shape, c.dtype)
                for name, c in self._columns.items()}
    else:
      before = layout(_metrics.named(self._pending[0][1])
                      if self._pending else {})
    got = layout(_metrics.named(states))
    self._check_names(set(got), set(before), self._next_step)
    for name in sorted(set(before) & set(got)):
      if got[name] != before[name]:
        (shape, dtype), (was, was_dtype) = got[name], before[name]
        raise ValueError(
            f"The optimizer state recorded at step {self._next_step} holds "
            f"{name!r} of shape {shape} ({dtype}), but the steps before it "
            f"hold shape {was} ({was_dtype}); record states of one device "
            f"layout in one MetricsLog (a `pmap`ped state has one value "
            f"per device; the states a `lax.scan` stacks are one record "
            f"per step: record `jax.tree.map(lambda x: x[i], states)` for "
            f"each step `i`).")

  @staticmethod
  def _check_names(got: set[str], before: set[str], step: int) -> None:
    if before and got != before:
      added = sorted(got - before)[:3]
      gone = sorted(before - got)[:3]
      raise ValueError(
          f"The optimizer state recorded at step {step} holds other metrics "
          f"than the steps before it (new: {added or 'none'}; missing: "
          f"{gone or 'none'}); use one MetricsLog per optimizer.")

  def _fetch_oldest(self) -> None:
    step, states = self._pending.popleft()
    row = _metrics.named(_metrics.to_host(states))
    if self._steps:
      self._check_names(set(row), set(self._columns), step)
    row = {name: np.asarray(value) for name, value in row.items()}
    for name, value in row.items():
      if name not in self._columns:
        self._columns[name] = _Column(np.empty((0,) + value.shape,
                                               value.dtype))
      self._columns[name].append(value)
    self._steps.append(step)
    if self._on_row is not None:
      self._on_row(step, row)

  def to_numpy(self) -> dict[str, np.ndarray]:
    """Every metric over the recorded steps.

    Returns:
      A dict with `"step"` (the step numbers) and, for each metric of
      `og.metrics`, an array whose first axis runs over the steps.
    """
    self.flush()
    out = {"step": np.asarray(self._steps, np.int64)}
    out.update({name: column.array()
                for name, column in self._columns.items()})
    return out

  def to_pandas(self) -> Any:
    """The record as a `pandas.DataFrame`, one row per step.

    Scalar metrics are columns under their names; a histogram gives one
    column per bucket, `<name>/<bucket>`, and a state with leading axes (a
    `pmap`ped state, a vmapped ensemble) one per device or member,
    `<name>[i]` (`<name>[i,j]` for two axes; `<name>[i]/<bucket>` for a
    histogram), which no layer name can be.

    Returns:
      A `pandas.DataFrame` indexed by `step`.
    """
    try:
      import pandas as pd  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "MetricsLog.to_pandas needs pandas, which optax_guard does not "
          "install; run `pip install pandas`, or use to_numpy().") from e
    data = self.to_numpy()
    steps = data.pop("step")
    columns = {}
    for name, values in data.items():
      # (Not `-1`: a log with no rows, after `truncate(-1)`, has none.)
      flat = values.reshape(len(values), int(np.prod(values.shape[1:])))
      if values.ndim == 1:
        columns[name] = values
        continue
      # A histogram's buckets are `<name>/<edge>`; a pmapped or vmapped
      # state's devices or members `<name>[i]` (`[i,j]` for both), which no
      # layer name can be (layers of a list are named "0", "1", ...).
      hist = (_HISTOGRAM.search(name) is not None and
              values.shape[-1] == len(_stats.HIST_BUCKETS))
      lead = values.shape[1:-1] if hist else values.shape[1:]
      members = [f"[{','.join(map(str, i))}]" if i else ""
                 for i in np.ndindex(*lead)]
      labels = ([f"{m}/{edge}" for m in members
                 for edge in _stats.HIST_BUCKETS] if hist else members)
      for j, label in enumerate(labels):
        columns[f"{name}{label}"] = flat[:, j]
    return pd.DataFrame(columns, index=pd.Index(steps, name="step"))

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the record to `path` as a NumPy `.npz` file (see `load`).

    Args:
      path: the file to write (NumPy appends `.npz` if it is missing).
    """
    np.savez(path, **self.to_numpy())

  @classmethod
  def load(cls, path: str | os.PathLike[str], *, lag: int = 2,
           on_row: Callable[[int, dict[str, np.ndarray]], Any] | None = None
           ) -> "MetricsLog":
    """Reads a record written by `save`; `record` can then go on adding to it.

    Args:
      path: the `.npz` file (the `.npz` may be left out, as for `save`).
      lag: as for `MetricsLog`.
      on_row: as for `MetricsLog`; it sees the steps recorded from now on
        (the saved ones were streamed when they were recorded).

    Returns:
      A `MetricsLog` holding the saved steps.
    """
    log = cls(lag=lag, on_row=on_row)
    if not os.path.exists(path) and os.path.exists(f"{os.fspath(path)}.npz"):
      path = f"{os.fspath(path)}.npz"  # as `save` (NumPy) named it
    with np.load(path) as data:
      # NumPy stores each column as `<name>.npy` and also finds a file by a
      # key that ends in `.npy`: a layer `w.npy` would read layer `w`'s.
      read = lambda name: data[f"{name}.npy"]
      if "step" not in data:
        raise ValueError(
            f"{os.fspath(path)!r} is not a file written by MetricsLog.save: "
            "it has no 'step' array.")
      log._steps = [int(s) for s in read("step")]
      log._next_step = log._steps[-1] + 1 if log._steps else 0
      log._columns = {name: _Column(read(name)) for name in data.files
                      if name != "step"}
    return log

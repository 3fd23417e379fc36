"""`check`: turn what the guard recorded into an exception a user can act on."""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple
import warnings

import jax
import numpy as np

from optax_guard import _metrics
from optax_guard._adaptive import AdaptiveGradClipState
from optax_guard._adaptive import AutoclipState
from optax_guard._adaptive import ZclipState
from optax_guard._clipping import ClipByGlobalNormState
from optax_guard._clipping import ClipByLayerNormState
from optax_guard._guard import GuardState
from optax_guard._monitor import MonitorState
from optax_guard._nonfinite import REASON_GRADS
from optax_guard._nonfinite import REASONS
from optax_guard._nonfinite import SkipNonfiniteState
from optax_guard._nonfinite import ZeroNonfiniteState
from optax_guard._penalties import AddGradientNormPenaltyState
from optax_guard._spikes import SkipSpikesState

_MAX_LAYERS = 3  # layers named in a message


class GuardError(RuntimeError):
  """A training step went wrong.

  Attributes: `step` (-1 where the state counts no steps: a clip alone) and
  `layers`, the layers the message names: for `NonFiniteGradientError` the
  first bad ones with their NaN/Inf element counts (with their NaN/Inf
  norms where `clip_by_layer_norm` alone saw them), for
  `GradientExplosionError` the one that moved most against its own history
  with its z-score (when a monitor records them, `zscore=True`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.skip_nonfinite(optax.sgd(0.1))
    >>> _, state = tx.update({"w": jnp.array([jnp.nan, 1.0])},
    ...                      tx.init(params), params)
    >>> try:
    ...   og.check(state)
    ... except og.GuardError as e:
    ...   print(type(e).__name__, e.step, e.layers)
    NonFiniteGradientError 0 {'w': 1}

  References:
    Raised by `check`.
  """

  def __init__(self, message: str, step: int, layers: dict[str, Any]):
    super().__init__(message)
    self.step = step
    self.layers = layers

  def __reduce__(self):
    # Whole across processes (multiprocessing, pytest-xdist) and `copy`:
    # the default would call `__init__` with the message alone.
    return type(self), (str(self), self.step, self.layers), self.__dict__


class NonFiniteGradientError(GuardError):
  """The gradients, the loss, the update or the parameters held NaN or Inf.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> issubclass(og.NonFiniteGradientError, og.GuardError)
    True

  References:
    Raised by `check`; see `GuardError` for its attributes.
  """


class GradientExplosionError(GuardError):
  """The gradient norm or the loss spiked far above its recent history.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"w": jnp.ones(2)}
    >>> tx = og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2)
    >>> state = tx.init(params)
    >>> for g in (1.0, 1.1, 1.0, 50.0):  # norms sqrt(2) * g
    ...   _, state = tx.update({"w": jnp.full(2, g)}, state, params)
    >>> try:
    ...   og.check(state)
    ... except og.GradientExplosionError as e:
    ...   print(e.step, str(e).split(" (")[0])
    3 Step 3: the gradient norm 70.71 exceeded the spike threshold 1.861

  References:
    Raised by `check`; see `GuardError` for its attributes.
  """


def _numbers_as_numbers(name: str) -> tuple[Any, ...]:
  """Sort key: digit runs compare as integers (`Dense_2` before `Dense_10`)."""
  return tuple(int(part) if part.isdecimal() else part
               for part in re.split(r"(\d+)", name))


@functools.lru_cache(maxsize=16)  # one tree's names, check after check
def _stack_roots(names: tuple[str, ...]) -> dict[str, str]:
  """The stacked root of each stacked leaf, from the names alone.

  A stacked leaf's layers are named `<leaf>/<index>`; its root is its
  highest ancestor all of whose leaves are stacked as deep
  (`blocks/Dense_0/kernel/3` under `nn.scan`: `blocks`, when nothing
  unstacked lives under `blocks`). Names cannot tell two stacks of the
  same depth under one parent with nothing else from one stack: their
  layers are then listed block by block across both.
  """
  depth: dict[str, Any] = {}  # leaf -> its number of blocks (None: plain)
  for name in names:
    head, sep, index = name.rpartition("/")
    if sep and index.isdecimal():
      depth[head] = max(depth.get(head) or 0, int(index) + 1)
    else:
      depth[name] = None
  roots = {}
  for leaf, blocks in depth.items():
    if blocks is None:
      continue
    root = leaf
    parts = leaf.split("/")
    for cut in range(len(parts) - 1, 0, -1):
      above = "/".join(parts[:cut])
      under = [d for other, d in depth.items()
               if other.startswith(above + "/")]
      if any(d != blocks for d in under):
        break
      root = above
    roots[leaf] = root
  return roots


@functools.lru_cache(maxsize=16)
def _ranks(names: tuple[str, ...]) -> dict[tuple[str, ...], dict[str, int]]:
  """Each path component's rank among its siblings, from `names` in the
  tree's order: that order (a dataclass's or NamedTuple's fields as
  declared, an Equinox module's, a list's), except where the siblings come
  in string order, as JAX sorts a dict's keys: there numbers count as
  numbers (`Dense_2` before `Dense_10`)."""
  children: dict[tuple[str, ...], dict[str, None]] = {}
  for name in names:
    parts = name.split("/")
    for i, part in enumerate(parts):
      children.setdefault(tuple(parts[:i]), {})[part] = None
  ranks = {}
  for parent, kids in children.items():
    order = list(kids)
    if order == sorted(order):
      order.sort(key=_numbers_as_numbers)
    ranks[parent] = {kid: rank for rank, kid in enumerate(order)}
  return ranks


def _model_order(name: str, roots: dict[str, str],
                 ranks: dict[tuple[str, ...], dict[str, int]]
                 ) -> tuple[Any, ...]:
  """Sort key in the model's layer order as far as the tree tells it (see
  `_ranks`), and the layers of a stacked leaf (`blocks/kernel/3`,
  `blocks/Dense_0/kernel/3`) by their block index under their stacked root
  (`roots`, from `_stack_roots`) before the rest of their path, so that
  block 2's parameters come before block 9's."""
  head, sep, index = name.rpartition("/")
  stacked = bool(sep and index.isdecimal() and head in roots)
  parts = (head if stacked else name).split("/")
  place = tuple(ranks[tuple(parts[:i])][part] for i, part in enumerate(parts))
  if stacked:
    depth = roots[head].count("/") + 1
    return (place[:depth], int(index), place[depth:])
  return (place, -1, ())


def _bad_layers(counts: _metrics.PerLayer | None) -> dict[str, int]:
  """The layers holding NaN/Inf, with their counts, in the model's layer
  order as far as names tell it: the tree orders `Dense_10` before
  `Dense_2`, which would name the wrong layers first."""
  if counts is None:  # not recorded per layer (`per_layer=False`)
    return {}
  values = np.asarray(counts.values)
  bad = [(name, int(c)) for name, c in zip(counts.names, values) if c > 0]
  return in_model_order(bad, counts.names)


def in_model_order(items: list[tuple[str, Any]], names: tuple[str, ...]
                   ) -> dict[str, Any]:
  """`items` (layer, value) as a dict in the model's layer order, `names`
  being all the layers of their tree, in its order."""
  roots, ranks = _stack_roots(tuple(names)), _ranks(tuple(names))
  return dict(sorted(items,
                     key=lambda item: _model_order(item[0], roots, ranks)))


def _describe(layers: dict[str, int]) -> str:
  if not layers:
    return ""
  named = ", ".join(f"{n} ({c} NaN/Inf)" for n, c in
                    list(layers.items())[:_MAX_LAYERS])
  more = len(layers) - _MAX_LAYERS
  if more <= 0:
    return f"; first bad layers: {named}"
  # The last too: a NaN made in the backward pass spreads to every layer
  # before it, so where it started is often the last bad layer, not the first.
  last, count = list(layers.items())[-1]
  return (f"; first bad layers: {named} and {more} more, the last being "
          f"{last} ({count} NaN/Inf)")


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


def _nonfinite_error(s: SkipNonfiniteState) -> GuardError | None:
  if not (bool(s.skipped) or bool(s.halted)):
    return None
  step = int(s.last_bad_step)
  layers = _bad_layers(s.last_bad_counts)
  counts = (f"{int(s.consecutive)} bad in a row, " if int(s.consecutive)
            else "") + f"{int(s.num_skipped)} skipped in total"
  if bool(s.halted):
    # The state does not say whether `resume_after_halt` was given.
    what = (f"has halted ({counts}): it applies no update until the "
            "optimizer state is re-initialised, or, with "
            "`resume_after_halt=True`, until a finite step")
  else:
    what = f"skipped the step ({counts})"
  reason = REASONS[int(s.last_bad_reason)]
  now = int(s.step) - 1
  if bool(s.halted) and now > step:
    # A later step, skipped only because the guard has halted: named as
    # itself, so that a log of these errors does not file the old step again.
    return NonFiniteGradientError(
        f"Step {now}: skipped: the guard has halted ({counts}). The last bad "
        f"step was step {step}: {reason}{_describe(layers)}. It applies no "
        "update until the optimizer state is re-initialised "
        "(`resume_after_halt=True` would have resumed at this finite step).",
        now, layers)
  return NonFiniteGradientError(
      f"Step {step}: {reason}{_describe(layers)}. The guard {what}.",
      step, layers)


def _above(what: str, value: float, limit: float, mean: Any,
           std: Any) -> str:
  """Words for a spike: how far above its history `value` was."""
  mean, std = float(mean), float(std)
  if std > 0:
    how_far = (f"{(value - mean) / std:.3g} standard deviations above its "
               f"recent mean {mean:.4g}")
  else:
    how_far = f"its recent values were all {mean:.4g}"
  return (f"the {what} {value:.4g} exceeded the spike threshold {limit:.4g} "
          f"({how_far})")


def _spike_error(s: SkipSpikesState, monitor: MonitorState | None = None,
                 steps_seen: int = 0) -> GuardError | None:
  """`steps_seen`: the most training steps a `skip_nonfinite` has seen."""
  if not bool(s.skipped):
    return None
  step = int(s.last_spike_step)
  if steps_seen > int(s.step):
    # Inside `skip_nonfinite`, which hides its skipped NaN/Inf steps from
    # it, `skip_spikes` numbers only the steps that reached it; the spike
    # skipped is the latest training step (after a NaN/Inf one, the non-
    # finite error is raised instead).
    step = steps_seen - 1
  norm, limit = float(s.last_norm), float(s.norm_threshold)
  loss = float(s.last_loss)
  finite = np.isfinite(norm) and np.isfinite(loss)
  if np.isnan(norm):
    why = "the gradient norm is nan (the gradients hold NaN)"
  elif not np.isfinite(norm):
    why = ("the gradient norm is inf (the gradients hold Inf, or their norm "
           "is beyond float32's range)")
  elif not np.isfinite(loss):
    why = f"the loss is {loss}"
  elif norm > limit:
    why = _above("gradient norm", norm, limit, s.norm_mean, s.norm_std)
  else:
    why = _above("loss", loss, float(s.loss_threshold), s.loss_mean,
                 s.loss_std)
  run = int(s.consecutive)  # finite spikes in a row (NaN/Inf not counted)
  if run == 0 or not finite:
    what = ""
  elif (int(s.norms.num_accepted) == 0 and
        int(s.losses.num_accepted) == 0):  # `max_consecutive` emptied both
    what = (f"{_plural(run, 'spike')} in a row, enough to restart the spike "
            "history, which now warms up again on the new scale; ")
  else:
    what = f"{_plural(run, 'spike')} in a row, "
  # A NaN/Inf step is a non-finite problem, whichever part skipped it.
  error = GradientExplosionError if finite else NonFiniteGradientError
  layer, layers = _spike_layer(monitor, step) if finite else ("", {})
  return error(
      f"Step {step}: {why}{layer}. "
      f"The guard skipped the step ({what}{int(s.num_spikes)} in total).",
      step, layers)


# The z-score above which `check` names a layer as the one that moved most:
# below, every layer is within its own noise.
_NAMED_ZSCORE = 3.0


def _spike_layer(monitor: MonitorState | None, step: int
                 ) -> tuple[str, dict[str, float]]:
  """Words naming the layer that moved most, and `{layer: z-score}`, when
  `monitor` (one with `zscore=True` on the gradients) measured the
  gradients of `step`."""
  if (monitor is None or int(monitor.step) - 1 != step or
      not _measured_last(monitor)):
    return "", {}
  index = int(monitor.zscores.spike_layer)
  if index < 0:  # (the step's own finite norms are already counted)
    seen = int(np.max(monitor.zscores.steps, initial=1)) - 1
    return (f"; the per-layer z-scores cannot name a layer yet (they were "
            f"still warming up, after {_plural(seen, 'finite step')})"), {}
  names = monitor.zscores.zscores.names
  values = np.asarray(monitor.zscores.zscores.values)
  name, z = names[index], float(values[index])
  if z > _NAMED_ZSCORE:
    return (f"; the layer that moved most against its own history: {name} "
            f"(z-score {z:.3g})"), {name: z}
  # No layer with a history rose clearly (a noise-sized z-score names
  # nobody). The culprit may be one whose history began later and is still
  # warming up (its z-score reads 0): an expert routed nothing at first, a
  # layer unfrozen by a schedule.
  steps = np.broadcast_to(np.asarray(monitor.zscores.steps), values.shape)
  later = [n for n, v, t in zip(names, values, steps)
           if v == 0 and t < steps[index]]
  if not later:
    return "", {}
  shown = ", ".join(later[:_MAX_LAYERS]) + (
      f" and {len(later) - _MAX_LAYERS} more" if len(later) > _MAX_LAYERS
      else "")
  return (f"; no layer rose clearly against its own history (the largest "
          f"z-score is {name}'s, {z:.3g}), but the per-layer z-scores cannot "
          f"name a layer whose history began later and is still warming up: "
          f"{shown}"), {}


def _measured_last(s: MonitorState) -> bool:
  """Whether the monitor measured the last step (`every` may skip it)."""
  return int(s.step) >= 1 and (int(s.step) - 1) % s.naming.every == 0


# Said of NaN/Inf gradients after a penalty that received finite ones.
_PROBED = (" The gradients were finite where og.add_gradient_norm_penalty "
           "received them (norm {norm:.4g}): the gradients at its probe, "
           "`params + radius * g / |g|`, hold NaN/Inf (a point outside the "
           "loss's domain?); a smaller `radius` keeps the probe closer.")

_NOTHING_SKIPS = ("Nothing in this chain skips such a step unless a "
                  "`skip_nonfinite` or `guard`{given} stands around the "
                  "optimizer.")

_GUARD_DOES_NOT_SKIP = ("The guard applied the step: it was built with "
                        "`skip_nonfinite=False`{spikes}; pass "
                        "`skip_nonfinite=True` to skip such steps.")


def _monitor_error(s: MonitorState, skipped: str = "",
                   loss_reported: bool = False,
                   unskipped: str = "") -> GuardError | None:
  """`skipped`: what skipped a non-finite step, if something did;
  `loss_reported`: a skip in the chain reports a bad loss itself;
  `unskipped`: what to say where nothing did (`_NOTHING_SKIPS` if empty)."""
  step = int(s.step) - 1
  # What it holds of the gradients may be older than the last step (`every`).
  measured = _measured_last(s)
  layers = _bad_layers(s.nonfinite)
  kind = "gradients" if s.naming.kind == "grad" else "updates"
  action = skipped or unskipped or _NOTHING_SKIPS.format(given="")
  if measured and int(s.num_nonfinite) > 0:
    return NonFiniteGradientError(
        f"Step {step}: the {kind} hold "
        f"{_plural(int(s.num_nonfinite), 'NaN/Inf element')}"
        f"{_describe(layers)}. {action}", step, layers)
  if measured and not np.isfinite(float(s.norm)):
    return NonFiniteGradientError(
        f"Step {step}: finite {kind} whose global norm overflows float32 "
        f"(above ~3.4e38; a clip cannot scale them and passes them on). "
        f"{action}", step, {})
  if step >= 0 and not loss_reported and not np.isfinite(float(s.loss)):
    return NonFiniteGradientError(
        f"Step {step}: the loss is {float(s.loss)}. "
        f"{unskipped or _NOTHING_SKIPS.format(given=' given `loss=`')}",
        step, {})
  return None


def _zero_error(s: ZeroNonfiniteState) -> GuardError | None:
  """zero_nonfinite replaced NaN/Inf elements at the last step (it counts
  no steps: the error's step is -1, as for a clip)."""
  layers = _bad_layers(s.replaced)
  n = _total(s.replaced)
  if n == 0:
    return None
  return NonFiniteGradientError(
      f"The last step's gradients held {_plural(n, 'NaN/Inf element')}"
      f"{_describe(layers)}: og.zero_nonfinite replaced them with zeros and "
      "the step went on.", -1, layers)


def _dropped(s: _metrics.ApplyIfFiniteView) -> str:
  return (f"optax.apply_if_finite dropped the step ({int(s.in_a_row)} in a "
          f"row, {int(s.total)} in total), unless more than its "
          "`max_consecutive_errors` came in a row.")


def _dropped_in(scope: tuple[Any, ...],
                drops: list[tuple[tuple[Any, ...], Any]]) -> str:
  """What to say of a NaN/Inf step seen at `scope`, given the `(scope,
  view)` of each `optax.apply_if_finite` that dropped this call's updates:
  one around the whole of `scope` dropped it; one over a part of it only
  (a `multi_transform` part, `optax.masked`) dropped that part's, and which
  layers those are, its state does not say."""
  for where, s in drops:
    if _within(scope, where):
      return _dropped(s)
  for where, s in drops:
    if _within(where, scope):
      return (f"An optax.apply_if_finite over a part of the model dropped "
              f"that part's update ({int(s.in_a_row)} in a row, "
              f"{int(s.total)} in total); the other parts' went on unless "
              "something else skipped them.")
  return ""


def _aif_error(s: _metrics.ApplyIfFiniteView) -> GuardError | None:
  """optax.apply_if_finite saw NaN/Inf updates at the latest call (said
  where no monitor ahead of it measured them)."""
  if bool(s.last_finite):
    return None
  return NonFiniteGradientError(
      f"The updates that reached optax.apply_if_finite hold NaN/Inf: "
      f"{_dropped(s)} It counts no steps, so the error's `step` is -1.",
      -1, {})


def _microbatch_error(s: _metrics.MultiStepsView) -> GuardError | None:
  """optax.MultiSteps dropped the latest micro-batch."""
  if s.skipped is None or not bool(s.skipped):
    return None
  step, micro = int(s.step), int(s.micro_step)
  what = (f"Step {step}, micro-batch {micro}: optax.MultiSteps dropped the "
          "micro-batch")
  if s.nonfinite is not None and int(s.nonfinite) > 0:
    return NonFiniteGradientError(
        f"{what}, whose gradients hold "
        f"{_plural(int(s.nonfinite), 'NaN/Inf element')}; "
        "the step accumulates the other micro-batches.", step, {})
  return GradientExplosionError(
      f"{what}, which its `should_skip_update_fn` flagged; the step "
      "accumulates the other micro-batches.", step, {})


# The clips, by their factories' names. They count no steps, and a monitor
# or a skipper in the same chain says more (the layers, what was done), so a
# clip is read only where nothing else is.
_CLIPS = {ClipByGlobalNormState: "clip_by_global_norm",
          ClipByLayerNormState: "clip_by_layer_norm",
          AdaptiveGradClipState: "adaptive_grad_clip",
          AutoclipState: "autoclip", ZclipState: "zclip"}


def _clip_error(s: Any) -> GuardError | None:
  """A clip saw NaN/Inf (or an overflowing norm) at the last step and
  passed the gradients on unscaled."""
  who = f"og.{_CLIPS[type(s)]}"
  layers: dict[str, float] = {}
  if isinstance(s, ClipByLayerNormState):
    names, norms = s.layer_norms.names, np.asarray(s.layer_norms.values)
    layers = in_model_order([(n, float(v)) for n, v in zip(names, norms)
                             if not np.isfinite(v)], names)
    if not layers:
      return None
    bad = list(layers)
    shown = ", ".join(bad[:_MAX_LAYERS])
    if len(bad) > _MAX_LAYERS:  # the last too, as `_describe` says why
      shown += f" and {len(bad) - _MAX_LAYERS} more, the last being {bad[-1]}"
    what = f"{_plural(len(bad), 'layer')} with a NaN/Inf norm ({shown})"
    overflow = not all(map(np.isnan, layers.values()))
  else:
    clip = s.clip if isinstance(s, (AutoclipState, ZclipState)) else s
    norm = float(clip.grad_norm)
    if np.isfinite(norm):
      return None
    overflow = not np.isnan(norm)
    what = f"a global norm of {norm} " + (
        "(Inf elements, or finite ones whose norm is beyond float32's range)"
        if overflow else "(NaN elements)")
  # An Inf norm may come from finite elements, which optax.apply_if_finite
  # lets through, huge and unscaled.
  outcome = ("the update is NaN/Inf, or huge where the elements were "
             "finite, unless something after it skips the step "
             "(og.skip_nonfinite or og.guard around the optimizer; "
             "optax.apply_if_finite skips only NaN/Inf elements)"
             if overflow else
             "the update is NaN unless something after it skips the step "
             "(og.skip_nonfinite or og.guard around the optimizer, or "
             "optax.apply_if_finite)")
  return NonFiniteGradientError(
      f"The last step's gradients had {what}: {who} cannot scale them and "
      f"passed them on, so {outcome}.", -1, layers)


_CHECKS = {SkipNonfiniteState: _nonfinite_error,
           SkipSpikesState: _spike_error,
           MonitorState: _monitor_error,
           _metrics.MultiStepsView: _microbatch_error,
           _metrics.ApplyIfFiniteView: _aif_error,
           ZeroNonfiniteState: _zero_error,
           **{clip: _clip_error for clip in _CLIPS}}

# Said where a NaN/Inf is reported inside an optax.MultiSteps whose skip
# state is empty (no `should_skip_update_fn`, or one that keeps none):
# its accumulator keeps a NaN (it is reset by multiplying it by 0).
_ACCUMULATED = (
    " Inside optax.MultiSteps, a NaN/Inf micro-batch that its "
    "`should_skip_update_fn` does not drop stays in its accumulator, and "
    "every later step is skipped: give it "
    "should_skip_update_fn=og.skip_nonfinite_microbatch() (with the "
    "guard's axis_name where the gradients are sharded).")


def _members(statistics: list[Any]
             ) -> list[tuple[tuple[int, ...], list[Any]]]:
  """`statistics` once per member of the leading axes that every state has
  (a `pmap`ped state, a `vmap`ped ensemble read outside the map, or both),
  each with its index on those axes; or once as it is, at index ()."""
  sizes = {np.shape(_metrics.unwrap(jax.tree_util.tree_leaves(s)[0]))[0]
           if _metrics.is_replicated(s) else None for s in statistics}
  if len(sizes) != 1 or None in sizes:
    return [((), statistics)]
  return [((i,) + index, member)
          for i in range(sizes.pop())
          for index, member in _members(
              [jax.tree.map(lambda x, i=i: x[i], s) for s in statistics])]


class _Context(NamedTuple):
  """Where a checked state sits: `monitor`, the one whose z-scores may name
  a spike's layer; `steps_seen`, the steps seen by a `skip_nonfinite`
  around or beside it (no optax.MultiSteps between them); `hint`, said
  after its non-finite errors (see `_ACCUMULATED`)."""
  monitor: Any = None
  steps_seen: int = 0
  hint: str = ""
  scope: tuple[Any, ...] = ()
  # What to say of a NaN/Inf step nothing skipped, when not `_NOTHING_SKIPS`
  # (a guard's own monitor: that guard was built not to skip).
  unskipped: str = ""


def _states(statistics: list[Any], scopes: list[tuple[Any, ...]]
            ) -> list[tuple[Any, _Context]]:
  """The checked states among `statistics` (`_metrics.statistics`' list, on
  the host, one member; `scopes`, theirs), with `guard`'s parts taken out
  of its state, each with its `_Context`: its monitor is its own guard's,
  else the nearest one before it that saw its layers (None if it has none:
  a monitor in another `optax.multi_transform` partition, or under an
  `optax.masked`, saw other layers). The states below an `optax.MultiSteps`
  whose latest call completed no step are left out: they still hold the
  step reported before."""
  scoring = lambda m: (m if m is not None and m.zscores is not None and
                       m.naming.kind == "grad" else None)
  nearest, nearest_scope = None, ()
  # The MultiSteps views the next states lie below, as [states left, view],
  # and the steps a skip_nonfinite has seen at each level (outside them,
  # then inside each).
  views: list[list[Any]] = []
  steps_seen = [0]
  # The `optax.apply_if_finite`s that dropped this call's updates (not those
  # below a MultiSteps that completed no step: they did not run), which a
  # monitor (or a guard that does not skip) ahead of them must know of.
  drops, pending = [], []
  probed = None  # (scope, words) of a penalty that received finite gradients
  for s, scope in zip(statistics, scopes):
    stale = any(not bool(v.completed) for _, v in views)
    hint = _ACCUMULATED if any(isinstance(v, _metrics.MultiStepsView) and
                               not v.skip_fn for _, v in views) else ""
    if probed is not None and _within(scope, probed[0]):
      hint = probed[1] + hint
    for level in views:
      level[0] -= 1
    if not stale:
      if (isinstance(s, _metrics.ApplyIfFiniteView) and
          not bool(s.last_finite)):
        drops.append((scope, s))
      if (isinstance(s, AddGradientNormPenaltyState) and
          np.isfinite(float(s.grad_norm))):
        probed = (scope, _PROBED.format(norm=float(s.grad_norm)))
      parts = ((s.nonfinite, s.spikes, s.monitor, s.clip)
               if isinstance(s, GuardState)
               else (s,) if type(s) in _CHECKS else ())
      own = scoring(s.monitor) if isinstance(s, GuardState) else None
      # A guard that skips says what it did itself; one built not to says
      # so, unless an apply_if_finite dropped the step (`_dropped_in`).
      skips = isinstance(s, GuardState) and s.nonfinite is not None
      not_skipping = ("" if not isinstance(s, GuardState) or skips else
                      _GUARD_DOES_NOT_SKIP.format(
                          spikes="" if s.spikes else
                          " and `spike_sigma=None`"))
      if isinstance(s, MonitorState) and scoring(s) is not None:
        nearest, nearest_scope = s, scope
      if not _within(scope, nearest_scope):
        nearest = None  # out of the part of the model it saw
      for part in (p for p in parts if p is not None):
        if isinstance(part, SkipNonfiniteState):
          steps_seen[-1] = max(steps_seen[-1], int(part.step))
        pending.append((part, _Context(own or nearest, steps_seen[-1],
                                       hint, scope), skips, not_skipping))
    while views and views[-1][0] == 0:
      views.pop()
      steps_seen.pop()
    if (isinstance(s, (_metrics.MultiStepsView, _metrics.ApplyIfFiniteView))
        and s.num_inner):
      views.append([s.num_inner, s])
      # Below apply_if_finite the steps go on counting (a MultiSteps' count
      # micro-batches apart).
      steps_seen.append(steps_seen[-1]
                        if isinstance(s, _metrics.ApplyIfFiniteView) else 0)
  return [(part, context._replace(unskipped="" if skips else (
      _dropped_in(context.scope, drops) or not_skipping)))
          for part, context, skips, not_skipping in pending]


def check(opt_state: Any) -> None:
  """Raises if the last step went wrong; returns quietly otherwise.

  Host side, after a step: fetches the statistics (one transfer, without any
  wrapped optimizer's moments) and looks at every guard state in it. Raises
  `NonFiniteGradientError` when the last step's gradients, loss, update or
  parameters held NaN/Inf (or the guard has halted), naming the step, the
  first layers that went bad with their counts (in the tree's order, but a
  dict's keys with numbers compared as numbers: `Dense_2` before
  `Dense_10`; a stacked leaf's layers block by block), and what the guard
  did. A clip (`clip_by_global_norm`,
  `clip_by_layer_norm`, `adaptive_grad_clip`, `autoclip`, `zclip`) that saw
  a NaN/Inf norm passed the gradients on unscaled: it is reported too, where
  nothing else reports the step (no skipper after it, no monitor that
  measured the step; it counts no steps, so the error's `step` is -1), and
  so is a `zero_nonfinite` that replaced NaN/Inf elements (naming the
  layers, `step` -1). A monitor's NaN/Inf count is left to what handled
  the step (a skip, a `zero_nonfinite`, a MultiSteps that dropped the
  micro-batch), except in layers that none of them watches (a guard in
  another `optax.multi_transform` part or under `optax.masked`, told where
  the monitor and the guard name layers alike): those went on to their
  part's optimizer, and that is raised first.
  Raises
  `GradientExplosionError` when the last step was skipped as a spike,
  naming the layer whose norm moved most against its own history when a
  monitor records per-layer z-scores (`zscore=True`). Non-finite problems
  are reported before spikes. A state with a leading axis on every leaf (a
  `pmap`ped state, or an ensemble trained under `vmap`) is checked member by
  member; where the members differ, the message names the first bad one.
  Inside `optax.MultiSteps` the states below it are read only on the calls
  that complete a step (so a bad step is reported once), and a micro-batch
  that its `should_skip_update_fn` dropped raises too (as non-finite for
  `optax.skip_not_finite` or `og.skip_nonfinite_microbatch`, else as an
  explosion). A NaN/Inf step that `optax.apply_if_finite` dropped is said
  to be its doing, and the states below it are not read on that call.
  Warns when `opt_state` holds no optax_guard
  state that watches for NaN/Inf or spikes (nothing to check: a plain optax
  state, a checkpoint restored without a target, or a chain whose only
  optax_guard parts are `clip_by_value`, decays or penalties).

  Args:
    opt_state: an optimizer state, on device or already fetched to the host.

  Returns:
    None.

  Raises:
    NonFiniteGradientError: NaN or Inf was seen at the last step, or the
      guard has halted.
    GradientExplosionError: the last step was skipped as a spike.
    ValueError: called inside `jit` (on traced values).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_nonfinite(optax.sgd(0.1))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
    >>> try:
    ...   og.check(state)
    ... except og.NonFiniteGradientError as e:
    ...   print(e)
    Step 0: non-finite gradients; first bad layers: w (1 NaN/Inf). The guard skipped the step (1 bad in a row, 1 skipped in total).

  References:
    equinox's error messages (https://docs.kidger.site/equinox/) for errors
    a user can act on.
  """
  # The statistics only: no wrapped optimizer's moments cross to the host.
  found = _metrics.statistics(opt_state)
  if _metrics.is_traced(found) or _metrics.is_abstract(found):
    raise ValueError(
        "og.check reads the state on the host, after a step, but got traced "
        "(or abstract) values: call it on the state the jitted step "
        "returned, outside jit (inside the step, return "
        "og.metrics(opt_state) instead).")
  watching = [s for s in found
              if isinstance(s, GuardState) or type(s) in _CHECKS and not (
                  isinstance(s, _metrics.MultiStepsView) and not s.skip_fn)]
  if not watching:
    hint = (_metrics.PASS_THE_STATE
            if not found and _metrics.holds_unwrapped_states(opt_state)
            else "put og.guard (or og.monitor, og.skip_nonfinite, "
            "og.skip_spikes) in the optimizer")
    # E.g. a Keras-style chain of og.clip_by_value and a decay alone.
    only = ", ".join(sorted({type(s).__name__ for s in found}))
    what = (f"found no optax_guard state in `opt_state` that watches for "
            f"NaN/Inf or spikes (only {only})" if found else
            "found no optax_guard state in `opt_state`")
    warnings.warn(f"og.check {what}, so it checks nothing: {hint}.",
                  stacklevel=2)
  members = _members(_metrics.to_host(found))
  scopes = _metrics.statistics_scopes(opt_state)
  errors = [_first_error(_states(member, scopes)) for _, member in members]
  bad = [(index, e) for (index, _), e in zip(members, errors)
         if e is not None]
  if not bad:
    return
  # Non-finite problems first, as within one member.
  index, error = min(bad, key=lambda b: (
      isinstance(b[1], GradientExplosionError), b[0]))
  if len({str(e) for e in errors}) > 1:  # members differ (not pmap replicas)
    where = (f"Member {index[0]} of the state's leading axis"
             if len(index) == 1 else
             f"Member {index} of the state's {len(index)} leading axes")
    error = type(error)(
        f"{where} ({len(members)} members, {len(bad)} of them bad): {error}",
        error.step, error.layers)
  raise error


def _params_error(states: list[tuple[Any, _Context]]) -> GuardError | None:
  """Non-finite parameters, which a monitor measured at its last step: the
  cause of whatever else went wrong, and past what any skip can mend."""
  for s, _ in states:
    if (isinstance(s, MonitorState) and _measured_last(s) and
        int(s.param_nonfinite) > 0):
      step = int(s.step) - 1
      return NonFiniteGradientError(
          f"Step {step}: the parameters hold "
          f"{_plural(int(s.param_nonfinite), 'NaN/Inf element')}; training "
          "cannot recover from this without a restore (gradients through "
          "them are NaN/Inf, and a skip would skip every step).", step, {})
  return None


def _first_error(states: list[tuple[Any, _Context]]) -> GuardError | None:
  """The error to raise for one member's checked states, or None."""
  poisoned = _params_error(states)
  if poisoned is not None:
    return poisoned
  clips = [(s, c) for s, c in states if type(s) in _CLIPS]
  states = [(s, c) for s, c in states if type(s) not in _CLIPS]
  # A monitor's NaN/Inf (or overflow) report is left to what handled the
  # step (a skip, a zero_nonfinite that replaced them, a MultiSteps that
  # dropped the micro-batch), which says what it did; it is reported only
  # for layers none of those watches (another part of the model).
  applied = []
  handlers = _handlers(states)
  if handlers:
    kept = []
    for s, c in states:
      # A handler at or above the monitor's part saw all it saw.
      covered = any(_within(c.scope, h) for h, _, _ in handlers)
      if isinstance(s, MonitorState) and (
          int(s.num_nonfinite) > 0 or
          (covered and not np.isfinite(float(s.norm)))):
        error = None if covered else _applied_error(s, handlers)
        applied += [error] if error else []
      else:
        kept.append((s, c))
    states = kept
  # Without one, a spike test skips a NaN/Inf step too: the monitor then
  # names the layers, and says so.
  by_spikes = [s for s, _ in states if isinstance(s, SkipSpikesState) and
               bool(s.skipped) and not np.isfinite(float(s.last_norm))]
  skipped = ""
  if by_spikes and any(isinstance(s, MonitorState) and
                       int(s.num_nonfinite) > 0 for s, _ in states):
    skipped = (f"The guard skipped the step (its spike test skips a NaN/Inf "
               f"norm; {int(by_spikes[0].num_spikes)} skipped in total).")
    states = [(s, c) for s, c in states if not any(s is b for b in by_spikes)]
  # A skip that saw a NaN/Inf loss skipped the step and says so; one that
  # did not skip never saw it (a wrapper that drops `loss=` before it).
  loss_reported = any(
      isinstance(s, (SkipNonfiniteState, SkipSpikesState)) and
      bool(s.skipped) for s, _ in states)

  def error_of(s: Any, context: _Context) -> GuardError | None:
    if isinstance(s, SkipSpikesState):
      error = _spike_error(s, context.monitor, context.steps_seen)
    elif isinstance(s, MonitorState):
      error = _monitor_error(s, skipped, loss_reported, context.unskipped)
    else:
      error = _CHECKS[type(s)](s)
    kind = _nonfinite_gradients(s)
    if isinstance(error, NonFiniteGradientError) and context.hint and kind:
      hint = context.hint
      if kind == _MAYBE:
        hint = hint.replace(" Inside optax.MultiSteps", _IF_INF, 1)
      error = type(error)(f"{error}{hint}", error.step, error.layers)
    return error

  # What was applied or skipped comes before a zeroing that let the step go
  # on (a skip after it may still have skipped the step, for its loss) and
  # before apply_if_finite's drop (which may cover a part of the model
  # only), and non-finite values before spikes.
  rank = lambda s, e: (isinstance(s, ZeroNonfiniteState),
                       isinstance(e, GradientExplosionError),
                       isinstance(s, _metrics.ApplyIfFiniteView))
  errors = [(rank(s, e), e) for s, e in ((s, error_of(s, c))
                                         for s, c in states) if e is not None]
  if not errors:
    # Nothing else said a word (no monitor, or one that did not measure
    # this step; a skipper only in another `multi_transform` partition, or
    # none: one after the clip would have skipped and said so): what a
    # clip saw is all there is.
    errors = [(rank(s, e), e) for s, e in ((s, error_of(s, c))
                                           for s, c in clips) if e is not None]
  errors = [((False, False, False), e) for e in applied] + errors
  errors.sort(key=lambda pair: pair[0])
  return errors[0][1] if errors else None


# What `_nonfinite_gradients` says where it cannot tell, and the words then.
_MAYBE = "maybe"
_IF_INF = (" If the gradients held Inf elements (not only a norm beyond "
           "float32's range): inside optax.MultiSteps")


def _nonfinite_gradients(s: Any) -> bool | str:
  """Whether `s`'s error is about NaN/Inf gradients (what MultiSteps keeps
  in its accumulator), not a loss, an inner optimizer's output or a finite
  overflow; `_MAYBE` where its state cannot tell."""
  if isinstance(s, SkipNonfiniteState):
    return int(s.last_bad_reason) == REASON_GRADS
  if isinstance(s, MonitorState):
    return int(s.num_nonfinite) > 0
  if isinstance(s, SkipSpikesState):  # an Inf norm may be an overflow
    norm = float(s.last_norm)
    return True if np.isnan(norm) else _MAYBE if np.isinf(norm) else False
  return True


def _handlers(states: list[tuple[Any, _Context]]
              ) -> list[tuple[tuple[Any, ...], tuple[str, ...] | None,
                              int | None]]:
  """What handled a NaN/Inf at the last step, as (scope, the names of the
  layers it watches, None: every layer of its scope; the NaN/Inf elements
  of this step's gradients it counted, None: not known)."""
  out = []
  for s, c in states:
    if isinstance(s, SkipNonfiniteState) and _nonfinite_error(s):
      this_step = (int(s.last_bad_reason) == REASON_GRADS and
                   int(s.last_bad_step) == int(s.step) - 1)
      out.append((c.scope, s.last_bad_counts.names,
                  _total(s.last_bad_counts) if this_step else None))
    elif isinstance(s, ZeroNonfiniteState) and _zero_error(s):
      out.append((c.scope, s.replaced.names, _total(s.replaced)))
    elif isinstance(s, _metrics.MultiStepsView) and _microbatch_error(s):
      out.append((c.scope, None,
                  None if s.nonfinite is None else int(s.nonfinite)))
  return out


def _within(scope: tuple[Any, ...], outer: tuple[Any, ...]) -> bool:
  """Whether a state of `scope` sits in the part of the model `outer` is."""
  return scope[:len(outer)] == outer


def _total(counts: _metrics.PerLayer) -> int:
  return int(np.sum(np.asarray(counts.values), dtype=np.int64))


def _applied_error(s: MonitorState,
                   handlers: list[tuple[tuple[Any, ...],
                                        tuple[str, ...] | None, int | None]]
                   ) -> GuardError | None:
  """The monitor's NaN/Inf layers that no handler watches (a skip skips,
  and a zero_nonfinite zeroes, every layer it watches), or None where that
  cannot be told: the monitor measures the updates, or a handler names its
  layers otherwise (`stacked=`, `groups=`). A monitor that keeps no layers
  is compared by count, where each handler counted this step's gradients."""
  if (not _measured_last(s) or s.naming.kind != "grad" or
      int(s.num_nonfinite) == 0):
    return None
  if s.nonfinite is None:
    counted = [n for _, _, n in handlers]
    if None in counted or int(s.num_nonfinite) <= sum(counted):
      return None
    missed = {}
    n = int(s.num_nonfinite) - sum(counted)
  else:
    names, seen = set(s.nonfinite.names), set()
    for _, watched, _ in handlers:
      if watched is None or not set(watched) <= names:
        return None
      seen |= set(watched)
    missed = {name: count for name, count in
              _bad_layers(s.nonfinite).items() if name not in seen}
    if not missed:
      return None
    n = sum(missed.values())
  step = int(s.step) - 1
  return NonFiniteGradientError(
      f"Step {step}: {_plural(n, 'NaN/Inf element')} in layers that no skip "
      f"or zero_nonfinite watches went on to their part's optimizer"
      f"{_describe(missed)}; unless it discards them (`optax.set_to_zero`), "
      "they were applied. A guard or skip in one part of the model "
      "(`optax.multi_transform`, `optax.masked`) does not see the others: "
      "put one around the whole optimizer.", step, missed)

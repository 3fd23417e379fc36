"""`diagnose`: a one-shot, depth-wise report on a model's gradients."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend import core as jax_core
import numpy as np

from optax_guard import _args
from optax_guard import _metrics
from optax_guard import _stats

_ADVICE = {
    "non-finite": (
        "The loss or the gradients hold NaN/Inf{where}. Look for log(0), "
        "division by zero or overflow in the loss and for bad inputs; in "
        "training, og.guard (or og.skip_nonfinite) skips such steps and "
        "og.check names the layer."),
    "exploding": (
        "Gradient norms grow {growth:.3g}x per layer toward the input "
        "({total:.3g}x over the depth, fitted over the {kind}). Clip them "
        "(og.guard, og.clip_by_global_norm, or og.adaptive_grad_clip for "
        "deep networks without normalisation), lower the learning rate, or "
        "initialise with smaller weights; normalisation layers and residual "
        "connections keep the growth down."),
    "vanishing": (
        "Gradient norms shrink {growth:.3g}x per layer toward the input "
        "({total:.3g}x over the depth, fitted over the {kind}): the first "
        "layers barely learn. Use residual connections, normalisation "
        "layers, non-saturating activations (ReLU, GELU) or a "
        "variance-preserving initialisation."),
    "healthy": (
        "No sign of exploding or vanishing gradients{across}: the gradient "
        "norms change less than {ratio:.3g}x over the depth (at most "
        "{total:.3g}x, fitted over the {kind})."),
}

# Said first when the parameters themselves hold NaN/Inf: every gradient is
# then NaN too, and the layers where the gradients went bad mislead.
_BAD_PARAMS = (
    "The parameters themselves hold NaN/Inf in {layers}, and every "
    "gradient that flows through them is NaN/Inf: restore the parameters "
    "from before "
    "they went bad (an earlier step applied a NaN/Inf update, or the "
    "checkpoint was saved so); in training, og.guard (or og.skip_nonfinite) "
    "skips such a step before it reaches the weights.")

_DEAD = (
    "The gradients of {layers} are exactly zero while later layers' are "
    "not: those layers learn nothing (dead ReLUs, a stop_gradient or a "
    "branch the loss does not reach). Check the activations and the graph; "
    "a leaky activation or a smaller learning rate revives dead units.")

# Said after the verdict when some weights are used at every trip of a loop
# (an RNN's recurrent weights, weights shared by the layers of a loop).
_SHARED = (
    "{layers} {are} used whole at every trip of a loop (scan or while). Where "
    "that loop carries a state from trip to trip (an RNN over time), the "
    "trend above, which runs over the parameters, does not measure how the "
    "gradients grow or shrink through the trips: compare the gradients of "
    "the loop's first and last inputs for that.")

_ZERO = (
    "Every gradient is exactly zero: nothing learns. The loss does not "
    "reach the parameters (a stop_gradient, a constant loss, an integer "
    "cast) or every unit is dead (ReLUs that never fire); check the graph "
    "and the activations.")


@dataclasses.dataclass(frozen=True, eq=False)
class Diagnosis:
  """What `diagnose` found; print it for a report.

  Attributes:
    loss: the loss at the given parameters.
    layers: the layers in depth order, input side first (one per
      parameter leaf, or `<leaf>/<i>` for the layers of a stacked leaf).
    grad_norms: the L2 norm of each layer's gradient, in that order.
    param_norms: the L2 norm of each layer's parameters.
    nonfinite: the number of NaN/Inf elements of each layer's gradient.
    growth: the factor by which the gradient norm grows per layer toward
      the input (a least-squares fit of the log norms of the weight
      matrices over depth); above 1 gradients grow as they flow back, below
      1 they shrink. NaN when fewer than two layers have a finite non-zero
      norm.
    bias_growth: the same fit over the one-dimensional leaves (biases and
      norm scales), whose gradients carry the backward signal itself; NaN
      when fewer than two of them have a finite non-zero norm.
    verdict: one of `"non-finite"`, `"exploding"`, `"vanishing"`,
      `"healthy"`.
    advice: what to do about it, in a sentence or three.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    >>> d = og.diagnose(lambda p: jnp.sum(jnp.maximum(p["a"], 2.0) @ p["b"]),
    ...                 params)
    >>> print(d.verdict, d.grad_norms)
    vanishing [0. 8.]

  References:
    See `diagnose`.
  """
  loss: float
  layers: tuple[str, ...]
  grad_norms: np.ndarray
  param_norms: np.ndarray
  nonfinite: np.ndarray
  growth: float
  bias_growth: float
  verdict: str
  advice: str

  def __str__(self) -> str:
    width = max([len("layer")] + [len(n) for n in self.layers])
    lines = [f"loss {self.loss:.6g}; verdict: {self.verdict}",
             f"{'depth':>5}  {'layer':<{width}}  {'grad norm':>10}  "
             f"{'param norm':>10}  {'NaN/Inf':>7}"]
    for i, name in enumerate(self.layers):
      lines.append(
          f"{i:>5}  {name:<{width}}  {self.grad_norms[i]:>10.4g}  "
          f"{self.param_norms[i]:>10.4g}  {self.nonfinite[i]:>7d}")
    lines.append(self.advice)
    return "\n".join(lines)


def _listed(names: list[str], noun: str = "") -> str:
  """The first three names, and how many more (`noun` after the count)."""
  more = f" and {len(names) - 3} more{noun}" if len(names) > 3 else ""
  return ", ".join(names[:3]) + more


def diagnose(loss_fn: Callable[..., Any], params: Any, *args: Any,
             ratio: float = 100.0,
             stacked: _metrics.Stacked = None,
             has_aux: bool = False) -> Diagnosis:
  """Computes one gradient and reports, layer by layer in depth order, how
  its norm changes from the output back to the input.

  Depth order is the order in which the forward pass first uses each
  parameter (read from `loss_fn`'s jaxpr, looking inside nested `jit`,
  `remat`, `scan` and `cond`), so it follows the model, not
  the names. The trend is
  a least-squares fit of the log gradient norms over depth, taken over the
  weight matrices (leaves of two or more dimensions; all leaves when there
  are fewer than two), whose norms are comparable from layer to layer
  (biases and norm scales are not). The layers of a stacked leaf
  (`stacked`, for `nn.scan`) follow each other in the order of its leading
  axis, last first under a `scan(..., reverse=True)`; stacked leaves that
  one `scan` slices go layer by layer together, and so do stacked leaves
  with the same number of layers that no `scan` slices and that are in use
  at the same time (indexed layer by layer in one Python loop, taken to run
  from index 0 up: a loop that runs backwards, or a stack flipped before
  its `scan`, reverses the depths). An `aux` output and dead code are no
  use of a parameter, inside a jitted `loss_fn` too (a loop's body counts
  whole: its carry feeds the next trip).

  The same fit is taken over the one-dimensional leaves (biases and norm
  scales): their gradients are the backward signal itself (summed over the
  batch, or weighted by normalised activations), so they show a growth that
  the weights' gradients hide when activations change over depth the other
  way (a ReLU network initialised too large: activations grow toward the
  output, backward signals toward the input, and the weights' gradients,
  their product, stay flat). Of the two fits, the one further from flat
  decides.

  Verdict: `"non-finite"` when the loss, a gradient or a parameter holds
  NaN/Inf (the advice then names the bad parameters first: from them no
  gradient can be finite);
  otherwise `"vanishing"` when a weight's gradient is exactly zero while a
  layer after it has a non-zero one (dead units, a cut graph), or when
  every gradient is zero; otherwise `"exploding"` when the fitted norm
  grows by at least `ratio` from the output side to the input side,
  `"vanishing"` when it shrinks by at least `ratio`, and `"healthy"` in
  between. The verdict is about how the gradients change with depth at
  these parameters; it says nothing about the loss (a model whose weights
  a bad step has damaged can be "healthy" at a high loss). Nor about
  growth through the trips of a loop: a weight used whole at every trip (an
  RNN's recurrent weights under `scan`) is one point of the fit, so the
  advice names such weights and says that the gradient through time is
  not measured (compare the gradients of the loop's first and last
  inputs).

  Args:
    loss_fn: `loss_fn(params, *args)` returning a scalar loss.
    params: the parameters (any tree of arrays).
    *args: the rest of `loss_fn`'s arguments (arrays: a batch, a key).
    ratio: the change over the depth that counts as exploding or vanishing,
      a float > 1.
    stacked: the leaves whose leading axis stacks layers, reported layer by
      layer (see `og.monitor`).
    has_aux: `loss_fn` returns `(loss, aux)`, as for
      `jax.value_and_grad(..., has_aux=True)`; `aux` is ignored.

  Returns:
    A `Diagnosis`; `print` it for a table.

  Example:
    >>> import jax, jax.numpy as jnp, optax_guard as og
    >>> def loss_fn(params, x):   # sin keeps activations bounded, not slopes
    ...   for i in range(6):
    ...     x = jnp.sin(x @ params[f"layer_{i}"])
    ...   return jnp.mean(x ** 2)
    >>> keys = jax.random.split(jax.random.key(0), 6)
    >>> params = {f"layer_{i}": 0.5 * jax.random.normal(k, (64, 64))
    ...           for i, k in enumerate(keys)}
    >>> d = og.diagnose(loss_fn, params, jnp.ones((8, 64)))
    >>> print(d.verdict, d.layers[0], d.layers[-1])
    exploding layer_0 layer_5
    >>> print(d)  # doctest: +ELLIPSIS
    loss ...; verdict: exploding
    depth  layer     grad norm  param norm  NaN/Inf
        0  layer_0 ...
    Gradient norms grow ...x per layer toward the input ...

  References:
    Glorot and Bengio, 2010, "Understanding the difficulty of training deep
    feedforward neural networks"; Pascanu et al., 2013, "On the difficulty
    of training recurrent neural networks" (https://arxiv.org/abs/1211.5063).
  """
  _args.check_number("ratio", ratio, minimum=1.0, strict=True)
  _metrics.check_stacked(stacked)
  if not any(np.size(x) for x in jax.tree_util.tree_leaves(params)):
    raise ValueError("diagnose needs parameters to differentiate, but "
                     "`params` holds no arrays, or only empty ones.")
  # One trace gives both the output's shape and the order of first uses.
  traced, out = jax.make_jaxpr(loss_fn, return_shape=True)(params, *args)
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      got = (f"a {type(out).__name__} of {len(out)}"
             if isinstance(out, (tuple, list)) else "one value")
      raise ValueError(
          "With has_aux=True, `loss_fn` must return a pair (loss, aux), but "
          f"it returned {got}.")
    out = out[0]
  if isinstance(out, (tuple, list)):
    hint = "" if has_aux else "; pass has_aux=True if it returns (loss, aux)"
    raise ValueError(
        "`loss_fn` must return a scalar loss, but it returned a "
        f"{type(out).__name__} of {len(out)}{hint}.")
  if not hasattr(out, "shape") or out.shape != ():
    raise ValueError(
        "`loss_fn` must return a scalar loss, but returned shape "
        f"{getattr(out, 'shape', type(out).__name__)}.")
  flags = _metrics.stacked_flags(params, stacked)

  @jax.jit
  def measure(params, *args):
    loss, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
    if has_aux:
      loss = loss[0]
    return (loss, _stats.tree_stats(grads, stacked=flags),
            _stats.tree_stats(params, stacked=flags))

  loss, gstats, pstats = jax.device_get(measure(params, *args))
  names = _metrics.layer_names(params, stacked)
  leaves = jax.tree_util.tree_leaves(params)
  flags = flags or [False] * len(leaves)
  counts = [np.shape(x)[0] if flag else 1 for x, flag in zip(leaves, flags)]
  uses = first_uses(traced, len(leaves))  # one walk of the jaxpr for both
  order = layer_order(uses, counts, flags)
  grad_norms = np.asarray(gstats.norms)[order]
  nonfinite = np.asarray(gstats.nonfinite)[order]
  # A layer's own dimensions (a stacked leaf's leading axis is not one).
  ndims = np.repeat([np.ndim(x) - flag for x, flag in zip(leaves, flags)],
                    counts)[order]
  # An empty leaf (a zero-sized axis) has a zero norm that says nothing:
  # it is no dead layer, and no point of the fits.
  held = np.asarray(gstats.sizes)[order] > 0
  matrices = [i for i, ndim in enumerate(ndims) if ndim >= 2 and held[i]]
  vectors = [i for i, ndim in enumerate(ndims) if ndim == 1 and held[i]]
  fit = (matrices if len(matrices) >= 2 else
         [i for i in range(len(order)) if held[i]])
  growth, total = _trend(grad_norms[fit])
  # Biases and norm scales carry the backward signal itself: where the
  # weights' gradients stay flat because activations and backward signals
  # change in opposite directions over depth, theirs still show it.
  bias_growth, bias_total = _trend(grad_norms[vectors])
  # A weight with an exactly zero gradient before any layer with a non-zero
  # one (dead units, a cut graph) learns nothing: the fit cannot see it.
  dead = [names[order[i]] for i in fit
          if grad_norms[i] == 0 and np.any(grad_norms[i + 1:] > 0)]
  loss = float(loss)
  # The trend that strays furthest from flat decides, the weights' on a tie.
  trend = "weight matrices" if fit is matrices else "layers"
  shown = (growth, total)
  if abs(np.log(bias_total)) > abs(np.log(total)):
    trend, shown = "biases and norm scales", (bias_growth, bias_total)
  param_nonfinite = np.asarray(pstats.nonfinite)[order]
  if not np.isfinite(loss) or nonfinite.any() or param_nonfinite.any():
    verdict = "non-finite"
  elif dead or not np.any(grad_norms[held] > 0):
    verdict = "vanishing"
  elif shown[1] >= ratio:
    verdict = "exploding"
  elif shown[1] <= 1.0 / ratio:
    verdict = "vanishing"
  else:
    verdict = "healthy"
  bad = [names[i] for i, c in zip(order, nonfinite) if c > 0]
  where = f" in {_listed(bad, ' layers')}" if bad else ""
  # (A stacked leaf indexed layer by layer in a loop is layers of the fit.)
  shared = [names[int(np.sum(counts[:i]))] for i, loops in
            enumerate(uses[4])
            if loops and not flags[i]]
  advice = _ADVICE[verdict].format(
      where=where, kind=trend, growth=max(shown[0], 1.0 / shown[0]),
      total=max(shown[1], 1.0 / shown[1]), ratio=ratio,
      across=" across the parameters" if shared else "")
  bad_params = [names[i] for i, c in zip(order, param_nonfinite) if c > 0]
  if bad_params:
    advice = _BAD_PARAMS.format(layers=_listed(bad_params, " layers"))
  elif verdict == "vanishing" and not np.any(grad_norms > 0):
    advice = _ZERO
  elif dead:
    dead_text = _DEAD.format(layers=_listed(dead))
    advice = dead_text if verdict == "vanishing" else f"{advice} {dead_text}"
  if shared and not bad_params:
    advice += " " + _SHARED.format(
        layers=_listed(shared), are="is" if len(shared) == 1 else "are")
  return Diagnosis(
      loss=loss, layers=tuple(names[i] for i in order),
      grad_norms=grad_norms, param_norms=np.asarray(pstats.norms)[order],
      nonfinite=nonfinite, growth=growth, bias_growth=bias_growth,
      verdict=verdict, advice=advice)


def _trend(norms: np.ndarray) -> tuple[float, float]:
  """(growth per layer toward the input, over the layers' span) of norms
  given in depth order, one per fitted layer."""
  depth = np.arange(len(norms))
  usable = np.isfinite(norms) & (norms > 0)
  if usable.sum() < 2:
    return float("nan"), 1.0
  x, y = depth[usable].astype(np.float64), np.log(norms[usable])
  slope = np.polyfit(x, y, 1)[0]   # log-norm per layer toward the output
  return float(np.exp(-slope)), float(np.exp(-slope * (x.max() - x.min())))


# Operations that only re-present a parameter (a mixed-precision cast, a
# reshape): their outputs stand for the same leaf, and are not its use.
_ALIASES = frozenset({"convert_element_type", "reshape", "transpose", "copy",
                      "copy_p", "broadcast_in_dim", "squeeze", "expand_dims",
                      "reduce_precision", "pvary"})
# Loops: their body's outputs feed the next trip as well as the results.
_LOOPS = frozenset({"scan", "while"})


def first_uses(closed: Any, count: int
               ) -> tuple[list[float], list[int | None], list[float],
                          list[bool], list[bool]]:
  """When the forward pass first uses each of the first `count` inputs of
  the jaxpr `closed` (the parameter leaves), inside which `scan` (an id, or
  None), following nested calls, when it last uses it, whether the scan
  that slices it runs backwards, and whether a loop uses it whole at every
  trip (first used inside a scan or while body that does not slice it). A
  leaf never used gets `inf` (and `-inf` as its last use)."""
  first: dict[int, tuple[int, int | None]] = {}
  last: dict[int, int] = {}
  xs_scan: dict[int, int] = {}  # the outermost scan that slices each leaf
  backwards: set[int] = set()  # the scans that run `reverse=True`
  clock, scans = [0], [0]

  in_loop: set[int] = set()  # the leaves first used inside a loop's body

  def walk(jaxpr, leaf_of, scan, outs=None, looped=False):
    # `outs`: the outputs of `jaxpr` that feed the loss (None: all of them).
    # Only their equations count: an `aux` output computed from the
    # parameters, or dead code, is no use of them, inside a `jit` too.
    live, needed = (None, None) if outs is None else _feeding(jaxpr, outs)
    for k, eqn in enumerate(jaxpr.eqns):
      if live is not None and k not in live:
        continue
      used = [leaf_of[v] for v in eqn.invars if _is_var(v) and v in leaf_of]
      if eqn.primitive.name in _ALIASES and len(used) == 1:
        leaf_of.update({o: used[0] for o in eqn.outvars})
        continue
      calls = _calls(eqn)
      if calls:  # jit, remat, scan, cond: follow the operands
        inner_scan = scan
        if eqn.primitive.name == "scan":
          scans[0] += 1
          inner_scan = scans[0]
          if eqn.params.get("reverse", False):
            backwards.add(inner_scan)
          # The operands the scan slices (`xs`): a body input of another
          # shape than its operand (jax 0.11 names no `num_consts`).
          (body, operands), = calls
          for v, s in zip(operands, body.invars):
            if (_is_var(v) and v in leaf_of and
                np.shape(v.aval) != np.shape(s.aval)):
              xs_scan.setdefault(leaf_of[v], inner_scan)
        for sub, operands in calls:
          # A loop's carry feeds its own next trip: all of a scan's body
          # counts. A call's outputs are the equation's, one for one.
          sub_outs = None
          if needed is not None and eqn.primitive.name not in _LOOPS:
            sub_outs = [s for s, o in zip(sub.outvars, eqn.outvars)
                        if o in needed]
          walk(sub, {s: leaf_of[o] for o, s in zip(operands, sub.invars)
                     if _is_var(o) and o in leaf_of}, inner_scan, sub_outs,
               looped or eqn.primitive.name in _LOOPS)
        continue
      clock[0] += 1
      for leaf in used:
        if leaf not in first and looped:
          in_loop.add(leaf)
        first.setdefault(leaf, (clock[0], scan))
        last[leaf] = clock[0]

  # Only what feeds the loss (the first output) counts.
  walk(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[:count])},
       None, closed.jaxpr.outvars[:1])
  # A stacked leaf belongs to the scan that slices it into layers, even when
  # a nested scan inside that one is where it is first used.
  return ([first[i][0] if i in first else float("inf") for i in range(count)],
          [xs_scan.get(i, first[i][1] if i in first else None)
           for i in range(count)],
          [last.get(i, -float("inf")) for i in range(count)],
          [xs_scan.get(i) in backwards for i in range(count)],
          [i in in_loop and i not in xs_scan for i in range(count)])


def _calls(eqn: Any) -> list[tuple[Any, list[Any]]]:
  """The jaxprs an equation calls, each with the operands its inputs take."""
  params = eqn.params
  if eqn.primitive.name == "cond":       # operands: the index, then these
    return [(b.jaxpr, eqn.invars[1:]) for b in params["branches"]]
  subs = [getattr(j, "jaxpr", j) for j in params.values() if _is_jaxpr(j)]
  return [(j, eqn.invars) for j in subs if len(j.invars) == len(eqn.invars)]


def layer_order(uses: tuple[Any, ...], counts: list[int],
                stacked: list[bool]) -> np.ndarray:
  """Layer indices in depth order (see `diagnose`), from `first_uses` of the
  jaxpr of the loss (`counts`: each leaf's layers; `stacked`: which leaves
  stack them).

  A leaf is placed by its first use. The layers of stacked leaves that a
  `scan` reads go layer by layer: all of layer 0's leaves (in their order of
  use), then layer 1's, and so on. Stacked leaves that no scan reads (a
  Python loop over the layers) go layer by layer the same way when they have
  the same number of layers and are in use at the same time (one's first use
  before another's last): one loop reads them all, where two loops in a row
  (an encoder's stack, then a decoder's) do not.
  """
  uses, scan_of, lasts, backwards, _ = uses
  together: list[Any] = list(scan_of)
  loops: list[tuple[int, float, Any]] = []  # (layers, last use, group)
  for i in sorted(range(len(counts)), key=lambda i: uses[i]):
    if not stacked[i] or scan_of[i] is not None:
      continue
    group = next((g for n, end, g in loops
                  if n == counts[i] and uses[i] <= end), None)
    if group is None:
      group = ("loop", len(loops))
      loops.append((counts[i], lasts[i], group))
    else:
      loops = [(n, max(end, lasts[i]) if g == group else end, g)
               for n, end, g in loops]
    together[i] = group
  start: dict[Any, float] = {}  # the first use within each group
  for i, flag in enumerate(stacked):
    if flag:
      start[together[i]] = min(start.get(together[i], uses[i]), uses[i])
  firsts = np.cumsum([0] + counts)
  keys = []
  for i, (flag, use) in enumerate(zip(stacked, uses)):
    for j in range(counts[i]):
      if flag:  # a `reverse=True` scan runs its last layer first
        trip = counts[i] - 1 - j if backwards[i] else j
        keys.append(((start[together[i]], trip, use, i), firsts[i] + j))
      else:
        keys.append(((use, 0, use, i), firsts[i] + j))
  return np.asarray([layer for _, layer in sorted(keys)], np.int64)


def _feeding(jaxpr: Any, outvars: Any) -> tuple[set[int], set[Any]]:
  """The indices of the equations of `jaxpr` that `outvars` depend on, and
  the variables they read (with `outvars`)."""
  needed = {v for v in outvars if _is_var(v)}
  live = set()
  for k in range(len(jaxpr.eqns) - 1, -1, -1):
    eqn = jaxpr.eqns[k]
    if any(v in needed for v in eqn.outvars):
      live.add(k)
      needed.update(v for v in eqn.invars if _is_var(v))
  return live, needed


def _is_jaxpr(x: Any) -> bool:
  return isinstance(x, (jax_core.Jaxpr, jax_core.ClosedJaxpr))


def _is_var(x: Any) -> bool:
  return isinstance(x, jax_core.Var)

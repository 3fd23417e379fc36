"""Metric naming and the read-out of statistics from any optimizer state.

Each state names its own metrics (its `_og_metrics`); the per-layer entries,
prefixes and repeats are made here. Names are lower case, `/`-separated (so
TensorBoard and W&B group them), with per-layer entries written
`<metric>/<layer path>`, e.g. `grad/norm/Dense_0/kernel`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.abc
import importlib.machinery
import re
import sys
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _args

# The key in a parameter tree that holds the parameters themselves in Flax
# linen's `{"params": ...}` collections; it adds nothing to a layer's name.
_ROOT_COLLECTION = "params"


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_name(path: tuple[Any, ...], keep_collection: bool = False) -> str:
  """Writes a pytree key path as a layer name such as `Dense_0/kernel`.

  A leading `params` collection (unless `keep_collection`) and the trailing
  `value` attribute of Flax nnx `Variable`s are dropped; an empty path (a
  bare array) is named `.`.
  """
  parts = [_key_name(k) for k in path]
  if parts and parts[-1] == "value" and isinstance(
      path[-1], jax.tree_util.GetAttrKey):
    parts = parts[:-1]
  if len(parts) > 1 and parts[0] == _ROOT_COLLECTION and not keep_collection:
    parts = parts[1:]
  return "/".join(parts) or "."


# Which leaves stack several layers along their leading axis (`nn.scan`,
# `nnx.scan`, `nnx.vmap`): None, layer names or name prefixes, or a predicate.
Stacked = Callable[[str], bool] | Sequence[str] | None


# Said where a stacked leaf's layer count looks wrong: the usual cause.
_SPLIT_STACK = ("inside `shard_map`, a stacked leaf split along its layer "
                "axis holds only its device's layers; shard it along another "
                "axis (`P(None, ...)`).")


def check_stacked(stacked: Any) -> None:
  """Raises at factory time unless `stacked` is a valid `Stacked`."""
  if stacked is None or callable(stacked) or (
      isinstance(stacked, (tuple, list)) and
      all(isinstance(s, str) for s in stacked)):
    return
  raise ValueError(
      "`stacked` must be None, a sequence of layer names or name prefixes "
      "(e.g. ('ScanBlock_0',)) or a function from a layer name to a bool, "
      f"but got {stacked!r}.{_args.INJECTED_FUNCTION}")


def stacked_flags(tree: Any, stacked: Stacked) -> list[bool] | None:
  """For each leaf of `tree`, whether its leading axis stacks layers.

  A name in a sequence marks that leaf and every leaf below it
  (`"ScanBlock_0"` marks `ScanBlock_0/Dense_0/kernel`).
  """
  if stacked is None:
    return None
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = leaf_names(tree)  # the names the metrics use
  if callable(stacked):
    flags = [bool(stacked(name)) for name in names]
  else:
    # Each name's "/"-prefixes looked up in a set: linear in the leaves
    # (a loop over names for every prefix was quadratic in them).
    wanted, below = set(stacked), {}
    for i, name in enumerate(names):
      parts = name.split("/")
      for k in range(1, len(parts) + 1):
        prefix = "/".join(parts[:k])
        if prefix in wanted:
          below.setdefault(prefix, []).append(i)
    # A name may be hidden here by `optax.masked` / `multi_transform`
    # (the same `stacked=` given to every part): this part has no such layer.
    # (A mask that is a prefix tree hides a whole subtree as one node.)
    hidden = [name for name, masked in _named_leaves(tree) if masked]
    in_hidden = lambda p: any(  # noqa: E731
        h == p or h.startswith(p + "/") or p.startswith(h + "/")
        for h in hidden)
    for p in stacked:
      if p not in below and not in_hidden(p):
        raise ValueError(
            f"`stacked` names {p!r}, which is no layer of the parameters "
            f"and no prefix of one; their layers are {list(names)[:5]}"
            f"{' ...' if len(names) > 5 else ''}.")
    marked = {i for leaves in below.values() for i in leaves}
    flags = [i in marked for i in range(len(names))]
    for p, leaves in below.items():  # one `scan` stacks its leaves alike
      sizes = {names[i]: np.shape(paths[i][1])[0] for i in leaves
               if np.ndim(paths[i][1])}
      if len(set(sizes.values())) > 1:
        raise ValueError(
            f"`stacked` names {p!r}, but the leaves below it have leading "
            f"axes of different lengths ({sizes}), so they cannot all stack "
            "the same layers; name the stacked leaves themselves (or pass a "
            f"function of the name). Another cause: {_SPLIT_STACK}")
  for name, (_, leaf), flag in zip(names, paths, flags):
    if flag and (np.ndim(leaf) == 0 or np.shape(leaf)[0] == 0):
      raise ValueError(
          f"The layer {name!r} is marked as stacked, but it has no leading "
          f"axis to split (shape {np.shape(leaf)}); a stacked leaf holds "
          "one layer per entry of its leading axis.")
  return flags


def layer_names(tree: Any, stacked: Stacked = None) -> tuple[str, ...]:
  """The layer names of `tree`, in `jax.tree.leaves` order: one per leaf,
  or `<leaf>/<i>` for each layer `i` of a stacked leaf (see `Stacked`).

  Where dropping the `params` collection would give two leaves one name
  (`{"params": {"w": ...}, "w": ...}`), those leaves keep it. Two leaves
  whose paths still write one name (a key holding a `/`) are an error:
  one of their metrics would silently replace the other's.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  flags = stacked_flags(tree, stacked) or [False] * len(leaves)
  names = []
  for name, leaf, flag in zip(leaf_names(tree), leaves, flags):
    names += ([f"{name}/{i}" for i in range(np.shape(leaf)[0])] if flag
              else [name])
  twice = [name for name, n in collections.Counter(names).items() if n > 1]
  if twice:
    raise ValueError(
        f"Two parameter layers are both named {twice[0]!r}, so their "
        "metrics would share one entry; a layer's name joins the keys of "
        "its path with '/', so rename the key that contains a '/' (or the "
        "one that ends like a stacked layer's index).")
  return tuple(names)


def leaf_names(tree: Any) -> tuple[str, ...]:
  """Each leaf's name, before stacked leaves are split (see `layer_names`).

  Whether dropping `params` would give two leaves one name is decided over
  the whole tree, the leaves that `optax.masked` or `multi_transform` hide
  from this part (`MaskedNode`s) included: a leaf is named alike in every
  part, and by the whole tree's monitor.
  """
  return tuple(name for name, hidden in _named_leaves(tree) if not hidden)


def _named_leaves(tree: Any) -> list[tuple[str, bool]]:
  """Each leaf's name (see `leaf_names`) and whether a `MaskedNode` hides it
  from this part of an `optax.masked` or `multi_transform`."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masked)[0]
  short = collections.Counter(path_name(path) for path, _ in paths)
  return [(path_name(path, keep_collection=short[path_name(path)] > 1),
           masked(leaf)) for path, leaf in paths]


def leaf_paths(tree: Any) -> tuple[str, ...]:
  """Each leaf's path name, as `layer_names` writes it, not made unique."""
  return tuple(path_name(path)
               for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def check_layers(tree: Any, names: tuple[str, ...], factory: str,
                 stacked: Stacked = None,
                 naming: Callable[[Any], tuple[str, ...]] | None = None,
                 *, names_from: str = "was initialised with") -> None:
  """Raises when `tree` has not the layers the state was initialised with
  (`naming`: how entries are named, if not `layer_names`; `names_from`: where
  `names` came from, for the message)."""
  try:
    got = tuple(naming(tree) if naming is not None
                else layer_names(tree, stacked))
  except ValueError:
    if stacked is None:
      raise
    got = layer_names(tree)  # `stacked` names what the updates lack: below
  # Names, not only their number: the per-layer values are labelled by the
  # names of `init`, and a renamed layer would be reported under another's
  # name. (Static: this costs nothing per step.)
  if got == tuple(names):
    return
  missing = sorted(set(names) - set(got))[:5]
  extra = sorted(set(got) - set(names))[:5]
  if len(got) != len(names):
    what = f"updates with {len(got)}"
  elif missing or extra:
    what = "updates with other layers"
  else:
    what = "updates with the same layers in another order"
  hint = ""
  stack = lambda ns: collections.Counter(re.sub(r"/\d+$", "", n) for n in ns)
  if stacked is not None and set(stack(got)) == set(stack(names)):
    hint = (" A stacked leaf has another number of layers than at `init`: "
            f"{_SPLIT_STACK}")
  elif missing and any(x is None for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: x is None)):
    hint = (" A None update (a frozen leaf, as Equinox's `filter_grad` "
            "gives) has no layer here: pass zeros for it, or keep it from "
            "this transformation with `optax.masked` (or freeze it with "
            "`optax.multi_transform` and `optax.set_to_zero`).")
  raise ValueError(
      f"`{factory}` {names_from} {len(names)} parameter layers but "
      f"got {what}; the trees must match. Only in the parameters: "
      f"{missing or 'none'}; only in the updates: {extra or 'none'}.{hint}")


def check_same_tree(updates: Any, params: Any, factory: str, *,
                    per_layer: bool = True,
                    names_from: str = "was called with") -> None:
  """Raises unless `updates` and `params` have the same layers and shapes
  (their leaves are paired by position; `per_layer`: and their layer names
  are metric names, so two leaves may not share one; `names_from`: how the
  message says where `params` came from). Static: free per step."""
  naming = layer_names if per_layer else leaf_paths
  names = naming(params)
  check_layers(updates, names, factory, naming=naming, names_from=names_from)
  for name, u, p in zip(names, jax.tree.leaves(updates),
                        jax.tree.leaves(params)):
    if np.shape(u) != np.shape(unwrap(p)):
      raise ValueError(
          f"`{factory}` got an update of shape {np.shape(u)} for the "
          f"parameter {name!r} of shape {np.shape(unwrap(p))}; each update "
          "must have its parameter's shape.")


# How layers are summed into named groups: a function from a layer name
# (after any `stacked` split) to its group's name, or None.
Groups = Callable[[str], str] | None


def check_groups(groups: Any) -> None:
  """Raises at factory time unless `groups` is None or a function."""
  if groups is not None and not callable(groups):
    raise ValueError(
        "`groups` must be None or a function from a layer name to the name "
        "of its group (e.g. lambda name: name.split('/')[0]), but got "
        f"{groups!r}.{_args.INJECTED_FUNCTION}")


class Layout(NamedTuple):
  """How one tree's leaves become per-layer entries (static, trace time)."""
  stacked: list[bool] | None  # per leaf: its leading axis stacks layers.
  groups: np.ndarray | None   # int[L]: each layer's group, in `names`' order.
  names: tuple[str, ...]      # the entries' names: groups', else layers'.


@dataclasses.dataclass(frozen=True)
class Layers:
  """A transformation's `stacked=` and `groups=`: leaves → layers → groups."""
  stacked: Stacked = None
  groups: Groups = None

  def __post_init__(self):
    check_stacked(self.stacked)
    check_groups(self.groups)

  def of(self, tree: Any) -> Layout:
    """The layout of `tree`'s per-layer entries."""
    flags = stacked_flags(tree, self.stacked)
    names = layer_names(tree, self.stacked)
    if self.groups is None:
      return Layout(flags, None, names)
    keys = []
    for name in names:
      key = self.groups(name)
      if not isinstance(key, str) or not key:  # "" would name no entry
        raise ValueError(
            f"`groups` must return a non-empty string (the group's name) for every "
            f"layer, but returned {key!r} for {name!r}.")
      keys.append(key)
    order = {g: i for i, g in enumerate(dict.fromkeys(keys))}  # by first layer
    return Layout(flags, np.array([order[k] for k in keys], np.int32),
                  tuple(order))

  def names(self, tree: Any) -> tuple[str, ...]:
    return self.of(tree).names

  def check(self, tree: Any, names: tuple[str, ...], factory: str) -> None:
    """Raises when `tree` has not the entries the state was made with."""
    check_layers(tree, names, factory, self.stacked, self.names)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values"], meta_fields=["names"])
@dataclasses.dataclass(frozen=True)
class PerLayer:
  """Per-layer statistics: one row of `values` per named layer.

  The names are static pytree metadata, so they survive `jit`, `lax.scan`,
  buffer donation and checkpoint restores while the state holds only arrays.
  `og.metrics` expands it into one entry per layer.

  Attributes:
    values: array of shape `[num_layers, ...]`.
    names: the layer names, `len(names) == num_layers`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    >>> tx = og.clip_by_layer_norm(10.0)
    >>> _, state = tx.update(grads, tx.init(grads))
    >>> print(state.layer_norms.names, og.metrics(state)["grad/norm/a"])
    ('a', 'b') 5.0

  References:
    `metrics`, which names its rows.
  """
  values: Any
  names: tuple[str, ...]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=[], meta_fields=["kind", "prefix", "every"])
@dataclasses.dataclass(frozen=True)
class Naming:
  """Static naming of a state's metrics: a pytree node without leaves.

  Attributes:
    kind: the namespace of what was measured, `"grad"` or `"update"`.
    prefix: a string prepended to every metric name.
    every: the state measures every `every`-th step (`monitor(every=...)`).
  """
  kind: str = "grad"
  prefix: str = ""
  every: int = 1


def _register_with_flax_serialization(serialization: Any) -> None:
  """Lets `flax.serialization` save and restore `PerLayer` and `Naming`.

  Linen users save a `TrainState` with `flax.serialization.to_bytes`, which
  knows NamedTuples and dicts but no other pytree node: without this,
  msgpack refuses every state with per-layer statistics. A Flax whose API
  has changed gets a warning, never a failed import.
  """
  def restored(target: PerLayer, state: Any) -> PerLayer:
    # Rows are restored by position: another number of them is another
    # layout of layers (`stacked=`, `groups=`, a layer added), whose values
    # would be filed under the target's names.
    rows = None if state is None else np.shape(state.get("values"))[:1]
    if rows != np.shape(target.values)[:1]:
      raise ValueError(
          f"The saved state holds {'no' if rows is None else rows[0]} rows "
          f"of per-layer statistics where the target has "
          f"{len(target.names)} ({list(target.names)[:5]}"
          f"{' ...' if len(target.names) > 5 else ''}); "
          f"{_args.OTHER_CONFIGURATION}")
    return PerLayer(serialization.from_state_dict(
        target.values, state["values"]), target.names)

  try:
    serialization.register_serialization_state(
        PerLayer,
        lambda x: {"values": serialization.to_state_dict(x.values)},
        restored)
    # No data, so nothing to save: the target's own naming is restored.
    serialization.register_serialization_state(
        Naming, lambda x: {}, lambda target, state: target)
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        "optax_guard could not register its state types with "
        f"flax.serialization ({e!r}); flax.serialization.to_bytes will refuse "
        "states with per-layer statistics (Orbax is not affected).",
        stacklevel=2)


class _ThenRegister(importlib.abc.Loader):
  """Runs `flax.serialization`'s own loader, then registers our nodes."""

  def __init__(self, loader: Any):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    self._loader.exec_module(module)
    _register_with_flax_serialization(module)

  def __getattr__(self, name):  # get_source, resource readers, ...
    return getattr(self._loader, name)


class _WhenFlaxSerializationLoads(importlib.abc.MetaPathFinder):
  """Registers our nodes with `flax.serialization` right after it is
  imported: Flax is optional, and importing optax_guard never imports it."""

  def find_spec(self, name, path, target=None):
    if name != "flax.serialization":
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(name, path, target)
    if spec is not None and spec.loader is not None:
      spec.loader = _ThenRegister(spec.loader)
    return spec


if "flax.serialization" in sys.modules:
  _register_with_flax_serialization(sys.modules["flax.serialization"])
elif not any(isinstance(f, _WhenFlaxSerializationLoads)
             for f in sys.meta_path):
  sys.meta_path.insert(0, _WhenFlaxSerializationLoads())


def per_layer_zeros(names: tuple[str, ...], dtype: Any,
                    trailing: tuple[int, ...] = ()) -> PerLayer:
  return PerLayer(jnp.zeros((len(names),) + trailing, dtype), names)


def is_variable(x: Any) -> bool:
  """Whether `x` is a Flax nnx `Variable` (without importing Flax)."""
  return hasattr(x, "get_value")


def unwrap(x: Any) -> Any:
  """The array inside a Flax nnx `Variable` (or `x` itself)."""
  if is_variable(x):
    return x.get_value()
  if hasattr(x, "value") and not isinstance(x, (np.ndarray, jax.Array)):
    return x.value
  return x


def array_module(x: Any) -> Any:
  """`numpy` for a state fetched to the host, `jax.numpy` otherwise."""
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def expand(name: str, value: Any) -> dict[str, Any]:
  """One metric, one per layer when `value` is a `PerLayer`, none if None."""
  if value is None:
    return {}
  if isinstance(value, PerLayer):
    rows = unwrap(value.values)
    return {f"{name}/{layer}": rows[i] for i, layer in enumerate(value.names)}
  return {name: unwrap(value)}


def _is_guard_state(x: Any) -> bool:
  return hasattr(type(x), "_og_metrics")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["skipped", "step", "micro_step", "nonfinite"],
    meta_fields=["num_inner", "skip_fn"])
@dataclasses.dataclass(frozen=True)
class MultiStepsView:
  """What `optax.MultiSteps` did at its latest call, read from its state.

  The `num_inner` statistics states that follow it in `statistics(...)` lie
  below it and hold the last *completed* step: on a call that only
  accumulates (or drops its micro-batch) they are the previous step's.
  Whether a call dropped its micro-batch is known from the skip state of
  optax's own `should_skip_update_fn`s (`optax.skip_not_finite`,
  `optax.skip_large_updates`); from another's, a call that drops the first
  micro-batch of a step reads as completing the step before.
  """
  skipped: Any             # bool[]: it dropped its micro-batch (None: not
                           # known, see above).
  step: Any                # i32[]: MultiSteps' `gradient_step`.
  micro_step: Any          # i32[]: the micro-batch's index in the step.
  nonfinite: Any = None    # its NaN/Inf count (`optax.skip_not_finite`).
  num_inner: int = 0       # how many statistics states follow, below it.
  skip_fn: bool = False    # it has a `should_skip_update_fn`.

  @property
  def completed(self) -> Any:
    """bool[]: the latest call completed a step (MultiSteps' own
    `has_updated`, less a dropped micro-batch)."""
    done = (self.micro_step == 0) & (self.step > 0)
    return done if self.skipped is None else done & ~self.skipped

  def _og_metrics(self) -> dict[str, jax.Array]:
    out = {"optim/step_completed": self.completed}
    if self.skipped is not None:
      out["optim/microbatch_skipped"] = self.skipped
    if self.nonfinite is not None:
      out["grad/microbatch_nonfinite"] = self.nonfinite
    return out


def _multisteps_view(state: optax.MultiStepsState,
                     num_inner: int) -> MultiStepsView:
  skip = state.skip_state
  known = isinstance(skip, dict) and "should_skip" in skip
  return MultiStepsView(
      skip["should_skip"] if known else None, state.gradient_step,
      state.mini_step, skip.get("num_not_finite") if known else None,
      num_inner, skip_fn=not (isinstance(skip, tuple) and not skip))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["last_finite", "in_a_row", "total"], meta_fields=["num_inner"])
@dataclasses.dataclass(frozen=True)
class ApplyIfFiniteView:
  """What `optax.apply_if_finite` did at its latest call, read from its state.

  On a call whose updates were not finite it ran nothing below it (unless
  more than its `max_consecutive_errors` came in a row, which its state
  does not record): the `num_inner` statistics states that follow it in
  `statistics(...)` then hold an earlier step.
  """
  last_finite: Any  # bool[]: the latest call's updates were finite.
  in_a_row: Any     # i32[]: non-finite calls in a row, up to this one.
  total: Any        # i32[]: non-finite calls in all.
  num_inner: int = 0

  @property
  def completed(self) -> Any:
    return self.last_finite

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {"optim/aif_nonfinite": ~self.last_finite,
            "optim/aif_num_nonfinite": self.total}


def _guard_states(opt_state: Any, scope: tuple[Any, ...] = ()
                  ) -> list[tuple[tuple[Any, ...], Any]]:
  """Every guard state in tree order, a wrapper before its inner states,
  each with its scope: the key path of the innermost `optax.partition`
  (`multi_transform`) part or `optax.masked` around it, whose states see
  only some of the layers (`()` where none is).

  Each is returned without its `inner_state` (the wrapped optimizer's
  moments are not statistics and may be as large as the model).
  """
  found = []
  partial = (optax.MultiTransformState, optax.MaskedState)
  is_leaf = lambda x: (_is_guard_state(x) or isinstance(
      x, (optax.MultiStepsState, optax.ApplyIfFiniteState, *partial)))
  for path, state in jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=is_leaf)[0]:
    path = scope + tuple(path)
    if isinstance(state, optax.MultiTransformState):
      for label in sorted(state.inner_states):  # as jax orders a dict
        part = state.inner_states[label]
        found += _guard_states(part, path + (
            jax.tree_util.GetAttrKey("inner_states"),
            jax.tree_util.DictKey(label)))
      continue
    if isinstance(state, optax.MaskedState):
      found += _guard_states(
          state.inner_state, path + (jax.tree_util.GetAttrKey("inner_state"),))
      continue
    if isinstance(state, optax.MultiStepsState):
      # Its accumulated gradients are as large as the model: not read.
      # Read only around an optax_guard transformation (alone, optax's).
      inner = _guard_states(state.inner_opt_state, scope)
      if inner:
        found += [(scope, _multisteps_view(state, len(inner)))] + inner
      continue
    if isinstance(state, optax.ApplyIfFiniteState):
      # Read beside optax_guard states too (`statistics` leaves it out
      # where there are none): a monitor ahead of it says what it dropped.
      inner = _guard_states(state.inner_state, scope)
      found += [(scope, ApplyIfFiniteView(
          state.last_finite, state.notfinite_count, state.total_notfinite,
          len(inner)))] + inner
      continue
    if not _is_guard_state(state):
      continue
    if hasattr(state, "inner_state"):
      found.append((scope, state._replace(inner_state=())))
      found += _guard_states(state.inner_state, scope)
    else:
      found.append((scope, state))
  return found


def is_replicated(state: Any) -> bool:
  """Whether `state` has a leading replica axis on every leaf (a `pmap`ped
  state read outside the `pmap`): every guard state holds at least one
  scalar (its counters), and a replicated one holds none."""
  leaves = [unwrap(x) for x in jax.tree_util.tree_leaves(state)]
  return bool(leaves) and all(np.ndim(x) >= 1 for x in leaves)


def _state_metrics(state: Any) -> dict[str, Any]:
  """`state`'s metrics; a replicated state's, one row per replica (and so
  on down, for an ensemble vmapped inside a pmap: one axis per map)."""
  if not is_replicated(state):
    return state._og_metrics()
  first = jax.tree_util.tree_leaves(state)[0]
  rows = np.shape(unwrap(first))[0]
  if is_traced(state) or rows == 0:
    # Traced (the states a `lax.scan` stacked, read in the step): one
    # program for all rows, not a copy per row (compile time grew with
    # them). No rows (a scan of no steps): the metrics' empty columns.
    out = _in_order(jax.vmap, _state_metrics, jax.tree.map(unwrap, state))
    traced = is_traced(state)
    return {k: v if rows or traced else np.asarray(v)
            for k, v in out.items()}
  each = [_state_metrics(jax.tree.map(lambda x, i=i: unwrap(x)[i], state))
          for i in range(rows)]
  return {name: array_module(each[0][name]).stack([r[name] for r in each])
          for name in each[0]}


def _in_order(transform: Callable[[Any], Any], metrics_of: Any,
              tree: Any) -> dict[str, Any]:
  """`transform(metrics_of)(tree)`, a dict, in `metrics_of`'s key order (a
  transformed function's dict comes back sorted by key)."""
  order: list[str] = []

  def traced(tree):
    found = metrics_of(tree)
    order[:] = found
    return found

  out = transform(traced)(tree)
  return {name: out[name] for name in order}


def named(states: list[Any]) -> dict[str, Any]:
  """The metrics of `statistics(...)` under their names (see `metrics`)."""
  out: dict[str, Any] = {}
  totals: set[str] = set()   # metrics given as a total so far
  layered: set[str] = set()  # metrics given per layer so far
  last_repeat: dict[str, int] = {}  # metric -> the highest `.k` given it
  for state in states:
    named = _state_metrics(state)
    naming = getattr(state, "naming", None)
    # Whole components only: a prefix "pre" joins the name's first one.
    depth = getattr(naming, "prefix", "").count("/")
    # A metric is renamed whole, its total and its layers alike, when one
    # of its names is taken, or when it gives a total beside another state's
    # layers or layers beside another state's total (a total must sit beside
    # its own layers: a layer clip's `grad/norm/<layer>` and a global clip's
    # `grad/norm` are two measurements); layers beside layers (two
    # partitions of `optax.multi_transform`) are one view. All of the
    # state's renamed metrics get one number, higher than any given before
    # to them (so that the numbers follow tree order).
    # Each name's metric part, taken once (per-layer names run to
    # thousands, and `MetricsLog` names every row).
    metric_of = {name: "/".join(name.split("/", depth + 2)[:depth + 2])
                 for name in named}
    taken = {m for name, m in metric_of.items()
             if name in out or m in (layered if name == m else totals)}
    # A spike layer is an index into its own state's z-score entries: the
    # two are renamed together, whichever was taken.
    pair = {"spike_layer": "zscore", "zscore": "spike_layer"}
    split = (m.rpartition("/") for m in taken)
    taken |= {head + "/" + pair[last] for head, _, last in split
              if last in pair} & set(metric_of.values())
    renamed = [name for name, m in metric_of.items() if m in taken]
    if renamed:
      k = 1 + max(last_repeat.get(m, 0) for m in taken)
      while any(_repeat(name, k, depth) in out for name in renamed):
        k += 1
      last_repeat.update(dict.fromkeys(taken, k))
    for name, value in named.items():
      m = metric_of[name]
      if m in taken:  # (a repeat's metric part is the metric's, `.k` added)
        name, m = _repeat(name, k, depth), f"{m}.{k}"
      (totals if name == m else layered).add(m)
      out[name] = value
  return out


def _repeat(name: str, k: int, depth: int) -> str:
  """`name` as the `k`-th repeat: `.k` ends its metric part, before any
  layer (`grad/norm.1/Dense_0/kernel`; `depth`: its prefix's parts)."""
  parts = name.split("/")
  end = min(depth + 2, len(parts)) - 1
  parts[end] += f".{k}"
  return "/".join(parts)


def metrics(opt_state: Any) -> dict[str, Any]:
  """Every statistic recorded in an optimizer state, as one flat named dict.

  Walks any state tree (a plain `optax.chain`, `optax.named_chain`, wrappers
  nested in each other, a Flax nnx optimizer's state whose leaves are
  `Variable`s, a state fetched to the host) and gathers the statistics of every
  `optax_guard` state in it, under the names of the design (`grad/norm`,
  `grad/norm/<layer>`, `optim/num_clipped`, ...). From an `optax.MultiSteps`
  state it also reads whether its latest call completed a step
  (`optim/step_completed`; on the other calls the states below it still
  hold the last completed step's statistics) and the decision of its
  `should_skip_update_fn` (`optim/microbatch_skipped`;
  `grad/microbatch_nonfinite` with `og.skip_nonfinite_microbatch` or
  `optax.skip_not_finite`); from an `optax.apply_if_finite` state, whether
  it dropped its latest call's NaN/Inf updates (`optim/aif_nonfinite`,
  `optim/aif_num_nonfinite`). Alone, optax's wrappers report nothing.

  A `pmap`ped state read outside the `pmap` (a leading device axis on every
  leaf) gives each metric one value per device, layers included; so does an
  ensemble trained under `vmap` (one value per member), and both together
  (an ensemble vmapped inside a `pmap`: `[devices, members]`).

  Naming rule for repeats: when two states record the same name (two
  monitors in one chain, say), or one a metric's total and the other its
  per-layer entries (a per-layer clip's `grad/norm/<layer>` and a global
  clip's `grad/norm`: not their total; and a `spike_layer` with the
  `zscore` entries it indexes, whichever of the two was taken), the first in the
  tree's order (the earlier one in a chain) keeps the plain name and a later
  one gets `.1`, `.2`, ... at the end
  of the metric, before any layer: `grad/norm.1`, `grad/norm.1/Dense_0/kernel`
  (one number for all of a state's repeated names, above any number given
  to those names before, so that a later state has the higher number).
  Give a monitor a `prefix` to choose its names yourself.

  Inside a jitted step it returns device arrays (so a step can return them);
  on an abstract state (`jax.eval_shape(tx.init, params)`), the shapes and
  dtypes of the metrics (as `jax.ShapeDtypeStruct` values).
  Outside, it fetches the statistics (never the wrapped optimizer's moments)
  to the host in one transfer and returns NumPy scalars, ready for a logger;
  a state already on the host works the same way.

  Args:
    opt_state: any optimizer state tree.

  Returns:
    A dict from metric name to array: scalars, and for `<k>/hist/<layer>` a
    vector of counts over `optax_guard.HIST_BUCKETS`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.full(3, 4.0)}, state, params)
    >>> m = og.metrics(state)
    >>> print(f"{float(m['grad/norm']):.3f} {int(m['optim/num_clipped'])}")
    6.928 1

  References:
    The user guide's "Metric names" table.
  """
  states = statistics(opt_state)
  if not states and holds_unwrapped_states(opt_state):
    warnings.warn(
        "og.metrics found optax_guard states turned into plain mappings in "
        "`opt_state`, which say nothing about what their numbers are, and "
        f"reads nothing from them: {PASS_THE_STATE}.", stacklevel=2)
  if is_abstract(states):  # e.g. to set up a logger before the first step
    return _in_order(lambda f: functools.partial(jax.eval_shape, f), named,
                     states)
  if not is_traced(states):
    states = to_host(states)  # the statistics only, in one transfer
  return named(states)


@functools.cache
def _state_fields() -> tuple[frozenset[str], ...]:
  """The field names of every optax_guard state with metrics."""
  def subclasses(cls):
    for sub in cls.__subclasses__():
      yield sub
      yield from subclasses(sub)
  return tuple(frozenset(cls._fields) for cls in subclasses(tuple)
               if cls.__module__.startswith("optax_guard.") and
               hasattr(cls, "_og_metrics") and hasattr(cls, "_fields"))


# What to do about states turned into plain mappings.
PASS_THE_STATE = (
    "pass the state itself (with Flax nnx, `optimizer.opt_state`, not "
    "`nnx.state(optimizer)`; restore a checkpoint into "
    "`jax.eval_shape(tx.init, params)`, not without a target)")


def holds_unwrapped_states(tree: Any) -> bool:
  """Whether `tree` holds a mapping keyed like the fields of an optax_guard
  state (what `nnx.state` and a target-less Orbax restore make of one)."""
  if hasattr(tree, "keys") and hasattr(tree, "items"):
    keys = {str(k) for k in tree.keys()}
    return any(keys <= fields and len(keys) >= max(2, len(fields) // 2)
               for fields in _state_fields()) or any(
                   holds_unwrapped_states(child) for _, child in tree.items())
  if isinstance(tree, (list, tuple)):
    return any(holds_unwrapped_states(child) for child in tree)
  return False


def _found(opt_state: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """`_guard_states`, or none where all it found is optax's own wrappers (a
  plain optax state is optax's alone)."""
  found = _guard_states(strip_variables(opt_state))
  views = (ApplyIfFiniteView, MultiStepsView)
  if all(isinstance(s, views) for _, s in found):
    return []
  return found


def statistics(opt_state: Any) -> list[Any]:
  """The `optax_guard` states in `opt_state`, without any wrapped optimizer's
  state: the arrays `metrics` names, and nothing as large as the model."""
  return [state for _, state in _found(opt_state)]


def statistics_scopes(opt_state: Any) -> list[tuple[Any, ...]]:
  """The scope of each of `statistics(opt_state)` (see `_guard_states`)."""
  return [scope for scope, _ in _found(opt_state)]


def is_traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(tree))


def is_abstract(tree: Any) -> bool:
  """Whether `tree` holds shapes without values (`jax.eval_shape`'s)."""
  return any(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree_util.tree_leaves(tree))


def to_host(tree: Any) -> Any:
  """`tree` as NumPy arrays, in one transfer.

  An array that this process cannot see whole (a multi-host global array)
  is read from its first local copy when it is replicated (statistics are),
  else gathered from every process (then every process must call this).
  """
  def gathered(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return x
  return jax.device_get(jax.tree_util.tree_map(gathered, local_copies(tree)))


def local_copies(tree: Any) -> Any:
  """`tree` with each replicated multi-host array replaced by its first
  local copy, so that work on it involves this process only."""
  def local(x):
    if (isinstance(x, jax.Array) and not x.is_fully_addressable and
        x.sharding.is_fully_replicated):
      return x.addressable_data(0)
    return x
  return jax.tree_util.tree_map(local, tree)


def strip_variables(opt_state: Any) -> Any:
  """Replaces nnx `Variable` leaves by their arrays so the state can be jitted."""
  return jax.tree_util.tree_map(
      unwrap, opt_state, is_leaf=is_variable)


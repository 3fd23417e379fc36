"""Penalties on large gradients: of the loss w.r.t. the weights, or w.r.t. the
inputs (R1, WGAN-GP).

The gradient-norm penalty adds `strength * ||grad L||` (or its square) to the
loss. Its gradient involves the Hessian: `strength * H g / ||g||` (squared:
`2 * strength * H g`). `method="exact"` gets it by double backprop;
`method="finite_difference"` by the scheme of Zhao et al. (2022): with
`n = g / ||g||`, `H n ~ (grad L(theta + r n) - g) / r`, one extra gradient
evaluation and no second derivative.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _args
from optax_guard import _eager
from optax_guard import _metrics
from optax_guard import _stats

PENALTY_METHODS = ("exact", "finite_difference")


def _safe_sqrt(sumsq: jax.Array) -> jax.Array:
  """`sqrt`, with gradient 0 at 0 (not NaN): the norm of a zero gradient.

  Only an exact 0 is special-cased, so a NaN or Inf sum comes out as it is.
  """
  zero = sumsq == 0
  return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, sumsq)))


def _safe_norm(tree: Any) -> jax.Array:
  """The L2 norm of a tree, differentiable at zero.

  In float32, or float64 where a leaf is (64-bit mode), so that the
  finite-difference direction is a unit vector to the gradients' precision;
  a complex leaf by its modulus.
  """
  leaves = jax.tree.leaves(tree)
  dtype = max((jnp.finfo(_stats.computed_in(x.dtype)).dtype for x in leaves),
              key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))
  return _safe_sqrt(sum(
      (jnp.sum(_stats.abs_sq(x.astype(_stats.computed_in(x.dtype, dtype))))
       for x in leaves), jnp.zeros((), dtype)))


def _fd_direction(grads: Any, norm: jax.Array) -> Any:
  """The unit vector of steepest ascent, `g / ||g||` (zero for a zero
  gradient). For a complex leaf, `conj(g) / ||g||`: JAX's gradient of a real
  loss w.r.t. a complex parameter is the conjugate of that direction."""
  inv = jnp.where(norm > 0, 1 / jnp.where(norm > 0, norm, 1), 0)
  def scale(g):
    wide = g.astype(_stats.computed_in(g.dtype, inv.dtype))
    ascent = jnp.conj(wide) if jnp.iscomplexobj(g) else wide
    return (ascent * inv.astype(wide.dtype)).astype(g.dtype)
  return jax.tree.map(scale, grads)


def _probe(radius: Any) -> Callable[[Any, Any], Any]:
  """`p + radius * n` in the parameter's dtype (a Python number's too) and,
  on Explicit mesh axes, with its sharding: `grad_fn` is given parameters
  typed as the real ones (ZeRO-2's gradients are sharded, its parameters
  not)."""
  def probe(p, n):
    dtype = jnp.result_type(p)
    step = jnp.asarray(radius, dtype) * n.astype(dtype)
    spec = _stats.sharding_spec(step)
    if spec is not None and spec != _stats.sharding_spec(p):
      step = jax.sharding.reshard(step, jax.typeof(p).sharding.spec)
    return p + step
  return probe


def _fd_combine(grads: Any, probe: Any, norm: jax.Array, strength: Any,
                radius: Any, squared: bool) -> Any:
  """`g + c * (probe - g) / r`: `c = strength` (times `2||g||` if squared).

  In float32, or in the leaf's own precision where that is wider (float64);
  complex for a complex leaf.
  """
  def combine(g, q):
    dtype = _stats.computed_in(g.dtype)
    c = jnp.asarray(strength, dtype) / jnp.asarray(radius, dtype)
    if squared:
      c = c * 2 * norm.astype(dtype)
    return (g.astype(dtype) + c * (q.astype(dtype) - g.astype(dtype))
            ).astype(g.dtype)
  return jax.tree.map(combine, grads, probe)


def _check(strength: Any, radius: Any) -> None:
  _args.check_number("strength", strength)
  _args.check_number("radius", radius, strict=True)


def gradient_norm_penalty(
    loss_fn: Callable[..., Any], strength: float, *,
    method: str = "exact", squared: bool = False, radius: float = 0.01,
    has_aux: bool = False, axis_name: _stats.AxisName = None,
) -> Callable[..., Any]:
  r"""Loss and gradients of `loss + strength * ||grad loss||`.

  Penalising the norm of the gradient w.r.t. the weights steers training
  toward flat regions, where gradients stay small; it is one of the remedies
  the literature gives against exploding gradients and sharp minima. The
  returned function is a drop-in for `jax.value_and_grad(loss_fn)`: it
  returns the plain loss :math:`L(\theta)` (with `aux` when `has_aux`) and
  the gradient of :math:`L + \lambda\|\nabla L\|` (`squared=True`:
  :math:`L + \lambda\|\nabla L\|^2`), w.r.t. the first argument.

  * `method="exact"`: double backprop, :math:`\nabla L + \lambda H g /
    \|g\|` (squared: :math:`+ 2 \lambda H g`), at the cost of a
    Hessian-vector product.
  * `method="finite_difference"` (Zhao et al., 2022): with
    :math:`n = g / \|g\|`, :math:`H n \approx (\nabla L(\theta + r n) - g) /
    r`, i.e. :math:`(1 - \lambda / r)\,g + (\lambda / r)\,\nabla L(\theta +
    r n)`: one extra gradient, no second derivative; it tends to the exact
    result as `radius` :math:`r \to 0` (error :math:`O(r)`; exact for a
    quadratic loss).

  Under `shard_map` (with its default `check_vma=True`) with parameters
  sharded across devices, pass their mesh axes as `axis_name`: the norm is
  then the whole gradient's (each leaf's sum of squares summed over the axes
  it varies along), the same on every device, in float32. Without it, a
  gradient that varies along a mesh axis is refused (its norm would be one
  shard's), and each device takes the norm of what it holds (in float64
  where the gradients are), which is right when the
  parameters are replicated (data parallelism): there `jax.grad` already
  returns their gradient summed over the devices' batches, so every device
  penalises the whole batch's gradient, once. Under `pmap`, where nothing
  is summed for you, each device penalises its own batch's gradient (under
  `shard_map`, with parameters made per-device, run it with
  `check_vma=False` for the same). The norm is overflow-safe, as the
  guard's statistics are (gradients up to float32's largest value).

  A zero gradient has a zero penalty gradient in both methods. The
  finite-difference probe is taken in the parameters' dtype. With bfloat16
  or float16 parameters it loses to rounding: the two gradients it
  subtracts are each rounded to the dtype (about :math:`2^{-8}` relative in
  bfloat16), so its relative error grows like :math:`2^{-8}\|g\| / (r\|H
  n\|)`. On a bfloat16 quadratic the penalty's gradient was 105% off at
  `radius=0.01`, 27% at 0.05 and 8% at 0.2; only at the largest radius was
  it as close as the exact method, which rounds in bfloat16 too but needs no
  radius. There, prefer the exact method, or a `radius` large against that
  ratio.

  Args:
    loss_fn: `loss_fn(params, *args, **kwargs) -> loss` (or `(loss, aux)`
      with `has_aux`), differentiable in `params`.
    strength: :math:`\lambda`, a float `>= 0`.
    method: `"exact"` or `"finite_difference"`.
    squared: penalise :math:`\|\nabla L\|^2` instead of :math:`\|\nabla L\|`.
    radius: :math:`r`, the finite-difference step, a float `> 0` (only used
      by `"finite_difference"`; Zhao et al. use 0.01 to 0.1).
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    axis_name: mesh axis name(s) over which the parameters are sharded
      (inside `shard_map`), so that the norm is the whole gradient's.

  Returns:
    A function `(params, *args, **kwargs) -> (loss, grads)` (`((loss, aux),
    grads)` with `has_aux`).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> def loss_fn(w):  # L = w**2 / 2 + w**4 / 4: g = w + w**3, H = 1 + 3w**2
    ...   return jnp.sum(w**2 / 2 + w**4 / 4)
    >>> w = jnp.array([1.0])
    >>> fn = og.gradient_norm_penalty(loss_fn, 0.1, squared=True)
    >>> loss, g = fn(w)
    >>> print(f"{float(loss):.2f} {float(g[0]):.4f}")  # g + 2 * 0.1 * H g
    0.75 3.6000
    >>> fd = og.gradient_norm_penalty(loss_fn, 0.1, squared=True,
    ...                               method="finite_difference", radius=1e-3)
    >>> print(f"{float(fd(w)[1][0]):.4f}")  # error O(radius)
    3.6012

  References:
    Drucker & LeCun, 1992, "Improving generalization performance using double
    backpropagation" (IEEE TNN 3(6)); Zhao, Zhang & Hu, 2022, "Penalizing
    Gradient Norm for Efficiently Improving Generalization in Deep Learning"
    (https://arxiv.org/abs/2202.03599), Algorithm 1.
  """
  _check(strength, radius)
  _args.check_bool("squared", squared)
  _args.check_bool("has_aux", has_aux)
  _args.check_choice("method", method, PENALTY_METHODS)
  _stats.check_axis_name(axis_name)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  norm_of = lambda grads: _norm(grads, axis_name, "gradient_norm_penalty")

  def exact(params, *args, **kwargs):
    # The penalty is differentiated alone and the loss's gradients added:
    # under `shard_map` the gradients of replicated parameters come back
    # summed over the devices, the same on each, and differentiating
    # `loss + penalty` would sum that one penalty's gradient once per device.
    def penalty_of(p):
      value, grads = grad_fn(p, *args, **kwargs)
      norm = norm_of(grads)
      penalty = jnp.square(norm) if squared else norm
      return jnp.asarray(strength, penalty.dtype) * penalty, (value, grads)

    penalty_grads, (value, grads) = jax.grad(penalty_of, has_aux=True)(params)
    return value, jax.tree.map(jnp.add, grads, penalty_grads)

  def finite_difference(params, *args, **kwargs):
    value, grads = grad_fn(params, *args, **kwargs)
    norm = norm_of(grads)
    step = _fd_direction(grads, norm)
    probe_at = jax.tree.map(_probe(radius), params, step)
    _, probe = grad_fn(probe_at, *args, **kwargs)
    return value, _fd_combine(grads, probe, norm, strength, radius, squared)

  return exact if method == "exact" else finite_difference


def _norm(grads: Any, axis_name: _stats.AxisName, who: str) -> jax.Array:
  """The norm of the whole gradient (overflow-safe; float64 where the
  gradients are), refused where it would be one shard's."""
  if axis_name is not None:
    return _whole_norm(grads, axis_name, who)
  leaves = jax.tree.leaves(grads)
  varying = sorted(set().union(*map(_stats.varying_axes, leaves)))
  if varying:
    raise ValueError(
        f"`{who}` got gradients that vary along the mesh axes {varying}. "
        "If the parameters are sharded over them, pass "
        f"axis_name={tuple(varying)!r}, so that the norm is the whole "
        "gradient's; if each device is to penalise its own gradient "
        "(parameters made per-device), run the step under `pmap` or "
        "`shard_map(..., check_vma=False)`.")
  _stats.refuse_float0(leaves)
  if any(x.dtype in (jnp.float64, jnp.complex128) for x in leaves):
    return _safe_norm(leaves)  # (squares overflow only beyond ~1e154)
  return _stats.tree_stats(leaves).global_norm


def _whole_norm(grads: Any, axis_name: _stats.AxisName, who: str
                ) -> jax.Array:
  """The norm of a gradient sharded over `axis_name`, refused where values
  carry no sharding types: under `pmap` the cross-device statistics take
  every leaf as replicated (the largest device's value), which would make
  the penalty's direction a mix of devices' gradients."""
  if not _stats.is_typed(_stats.axis_names(axis_name)):
    raise ValueError(
        f"{who} got axis_name={axis_name!r} where values carry no sharding "
        "types (`pmap`, or `shard_map` with check_vma=False), so it cannot "
        "tell sharded parameters from replicated ones: use `shard_map` with "
        "its default check_vma=True, or, with replicated parameters "
        "(`pmap`), leave axis_name=None.")
  return _stats.tree_stats(grads, axis_name=axis_name).global_norm


def _check_gradients(probe: Any, params: Any) -> None:
  """Raises unless `grad_fn` gave a gradient for each parameter (static).

  Leaves and shapes only: an nnx `grad_fn` returns the gradients in `Param`
  nodes where `nnx.Optimizer` passes pure parameters."""
  probes, leaves = jax.tree.leaves(probe), jax.tree.leaves(params)
  same = len(probes) == len(leaves) and all(
      np.shape(q) == np.shape(p) for q, p in zip(probes, leaves))
  try:  # and the parameters' structure, down to their leaves
    jax.tree.map(lambda p, q: None, params, probe)
  except ValueError:
    same = False
  if not same:
    raise ValueError(
        "`add_gradient_norm_penalty` needs `grad_fn(params)` to return the "
        "gradients alone, a tree like the parameters "
        f"({jax.tree.structure(params)}), but it returned "
        f"{jax.tree.structure(probe)} with shapes "
        f"{[np.shape(q) for q in jax.tree.leaves(probe)]}: pass "
        "`jax.grad(loss_fn)`, not `jax.value_and_grad(loss_fn)` or the loss "
        "itself.")


class AddGradientNormPenaltyState(NamedTuple):
  """State of `add_gradient_norm_penalty`: the norm and the penalty.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> w = jnp.array([3.0, 4.0])
    >>> grad_fn = lambda p: p  # the gradient of |p|^2 / 2
    >>> tx = og.add_gradient_norm_penalty(0.5)
    >>> _, state = tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)
    >>> print(state.grad_norm, state.penalty)
    5.0 2.5

  References:
    Made by `add_gradient_norm_penalty` (see its references); `og.metrics` reads it.
  """
  grad_norm: jax.Array  # f32[] ||grad L|| at the last step.
  penalty: jax.Array    # f32[] strength * ||grad L|| (or its square).

  def _og_metrics(self) -> dict[str, jax.Array]:
    return {"grad/norm_penalty": self.penalty}


def add_gradient_norm_penalty(
    strength: float, *, squared: bool = False, radius: float = 0.01,
    axis_name: _stats.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The finite-difference gradient-norm penalty as a transformation.

  The transformation form of `gradient_norm_penalty(...,
  method="finite_difference")`, for `optax.chain`: put it first, before
  any clip and before `og.guard` (a guard that clips refuses one inside it),
  so that it receives the raw gradients :math:`g = \nabla L(\theta)`, and pass
  `grad_fn=` through the update's extra arguments: a function of the
  parameters returning the gradients of the same loss on the same batch. It
  evaluates `grad_fn(params + radius * g / ||g||)` and returns
  :math:`g + \lambda (\nabla L(\theta + r n) - g) / r` (squared: times
  :math:`2\|g\|`), which the rest of the chain (clipping, `guard`, the
  optimizer) then treats as the gradient.

  Keep it outside `optax.MultiSteps` and `optax.masked`: `grad_fn` sees the
  current micro-batch and all the parameters, while inside `MultiSteps`
  the transformation receives the mean of the micro-batches' gradients
  (their difference would enter the penalty, amplified by
  `strength / radius`), and inside `masked` only some of the parameters
  (refused). Accumulate after it:
  `optax.chain(og.add_gradient_norm_penalty(...), optax.MultiSteps(...))`.

  Data parallel, `grad_fn` must return the gradients as the chain receives
  them: where each device's gradients are averaged (`lax.pmean`) before the
  update, average `grad_fn`'s too, `lambda q: lax.pmean(jax.grad(loss)(q,
  batch), "data")`; a device's own there would be taken against the mean,
  and the replicas would drift apart.

  Args:
    strength: :math:`\lambda`, a float `>= 0`.
    squared: penalise :math:`\|\nabla L\|^2` instead of :math:`\|\nabla L\|`.
    radius: :math:`r`, the finite-difference step, a float `> 0`.
    axis_name: mesh axis name(s) over which the parameters are sharded
      (inside `shard_map`), so that :math:`\|g\|` is the whole gradient's;
      refused under `pmap`, as in `gradient_norm_penalty`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update needs `params`
    and the extra argument `grad_fn`, with state
    `AddGradientNormPenaltyState` (metric `grad/norm_penalty`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> def loss_fn(w):
    ...   return jnp.sum(w**2 / 2 + w**4 / 4)
    >>> w = jnp.array([1.0])
    >>> tx = optax.chain(og.add_gradient_norm_penalty(0.1, squared=True,
    ...                                               radius=1e-3),
    ...                  og.clip_by_global_norm(10.0), optax.sgd(1.0))
    >>> updates, state = tx.update(jax.grad(loss_fn)(w), tx.init(w), w,
    ...                            grad_fn=jax.grad(loss_fn))
    >>> print(f"{float(updates[0]):.2f}")
    -3.60

  References:
    Zhao, Zhang & Hu, 2022, "Penalizing Gradient Norm for Efficiently
    Improving Generalization in Deep Learning"
    (https://arxiv.org/abs/2202.03599), Algorithm 1.
  """
  _check(strength, radius)
  _args.check_bool("squared", squared)
  _stats.check_axis_name(axis_name)

  def init_fn(params):
    del params
    return AddGradientNormPenaltyState(grad_norm=jnp.zeros((), jnp.float32),
                                       penalty=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del state
    _args.require_params(params, "add_gradient_norm_penalty")
    if any(isinstance(x, optax.MaskedNode) for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
      raise ValueError(
          "`add_gradient_norm_penalty` evaluates `grad_fn` on the "
          "parameters it is given, but inside `optax.masked` (or a "
          "`multi_transform` part) some of them are masked out; put it "
          "outside, ahead of the mask (or use og.gradient_norm_penalty on "
          "a loss of the parameters to penalise).")
    grad_fn = extra_args.get("grad_fn")
    if not callable(grad_fn):
      raise ValueError(
          "`add_gradient_norm_penalty` needs the gradient function of the "
          "loss on the current batch: call `update(grads, state, params, "
          "grad_fn=...)` with `grad_fn(params) -> grads`; it got "
          f"grad_fn={grad_fn!r}.")
    # The probe steps each parameter along its update: paired by position.
    # (None in both, an Equinox-style filtered tree, is no leaf at all.)
    none = lambda x: x is None
    u_leaves, u_def = jax.tree.flatten(updates, is_leaf=none)
    p_leaves, p_def = jax.tree.flatten(params, is_leaf=none)
    if u_def == p_def and any(u is None and p is not None
                              for u, p in zip(u_leaves, p_leaves)):
      raise ValueError(
          "`add_gradient_norm_penalty` got a None update (a frozen leaf, as "
          "Equinox's `filter_grad` gives); it steps every parameter along "
          "its update to evaluate `grad_fn`, so pass zeros for that leaf.")
    _metrics.check_same_tree(updates, params, "add_gradient_norm_penalty",
                             per_layer=False)
    updates = jax.tree.map(jnp.asarray, updates)  # Python numbers too
    norm = _norm(updates, axis_name, "add_gradient_norm_penalty")
    step = _fd_direction(updates, norm)
    probe = grad_fn(jax.tree.map(_probe(radius), params, step))
    _check_gradients(probe, params)
    out = _fd_combine(updates, probe, norm, strength, radius, squared)
    norm = norm.astype(jnp.float32)
    s = jnp.asarray(strength, jnp.float32)
    return out, AddGradientNormPenaltyState(
        grad_norm=norm, penalty=(s * norm) * norm if squared else s * norm)

  return optax.GradientTransformationExtraArgs(
      init_fn, _eager.compiled_when_eager(update_fn))


def input_gradient_penalty(fn: Callable[[Any], jax.Array],
                           inputs: Any, *,
                           target: float = 0.0) -> jax.Array:
  r"""Mean over a batch of :math:`(\|\nabla_x f(x)\| - \text{target})^2`.

  The penalties of GAN critics on the gradient w.r.t. their *inputs*:

  * R1 (Mescheder et al., 2018): `target=0` on real data,
    :math:`\mathbb{E}\|\nabla_x D(x)\|^2` (scale it by :math:`\gamma/2`);
  * WGAN-GP (Gulrajani et al., 2017): `target=1` on random interpolates
    :math:`\hat x = \epsilon x + (1-\epsilon)\tilde x` of real and generated
    samples (scale it by :math:`\lambda = 10`).

  `fn` maps a batch `[B, ...]` to one score per example `[B]` (or `[B, 1]`),
  each score depending on its own example only (no batch normalisation
  across the batch); the per-example gradients are then those of the sum.
  The batch may be a tree of float (or complex) arrays (an image and a
  one-hot label, for a conditional critic): each example's gradient norm is
  then taken over all its leaves (a complex one's by its modulus).
  The result is differentiable w.r.t. whatever `fn` closes over (the
  critic's parameters), by double backprop; a zero input gradient has a zero
  penalty gradient.

  Args:
    fn: the critic, `[B, ...] -> [B]`.
    inputs: the batch at which to take the gradients, `[B, ...]`, or a tree
      of such arrays with the same `B`.
    target: the norm the gradients are pulled toward, a float `>= 0`.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax, jax.numpy as jnp, optax_guard as og
    >>> w = jnp.array([3.0, 4.0])            # a linear critic D(x) = w.x
    >>> x = jnp.ones((5, 2))
    >>> print(float(og.input_gradient_penalty(lambda x: x @ w, x)))  # ||w||^2
    25.0
    >>> # WGAN-GP on interpolates of real and fake samples
    >>> real, fake = jnp.ones((5, 2)), jnp.zeros((5, 2))
    >>> eps = jax.random.uniform(jax.random.key(0), (5, 1))
    >>> x_hat = eps * real + (1 - eps) * fake
    >>> print(float(og.input_gradient_penalty(lambda x: x @ w, x_hat,
    ...                                       target=1.0)))  # (5 - 1)^2
    16.0

  References:
    Gulrajani et al., 2017, "Improved Training of Wasserstein GANs"
    (https://arxiv.org/abs/1704.00028); Mescheder, Geiger & Nowozin, 2018,
    "Which Training Methods for GANs do actually Converge?"
    (https://arxiv.org/abs/1801.04406).
  """
  _args.check_number("target", target)
  leaves = jax.tree.leaves(inputs)
  if any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError(
        "`inputs` must be a batch, `[B, ...]`, but a leaf of it is a scalar, "
        "with no leading (batch) axis.")
  sizes = {jnp.shape(x)[0] for x in leaves}
  if not leaves or len(sizes) != 1:
    raise ValueError(
        "`inputs` must be a batch: an array, or a tree of arrays, whose "
        "leaves all have the same leading (batch) axis; got leading sizes "
        f"{sorted(sizes)} over {len(leaves)} leaves.")
  (batch,) = sizes
  if batch == 0:
    raise ValueError("`inputs` holds an empty batch (leading axis 0): there "
                     "is no example to take the penalty's mean over.")
  scores = jax.eval_shape(fn, inputs)
  if getattr(scores, "shape", None) not in ((batch,), (batch, 1)):
    raise ValueError(
        f"`fn` must map a batch of {batch} to one score per example, of "
        f"shape ({batch},) or ({batch}, 1), but it returned "
        f"{getattr(scores, 'shape', type(scores).__name__)}.")
  grads = jax.grad(lambda x: jnp.sum(fn(x)))(inputs)
  sumsq = sum(jnp.sum(_stats.abs_sq(g.reshape(batch, -1).astype(
      _stats.computed_in(g.dtype))).astype(jnp.float32), axis=1)
              for g in jax.tree.leaves(grads))
  norms = _safe_sqrt(sumsq)
  return jnp.mean(jnp.square(norms - jnp.asarray(target, jnp.float32)))

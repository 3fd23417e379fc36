"""Differentiating through the transformations (meta-learning a learning
rate, unrolled optimisation): derivatives equal optax's or a formula written
out, and match finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

pytestmark = pytest.mark.standard_promotion  # optax is the reference

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
GRADS = {"w": jnp.array([3.0, 4.0, 1.0]), "b": jnp.array([2.0])}  # norm 5.5


def _loss_after(tx, grads, steps=2):
  state, params = tx.init(PARAMS), PARAMS
  for _ in range(steps):
    updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
    params = optax.apply_updates(params, updates)
  return sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _layer_clip_reference(max_norm):
  """Each leaf scaled by min(1, max_norm / ||leaf||), written out."""
  def update(grads, state, params=None):
    del params
    return jax.tree.map(
        lambda g: g * jnp.minimum(1.0, max_norm / jnp.linalg.norm(g)),
        grads), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


CASES = {
    "clip_by_global_norm": (
        lambda lr: optax.chain(og.clip_by_global_norm(1.0), optax.sgd(lr)),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.sgd(lr))),
    "clip_by_layer_norm": (
        lambda lr: optax.chain(og.clip_by_layer_norm(1.0), optax.sgd(lr)),
        lambda lr: optax.chain(_layer_clip_reference(1.0), optax.sgd(lr))),
    "adaptive_grad_clip": (
        lambda lr: optax.chain(og.adaptive_grad_clip(0.1), optax.sgd(lr)),
        lambda lr: optax.chain(optax.adaptive_grad_clip(0.1), optax.sgd(lr))),
    "monitor": (  # an identity on the updates
        lambda lr: optax.chain(og.monitor(histogram=True), optax.sgd(lr)),
        lambda lr: optax.sgd(lr)),
    "guard(og.adam)": (
        lambda lr: og.guard(og.adam(lr), max_norm=1.0),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.adam(lr))),
    "guard(optax.sgd)": (
        lambda lr: og.guard(optax.sgd(lr, momentum=0.9), max_norm=1.0),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.sgd(lr, momentum=0.9))),
    "guard(og.sgd)": (
        lambda lr: og.guard(og.sgd(lr, momentum=0.9), max_norm=1.0),
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
                               optax.sgd(lr, momentum=0.9))),
    "add_l2_penalty": (
        lambda lr: optax.chain(og.add_l2_penalty(0.1, mask=None),
                               optax.sgd(lr)),
        lambda lr: optax.chain(optax.add_decayed_weights(0.1),
                               optax.sgd(lr))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_derivatives_equal_the_reference(name):
  ours, ref = CASES[name]
  d_lr = jax.jit(jax.grad(lambda lr: _loss_after(ours(lr), GRADS)))(0.1)
  want_lr = jax.grad(lambda lr: _loss_after(ref(lr), GRADS))(0.1)
  np.testing.assert_allclose(d_lr, want_lr, rtol=1e-4)
  h = 1e-3
  fd = (_loss_after(ours(0.1 + h), GRADS) -
        _loss_after(ours(0.1 - h), GRADS)) / (2 * h)
  np.testing.assert_allclose(d_lr, fd, rtol=2e-3)
  d_g = jax.jit(jax.grad(lambda g: _loss_after(ours(0.1), g)))(GRADS)
  want_g = jax.grad(lambda g: _loss_after(ref(0.1), g))(GRADS)
  np.testing.assert_allclose(_flat(d_g), _flat(want_g), rtol=1e-4, atol=1e-6)

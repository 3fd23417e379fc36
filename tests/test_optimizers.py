"""Guard-aware optimizers `og.adamw`, `og.adam`, `og.sgd` (issue 8).

What is checked:
1. the same arguments and the same numbers as their optax namesakes over 200
   steps (schedules, masks, Nesterov, `eps_root`, mixed dtypes), and
   `optax.tree.get` finds `mu`, `nu`, `count`, `trace` in their states;
2. the keep/scale protocol: `guard_keep=False` is an exact skip (zero update,
   state bit-identical, counts and schedules do not advance), and
   `guard_scale=(a, b)` equals optax's step on `a * b * grads`;
3. `optax.inject_hyperparams` on the learning rate;
4. `og.guard`'s fast path (guard-aware inner) and generic path (optax inner)
   give the same parameters and metrics on a stream with NaN, Inf, overflow,
   spike and bad-loss steps;
5. replica-consistent skipping under `shard_map` with `axis_name`;
6. no extra parameter-sized copy or temporary in the compiled fast-path step;
7. bad arguments fail with sentences.

Our optimizers are traced under the strict dtype promotion of `conftest.py`;
optax's (the reference) inside `jax.numpy_dtype_promotion("standard")`, since
optax's adam and several of its schedules mix Python floats with int32
counts.
"""

from __future__ import annotations

import functools
import inspect
import re

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_guard as og

STEPS = 200
F32 = jnp.float32
BF16 = jnp.bfloat16

# Schedules that optax itself can trace under strict promotion (its cosine,
# warmup-cosine and piecewise schedules cannot; one is tested below under
# standard promotion).
LR = optax.linear_schedule(1e-2, 1e-3, 150)
WD = optax.exponential_decay(1e-2, 20, 0.8)
MASK_TREE = {"Dense_0": {"kernel": True, "bias": False}, "head": True}


def _mask_fn(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


# --------------------------------------------------------------- helpers


def _standard():
  return jax.numpy_dtype_promotion("standard")


def _params(dtype=F32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": {"kernel": (6, 8), "bias": (8,)},
            "head": {"kernel": (8, 3)}}
  return jax.tree.map(
      lambda s: jnp.asarray(0.5 * rng.normal(size=s), dtype), shapes,
      is_leaf=lambda s: isinstance(s, tuple))


def _grad_stack(params, steps, seed=1):
  """`steps` gradients stacked on a leading axis, of varying size."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.normal(0.0, 0.5, size=steps)).astype(np.float32)

  def leaf(p):
    g = rng.normal(size=(steps,) + p.shape).astype(np.float32)
    g *= scale.reshape((steps,) + (1,) * p.ndim)
    return jnp.asarray(g, p.dtype)

  return jax.tree.map(leaf, params)


def _apply(params, updates):
  """`optax.apply_updates` with its promotion written out (strict-safe)."""
  def one(p, u):
    with jax.numpy_dtype_promotion("standard"):
      dtype = jnp.promote_types(p.dtype, u.dtype)
    return (p.astype(dtype) + u.astype(dtype)).astype(p.dtype)
  return jax.tree.map(one, params, updates)


def _trajectory(tx, params, grads):
  """Params, state and update after every step of a `lax.scan`."""
  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    p = _apply(p, u)
    return (p, s), (p, s, u)

  @jax.jit
  def run(p, gs):
    return lax.scan(body, (p, tx.init(p)), gs)[1]

  return jax.device_get(run(params, grads))


def _tol(dtype):
  # float32: rounding; bfloat16: at most one unit in the last place.
  return 2.0**-7 if np.dtype(dtype) == np.dtype(BF16) else 1e-6


def _assert_close(ours, ref, what, *, leaf_scale=False):
  """Equal to rounding. `leaf_scale`: for two differently compiled programs,
  where XLA fuses `a * b + c` into one rounding in one and not the other, an
  element that is a small difference of larger terms may differ by rounding
  of the terms: allow that, relative to the leaf's largest element."""
  lo, lr_ = jax.tree.leaves(ours), jax.tree.leaves(ref)
  assert len(lo) == len(lr_), what
  for i, (a, b) in enumerate(zip(lo, lr_)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.dtype,
                                                       b.dtype)
    rtol = _tol(a.dtype)
    a, b = a.astype(np.float32), b.astype(np.float32)
    atol = rtol * float(np.max(np.abs(b), initial=0.0)) if leaf_scale else 0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=max(atol, 1e-30),
                               err_msg=f"{what}, leaf {i}")


def _same_bits(a, b, what):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for i, (x, y) in enumerate(zip(la, lb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
    assert x.tobytes() == y.tobytes(), f"{what}: leaf {i} changed"


def _exact_zeros(tree, what):
  for i, u in enumerate(jax.tree.leaves(tree)):
    u = np.asarray(u).astype(np.float32)
    assert np.all(u == 0.0) and not np.any(np.signbit(u)), (
        f"{what}: leaf {i} is not all +0.0")


# ================================ 1. same arguments, same numbers as optax

# name -> (build(module) with module = og or optax, parameter dtype)
EQUIV = {
    "adamw": (lambda m: m.adamw(1e-2), F32),
    "adamw_hyperparams": (lambda m: m.adamw(
        3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10, weight_decay=0.05),
                          F32),
    "adamw_no_decay": (lambda m: m.adamw(1e-2, weight_decay=0.0), F32),
    "adamw_lr_and_wd_schedules_mask_tree": (lambda m: m.adamw(
        LR, weight_decay=WD, mask=MASK_TREE), F32),
    "adamw_mask_callable_nesterov_eps_root": (lambda m: m.adamw(
        1e-2, eps_root=1e-8, weight_decay=0.1, mask=_mask_fn, nesterov=True),
                                              F32),
    "adam": (lambda m: m.adam(1e-2), F32),
    "adam_nesterov_schedule": (lambda m: m.adam(
        LR, b1=0.95, eps_root=1e-8, nesterov=True), F32),
    "sgd_schedule": (lambda m: m.sgd(LR), F32),
    "sgd_momentum": (lambda m: m.sgd(0.05, momentum=0.9), F32),
    "sgd_negative_momentum_nesterov": (lambda m: m.sgd(
        0.05, momentum=-0.5, nesterov=True), F32),
    "sgd_nesterov_schedule": (lambda m: m.sgd(
        LR, momentum=0.9, nesterov=True), F32),
    # Mixed precision.
    "adamw_bf16_params_f32_mu": (lambda m: m.adamw(
        1e-2, mu_dtype=jnp.float32), BF16),
    "adam_bf16_params_f32_mu_nesterov": (lambda m: m.adam(
        1e-2, mu_dtype=jnp.float32, nesterov=True), BF16),
    "adamw_f32_params_bf16_mu": (lambda m: m.adamw(
        1e-2, mu_dtype=jnp.bfloat16), F32),
    "sgd_bf16_params_f32_trace": (lambda m: m.sgd(
        0.05, momentum=0.9, accumulator_dtype=jnp.float32), BF16),
    "sgd_f32_params_bf16_trace_nesterov": (lambda m: m.sgd(
        0.05, momentum=0.9, nesterov=True, accumulator_dtype=jnp.bfloat16),
                                            F32),
}


def _check_against_optax(build, dtype, ours_strict=True):
  params = _params(dtype)
  grads = _grad_stack(params, STEPS)
  ours = build(og)
  assert isinstance(ours, og.GuardAwareTransformation)
  if ours_strict:
    p1, s1, u1 = _trajectory(ours, params, grads)
  else:
    with _standard():
      p1, s1, u1 = _trajectory(ours, params, grads)
  with _standard():
    p2, s2, u2 = _trajectory(build(optax), params, grads)

  _assert_close(u1, u2, "updates")
  _assert_close(p1, p2, "params")
  steps = np.arange(1, STEPS + 1, dtype=np.int32)
  np.testing.assert_array_equal(optax.tree.get(s1, "count"), steps)
  if isinstance(s1, (og.AdamwState, og.AdamState)):
    for key in ("mu", "nu"):
      _assert_close(optax.tree.get(s1, key), optax.tree.get(s2, key), key)
    np.testing.assert_array_equal(s2[0].count, steps)  # ScaleByAdamState
  else:
    assert isinstance(s1, og.SgdState)
    _assert_close(optax.tree.get(s1, "trace"), optax.tree.get(s2, "trace"),
                  "trace")


@pytest.mark.parametrize("name", sorted(EQUIV))
def test_same_numbers_as_optax_over_200_steps(name):
  build, dtype = EQUIV[name]
  _check_against_optax(build, dtype)


@pytest.mark.standard_promotion  # optax's cosine schedules are not strict
def test_same_numbers_with_warmup_cosine_schedules():
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, STEPS, 1e-4)
  wd = optax.cosine_decay_schedule(1e-2, STEPS)
  _check_against_optax(lambda m: m.adamw(lr, weight_decay=wd, mask=_mask_fn),
                       F32, ours_strict=False)


def test_signatures_match_optax():
  for name in ("adamw", "adam", "sgd"):
    ours = inspect.signature(getattr(og, name)).parameters
    theirs = inspect.signature(getattr(optax, name)).parameters
    assert list(ours) == list(theirs), name
    for key in ours:
      assert ours[key].kind == theirs[key].kind, (name, key)
      assert ours[key].default == theirs[key].default, (name, key)


@pytest.mark.standard_promotion  # optax's reduce_on_plateau mixes dtypes
def test_optax_tree_get_reads_our_states():
  params = _params()
  g = jax.tree.map(jnp.ones_like, params)

  def one_step(tx, **extra):
    return jax.jit(tx.update)(g, tx.init(params), params, **extra)[1]

  state = one_step(og.adamw(1e-2))
  assert int(optax.tree.get(state, "count")) == 1
  chex.assert_trees_all_equal(optax.tree.get(state, "mu"), state.mu)
  chex.assert_trees_all_equal(optax.tree.get(state, "nu"), state.nu)
  state = one_step(og.sgd(0.1, momentum=0.9))
  assert int(optax.tree.get(state, "count")) == 1
  chex.assert_trees_all_equal(optax.tree.get(state, "trace"), state.trace)
  # Inside a chain, beside every other piece: no field of theirs clashes
  # with optax's `count` or with `reduce_on_plateau`'s `scale`.
  pieces = (og.monitor(), og.clip_by_global_norm(1.0),
            og.add_decayed_weights(0.1), og.add_l1_penalty(0.1))
  state = one_step(optax.chain(*pieces, og.adam(1e-2)))
  assert int(optax.tree.get(state, "count")) == 1
  chex.assert_trees_all_equal(optax.tree.get(state, "mu"), state[-1].mu)
  state = one_step(optax.chain(*pieces, optax.contrib.reduce_on_plateau()),
                   value=jnp.float32(1.0))
  assert float(optax.tree.get(state, "scale")) == 1.0


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_optax_tree_get_finds_the_count_inside_the_guard(inner):
  """DESIGN §7: our field names must not clash with the optimizer's `count`
  in `optax.tree.get`."""
  params = _params()
  tx = og.guard(og.adamw(1e-2) if inner == "adamw"
                else og.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  fields = [jax.tree_util.keystr(path) for path, _ in
            optax.tree.get_all_with_path(state, "count")]
  assert len(fields) == 1 and "inner_state" in fields[0], (
      f"optax.tree.get(state, 'count') is ambiguous: fields {fields}")
  assert int(optax.tree.get(state, "count")) == 0


# =========================================== 2. the keep/scale protocol

PROTOCOL = {
    "adamw_schedules_mask": lambda m: m.adamw(
        LR, weight_decay=WD, mask=MASK_TREE),
    "adam_nesterov_eps_root": lambda m: m.adam(
        1e-2, eps_root=1e-8, nesterov=True),
    "adamw_bf16_mu": lambda m: m.adamw(1e-2, mu_dtype=jnp.bfloat16),
    "sgd_schedule": lambda m: m.sgd(LR),
    "sgd_nesterov_schedule": lambda m: m.sgd(LR, momentum=0.9,
                                             nesterov=True),
}


@functools.lru_cache(maxsize=None)
def _protocol_update(name):
  """Ours (plain and guarded) and optax's reference update, all jitted
  (XLA contracts `a * b + c` into one rounding: compare jit with jit)."""
  tx = PROTOCOL[name](og)
  ref = PROTOCOL[name](optax)
  with _standard():
    ref_update = jax.jit(ref.update)

  @jax.jit
  def guarded(g, s, p, keep, a, b):
    return tx.update(g, s, p, guard_keep=keep, guard_scale=(a, b))

  @jax.jit
  def keep_only(g, s, p, keep):
    return tx.update(g, s, p, guard_keep=keep)

  @jax.jit
  def scale_only(g, s, p, a, b):
    return tx.update(g, s, p, guard_scale=(a, b))

  return {"tx": tx, "plain": jax.jit(tx.update), "guarded": guarded,
          "keep_only": keep_only, "scale_only": scale_only, "ref": ref,
          "ref_update": ref_update}


def _bad(g):
  """NaN in one leaf, -Inf and +Inf in another."""
  g = jax.tree.map(lambda x: x, g)
  g["head"]["kernel"] = g["head"]["kernel"].at[1, 2].set(jnp.nan)
  g["Dense_0"]["bias"] = g["Dense_0"]["bias"].at[0].set(-jnp.inf)
  g["Dense_0"]["bias"] = g["Dense_0"]["bias"].at[5].set(jnp.inf)
  return g


def _take_step(stack, i):
  return jax.tree.map(lambda x: x[i], stack)


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_keep_false_is_an_exact_skip(name):
  fns = _protocol_update(name)
  tx, plain, guarded = fns["tx"], fns["plain"], fns["guarded"]
  ref, ref_update = fns["ref"], fns["ref_update"]
  params = _params()
  grads = _grad_stack(params, 5, seed=7)
  state = tx.init(params)
  with _standard():
    ref_state = ref.init(params)
  for i in range(3):
    g = _take_step(grads, i)
    u, state = plain(g, state, params)
    with _standard():
      _, ref_state = ref_update(g, ref_state, params)
    params = _apply(params, u)

  bad = _bad(_take_step(grads, 3))
  for a, b in [(0.3, 2.0), (1.0, 1.0), (np.nan, np.inf)]:
    u, skipped = guarded(bad, state, params, jnp.bool_(False), F32(a), F32(b))
    _exact_zeros(u, f"update of a skipped step, scale {(a, b)}")
    _same_bits(skipped, state, f"state after a skipped step, scale {(a, b)}")
  assert int(optax.tree.get(skipped, "count")) == 3

  # The next step sees count 3 (bias correction, schedule) as if the skipped
  # call had not happened, and is optax's fourth step.
  g = _take_step(grads, 4)
  u_after, s_after = plain(g, skipped, params)
  u_direct, s_direct = plain(g, state, params)
  _same_bits((u_after, s_after), (u_direct, s_direct), "step after a skip")
  with _standard():
    u_ref, ref_after = ref_update(g, ref_state, params)
  _assert_close(u_after, u_ref, "step after a skip vs optax",
                leaf_scale=True)
  assert int(optax.tree.get(s_after, "count")) == 4


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_keep_true_with_scale_equals_optax_on_scaled_grads(name):
  fns = _protocol_update(name)
  tx, plain, guarded = fns["tx"], fns["plain"], fns["guarded"]
  ref, ref_update = fns["ref"], fns["ref_update"]
  params = _params()
  grads = _grad_stack(params, 4, seed=8)
  state = tx.init(params)
  with _standard():
    ref_state = ref.init(params)
  for i in range(4):
    g = _take_step(grads, i)
    for factor, (a, b) in [(0.5, (0.5, 1.0)), (0.5, (2.0, 0.25)),
                           (1.0, (1.0, 1.0))]:
      u, s = guarded(g, state, params, jnp.bool_(True), F32(a), F32(b))
      with _standard():
        u_ref, s_ref = ref_update(
            jax.tree.map(lambda x, f=factor: x * f, g), ref_state, params)
      _assert_close(u, u_ref, f"step {i}, scale {(a, b)}", leaf_scale=True)
      for key in ("mu", "nu", "trace"):
        if optax.tree.get(s, key) is not None:
          _assert_close(optax.tree.get(s, key), optax.tree.get(s_ref, key),
                        f"{key} at step {i}, scale {(a, b)}", leaf_scale=True)
      assert int(optax.tree.get(s, "count")) == i + 1
    # Only one of the keywords given: the other takes its default.
    u_keep, _ = fns["keep_only"](g, state, params, jnp.bool_(True))
    u_none, _ = plain(g, state, params)
    _assert_close(u_keep, u_none, "guard_keep=True alone")
    u_half, _ = fns["scale_only"](g, state, params, F32(0.5), F32(1.0))
    u_both, _ = guarded(g, state, params, jnp.bool_(True), F32(0.5),
                        F32(1.0))
    _assert_close(u_half, u_both, "guard_scale alone", leaf_scale=True)
    state, ref_state = s, s_ref
    params = _apply(params, u)


# ==================================== 3. inject_hyperparams on the rate


def test_inject_hyperparams_learning_rate():
  params = _params()
  grads = _grad_stack(params, 6, seed=3)
  others = ("b1", "b2", "eps", "eps_root", "weight_decay")
  injected = optax.inject_hyperparams(og.adamw, static_args=others)(
      learning_rate=0.01)
  plain = og.adamw(0.01)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def inj_step(g, s, p):
    return injected.update(g, s, p)

  plain_step = jax.jit(plain.update)
  s_inj, s_plain = injected.init(params), plain.init(params)
  assert set(s_inj.hyperparams) == {"learning_rate"}
  for i in range(4):
    g = _take_step(grads, i)
    u_inj, s_inj = inj_step(g, s_inj, params)
    u_plain, s_plain = plain_step(g, s_plain, params)
    _assert_close(u_inj, u_plain, f"step {i}")
    _assert_close(s_inj.inner_state, s_plain, f"state at step {i}")
  # A new rate takes effect without retracing and equals og.adamw(0.004).
  s_inj.hyperparams["learning_rate"] = jnp.asarray(0.004, F32)
  g = _take_step(grads, 4)
  u_inj, _ = inj_step(g, s_inj, params)
  u_ref, _ = jax.jit(og.adamw(0.004).update)(g, s_plain, params)
  _assert_close(u_inj, u_ref, "after changing the rate")
  assert not np.allclose(u_inj["head"]["kernel"],
                         u_plain["head"]["kernel"])


def test_inject_hyperparams_every_default_like_optax():
  """With every numeric argument injected (b1, b2... become float32
  arrays) optax's own numbers move by ~1e-5 (`1 - b2` rounds differently in
  float32 than in float64); ours move the same way, bit for bit."""
  params = _params()
  grads = _grad_stack(params, 5, seed=4)
  ours = optax.inject_hyperparams(og.adamw)(learning_rate=0.01)
  theirs = optax.inject_hyperparams(optax.adamw)(learning_rate=0.01)
  s1, s2 = ours.init(params), theirs.init(params)
  assert set(s1.hyperparams) == set(s2.hyperparams)
  step1 = jax.jit(ours.update)
  with _standard():
    step2 = jax.jit(theirs.update)
  for i in range(5):
    g = _take_step(grads, i)
    u1, s1 = step1(g, s1, params)
    with _standard():
      u2, s2 = step2(g, s2, params)
    _assert_close(u1, u2, f"step {i}")
    for key in ("mu", "nu"):
      _assert_close(optax.tree.get(s1, key), optax.tree.get(s2, key), key)


def test_inject_hyperparams_with_bfloat16_params():
  """`optax.inject_hyperparams` casts float hyperparameters to bf16 params'
  dtype: a value that stays valid there is accepted (a bf16 array is a
  number), one that rounds out of range (b2 = 0.999 -> 1.0, which makes
  every update 0/0) is refused at init with the way out."""
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  grads = {"w": jnp.full((4,), 0.5, jnp.bfloat16)}
  guarded = optax.inject_hyperparams(og.guard, static_args=("spike_window",))(
      og.sgd(0.5), max_norm=0.25)
  updates, _ = jax.jit(guarded.update)(grads, guarded.init(params), params)
  # Clipped to norm 0.25 (elements 0.125), then -0.5 * g.
  np.testing.assert_array_equal(np.asarray(updates["w"], np.float32),
                                np.full((4,), -0.0625, np.float32))
  with pytest.raises(ValueError, match=(
      r"`b2` must be a finite real number >= 0 and < 1, but got "
      r"Array\(1, dtype=bfloat16\)\. It is a bfloat16 value: under "
      r"`optax.inject_hyperparams`.*pass `hyperparam_dtype=jnp.float32`\.")):
    optax.inject_hyperparams(og.adamw)(learning_rate=1e-3).init(params)
  injected = optax.inject_hyperparams(og.adamw, hyperparam_dtype=F32)(
      learning_rate=1e-3)
  injected.init(params)


@pytest.mark.parametrize("make", [
    lambda m, lr: m.adamw(lr, weight_decay=0.1),
    lambda m, lr: m.adamw(1e-3, weight_decay=lr),
    lambda m, lr: m.sgd(lr, momentum=0.9, nesterov=True),
], ids=["adamw", "adamw_decay", "sgd"])
def test_a_float32_array_rate_on_bfloat16_params_promotes_like_optax(make):
  """A constant rate given as a float32 array (as `optax.inject_hyperparams`
  with `hyperparam_dtype=jnp.float32` passes it) multiplies the bf16 update
  in float32, as optax's `scale` does; a schedule's value is cast to bf16,
  as optax's `scale_by_schedule` does; a float32 weight decay, array or
  schedule, promotes as in optax's `add_decayed_weights`. Updates and
  parameters agree with optax's bit for bit, dtypes included. Ours run
  under strict dtype promotion (the promotion is written out), optax's
  under the standard promotion it needs."""
  params = {"w": jnp.linspace(-1.0, 1.0, 24, dtype=F32).astype(BF16),
            "b": jnp.full((3,), 0.3, BF16)}
  keys = jax.random.split(jax.random.PRNGKey(7), 5)
  for lr in (jnp.asarray(1.3e-3, F32), optax.linear_schedule(1.3e-3, 1e-4, 4)):
    with _standard():
      ours, theirs = make(og, lr), make(optax, lr)
      s2 = theirs.init(params)
    p1 = p2 = params
    s1 = ours.init(params)
    for key in keys:
      g = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype),
                       params)
      u1, s1 = jax.jit(ours.update)(g, s1, p1)
      with _standard():
        u2, s2 = jax.jit(theirs.update)(g, s2, p2)
        p2 = optax.apply_updates(p2, u2)
      for name in params:
        assert u1[name].dtype == u2[name].dtype, (lr, name)
        np.testing.assert_array_equal(np.asarray(u1[name], np.float32),
                                      np.asarray(u2[name], np.float32))
      with _standard():  # optax's own, onto bf16 from a float32 update
        p1 = optax.apply_updates(p1, u1)
    chex.assert_trees_all_equal(p1, p2)


@pytest.mark.parametrize("kwargs", [{"eps": 1e-3}, {"eps_root": 1e-8}],
                         ids=["eps", "eps_root"])
def test_a_float32_eps_on_bfloat16_params_promotes_like_optax(kwargs):
  """Under strict promotion too (ours), bit for bit with optax's under the
  standard promotion it needs; dtypes included."""
  kwargs = {k: jnp.float32(v) for k, v in kwargs.items()}
  params = {"w": jnp.linspace(-1.0, 1.0, 24, dtype=F32).astype(BF16)}
  ours = og.adam(1e-2, **kwargs)
  with _standard():
    theirs = optax.adam(1e-2, **kwargs)
    s2 = theirs.init(params)
  s1 = ours.init(params)
  for key in jax.random.split(jax.random.PRNGKey(3), 3):
    g = {"w": jax.random.normal(key, (24,), BF16)}
    u1, s1 = jax.jit(ours.update)(g, s1, params)
    with _standard():
      u2, s2 = jax.jit(theirs.update)(g, s2, params)
    assert u1["w"].dtype == u2["w"].dtype
    np.testing.assert_array_equal(np.asarray(u1["w"], np.float32),
                                  np.asarray(u2["w"], np.float32))


@pytest.mark.parametrize("name", ["b1", "b2"])
def test_a_moment_decay_of_one_is_refused(name):
  with pytest.raises(ValueError, match=(
      f"`{name}` must be a finite real number >= 0 and < 1, but got 1.0.")):
    og.adamw(1e-3, **{name: 1.0})


# =========================== 4. guard: fast path == generic path


GUARD_KW = dict(max_norm=2.0, spike_sigma=4.0, spike_window=16,
                spike_warmup_steps=8, max_consecutive=5)
GUARD_STEPS = 48
NAN_STEPS, INF_STEPS, OVERFLOW_STEPS = (12,), (25,), (40,)
SPIKE_STEPS, BAD_LOSS_STEPS = (20, 21, 33), (30,)


def _guard_stream():
  rng = np.random.default_rng(5)
  params = _params()
  gs, losses = [], []
  for i in range(GUARD_STEPS):
    scale = float(np.exp(rng.normal(0.0, 0.1)))
    if i in SPIKE_STEPS:
      scale *= 50.0
    g = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape) * scale,
                                          np.float32), params)
    if i in NAN_STEPS:
      g["head"]["kernel"][0, 0] = np.nan
    if i in INF_STEPS:
      g["Dense_0"]["bias"][3] = -np.inf
    if i in OVERFLOW_STEPS:  # finite, but the global norm overflows float32
      g["Dense_0"]["kernel"][:] = 1e38
    gs.append(g)
    # A steady loss (z-scores of 1), NaN on the bad-loss steps.
    losses.append(np.nan if i in BAD_LOSS_STEPS else 1.0 + 0.01 * (-1)**i)
  stack = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *gs)
  return params, stack, jnp.asarray(np.array(losses, np.float32))


def _guard_run(tx, with_loss):
  params, grads, losses = _guard_stream()

  def body(carry, inputs):
    p, s = carry
    g, loss = inputs
    extra = {"loss": loss} if with_loss else {}
    u, s = tx.update(g, s, p, **extra)
    p = _apply(p, u)
    return (p, s), (p, s.inner_state, og.metrics(s))

  @jax.jit
  def run(p, gs, ls):
    return lax.scan(body, (p, tx.init(p)), (gs, ls))[1]

  return jax.device_get(run(params, grads, losses))


def _assert_metrics_equal(m1, m2, step):
  assert set(m1) == set(m2), (step, set(m1) ^ set(m2))
  for key in m1:
    a, b = np.asarray(m1[key]), np.asarray(m2[key])
    assert a.dtype == b.dtype and a.shape == b.shape, (step, key)
    if np.issubdtype(a.dtype, np.floating):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-30,
                                 err_msg=f"{key} at step {step}")
    else:
      np.testing.assert_array_equal(a, b, err_msg=f"{key} at step {step}")


@pytest.mark.parametrize("inner,with_loss", [("adamw", True),
                                             ("sgd_momentum", False)])
def test_fast_and_generic_paths_agree(inner, with_loss):
  build = {"adamw": lambda m: m.adamw(1e-2),
           "sgd_momentum": lambda m: m.sgd(0.05, momentum=0.9)}[inner]
  fast = og.guard(build(og), **GUARD_KW)
  generic = og.guard(build(optax), **GUARD_KW)
  p1, inner1, m1 = _guard_run(fast, with_loss)
  with _standard():
    p2, _, m2 = _guard_run(generic, with_loss)

  for t in range(GUARD_STEPS):
    step = lambda tree, t=t: _take_step(tree, t)  # noqa: E731
    _assert_close(step(p1), step(p2), f"params at step {t}",
                  leaf_scale=True)
    _assert_metrics_equal(step(m1), step(m2), t)

  skipped = np.asarray(m1["optim/skipped"])
  bad = set(NAN_STEPS + INF_STEPS + OVERFLOW_STEPS)
  if with_loss:
    bad |= set(BAD_LOSS_STEPS)
  expected = np.isin(np.arange(GUARD_STEPS), sorted(bad | set(SPIKE_STEPS)))
  np.testing.assert_array_equal(skipped, expected)
  assert int(m1["optim/num_skipped"][-1]) == len(bad)
  assert int(m1["optim/num_spikes"][-1]) == len(SPIKE_STEPS)
  assert int(m1["optim/num_clipped"][-1]) > 0
  # The fast path's skips leave the optimizer's state bit-identical.
  for t in np.flatnonzero(skipped):
    _same_bits(_take_step(inner1, t), _take_step(inner1, t - 1),
               f"{inner} state at skipped step {t}")
    _same_bits(_take_step(p1, t), _take_step(p1, t - 1),
               f"params at skipped step {t}")
  counts = np.asarray(optax.tree.get(inner1, "count"))
  np.testing.assert_array_equal(counts, np.cumsum(~skipped))


# =================================== 5. shard_map, one device's NaN

N = 8


def _mesh():
  assert jax.device_count() >= N, "conftest.py must give 8 devices"
  return Mesh(np.array(jax.devices()[:N]), ("d",))


_PSPECS = {"kernel": P("d", None), "bias": P()}
_GSPECS = {"kernel": P(None, "d", None), "bias": P(None, "d", None)}


def _state_specs(state):
  """The optimizer's moments of the sharded kernel are sharded like it."""
  def spec(path, leaf):
    name = jax.tree_util.keystr(path)
    if "inner_state" in name and "kernel" in name and np.ndim(leaf) == 2:
      return P("d", None)
    return P()
  return jax.tree_util.tree_map_with_path(spec, state)


def _sharded_stream():
  rng = np.random.default_rng(6)
  k = 6
  params = {"kernel": rng.normal(size=(16, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32)}
  gk = rng.normal(size=(k, 16, 4)).astype(np.float32)
  gk *= (1.0 + np.arange(16) // 2).astype(np.float32)[None, :, None]
  gb = rng.normal(size=(k, N, 4)).astype(np.float32)
  gk[1, 6, 1] = np.nan          # rows 6 and 7: device 3's shard only
  gk[4, 13, 2] = np.inf         # rows 12 and 13: device 6's shard only
  bad_loss = np.array([-1, -1, -1, 5, -1, -1], np.int32)  # device 5 only
  return params, gk, gb, bad_loss


def _sharded_body(tx):
  def body(carry, inputs):
    p, s = carry
    gk, gb, bad = inputs
    # The kernel's gradient is this device's shard (varying); the bias's is
    # summed over devices (invariant), as jax.grad gives it.
    g = {"kernel": gk, "bias": lax.psum(gb[0], "d")}
    loss = jnp.where(lax.axis_index("d") == bad, F32(np.nan), F32(1.0))
    u, s = tx.update(g, s, p, loss=loss)
    p = optax.apply_updates(p, u)
    return (p, s), jax.tree.map(lambda v: v[None], (p, s, u))
  return body


def _is_shard(path):
  return "kernel" in path and "last_bad" not in path


def _replicas_identical(tree, skip=lambda path: False):
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = jax.tree_util.keystr(path)
    if skip(name):
      continue
    leaf = np.asarray(leaf)
    raw = np.ascontiguousarray(leaf).view(np.uint8).reshape(leaf.shape[0], -1)
    for d in range(1, leaf.shape[0]):
      assert np.array_equal(raw[0], raw[d]), f"{name}: device {d} differs"
    checked += 1
  assert checked


def _check_sharded_run(p, s, u, params, gk, gb, bad_loss):
  k = gk.shape[0]
  skipped = np.asarray(s.nonfinite.skipped)[:, 0]
  np.testing.assert_array_equal(skipped, [False, True, False, True, True,
                                          False])
  for t in range(k):
    _replicas_identical(_take_step((p, s, u), t), skip=_is_shard)
  for t in (1, 3, 4):
    # Every device: its own kernel shard, the replicated bias and adamw's
    # state (count, moments) exactly as they were; zero updates.
    _same_bits(_take_step(p, t), _take_step(p, t - 1), f"params at {t}")
    _same_bits(_take_step(s.inner_state, t), _take_step(s.inner_state, t - 1),
               f"adamw state at {t}")
    _exact_zeros(_take_step(u, t), f"update at {t}")
  np.testing.assert_array_equal(np.asarray(s.inner_state.count)[:, 0],
                                [1, 1, 2, 2, 2, 3])
  # The good steps are those of the same guard on one device, on the global
  # gradients (sums in another order: float32 rounding).
  tx = og.guard(og.adamw(0.1), spike_sigma=None)
  ref_p, ref_s = params, tx.init(params)
  ref_step = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
  for t in range(k):
    g = {"kernel": gk[t], "bias": gb[t].sum(0)}
    loss = F32(np.nan) if bad_loss[t] >= 0 else F32(1.0)
    upd, ref_s = ref_step(g, ref_s, ref_p, loss)
    ref_p = optax.apply_updates(ref_p, upd)
    np.testing.assert_allclose(np.asarray(p["kernel"])[t].reshape(16, 4),
                               ref_p["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p["bias"])[t, 0], ref_p["bias"],
                               rtol=1e-5, atol=1e-6)


def _put(mesh, tree, specs):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, specs)


def test_shard_map_one_device_nan_freezes_every_replica():
  """`init` outside `shard_map`, the state passed in sharded like the
  parameters (kernel moments sharded, the rest replicated)."""
  mesh = _mesh()
  tx = og.guard(og.adamw(0.1), spike_sigma=None, axis_name="d")
  params, gk, gb, bad_loss = _sharded_stream()
  state = tx.init(params)
  sspecs = _state_specs(state)

  def run(p, s0, gks, gbs, bad):
    return lax.scan(_sharded_body(tx), (p, s0), (gks, gbs, bad))[1]

  fn = jax.jit(jax.shard_map(
      run, mesh=mesh, in_specs=(_PSPECS, sspecs, _GSPECS["kernel"],
                                _GSPECS["bias"], P()),
      out_specs=P(None, "d")))
  p, s, u = jax.device_get(fn(
      _put(mesh, params, _PSPECS), _put(mesh, state, sspecs),
      _put(mesh, gk, _GSPECS["kernel"]), _put(mesh, gb, _GSPECS["bias"]),
      _put(mesh, bad_loss, P())))
  _check_sharded_run(p, s, u, params, gk, gb, bad_loss)


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_shard_map_init_inside(inner):
  """`init` inside `shard_map` on a sharded parameter, as optax's own
  optimizers allow (`optax.tree.zeros_like` keeps the parameter's varying
  type): the moments must stay typed like the parameter so that the state
  survives `lax.scan`. Elementwise, so each shard's steps equal those of
  the whole array on one device."""
  mesh = _mesh()
  build = {"adamw": lambda: og.adamw(0.1, weight_decay=0.01),
           "sgd": lambda: og.sgd(0.1, momentum=0.9, nesterov=True)}[inner]
  tx = build()
  params, gk, _, _ = _sharded_stream()
  gk = np.nan_to_num(gk, posinf=1.0)
  params = {"kernel": params["kernel"]}

  def run(p, gks):
    def body(carry, g):
      p, s = carry
      u, s = tx.update({"kernel": g}, s, p)
      return (optax.apply_updates(p, u), s), None
    return lax.scan(body, (p, tx.init(p)), gks)[0][0]

  fn = jax.jit(jax.shard_map(
      run, mesh=mesh, in_specs=({"kernel": P("d", None)}, _GSPECS["kernel"]),
      out_specs={"kernel": P("d", None)}))
  p = jax.device_get(fn(_put(mesh, params, {"kernel": P("d", None)}),
                        _put(mesh, gk, _GSPECS["kernel"])))

  @jax.jit
  def whole(p, gks):
    def body(carry, g):
      p, s = carry
      u, s = tx.update({"kernel": g}, s, p)
      return (optax.apply_updates(p, u), s), None
    return lax.scan(body, (p, tx.init(p)), gks)[0][0]

  _assert_close(p, whole(params, gk), "sharded vs whole", leaf_scale=True)


# ======================= 6. no parameter-sized copy in the fast path

BIG_SHAPES = ("f32[512,1024]", "f32[1024,512]")


def _big_params():
  return {"a": jnp.zeros((512, 1024), F32), "b": jnp.zeros((1024, 512), F32),
          "c": jnp.zeros((7,), F32)}


def _compile(name):
  params = _big_params()
  if name == "og.adamw(keep, scale)":
    # The protocol alone: the decision as traced scalars.
    tx = og.adamw(1e-2)

    def step(p, s, g, keep, a, b):
      u, s = tx.update(g, s, p, guard_keep=keep, guard_scale=(a, b))
      return optax.apply_updates(p, u), s

    scalars = (jnp.bool_(True), F32(1.0), F32(1.0))
  else:
    tx = {"optax.adamw": lambda: optax.adamw(1e-2),
          "og.adamw": lambda: og.adamw(1e-2),
          "guard(og.adamw)": lambda: og.guard(og.adamw(1e-2)),
          "guard(og.adamw, monitor=False)": lambda: og.guard(
              og.adamw(1e-2), monitor=False)}[name]()

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    scalars = ()
  with _standard():
    state = tx.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, params, *scalars).compile()
  return compiled


@functools.lru_cache(maxsize=None)
def _hlo_facts(name):
  compiled = _compile(name)
  text = compiled.as_text()
  big_copies = [line.strip() for line in text.splitlines()
                if re.search(r"\bcopy\(", line) and
                any(s in line.split("copy(")[0] for s in BIG_SHAPES)]
  return big_copies, compiled.memory_analysis().temp_size_in_bytes


FAST = ["og.adamw", "og.adamw(keep, scale)", "guard(og.adamw)",
        "guard(og.adamw, monitor=False)"]


@pytest.mark.parametrize("name", FAST)
def test_fast_path_makes_no_parameter_sized_copy(name):
  base, _ = _hlo_facts("optax.adamw")
  copies, _ = _hlo_facts(name)
  assert len(copies) <= len(base), (
      f"{name} copies parameter-sized buffers that bare optax.adamw does "
      "not:\n" + "\n".join(copies))


@pytest.mark.parametrize("name", FAST)
def test_fast_path_needs_no_parameter_sized_temporary(name):
  _, base = _hlo_facts("optax.adamw")
  _, temp = _hlo_facts(name)
  slack = 1 << 20  # 1 MiB: less than one 2 MiB parameter leaf
  assert temp <= base + slack, (
      f"{name}: {temp} bytes of temporaries, bare optax.adamw {base}")


# ============================================================ 7. errors


@pytest.mark.parametrize("factory,kwargs,message", [
    (og.adamw, {"learning_rate": -1.0},
     "`learning_rate` must be a finite real number >= 0, but got -1.0."),
    (og.adam, {"learning_rate": float("nan")},
     "`learning_rate` must be a finite real number >= 0, but got nan."),
    (og.sgd, {"learning_rate": -0.5},
     "`learning_rate` must be a finite real number >= 0, but got -0.5."),
    (og.adamw, {"learning_rate": 0.1, "b1": 1.5},
     "`b1` must be a finite real number >= 0 and < 1, but got 1.5."),
    (og.adam, {"learning_rate": 0.1, "b2": -0.1},
     "`b2` must be a finite real number >= 0 and < 1, but got -0.1."),
    (og.adamw, {"learning_rate": 0.1, "nesterov": jnp.asarray(True)},
     "`nesterov` must be True or False, but got Array(True, dtype=bool)."),
    (og.sgd, {"learning_rate": 0.1, "momentum": 0.9, "nesterov": "True"},
     "`nesterov` must be True or False, but got 'True'."),
    (og.adam, {"learning_rate": 0.1, "b1": 0.99999999},  # Inf updates
     "`b1` must be a finite real number >= 0 and < 1, but got 0.99999999. "
     "It rounds to 1 in float32, the dtype it is computed in."),
    (og.adamw, {"learning_rate": 0.1, "eps": -1e-8},
     "`eps` must be a finite real number >= 0, but got -1e-08."),
    (og.adam, {"learning_rate": 0.1, "eps": 0.0},
     "`eps` and `eps_root` are both 0, so an element whose gradients have "
     "all been exactly zero (a dead unit, a padding embedding) gets 0/0 = "
     "NaN as its update; pass eps > 0 (optax's default is 1e-8) or "
     "eps_root > 0."),
    (og.adamw, {"learning_rate": 0.1, "weight_decay": -0.1},
     "`weight_decay` must be a finite real number >= 0, but got -0.1."),
    (og.sgd, {"learning_rate": 0.1, "momentum": 1.5},
     "`momentum` must be a finite real number >= -1 and <= 1, but got 1.5."),
    (og.adamw, {"learning_rate": 0.1, "mu_dtype": "foo"},
     "`mu_dtype` must be a floating-point (or complex) dtype such as "
     "jnp.bfloat16, or None, but got 'foo'."),
    (og.sgd, {"learning_rate": 0.1, "accumulator_dtype": "int32"},
     "`accumulator_dtype` must be a floating-point (or complex) dtype such as "
     "jnp.bfloat16, or None, but got 'int32'."),
])
def test_bad_arguments(factory, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    factory(**kwargs)


@pytest.mark.parametrize("make,factory,names_from", [
    (lambda: og.adamw(0.1), "adamw", "was initialised with"),
    (lambda: og.sgd(0.1, momentum=0.9), "sgd", "was initialised with"),
    (lambda: og.sgd(0.1), "sgd", "was called with"),
])
def test_updates_unlike_the_parameters_are_named(make, factory, names_from):
  """As every other transformation: the differing layer or shape is named
  (a bare broadcasting error, or optax's dict-key error read backwards,
  before)."""
  params = {"b": jnp.ones(3), "w": jnp.ones((2, 3))}
  tx = make()
  state = tx.init(params)
  with pytest.raises(ValueError, match=re.escape(
      f"`{factory}` got an update of shape (4, 3) for the parameter 'w' of "
      "shape (2, 3); each update must have its parameter's shape.")):
    tx.update({"b": jnp.ones(3), "w": jnp.ones((4, 3))}, state, params)
  with pytest.raises(ValueError, match=re.escape(
      f"`{factory}` {names_from} 2 parameter layers but got updates with 3; "
      "the trees must match. Only in the parameters: none; only in the "
      "updates: ['c'].")):
    tx.update(dict(params, c=jnp.ones(4)), state, params)


@pytest.mark.parametrize("make,factory,name", [
    (lambda s: og.adamw(s), "adamw", "learning_rate"),
    (lambda s: og.adamw(0.1, weight_decay=s), "adamw", "weight_decay"),
    (lambda s: og.sgd(s), "sgd", "learning_rate"),
])
def test_a_schedule_returning_an_array_is_refused(make, factory, name):
  """A per-column rate would broadcast into the updates (a scalar
  parameter's update became a vector), as `add_decayed_weights` refuses."""
  params = {"w": jnp.ones((2, 3)), "s": jnp.ones(())}
  tx = make(lambda count: jnp.array([0.1, 0.0, 0.0]))
  with pytest.raises(ValueError, match=re.escape(
      f"`{factory}`'s `{name}` schedule returned an array of shape (3,); a "
      "schedule must return one number.")):
    tx.update(params, tx.init(params), params)


@pytest.mark.standard_promotion  # traces optax.adamw
def test_adamw_mask_is_checked_at_init():
  """As `add_decayed_weights`' mask: refused at init with a sentence (a
  wrong structure failed at the first update inside jax's tree map), while
  the masks optax.adamw takes are taken alike: a single True for every
  leaf, flags 0/1 and 0-d bool arrays."""
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  with pytest.raises(ValueError, match=re.escape(
      "The `mask` of `adamw` must have the structure of the parameters or a "
      "prefix of it")):
    og.adamw(0.1, mask={"Dense_0": {"kernel": True}}).init(params)
  with pytest.raises(ValueError, match=re.escape(
      "The `mask` of `adamw` must hold one bool per parameter leaf, but got "
      "'no'.")):  # (the leaves in order: bias first)
    og.adamw(0.1, mask={"Dense_0": {"kernel": "yes", "bias": "no"}}
             ).init(params)
  # A single False with a decay: what `inject_hyperparams` makes of a
  # callable mask (its value at the step count), which stopped the decay
  # without a word.
  ndim_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  with pytest.raises(ValueError, match=re.escape(
      "The `mask` of `adamw` is the single bool False, which decays no leaf "
      "although `weight_decay` is set: pass weight_decay=0 for no decay, or "
      "a tree of bools. If you passed a function through "
      "`optax.inject_hyperparams`, list it in its `static_args`")):
    optax.inject_hyperparams(og.adamw)(
        learning_rate=0.1, weight_decay=0.5, mask=ndim_mask).init(params)
  with pytest.raises(ValueError, match="is the single bool False"):
    og.adamw(0.1, mask=False).init(params)
  for one_leaf in ({"Dense_0": {"kernel": jnp.ones((2, 2))}}, jnp.ones(2)):
    with pytest.raises(ValueError, match="is the single bool False"):
      optax.inject_hyperparams(og.adamw)(
          learning_rate=0.1, weight_decay=0.5, mask=ndim_mask
      ).init(one_leaf)
  with pytest.raises(ValueError, match=re.escape(  # og.decay_mask says so
      "`decay_mask` was called with a 0-d integer array, not parameters")):
    optax.inject_hyperparams(og.adamw)(
        learning_rate=0.1, weight_decay=0.5, mask=og.decay_mask).init(params)
  # An integer parameter that the decay picks: optax.adamw's decay of it is
  # truncated by optax.apply_updates (n = [1, 5, 100] became [0, 2, 97]).
  counted = {**params, "n": jnp.asarray([1, 5, 100])}
  with pytest.raises(ValueError, match=re.escape(
      "`adamw` would decay the parameter 'n', which is of dtype int32")):
    og.adamw(0.1).init(counted)
  og.adamw(0.1, mask=og.decay_mask).init(counted)  # a vector: not decayed
  injected = optax.inject_hyperparams(og.adamw, static_args=("mask",))(
      learning_rate=0.1, weight_decay=0.5, mask=og.decay_mask)
  decoupled, _ = injected.update(jax.tree.map(jnp.zeros_like, params),
                                 injected.init(params), params)
  np.testing.assert_allclose(decoupled["Dense_0"]["kernel"], -0.1 * 0.5)
  np.testing.assert_array_equal(decoupled["Dense_0"]["bias"], 0.0)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  for mask in (True, {"Dense_0": {"kernel": 1, "bias": 0}},
               {"Dense_0": {"kernel": np.array(True),
                            "bias": np.array(False)}}):
    ours, theirs = og.adamw(0.1, mask=mask), optax.adamw(0.1, mask=mask)
    got, _ = ours.update(grads, ours.init(params), params)
    want, _ = theirs.update(grads, theirs.init(params), params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=str(mask))


@pytest.mark.parametrize("eps", [np.float32(0), jnp.float32(0), np.zeros(())])
def test_a_zero_eps_is_refused_in_any_scalar_type(eps):
  with pytest.raises(ValueError, match=r"^`eps` and `eps_root` are both 0"):
    og.adam(0.1, eps=eps)


def test_an_eps_that_rounds_to_zero_in_float16_is_refused_at_init():
  """1e-8 is 0 in float16: an all-zero gradient would give 0/0 there (as
  in optax), and the guard does not read this optimizer's update back."""
  half = {"Dense_0": {"kernel": jnp.zeros((2, 2), jnp.float16)}}
  with pytest.raises(ValueError, match=re.escape(
      "`eps`=1e-08 and `eps_root`=0.0 round to 0 in float16 (or below "
      "5.96e-08, which XLA flushes to 0), the dtype of the "
      "parameter 'Dense_0/kernel', so an element whose gradients have all "
      "been exactly zero gets 0/0 = NaN as its update; pass an eps that "
      "float16 holds (at least 5.96e-08; float16 training commonly takes 1e-4 "
      "or more, since a smaller one lets Adam's quotient overflow), or keep "
      "the parameters in float32 or bfloat16.")):
    og.adamw(0.1).init(half)
  # The same default is fine in bfloat16 (float32's exponent range), and a
  # representable eps is fine in float16: its 0/0 is gone.
  og.adamw(0.1).init(jax.tree.map(lambda x: x.astype(jnp.bfloat16), half))
  tx = og.adam(0.1, eps=1e-7)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, half), tx.init(half))
  assert np.all(np.asarray(u["Dense_0"]["kernel"]) == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_subnormal_eps_is_refused_at_init(dtype):
  """XLA flushes float32 subnormals to 0: an eps of 1e-40 would still give
  0/0 = NaN for an all-zero gradient (checked here), so it is refused."""
  params = {"w": jnp.zeros(2, dtype)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  flushed = jax.jit(lambda g: g / (jnp.sqrt(g * g) + jnp.float32(1e-40)))(
      jnp.zeros(1, jnp.float32))
  assert np.isnan(flushed[0])  # the premise: 1e-40 is 0 in XLA's arithmetic
  with pytest.raises(ValueError, match=re.escape(
      f"`eps`=1e-40 and `eps_root`=0.0 round to 0 in {jnp.dtype(dtype)} (or "
      "below 1.18e-38, which XLA flushes to 0), the dtype of the parameter "
      "'w', so an element")):
    og.adam(0.1, eps=1e-40).init(params)
  tx = og.adam(0.1, eps=1e-37)  # a normal float32 number: no 0/0
  u, _ = jax.jit(tx.update)(zeros, tx.init(params))
  np.testing.assert_array_equal(u["w"], [0, 0])


def test_adamw_needs_params():
  params = _params()
  g = jax.tree.map(jnp.ones_like, params)
  for tx in (og.adamw(0.1), og.adamw(0.1, weight_decay=WD),
             og.adamw(0.1, mask=MASK_TREE)):
    with pytest.raises(ValueError, match=re.escape(
        "`adamw` needs the current parameters: call "
        "`update(updates, state, params)`; it was called with params=None.")):
      tx.update(g, tx.init(params))
  # Without weight decay, as in optax, no params are needed.
  for tx in (og.adam(0.1), og.sgd(0.1, momentum=0.9)):
    u, _ = tx.update(g, tx.init(params))
    assert jax.tree.structure(u) == jax.tree.structure(params)


@pytest.mark.parametrize("wrapper", ["skip_nonfinite", "skip_spikes"])
def test_skippers_take_the_fast_path_with_the_same_results(wrapper):
  """Around og.adamw the skippers hand over the decision; the numbers and
  the skip are those of the generic path around optax.adamw."""
  params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
  kw = ({"max_consecutive": 3} if wrapper == "skip_nonfinite"
        else {"window": 8, "warmup_steps": 4, "sigma": 3.0})
  fast = getattr(og, wrapper)(og.adamw(1e-2), **kw)
  with jax.numpy_dtype_promotion("standard"):
    generic = getattr(og, wrapper)(optax.adamw(1e-2), **kw)
  rng = np.random.default_rng(1)
  stream = []
  for i in range(14):
    g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
         for k, v in params.items()}
    if i == 6:
      g["w"] = g["w"].at[0, 0].set(jnp.nan)
    if i == 9:
      g = jax.tree.map(lambda x: x * 100.0, g)
    stream.append(g)
  p1, s1 = params, fast.init(params)
  p2, s2 = params, generic.init(params)
  step1 = jax.jit(fast.update)
  skipped = []
  with jax.numpy_dtype_promotion("standard"):
    step2 = jax.jit(generic.update)
    for g in stream:
      u1, s1 = step1(g, s1, p1)
      skipped.append(bool(og.metrics(s1)["optim/skipped"]))
      u2, s2 = step2(g, s2, p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
      chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
      m1, m2 = og.metrics(s1), og.metrics(s2)
      assert m1.keys() == m2.keys()
      for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, err_msg=k)
  # The NaN step 6 is skipped by both; the x100 step 9 is a spike against
  # the 4-step warm-up (finite, so skip_nonfinite applies it).
  bad = (6,) if wrapper == "skip_nonfinite" else (6, 9)
  assert skipped == [i in bad for i in range(len(stream))]
  counter = "optim/num_skipped" if wrapper == "skip_nonfinite" else (
      "optim/num_spikes")
  assert int(og.metrics(s1)[counter]) == len(bad)


@pytest.mark.standard_promotion  # traces optax.sgd
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_momentum_takes_a_none_gradient_like_optax(nesterov):
  params = {"a": jnp.ones(3), "frozen": jnp.ones(2)}
  grads = {"a": jnp.array([1.0, 2.0, 3.0]), "frozen": None}
  for_ours = og.sgd(0.1, momentum=0.9, nesterov=nesterov)
  for_optax = optax.sgd(0.1, momentum=0.9, nesterov=nesterov)
  s1, s2 = for_ours.init(params), for_optax.init(params)
  for _ in range(3):
    u1, s1 = for_ours.update(grads, s1, params)
    u2, s2 = for_optax.update(grads, s2, params)
  assert u1["frozen"] is None and u2["frozen"] is None
  np.testing.assert_allclose(u1["a"], u2["a"], rtol=1e-6)
  np.testing.assert_array_equal(s1.trace["frozen"], np.zeros(2))  # kept
  np.testing.assert_allclose(s1.trace["a"], optax.tree.get(s2, "trace")["a"],
                             rtol=1e-6)


@pytest.mark.standard_promotion  # traces optax.adamw
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_keeps_a_none_gradient_and_its_moments(name):
  """A frozen parameter's None gradient (Equinox's `filter_grad`) stays
  None and keeps its moments; the other leaves step as optax's optimizer on
  the tree without the frozen leaf (optax's own adam fails on the None).
  The decay's mask still picks the leaves it would (the head's bias is not
  decayed) beside a None parameter and the frozen leaf, which come first."""
  rng = np.random.default_rng(0)
  params = {"act": None,  # a non-array field, filtered out (eqx.partition)
            "embed": {"w": jnp.ones((2, 2))},
            "head": {"bias": jnp.ones(3), "kernel": jnp.ones((2, 3))}}
  mask = {"mask": og.decay_mask} if name == "adamw" else {}
  ours = getattr(og, name)(0.1, **mask)
  theirs = getattr(optax, name)(0.1, **mask)
  live = {"head": params["head"]}
  s1, s2 = jax.jit(ours.init)(params), theirs.init(live)
  p1, p2 = params, live
  for _ in range(3):
    grads = jax.tree.map(
        lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), live)
    u1, s1 = jax.jit(ours.update)(
        {**grads, "act": None, "embed": {"w": None}}, s1, p1)
    u2, s2 = theirs.update(grads, s2, p2)
    assert u1["embed"]["w"] is None
    # As `eqx.apply_updates` (optax's does not take a None update).
    p1 = jax.tree.map(lambda p, u: p if u is None else p + u, p1, u1,
                      is_leaf=lambda u: u is None)
    p2 = optax.apply_updates(p2, u2)
  for k in ("bias", "kernel"):
    np.testing.assert_allclose(p1["head"][k], p2["head"][k], rtol=1e-6,
                               err_msg=k)
  np.testing.assert_array_equal(p1["embed"]["w"], params["embed"]["w"])
  for moment in (s1.mu, s1.nu):
    np.testing.assert_array_equal(moment["embed"]["w"], np.zeros((2, 2)))


@pytest.mark.standard_promotion  # traces optax.adamw
@pytest.mark.parametrize("nesterov", [False, True])
def test_an_overflowing_second_moment_gives_a_zero_update_not_nan(nesterov):
  """Unclipped, an element near float32's top overflows Adam's second moment
  (and NAdam's `g / (1 - b1)`): that element's update is 0, as plain Adam's
  m / Inf gives, and the others equal optax's, alone and in a guard."""
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([1e38, 1.0, -2.0], jnp.float32)}
  ref = optax.adamw(1e-3, weight_decay=0.0, nesterov=nesterov)
  want, _ = ref.update(grads, ref.init(params), params)
  ours = lambda: og.adamw(1e-3, weight_decay=0.0, nesterov=nesterov)
  for tx in (ours(), og.guard(ours(), max_norm=None, spike_sigma=None)):
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert float(u["w"][0]) == 0.0, u
    np.testing.assert_allclose(u["w"][1:], want["w"][1:], rtol=1e-6)
  assert not bool(og.metrics(state)["optim/skipped"])


def test_an_update_that_does_not_name_the_protocol_is_refused():
  """An optax optimizer's update takes `**extra_args`: wrapped as it is, a
  guard's decision would be dropped (neither clip nor skip, while the
  metrics said both)."""
  inner = optax.adam(0.1)
  with pytest.raises(ValueError, match=(
      r"`GuardAwareTransformation` needs an `update` that names the keyword "
      r"arguments `guard_keep` and `guard_scale` .* does not name guard_keep "
      r"or guard_scale: an update that takes them only through "
      r"`\*\*extra_args` \(as optax's do\) would drop the guard's decision, "
      r"which would then neither clip nor skip\. Name both, and pass them on "
      r"where your update forwards to another\.")):
    og.GuardAwareTransformation(inner.init, inner.update)

  def update_keep_only(updates, state, params=None, *, guard_keep=None,
                       **extra):
    return updates, state
  with pytest.raises(ValueError, match=r"does not name guard_scale:"):
    og.GuardAwareTransformation(inner.init, update_keep_only)
  # Named, positionally or by keyword only, through functools.partial too.
  def update(updates, state, params=None, guard_keep=None, guard_scale=None):
    return updates, state
  og.GuardAwareTransformation(inner.init, update)
  og.GuardAwareTransformation(inner.init, functools.partial(update,
                                                            params=None))
  # A decorator that copied another update's metadata: this one is read.
  og.GuardAwareTransformation(inner.init,
                              functools.wraps(inner.update)(update))
  # Decorators that pass everything on: what they wrap decides.
  for forwarding in (jax.named_call, jax.checkpoint,
                     lambda f: functools.partial(jax.named_call(f))):
    og.GuardAwareTransformation(inner.init, forwarding(update))
    with pytest.raises(ValueError, match=r"does not name guard_keep or "
                       r"guard_scale"):
      og.GuardAwareTransformation(inner.init, forwarding(inner.update))
  def cycle(*args, **kwargs):  # a __wrapped__ that leads back to itself
    return args
  cycle.__wrapped__ = cycle
  with pytest.raises(ValueError, match=r"does not name guard_keep or "
                     r"guard_scale"):
    og.GuardAwareTransformation(inner.init, cycle)
  # NamedTuple's `_replace` and `_make` (a common way to wrap an update)
  # built the tuple without the check.
  tx = og.sgd(0.1)
  for made in (lambda: tx._replace(update=inner.update),
               lambda: og.GuardAwareTransformation._make((tx.init,
                                                          inner.update))):
    with pytest.raises(ValueError, match=r"does not name guard_keep or "
                       r"guard_scale"):
      made()
  kept = tx._replace(update=update)
  assert type(kept) is og.GuardAwareTransformation and kept.init is tx.init


@pytest.mark.standard_promotion  # runs optax's
@pytest.mark.parametrize("make", [
    lambda m, lr: m.adamw(lr, weight_decay=1e-2),
    lambda m, lr: m.sgd(lr, momentum=0.9, nesterov=True)],
                         ids=["adamw", "sgd"])
def test_eager_steps_with_a_new_python_rate_compile_nothing_new(make):
  """Run without jit, with the optimizer rebuilt each step at a new Python
  float rate (a rate decayed by hand): the per-leaf arithmetic, jitted for
  its trace-once-per-signature, compiled again for every new rate (400
  compiles in 200 steps); optax's, run op by op, compiles nothing new. The
  numbers stay optax's."""
  params = {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}
  grads = jax.tree.map(lambda p: 0.01 * p, params)
  compiles = []

  def listener(event, duration, **kwargs):
    if "backend_compile" in event:
      compiles.append(event)

  ours = (params, make(og, 0.1).init(params))
  theirs = (params, make(optax, 0.1).init(params))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for t in range(6):
      if t == 2:
        compiles.clear()  # the first steps compile the operations once
      lr = 0.1 * 0.9**t
      for run, module in ((0, og), (1, optax)):
        p, s = (ours, theirs)[run]
        u, s = make(module, lr).update(grads, s, p)
        if run == 0:
          ours = (optax.apply_updates(p, u), s)
        else:
          theirs = (optax.apply_updates(p, u), s)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ours[0], theirs[0])


def test_a_state_of_another_mu_dtype_is_refused():
  """A state restored by flax (which checks no dtypes) or kept after the
  optimizer was rebuilt with another `mu_dtype` kept its own: bfloat16
  moments under `mu_dtype=None`, where `init` gives float32."""
  params = {"w": jnp.ones(4)}
  old = og.adamw(1e-3, mu_dtype=jnp.bfloat16).init(params)
  with pytest.raises(ValueError, match=re.escape(
      "The state's first moments are bfloat16, but this `adamw` keeps them "
      "in float32 (mu_dtype=None); the state was made by a transformation "
      "built otherwise")):
    og.adamw(1e-3).update(params, old, params)
  with pytest.raises(ValueError, match=re.escape(
      "The state's first moments are float32, but this `adam` keeps them in "
      "bfloat16 (mu_dtype=bfloat16)")):
    og.adam(1e-3, mu_dtype=jnp.bfloat16).update(
        params, og.adam(1e-3).init(params))


def test_a_state_of_another_sgd_configuration_is_refused():
  """The trace of another `accumulator_dtype` was taken and kept (optax's
  casts it), and a trace where this `sgd` has no momentum, or none where it
  has, was taken or failed somewhere inside. Parameters cast after `init`
  keep their trace, as in optax."""
  params = {"w": jnp.ones(4)}
  bf16 = og.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.bfloat16)
  f32 = og.sgd(0.1, momentum=0.9)
  message = re.escape(
      "The state's momentum trace is float32, but this `sgd` keeps it in "
      "bfloat16 (accumulator_dtype=bfloat16); the state was made by a "
      "transformation built otherwise")
  with pytest.raises(ValueError, match=message):
    og.guard(bf16).update(params, og.guard(bf16).init(params)._replace(
        inner_state=f32.init(params)), params)
  with pytest.raises(ValueError, match=message):
    bf16.update(params, f32.init(params))  # (no params needed)
  cast = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  _, state = f32.update(cast, f32.init(params), cast)
  assert state.trace["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match=re.escape(
      "The state has a momentum trace, but this `sgd` has momentum=None; "
      "the state was made")):
    og.sgd(0.1).update(params, f32.init(params))
  with pytest.raises(ValueError, match=re.escape(
      "The state has no momentum trace, but this `sgd` has momentum=0.9;")):
    f32.update(params, og.sgd(0.1).init(params))


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
def test_a_float64_mu_dtype_without_x64_is_no_mismatch():
  """float64 without x64 is float32 in `init` too (as in optax)."""
  params = {"w": jnp.ones(4)}
  ours, theirs = og.adam(1e-3, mu_dtype=jnp.float64), optax.adam(
      1e-3, mu_dtype=jnp.float64)
  got, _ = ours.update(params, ours.init(params))
  want, _ = theirs.update(params, theirs.init(params))
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


def test_a_numpy_float_hyperparameter_is_the_python_float_it_equals():
  """A NumPy float64 stays a static number in the update's dtype, as a
  Python float does (its documented behaviour). As a jit key it equalled
  that float and shared its compiled leaf, so the dtype of an update hung
  on which had run first (and under strict promotion it failed)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=F32).astype(BF16)}
  grads = {"w": jnp.full((6,), 0.5, BF16)}
  runs = []
  for make in (lambda: og.adam(np.float64(1.3e-2), eps=np.float64(1e-6)),
               lambda: og.adam(1.3e-2, eps=1e-6),
               lambda: og.sgd(np.float64(0.1), momentum=np.float64(0.9))):
    tx = make()
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert updates["w"].dtype == BF16
    runs.append(np.asarray(updates["w"], np.float32))
  np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("make,name", [
    (lambda d: og.adam(0.1, mu_dtype=d), "mu_dtype"),
    (lambda d: og.adamw(0.1, mu_dtype=d), "mu_dtype"),
    (lambda d: og.sgd(0.1, momentum=0.9, accumulator_dtype=d),
     "accumulator_dtype")])
def test_a_real_moment_dtype_for_complex_parameters_is_refused(make, name):
  """A real moment of a complex parameter dropped its imaginary part at
  every step, silently (optax's does too); a complex dtype keeps it and
  matches the moment of `None`."""
  params = {"b": jnp.ones(2), "z": jnp.array([1 + 2j, -1j], jnp.complex64)}
  with pytest.raises(ValueError, match=re.escape(
      f"`{name}`=float32 is real, but the parameter 'z' is complex64: its "
      "moment would lose its imaginary part at every step. Pass a complex "
      f"dtype ({name}=jnp.complex64) or leave {name}=None.")):
    make(jnp.float32).init(params)
  grads = {"b": jnp.full(2, 0.5), "z": jnp.array([0.3 - 0.4j, 2j],
                                                  jnp.complex64)}
  runs = []
  for tx in (make(jnp.complex64), make(None)):
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
    runs.append(updates["z"])
  np.testing.assert_array_equal(*runs)

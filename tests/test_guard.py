"""`guard` against the chain of its pieces, and its functional guarantees."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _skip

STEPS = 40


def _params():
  return {"Dense_0": {"kernel": jnp.full((4, 8), 0.1, jnp.float32),
                      "bias": jnp.zeros((8,), jnp.float32)},
          "head": {"kernel": jnp.full((8, 2), 0.1, jnp.float32)}}


def _grad_stream():
  """Gradients with planted NaN, Inf, spike and overflow steps."""
  rng = np.random.default_rng(0)
  params = _params()
  stream = []
  for i in range(STEPS):
    scale = float(np.exp(rng.normal(0.0, 0.2)))
    if i in (6, 20, 21, 33):
      scale *= 50.0  # spikes; step 6 comes after 5 accepted steps
    g = jax.tree.map(lambda p: jnp.asarray(
        rng.normal(size=p.shape) * scale, jnp.float32), params)
    if i == 12:
      g["head"]["kernel"] = g["head"]["kernel"].at[0, 0].set(jnp.nan)
    if i == 25:
      g["Dense_0"]["bias"] = g["Dense_0"]["bias"].at[3].set(-jnp.inf)
    stream.append((g, jnp.float32(1.0 + 0.01 * i)))
  return stream


def _pieces(inner, zscore=False, loss_ema_decay=0.9, **kw):
  return optax.chain(
      og.monitor(zscore=zscore, loss_ema_decay=loss_ema_decay),
      og.skip_nonfinite(
          og.skip_spikes(optax.chain(og.clip_by_global_norm(kw["max_norm"]),
                                     inner),
                         sigma=kw["spike_sigma"], window=kw["spike_window"],
                         warmup_steps=kw["spike_warmup_steps"]),
          max_consecutive=kw["max_consecutive"]))


# A warm-up other than the default `spike_window // 2` (8), so that step 6's
# spike is tested only where `spike_warmup_steps` reaches the spike test.
KW = dict(max_norm=2.0, spike_sigma=3.0, spike_window=16,
          spike_warmup_steps=5, max_consecutive=5)


def _run(tx, with_loss):
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(p, s, g, loss):
    extra = {"loss": loss} if with_loss else {}
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s

  trace = []
  for g, loss in _grad_stream():
    params, state = step(params, state, g, loss)
    trace.append((params, state))
  return trace


@pytest.mark.standard_promotion  # traces optax.adam
@pytest.mark.parametrize("with_loss", [False, True])
def test_guard_equals_the_chain_of_its_pieces(with_loss):
  # With the loss, also the per-layer z-scores (they do not use the loss)
  # and a loss EMA decay of its own.
  zscore, decay = with_loss, (0.5 if with_loss else 0.9)
  ours = _run(og.guard(optax.adam(1e-2), zscore=zscore,
                       loss_ema_decay=decay, **KW), with_loss)
  pieces = _run(_pieces(optax.adam(1e-2), zscore=zscore,
                        loss_ema_decay=decay, **KW), with_loss)
  skipped_nan = skipped_spike = 0
  for i, ((p1, s1), (p2, s2)) in enumerate(zip(ours, pieces)):
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
    inner_pieces = s2[1].inner_state.inner_state  # chain(clip, adam)
    chex.assert_trees_all_close(s1.inner_state, inner_pieces[1], rtol=1e-6,
                                atol=1e-7)
    m1, m2 = og.metrics(s1), og.metrics(s2)
    # Same decisions and statistics, under the guard's single set of names.
    for name, piece_name in [
        ("grad/norm", "grad/norm"), ("optim/num_skipped", "optim/num_skipped"),
        ("optim/num_spikes", "optim/num_spikes"),
        ("optim/num_clipped", "optim/num_clipped"),
        ("optim/halted", "optim/halted"),
        ("grad/spike_threshold", "grad/spike_threshold"),
        ("grad/norm/head/kernel", "grad/norm/head/kernel"),
        ("loss/ema", "loss/ema"), ("loss/value", "loss/value")] + [
            (name, name) for name in m2 if "zscore" in name or
            name == "grad/spike_layer"]:
      np.testing.assert_allclose(m1[name], m2[piece_name], rtol=1e-6,
                                 err_msg=f"{name} at step {i}")
    skipped_nan = int(m1["optim/num_skipped"])
    skipped_spike = int(m1["optim/num_spikes"])
  assert ("grad/spike_layer" in m1) == zscore
  assert skipped_nan == 2  # steps 12 and 25
  assert skipped_spike == 4  # steps 6, 20, 21 and 33
  # The guard names the training step of the last spike; in the chain,
  # `skip_nonfinite` hides its two NaN/Inf steps from `skip_spikes`.
  assert int(m1["optim/last_spike_step"]) == 33
  assert int(m2["optim/last_spike_step"]) == 33 - 2


@pytest.mark.parametrize("inner", [og.sgd(0.1), optax.sgd(0.1)],
                         ids=["fast", "generic"])
def test_check_names_the_training_step_of_a_spike_after_nan_steps(inner):
  tx = og.guard(inner, zscore=True, zscore_decay=0.5, spike_sigma=3.0,
                spike_window=8, spike_warmup_steps=4)
  params = {"a": jnp.zeros((4,), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
  state, step = tx.init(params), jax.jit(tx.update)
  rng = np.random.default_rng(3)
  for i in range(12):
    g = {n: jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32) for n in "ab"}
    if i in (3, 5):
      g["a"] = g["a"].at[0].set(jnp.nan)
    if i == 11:
      g["b"] = g["b"] * 1000.0
    _, state = step(g, state, params)
  with pytest.raises(og.GradientExplosionError) as error:
    og.check(state)
  assert error.value.step == 11
  assert str(error.value).startswith("Step 11: the gradient norm ")
  assert "moved most against its own history: b (z-score" in str(error.value)


@pytest.mark.parametrize("inner", [og.sgd(0.1), optax.sgd(0.1)],
                         ids=["fast", "generic"])
def test_a_lasting_jump_is_learned_after_spike_max_consecutive(inner):
  """A lasting 3x jump of the norm: 5 spikes in a row clear the history,
  the next 4 steps warm it up again on the new scale, and training goes on,
  as in the chain of the pieces with `skip_spikes(max_consecutive=5)`."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.zeros((16,), jnp.float32)}
  norms = np.exp(rng.normal(0.0, 0.05, 40)) * np.where(np.arange(40) < 20,
                                                       1.0, 3.0)
  kw = dict(spike_window=8, spike_warmup_steps=4)
  guarded = og.guard(inner, max_norm=None, spike_max_consecutive=5, **kw)
  pieces = optax.chain(og.monitor(), og.skip_nonfinite(og.skip_spikes(
      inner, window=8, warmup_steps=4, max_consecutive=5)))
  states = [tx.init(params) for tx in (guarded, pieces)]
  steps = [jax.jit(tx.update) for tx in (guarded, pieces)]
  skipped = []
  for n in norms:
    g = {"w": jnp.full((16,), n / 4.0, jnp.float32)}  # global norm n
    outs = [step(g, s, params) for step, s in zip(steps, states)]
    states = [s for _, s in outs]
    ours, theirs = (og.metrics(s) for s in states)
    for name in ("optim/num_spikes", "optim/consecutive_spikes",
                 "grad/spike_threshold"):
      np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6)
    chex.assert_trees_all_close(outs[0][0], outs[1][0])
    skipped.append(bool(ours["optim/skipped"]))
  # Worked out by hand: the warm-up takes steps 0..3, ~1 passes until 19;
  # 20..24 are 3x spikes, the 5th clears the history; 25..28 warm up again
  # and from 29 the threshold sits on the new scale.
  assert skipped == [False] * 20 + [True] * 5 + [False] * 15
  assert int(ours["optim/num_spikes"]) == 5


@pytest.mark.standard_promotion
def test_skipped_step_keeps_inner_state_bit_identical():
  tx = og.guard(optax.adam(1e-2), spike_sigma=None)
  params = _params()
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  _, state = update(g, state, params)
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g)
  updates, new_state = update(bad, state, params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  assert int(og.metrics(new_state)["optim/num_skipped"]) == 1
  assert bool(og.metrics(new_state)["optim/skipped"])


def test_no_host_callback_no_retrace_no_parameter_sized_state():
  tx = og.guard(optax.sgd(0.1, momentum=0.9), histogram=True)
  params = {"big": jnp.zeros((256, 512), jnp.float32),
            "small": jnp.zeros((7,), jnp.float32)}
  state = tx.init(params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  g = jax.tree.map(jnp.ones_like, params)
  for i in range(10):
    params, state = step(params, state, jax.tree.map(lambda x: x * i, g))
  def plain_step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(plain_step).lower(params, state, g).compile().as_text()
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
  assert not [t for t in targets if "callback" in t.lower()], targets
  # Only the wrapped SGD's momentum may be parameter-sized.
  guard_only = state._replace(inner_state=())
  biggest = max(x.size for x in jax.tree.leaves(guard_only))
  assert biggest < 256 * 512 // 16, biggest


def test_metric_names_of_the_guard():
  tx = og.guard(optax.sgd(0.1))
  params = _params()
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params),
                       params)
  names = set(og.metrics(state))
  for name in ["grad/norm", "grad/norm_clipped", "grad/norm/head/kernel",
               "optim/skipped", "optim/num_skipped", "optim/num_spikes",
               "optim/num_clipped", "optim/halted", "param/norm"]:
    assert name in names, name
  assert not any(n.endswith(".1") for n in names)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_norm": -1.0}, r"`max_norm` must be a finite real number > 0, "
     r"but got -1\.0\."),
    ({"spike_sigma": 0.0}, r"`spike_sigma` must be a finite real number > 0, "
     r"but got 0\.0\."),
    ({"max_consecutive": 0}, r"`max_consecutive` must be an integer >= 1 or "
     r"None, but got 0\."),
    # The guard's own names, not skip_spikes' (`window`, `warmup_steps`).
    ({"spike_window": 1}, r"^`spike_window` must be an integer >= 2, but got "
     r"1\.$"),
    ({"spike_warmup_steps": 1}, r"^`spike_warmup_steps` must be an integer "
     r">= 2 or None, but got 1\.$"),
    ({"spike_window": 4, "spike_warmup_steps": 5}, r"^`spike_warmup_steps` "
     r"must be at most `spike_window` \(4\), but got 5\.$"),
    ({"zscore_decay": 1.5}, r"^`zscore_decay` must be a finite real number "
     r"> 0 and < 1, but got 1\.5\.$"),
    ({"spike_max_consecutive": 0}, r"^`spike_max_consecutive` must be an "
     r"integer >= 1 or None, but got 0\.$"),
    # Checked also when the part they belong to is switched off.
    ({"spike_sigma": None, "spike_window": 1}, r"^`spike_window` must be an "
     r"integer >= 2, but got 1\.$"),
    ({"skip_nonfinite": False, "max_consecutive": 0}, r"^`max_consecutive` "
     r"must be an integer >= 1 or None, but got 0\.$"),
    ({"monitor": False, "zscore_decay": 1.5}, r"^`zscore_decay` must be a "
     r"finite real number > 0 and < 1, but got 1\.5\.$"),
    ({"monitor": False, "loss_ema_decay": 1.5}, r"^`loss_ema_decay` must be "
     r"a finite real number >= 0 and < 1, but got 1\.5\.$"),
    ({"monitor": False, "zscore": True}, r"^`zscore=True` asks the monitor "
     r"for a signal, but `monitor=False` switches the monitor off; drop one "
     r"of the two\.$"),
    ({"monitor": False, "histogram": True}, r"^`histogram=True` asks the "
     r"monitor for a signal"),
    ({"skip_nonfinite": False, "max_consecutive": 3}, r"^`max_consecutive=3` "
     r"sets how the non-finite skip halts, but `skip_nonfinite=False` "
     r"switches it off; drop one of the two\.$"),
    ({"skip_nonfinite": False, "resume_after_halt": True},
     r"^`resume_after_halt=True` sets how the non-finite skip halts"),
    # A no-op: nothing halts.
    ({"resume_after_halt": True}, r"^`resume_after_halt=True` sets how a "
     r"halt ends, but `max_consecutive=None` never halts; set "
     r"`max_consecutive` \(the bad steps in a row that halt training\) or "
     r"drop `resume_after_halt`\.$"),
    # Taken by its truth, "False" kept the skip on.
    ({"skip_nonfinite": "False"}, r"^`skip_nonfinite` must be True or False, "
     r"but got 'False'\.$"),
    ({"per_layer": None}, r"^`per_layer` must be True or False, but got "
     r"None\.$"),
    ({"max_consecutive": 2**31}, r"^`max_consecutive` must be an integer >= "
     r"1 or None, but got 2147483648\. It is compared with int32 counters, "
     r"so it must be at most 2147483647 \(2\*\*31 - 1\)\.$"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    og.guard(optax.sgd(0.1), **kwargs)


def test_halting_arguments_left_at_false_values_are_fine_without_the_skip():
  for value in (False, np.bool_(False), 0):
    og.guard(optax.sgd(0.1), skip_nonfinite=False, resume_after_halt=value)


def test_inject_hyperparams_with_spikes_off():
  """`optax.inject_hyperparams` makes arrays of every int argument, the
  unused `spike_window` default too: with spikes off that is fine."""
  tx = optax.inject_hyperparams(og.guard, static_args=("inner",))(
      inner=optax.sgd(0.1), spike_sigma=None, max_norm=1.0)
  params = {"w": jnp.zeros((2,), jnp.float32)}
  u, state = jax.jit(tx.update)({"w": jnp.full((2,), 3.0)}, tx.init(params),
                                params)
  np.testing.assert_allclose(u["w"], -0.1 * np.full(2, 3.0) / np.sqrt(18.0),
                             rtol=1e-6)  # clipped to norm 1, times -0.1
  assert int(og.metrics(state)["optim/num_clipped"]) == 1


def test_inner_must_be_a_transformation():
  with pytest.raises(ValueError, match=r"`inner` must be an optax "
                     r"GradientTransformation \(with `init` and `update`\), "
                     r"but got 'adam'\."):
    og.guard("adam")


@pytest.mark.standard_promotion
@pytest.mark.parametrize("make", [
    lambda: og.guard(optax.adamw(1e-2)),
    lambda: og.skip_nonfinite(optax.adam(1e-2)),
    lambda: og.skip_spikes(optax.adam(1e-2)),
    lambda: og.guard(optax.adamw(1e-2), skip_nonfinite=False),
], ids=["guard(optax.adamw)", "skip_nonfinite(optax.adam)",
        "skip_spikes(optax.adam)", "guard(optax.adamw,skip_nonfinite=False)"])
@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_generic_path_keeps_state_buffers_in_place(make, large, monkeypatch):
  # An opaque optimizer's state is kept exact on a skip by a select, and its
  # update is read back (for NaN/Inf, or, for a spike, to order the select).
  # Done naively, XLA keeps the new moments alive beside the old ones until
  # the check is done, or copies the old ones (4.5x the parameters' bytes in
  # temporaries here); the generic path keeps the update (and, for the
  # counts of a bad step, the room to compute it again), and copies no state
  # buffer. `large`: as for an update above
  # `_skip.RECOUNT_ABOVE` elements; a small one may keep a second temporary
  # (the update is then counted from itself, which compiles faster).
  if large:
    monkeypatch.setattr(_skip, "RECOUNT_ABOVE", -1)
  params = {"a": jnp.zeros((512, 1024), jnp.float32),
            "b": jnp.zeros((1024, 512), jnp.float32),
            "c": jnp.zeros((7,), jnp.float32)}
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  tx = make()

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile()
  big = ("f32[512,1024]", "f32[1024,512]")
  copies = [line.strip() for line in compiled.as_text().splitlines()
            if re.search(r"\bcopy\(", line) and
            any(s in line.split("copy(")[0] for s in big)]
  assert not copies, "\n".join(copies)
  if large:
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 3 * param_bytes, (temp, param_bytes)


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32
@pytest.mark.parametrize("skip_fn", ["optax", "og"])
def test_inside_multisteps_a_nan_micro_batch_is_dropped_and_reported(skip_fn):
  params = {"w": jnp.ones((3,), jnp.float32)}
  tx = optax.MultiSteps(og.guard(og.sgd(0.1), spike_sigma=None),
                        every_k_schedule=2,
                        should_skip_update_fn=optax.skip_not_finite
                        if skip_fn == "optax" else
                        og.skip_nonfinite_microbatch())
  state, step = tx.init(params), jax.jit(tx.update)
  log = og.MetricsLog()
  for i in range(10):
    g = {"w": jnp.full((3,), 0.5, jnp.float32)}
    if i == 2:
      g = {"w": jnp.array([jnp.nan, 0.5, 0.5], jnp.float32)}
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    log.record(state)
    if i == 2:  # the third call: the first micro-batch of step 1
      with pytest.raises(og.NonFiniteGradientError, match=re.escape(
          "Step 1, micro-batch 0: optax.MultiSteps dropped the micro-batch, "
          "whose gradients hold 1 NaN/Inf element; the step accumulates "
          "the other micro-batches.")):
        og.check(state)
    else:
      og.check(state)
  # 9 finite micro-batches: 4 emitted steps of -0.1 * 0.5 (clip inactive).
  np.testing.assert_allclose(params["w"], 1.0 - 4 * 0.05, rtol=1e-6)
  m = log.to_numpy()
  assert int(m["optim/num_skipped"][-1]) == 0  # the guard never saw it
  np.testing.assert_array_equal(m["optim/microbatch_skipped"],
                                np.arange(10) == 2)
  np.testing.assert_array_equal(m["grad/microbatch_nonfinite"],
                                (np.arange(10) == 2).astype(np.int32))
  # Which calls completed a step: every second kept micro-batch.
  completed, kept = [], 0
  for i in range(10):
    kept += i != 2
    completed.append(i != 2 and kept % 2 == 0)
  np.testing.assert_array_equal(m["optim/step_completed"], completed)


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32
def test_inside_multisteps_check_reads_the_guard_on_completed_steps_only():
  """Between completed steps the guard's state is the last step's: og.check
  reports its problem once, on the call that completed that step; without a
  `should_skip_update_fn` it says why every later step is skipped."""
  params = {"w": jnp.ones((3,), jnp.float32)}
  tx = optax.MultiSteps(og.guard(og.sgd(0.1), spike_sigma=None),
                        every_k_schedule=3)
  assert not any("microbatch" in k for k in og.metrics(tx.init(params)))
  state, step = tx.init(params), jax.jit(tx.update)
  raised = []
  for i in range(9):
    g = {"w": jnp.full((3,), 0.5, jnp.float32)}
    if i == 4:  # the second micro-batch of step 1
      g = {"w": jnp.array([0.5, jnp.nan, 0.5], jnp.float32)}
    _, state = step(g, state, params)
    try:
      og.check(state)
    except og.NonFiniteGradientError as e:
      raised.append((i, str(e)))
  # Steps 1 and 2 complete at calls 5 and 8; the NaN stays in optax's
  # accumulator (reset by multiplying by 0), so both are skipped.
  hint = ("Inside optax.MultiSteps, a NaN/Inf micro-batch that its "
          "`should_skip_update_fn` does not drop stays in its accumulator, "
          "and every later step is skipped: give it "
          "should_skip_update_fn=og.skip_nonfinite_microbatch() (with the "
          "guard's axis_name where the gradients are sharded).")
  assert raised == [
      (5, "Step 1: non-finite gradients; first bad layers: w (1 NaN/Inf). "
          "The guard skipped the step (1 bad in a row, 1 skipped in total). "
          + hint),
      (8, "Step 2: non-finite gradients; first bad layers: w (1 NaN/Inf). "
          "The guard skipped the step (2 bad in a row, 2 skipped in total). "
          + hint)]
  # A NaN loss with finite gradients leaves the accumulator finite (the next
  # step is applied): no such hint.
  state = tx.init(params)
  g = {"w": jnp.full((3,), 0.5, jnp.float32)}
  for loss in (1.0, 1.0, np.nan):
    _, state = step(g, state, params, loss=jnp.float32(loss))
  with pytest.raises(og.NonFiniteGradientError, match=(
      r"^Step 0: non-finite loss\. The guard skipped the step \(1 bad in a "
      r"row, 1 skipped in total\)\.$")):
    og.check(state)
  for _ in range(3):
    updates, state = step(g, state, params, loss=jnp.float32(1.0))
  assert not bool(og.metrics(state)["optim/skipped"])
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5)
  for inner in (og.skip_spikes(og.sgd(0.1)),
                og.guard(og.sgd(0.1), skip_nonfinite=False)):
    tx = optax.MultiSteps(inner, every_k_schedule=1)
    _, state = tx.update(g, tx.init(params), params,
                         loss=jnp.float32(np.nan))
    with pytest.raises(og.NonFiniteGradientError) as error:
      og.check(state)
    assert str(error.value).startswith("Step 0: the loss is nan.")
    assert "accumulator" not in str(error.value)


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32
def test_multisteps_is_read_only_around_an_optax_guard_part():
  """A MultiSteps with nothing of ours inside is optax's alone: og.check
  warns and MetricsLog refuses it, as for any plain optax state; around a
  guard *outside* it, og.check says nothing about its accumulator."""
  params = {"w": jnp.ones((3,), jnp.float32)}
  plain = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
  state = plain.init(params)
  assert og.metrics(state) == {}
  with pytest.warns(UserWarning, match="og.check found no optax_guard state"):
    og.check(state)
  with pytest.raises(ValueError, match="found no optax_guard statistics"):
    og.MetricsLog().record(state)
  outside = og.guard(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
                     .gradient_transformation(), spike_sigma=None)
  _, state = jax.jit(outside.update)(
      {"w": jnp.array([jnp.nan, 0.5, 0.5], jnp.float32)},
      outside.init(params), params)
  with pytest.raises(og.NonFiniteGradientError) as e:
    og.check(state)
  assert str(e.value) == (
      "Step 0: non-finite gradients; first bad layers: w (1 NaN/Inf). The "
      "guard skipped the step (1 bad in a row, 1 skipped in total).")


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32
def test_a_spike_below_multisteps_is_numbered_by_its_own_steps():
  """skip_nonfinite(MultiSteps(skip_spikes(...))): the outer wrapper counts
  micro-batches, the spike test completed steps; og.check numbers the spike
  as `optim/last_spike_step` does, not by the micro-batches."""
  params = {"w": jnp.ones((3,), jnp.float32)}
  inner = optax.MultiSteps(
      og.skip_spikes(optax.sgd(0.1), sigma=3.0, window=8, warmup_steps=4),
      every_k_schedule=2).gradient_transformation()
  tx = og.skip_nonfinite(inner)
  state, step = tx.init(params), jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for i in range(32):
    scale = 1000.0 if i == 31 else 1.0  # the second micro-batch of step 15
    _, state = step({"w": jnp.asarray(rng.normal(size=3) * scale,
                                      jnp.float32)}, state, params)
  assert int(og.metrics(state)["optim/last_spike_step"]) == 15
  with pytest.raises(og.GradientExplosionError) as e:
    og.check(state)
  assert e.value.step == 15 and str(e.value).startswith("Step 15: ")


def test_check_when_the_spike_test_skipped_a_nan_step():
  """Without `skip_nonfinite`, the spike test skips a NaN step: og.check
  says the guard skipped it, naming the layers (not "nothing skips it")."""
  tx = og.guard(og.sgd(0.1), skip_nonfinite=False)
  params = {"a": jnp.zeros((2,), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  grads = {"a": jnp.asarray([np.nan, 1.0], jnp.float32),
           "b": jnp.ones((2,), jnp.float32)}
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["a"], 0.0)
  with pytest.raises(og.NonFiniteGradientError, match=(
      r"^Step 0: the gradients hold 1 NaN/Inf element; first bad layers: "
      r"a \(1 NaN/Inf\)\. The guard skipped the step \(its spike test "
      r"skips a NaN/Inf norm; 1 skipped in total\)\.$")):
    og.check(state)


@pytest.mark.parametrize("bad", ["grads", "loss"])
def test_check_says_a_guard_without_skips_applied_the_step(bad):
  """A guard built not to skip applied the NaN step: og.check says so and
  what to pass, not that a guard is missing."""
  tx = og.guard(og.sgd(0.1), skip_nonfinite=False, spike_sigma=None)
  params = {"a": jnp.zeros((2,), jnp.float32),
            "b": jnp.zeros((2,), jnp.float32)}
  grads = {"a": jnp.asarray([np.nan if bad == "grads" else 1.0, 1.0],
                            jnp.float32), "b": jnp.ones((2,), jnp.float32)}
  loss = jnp.float32(np.nan if bad == "loss" else 1.0)
  step = jax.jit(lambda g, s, p, l: tx.update(g, s, p, loss=l))
  updates, state = step(grads, tx.init(params), params, loss)
  assert np.isnan(updates["a"][0]) == (bad == "grads")  # applied
  what = (r"the gradients hold 1 NaN/Inf element; first bad layers: "
          r"a \(1 NaN/Inf\)" if bad == "grads" else "the loss is nan")
  with pytest.raises(og.NonFiniteGradientError, match=(
      rf"^Step 0: {what}\. The guard applied the step: it was built with "
      r"`skip_nonfinite=False` and `spike_sigma=None`; pass "
      r"`skip_nonfinite=True` to skip such steps\.$")):
    og.check(state)


@pytest.mark.parametrize("kwargs", [{"monitor": False}, {"per_layer": False}])
def test_updates_with_other_layers_are_refused_without_the_monitor(kwargs):
  """The NaN counts of a renamed layer would be filed under the old name."""
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  renamed = {"a": jnp.ones(3), "c": jnp.full(2, jnp.nan)}
  tx = og.guard(optax.sgd(0.1), **kwargs)
  with pytest.raises(ValueError, match=re.escape(
      "`guard` was initialised with 2 parameter layers but got updates with "
      "other layers; the trees must match. Only in the parameters: ['b']; "
      "only in the updates: ['c'].")):
    tx.update(renamed, tx.init(params))
  tx = og.guard(optax.sgd(0.1), stacked=("s",), **kwargs)
  with pytest.raises(ValueError, match=re.escape(
      "`guard` was initialised with 2 parameter layers but got updates with "
      "3; the trees must match. Only in the parameters: none; only in the "
      "updates: ['s/2'].")):
    tx.update({"s": jnp.ones((3, 3))}, tx.init({"s": jnp.ones((2, 3))}))


def test_a_none_gradient_is_refused_with_the_ways_to_freeze_a_leaf():
  """Equinox's `filter_grad` gives None for a frozen leaf; the guard
  measures every layer it was initialised with, and says what to do."""
  params = {"embed": jnp.ones(2), "head": jnp.ones(3)}
  grads = {"embed": None, "head": jnp.ones(3)}
  tx = og.guard(og.adamw(0.1))
  with pytest.raises(ValueError, match=re.escape(
      "Only in the parameters: ['embed']; only in the updates: none. A None "
      "update (a frozen leaf, as Equinox's `filter_grad` gives) has no layer "
      "here: pass zeros for it, or keep it from this transformation with "
      "`optax.masked` (or freeze it with `optax.multi_transform` and "
      "`optax.set_to_zero`).")):
    tx.update(grads, tx.init(params), params)
  # The first way: the guard sees the head alone, as a guard of it would.
  masked = optax.masked(tx, {"embed": False, "head": True})
  updates, state = jax.jit(masked.update)(grads, masked.init(params), params)
  alone = og.guard(og.adamw(0.1))
  want, _ = alone.update({"head": grads["head"]},
                         alone.init({"head": params["head"]}),
                         {"head": params["head"]})
  assert updates["embed"] is None
  np.testing.assert_array_equal(updates["head"], want["head"])
  assert og.metrics(state)["grad/norm"] == pytest.approx(np.sqrt(3.0))


def test_a_guard_inside_a_guard_is_refused():
  params = {"w": jnp.ones(3)}
  for inner in (og.guard(og.adamw(0.1)),
                optax.chain(og.guard(optax.sgd(0.1)), optax.scale(1.0))):
    with pytest.raises(ValueError, match=(
        r"^`guard` got an optimizer that already holds a guard: use one "
        r"guard, around the optimizer itself \(the inner one would see only "
        r"the outer one's clipped gradients, and every metric would come "
        r"twice\)\.$")):
      og.guard(inner).init(params)


@pytest.mark.parametrize("factory", [
    lambda: og.guard(optax.sgd(0.1)), lambda: og.monitor(),
    lambda: og.skip_nonfinite(optax.sgd(0.1)),
    lambda: og.skip_spikes(optax.sgd(0.1))])
def test_a_loss_that_is_not_one_number_is_refused(factory):
  """A per-token loss would be averaged without its mask, and a
  (loss, aux) pair is not a loss: both are named."""
  tx = factory()
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for loss, what in [
      (jnp.ones((2, 3)), r"an array of shape \(2, 3\)"),
      # (eagerly, as in a jitted step, the update sees tracers)
      ((jnp.float32(1.0), {"acc": 1.0}),
       r"a tuple \(\((Array\(1\., |JitTracer\(float32\[\]\), )"),
      ("1.0", r"a str \('1\.0'\)")]:
    with pytest.raises(ValueError, match=(
        rf"^`loss=` must be this batch's loss, one real number, but got "
        rf"{what}.*: reduce a per-example or per-token loss as your "
        r"objective does \(a masked mean, say\) and pass that; with "
        r"`jax.value_and_grad\(\.\.\., has_aux=True\)`, pass the loss, not "
        r"the \(loss, aux\) pair\.(\n|$)")):
      tx.update(params, state, params, loss=loss)
  for loss in (2.0, 3, np.float64(1.5), jnp.bfloat16(0.5),  # numbers pass
               jnp.ones((1,)), jnp.ones((1, 1))):
    tx.update(params, state, params, loss=loss)


@pytest.mark.standard_promotion  # optax.adam
def test_check_reports_a_nan_applied_where_no_guard_looked():
  """A guard on one part of the model says nothing of a NaN in another
  part, which is applied: the monitor ahead of the chain reports it."""
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  grads = {"a": jnp.ones(2), "b": jnp.array([jnp.nan, 1.0, 1.0])}
  for inner in (
      optax.multi_transform({"g": og.guard(og.adamw(0.1)),
                             "p": optax.adam(0.1)}, {"a": "g", "b": "p"}),
      optax.masked(og.guard(og.adamw(0.1)), {"a": True, "b": False})):
    tx = optax.chain(og.monitor(), inner)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.isnan(updates["b"][0])                    # applied
    assert not og.metrics(state)["optim/skipped"]       # the guard saw a
    with pytest.raises(og.NonFiniteGradientError, match=(
        r"^Step 0: the gradients hold 1 NaN/Inf element; first bad layers: "
        r"b \(1 NaN/Inf\)\. Nothing in this chain skips such a step")) as e:
      og.check(state)
    assert e.value.layers == {"b": 1}
    # A NaN in both parts: the guard skipped its part, the other part's NaN
    # was applied, and that is what is reported.
    both = {"a": jnp.array([jnp.nan, 1.0]), "b": grads["b"]}
    updates, state = jax.jit(tx.update)(both, tx.init(params), params)
    assert og.metrics(state)["optim/skipped"] and np.isnan(updates["b"][0])
    with pytest.raises(og.NonFiniteGradientError, match=(
        r"^Step 0: 1 NaN/Inf element in layers that no skip or "
        r"zero_nonfinite watches went on to their part's optimizer; first "
        r"bad layers: b \(1 NaN/Inf\); unless it discards them "
        r"\(`optax.set_to_zero`\), they were applied\. A guard or skip in one "
        r"part of the model \(`optax.multi_transform`, `optax.masked`\) does "
        r"not see the others: put one around the whole optimizer\.$")) as e:
      og.check(state)
    assert e.value.layers == {"b": 1}
  # Where the guard sees the NaN, it reports what it did (skipped).
  tx = optax.chain(og.monitor(), og.guard(og.adamw(0.1)))
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"The guard skipped the step"):
    og.check(state)
  # A MultiSteps that dropped the micro-batch says so, not the monitor.
  tx = optax.chain(og.monitor(), optax.MultiSteps(
      og.guard(og.adamw(0.1)), 2,
      should_skip_update_fn=og.skip_nonfinite_microbatch()))
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  with pytest.raises(og.NonFiniteGradientError, match=(
      r"^Step 0, micro-batch 1: optax.MultiSteps dropped the micro-batch")):
    og.check(state)


@pytest.mark.standard_promotion  # optax.sgd under multi_transform
def test_check_tells_skipped_zeroed_and_applied_apart():
  """What og.check says against what the updates and states show: layers
  named otherwise (`groups=`, `stacked=`) by the monitor and by what
  handled the NaN are matched by count; a monitor without layers still
  tells that a NaN was applied; a skip or halt after a zero_nonfinite is
  reported before the zeroing; a NaN loss that a wrapper kept from the
  skip is reported."""
  params = {"a": {"blocks": jnp.ones((3, 2)), "head": jnp.ones(2)},
            "b": jnp.ones(2)}
  labels = {"a": {"blocks": "a", "head": "a"}, "b": "b"}
  nan_a = {"a": {"blocks": jnp.array([[1.0, 1.0], [jnp.nan, 1.0],
                                      [1.0, 1.0]]), "head": jnp.ones(2)},
           "b": jnp.ones(2)}
  first = lambda name: name.split("/")[0]
  for tx, said in [
      (optax.chain(og.monitor(), optax.multi_transform(
          {"a": og.guard(og.adamw(0.1), groups=first),
           "b": optax.sgd(0.1)}, labels)), r"The guard skipped the step"),
      (optax.chain(og.monitor(stacked=("a/blocks",)), optax.multi_transform(
          {"a": optax.chain(og.zero_nonfinite(), optax.sgd(0.1)),
           "b": optax.sgd(0.1)}, labels)), r"og.zero_nonfinite replaced")]:
    updates, state = tx.update(nan_a, tx.init(params), params)
    assert np.all(np.isfinite(updates["a"]["blocks"]))
    with pytest.raises(og.NonFiniteGradientError, match=said):
      og.check(state)
  # A skip in part a that counted other elements than the monitor did (the
  # NaN its inner optimizer made; an Inf a value clip made finite): b's NaN
  # is still told as applied, and a's skip is no false alarm.
  two = {"a": jnp.zeros(4), "b": jnp.ones(2)}
  two_labels = {"a": "a", "b": "b"}
  for part_a, grads, b_applied in [
      (og.skip_nonfinite(optax.adam(0.1, eps=0.0)),   # 0/0 in its update
       {"a": jnp.zeros(4), "b": jnp.array([jnp.nan, 1.0])}, True),
      (optax.chain(og.clip_by_value(1.0), og.skip_nonfinite(optax.sgd(0.1))),
       {"a": jnp.array([jnp.inf, jnp.nan, 1.0, 1.0]), "b": jnp.ones(2)},
       False)]:
    tx = optax.chain(og.monitor(), optax.multi_transform(
        {"a": part_a, "b": optax.sgd(0.1)}, two_labels))
    updates, state = jax.jit(tx.update)(grads, tx.init(two), two)
    np.testing.assert_array_equal(updates["a"], np.zeros(4))  # skipped
    assert bool(np.isnan(updates["b"][0])) == b_applied
    said = (r"^Step 0: 1 NaN/Inf element in layers that no skip" if b_applied
            else r"The guard skipped the step")
    with pytest.raises(og.NonFiniteGradientError, match=said):
      og.check(state)
  # A monitor without layers is compared by count; an overflow beside a
  # part that skipped its own is still told.
  nan_both = {"a": jnp.array([jnp.nan, 0.0, 0.0, 0.0]),
              "b": jnp.array([jnp.nan, 1.0])}
  for monitor, grads, said in [
      (og.monitor(per_layer=False), nan_both,
       r"^Step 0: 1 NaN/Inf element in layers that no skip or "
       r"zero_nonfinite watches went on to their part's optimizer; unless"),
      (og.monitor(), {"a": jnp.full(4, 3e38), "b": jnp.full(2, 3e38)},
       r"^Step 0: finite gradients whose global norm overflows float32")]:
    tx = optax.chain(monitor, optax.multi_transform(
        {"a": og.skip_nonfinite(optax.sgd(0.1)), "b": optax.sgd(0.1)},
        two_labels))
    updates, state = jax.jit(tx.update)(grads, tx.init(two), two)
    np.testing.assert_array_equal(updates["a"], np.zeros(4))  # skipped
    assert not np.all(updates["b"] == 0)                      # applied
    with pytest.raises(og.NonFiniteGradientError, match=said):
      og.check(state)
  # Finite gradients whose norm overflows, skipped by the guard behind a
  # monitor: the guard's account, not the monitor's "nothing skips".
  tx = optax.chain(og.monitor(), og.guard(og.adamw(0.1)))
  big = {"w": jnp.full(2, 3e38)}
  updates, state = jax.jit(tx.update)(big, tx.init(big), big)
  np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
  with pytest.raises(og.NonFiniteGradientError, match=(
      r"^Step 0: finite gradients whose global norm overflows float32\. The "
      r"guard skipped the step")):
    og.check(state)
  # A halted guard after a zero_nonfinite: the halt, not the zeroing.
  w = {"w": jnp.ones(2)}
  tx = optax.chain(og.zero_nonfinite(),
                   og.guard(og.adamw(0.1), max_consecutive=1))
  state = tx.init(w)
  _, state = tx.update(w, state, w, loss=jnp.float32(jnp.nan))  # halts
  updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, w,
                             loss=jnp.float32(1.0))
  np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"^Step 1: skipped: the guard has halted"):
    og.check(state)
  # A wrapper that drops `loss=` before the skip: the monitor's NaN loss.
  inner = og.skip_nonfinite(optax.sgd(0.1))
  dropping = optax.GradientTransformation(
      inner.init, lambda u, s, p=None: inner.update(u, s, p))
  tx = optax.chain(og.monitor(), dropping)
  updates, state = tx.update(w, tx.init(w), w, loss=jnp.float32(jnp.nan))
  assert not og.metrics(state)["optim/skipped"]
  with pytest.raises(og.NonFiniteGradientError,
                     match=r"^Step 0: the loss is nan\."):
    og.check(state)


_ANOTHER_CONFIGURATION = re.escape(
    "the state was made by a transformation built otherwise (a checkpoint, "
    "or a state kept after rebuilding the optimizer): re-initialise it with "
    "`tx.init(params)`, or restore checkpoints into "
    "`jax.eval_shape(tx.init, params)`, which refuses such a mismatch.")


@pytest.mark.parametrize("saved, given, words", [
    (lambda: og.guard(optax.sgd(0.1), spike_window=8),
     lambda: og.guard(optax.sgd(0.1)),
     "The state's history holds 8 values, but this `guard` was built with "
     "spike_window=128"),
    (lambda: og.skip_spikes(optax.sgd(0.1), window=16),
     lambda: og.skip_spikes(optax.sgd(0.1), window=8, warmup_steps=4),
     "The state's history holds 16 values, but this `skip_spikes` was built "
     "with window=8"),
    (lambda: og.autoclip(window=4), lambda: og.autoclip(window=100),
     "The state's history holds 4 values, but this `autoclip` was built with "
     "window=100"),
    (lambda: og.zclip(warmup_steps=10), lambda: og.zclip(warmup_steps=25),
     "The state's history holds 10 values, but this `zclip` was built with "
     "warmup_steps=25"),
    (lambda: og.guard(optax.sgd(0.1)),
     lambda: og.guard(optax.sgd(0.1), skip_nonfinite=False),
     "The guard's state has a `nonfinite` part, but this guard was built "
     "with it off"),
    (lambda: og.guard(optax.sgd(0.1), monitor=False),
     lambda: og.guard(optax.sgd(0.1)),
     "The guard's state has no `monitor` part, but this guard was built with "
     "it on"),
    (lambda: og.guard(optax.sgd(0.1), histogram=True),
     lambda: og.guard(optax.sgd(0.1)),
     "The monitor's state has `histograms`, but this `guard` was built with "
     "histogram=False"),
    (lambda: og.monitor(), lambda: og.monitor(zscore=True),
     "The monitor's state has no `zscores`, but this `monitor` was built "
     "with zscore=True"),
])
def test_a_state_of_another_configuration_is_refused(saved, given, words):
  """A state kept (or restored by flax, which checks no shapes) after the
  optimizer was rebuilt otherwise: a spike history of 8 under a window of
  128 never filled its warm-up (spike skipping off for good), a stale part
  was reported as current (`optim/skipped` on every step)."""
  params = {"w": jnp.ones(3)}
  state = saved().init(params)
  with pytest.raises(ValueError, match=re.escape(words) + ".*" +
                     _ANOTHER_CONFIGURATION):
    given().update({"w": jnp.full(3, 0.5)}, state, params)


def test_a_monitor_state_takes_the_monitor_s_own_names():
  """A state of a monitor with another prefix is named by the monitor that
  updates it (it kept the old names)."""
  params = {"w": jnp.ones(3)}
  old = og.monitor(prefix="old/").init(params)
  tx = og.monitor(prefix="new/")
  _, state = tx.update({"w": jnp.full(3, 2.0)}, old, params)
  metrics = og.metrics(state)
  np.testing.assert_allclose(metrics["new/grad/norm"], 2.0 * np.sqrt(3.0),
                             rtol=1e-6)
  assert not any(name.startswith("old/") for name in metrics)


@pytest.mark.standard_promotion  # optax.adam mixes Python floats and int32
def test_check_and_metrics_read_optax_apply_if_finite():
  """A step that `optax.apply_if_finite` dropped: a monitor ahead of it said
  that nothing skipped it, and a guard inside it (which never ran) had its
  older step reported again. Alone, apply_if_finite stays optax's."""
  params = {"w": jnp.ones(3)}
  nan = {"w": jnp.array([1.0, jnp.nan, 0.0])}
  plain = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=5)
  assert og.metrics(plain.update(nan, plain.init(params), params)[1]) == {}

  tx = optax.chain(og.monitor(), optax.apply_if_finite(
      optax.adam(0.1), max_consecutive_errors=5))
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(nan, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  m = og.metrics(state)
  assert bool(m["optim/aif_nonfinite"]) and int(m["optim/aif_num_nonfinite"]) == 2
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "Step 1: the gradients hold 1 NaN/Inf element; first bad layers: w "
      "(1 NaN/Inf). optax.apply_if_finite dropped the step (2 in a row, 2 in "
      "total), unless more than its `max_consecutive_errors` came in a "
      "row.")):
    og.check(state)

  tx = optax.apply_if_finite(og.guard(og.adam(0.1), spike_sigma=None),
                             max_consecutive_errors=5)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params,
                       loss=jnp.float32(jnp.nan))  # the guard skips it
  with pytest.raises(og.NonFiniteGradientError, match="^Step 0: non-finite "
                     "loss"):
    og.check(state)
  _, state = tx.update(nan, state, params, loss=jnp.float32(1.0))
  with pytest.raises(og.NonFiniteGradientError) as error:
    og.check(state)
  assert error.value.step == -1 and str(error.value) == (
      "The updates that reached optax.apply_if_finite hold NaN/Inf: "
      "optax.apply_if_finite dropped the step (1 in a row, 1 in total), "
      "unless more than its `max_consecutive_errors` came in a row. It "
      "counts no steps, so the error's `step` is -1.")
  _, state = tx.update({"w": jnp.ones(3)}, state, params,
                       loss=jnp.float32(1.0))
  og.check(state)  # quiet again
  log = og.MetricsLog()
  log.record(state)
  assert log.to_numpy()["optim/aif_num_nonfinite"].tolist() == [1]


@pytest.mark.standard_promotion  # traces optax.sgd
def test_an_unapplied_update_has_no_nonfinite_counts():
  """Finite gradients whose norm overflows float32 (also a spike): the
  generic path counted the NaN/Inf of the inner update that was never
  applied, and og.check named them as bad layers of 'finite gradients';
  the fast path and the chain of the pieces count none."""
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  grads = {"a": jnp.full(3, 3e38), "b": jnp.full(2, 3e38)}
  sgd = lambda m: m.sgd(1.0, momentum=0.9, nesterov=True)
  for tx in (og.guard(sgd(optax), max_norm=None, monitor=False),
             og.guard(sgd(og), max_norm=None, monitor=False),
             og.skip_nonfinite(og.skip_spikes(sgd(optax)))):
    _, state = tx.update(grads, tx.init(params), params)
    m = og.metrics(state)
    assert int(m["optim/last_bad_reason"]) == 4
    assert int(m["optim/last_bad_nonfinite/a"]) == 0
    assert int(m["optim/last_bad_nonfinite/b"]) == 0
    with pytest.raises(og.NonFiniteGradientError, match=re.escape(
        "Step 0: finite gradients whose global norm overflows float32. The "
        "guard skipped the step (1 bad in a row, 1 skipped in total).")):
      og.check(state)


@pytest.mark.standard_promotion  # optax.sgd mixes Python floats and int32
def test_check_reads_apply_if_finite_in_its_own_part_only():
  """apply_if_finite over one part of the model: the other part's NaN was
  applied, and og.check said it was dropped. A guard built not to skip says
  what dropped the step inside it; the spike skipper below it keeps its
  training-step numbers."""
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  grads = {"a": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.array([jnp.nan, 1.0])}
  labels = {"a": "x", "b": "y"}
  nothing = ("Nothing in this chain skips such a step unless a "
             "`skip_nonfinite` or `guard` stands around the optimizer.")
  partly = ("An optax.apply_if_finite over a part of the model dropped that "
            "part's update (1 in a row, 1 in total); the other parts' went on "
            "unless something else skipped them.")
  for tx, said in (
      (optax.chain(og.monitor(), optax.multi_transform(
          {"x": optax.apply_if_finite(optax.sgd(0.1), 5),
           "y": optax.sgd(0.1)}, labels)), partly),
      (optax.multi_transform(
          {"x": optax.apply_if_finite(optax.sgd(0.1), 5),
           "y": optax.chain(og.monitor(), optax.sgd(0.1))}, labels), nothing)):
    updates, state = tx.update(grads, tx.init(params), params)
    assert np.isnan(updates["b"][0])  # applied in b
    with pytest.raises(og.NonFiniteGradientError) as error:
      og.check(state)
    assert "b (1 NaN/Inf)" in str(error.value)
    assert str(error.value).endswith(said)

  tx = og.guard(optax.apply_if_finite(optax.sgd(0.1), 5),
                skip_nonfinite=False, spike_sigma=None)
  _, state = tx.update(grads, tx.init(params), params)
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "optax.apply_if_finite dropped the step (1 in a row, 1 in total), "
      "unless more than its `max_consecutive_errors` came in a row.")):
    og.check(state)

  tx = og.skip_nonfinite(optax.apply_if_finite(
      og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2), 5))
  state = tx.init(params)
  for g in (1.0, np.nan, 1.1, 1.0, 50.0):
    _, state = tx.update({"a": jnp.full(3, g), "b": jnp.full(2, g)}, state,
                         params)
  with pytest.raises(og.GradientExplosionError, match="^Step 4: "):
    og.check(state)


@pytest.mark.standard_promotion  # optax.sgd mixes Python floats and int32
def test_check_on_apply_if_finite_over_a_part_and_below_multisteps():
  """A drop in one part of the model, seen by a monitor of the whole, is
  said as such (the NaN may also be elsewhere); a spike elsewhere comes after
  it (non-finite first); an apply_if_finite below a MultiSteps that completed
  no step did not run, and is not said to have dropped anything."""
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  labels = {"a": "x", "b": "y"}
  tx = optax.chain(og.monitor(), optax.multi_transform(
      {"x": optax.apply_if_finite(optax.sgd(0.1), 5), "y": optax.sgd(0.1)},
      labels))
  grads = {"a": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.ones(2)}
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["a"], 0.0)
  with pytest.raises(og.NonFiniteGradientError, match=re.escape(
      "first bad layers: a (1 NaN/Inf). An optax.apply_if_finite over a part "
      "of the model dropped that part's update (1 in a row, 1 in total); the "
      "other parts' went on unless something else skipped them.")):
    og.check(state)

  tx = optax.multi_transform(
      {"x": optax.apply_if_finite(optax.sgd(0.1), 5),
       "y": og.skip_spikes(optax.sgd(0.1), window=4, warmup_steps=2)}, labels)
  state = tx.init(params)
  for g in (1.0, 1.1, 1.0):
    _, state = tx.update({"a": jnp.full(3, g), "b": jnp.full(2, g)}, state,
                         params)
  _, state = tx.update({"a": jnp.array([1.0, jnp.nan, 1.0]),
                        "b": jnp.full(2, 50.0)}, state, params)
  with pytest.raises(og.NonFiniteGradientError):
    og.check(state)

  tx = optax.chain(og.monitor(), optax.MultiSteps(
      optax.apply_if_finite(og.sgd(0.1), 5), every_k_schedule=2))
  state = tx.init(params)
  nan = {"a": jnp.array([1.0, jnp.nan, 1.0]), "b": jnp.ones(2)}
  for g in (nan, nan, nan):  # step 0 dropped; then half of step 1
    _, state = tx.update(g, state, params)
  with pytest.raises(og.NonFiniteGradientError) as error:
    og.check(state)
  assert "dropped" not in str(error.value)


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32
@pytest.mark.parametrize("micro_batches, poisoned", [
    ((3e38, 1e38), False),       # finite, the mean's norm overflows
    ((1.0, float("inf")), True),  # an Inf element
], ids=["overflow", "inf"])
def test_accumulator_hint_for_an_infinite_spike_norm_is_conditional(
    micro_batches, poisoned):
  """A spike skipper records only the norm, which is Inf for an Inf element
  (which stays in MultiSteps' accumulator) and for a finite overflow (which
  does not): the hint says which case it is for."""
  params = {"w": jnp.ones(3)}
  tx = optax.MultiSteps(og.skip_spikes(og.sgd(0.1)), every_k_schedule=2)
  state = tx.init(params)
  for g in micro_batches:
    _, state = tx.update({"w": jnp.full(3, g)}, state, params)
  with pytest.raises(og.NonFiniteGradientError) as error:
    og.check(state)
  assert (" If the gradients held Inf elements (not only a norm beyond "
          "float32's range): inside optax.MultiSteps, a NaN/Inf micro-batch "
          "that its `should_skip_update_fn` does not drop stays in its "
          "accumulator") in str(error.value)
  for _ in range(2):
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
  if poisoned:
    np.testing.assert_array_equal(updates["w"], 0.0)  # skipped for good
  else:
    np.testing.assert_allclose(updates["w"], -0.1)


def _sam():
  return optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), sync_period=2)


@pytest.mark.standard_promotion  # traces optax's sam
@pytest.mark.parametrize("wrap,reference,counter", [
    (og.guard, lambda inner: optax.chain(optax.clip_by_global_norm(1.0),
                                         inner), "optim/num_skipped"),
    (og.skip_nonfinite, lambda inner: inner, "optim/num_skipped"),
    (lambda inner: og.skip_spikes(inner, window=8), lambda inner: inner,
     "optim/num_spikes")], ids=["guard", "skip_nonfinite", "skip_spikes"])
def test_loss_reaches_the_wrapper_around_an_update_that_names_its_arguments(
    wrap, reference, counter):
  """optax's `sam` names its update's keywords and refuses any other, so a
  `loss=` (or `value=`) passed on to it failed: no loss could reach the
  wrapper. The wrapper reads them and passes them on only where they are
  taken; `sam`'s own steps are unchanged."""
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx, ref = wrap(_sam()), reference(_sam())
  state, ref_state = tx.init(params), ref.init(params)
  for step, (loss, key) in enumerate([(2.0, "loss"), (1.5, "value"),
                                      (np.nan, "loss"), (1.0, "loss")]):
    grads = {"w": jnp.array([0.3, -0.2, 0.1]) * (step + 1)}
    updates, new_state = jax.jit(tx.update)(grads, state, params,
                                            **{key: jnp.float32(loss)})
    if np.isfinite(loss):
      want, ref_state = ref.update(grads, ref_state, params)
      np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
      params = optax.apply_updates(params, updates)
    else:  # a NaN loss skips the step exactly
      np.testing.assert_array_equal(updates["w"], np.zeros(3))
      chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    state = new_state
  assert og.metrics(state)[counter] == 1


def test_an_update_that_takes_keywords_is_given_the_loss():
  """Where the inner update takes `**kwargs` (or names `loss`), the loss is
  passed on, as before: an optax_guard piece inside reads it."""
  taken = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(), lambda u, s, p=None, *, loss: (u, s))
  assert _skip.for_inner(taken, {"loss": 1.0, "value": 2.0}) == {"loss": 1.0}
  inner = og.skip_spikes(optax.sgd(0.1), window=8)
  assert _skip.for_inner(inner, {"loss": 1.0}) == {"loss": 1.0}
  params = {"w": jnp.ones(2)}
  tx = og.skip_nonfinite(inner)
  _, state = tx.update(params, tx.init(params), params, loss=3.0)
  assert state.inner_state.losses.values[0] == 3.0

"""Long runs, left out by default: `python -m pytest -m soak`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

pytestmark = pytest.mark.soak


@pytest.mark.standard_promotion  # traces optax.adamw
def test_fast_and_generic_paths_agree_over_3000_steps():
  """NaN, Inf and spike steps at random over a long run: the guard around
  og.adamw and around optax.adamw keep identical parameters and counters."""
  rng = np.random.default_rng(7)
  params = {"w": jnp.full((64, 32), 0.1, jnp.float32),
            "b": jnp.zeros((32,), jnp.float32)}
  kw = dict(max_norm=1.0, spike_window=64, spike_warmup_steps=32)
  runs = []
  for inner in (og.adamw(1e-3), optax.adamw(1e-3)):
    tx = og.guard(inner, **kw)
    step = jax.jit(lambda p, s, g, tx=tx: (lambda u, s: (
        optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    runs.append([step, params, tx.init(params)])
  bad = {"nan": 0, "spike": 0}
  for i in range(3000):
    g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
         for k, v in params.items()}
    event = rng.random()
    if event < 0.01:
      g["w"] = g["w"].at[0, 0].set(jnp.nan)
      bad["nan"] += 1
    elif event < 0.02 and i > 100:
      g = jax.tree.map(lambda x: x * 1e3, g)
      bad["spike"] += 1
    for run in runs:
      run[1], run[2] = run[0](run[1], run[2], g)
  (_, p1, s1), (_, p2, s2) = runs
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  m1, m2 = og.metrics(s1), og.metrics(s2)
  assert int(m1["optim/num_skipped"]) == int(m2["optim/num_skipped"]) == (
      bad["nan"])
  assert int(m1["optim/num_spikes"]) == int(m2["optim/num_spikes"]) >= (
      bad["spike"] // 2)

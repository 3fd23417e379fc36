"""Where the generic guard's time goes: ways of skipping around an opaque optax
optimizer, measured on workload (a) beside bare `optax.adamw` and optax's
`apply_if_finite(chain(clip_by_global_norm, adamw))`.

Each variant measures the gradients with the package's statistics pass,
clips by multiplying, and keeps the inner state exact on a skipped step by:
`where`: selecting between the new and old state;
`cond`: running the inner update under `lax.cond`; `+check`: also reading
the inner update back for NaN/Inf (as `og.skip_nonfinite` must, since any
optax optimizer can produce them from finite gradients); `probe+check`:
what the package does (`_skip.update_checked`): the update of one run is
measured and returned, and a second run on the sanitised gradients gives the
state to select. `og.skip_spikes(adamw)` decides before the optimizer runs
and reads its update back only to order the select (`_skip.update_unless`).

    python benchmarks/generic_variants.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (the benchmark harness beside this file)

og = harness.og
_clipping, _skip, _stats = og._clipping, og._skip, og._stats


def skipping(inner: optax.GradientTransformation, how: str, check: bool
             ) -> optax.GradientTransformation:
  """Clip + exact skip of NaN/Inf steps around `inner`, done `how`."""

  def update(grads, state, params=None):
    stats = _stats.tree_stats(grads)
    factors = _clipping.clip_factors(stats.global_norm, 1.0)
    scaled = _clipping.scale_tree(grads, factors)
    keep = stats.finite
    if how == "probe":
      updates, new, _ = _skip.update_checked(
          inner, grads, state, params, {},
          lambda inner_ok, _: (keep & inner_ok,), None, scale=factors)
      return updates, new
    if how == "where":
      clean = jax.tree.map(lambda g: jnp.where(keep, g, 0), scaled)
      updates, new = inner.update(clean, state, params)
    else:
      updates, new = lax.cond(
          keep, lambda: inner.update(scaled, state, params),
          lambda: (jax.tree.map(jnp.zeros_like, grads), state))
    if check:
      keep = keep & _stats.tree_stats(updates).finite
    if how == "where" or check:
      new = _skip.select_tree(keep, new, state)
      updates = _skip.zeros_unless(keep, updates)
    return updates, new

  return optax.GradientTransformation(inner.init, update)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  adamw = lambda: optax.adamw(1e-3)
  base = "optax apply_if_finite"
  harness.CONTENDERS[:] = [
      ("optax.adamw", adamw, "optax.adamw"),
      (base, lambda: optax.apply_if_finite(
          optax.chain(optax.clip_by_global_norm(1.0), adamw()), 5), base),
  ] + [(f"{how}{'+check' if check else ''}",
        lambda how=how, check=check: skipping(adamw(), how, check), base)
       for how in ("where", "cond") for check in (False, True)] + [
      ("probe+check", lambda: skipping(adamw(), "probe", True), base),
      ("og.guard(adamw)", lambda: og.guard(adamw()), base),
      ("og.skip_spikes(adamw)", lambda: og.skip_spikes(adamw()),
       "optax.adamw")]  # no clip: compared with adamw alone
  name, make, _ = harness.workloads("a", False)[0]
  result = harness.run_workload(name, make, 1, args.rounds, args.steps, 2.0)
  print(harness.table(name, result, args.rounds, args.steps))


if __name__ == "__main__":
  main()

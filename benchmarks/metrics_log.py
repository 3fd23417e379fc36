"""What `og.MetricsLog.record` costs a training loop: `og.guard(og.adamw)`
steps on workload (a) with params and state donated, run in rounds that
alternate a loop without recording and one that records every step; the
ratio is the loop's time per step with recording over without.

    python benchmarks/metrics_log.py [--rounds 4] [--steps 20] [--lag 2]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (the benchmark harness beside this file)

og = harness.og


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--lag", type=int, default=2)
  args = parser.parse_args()
  params = harness.workloads("a", False)[0][1]()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-4), params)
  tx = og.guard(og.adamw(1e-3))

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  params, state = step(params, state, grads)
  log = og.MetricsLog(lag=args.lag)
  log.record(state)
  jax.block_until_ready((params, state))

  ratios = []
  for _ in range(args.rounds):
    times = {}
    for record in (False, True):
      start = time.perf_counter()
      for _ in range(args.steps):
        params, state = step(params, state, grads)
        if record:
          log.record(state)
      jax.block_until_ready((params, state))
      log.to_numpy()  # the last `lag` fetches belong to the loop
      times[record] = (time.perf_counter() - start) / args.steps
    ratios.append(times[True] / times[False])
    print(f"without {times[False] * 1e3:.1f} ms/step, with "
          f"{times[True] * 1e3:.1f} ms/step: {ratios[-1]:.3f}x", flush=True)
  print(f"record every step, lag {args.lag}: {np.median(ratios):.3f}x "
        f"({min(ratios):.3f}-{max(ratios):.3f}) over {args.rounds} rounds; "
        f"{len(log)} steps recorded, {len(log.to_numpy()) - 1} metrics each")


if __name__ == "__main__":
  main()

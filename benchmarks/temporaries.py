"""Temporaries and parameter copies of one donated step, beyond the default.

`run.py` measures the default contenders on large workloads; this compiles
(without running) the step of each configuration below over `--layers`
Dense 512x512 kernels and their biases, with the gradients passed in or
computed in the step by `jax.grad` of a tanh MLP (then XLA keeps the
backward pass's buffers alive beside the update), and prints each step's
temporaries (`memory_analysis()`) and its `copy` ops of 512x512 buffers
(copies of donated kernels), beside the optax step it stands against.

    python benchmarks/temporaries.py [--layers 24]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og

WIDTH = 512
LR = 1e-3


def _decay_inside(wrap, decay):
  return lambda: wrap(optax.chain(optax.scale_by_adam(), decay(),
                                  optax.scale(-LR)))


# (name, factory): each og row is followed by the optax row it stands against.
CONFIGS = [
    ("optax.adam", lambda: optax.adam(LR)),
    ("chain(og.monitor(), adam)", lambda: optax.chain(og.monitor(),
                                                      optax.adam(LR))),
    ("chain(optax.clip, adam)", lambda: optax.chain(optax.clip(0.01),
                                                    optax.adam(LR))),
    ("chain(og.clip_by_value, adam)", lambda: optax.chain(
        og.clip_by_value(0.01), optax.adam(LR))),
    ("chain(optax.zero_nans, adam)", lambda: optax.chain(optax.zero_nans(),
                                                         optax.adam(LR))),
    ("chain(og.zero_nonfinite, adam)", lambda: optax.chain(
        og.zero_nonfinite(), optax.adam(LR))),
    ("chain(optax.clip_by_global_norm, adam)", lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(LR))),
    ("chain(og.clip_by_global_norm, og.adam)", lambda: optax.chain(
        og.clip_by_global_norm(1.0), og.adam(LR))),
    ("og.guard(og.adam)", lambda: og.guard(og.adam(LR))),
    ("chain(og.add_l2_penalty, og.guard(og.adam))", lambda: optax.chain(
        og.add_l2_penalty(1e-4, mask=None), og.guard(og.adam(LR)))),
    ("og.guard(chain(adam, optax decay))", _decay_inside(
        og.guard, lambda: optax.add_decayed_weights(1e-4))),
    ("og.guard(chain(adam, og decay))", _decay_inside(
        og.guard, lambda: og.add_decayed_weights(1e-4, mask=None))),
    ("optax.apply_if_finite(adamw)", lambda: optax.apply_if_finite(
        optax.adamw(LR), 5)),
    ("og.guard(optax.adamw)", lambda: og.guard(optax.adamw(LR))),
]


def _params(layers: int) -> dict:
  rng = np.random.default_rng(0)
  return {f"Dense_{i:02d}": {
      "kernel": jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH),
                            jnp.float32),
      "bias": jnp.zeros((WIDTH,), jnp.float32)} for i in range(layers)}


def measure(tx, params: dict, in_step: bool) -> tuple[float, int]:
  """(MiB of temporaries, copies of a kernel-sized buffer) of one step."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(64, WIDTH)),
                  jnp.float32)

  def loss(p):
    h = x
    for name in sorted(p):
      h = jnp.tanh(h @ p[name]["kernel"] + p[name]["bias"])
    return jnp.mean(h ** 2)

  def step(p, s, *g):
    u, s = tx.update(g[0] if g else jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  grads = () if in_step else (jax.tree.map(lambda p: p * 1e-3, params),)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), *grads).compile()
  big = re.compile(rf"\[{WIDTH},{WIDTH}\]")
  copies = sum(1 for line in compiled.as_text().splitlines()
               if re.search(r"\bcopy\(", line) and
               big.search(line.split("copy(")[0]))
  return compiled.memory_analysis().temp_size_in_bytes / 2**20, copies


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=24)
  args = parser.parse_args()
  params = _params(args.layers)
  size = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
  print(f"{args.layers} Dense {WIDTH}x{WIDTH} layers: {size:.2f} MiB of "
        "parameters; MiB of temporaries (kernel copies)")
  print(f"{'configuration':<46} {'grads passed in':>16} {'grads in step':>16}")
  for name, make in CONFIGS:
    with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic
      cells = [measure(make(), params, in_step) for in_step in (False, True)]
    print(f"{name:<46} " + " ".join(f"{t:>10.2f} ({c:>3})" for t, c in cells),
          flush=True)


if __name__ == "__main__":
  main()

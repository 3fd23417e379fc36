"""Adaptive clipping against gradient spikes: AGC, AutoClip and ZClip.

A deep tanh MLP (8 hidden layers, no normalisation) learns a smooth
regression task with SGD + momentum, one minibatch per step. Every 50th
minibatch is corrupted: its targets are multiplied by 1000 (a mislabelled
batch, the classic cause of a gradient spike). Plain training takes the
spike's full step and never recovers; each adaptive clipper cuts the spike
and trains on:

  python examples/adaptive_clipping.py

prints the held-out loss of each run. The exit status is 0 only if plain
training diverged and every clipper ended below a tenth of its starting loss.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  import optax_guard as og
except ImportError:  # A source checkout without `pip install -e .`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_guard as og

STEPS, BATCH, DIM, CORRUPT_EVERY = 200, 32, 8, 50


class DeepTanhMLP(nn.Module):
  depth: int = 8
  width: int = 32

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = jnp.tanh(nn.Dense(self.width)(x))
    return nn.Dense(1)(x)[:, 0]


def make_data(steps: int = STEPS):
  """Minibatches `[steps, batch, dim]` (every 50th corrupted) and a clean
  held-out set."""
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(kw, (DIM,)) / jnp.sqrt(float(DIM))
  x = jax.random.normal(kx, (steps, BATCH, DIM))
  y = jnp.tanh(x @ w)
  corrupt = jnp.arange(steps) % CORRUPT_EVERY == CORRUPT_EVERY - 1
  y = jnp.where(corrupt[:, None], y * 1000.0, y)
  x_test = jax.random.normal(kt, (256, DIM))
  return (x, y), (x_test, jnp.tanh(x_test @ w))


def train(tx: optax.GradientTransformation, steps: int = STEPS
          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Held-out loss after each step, and the clipper's metrics per step."""
  (x, y), (x_test, y_test) = make_data(steps)
  model = DeepTanhMLP()
  params = model.init(jax.random.key(1), x[0])

  def loss_fn(p, xb, yb):
    return jnp.mean(jnp.square(model.apply(p, xb) - yb))

  def step(carry, batch):
    p, s = carry
    updates, s = tx.update(jax.grad(loss_fn)(p, *batch), s, p)
    p = optax.apply_updates(p, updates)
    return (p, s), (loss_fn(p, x_test, y_test), og.metrics(s))

  run = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), (x, y))[1])
  losses, metrics = jax.device_get(run(params, tx.init(params)))
  return np.asarray(losses), metrics


def contenders(learning_rate: float = 0.05) -> dict[str, optax.GradientTransformation]:
  sgd = lambda: optax.sgd(learning_rate, momentum=0.9)
  return {
      "plain sgd": sgd(),
      "adaptive_grad_clip(0.01)": optax.chain(og.adaptive_grad_clip(0.01),
                                              sgd()),
      "autoclip(10)": optax.chain(og.autoclip(10.0), sgd()),
      "zclip()": optax.chain(og.zclip(), sgd()),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.parse_args(argv)  # no options: --help says what it does
  print(f"{'run':26s} {'loss@0':>9s} {'loss@48':>9s} {'final':>10s} "
        f"{'max':>10s} {'clipped steps':>14s}")
  finals = {}
  for name, tx in contenders().items():
    losses, metrics = train(tx)
    clipped = metrics.get("optim/num_clipped")
    clipped = "-" if clipped is None else str(int(clipped[-1]))
    finals[name] = (losses[0], losses[-1])
    print(f"{name:26s} {losses[0]:9.4f} {losses[48]:9.4f} {losses[-1]:10.4g} "
          f"{np.nanmax(losses):10.4g} {clipped:>14s}")
  plain_first, plain_last = finals.pop("plain sgd")
  ok = (not plain_last < 100 * plain_first) and all(
      last < 0.1 * first for first, last in finals.values())
  print("PASS" if ok else "FAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

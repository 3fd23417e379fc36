"""Quickstart: a deep MLP whose gradients explode, with and without a guard.

A 16-layer ReLU MLP, initialised slightly too large (He init times 1.1 per
layer), is fit to a small synthetic regression task with SGD + momentum. Its
gradients start far above 1 and grow by orders of magnitude per step; without
protection the run turns to Inf/NaN within a few steps. The same model, data
and optimizer inside `og.guard` (monitor, global-norm clip, NaN/Inf and spike
skipping, with the guard-aware `og.sgd` taking the decision in its own pass)
train normally.

The unguarded run carries `og.monitor()`, which only measures (it passes the
gradients through unchanged), so that its explosion can be watched too.
Every step is one jitted call that returns `og.metrics(opt_state)`; the host
fetches them with a single `jax.device_get`, which waits for the step to
finish: here on purpose, to stop at the first non-finite step. A training
loop that should not wait records them with `og.MetricsLog` instead.

Run from the repository root:

  python examples/quickstart.py                   # tables and verdicts
  python examples/quickstart.py --plot norms.png  # and a grad-norm plot

The exit status is 0 only if the unguarded run diverged and the guarded run
stayed finite and learned (its last loss below the data's variance, the loss
of predicting the mean), so the script doubles as a check.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import sys
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  import optax_guard as og
except ImportError:  # A source checkout without `pip install -e .`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_guard as og

_LAYER_NORM_PREFIX = "grad/norm/"  # Per-layer entries: grad/norm/<layer>.


class DeepMLP(nnx.Module):
  """A plain ReLU MLP: no normalisation and no residuals to tame gradients."""

  def __init__(self, in_features: int, width: int, depth: int, gain: float,
               *, rngs: nnx.Rngs):
    # He init scaled by `gain`: each layer amplifies the signal (and the
    # backward pass) by about `gain`, i.e. ~1.1**16 ~ 4.6x over the network.
    init = nnx.initializers.variance_scaling(2.0 * gain**2, "fan_in", "normal")
    sizes = [in_features] + [width] * depth
    self.layers = nnx.List([
        nnx.Linear(a, b, kernel_init=init, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])
    ])
    self.head = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.head(x)[:, 0]


def make_data(seed: int, n: int = 256, dim: int = 8):
  """A noisy 1-d regression target, y = sin(x . w) + noise."""
  kx, kw, kn = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, dim))
  w = jax.random.normal(kw, (dim,))
  y = jnp.sin(x @ w) + 0.1 * jax.random.normal(kn, (n,))
  return x, y


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
              x: jax.Array, y: jax.Array) -> Callable[..., Any]:
  """Builds the jitted training step for one optimizer (full-batch)."""

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    return jnp.mean(jnp.square(model(x) - y))

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    # `loss=` lets og.monitor record it (as `loss/value`, `loss/ema`).
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    params = optax.apply_updates(params, updates)
    return params, opt_state, og.metrics(opt_state)

  return step


def largest_layer(metrics: dict[str, Any]) -> tuple[str, float]:
  """The layer with the largest gradient norm (a NaN/Inf norm is largest)."""
  layers = {name[len(_LAYER_NORM_PREFIX):]: float(value)
            for name, value in metrics.items()
            if name.startswith(_LAYER_NORM_PREFIX)}
  name = max(layers, key=lambda k: np.nan_to_num(layers[k], nan=np.inf))
  return name, layers[name]


def fmt(value: Any, width: int = 10) -> str:
  """A right-aligned compact number, or '-' for a metric the run lacks."""
  return f"{'-' if value is None else f'{float(value):.3g}':>{width}}"


# Columns: loss/value, grad/norm, grad/norm_clipped, optim/num_clipped,
# grad/nonfinite and the largest of the grad/norm/<layer> entries.
HEADER = (f"{'step':>5} {'loss':>10} {'grad/norm':>10} {'norm_clipped':>12} "
          f"{'num_clipped':>11} {'nonfinite':>9}  max grad/norm/<layer>")


def print_row(step: int, m: dict[str, Any]) -> None:
  layer, layer_norm = largest_layer(m)
  num_clipped = m.get("optim/num_clipped")
  print(f"{step:>5} {fmt(m['loss/value'])} {fmt(m['grad/norm'])} "
        f"{fmt(m.get('grad/norm_clipped'), 12)} "
        f"{'-' if num_clipped is None else int(num_clipped):>11} "
        f"{int(m['grad/nonfinite']):>9}  {layer} = {layer_norm:.3g}")


def train(name: str, tx: optax.GradientTransformation, graphdef, params,
          x, y, *, steps: int, log_every: int) -> dict[str, Any]:
  """Trains one run, printing a table; stops early once it has diverged."""
  print(f"\n== {name} ==\n{HEADER}")
  step_fn = make_step(graphdef, tx, x, y)
  opt_state = tx.init(params)
  losses, norms, clipped_norms = [], [], []
  diverged_at = None
  for i in range(steps):
    params, opt_state, m = step_fn(params, opt_state)
    m = jax.device_get(m)  # One transfer for every metric of the step.
    loss, norm = float(m["loss/value"]), float(m["grad/norm"])
    losses.append(loss)
    norms.append(norm)
    clipped_norms.append(float(m.get("grad/norm_clipped", math.nan)))
    finite = math.isfinite(loss) and math.isfinite(norm)
    # The first few steps (where explosions start), every `log_every`-th, the
    # last, and the first non-finite one.
    if i < 5 or i % log_every == 0 or i == steps - 1 or not finite:
      print_row(i, m)
    if not finite:
      # NaN/Inf gradients have now reached the parameters: no way back.
      diverged_at = i
      print(f"  stopped: loss or gradients non-finite at step {i}")
      try:
        og.check(opt_state)  # names the step and the first bad layers
      except og.GuardError as e:
        print(f"  og.check: {e}")
      break
  params_finite = all(bool(jnp.all(jnp.isfinite(p)))
                      for p in jax.tree.leaves(params))
  return dict(name=name, losses=losses, norms=norms,
              clipped_norms=clipped_norms, diverged_at=diverged_at,
              params_finite=params_finite)


def verdict(run: dict[str, Any]) -> str:
  if run["diverged_at"] is not None:
    return f"diverged at step {run['diverged_at']}"
  if not run["params_finite"]:
    return "parameters non-finite after the last step"
  return (f"finite; loss {run['losses'][0]:.4g} -> {run['losses'][-1]:.4g} "
          f"in {len(run['losses'])} steps")


def plot(runs: list[dict[str, Any]], path: str) -> None:
  """Writes the grad norm of every run against the step."""
  import matplotlib  # Only needed for --plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for run in runs:
    line, = ax.semilogy(run["norms"], label=f"{run['name']}: grad/norm")
    if run["diverged_at"] is not None:
      ax.axvline(run["diverged_at"], color=line.get_color(), linestyle=":",
                 label=f"{run['name']}: non-finite at {run['diverged_at']}")
    if any(math.isfinite(v) for v in run["clipped_norms"]):
      ax.semilogy(run["clipped_norms"], color=line.get_color(),
                  linestyle="--", label=f"{run['name']}: grad/norm_clipped")
  ax.set_xlabel("step")
  ax.set_ylabel("global gradient norm")
  ax.set_title("Deep MLP: gradient norm, with and without clipping")
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--max-norm", type=float, default=1.0)
  parser.add_argument("--log-every", type=int, default=25)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", metavar="PNG", help="write a grad-norm plot")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.log_every < 1:
    parser.error("--steps and --log-every must be at least 1")
  if args.plot and importlib.util.find_spec("matplotlib") is None:
    parser.error("--plot needs matplotlib: pip install -e '.[plot]'")
  start = time.perf_counter()
  # Both optimizers built first, so that a bad flag is refused before any
  # training. The recommended one-liner: monitor, clip, skip NaN/Inf and
  # spiking steps, with the guard-aware SGD taking the decision inside its
  # own update.
  try:
    guarded_tx = og.guard(og.sgd(args.lr, momentum=0.9),
                          max_norm=args.max_norm)
  except ValueError as e:
    parser.error(str(e))

  x, y = make_data(args.seed)
  model = DeepMLP(x.shape[1], width=32, depth=16, gain=1.1,
                  rngs=nnx.Rngs(args.seed))
  # The pure (graphdef, params) form of the model: params is a pytree whose
  # layer names (`layers/3/kernel`, `head/bias`) become the metric names.
  graphdef, params = nnx.split(model)

  # Same initial parameters, data and optimizer (SGD with momentum, the
  # same numbers in optax and optax_guard) for both runs.
  unguarded = train(
      "unguarded",
      optax.chain(og.monitor(), optax.sgd(args.lr, momentum=0.9)),
      graphdef, params, x, y, steps=args.steps, log_every=args.log_every)
  guarded = train(
      "guarded", guarded_tx,
      graphdef, params, x, y, steps=args.steps, log_every=args.log_every)

  print(f"\nunguarded: {verdict(unguarded)}")
  print(f"guarded:   {verdict(guarded)}")
  if args.plot:
    plot([unguarded, guarded], args.plot)

  # Learned: below the loss of predicting the mean, where a run that stopped
  # moving after its first steps (2.7 here) would not be.
  baseline = float(jnp.var(y))
  ok = (unguarded["diverged_at"] is not None
        and guarded["diverged_at"] is None and guarded["params_finite"]
        and guarded["losses"][-1] < baseline)
  print(f"\n{'PASS' if ok else 'FAIL'}: the unguarded run must diverge and "
        f"the guarded one train below the data's variance ({baseline:.3g}) "
        f"({time.perf_counter() - start:.1f} s)")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

"""Which layer went wrong: the guard's record of a scanned model under faults.

A residual MLP of eight blocks stacked with `nn.scan` (one `[8, ...]` kernel
per weight, as in a scanned transformer) learns a smooth regression task
with AdamW. Twice the gradients of a single block are corrupted, as a
silent data corruption on one accelerator, a bad kernel or a broken
reduction would do: at step 80 block 3's gradient is multiplied by 1e3, at
step 120 one element of each of block 5's weights becomes NaN.

`og.guard` skips both steps and trains on. Its record says what happened
and where: `stacked=` measures each of the eight layers inside the stacked
kernels, `groups=` sums each layer's kernels and biases into one entry
(`block_3`), and `zscore=True` scores each block's gradient norm against its
own history, so the spike is pinned on block 3 even though the global norm
alone cannot say where it came from. `og.MetricsLog` keeps every step's
metrics without making the host wait for the device.

  python examples/which_layer.py                     # the report
  python examples/which_layer.py --plot record.png   # and the plots

The exit status is 0 only if the guard skipped exactly the two corrupted
steps, blamed the right block for each, and the loss went down.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
from typing import Any

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

DEPTH, WIDTH, DIM, BATCH = 8, 64, 16, 128
SPIKE_STEP, SPIKE_BLOCK = 80, 3
NAN_STEP, NAN_BLOCK = 120, 5


class Block(nn.Module):
  """Pre-norm residual MLP block; `nn.scan` stacks DEPTH of them."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(4 * WIDTH)(nn.LayerNorm()(x))
    return x + nn.Dense(WIDTH)(nn.gelu(h)), None


class Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0},
                   split_rngs={"params": True},
                   length=DEPTH)(name="blocks")(x, None)
    return nn.Dense(1, name="head")(nn.LayerNorm()(x))[:, 0]


def block_of(layer: str) -> str:
  """The group of a layer: `blocks/.../kernel/3` -> `block_3`, else the
  top-level module (`embed`, `head`, `LayerNorm_0`)."""
  if layer.startswith("blocks/"):
    return "block_" + layer.rsplit("/", 1)[1]
  return layer.split("/")[0]


def batch(step: int) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.key(step), (BATCH, DIM))
  w = jax.random.normal(jax.random.key(-1), (DIM,))
  return x, jnp.tanh(x @ w) + 0.5 * jnp.sin(3 * x[:, 0])


def corrupt(grads: Any, step: jax.Array) -> Any:
  """The faults, inside the jitted step: one block's slice of every
  stacked kernel scaled by 1e3 at SPIKE_STEP, a NaN at NAN_STEP."""
  def fault(path, g):
    if jax.tree_util.keystr(path).find("blocks") < 0:
      return g
    scale = jnp.where(step == SPIKE_STEP, 1e3, 1.0).astype(g.dtype)
    g = g.at[SPIKE_BLOCK].multiply(scale)
    poison = jnp.where(step == NAN_STEP, jnp.nan, 0.0).astype(g.dtype)
    return g.at[(NAN_BLOCK,) + (0,) * (g.ndim - 1)].add(poison)
  return jax.tree_util.tree_map_with_path(fault, grads)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--plot", metavar="PNG", help="write the plots")
  args = parser.parse_args(argv)
  if args.plot and importlib.util.find_spec("matplotlib") is None:
    parser.error("--plot needs matplotlib: pip install -e '.[plot]'")
  if args.steps <= NAN_STEP:
    parser.error(f"--steps must exceed {NAN_STEP}, the last fault")

  model = Model()
  params = model.init(jax.random.key(0), batch(0)[0])["params"]

  def loss_fn(params, x, y):
    return jnp.mean(jnp.square(model.apply({"params": params}, x) - y))

  # Before training: a one-shot look at the gradients, layer by layer.
  report = og.diagnose(loss_fn, params, *batch(0), stacked=("blocks",))
  print(f"before training: {report.verdict} ({report.advice})")

  # A spike window of 64 norms: spikes are tested after 32 accepted steps.
  tx = og.guard(og.adamw(3e-3), max_norm=1.0, spike_window=64,
                stacked=("blocks",), groups=block_of, zscore=True)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, step):
    x, y = batch(step)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    grads = corrupt(grads, step)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state

  log = og.MetricsLog()
  for step in range(args.steps):
    params, opt_state = train_step(params, opt_state, step)
    log.record(opt_state, step=step)
  record = log.to_numpy()

  names = opt_state.monitor.zscores.zscores.names  # the groups, in order
  print(f"groups: {', '.join(names)}")
  skipped = np.flatnonzero(record["optim/skipped"])
  blamed = {}
  for step in skipped:
    at = {k: v[step] for k, v in record.items()}
    bad = [g for g in names if at[f"optim/last_bad_nonfinite/{g}"] > 0 and
           at["optim/last_bad_step"] == step]
    if bad:
      blamed[int(step)] = bad[0]
      why = ("non-finite gradients in " +
             ", ".join(f"{g} ({int(at[f'optim/last_bad_nonfinite/{g}'])})"
                       for g in bad))
    elif not np.isfinite(at["loss/value"]):
      blamed[int(step)] = None
      why = "the loss is not finite"
    else:
      # -1 while the blocks' z-scores still warm up (their EMAs' first
      # steps): no block to name yet.
      index = int(at["grad/spike_layer"])
      layer = names[index] if index >= 0 else None
      blamed[int(step)] = layer
      why = (f"gradient norm {at['grad/norm']:.3g} above the spike threshold "
             f"{at['grad/spike_threshold']:.3g}; " + (
                 f"the block that moved most: {layer} (z-score "
                 f"{at[f'grad/zscore/{layer}']:.3g})" if layer else
                 "the blocks' z-scores are still warming up"))
    print(f"step {step}: skipped: {why}")
  losses = record["loss/value"]
  first, last = losses[:10].mean(), losses[-10:].mean()
  print(f"loss {first:.4f} -> {last:.4f} over {args.steps} steps, "
        f"{int(record['optim/num_clipped'][-1])} clipped, "
        f"{len(skipped)} skipped")

  if args.plot:
    plot(log, args.plot)

  ok = (blamed == {SPIKE_STEP: f"block_{SPIKE_BLOCK}",
                   NAN_STEP: f"block_{NAN_BLOCK}"}
        and np.isfinite(losses).all() and last < 0.5 * first)
  print(f"{'PASS' if ok else 'FAIL'}: the guard must skip steps "
        f"{SPIKE_STEP} and {NAN_STEP}, blame block_{SPIKE_BLOCK} and "
        f"block_{NAN_BLOCK}, and train on")
  return 0 if ok else 1


def plot(log: og.MetricsLog, path: str) -> None:
  """The norm history, and the per-block norms and z-scores over the steps."""
  import matplotlib  # Only needed for --plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import optax_guard.plot  # noqa: F401  (og.plot)

  fig, axes = plt.subplots(3, 1, figsize=(9, 10))
  og.plot.history(log, ax=axes[0])
  og.plot.layer_heatmap(log, metric="grad/norm", ax=axes[1])
  og.plot.layer_heatmap(log, metric="grad/zscore", ax=axes[2])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())

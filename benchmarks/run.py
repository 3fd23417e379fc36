"""Performance harness of DESIGN §5: optimizer steps as ratios to optax.adamw.

Each contender is one jitted step, `updates, state = tx.update(grads, state,
params); params = optax.apply_updates(params, updates)`, params and state
donated (grads made once per workload, reused, not donated). On a shared, noisy
machine every figure is a ratio to bare `optax.adamw` from the same run: each
round runs every contender `--steps` times, interleaved (the order rotates),
and the round's ratio is the contender's median over the baseline's. Workloads:
(a) 50M f32 parameters in ~100 leaves; (b) a Flax linen transformer LM, f32 and
bf16; (c) 1,000 small leaves (compile time). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

try:
  import resource  # page-fault counts (POSIX)
except ImportError:
  resource = None

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import optax

try:
  import optax_guard as og
except ImportError:  # A source checkout without `pip install -e .`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_guard as og
from optax_guard import _stats as og_stats  # the statistics pass, timed alone

_clip, _adamw = optax.clip_by_global_norm, optax.adamw

# The contenders, one line each: (name, factory, name of the contender whose
# parameters must come out equal after the same steps, a sanity check). The
# first is the baseline every ratio is taken to. A contender whose factory
# raises AttributeError (an API this checkout lacks) is skipped.
CONTENDERS: list[tuple[str, Callable[[], Any], str]] = [
    ("optax.adamw", lambda: _adamw(1e-3), "optax.adamw"),
    ("optax clip+adamw", lambda: optax.chain(_clip(1.0), _adamw(1e-3)),
     "optax clip+adamw"),
    ("optax apply_if_finite", lambda: optax.apply_if_finite(
        optax.chain(_clip(1.0), _adamw(1e-3)), 5), "optax clip+adamw"),
    ("og clip+adamw", lambda: optax.chain(og.clip_by_global_norm(1.0),
                                          _adamw(1e-3)), "optax clip+adamw"),
    ("og.guard(adamw)", lambda: og.guard(_adamw(1e-3)), "optax clip+adamw"),
    ("og.monitor+adamw", lambda: optax.chain(og.monitor(), _adamw(1e-3)),
     "optax.adamw"),
    ("og.adamw", lambda: og.adamw(1e-3), "optax.adamw"),
    ("og.guard(og.adamw)", lambda: og.guard(og.adamw(1e-3)),
     "optax clip+adamw"),
]

MB = 1 << 20
ONLY: set[str] = set()  # --only: the contenders to run (with the baseline)


# --------------------------------------------------------------- workloads --


def synthetic_params(d: int, blocks: int = 24, vocab: int = 4096) -> dict:
  """(a): alternating attention-like and MLP-like blocks plus an embedding.

  At d = 576: 50.1M float32 parameters in 109 leaves.
  """
  shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d)}
  for i in range(blocks):
    if i % 2 == 0:  # qkv kernel + bias, output kernel, norm scale.
      shapes.update({f"block_{i}/qkv": (d, 3 * d), f"block_{i}/qkv_b": (3 * d,),
                     f"block_{i}/out": (d, d), f"block_{i}/scale": (d,)})
    else:  # two MLP kernels with biases, norm scale.
      shapes.update({f"block_{i}/w1": (d, 4 * d), f"block_{i}/b1": (4 * d,),
                     f"block_{i}/w2": (4 * d, d), f"block_{i}/b2": (d,),
                     f"block_{i}/scale": (d,)})
  like = {name: jax.ShapeDtypeStruct(s, jnp.float32)
          for name, s in shapes.items()}
  return normal_like(jax.random.key(0), like, scale=0.02)


class _Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(h)))


class TransformerLM(nn.Module):
  """(b): a pre-norm decoder-style LM (embedding, blocks, norm, output head)."""
  vocab: int
  d: int
  layers: int
  heads: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d)(tokens)
    for _ in range(self.layers):
      x = _Block(self.d, self.heads)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def transformer_params(vocab: int, d: int, layers: int, heads: int,
                       dtype: Any) -> Any:
  model = TransformerLM(vocab, d, layers, heads)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return jax.tree.map(lambda x: x.astype(dtype), params)


def small_leaves(n: int) -> dict:
  """(c): `n` leaves alternating (16, 16) kernels and (16,) biases."""
  return {f"layer_{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}":
          jnp.full((16, 16) if i % 2 == 0 else (16,), 0.01, jnp.float32)
          for i in range(n)}


def workloads(which: str, quick: bool) -> list[tuple[str, Callable, int]]:
  """(name, params factory, compile repetitions) for the chosen workloads."""
  lm = (dict(vocab=256, d=64, layers=1, heads=4) if quick else
        dict(vocab=8192, d=512, layers=6, heads=8))
  table = {
      "a": [("a: 50M f32" if not quick else "a: quick f32",
             lambda: (synthetic_params(32, blocks=2, vocab=256) if quick
                      else synthetic_params(576)), 1)],
      "b": [(f"b: LM {dt.__name__}",
             lambda dt=dt: transformer_params(dtype=dt, **lm), 1)
            # --quick: bf16 only (the f32 path is covered by (a) and (c)).
            for dt in ((jnp.bfloat16,) if quick else (jnp.float32,
                                                      jnp.bfloat16))],
      "c": [("c: 1000 small leaves" if not quick else "c: 10 small leaves",
             lambda: small_leaves(10 if quick else 1000), 1 if quick else 3)],
  }
  return [w for key in ("a", "b", "c") if which in (key, "all")
          for w in table[key]]


# ---------------------------------------------------------------- measures --


def make_step(tx: Any, loop: int = 1) -> Callable:
  """The training step; with `loop > 1`, that many steps in one `fori_loop`.

  On a GPU one step of (a) takes well under a millisecond, about what the
  host needs to dispatch a call with hundreds of buffers, so timing single
  calls would measure the host. `--loop` runs the steps inside one
  executable and so times the device's work alone (compile time, memory
  and HLO figures always come from the single step).
  """
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  if loop == 1:
    return step
  return lambda params, state, grads: jax.lax.fori_loop(
      0, loop, lambda _, carry: step(*carry, grads), (params, state))


def _every_statistic(g: Any) -> jax.Array:
  """A scalar that depends on every output of the statistics pass (XLA
  would drop the parts of it that nothing reads)."""
  st = og_stats.tree_stats(g, count_above=1.0)
  return (st.global_norm + jnp.sum(st.norms) +
          jnp.sum(st.nonfinite).astype(jnp.float32) +
          jnp.sum(st.count_above).astype(jnp.float32))


def bandwidth(grads: Any, rounds: int, loop: int) -> dict[str, Any]:
  """Achieved read bandwidth of the statistics pass over `grads`, in GB/s.

  Three passes, interleaved, each `loop` times in one executable (a
  loop-carried scalar multiplies the gradients, so XLA cannot hoist the
  pass out of the loop; the multiply fuses into the read): a plain sum of
  squares per leaf (the floor of any pass that reads the gradients), the
  statistics pass of `og.monitor`/`og.guard` (`tree_stats` with the count
  of elements above 1: per-layer norms, non-finite counts, the count, all
  of them used, so that XLA drops none), and a copy (read + write, counted
  as twice the bytes) for the memory ceiling, in place (its input donated:
  a fresh output buffer would add the cost of its page faults).
  """
  f32 = jnp.float32
  nbytes = sum(x.nbytes for x in jax.tree.leaves(grads))

  def reading(measure):  # `measure(tree) -> scalar`, `loop` times over grads
    def run(g):
      def body(_, c):
        out = measure(jax.tree.map(lambda x: x * c.astype(x.dtype), g))
        return jnp.minimum(c, 1.0 + jnp.abs(out))  # stays 1; depends on out
      return jax.lax.fori_loop(0, loop, body, jnp.ones((), f32))
    return jax.jit(run)

  def copying(g):  # each iteration reads and writes every leaf (negated)
    return jax.lax.fori_loop(0, loop, lambda _, t: jax.tree.map(
        lambda x: -x, t), g)

  fns: dict[str, tuple[Callable, int]] = {
      "sum of squares": (reading(lambda g: sum(
          jnp.sum(jnp.square(x.astype(f32))) for x in jax.tree.leaves(g))),
                         nbytes),
      "og statistics pass": (reading(_every_statistic), nbytes),
      "copy (read + write)": (jax.jit(copying, donate_argnums=0),
                              2 * nbytes),
  }
  donated = {"copy (read + write)"}
  fresh = lambda name: (jax.block_until_ready(jax.tree.map(jnp.copy, grads))
                        if name in donated else grads)
  times: dict[str, list[float]] = {name: [] for name in fns}
  for name, (fn, _) in fns.items():
    jax.block_until_ready(fn(fresh(name)))  # compile and warm up
  for _ in range(max(rounds, 3)):
    for name, (fn, _) in fns.items():
      g = fresh(name)  # (its copy is not timed)
      t0 = time.perf_counter()
      jax.block_until_ready(fn(g))
      times[name].append((time.perf_counter() - t0) / loop)
  out = {}
  for name, (_, moved) in fns.items():
    t = statistics.median(times[name])
    out[name] = dict(seconds=t, bytes=moved, gb_per_s=moved / t / 1e9)
  return out


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}


def hlo_counts(text: str) -> dict[str, int]:
  """Fusions, conditionals and copies (with the bytes copied) in an
  optimized HLO module (a conditional on a GPU syncs with the host)."""
  fusions = conditionals = copies = copy_bytes = 0
  for line in text.splitlines():
    if " = " not in line:
      continue
    fusions += " fusion(" in line
    conditionals += " conditional(" in line
    m = re.search(r"= (\w+)\[([\d,]*)\]\S* copy\(", line)
    if m:
      dims = [int(d) for d in m.group(2).split(",") if d]
      copies += 1
      copy_bytes += math.prod(dims) * _BYTES.get(m.group(1), 4)
  return dict(fusions=fusions, conditionals=conditionals, copies=copies,
              copy_bytes=copy_bytes)


def minor_faults() -> int | None:
  """This process's minor page faults so far (None where not counted).

  On the CPU each parameter-sized temporary of a step is a fresh
  allocation, and touching its pages for the first time costs more than a
  pass over it: the faults per step are what that costs.
  """
  return None if resource is None else resource.getrusage(
      resource.RUSAGE_SELF).ru_minflt


def memory_stats(compiled: Any) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backend without it)
    m = None
  return None if m is None else {k: getattr(m, k) for k in (
      "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
      "alias_size_in_bytes", "generated_code_size_in_bytes")
          if getattr(m, k, None) is not None}


def fetch_metrics_time(state: Any, reps: int = 5) -> dict[str, Any] | None:
  """Seconds to bring `og.metrics(state)` to the host in one `device_get`."""
  times = []
  for _ in range(1 + reps):  # The first call includes og.metrics' compile.
    t0 = time.perf_counter()
    fetched = jax.device_get(og.metrics(state))
    times.append(time.perf_counter() - t0)
    if not fetched:
      return None
  return dict(first_s=times[0], warm_s=statistics.median(times[1:]),
              num_metrics=len(fetched))


def normal_like(key: jax.Array, tree: Any, scale: float = 1.0) -> Any:
  """Standard normal leaves shaped like `tree`'s, from ONE random draw.

  One draw sliced into leaves keeps compile time flat in the number of
  leaves (a draw per leaf takes minutes to compile for 1,000 leaves).
  """
  leaves, treedef = jax.tree.flatten(tree)
  flat = scale * jax.random.normal(key, (sum(x.size for x in leaves),))
  out, start = [], 0
  for x in leaves:
    out.append(flat[start:start + x.size].reshape(x.shape).astype(x.dtype))
    start += x.size
  return jax.tree.unflatten(treedef, out)


@jax.jit
def _compare(tree: Any, ref: Any) -> tuple[jax.Array, jax.Array]:
  """(max |tree - ref| over all leaves, whether every leaf is finite)."""
  f32 = lambda x: x.astype(jnp.float32)
  diff = jnp.max(jnp.stack([jnp.max(jnp.abs(f32(x) - f32(y))) for x, y in
                            zip(jax.tree.leaves(tree), jax.tree.leaves(ref))]))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))
  return diff, finite


def run_workload(name: str, make_params: Callable, compile_reps: int,
                 rounds: int, steps: int, grad_norm: float,
                 loop: int = 1) -> dict[str, Any]:
  """Compiles, measures and times every contender on one workload.

  The gradients are normal, scaled to the global norm `grad_norm` (0: unit
  normal elements, the worst case for the monitor's count of elements
  above 1, which then reads every leaf).
  """
  # One jitted call builds a fresh parameter tree (eager ops would compile a
  # kernel per shape); each contender gets its own, since they are donated.
  make_params = jax.jit(make_params)
  like = jax.eval_shape(make_params)
  size = sum(x.size for x in jax.tree.leaves(like))
  scale = grad_norm / math.sqrt(size) if grad_norm > 0 else 1.0
  grads = jax.jit(normal_like, static_argnums=2)(jax.random.key(1),
                                                 make_params(), scale)
  leaves = jax.tree.leaves(grads)
  print(f"\n== {name}: {size / 1e6:.2f}M params in {len(leaves)} leaves, "
        f"{leaves[0].dtype}, gradient elements ~N(0, {scale:.3g}^2)",
        flush=True)
  runs: dict[str, dict[str, Any]] = {}
  for cname, factory, _ in CONTENDERS:
    if ONLY and cname not in ONLY and cname != CONTENDERS[0][0]:
      continue
    try:
      factory()
    except AttributeError as e:  # An API this checkout lacks.
      print(f"  skipped {cname}: {e}")
      continue
    params = make_params()  # A jitted init: every state leaf its own buffer.
    runs[cname] = dict(state=jax.jit(factory().init)(params), params=params,
                       compile_s=[], step_s=[], factory=factory)
  jax.block_until_ready([(r["params"], r["state"]) for r in runs.values()])

  # Compile times, interleaved; a fresh transformation and jit every time so
  # nothing comes from a cache. The last executable is the one timed.
  for _ in range(compile_reps):
    for cname, r in runs.items():
      fn = jax.jit(make_step(r["factory"]()), donate_argnums=(0, 1))
      t0 = time.perf_counter()
      r["compiled"] = fn.lower(r["params"], r["state"], grads).compile()
      r["compile_s"].append(time.perf_counter() - t0)
      print(f"  compiled {cname}: {r['compile_s'][-1]:.1f} s", flush=True)
  for cname, r in runs.items():
    r["memory"] = memory_stats(r["compiled"])
    r["hlo"] = hlo_counts(r["compiled"].as_text())
    r["state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(r["state"]))
    if loop > 1:  # Timed: `loop` steps per call (see make_step).
      r["compiled"] = jax.jit(make_step(r["factory"](), loop),
                              donate_argnums=(0, 1)).lower(
                                  r["params"], r["state"], grads).compile()

  def one_step(r: dict[str, Any]) -> float:
    faults = minor_faults()
    t0 = time.perf_counter()
    r["params"], r["state"] = r["compiled"](r["params"], r["state"], grads)
    jax.block_until_ready((r["params"], r["state"]))
    seconds = (time.perf_counter() - t0) / loop
    if faults is not None:
      r.setdefault("faults", []).append((minor_faults() - faults) / loop)
    return seconds

  for r in runs.values():  # Warm-up, untimed.
    one_step(r)
  names = list(runs)
  for k in range(rounds):
    for cname in names[k % len(names):] + names[:k % len(names)]:
      runs[cname]["step_s"].append(
          [one_step(runs[cname]) for _ in range(steps)])
    print(f"  round {k + 1}/{rounds} done", flush=True)

  baseline, med = runs[names[0]], statistics.median
  out: dict[str, Any] = {}
  for cname, _, same_as in (c for c in CONTENDERS if c[0] in runs):
    r = runs[cname]
    ratios = [med(s) / med(b) for s, b in zip(r["step_s"], baseline["step_s"])]
    c_ratios = [c / b for c, b in zip(r["compile_s"], baseline["compile_s"])]
    if same_as in runs:
      diff, finite = _compare(r["params"], runs[same_as]["params"])
    else:  # its reference was not run (--only): nothing to compare with
      _, finite = _compare(r["params"], r["params"])
      same_as, diff = None, float("nan")
    out[cname] = dict(
        step_ratio=med(ratios) if ratios else None,
        step_ratio_min=min(ratios, default=None),
        step_ratio_max=max(ratios, default=None),
        step_median_s=med([med(s) for s in r["step_s"]]) if ratios else None,
        step_s=r["step_s"], compile_s=r["compile_s"],
        compile_ratio=med(c_ratios), compile_ratio_min=min(c_ratios),
        compile_ratio_max=max(c_ratios), memory=r["memory"], hlo=r["hlo"],
        state_bytes=r["state_bytes"],
        faulted_bytes=(statistics.median(r["faults"]) * resource.getpagesize()
                       if r.get("faults") else None),
        metrics_fetch=fetch_metrics_time(
            r["state"]), params_max_abs_diff=float(diff), same_as=same_as,
        finite=bool(finite))
  runs.clear()  # Frees every contender's params, state and executable.
  out["_bandwidth"] = bandwidth(grads, rounds, loop)
  return out


# ----------------------------------------------------------------- reports --


def table(name: str, res: dict[str, Any], rounds: int, steps: int,
          loop: int = 1) -> str:
  bandwidth = res.get("_bandwidth", {})
  res = {k: v for k, v in res.items() if not k.startswith("_")}
  base = res[CONTENDERS[0][0]]
  temp = lambda r: (r["memory"] or {}).get("temp_size_in_bytes")
  cols = ["contender", "step x", "(min-max)", "compile s", "compile x",
          "temp MB", "faulted MB", "dtemp MB", "state MB", "dstate MB",
          "fusions", "conds",
          "copies (MB)", "metrics ms warm/1st (n)", "max|dp|"]
  rows = []
  for cname, r in res.items():
    t, t0 = temp(r), temp(base)
    m = r["metrics_fetch"]
    rows.append([
        cname,
        f"{r['step_ratio']:.2f}" if r["step_ratio"] else "n/a",
        (f"{r['step_ratio_min']:.2f}-{r['step_ratio_max']:.2f}"
         if r["step_ratio"] else ""),
        f"{statistics.median(r['compile_s']):.2f}",
        f"{r['compile_ratio']:.2f}",
        "n/a" if t is None else f"{t / MB:.1f}",
        "n/a" if r.get("faulted_bytes") is None
        else f"{r['faulted_bytes'] / MB:.1f}",
        "n/a" if t is None or t0 is None else f"{(t - t0) / MB:+.1f}",
        f"{r['state_bytes'] / MB:.1f}",
        f"{(r['state_bytes'] - base['state_bytes']) / MB:+.3f}",
        str(r["hlo"]["fusions"]), str(r["hlo"].get("conditionals", "")),
        f"{r['hlo']['copies']} ({r['hlo']['copy_bytes'] / MB:.1f})",
        "n/a" if m is None else f"{1e3 * m['warm_s']:.1f}/"
        f"{1e3 * m['first_s']:.0f} ({m['num_metrics']})",
        ("n/a" if r["same_as"] is None else
         f"{r['params_max_abs_diff']:.1e}") + ("" if r["finite"] else " NaN!"),
    ])
  widths = [max(len(c), *(len(row[i]) for row in rows))
            for i, c in enumerate(cols)]
  fmt = lambda row: " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths)))
  ms = base["step_median_s"]
  looped = f", {loop} steps per call" if loop > 1 else ""
  head = (f"### {name}  (baseline optax.adamw step {1e3 * ms:.3g} ms; "
          f"{rounds} rounds x {steps} steps{looped})" if ms else
          f"### {name}")
  reads = [f"{k} {v['gb_per_s']:.3g} GB/s ({1e3 * v['seconds']:.3g} ms)"
           for k, v in bandwidth.items()]
  foot = ["", "Achieved bandwidth: " + "; ".join(reads)] if reads else []
  return "\n".join([head, "", fmt(cols), "-+-".join("-" * w for w in widths)]
                   + [fmt(row) for row in rows] + foot)


def source_id() -> str:
  """`<git HEAD> src:<hash of optax_guard/*.py>`: the code that was measured."""
  src = pathlib.Path(og.__file__).parent
  digest = hashlib.sha256(b"".join(
      f.read_bytes() for f in sorted(src.glob("*.py")))).hexdigest()[:10]
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src,
                        capture_output=True, text=True).stdout.strip()
  return f"{head or '?'} src:{digest}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workload", choices="a b c all".split(), default="all")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/latest.json")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and 2x2 rounds: a smoke test")
  parser.add_argument("--grad-norm", type=float, default=2.0,
                      help="global norm of the synthetic gradients (a typical "
                      "pre-clip norm); 0 for unit normal elements")
  parser.add_argument("--loop", type=int, default=1,
                      help="steps per timed call, run in one fori_loop (use "
                      "~20 on a GPU, where one call's dispatch outlasts a "
                      "step)")
  parser.add_argument("--only", default="",
                      help="comma-separated contender names to run (the "
                      "baseline always runs)")
  args = parser.parse_args()
  ONLY.update(n.strip() for n in args.only.split(",") if n.strip())
  if unknown := sorted(ONLY - {c[0] for c in CONTENDERS}):
    parser.error(f"unknown contenders {unknown}; the contenders are "
                 f"{[c[0] for c in CONTENDERS]}")
  if args.quick:
    args.rounds, args.steps = min(args.rounds, 2), min(args.steps, 2)

  report: dict[str, Any] = dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      argv=sys.argv[1:], source=source_id(), optax_guard=og.__version__,
      jax=jax.__version__, jaxlib=jaxlib.__version__, optax=optax.__version__,
      flax=flax.__version__, python=platform.python_version(),
      device_kind=jax.devices()[0].device_kind, platform=jax.default_backend(),
      cpu_count=os.cpu_count(), rounds=args.rounds, steps=args.steps,
      grad_norm=args.grad_norm, loop=args.loop,
      quick=args.quick, workloads={}, tables={})
  for name, make, compile_reps in workloads(args.workload, args.quick):
    t0 = time.perf_counter()
    res = run_workload(name, make, compile_reps, args.rounds, args.steps,
                       args.grad_norm, args.loop)
    print(f"  ({name}: {time.perf_counter() - t0:.0f} s)")
    report["workloads"][name] = res
    report["tables"][name] = table(name, res, args.rounds, args.steps,
                                   args.loop)
    print("\n" + report["tables"][name], flush=True)

  if source_id().split()[1] != report["source"].split()[1]:  # Edited since.
    report["source_at_end"] = source_id()
    print(f"\nNote: optax_guard's files changed during the run (now "
          f"{report['source_at_end']}); the figures are for the version "
          f"imported at the start, {report['source']}.")
  print(f"\noptax_guard {report['source']}, jax {jax.__version__}, optax "
        f"{optax.__version__}, {report['device_kind']}, {os.cpu_count()} "
        f"CPUs, {report['date']}\n")
  print("\n\n".join(report["tables"].values()))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()

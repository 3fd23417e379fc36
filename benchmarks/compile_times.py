"""Compile time on workload (c), one compile per fresh process, interleaved.

`run.py` compiles every contender in one process, where this machine's
compile times drift by a fifth or more within a run. Here each compile is a
new Python process that builds the contender, lowers and compiles its step
once (nothing cached) and prints the seconds; the contenders take turns
(the order rotates each round) and each round's ratio is the contender's
time over the baseline's in the same round. Prints the median ratio with
min/max and the median seconds, and writes them as JSON.

    python benchmarks/compile_times.py [--rounds 6] [--leaves 1000]
        [--only "og.guard(og.adamw),og.adamw"] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def compile_once(name: str, leaves: int) -> float:
  """Seconds to lower and compile contender `name` in this process."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(HERE))
  import run as harness  # pylint: disable=g-import-not-at-top

  factory = dict((c[0], c[1]) for c in harness.CONTENDERS)[name]
  params = jax.jit(lambda: harness.small_leaves(leaves))()
  state = jax.jit(factory().init)(params)
  fn = jax.jit(harness.make_step(factory()), donate_argnums=(0, 1))
  start = time.perf_counter()
  fn.lower(params, state, params).compile()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--leaves", type=int, default=1000)
  parser.add_argument("--only", default="og.guard(og.adamw),og.adamw",
                      help="comma-separated contenders of run.py (the "
                      "baseline, its first, is always measured)")
  parser.add_argument("--out", default="benchmarks/results/compile.json")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    print(compile_once(args.child, args.leaves))
    return

  sys.path.insert(0, str(HERE))
  import run as harness  # pylint: disable=g-import-not-at-top
  base = harness.CONTENDERS[0][0]
  names = [base] + [n for n in args.only.split(",") if n and n != base]
  known = {c[0] for c in harness.CONTENDERS}
  if unknown := [n for n in names if n not in known]:
    raise SystemExit(f"Unknown contenders {unknown}; run.py has {sorted(known)}.")
  seconds: dict[str, list[float]] = {n: [] for n in names}
  for k in range(args.rounds):
    for name in names[k % len(names):] + names[:k % len(names)]:
      out = subprocess.run(
          [sys.executable, __file__, "--child", name,
           "--leaves", str(args.leaves)],
          check=True, capture_output=True, text=True).stdout
      seconds[name].append(float(out.split()[-1]))
      print(f"  round {k}: {name} {seconds[name][-1]:.1f} s", flush=True)
  rows = {}
  for name in names:
    ratios = [s / b for s, b in zip(seconds[name], seconds[base])]
    rows[name] = dict(seconds=seconds[name], ratios=ratios,
                      median_ratio=statistics.median(ratios),
                      median_s=statistics.median(seconds[name]))
  print(f"\ncompile time, {args.leaves} leaves, {args.rounds} rounds, "
        f"one fresh process per compile; ratio to {base} of the same round")
  print(f"{'contender':<24} {'ratio (min-max)':<20} median s")
  for name, r in rows.items():
    print(f"{name:<24} {r['median_ratio']:.2f} ({min(r['ratios']):.2f}-"
          f"{max(r['ratios']):.2f})      {r['median_s']:.1f}")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(
      dict(leaves=args.leaves, rounds=args.rounds, rows=rows), indent=1))


if __name__ == "__main__":
  main()

"""Two JAX processes (hosts) of 4 CPU devices each, one 8-device mesh.

The test starts this file twice as a script (`jax.distributed` over a local
coordinator, CPU collectives over gloo); each process runs the same training
steps and writes what it read back with `og.metrics`, `og.MetricsLog` and
`og.check` as JSON. The test then checks that both processes read the same
thing and that it is right, against NumPy and optax on the full arrays. The
bad gradient element lives on a device of process 1 only, so process 0 can
only know about it through the cross-device reduction.

Two set-ups, the two ways a multi-host step is written:
- `shard_map` data parallelism: parameters replicated, each device its own
  slice of the batch, `og.guard(..., axis_name="d")`;
- `jit` with `NamedSharding` (fully sharded parameters): the kernel and its
  gradient split over the 8 devices, no `axis_name`; with the guard-aware
  `og.adamw` and with `optax.adamw` (the generic path).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile

import numpy as np

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
NUM_DEVICES = NUM_PROCESSES * LOCAL_DEVICES
STEPS = 3          # good, bad, good
BAD_STEP = 1
LR, MAX_NORM = 0.1, 1.0

# The data-parallel batch: 16 rows, two per device; row 11 is device 5's.
DP_BAD_ROW = 11
# The sharded kernel: 16 rows, two per device; row 13 is device 6's.
FS_BAD_ROW = 13


def _dp_data():
  rng = np.random.default_rng(0)
  params = {"b": rng.normal(size=(3,)).astype(np.float32),
            "w": rng.normal(size=(4, 3)).astype(np.float32)}
  xs = rng.normal(size=(STEPS, 16, 4)).astype(np.float32)
  ys = rng.normal(size=(STEPS, 16, 3)).astype(np.float32)
  xs[BAD_STEP, DP_BAD_ROW, 2] = np.nan
  return params, xs, ys


def _fs_data():
  rng = np.random.default_rng(1)
  params = {"bias": rng.normal(size=(4,)).astype(np.float32),
            "kernel": rng.normal(size=(16, 4)).astype(np.float32)}
  grads = [{k: (3.0 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in params.items()} for _ in range(STEPS)]
  grads[BAD_STEP]["kernel"][FS_BAD_ROW, 1] = np.inf
  return params, grads


# ------------------------------------------------------------ the worker


def _worker(process_id: int, port: int, out_path: str) -> None:
  """One process: runs both set-ups and writes what it read back."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=NUM_PROCESSES,
                             process_id=process_id)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_guard as og  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == NUM_PROCESSES
  assert jax.device_count() == NUM_DEVICES
  mesh = Mesh(np.array(jax.devices()), ("d",))

  def put(x, spec):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                        lambda index: x[index])

  def full(tree):
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
        tree)

  def check_message(state):
    try:
      og.check(state)
    except og.GuardError as e:
      return type(e).__name__, str(e)
    return None

  def run(step, params, state, inputs):
    out = {"metrics": [], "check": [], "params": [], "replicated": []}
    log = og.MetricsLog()
    for t in range(STEPS):
      params, state = step(params, state, *inputs(t))
      # Replicated statistics are read from this process's own copy (no
      # collective), so a process may read them alone.
      out["replicated"].append(all(
          x.sharding.is_fully_replicated for x in
          jax.tree.leaves(og._metrics.statistics(state))))  # pylint: disable=protected-access
      metrics = og.metrics(state)
      assert all(isinstance(v, (np.ndarray, np.generic))
                 for v in metrics.values())
      out["metrics"].append({k: v.tolist() for k, v in metrics.items()})
      out["check"].append(check_message(state))
      out["params"].append({k: v.tolist() for k, v in full(params).items()})
      log.record(state, step=t)
    out["log"] = {k: v.tolist() for k, v in log.to_numpy().items()}
    return out

  result = {"process": jax.process_index(),
            "bad_dp_process": mesh.devices[DP_BAD_ROW // 2].process_index,
            "bad_fs_process": mesh.devices[FS_BAD_ROW // 2].process_index}

  # shard_map, data parallel: jax.grad of the replicated parameters is
  # invariant (summed over the devices' batches).
  params, xs, ys = _dp_data()
  tx = og.guard(og.adamw(LR), max_norm=MAX_NORM, axis_name="d")

  def dp_step(p, s, x, y):
    def loss(p):
      return 0.5 * jnp.sum(jnp.square(x @ p["w"] + p["b"] - y))
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  dp = jax.jit(jax.shard_map(dp_step, mesh=mesh,
                             in_specs=(P(), P(), P("d"), P("d")),
                             out_specs=(P(), P())),
               donate_argnums=(0, 1))
  p0 = {k: put(v, P()) for k, v in params.items()}
  s0 = jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(p0)
  result["shard_map"] = run(
      dp, p0, s0, lambda t: (put(xs[t], P("d")), put(ys[t], P("d"))))

  # jit with NamedSharding: the kernel split over the devices, row-wise.
  params, grads = _fs_data()
  specs = {"bias": P(), "kernel": P("d")}
  for name, inner in (("sharded_og_adamw", og.adamw(LR)),
                      ("sharded_optax_adamw", optax.adamw(LR))):
    tx = og.guard(inner, max_norm=MAX_NORM)

    def fs_step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p0 = {k: put(v, specs[k]) for k, v in params.items()}
    # The moments sharded like the kernel (as a user's out_shardings would
    # say); the statistics replicated.
    shardings = jax.tree.map(
        lambda x: NamedSharding(
            mesh, P("d") if x.shape == params["kernel"].shape else P()),
        jax.eval_shape(tx.init, p0))
    s0 = jax.jit(tx.init, out_shardings=shardings)(p0)
    # The moments are sharded like the kernel: no process holds them whole.
    assert not optax.tree.get(s0, "mu")["kernel"].is_fully_addressable
    result[name] = run(
        jax.jit(fs_step, donate_argnums=(0, 1)), p0, s0,
        lambda t: ({k: put(v, specs[k]) for k, v in grads[t].items()},))

  # The guide's explicit-mesh set-up: the step and `jax.jit(tx.init)` under
  # `jax.set_mesh`. Beside it, a `MetricsLog` of the same states with
  # every per-layer statistic split over an axis that crosses the
  # processes, as a rule such as "shard dim 0 where it divides" would.
  across = NamedSharding(
      Mesh(np.array(jax.devices()).reshape(NUM_PROCESSES, LOCAL_DEVICES),
           ("host", "local")), P("host"))
  layers = len(params)

  def split(state):
    return jax.tree.map(
        lambda x: jax.device_put(x, across) if x.shape == (layers,) else x,
        state)

  tx = og.guard(og.adamw(LR), max_norm=MAX_NORM)

  def mesh_step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  with jax.set_mesh(mesh):
    p = {k: put(v, specs[k]) for k, v in params.items()}
    state = jax.jit(tx.init)(p)
    step = jax.jit(mesh_step, donate_argnums=(0, 1))
    log, split_log, split_metrics = og.MetricsLog(), og.MetricsLog(), []
    for t in range(STEPS):
      p, state = step(p, state,
                      {k: put(v, specs[k]) for k, v in grads[t].items()})
      log.record(state, step=t)
      split_state = split(state)
      assert not all(x.is_fully_addressable
                     for x in jax.tree.leaves(split_state))
      split_log.record(split_state, step=t)
      split_metrics.append(
          {k: v.tolist() for k, v in og.metrics(split_state).items()})
  result["set_mesh"] = {
      "log": {k: v.tolist() for k, v in log.to_numpy().items()},
      "split_log": {k: v.tolist() for k, v in split_log.to_numpy().items()},
      "split_metrics": split_metrics}

  with open(out_path, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


# ------------------------------------------------------------ the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_processes(background):
  """Starts the two processes (when the session begins); returns each one
  with the path of the JSON it will write."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"}
  out_dir = tempfile.mkdtemp(prefix="multihost")
  port = _free_port()
  started = []
  for i in range(NUM_PROCESSES):
    out = os.path.join(out_dir, f"process_{i}.json")
    started.append((background(
        [sys.executable, os.path.abspath(__file__), str(i), str(port), out],
        env=env), out))
  return started


import pytest  # noqa: E402  (the worker above needs no pytest)

pytestmark = pytest.mark.start_early(launch=_start_processes)


@pytest.fixture
def results(started):
  done = [background.result(timeout=300) for background, _ in started]
  for i, result in enumerate(done):
    assert result.returncode == 0, (
        f"process {i} failed:\n{(result.stdout + result.stderr)[-4000:]}")
  out = []
  for _, path in started:
    with open(path) as f:
      out.append(json.load(f))
  return out


def _np_norm(tree) -> float:
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64))))
                       for v in tree.values()))


def _reference(params, grads):
  """optax's clip + adamw on the full gradients, with the bad step skipped
  (parameters and moments kept), in float32 on this process."""
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.adamw(LR))
  state = tx.init(params)
  out = []
  for t, g in enumerate(grads):
    if t != BAD_STEP:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    out.append({k: np.asarray(v) for k, v in params.items()})
  return out


def _dp_grads(params, x, y):
  """The data-parallel gradient, summed over the whole batch, float64."""
  w, b = (params[k].astype(np.float64) for k in ("w", "b"))
  r = x.astype(np.float64) @ w + b - y
  return {"b": r.sum(0), "w": x.T.astype(np.float64) @ r}


def test_both_processes_read_the_same_and_the_bad_element_is_remote(results):
  first, second = results
  assert (first["process"], second["process"]) == (0, 1)
  # The bad element is on a device of process 1: process 0 sees it only
  # through the reduction across hosts.
  assert first["bad_dp_process"] == first["bad_fs_process"] == 1
  for setup in ("shard_map", "sharded_og_adamw", "sharded_optax_adamw",
                "set_mesh"):
    assert first[setup] == second[setup], setup


@pytest.mark.standard_promotion  # the reference runs optax's own adamw
@pytest.mark.parametrize(
    "setup", ["shard_map", "sharded_og_adamw", "sharded_optax_adamw"])
def test_bad_step_is_skipped_everywhere_and_good_steps_match_optax(
    results, setup):
  got = results[0][setup]
  if setup == "shard_map":
    params, xs, ys = _dp_data()
    grads, p = [], params
    for t in range(STEPS):
      # The gradient at each step's parameters (the run's own, checked below).
      g = _dp_grads(p, xs[t], ys[t])
      grads.append(g)
      if t != BAD_STEP:
        p = {k: np.asarray(v, np.float32) for k, v in
             got["params"][t].items()}
    grads32 = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads]
  else:
    params, grads = _fs_data()
    grads32 = grads
  want = _reference(params, grads32)
  for t in range(STEPS):
    m = got["metrics"][t]
    assert m["optim/skipped"] == (t == BAD_STEP)
    assert m["optim/num_skipped"] == (1 if t >= BAD_STEP else 0)
    for k, v in want[t].items():
      np.testing.assert_allclose(got["params"][t][k], v, rtol=2e-5, atol=1e-6,
                                 err_msg=f"{setup} {k} at step {t}")
    if t != BAD_STEP:
      assert got["check"][t] is None
      norm = _np_norm(grads[t])
      assert m["grad/norm"] == pytest.approx(norm, rel=1e-5)
      assert m["grad/norm_clipped"] == pytest.approx(min(norm, MAX_NORM),
                                                     rel=1e-5)
  # The skipped step left the parameters exactly as they were.
  assert got["params"][BAD_STEP] == got["params"][BAD_STEP - 1]
  bad = got["metrics"][BAD_STEP]
  counts = _np_bad_counts(setup)
  assert sum(counts.values()) > 0
  assert bad["grad/nonfinite"] == sum(counts.values())
  for layer, count in counts.items():
    assert bad[f"grad/nonfinite/{layer}"] == count, layer


def _np_bad_counts(setup) -> dict[str, int]:
  """NaN/Inf elements per layer of the bad step's full gradient (NumPy)."""
  if setup == "shard_map":
    params, xs, ys = _dp_data()
    grads = _dp_grads(params, xs[BAD_STEP], ys[BAD_STEP])
  else:
    grads = _fs_data()[1][BAD_STEP]
  return {k: int(np.sum(~np.isfinite(v))) for k, v in sorted(grads.items())}


@pytest.mark.parametrize(
    "setup", ["shard_map", "sharded_og_adamw", "sharded_optax_adamw"])
def test_check_and_metrics_log_work_on_every_process(results, setup):
  for result in results:
    got = result[setup]
    kind, message = got["check"][BAD_STEP]
    layers = ", ".join(f"{k} ({n} NaN/Inf)"
                       for k, n in _np_bad_counts(setup).items() if n)
    assert kind == "NonFiniteGradientError"
    assert message == (
        f"Step {BAD_STEP}: non-finite gradients; first bad layers: {layers}. "
        "The guard skipped the step (1 bad in a row, 1 skipped in total).")
    assert got["replicated"] == [True] * STEPS
    log = got["log"]
    assert log["step"] == list(range(STEPS))
    assert log["optim/skipped"] == [t == BAD_STEP for t in range(STEPS)]
    assert log["grad/norm"] == [m["grad/norm"] for m in got["metrics"]]


def test_metrics_log_records_under_set_mesh_and_split_statistics(results):
  """The run of `sharded_og_adamw` again, under `jax.set_mesh`: its record
  is that run's (checked against optax above), and so is the record and
  `og.metrics` of the same states with the per-layer statistics split
  across the processes (a jitted copy refused both: it wanted the mesh's
  devices, or one set of devices for this process's copies and the split
  arrays)."""
  for result in results:
    got, want = result["set_mesh"], result["sharded_og_adamw"]
    assert got["log"] == want["log"]
    assert got["split_log"] == want["log"]
    assert got["split_metrics"] == want["metrics"]


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

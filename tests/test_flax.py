"""Round trips through Flax linen `TrainState`, nnx `Optimizer` and Orbax."""

import pathlib
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

flax = pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402


_IMPORT_CHECK = (
    "import sys, optax_guard; "
    "bad = [m for m in ('flax', 'chex', 'matplotlib') if m in sys.modules]; "
    "print(','.join(bad))")


def _python(code, *args):
  """A `start_early` launch function: `python -c code args`."""
  return lambda background: background([sys.executable, "-c", code, *args])


@pytest.mark.start_early(launch=_python(_IMPORT_CHECK))
def test_import_pulls_in_no_optional_dependency(started):
  result = started.result()
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout.strip()
  assert out == "", f"importing optax_guard imported {out}"


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(8)(x))
    return nn.Dense(1)(x)


def _tx():
  return optax.chain(og.monitor(), og.clip_by_global_norm(0.5),
                     optax.sgd(0.1))


def test_linen_train_state_round_trip():
  model = _Mlp()
  x = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=_tx())

  @jax.jit
  def step(state):
    def loss_fn(p):
      return jnp.mean(jnp.square(state.apply_fn({"params": p}, x) - 10.0))
    grads = jax.grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), grads

  state, grads = step(state)
  m = og.metrics(state.opt_state)
  want = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                     for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(m["grad/norm"], want, rtol=1e-5)
  np.testing.assert_allclose(m["grad/norm/Dense_0/kernel"],
                             np.linalg.norm(grads["Dense_0"]["kernel"]),
                             rtol=1e-5)
  assert int(m["optim/num_clipped"]) == int(want > 0.5)


@pytest.mark.parametrize("inner", [
    og.adamw, pytest.param(optax.adamw, marks=pytest.mark.standard_promotion)])
def test_flax_serialization_round_trip_of_a_guarded_train_state(inner):
  """`flax.serialization.to_bytes`/`from_bytes` (linen's own checkpoint
  format) keep a guarded state with per-layer statistics bit for bit, and
  training goes on from it as without the round trip."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  model = _Mlp()
  x = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  tx = og.guard(inner(0.1), zscore=True, histogram=True,
                spike_warmup_steps=2)
  create = lambda: train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state, scale):
    grads = jax.grad(lambda p: jnp.mean(jnp.square(
        state.apply_fn({"params": p}, x) - 10.0)))(state.params)
    return state.apply_gradients(
        grads=jax.tree.map(lambda g: g * scale, grads))

  state = create()
  for scale in (1.0, np.nan, 1.0):
    state = step(state, scale)
  restored = serialization.from_bytes(create(), serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
  for scale in (1.0, 1e6, 1.0):
    state, restored = step(state, scale), step(restored, scale)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.array_equal(a, b, equal_nan=True)
  m = og.metrics(restored.opt_state)
  assert int(m["optim/num_skipped"]) == 1 and int(m["optim/num_spikes"]) == 1


_FLAX_IMPORTED_AFTER = (
    "import sys, jax, jax.numpy as jnp, numpy as np, optax_guard as og\n"
    "assert 'flax' not in sys.modules\n"
    "tx = og.guard(og.adamw(0.1), zscore=True)\n"
    "p = {'Dense_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}\n"
    "s = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)[1]\n"
    "from flax import serialization\n"
    "r = serialization.from_bytes(tx.init(p), serialization.to_bytes(s))\n"
    "assert jax.tree.structure(r) == jax.tree.structure(s)\n"
    "assert all(np.array_equal(a, b) for a, b in\n"
    "           zip(jax.tree.leaves(r), jax.tree.leaves(s)))\n"
    "print('ok')\n")


@pytest.mark.start_early(launch=_python(_FLAX_IMPORTED_AFTER))
def test_flax_serialization_imported_after_the_state_is_built(started):
  """Flax imported only after optax_guard built a state (a notebook's
  order): `to_bytes`/`from_bytes` still know our pytree nodes."""
  result = started.result(timeout=300)
  assert result.stdout.strip() == "ok", result.stderr[-2000:]


_FAKE_FLAX = {  # a stand-in Flax, served from a zip by one shared importer
    "flax/__init__.py": "from flax import serialization, other\n",
    "flax/other.py": "X = 1\n",
    "flax/serialization.py": (
        "registered = []\n"
        "def register_serialization_state(ty, to, frm):\n"
        "  registered.append(ty.__name__)\n"),
}


_FLAX_HOOK_CHECK = (
    "import sys, warnings\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import optax_guard\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "  warnings.simplefilter('always')\n"
    "  import flax, flax.serialization\n"
    "print(getattr(flax.serialization, 'registered', None),\n"
    "      getattr(getattr(flax, 'other', None), 'X', None),\n"
    "      [str(w.message)[:60] for w in caught])\n")


def _start_fake_flaxes(background):
  """A zipped stand-in Flax and a broken one, each imported after us."""
  import zipfile  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(tempfile.mkdtemp(prefix="fake_flax"))
  archive = root / "fake_flax.zip"
  with zipfile.ZipFile(archive, "w") as z:
    for name, text in _FAKE_FLAX.items():
      z.writestr(name, text)
  broken = root / "broken"
  (broken / "flax").mkdir(parents=True)
  (broken / "flax" / "__init__.py").write_text("")
  (broken / "flax" / "serialization.py").write_text("")
  return [_python(_FLAX_HOOK_CHECK, str(where))(background)
          for where in (archive, broken)]


@pytest.mark.start_early(launch=_start_fake_flaxes)
def test_the_flax_hook_wraps_only_flax_serialization(started):
  """The import hook wraps the loader of `flax.serialization` alone: a zip
  importer shared by every module of the package still imports the others,
  and a Flax without the registration function gets a warning, not an
  ImportError."""
  zipped, broken = (background.result(timeout=300) for background in started)
  assert zipped.stdout.strip() == "['PerLayer', 'Naming'] 1 []", (
      zipped.stdout + zipped.stderr[-2000:])
  assert broken.returncode == 0, broken.stderr[-2000:]
  assert broken.stdout.strip() == (
      "None None ['optax_guard could not register its state types with "
      "flax.ser']"
  ), broken.stdout


class _NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 8, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_optimizer_round_trip_with_loss():
  model = _NnxMlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  x = jnp.ones((4, 3), jnp.float32)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return jnp.mean(jnp.square(m(x) - 10.0))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, loss=loss)
    return loss, grads

  loss, grads = step(model, optimizer)
  for m in (og.metrics(optimizer.opt_state),
            og.metrics(nnx.as_pure(optimizer.opt_state))):
    np.testing.assert_allclose(m["loss/value"], loss, rtol=1e-6)
    np.testing.assert_allclose(m["grad/norm/hidden/kernel"],
                               np.linalg.norm(grads["hidden"]["kernel"][...]),
                               rtol=1e-5)
    assert "param/norm/out/bias" in m
  log = og.MetricsLog()
  log.record(optimizer.opt_state)
  recorded = log.to_numpy()
  for name, value in og.metrics(optimizer.opt_state).items():
    np.testing.assert_array_equal(recorded[name], [value], err_msg=name)
  # `nnx.state(optimizer)` holds the states as plain mappings: nothing to
  # read there, and og.metrics says so rather than returning {} silently.
  with pytest.warns(UserWarning, match=(
      r"^og\.metrics found optax_guard states turned into plain mappings in "
      r"`opt_state`.*with Flax nnx, `optimizer\.opt_state`, not "
      r"`nnx\.state\(optimizer\)`")):
    assert og.metrics(nnx.state(optimizer)) == {}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an optimizer without statistics: quiet
    assert og.metrics(optax.adam(1e-3).init({"w": jnp.ones(2)})) == {}


def test_orbax_restore_against_init(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {"Dense_0": {"kernel": jnp.ones((3, 2), jnp.float32)}}
  tx = optax.chain(og.monitor(histogram=True), og.clip_by_global_norm(1.0),
                   optax.sgd(0.1))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(lambda p: p * 3, params), state, params)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "state", tx.init(params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  before, after = og.metrics(state), og.metrics(restored)
  assert set(before) == set(after)
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


def test_gradient_norm_penalty_takes_an_nnx_grad_fn():
  """nnx.Optimizer passes pure parameters; an nnx `grad_fn` returns the
  gradients in Param nodes: the same leaves, and the same result as the
  pure form."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
  loss = lambda m: jnp.mean((m(x) - y) ** 2)
  graphdef, _ = nnx.split(model)
  tx = optax.chain(og.add_gradient_norm_penalty(0.1), optax.sgd(0.1))
  results = []
  for wrap in (lambda s: s, nnx.as_pure):
    m = nnx.clone(model)
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    opt.update(m, nnx.grad(loss)(m),
               grad_fn=lambda p: wrap(nnx.grad(loss)(nnx.merge(graphdef, p))))
    results.append(jax.tree.leaves(nnx.as_pure(nnx.state(m, nnx.Param))))
  jax.tree.map(np.testing.assert_array_equal, *results)
  assert not np.array_equal(results[0][0], jax.tree.leaves(
      nnx.as_pure(nnx.state(model, nnx.Param)))[0])


def test_flax_restore_of_another_layout_of_layers_is_refused():
  """`from_bytes` checks no shapes: 4 rows saved with `stacked=` (3 layers
  and the head) were restored into 2 names, and `og.metrics` filed one
  stacked layer's norm under `head` before the first update failed to
  broadcast."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  params = {"blocks": {"kernel": jnp.ones((3, 2))}, "head": jnp.ones(2)}
  saved = og.guard(optax.sgd(0.1), stacked=("blocks",)).init(params)
  with pytest.raises(ValueError, match=(
      r"The saved state holds 4 rows of per-layer statistics where the "
      r"target has 2 \(\['blocks/kernel', 'head'\]\); the state was made by "
      r"a transformation built otherwise")):
    serialization.from_bytes(og.guard(optax.sgd(0.1)).init(params),
                             serialization.to_bytes(saved))

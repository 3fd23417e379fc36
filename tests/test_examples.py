"""The example scripts run and reach their verdicts (their own checks, with
fewer steps): each exits 0 only if the failure it demonstrates happened and
the cure worked. They run as a user runs them, as scripts, started when the
session begins (`start_early` in conftest.py)."""

import importlib.util
import pathlib
import sys

import pytest

_EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _constants(name):
  """The example's module, imported without running it (for its constants)."""
  spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _script(name, *args):
  return lambda background: background(
      [sys.executable, str(_EXAMPLES / f"{name}.py"), *args])


_WHICH_LAYER = _constants("which_layer")


@pytest.mark.start_early(launch=_script("quickstart", "--steps", "30",
                                 "--log-every", "10"))
def test_quickstart_unguarded_diverges_guarded_trains(started):
  result = started.result()
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  assert "og.check: Step " in result.stdout
  assert "first bad layers: " in result.stdout
  assert "PASS" in result.stdout


@pytest.mark.start_early(launch=_script("which_layer", "--steps",
                                 str(_WHICH_LAYER.NAN_STEP + 10)))
def test_which_layer_blames_the_corrupted_blocks(started):
  example = _WHICH_LAYER
  result = started.result()
  out = result.stdout
  assert result.returncode == 0, (out + result.stderr)[-4000:]
  assert (f"step {example.SPIKE_STEP}: skipped: gradient norm" in out and
          f"the block that moved most: block_{example.SPIKE_BLOCK} " in out)
  assert (f"step {example.NAN_STEP}: skipped: non-finite gradients in "
          f"block_{example.NAN_BLOCK} " in out)


@pytest.mark.parametrize("flag", ["--steps", "--log-every"])
def test_quickstart_refuses_a_count_below_one(flag, capsys):
  """`--steps 0` was an IndexError, `--log-every 0` a ZeroDivisionError."""
  with pytest.raises(SystemExit) as exit_info:
    _constants("quickstart").main([flag, "0"])
  assert exit_info.value.code == 2
  assert ("--steps and --log-every must be at least 1"
          in capsys.readouterr().err)


@pytest.mark.parametrize("argv,message", [
    (["--max-norm", "0"], "`max_norm` must be a finite real number > 0"),
    (["--lr", "nan"], "`learning_rate` must be a finite real number >= 0")])
def test_quickstart_refuses_a_bad_number_before_training(argv, message,
                                                         capsys):
  """A bad `--max-norm` or `--lr` came as a traceback, after the unguarded
  run had trained."""
  with pytest.raises(SystemExit) as exit_info:
    _constants("quickstart").main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr()
  assert message in err.err and "== unguarded ==" not in err.out

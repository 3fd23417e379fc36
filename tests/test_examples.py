"""The example scripts run and reach their verdicts (their own checks, with
fewer steps): each exits 0 only if the failure it demonstrates happened and
the cure worked."""

import importlib.util
import pathlib
import sys

import pytest

_EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.standard_promotion  # flax's own layers mix dtypes
def test_quickstart_unguarded_diverges_guarded_trains(capsys):
  assert _load("quickstart").main(["--steps", "30", "--log-every", "10"]) == 0
  out = capsys.readouterr().out
  assert "og.check: Step " in out and "first bad layers: " in out
  assert "PASS" in out


@pytest.mark.standard_promotion
def test_which_layer_blames_the_corrupted_blocks(capsys):
  example = _load("which_layer")
  assert example.main(["--steps", str(example.NAN_STEP + 10)]) == 0
  out = capsys.readouterr().out
  assert (f"step {example.SPIKE_STEP}: skipped: gradient norm" in out and
          f"the block that moved most: block_{example.SPIKE_BLOCK} " in out)
  assert (f"step {example.NAN_STEP}: skipped: non-finite gradients in "
          f"block_{example.NAN_BLOCK} " in out)

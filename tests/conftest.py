"""Test set-up: 8 CPU devices and strict dtype promotion, before JAX starts."""

import os

# LLVM's optimisation level 0: the suite compiles ~2,000 small programs, and
# code generation is most of each compile. It changes neither the optimized
# HLO (which the tests of copies and temporaries read) nor any result: XLA
# emits float arithmetic without fast-math flags, so LLVM may not reorder it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "standard_promotion: run under JAX's standard dtype "
      "promotion, for tests that trace optax's own optimizers (optax's adam "
      "mixes Python floats with int32 counts, which strict promotion rejects)")


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
  """Our code must be explicit about dtypes: trace every test strictly."""
  mode = ("standard" if request.node.get_closest_marker("standard_promotion")
          else "strict")
  with jax.numpy_dtype_promotion(mode):
    yield

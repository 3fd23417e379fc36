"""Test set-up: 8 CPU devices and strict dtype promotion, before JAX starts."""

import os
import subprocess
import tempfile

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
  config.addinivalue_line(
      "markers", "start_early(launch): start the test's subprocesses when the "
      "session begins (`launch(Background)`; the test's `started` "
      "fixture gives back what it returned)")


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
  """Our code must be explicit about dtypes: trace every test strictly."""
  mode = ("standard" if request.node.get_closest_marker("standard_promotion")
          else "strict")
  with jax.numpy_dtype_promotion(mode):
    yield


# ------------------------------------------------ subprocesses started early
#
# A few tests run a whole Python process (64-bit mode, two JAX hosts, the
# example scripts, a fresh import). This process keeps only about 1.3 of the
# 2 cores busy while it compiles, so those subprocesses start together when
# the session begins and run on what is left; each test then waits for its own.


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Background:
  """A subprocess started in the background, its output kept in files (a
  pipe that nobody reads until the end could fill and stall it)."""

  def __init__(self, args, env=None):
    env = dict(os.environ if env is None else env)  # this checkout first
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    self._out = tempfile.TemporaryFile("w+")
    self._err = tempfile.TemporaryFile("w+")
    self._proc = subprocess.Popen(args, env=env, stdout=self._out,
                                  stderr=self._err, text=True)
    # The lowest priority: the tests of this process keep theirs, and this
    # one takes the time their compiles leave idle. (Not `preexec_fn`: a
    # fork that runs Python in a multithreaded JAX process can deadlock.)
    if hasattr(os, "setpriority"):
      try:
        os.setpriority(os.PRIO_PROCESS, self._proc.pid, 19)
      except OSError:  # already gone, or not permitted: run as it is
        pass
    _RUNNING.append(self)

  def result(self, timeout=600) -> subprocess.CompletedProcess:
    """Waits for the process and returns its exit status and output."""
    try:
      self._proc.wait(timeout)
    finally:
      self.kill()
    self._out.seek(0)
    self._err.seek(0)
    return subprocess.CompletedProcess(self._proc.args, self._proc.returncode,
                                       self._out.read(), self._err.read())

  def kill(self):
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()

  def close(self):
    self.kill()
    self._out.close()
    self._err.close()


_RUNNING = []  # every Background, killed when the session ends
_STARTED = {}  # launch function -> what it returned


def _start(launch):
  if launch not in _STARTED:
    try:
      _STARTED[launch] = launch(Background)
    except Exception as e:  # pylint: disable=broad-except
      _STARTED[launch] = e  # fails its own tests, not the session
  if isinstance(_STARTED[launch], Exception):
    raise _STARTED[launch]
  return _STARTED[launch]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(items):
  for item in items:
    for marker in item.iter_markers("start_early"):
      try:
        _start(marker.kwargs["launch"])
      except Exception:  # pylint: disable=broad-except
        pass  # raised again by the test's `started` fixture


def pytest_sessionfinish():
  for background in _RUNNING:
    background.close()


@pytest.fixture
def started(request):
  """What the test's `start_early(launch=...)` marker started: `launch` is
  called with `Background` when the session begins, and what it returned
  comes here."""
  return _start(request.node.get_closest_marker("start_early").kwargs["launch"])

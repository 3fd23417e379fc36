"""Every docstring example of the package and every example of the guide
(docs/guide.rst) runs and prints what it says."""

import ast
import contextlib
import doctest
import importlib
import io
import os
import pathlib
import pkgutil
import re
import sys
import textwrap

import pytest

import optax_guard

_WITHOUT_EXAMPLES = {"optax_guard._args", "optax_guard._eager",
                     "optax_guard._skip", "optax_guard._stats"}
MODULES = sorted(
    m.name for m in pkgutil.iter_modules(optax_guard.__path__,
                                         optax_guard.__name__ + "."))


@pytest.mark.standard_promotion  # examples wrap optax's own optimizers
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  if name == "optax_guard.plot":  # its examples draw: the `plot` extra
    pytest.importorskip("matplotlib").use("Agg")
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} failing examples in {name}"
  # The internal modules hold no public name, hence no example.
  assert result.attempted > 0 or name in _WITHOUT_EXAMPLES, name


def test_every_public_name_has_a_full_docstring():
  plot = importlib.import_module("optax_guard.plot")  # no matplotlib needed
  names = [(optax_guard, n) for n in optax_guard.__all__]
  for module, name in names + [(plot, n) for n in plot.__all__]:
    obj = getattr(module, name)
    if not callable(obj):
      continue
    doc = obj.__doc__ or ""
    # A class (a state, an error) has fields or attributes, not arguments.
    sections = (("Example:", "References:") if isinstance(obj, type) else
                ("Args:", "Returns:", "Example:", "References:"))
    for section in sections:
      assert section in doc, f"{name} lacks a {section} section"


# ------------------------------------------------------------------ the guide
#
# `python -m sphinx -b doctest docs docs/_build/doctest` runs the guide's
# examples, but Sphinx is not a test dependency. What the guide uses of
# `sphinx.ext.doctest` is small: `doctest` blocks (`>>>` examples) and
# `testcode` blocks each followed by the `testoutput` they print, all sharing
# one namespace in document order after conf.py's `doctest_global_setup`, and
# compared with Sphinx's default flags. This runs exactly that, in a process
# of its own with the 4 devices of conf.py, started when the session begins.

_GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide.rst"
_SPHINX_FLAGS = (doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL |
                 doctest.DONT_ACCEPT_TRUE_FOR_1)
_DIRECTIVE = re.compile(r"^\.\. (doctest|testcode|testoutput|testsetup)::")


def _guide_blocks(text):
  """(directive, body, line) of each doctest directive, in document order."""
  lines = text.splitlines()
  for i, line in enumerate(lines):
    found = _DIRECTIVE.match(line)
    if not found:
      continue
    body = []
    for following in lines[i + 1:]:
      if following.strip() and not following.startswith(" "):
        break
      body.append(following)
    body = textwrap.dedent("\n".join(body)).strip("\n")
    if re.match(r"^:\w", body):
      raise ValueError(f"line {i + 1}: directive options are not "
                       "supported by this runner.")
    yield found.group(1), body + "\n", i + 1


def _global_setup() -> str:
  """conf.py's `doctest_global_setup`, read without running conf.py."""
  tree = ast.parse((_GUIDE.parent / "conf.py").read_text())
  for node in tree.body:
    if (isinstance(node, ast.Assign) and
        [getattr(t, "id", None) for t in node.targets] ==
        ["doctest_global_setup"]):
      return ast.literal_eval(node.value)
  raise ValueError("docs/conf.py sets no doctest_global_setup.")


def run_guide(path=_GUIDE) -> list[str]:
  """Runs the guide's examples; returns a description of each failure."""
  namespace = {}
  exec(_global_setup(), namespace)  # pylint: disable=exec-used
  failures = []
  checker = doctest.OutputChecker()
  blocks = list(_guide_blocks(path.read_text()))
  for k, (kind, body, line) in enumerate(blocks):
    if kind == "doctest":
      test = doctest.DocTestParser().get_doctest(
          body, namespace, f"{path.name}:{line}", str(path), line)
      test.globs = namespace  # shared with the blocks after it (not a copy)
      report = io.StringIO()
      runner = doctest.DocTestRunner(checker, optionflags=_SPHINX_FLAGS)
      runner.run(test, out=report.write, clear_globs=False)
      if runner.failures:
        failures.append(report.getvalue())
    elif kind in ("testcode", "testsetup"):
      printed = io.StringIO()
      try:
        with contextlib.redirect_stdout(printed):
          exec(compile(body, f"{path.name}:{line}", "exec"), namespace)  # pylint: disable=exec-used
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{path.name}:{line}: {type(e).__name__}: {e}")
        continue
      expected = (blocks[k + 1][1] if k + 1 < len(blocks) and
                  blocks[k + 1][0] == "testoutput" else "")
      if not checker.check_output(expected, printed.getvalue(),
                                  _SPHINX_FLAGS):
        failures.append(f"{path.name}:{line}: printed\n{printed.getvalue()}"
                        f"instead of\n{expected}")
  return failures


def _start_guide(background):
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0"}
  return background([sys.executable, __file__, "guide"], env=env)


def test_the_guide_runner_tells_right_from_wrong(tmp_path):
  """The runner shares one namespace in document order and reports a wrong
  `>>>` output, a wrong `testoutput` and an exception (by line)."""
  page = tmp_path / "page.rst"
  page.write_text(textwrap.dedent("""\
      Text.

      .. doctest::

         >>> x = 2
         >>> x + 1
         3

      .. testcode::

         print(x * 10, np.arange(2))

      .. testoutput::

         20 [0 1]

      .. doctest::

         >>> x + 2
         5

      .. testcode::

         print("a  b")

      .. testoutput::

         a b

      .. testcode::

         1 / 0
      """))
  failures = run_guide(page)
  assert len(failures) == 3, failures
  assert "Expected:\n    5\nGot:\n    4" in failures[0], failures[0]
  assert failures[1].startswith("page.rst:22: printed\na  b\ninstead of\na b")
  assert failures[2] == "page.rst:30: ZeroDivisionError: division by zero"


@pytest.mark.start_early(launch=_start_guide)
def test_guide_examples(started):
  result = started.result()
  assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
  assert result.stdout.strip().endswith("examples of the guide ran"), (
      result.stdout[-2000:])


if __name__ == "__main__" and sys.argv[1:] == ["guide"]:
  failed = run_guide()
  print("\n\n".join(failed))
  if failed:
    sys.exit(f"{len(failed)} guide examples failed.")
  print(f"all {len(list(_guide_blocks(_GUIDE.read_text())))} "
        "examples of the guide ran")

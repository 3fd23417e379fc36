"""Every docstring example of the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import optax_guard

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


def test_every_public_name_has_a_full_docstring():
  plot = importlib.import_module("optax_guard.plot")  # no matplotlib needed
  names = [(optax_guard, n) for n in optax_guard.__all__]
  for module, name in names + [(plot, n) for n in plot.__all__]:
    obj = getattr(module, name)
    if not callable(obj) or isinstance(obj, type):
      continue
    doc = obj.__doc__ or ""
    for section in ("Args:", "Returns:", "Example:", "References:"):
      assert section in doc, f"{name} lacks a {section} section"

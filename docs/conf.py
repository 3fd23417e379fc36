"""Sphinx configuration for the optax_guard documentation.

Build (from this directory)::

  python -m sphinx -b html . _build/html        # the HTML docs
  python -m sphinx -b doctest . _build/doctest  # run every example

The build works offline. Intersphinx links to the Python, NumPy, JAX, optax
and Flax docs are made only when their inventories can be fetched; set
``OG_DOCS_OFFLINE=1`` to skip the network altogether (no probe, no wait).
"""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import socket
import sys
import threading
import urllib.parse

from docutils.parsers.rst import roles as rst_roles

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

# Four CPU devices for the multi-device example of the guide (it is written
# for any device count); set before JAX starts, and only if XLA_FLAGS is unset.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import optax_guard  # noqa: E402  (after the sys.path change)

# -- Project -----------------------------------------------------------------

project = "optax_guard"
author = "The optax_guard authors"
copyright = "the optax_guard authors"  # noqa: A001  (Sphinx's name)
release = optax_guard.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# The docstrings write code in single backticks (Markdown habit). The default
# role below turns a dotted Python name (`optax.chain`, `skip_nonfinite`) into
# a cross-reference and anything else (`loss=`, `grad/norm/<layer>`) into
# inline code, so that nothing renders as italics or loses its `<...>`.
default_role = "og-auto"

# -- autodoc / autosummary / napoleon -----------------------------------------

autosummary_generate = True           # stubs go to api/generated/ (gitignored)
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# -- doctest -------------------------------------------------------------------

# Plain `>>>` blocks (docstring examples pulled in by autodoc included) are
# run too, in the group "default".
doctest_test_doctest_blocks = "default"
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_guard as og
"""

# -- HTML ----------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"optax_guard {release}"
html_static_path = []
html_theme_options = {
    "description": "Keep training alive when gradients explode, and see why.",
    "fixed_sidebar": True,
}

# -- intersphinx (guarded: never breaks or stalls an offline build) -----------

_INTERSPHINX = {
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "jax": "https://docs.jax.dev/en/latest/",
    "optax": "https://optax.readthedocs.io/en/latest/",
    "flax": "https://flax.readthedocs.io/en/latest/",
}
intersphinx_timeout = 5
intersphinx_disabled_reftypes = ["std:doc"]


def _reachable(urls: list[str], timeout: float = 3.0) -> bool:
  """Whether every host answers a TCP connect within `timeout` seconds.

  Runs in a daemon thread so that a stalled DNS lookup (which ignores socket
  timeouts) cannot hold the build up either.
  """
  result: list[bool] = []

  def probe() -> None:
    try:
      for url in urls:
        host = urllib.parse.urlsplit(url).hostname
        with socket.create_connection((host, 443), timeout=timeout):
          pass
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout * 2)
  return bool(result and result[0])


if os.environ.get("OG_DOCS_OFFLINE", "") not in ("", "0"):
  intersphinx_mapping = {}
elif _reachable(list(_INTERSPHINX.values())):
  intersphinx_mapping = {k: (v, None) for k, v in _INTERSPHINX.items()}
else:
  print("conf.py: intersphinx hosts unreachable; building without external "
        "links (set OG_DOCS_OFFLINE=1 to skip this probe).")
  intersphinx_mapping = {}

# -- Local extensions ----------------------------------------------------------

_DOTTED_NAME = re.compile(r"^~?[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\(\))?$")


def _og_auto_role(name, rawtext, text, lineno, inliner, options=None,
                  content=None):
  """Default role: a cross-reference for a dotted name, inline code else."""
  from sphinx.domains.python import PyXRefRole  # pylint: disable=g-import-not-at-top
  if _DOTTED_NAME.match(text):
    if text.startswith("og."):  # the package as users import it
      text = f"{text} <optax_guard.{text[3:]}>"
    return PyXRefRole()("py:obj", rawtext, text, lineno, inliner,
                        options or {}, content or [])
  return rst_roles.code_role("code", rawtext, text, lineno, inliner,
                             options or {}, content or [])


def _field_comments(cls: type) -> list[tuple[str, str, str]]:
  """(name, annotation, comment) of each field of a NamedTuple state class.

  The states document each field with a trailing comment that gives its
  dtype and meaning (``grad_norm: jax.Array  # f32[] global norm ...``),
  continued on the comment-only lines below it; they are shown in the API
  pages as a field list.
  """
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    return []
  out = []
  fields = set(getattr(cls, "_fields", ()))
  for line in source.splitlines():
    match = re.match(r"^\s+(\w+):\s*([^#=]+?)\s*#\s*(.*)$", line)
    if match and match.group(1) in fields:
      out.append(list(match.groups()))
      continue
    more = re.match(r"^\s+#\s*(.*)$", line)
    if more and out and out[-1] is not None:
      out[-1][2] = f"{out[-1][2]} {more.group(1)}"
    elif not more:
      out.append(None)  # a comment below is no longer the field's
  return [tuple(f) for f in out if f is not None]


def _rst_escape(text: str) -> str:
  """`text` as plain reST text: no emphasis, substitution or reference."""
  return re.sub(r"([\\*|`_])", r"\\\1", text)


def _process_docstring(app, what, name, obj, options, lines):
  """Adds the field list of state classes, and a docstring for HIST_BUCKETS."""
  del app, options
  if name == "optax_guard.HIST_BUCKETS":
    lines[:] = [
        "Names of the buckets of the `monitor` histograms (`grad/hist/<layer>`).",
        "",
        "`zero` (zeros and float32 subnormals); then one bucket per decade",
        "of magnitude, `1e-10` (every other value below `1e-9`) up to `1e4`",
        "(every finite value from",
        "`1e4` up); then `nan` and `inf` (either sign). Row `i` of a",
        "histogram counts the elements in bucket `HIST_BUCKETS[i]`.",
        "",
        ">>> len(og.HIST_BUCKETS), og.HIST_BUCKETS[:3], og.HIST_BUCKETS[-3:]",
        "(18, ('zero', '1e-10', '1e-9'), ('1e4', 'nan', 'inf'))",
        "",
    ]
    return
  if (what == "class" and isinstance(obj, type) and issubclass(obj, tuple)
      and hasattr(obj, "_fields")
      and obj.__module__.startswith("optax_guard")):
    fields = _field_comments(obj)
    if fields:
      lines.extend(["", ".. rubric:: Fields", ""])
      for field, annotation, comment in fields:
        annotation = _PRIVATE_MODULE.sub("", annotation)
        lines.append(f"* ``{field}`` (``{annotation}``): {_rst_escape(comment)}")
      lines.append("")


_PRIVATE_MODULE = re.compile(r"\b_[a-z]\w*\.")


def _process_signature(app, what, name, obj, options, signature,
                       return_annotation):
  """Drops private module prefixes (`_metrics.PerLayer` -> `PerLayer`), and
  shows the decays' default mask (a sentinel, so that
  `optax.inject_hyperparams` leaves it alone) as what it stands for."""
  del app, what, name, obj, options
  if signature:
    signature = _PRIVATE_MODULE.sub("", signature).replace(
        "= _DEFAULT", "= og.decay_mask")
  if return_annotation:
    return_annotation = _PRIVATE_MODULE.sub("", return_annotation)
  return signature, return_annotation


def _check_api_complete(app):
  """Warns when a name of `optax_guard.__all__` is missing from api.rst."""
  text = (DOCS / "api.rst").read_text(encoding="utf-8")
  listed = set(re.findall(r"^\s+~?(?:optax_guard\.)?(\w+)\s*$", text, re.M))
  missing = sorted(set(optax_guard.__all__) - listed)
  if missing:
    from sphinx.util import logging  # pylint: disable=g-import-not-at-top
    logging.getLogger(__name__).warning(
        "api.rst does not list these names of optax_guard.__all__: %s",
        ", ".join(missing))


def setup(app):
  app.add_role("og-auto", _og_auto_role)
  app.connect("autodoc-process-docstring", _process_docstring)
  app.connect("autodoc-process-signature", _process_signature)
  app.connect("builder-inited", _check_api_complete)
  return {"parallel_read_safe": True}

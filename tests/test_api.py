"""The curated public API: names resolve to what they say, JAX loads only when needed."""

import subprocess
import sys

import jexit


def test_public_functions_stay_functions_after_submodule_imports():
  import jexit.evaluation  # noqa: F401  pylint: disable=import-outside-toplevel
  import jexit.protocol  # noqa: F401  pylint: disable=import-outside-toplevel
  import jexit.select  # noqa: F401  pylint: disable=import-outside-toplevel
  for name in ("evaluate", "frontier", "choose", "solve", "fit", "expected_objective"):
    assert callable(getattr(jexit, name)), name
    assert not isinstance(getattr(jexit, name), type(jexit)), name
  for name in jexit.__all__:
    getattr(jexit, name)


def test_numpy_runtime_and_export_do_not_import_jax():
  code = ("import sys, jexit, jexit.runtime, jexit.export; "
          "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
  subprocess.run([sys.executable, "-c", code], check=True)

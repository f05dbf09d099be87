"""Test-wide settings."""

import functools
import importlib.util
import os

import pytest

# Tests run the CLI in-process: keep JAX's compilation cache out of the home directory.
os.environ.setdefault("JEXIT_CACHE_DIR", "")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _load(path):
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def load_script():
  """Imports a script of this repository (e.g. "experiments/ceiling.py") once."""
  return _load
